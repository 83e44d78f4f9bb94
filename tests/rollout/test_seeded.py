"""``rollout.seeded``: the trainer's sampling requests carry a seed on the hf engine (reproducible tests)
and none on vLLM by default (vLLM samples seeded requests one by one with their own generators)."""

from types import SimpleNamespace

import pytest

from gkd.config import load_config, rollout_seeded
from gkd.trainer.sources import BatchSources

BASE = ["model.student_path=/m", "data.train_files=/d.parquet"]


class _Recorder:
    def __init__(self):
        self.sampling = []

    def submit(self, prompts, sampling, min_version=None):
        self.sampling.append(sampling)
        return "future"


@pytest.mark.parametrize(
    "overrides, seeded",
    [
        ([], True),
        (["rollout.backend=vllm", "rollout.n_gpus_per_node=1"], False),
        (["rollout.backend=vllm", "rollout.n_gpus_per_node=1", "rollout.seeded=true"], True),
        (["rollout.seeded=false"], False),
    ],
)
def test_requests_are_seeded_as_configured(overrides, seeded):
    cfg = load_config([], [*BASE, *overrides])
    assert rollout_seeded(cfg) is seeded
    loader = SimpleNamespace(batch=lambda b: SimpleNamespace(prompt_ids=[[1, 2], [3]]))
    rollout = _Recorder()
    sources = BatchSources(cfg, loader, SimpleNamespace(eos_token_id=0), rollout, None)
    assert sources.generate(4, 0) == "future"
    (sampling,) = rollout.sampling
    assert (sampling.seed is not None) is seeded
    if seeded:
        assert sampling.seed == sources._seed(4)
