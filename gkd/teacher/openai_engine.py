"""Teacher scores from an OpenAI-compatible server that is already running (``teacher.backend: openai``).

A user who serves the teacher with ``vllm serve`` for other purposes points ``teacher.url`` at it; the
trainer then scores through vLLM's ``/v1/completions`` instead of a gkd teacher service. One request per
micro-batch (at most ``max_sequences_per_request`` sequences and ``max_tokens_per_request`` tokens)::

    POST {url}/v1/completions
    {"model": <served name>, "prompt": [[prompt + response ids], ...], "max_tokens": 1,
     "prompt_logprobs": K, "temperature": 0, "return_token_ids": true}

Up to ``max_in_flight`` of them run at once, so the server batches them. vLLM answers one ``choice`` per
prompt (``index`` = its position) whose ``prompt_logprobs`` is a list over the prompt's positions: entry 0
is ``null``, entry i a JSON object ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` holding the
top-K (ranks 1..K) and the actual token i when it ranks lower. The rows of a response are entries
``len(prompt) .. len(prompt) + R - 1``, exactly what :class:`gkd.teacher.types.TeacherOutput` holds.

What a gkd teacher service does and this server cannot:

- Temperature: vLLM computes prompt log-probs from the raw logits (the request's temperature does not
  reach them), so only ``teacher.temperature: 1`` is served; any other is refused before a request.
- Requested ids (``loss.support: union``): as the in-process vLLM engine does, the request asks for the
  top-(K + M) and the reply says ``support="topk"``. The server's ``--max-logprobs`` (vLLM's default 20)
  must cover K (+ M); a server that refuses names it in its error, which is passed on.
- Generation (``loss.seq_kd`` with ``lmbda < 1``): not offered here; the config check refuses it.

Every reply is checked before it is used, as a gkd teacher reply is: one choice per sequence, the prompt
echoed unchanged, exactly K entries ranked 1..K at every response position plus the actual token, ids in
``[0, vocab_size)`` (the student's vocabulary when known), log-probs finite and <= 0 (vLLM writes -inf as
-9999, which is kept: finite and below any real entry). A bad reply is a :class:`ProtocolError` naming the
sequence and position.

Retries and liveness, like the ZeroMQ clients: each attempt may take ``timeout_s``; connecting may take
``liveness_timeout_s`` (a dead server is noticed in seconds, a long request is not cut short); a failed
connection, a dropped connection, a timeout or a 408/429/5xx answer is retried ``retries`` times with a
short back-off; any other HTTP error is final and carries the server's own message. The API key
(``teacher.api_key_file``: a file holding the key on its first line) goes in an ``Authorization: Bearer``
header. Replies are JSON only.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import torch

from gkd.services.transport import PROTOCOL_VERSION, ProtocolError, RemoteError, plan_chunks
from gkd.services.transport.client import ServiceUnavailable
from gkd.services.transport.service_client import item_length
from gkd.teacher.types import TeacherOutput, check_sequences

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_S = 0.5  # first retry after this, then doubled
POSITIVE_SLACK = 1e-4  # a log-prob this far above 0 is rounding; beyond it the reply is wrong


def read_api_key(path: str, key: str = "teacher.api_key_file") -> str:
    """The key on the first line of ``path``; a missing or empty file is a ``ValueError`` naming ``key``."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as e:
        raise ValueError(f"{key}={path}: cannot read it ({e.strerror or e})") from None
    if not token:
        raise ValueError(f"{key}={path}: the file is empty (put the server's API key on its first line)")
    return token


def completion_body(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], top_k: int, model: str) -> dict:
    """The ``/v1/completions`` request scoring ``sequences`` with ``prompt_logprobs = top_k``."""
    return {
        "model": model,
        "prompt": [[*map(int, p), *map(int, r)] for p, r in sequences],
        "max_tokens": 1,
        "prompt_logprobs": int(top_k),
        "temperature": 0.0,
        "return_token_ids": True,
    }


