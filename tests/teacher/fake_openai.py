"""A small local stand-in for ``vllm serve``'s ``/v1/models`` and ``/v1/completions`` (prompt log-probs),
answering in the shape a real vLLM 0.32 server does (tests/teacher/data/vllm_completions_reply.json is
one recorded reply): one choice per prompt, ``prompt_logprobs`` a list with ``null`` first and then per
position ``{"<id>": {"logprob", "rank", "decoded_token"}}`` holding the top-K and the actual token.

The log-probs come from a transformers model on CPU (float32). ``faults`` holds canned answers
``(status, body)`` served, in order, before the real ones; ``edit`` may rewrite a real reply (bad replies);
``requests`` records every request's path, headers and body."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

SERVED = "tiny-teacher"


def prompt_logprobs(model, ids: list[int], k: int) -> list:
    """vLLM's ``prompt_logprobs`` for one prompt under ``model``: None, then per position top-k + actual."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    out: list = [None]
    for i in range(1, len(ids)):
        row = logp[i - 1]
        order = row.argsort(descending=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, row.numel() + 1)
        entry = {
            str(int(t)): {"logprob": float(row[t]), "rank": int(ranks[t]), "decoded_token": None}
            for t in order[:k]
        }
        entry.setdefault(
            str(ids[i]), {"logprob": float(row[ids[i]]), "rank": int(ranks[ids[i]]), "decoded_token": None}
        )
        out.append(entry)
    return out


class FakeOpenAIServer:
    def __init__(
        self, model, *, api_key: str | None = None, max_logprobs: int = 20, max_model_len: int = 256
    ):
        self.model, self.api_key = model, api_key
        self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
        self.faults: list[tuple[int, object]] = []
        self.edit = None  # callable(reply dict) -> reply dict
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, method: str, path: str, headers: dict, body: dict | None) -> tuple[int, object]:
        with self._lock:
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
            if self.faults:
                return self.faults.pop(0)
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "Unauthorized", "type": "AuthenticationError", "code": 401}}
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": SERVED, "max_model_len": self.max_model_len}]}
        if method != "POST" or path != "/v1/completions":
            return 404, {"error": {"message": f"no route {path}", "code": 404}}
        k = body.get("prompt_logprobs")
        if k > self.max_logprobs:
            message = (
                f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs} "
                f"(parameter=prompt_logprobs, value={k})"
            )
            return 400, {"error": {"message": message, "type": "BadRequestError", "code": 400}}
        choices = [
            {
                "index": i,
                "text": "",
                "logprobs": None,
                "finish_reason": "length",
                "token_ids": [0],
                "prompt_logprobs": prompt_logprobs(self.model, ids, k),
                "prompt_token_ids": ids if body.get("return_token_ids") else None,
            }
            for i, ids in enumerate(body["prompt"])
        ]
        reply = {"object": "text_completion", "model": body.get("model"), "choices": choices}
        return 200, (self.edit(reply) if self.edit else reply)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str):
                n = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, reply = server.answer(method, self.path, headers, body)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def log_message(self, *args):
                pass

        return Handler
