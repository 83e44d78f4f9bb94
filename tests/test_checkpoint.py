"""Checkpoints: bitwise round trip, resumed training equals an uninterrupted run, keep_last pruning, a crash
mid-write leaves the previous checkpoint as the newest, resume resolution, Hugging Face export; background
saves write what a synchronous save writes, and their failures surface."""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gkd.trainer.checkpoint.save as ckpt
from gkd.config import Config, LossConfig, OptimConfig, to_yaml
from gkd.data.prompts import PromptLoader
from gkd.trainer.checkpoint import (
    CheckpointError,
    capture_rng_state,
    export_hf,
    has_checkpoint,
    latest,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from gkd.trainer.checkpoint.writer import CheckpointWriter, HostCopy
from gkd.trainer.step import build_optimizer, pack_micro_batches, train_step
from tests.test_trainer_step import make_samples, teacher_outputs, tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(1)


CFG = SimpleNamespace(loss=LossConfig(), optim=OptimConfig(lr=2e-3, warmup_steps=2, schedule="cosine"))
TOTAL = 6


def _step(model, opt, sched, teacher):
    """One step on a batch drawn from the global RNGs (so a resume that loses them diverges)."""
    seed = int(torch.randint(0, 10_000, ()).item()) + random.randrange(100) + int(np.random.randint(100))
    samples = make_samples(seed, 3)
    micro = pack_micro_batches(samples, teacher_outputs(teacher, samples), 64)
    return train_step(model, opt, sched, micro, CFG)


def _fresh(seed: int = 0):
    model = tiny_llama(seed)
    opt, sched = build_optimizer(model, CFG.optim, TOTAL)
    return model, opt, sched


def _save(out, step, model, opt, sched, **kw):
    kw.setdefault("data_state", {"batch": step, "epoch": 0})
    kw.setdefault("scheduler_state", {"next_train": step, "versions": [step - 1, step]})
    return save_checkpoint(
        out, step, model=model, optimizer=opt, lr_scheduler=sched, config_yaml="loss: {}\n", **kw
    )


def test_round_trip_restores_model_optimizer_schedule_rng_and_data_position_bitwise(tmp_path, teacher):
    model, opt, sched = _fresh()
    for _ in range(2):
        _step(model, opt, sched, teacher)
    loader = PromptLoader([[i, i + 1] for i in range(10)], batch_size=3, seed=5)
    for _ in range(4):  # crosses an epoch boundary
        next(loader)
    yaml = to_yaml(Config())
    path = save_checkpoint(
        tmp_path,
        2,
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        data_state=loader.state_dict(),
        scheduler_state={"staleness": 2, "in_flight": [3, 4]},
        config_yaml=yaml,
    )
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    want_model = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = opt.state_dict()
    want_batch = next(loader)

    model2, opt2, sched2 = _fresh(seed=9)
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    loaded = load_checkpoint(path, model=model2, optimizer=opt2, lr_scheduler=sched2)
    assert (random.random(), float(np.random.rand())) == draws[:2]
    assert torch.equal(torch.rand(3), draws[2])
    assert loaded.step == 2 and loaded.config_yaml == yaml
    assert loaded.scheduler_state == {"staleness": 2, "in_flight": [3, 4]}
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want_model[k]), k
    got_opt = opt2.state_dict()
    assert got_opt["param_groups"] == want_opt["param_groups"]
    for i, st in want_opt["state"].items():
        for name, t in st.items():
            assert torch.equal(got_opt["state"][i][name], t), (i, name)
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == sched.get_last_lr()
    loader2 = PromptLoader([[i, i + 1] for i in range(10)], batch_size=3, seed=5)
    loader2.load_state_dict(loaded.data_state)
    assert next(loader2) == want_batch
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml",
        "meta.json",
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.pt",
    ]