def _position_rows(entry: Any, actual: int, k: int, where: str) -> tuple[list[int], list[float], float]:
    """One ``prompt_logprobs`` entry -> (top-k ids by rank, their log-probs, the actual token's)."""
    if not isinstance(entry, dict):
        raise ProtocolError(f"{where}: expected an object of log-probs, got {type(entry).__name__}")
    ranked: list[tuple[int, int, float]] = []
    token: float | None = None
    for tid, value in entry.items():
        try:
            t, lp, rank = int(tid), float(value["logprob"]), value.get("rank")
        except (TypeError, ValueError, KeyError):
            raise ProtocolError(f"{where}: entry {tid!r}: {value!r} is not a log-prob object") from None
        if t == actual:
            token = lp
        if isinstance(rank, int) and 1 <= rank <= k:
            ranked.append((rank, t, lp))
    ranked.sort()
    if [r for r, _, _ in ranked] != list(range(1, k + 1)):
        raise ProtocolError(
            f"{where}: {len(ranked)} entries ranked 1..{k}, expected exactly {k} (does the server's "
            f"--max-logprobs cover top_k={k}?)"
        )
    if token is None:
        raise ProtocolError(f"{where}: the response token {actual} has no log-prob")
    return [t for _, t, _ in ranked], [lp for _, _, lp in ranked], token


def parse_choice(
    choice: dict, prompt: Sequence[int], response: Sequence[int], k: int, index: int
) -> TeacherOutput:
    """One ``choice`` of a ``/v1/completions`` reply -> the ``TeacherOutput`` of its response tokens."""
    where = f"teacher reply, sequence {index}"
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != [*map(int, prompt), *map(int, response)]:
        raise ProtocolError(f"{where}: the server scored other token ids than were sent (did it truncate?)")
    entries = choice.get("prompt_logprobs")
    n = len(prompt) + len(response)
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ProtocolError(f"{where}: prompt_logprobs has {got} positions, expected {n}")
    ids, lps, tok = [], [], []
    for j, actual in enumerate(response):
        i, lp, t = _position_rows(entries[len(prompt) + j], int(actual), k, f"{where}, response position {j}")
        ids.append(i)
        lps.append(lp)
        tok.append(t)
    return TeacherOutput(
        torch.tensor(ids, dtype=torch.int32).view(len(response), k),
        torch.tensor(lps, dtype=torch.float32).view(len(response), k),
        torch.tensor(tok, dtype=torch.float32),
    )


def check_output(out: TeacherOutput, vocab_size: int | None, index: int) -> TeacherOutput:
    """Ids in ``[0, vocab_size)``, log-probs finite and <= 0 (within rounding; then clamped to 0)."""
    where = f"teacher reply, sequence {index}"
    ids = out.topk_ids
    if ids.numel() and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ProtocolError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    for name, t in (("top-k log-probs", out.topk_logprobs), ("token log-probs", out.token_logprobs)):
        if not bool(torch.isfinite(t).all()) or (t.numel() and float(t.max()) > POSITIVE_SLACK):
            bad = t[~torch.isfinite(t) | (t > POSITIVE_SLACK)][0]
            raise ProtocolError(f"{where}: {name} hold {float(bad)}; log-probs must be finite and <= 0")
        t.clamp_(max=0.0)
    return out


def parse_reply(
    reply: Any,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    k: int,
    vocab_size: int | None,
    offset: int = 0,
    support: str = "topk",
) -> list[TeacherOutput]:
    """A ``/v1/completions`` reply to :func:`completion_body` -> one checked ``TeacherOutput`` per sequence
    (``offset``: the index of the first sequence in the caller's batch, for messages)."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or len(choices) != len(sequences):
        got = len(choices) if isinstance(choices, list) else "no"
        raise ProtocolError(f"teacher reply has {got} choices for {len(sequences)} sequences")
    by_index = sorted(choices, key=lambda c: c.get("index", -1) if isinstance(c, dict) else -1)
    if [c.get("index") if isinstance(c, dict) else None for c in by_index] != list(range(len(sequences))):
        raise ProtocolError("teacher reply's choices are not indexed 0..n-1 (one per sequence)")
    outs = []
    for i, (choice, (p, r)) in enumerate(zip(by_index, sequences, strict=True)):
        out = check_output(parse_choice(choice, p, r, k, offset + i), vocab_size, offset + i)
        out.support = support
        outs.append(out)
    return outs


def _error_text(response: httpx.Response) -> str:
    """The server's own error message (vLLM: ``{"error": {"message": ...}}``), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    err = body.get("error", body) if isinstance(body, dict) else body
    message = err.get("message") if isinstance(err, dict) else None
    return str(message if message is not None else err)[:300]


