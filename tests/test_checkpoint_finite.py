"""Checkpoints record whether their weights were finite, and ``keep_last`` never deletes the newest one
whose weights are: a run whose weights went NaN keeps its last good state."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from gkd.trainer.checkpoint import list_checkpoints, read_meta
from gkd.trainer.checkpoint.prune import to_prune, weights_finite
from gkd.trainer.checkpoint.writer import CheckpointWriter
from tests.test_checkpoint import _fresh, _save
from tests.test_checkpoint_sharded import _small
from tests.transport.helpers import free_port


def _poison(model) -> None:
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan


def _steps(out) -> list[int]:
    return [s for s, _ in list_checkpoints(out)]


def _finite(out, step: int) -> bool:
    return read_meta(out / "checkpoints" / f"step_{step:06d}")["weights_finite"]


def test_pruning_keeps_the_newest_checkpoint_with_finite_weights(tmp_path):
    model, opt, sched = _fresh()
    for step in (1, 2):
        _save(tmp_path, step, model, opt, sched, keep_last=2)
    _poison(model)
    for step in (3, 4, 5):
        _save(tmp_path, step, model, opt, sched, keep_last=2)
    assert _steps(tmp_path) == [2, 4, 5]  # step 2 stays: the newest whose weights are finite
    assert [_finite(tmp_path, s) for s in (2, 4, 5)] == [True, False, False]
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    _save(tmp_path, 6, model, opt, sched, keep_last=2)  # a finite checkpoint is kept again: plain keep_last
    assert _steps(tmp_path) == [5, 6] and _finite(tmp_path, 6)


def test_to_prune_counts_unrecorded_checkpoints_as_finite_and_unreadable_ones_as_not(tmp_path):
    found = []
    for step, meta in enumerate([{}, {"weights_finite": True}, "{not json", {"weights_finite": False}]):
        path = tmp_path / f"step_{step:06d}"
        path.mkdir()
        (path / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        found.append((step, path))
    assert to_prune(found, 2) == [found[0][1]]  # step 1 is kept: newer ones are unreadable / non-finite
    assert to_prune(found, 3) == [found[0][1]]  # the kept step 1 is finite: plain keep_last
    assert to_prune(found[2:], 1) == [found[2][1]]  # no finite checkpoint at all: keep_last as usual


def test_weights_finite_looks_at_every_floating_tensor():
    assert weights_finite([torch.ones(3), torch.arange(4)])
    assert not weights_finite([torch.ones(3), torch.tensor([1.0, math.inf])])
    assert weights_finite([])


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_sharded_save_records_finiteness_and_prunes_alike(tmp_path, one_rank_group):
    model, opt, sched = _fresh()
    writer = CheckpointWriter(background=False)
    out = tmp_path / "run"
    save = lambda step: writer.save_sharded(  # noqa: E731
        out, step, model=model, optimizer=opt, keep_last=1, rank0=_small(sched, step, str(tmp_path))
    )
    save(1)
    _poison(model)
    save(2)
    save(3)
    assert _steps(out) == [1, 3]
    assert read_meta(out / "checkpoints" / "step_000001")["weights_finite"] is True
    assert read_meta(out / "checkpoints" / "step_000003")["weights_finite"] is False