def test_training_after_resume_equals_an_uninterrupted_run(tmp_path, teacher):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    model, opt, sched = _fresh()
    straight = [_step(model, opt, sched, teacher)["actor/kl_loss"] for _ in range(4)]
    want = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    model, opt, sched = _fresh()
    first = [_step(model, opt, sched, teacher)["actor/kl_loss"] for _ in range(2)]
    _save(tmp_path, 2, model, opt, sched)
    del model, opt, sched
    torch.manual_seed(77), random.seed(77), np.random.seed(77)  # a new process would start elsewhere
    model, opt, sched = _fresh(seed=3)
    loaded = load_checkpoint(resolve_resume("auto", tmp_path), model=model, optimizer=opt, lr_scheduler=sched)
    assert loaded.step == 2
    rest = [_step(model, opt, sched, teacher)["actor/kl_loss"] for _ in range(2)]
    assert first + rest == straight
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_keep_last_prunes_older_checkpoints(tmp_path):
    model, opt, sched = _fresh()
    for step in range(1, 6):
        _save(tmp_path, step, model, opt, sched, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert latest(tmp_path).name == "step_000005"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000005"]
    with pytest.raises(CheckpointError, match="already exists"):
        _save(tmp_path, 5, model, opt, sched)


def test_has_checkpoint_sees_complete_saves_only(tmp_path):
    model = tiny_llama(0)
    assert not has_checkpoint(tmp_path, 3)
    (tmp_path / "checkpoints" / "step_000003").mkdir(parents=True)  # no meta.json: a partial save
    assert not has_checkpoint(tmp_path, 3)
    save_checkpoint(tmp_path, 4, model=model)
    assert has_checkpoint(tmp_path, 4) and not has_checkpoint(tmp_path, 40)


def test_crash_mid_write_keeps_the_previous_checkpoint_newest(tmp_path, monkeypatch):
    model, opt, sched = _fresh()
    first = _save(tmp_path, 1, model, opt, sched, keep_last=1)
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        if str(f).endswith("trainer_state.pt"):  # model and optimizer are already written
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2, model, opt, sched, keep_last=1)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]  # no temp dir left, nothing pruned
    assert latest(tmp_path) == first

    # kill -9 mid-write leaves a temp dir; a step dir without meta.json is not complete either
    (root / ".tmp-step_000003-4242").mkdir()
    (root / ".tmp-step_000003-4242" / "model.safetensors").write_bytes(b"partial")
    (root / "step_000004").mkdir()
    assert latest(tmp_path) == first
    fresh, _, _ = _fresh(seed=5)
    assert load_checkpoint(latest(tmp_path), model=fresh).step == 1
    with torch.no_grad():
        for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
            assert torch.equal(a + 1.0, b)
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_checkpoint(root / "step_000004", model=fresh)
    _save(tmp_path, 5, model, opt, sched, keep_last=1)
    assert not (root / ".tmp-step_000003-4242").exists()  # the next save sweeps dead temp dirs
    assert latest(tmp_path).name == "step_000005"


def test_resolve_resume(tmp_path):
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # fresh run
    model, opt, sched = _fresh()
    p1 = _save(tmp_path, 1, model, opt, sched)
    p2 = _save(tmp_path, 2, model, opt, sched)
    assert resolve_resume("auto", tmp_path) == p2
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(p1), tmp_path / "elsewhere") == p1
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == p2  # a run dir: its newest
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_resume(str(tmp_path / "nothing"), tmp_path)


def test_rng_state_survives_weights_only_load(tmp_path):
    random.random(), np.random.randn()  # numpy's cached gaussian half is part of the state
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.randn(), torch.randn(2))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.randn(), torch.randn(2))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


def test_load_refuses_a_different_model(tmp_path):
    model, opt, sched = _fresh()
    path = _save(tmp_path, 1, model, opt, sched)
    other = tiny_llama(0, tie=True)  # no separate lm_head.weight
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path, model=other)