class OpenAITeacherClient:
    """The trainer's teacher client for an OpenAI-compatible server (see the module docstring): the same
    ``submit``/``score``/``info``/``close`` as :class:`gkd.teacher.client.TeacherClient`, thread-safe."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 600.0,
        retries: int = 2,
        liveness_timeout_s: float | None = 15.0,
        max_sequences_per_request: int = 16,
        max_tokens_per_request: int = 16384,
        max_in_flight: int = 4,
        vocab_size: int | None = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"teacher.url={url!r}: expected http://HOST:PORT (the server's base address)")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.model = model  # None: the server's first model (GET /v1/models)
        self.retries, self.vocab_size = int(retries), vocab_size
        self.max_len: int | None = None  # prompt + response tokens, from the server's list (``info``)
        self.max_sequences_per_request = max_sequences_per_request
        self.max_tokens_per_request = max_tokens_per_request
        connect = liveness_timeout_s if liveness_timeout_s is not None else timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect),
            limits=httpx.Limits(max_connections=max_in_flight),
        )
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="gkd-openai-teacher")
        self._lock = threading.Lock()
        self.stats = {"sent": 0, "retries": 0, "bad_replies": 0}

    @classmethod
    def from_config(cls, cfg, *, timeout_s: float | None = None, retries: int = 2) -> OpenAITeacherClient:
        """The client ``teacher.url`` / ``teacher.api_key_file`` / ``teacher.served_model`` describe; ids are
        checked against the student's vocabulary (``model.student_path``'s ``config.json``) when readable."""
        t = cfg.teacher
        key = read_api_key(t.api_key_file) if t.api_key_file else None
        return cls(
            t.url,
            api_key=key,
            model=t.served_model,
            timeout_s=timeout_s or t.request_timeout_s,
            retries=retries,
            liveness_timeout_s=t.liveness_timeout_s,
            vocab_size=_folder_vocab(cfg.model.student_path),
        )

    # --- HTTP ---------------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None) -> Any:
        """One JSON call with the retries of the module docstring."""
        url = f"{self.url}{path}"
        extra = {} if timeout_s is None else {"timeout": httpx.Timeout(timeout_s)}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                with self._lock:
                    self.stats["sent"] += 1
                response = self._http.request(method, url, json=body, **extra)
            except httpx.TimeoutException as e:
                if last:
                    raise TimeoutError(f"{url}: no reply after {self.retries + 1} attempt(s) ({e})") from None
            except httpx.TransportError as e:
                if last:
                    raise ServiceUnavailable(
                        f"{url} is not reachable ({type(e).__name__}: {e}); is the server running there "
                        "(teacher.url)?"
                    ) from None
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise ProtocolError(f"{url}: the reply is not JSON") from None
                if response.status_code not in RETRY_STATUS or last:
                    hint = " (check teacher.api_key_file)" if response.status_code in (401, 403) else ""
                    raise RemoteError(f"http_{response.status_code}", f"{url}: {_error_text(response)}{hint}")
            with self._lock:
                self.stats["retries"] += 1
            time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def served_model(self) -> str:
        """The model requests name: ``model`` when given, else the server's first (asked once)."""
        if self.model is None:
            models = self._call("GET", "/v1/models").get("data") or []
            if not models or not isinstance(models[0], dict) or "id" not in models[0]:
                raise ProtocolError(f"{self.url}/v1/models lists no model")
            self.model = str(models[0]["id"])
        return self.model

    # --- the teacher client's interface ----------------------------------------------------------------

    def info(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """A broker-shaped info reply with the server as its one worker (``model``, ``max_len``; the
        server does not say its vocabulary or tokenizer, so the start-up check cannot compare them)."""
        listed = self._call("GET", "/v1/models", timeout_s=timeout_s).get("data") or []
        entry = next((m for m in listed if isinstance(m, dict) and m.get("id") == self.model), None)
        entry = entry or (listed[0] if listed and isinstance(listed[0], dict) else {})
        if self.model is None and "id" in entry:
            self.model = str(entry["id"])
        worker = {"model": entry.get("id"), "engine": "openai", "url": self.url, "tokenizer": "none"}
        if entry.get("max_model_len") is not None:
            self.max_len = worker["max_len"] = int(entry["max_model_len"]) - 1  # + the one generated token
        if self.vocab_size is not None:
            worker["token_ids"] = self.vocab_size  # checked per reply
        return {"protocol": PROTOCOL_VERSION, "workers": [{"info": worker, "busy": False}], "queue": 0}

    def submit(
        self,
        sequences: Sequence[tuple[Any, Any]],
        top_k: int | None = None,
        temperature: float | None = None,
        requested_ids: Sequence[Any] | None = None,
    ) -> Future[list[TeacherOutput]]:
        """Score ``(prompt_ids, response_ids)`` pairs (``top_k`` required: the server has no default);
        ``requested_ids``: answered with the top-(K + M), ``support="topk"`` (module docstring)."""
        if top_k is None or int(top_k) < 1:
            raise ValueError(f"top_k={top_k!r}: teacher.backend=openai needs teacher.top_k >= 1")
        if temperature is not None and float(temperature) != 1.0:
            raise ValueError(
                f"teacher.temperature={temperature}: an OpenAI-compatible server (vLLM) scores prompt "
                "tokens from the raw logits, so teacher.backend=openai serves temperature 1 only"
            )
        k = int(top_k) + (
            int(requested_ids[0].shape[1]) if requested_ids is not None and requested_ids else 0
        )
        seqs = [([*map(int, p)], [*map(int, r)]) for p, r in sequences]
        # before sending: vLLM's server does not check ids against its vocabulary without a tokenizer (an
        # id past it kills its engine core)
        unbounded = 1 << 62
        check_sequences(
            seqs,
            vocab_size=self.vocab_size or unbounded,
            max_len=self.max_len or unbounded,
            top_k=k,
            max_top_k=k,
        )
        sizes = [item_length(p) + item_length(r) for p, r in seqs]
        chunks = plan_chunks(
            sizes, max_items=self.max_sequences_per_request, max_tokens=self.max_tokens_per_request
        )
        parts = [self._pool.submit(self._score_chunk, [seqs[i] for i in c], k, c.start) for c in chunks]
        return _gather(parts)

    def _score_chunk(self, seqs: list, k: int, offset: int) -> list[TeacherOutput]:
        start = time.perf_counter()
        reply = self._call("POST", "/v1/completions", completion_body(seqs, k, self.served_model()))
        try:
            outs = parse_reply(reply, seqs, k, self.vocab_size, offset)
        except ProtocolError:
            with self._lock:
                self.stats["bad_replies"] += 1
            raise
        share = (time.perf_counter() - start) / max(len(outs), 1)
        for out in outs:
            out.service_s = share
        return outs

    def score(self, sequences, top_k: int | None = None, temperature: float | None = None):
        """``submit(...).result()``."""
        return self.submit(sequences, top_k, temperature).result()

    def generate(self, *args, **kwargs):
        raise ValueError(
            "teacher.backend=openai scores only; the teacher's own answers (loss.seq_kd with loss.lmbda < 1) "
            "need a gkd teacher service (teacher.backend hf or vllm)"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gather(parts: list[Future]) -> Future[list[TeacherOutput]]:
    """One future holding the parts' results concatenated in order, or the first error."""
    result: Future[list[TeacherOutput]] = Future()
    if not parts:
        result.set_result([])
        return result
    remaining = [len(parts)]
    lock = threading.Lock()

    def done(part: Future) -> None:
        error = part.exception()
        with lock:
            remaining[0] -= 1
            if result.done() or (error is None and remaining[0]):
                return
            if error is not None:  # the first failure fails the whole batch at once
                result.set_exception(error)
                return
        result.set_result([out for p in parts for out in p.result()])

    for part in parts:
        part.add_done_callback(done)
    return result


def _folder_vocab(path: str) -> int | None:
    """``vocab_size`` from ``path/config.json`` (None when there is none to read)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    value = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return int(value) if isinstance(value, int) else None
