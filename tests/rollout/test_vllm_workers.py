"""The weight receiver inside the vLLM workers (gkd.rollout.vllm_worker), without vLLM: the rollout
engine runs on the stand-in ``vllm`` (tests/fake_vllm.py) with ``tensor_parallel_size=2``, whose two
fake workers carry the real extension and each hold a model copy of their own. Each joins a gloo weight
channel as its own member, stages every version, and loads it when the gkd process says so by name; no
tensor crosses ``collective_rpc`` (the stand-in refuses one)."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch

from gkd.rollout.versioned import VersionedEngine, WeightChannel
from gkd.weights.channel import ChannelHost
from gkd.weights.transfer import WeightSender
from tests import fake_vllm

TIMEOUT = timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _VLLMModel:
    """Stands for a vLLM model: ``load_weights`` copies every (name, tensor) into its own parameters."""

    def __init__(self, hf):
        self.hf = hf
        self.fail = False

    def load_weights(self, weights):
        if self.fail:
            raise RuntimeError("this rank cannot load")
        params, loaded = dict(self.hf.named_parameters()), set()
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
                loaded.add(name)
        return loaded

    def parameters(self):
        return self.hf.parameters()


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def tp2(monkeypatch, student_dir):
    """(trainer model, engine, fake LLM, versioned engine, channel host) with two TP ranks in a channel."""
    from transformers import LlamaForCausalLM

    from gkd.rollout.vllm_engine import VLLMRolloutEngine

    fake = fake_vllm.install(monkeypatch)
    monkeypatch.setattr(fake, "device", torch.device("cpu"))
    monkeypatch.setattr(
        fake, "model_factory", lambda: _VLLMModel(LlamaForCausalLM.from_pretrained(student_dir))
    )
    trainer = LlamaForCausalLM.from_pretrained(student_dir)
    engine = VLLMRolloutEngine(student_dir, tensor_parallel_size=2)
    llm = fake.created[-1]
    port = _free_port()
    host = ChannelHost("127.0.0.1", port, 2, backend="gloo", timeout=TIMEOUT)
    channel = WeightChannel("127.0.0.1", port, 1, 3, "gloo", TIMEOUT.total_seconds(), ranks=2)
    versioned = VersionedEngine(engine, channel).start()
    try:
        host.start(lambda group: WeightSender(group, trainer))
        yield trainer, engine, llm, versioned, host
    finally:
        host.close()


def _models(llm):
    return [w.model_runner.get_model().hf for w in llm.workers]


def test_each_tp_rank_joins_receives_and_loads_the_trainers_weights_bit_for_bit(tp2):
    trainer, engine, llm, versioned, host = tp2
    assert engine.receives_in_workers and llm.kwargs["worker_extension_cls"].endswith(
        "WeightReceiverExtension"
    )
    ranks = sorted(w._gkd_weights.channel.rank for w in llm.workers)
    assert ranks == [1, 2] and len(host.members) == 2
    for version in (1, 2):
        _perturb(trainer, version)
        host.sync(version)
        assert versioned.wait_for(version, 60, hand_back=False) == version
        for model in _models(llm):
            for (name, want), (_, got) in zip(
                trainer.named_parameters(), model.named_parameters(), strict=True
            ):
                assert torch.equal(got, want), name
        assert engine.policy_version == version
    named = [name for name, _ in llm.rpcs if name != "gkd_weight_status"]
    assert named == ["gkd_start_weights", "gkd_apply_weights", "gkd_apply_weights"]
    host.close()
    with versioned._changed:
        assert versioned._changed.wait_for(lambda: versioned.state == "closed", 60)


def test_a_rank_that_cannot_load_fails_the_workers_channel_with_its_error(tp2):
    trainer, engine, llm, versioned, host = tp2
    llm.workers[1].model_runner.get_model().fail = True
    host.sync(1)
    with pytest.raises(TimeoutError, match="this rank cannot load"):
        versioned.wait_for(1, 60, hand_back=False)
    assert versioned.failure() is not None and engine.policy_version == 0


def test_tensors_never_cross_collective_rpc(monkeypatch, student_dir):
    fake = fake_vllm.install(monkeypatch)
    from gkd.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(student_dir, tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match="over the weight channel"):
        engine.load_weights([(n, torch.zeros(p.shape)) for n, p in engine.parameters_spec().items()])
    with pytest.raises(TypeError, match="pickled with its whole storage"):
        fake.created[-1].collective_rpc("gkd_apply_weights", args=(torch.zeros(3),))


def test_a_weight_channel_block_must_fit_the_world():
    assert WeightChannel("h", 1, 3, 5, ranks=2).rank == 3
    with pytest.raises(ValueError, match="weight ranks 4..5 must lie in"):
        WeightChannel("h", 1, 4, 5, ranks=2)


class _ScriptedEngine:
    """An engine whose ranks report the statuses in ``script``, one list per poll; records the calls."""

    receives_in_workers = True
    policy_version = 0

    def __init__(self, script):
        self.script, self.calls = list(script), []

    def start_weight_receivers(self, channel):
        self.calls.append("start")
        return ["rank 1", "rank 2"]

    def weight_status(self):
        return self.script.pop(0)

    def apply_staged(self, version):
        self.calls.append(f"apply {version}")
        self.policy_version = version

    def discard_staged(self):
        self.calls.append("discard")

    def stop_weight_receivers(self):
        self.calls.append("stop")


def _rank(state, staged=None, error=None):
    return {"state": state, "staged": staged, "version": 0, "error": error}


def test_ranks_apply_together_and_drop_a_version_one_of_them_lost():
    from gkd.rollout.vllm_worker import follow_workers

    engine = _ScriptedEngine(
        [
            [_rank("ready", 1), _rank("ready")],  # rank 2 still finishing: wait
            [_rank("ready", 1), _rank("rejoining")],  # rank 2 lost version 1: rank 1 drops it
            [_rank("rejoining"), _rank("rejoining")],
            [_rank("ready", 2), _rank("ready", 2)],  # both staged 2: applied together
            [_rank("closed"), _rank("closed")],
        ]
    )
    versioned = VersionedEngine(engine, WeightChannel("h", 1, 1, 3, ranks=2))
    follow_workers(versioned, poll_s=0)
    assert engine.calls == ["start", "discard", "apply 2"] and versioned.state == "closed"
    assert versioned.version == 2


def test_a_failed_rank_stops_the_others_and_fails_the_worker():
    from gkd.rollout.vllm_worker import follow_workers

    engine = _ScriptedEngine([[_rank("ready"), _rank("failed", error="WeightSyncError: gone")]])
    versioned = VersionedEngine(engine, WeightChannel("h", 1, 1, 3, ranks=2))
    with pytest.raises(RuntimeError, match="rank 1: WeightSyncError: gone"):
        follow_workers(versioned, poll_s=0)
    assert engine.calls == ["start", "stop"]


def test_serve_gives_each_engine_a_block_of_tensor_parallel_ranks(monkeypatch):
    from gkd.launch.placement import VLLMOptions
    from gkd.rollout import service as rollout_service
    from gkd.services import host as service

    seen = {}
    monkeypatch.setattr(service, "serve", lambda kind, spec, **kw: seen.update(kw) or 0)
    spec = rollout_service.RolloutSpec("m", "vllm", vllm=VLLMOptions(tensor_parallel_size=2))
    rollout_service.serve(spec, workers=2, weight_channel="10.0.0.1:29600")
    argv = [seen["worker_argv"](i) for i in range(2)]
    blocks = [(a[a.index("--weight-rank") + 1], a[a.index("--weight-world-size") + 1]) for a in argv]
    assert blocks == [("1", "5"), ("3", "5")]  # trainer rank 0, engine 0: ranks 1-2, engine 1: ranks 3-4