def test_export_hf_writes_a_loadable_folder_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(67)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0"
    )
    model = tiny_llama(0, tie=True)
    out = tmp_path / "final"
    for _ in range(2):  # the second export replaces the first
        export_hf(model, tok, out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("t5") == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ------------------------------------------------------------------------------ background (async) saves


def _same(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values, equal exactly (tensors bitwise, dtypes too)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _gated_writes(monkeypatch):
    """Hold every background write until the returned event is set (the test changes the live state
    first, so a snapshot that aliased it would show)."""
    import gkd.trainer.checkpoint.writer as writer_module

    gate, real = threading.Event(), writer_module.write_snapshot

    def write_after_gate(*args, **kwargs):
        assert gate.wait(60), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_snapshot", write_after_gate)
    return gate


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_async_save_writes_what_a_sync_save_writes_and_resumes(tmp_path, teacher, monkeypatch, tie):
    """The files of a background save equal a synchronous save's (safetensors bytes, optimizer and trainer
    state), although training changed the model and optimizer before the write began; it resumes."""
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    model = tiny_llama(0, tie=tie)
    opt, sched = build_optimizer(model, CFG.optim, TOTAL)
    for _ in range(2):
        _step(model, opt, sched, teacher)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    rng = [capture_rng_state()]  # both saves record the same RNG state
    sync_path = _save(tmp_path / "sync", 2, model, opt, sched, rng_states=rng)
    gate = _gated_writes(monkeypatch)
    writer = CheckpointWriter(background=True)
    kw = dict(model=model, optimizer=opt, lr_scheduler=sched, config_yaml="loss: {}\n", rng_states=rng)
    kw.update(data_state={"batch": 2, "epoch": 0}, scheduler_state={"next_train": 2, "versions": [1, 2]})
    path = writer.save(tmp_path / "async", 2, **kw)
    assert writer.pending and not path.exists()  # training goes on while the write waits
    _step(model, opt, sched, teacher)  # changes the weights and the optimizer state in place
    gate.set()
    assert writer.wait() == path and path.is_dir() and not writer.pending
    writer.close()

    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in sync_path.iterdir())
    assert (path / "model.safetensors").read_bytes() == (sync_path / "model.safetensors").read_bytes()
    for name in ("optimizer.pt", "trainer_state.pt"):
        a, b = (torch.load(p / name, weights_only=True) for p in (sync_path, path))
        assert _same(a, b), name
    assert (path / "config.yaml").read_text() == (sync_path / "config.yaml").read_text()

    fresh = tiny_llama(5, tie=tie)
    fresh_opt, fresh_sched = build_optimizer(fresh, CFG.optim, TOTAL)
    loaded = load_checkpoint(resolve_resume("auto", tmp_path / "async"), model=fresh, optimizer=fresh_opt,
                             lr_scheduler=fresh_sched)  # fmt: skip
    assert loaded.step == 2 and loaded.data_state == {"batch": 2, "epoch": 0}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_failed_background_write_is_raised_by_the_next_save_and_by_wait(tmp_path):
    model, opt, sched = _fresh()
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the checkpoint folder goes")  # unwritable root
    writer = CheckpointWriter(background=True)
    writer.save(blocked, 1, model=model, optimizer=opt, lr_scheduler=sched)  # returns: the write is queued
    with pytest.raises(CheckpointError, match=r"step_000001 could not be written \(FileExistsError"):
        writer.save(blocked, 2, model=model, optimizer=opt, lr_scheduler=sched)
    assert not writer.pending  # the failed save raised before it queued anything
    writer.save(blocked, 2, model=model, optimizer=opt, lr_scheduler=sched)
    with pytest.raises(CheckpointError, match="step_000002 could not be written"):
        writer.close()  # the end of training
    writer = CheckpointWriter(background=True)
    writer.save(blocked, 3, model=model)
    deadline = time.monotonic() + 60
    while not writer._pending.done():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(CheckpointError, match="step_000003"):
        writer.poll()  # every step: the failure shows once the write has ended
    writer.poll()  # reported once
    assert writer.wait() is None


def test_a_background_write_that_fails_midway_commits_nothing(tmp_path, monkeypatch):
    model, opt, sched = _fresh()
    writer = CheckpointWriter(background=True)
    writer.save(tmp_path, 1, model=model, optimizer=opt, lr_scheduler=sched)
    first = writer.wait()
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        if str(f).endswith("trainer_state.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    writer.save(tmp_path, 2, model=model, optimizer=opt, lr_scheduler=sched, keep_last=1)
    with pytest.raises(CheckpointError, match="disk full"):
        writer.wait()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    assert latest(tmp_path) == first


def test_host_copy_reuses_its_buffers_and_never_aliases():
    copy = HostCopy()
    state = {"w": torch.arange(6.0).reshape(2, 3), "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    first = copy(state)
    assert first["groups"] == state["groups"] and first["groups"] is not state["groups"]
    assert torch.equal(first["w"], state["w"]) and first["w"].data_ptr() != state["w"].data_ptr()
    state["w"].add_(1)
    assert first["w"][0, 0] == 0  # a copy
    second = copy(state)
    assert second["w"] is first["w"] and second["w"][0, 0] == 1  # the same buffer, refilled
    assert copy({"w": torch.zeros(4)})["w"] is not first["w"]  # another shape: a new buffer
    assert copy.nbytes == 4 * 4


def test_format_1_checkpoints_still_load_and_newer_ones_are_refused_in_one_line(tmp_path):
    import json

    model, opt, sched = _fresh()
    path = _save(tmp_path, 1, model, opt, sched)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 2 and meta["layout"] == "files" and meta["lora"] is False
    del meta["layout"], meta["lora"]
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))  # what gkd 1 wrote
    fresh, fresh_opt, fresh_sched = _fresh(seed=4)
    assert load_checkpoint(path, model=fresh, optimizer=fresh_opt, lr_scheduler=fresh_sched).step == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(CheckpointError, match=r"format 3, this gkd reads formats 1, 2: use the gkd") as e:
        load_checkpoint(path, model=fresh)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read .* the checkpoint is damaged"):
        load_checkpoint(path, model=fresh)
