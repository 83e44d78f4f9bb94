"""Sharded (DCP) checkpoints of FSDP2 students on gloo ranks (CPU): saved by 2 ranks in the background while
training goes on, resumed on 4 ranks, saved there and resumed on 2 again, read by DDP and written back by
DDP for FSDP2, and the gkd 1 full-state format: every resumed run takes the next two steps the run that
never stopped took (fp32; tolerance for the other reduction order only). A failure between the shards
and the commit leaves no checkpoint. The meta-device student load equals the normal load; the export of a
sharded checkpoint loads in transformers with the trained weights' logits."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import gkd.trainer.checkpoint.save as ckpt
from gkd.config import Config, LossConfig, ModelConfig, OptimConfig, to_yaml
from gkd.trainer.checkpoint import (
    CheckpointError,
    full_state_dicts,
    gather_rng_states,
    load_checkpoint,
    save_checkpoint,
)
from gkd.trainer.checkpoint.writer import CheckpointWriter
from gkd.trainer.recipe import shard_fsdp2
from gkd.trainer.step import build_optimizer, pack_micro_batches, train_step
from tests.ranks import gloo_group, run_ranks
from tests.test_trainer_step import make_samples, teacher_outputs, tiny_llama
from tests.transport.helpers import free_port

BEFORE, AFTER, TOTAL = 2, 2, 8
RTOL = 1e-5
CFG = SimpleNamespace(
    loss=LossConfig(), optim=OptimConfig(lr=3e-3, warmup_steps=1, clip_grad=1.0, weight_decay=0.01),
    model=ModelConfig(),
)  # fmt: skip


def _batch(step: int, rank: int, world: int, teacher):
    """Step ``step``'s global batch (the same for every world size); this rank's samples r, r + W, ... in
    one micro-batch (FSDP2 ranks must run the same number of forwards)."""
    samples = make_samples(100 + step, 8)
    outputs = teacher_outputs(teacher, samples)
    return pack_micro_batches(samples[rank::world], outputs[rank::world], 4096)


def _steps(model, opt, sched, first: int, n: int, rank: int, world: int, teacher) -> list[float]:
    return [
        train_step(model, opt, sched, _batch(s, rank, world, teacher), CFG)["actor/kl_loss"]
        for s in range(first, first + n)
    ]


def _build(strategy: str):
    model = tiny_llama(0)
    if strategy == "fsdp2":
        model = shard_fsdp2(model, torch.device("cpu"))
    return (model, *build_optimizer(model, CFG.optim, TOTAL))


def _small(sched, step: int, out: str) -> dict:
    """Rank 0's part of a sharded save (every rank must call it: the RNG states are gathered)."""
    rng = gather_rng_states()
    cfg = Config()
    cfg.model.student_path = f"{out}/student"
    return dict(lr_scheduler=sched, rng_states=rng, config_yaml=to_yaml(cfg), data_state={"batch": step},
                scheduler_state={"next_batch": step, "version": step})  # fmt: skip


def _save_sharded(writer, root: str, step: int, model, opt, sched, rank: int, out: str) -> Path:
    small = _small(sched, step, out)
    return writer.save_sharded(root, step, model=model, optimizer=opt, rank0=small if rank == 0 else None)


def _resume(path: str, strategy: str, rank: int, world: int, teacher) -> list[float]:
    model, opt, sched = _build(strategy)
    assert load_checkpoint(path, model=model, optimizer=opt, lr_scheduler=sched, rank=rank).step == BEFORE
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    return _steps(model, opt, sched, BEFORE, AFTER, rank, world, teacher)


def _crash(tmp, final) -> None:
    raise OSError("crash before the commit (simulated)")


def _first_run(rank: int, port: int, out: str) -> None:
    """2 ranks: train, save in the background (training goes on meanwhile), the gkd 1 format too; then a
    save whose commit fails."""
    torch.set_num_threads(1)
    with gloo_group(rank, port, 2, timeout_s=120):
        teacher = tiny_llama(1)
        model, opt, sched = _build("fsdp2")
        _steps(model, opt, sched, 0, BEFORE, rank, 2, teacher)
        writer = CheckpointWriter(background=True)
        _save_sharded(writer, f"{out}/a", BEFORE, model, opt, sched, rank, out)
        weights, optim = full_state_dicts(model, opt)
        if rank == 0:  # gkd 1: full state dicts in files, no layout in meta.json
            path = save_checkpoint(f"{out}/old", BEFORE, model=model, lr_scheduler=sched, model_state=weights,
                                   optimizer_state=optim)  # fmt: skip
            meta = json.loads((path / "meta.json").read_text())
            meta.update(format_version=1)
            del meta["layout"], meta["lora"]
            (path / "meta.json").write_text(json.dumps(meta))
        want = _steps(model, opt, sched, BEFORE, AFTER, rank, 2, teacher)  # changes what is being written
        writer.wait()
        if rank == 0:
            ckpt._commit = lambda tmp, final: (_ for _ in ()).throw(
                OSError("crash before the commit (simulated)")
            )
        _save_sharded(writer, f"{out}/a", BEFORE + AFTER, model, opt, sched, rank, out)
        if rank == 0:
            with pytest.raises(CheckpointError, match="simulated"):
                writer.wait()
            listing = sorted(p.name for p in Path(f"{out}/a/checkpoints").iterdir())
            torch.save({"want": want, "listing": listing, "weights": weights}, f"{out}/first.pt")
        writer.close()


def _four_ranks(rank: int, port: int, out: str) -> None:
    """4 ranks resume the 2-rank checkpoint, save it again (synchronously) and train on."""
    torch.set_num_threads(1)
    with gloo_group(rank, port, 4, timeout_s=120):
        teacher = tiny_llama(1)
        model, opt, sched = _build("fsdp2")
        path = f"{out}/a/checkpoints/step_{BEFORE:06d}"
        load_checkpoint(path, model=model, optimizer=opt, lr_scheduler=sched, rank=rank)
        _save_sharded(CheckpointWriter(background=False), f"{out}/b", BEFORE, model, opt, sched, rank, out)
        losses = _steps(model, opt, sched, BEFORE, AFTER, rank, 4, teacher)
        if rank == 0:
            torch.save({"losses": losses}, f"{out}/four.pt")


def _back_at_two(rank: int, port: int, out: str) -> None:
    """2 ranks: FSDP2 from the 4-rank checkpoint; DDP from the FSDP2 one (and its files checkpoint back
    into FSDP2); FSDP2 from the gkd 1 format."""
    torch.set_num_threads(1)
    with gloo_group(rank, port, 2, timeout_s=120):
        teacher, res = tiny_llama(1), {}
        res["from_four"] = _resume(f"{out}/b/checkpoints/step_{BEFORE:06d}", "fsdp2", rank, 2, teacher)
        res["ddp_from_fsdp2"] = _resume(f"{out}/a/checkpoints/step_{BEFORE:06d}", "ddp", rank, 2, teacher)
        model, opt, sched = _build("ddp")
        load_checkpoint(
            f"{out}/a/checkpoints/step_{BEFORE:06d}", model=model, optimizer=opt, lr_scheduler=sched
        )
        if rank == 0:
            save_checkpoint(f"{out}/ddp", BEFORE, model=model, optimizer=opt, lr_scheduler=sched)
        dist.barrier()
        res["fsdp2_from_ddp"] = _resume(f"{out}/ddp/checkpoints/step_{BEFORE:06d}", "fsdp2", rank, 2, teacher)
        res["fsdp2_from_v1"] = _resume(f"{out}/old/checkpoints/step_{BEFORE:06d}", "fsdp2", rank, 2, teacher)
        if rank == 0:
            torch.save(res, f"{out}/two.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    tiny_llama(0).save_pretrained(out / "student")
    for worker, world in ((_first_run, 2), (_four_ranks, 4), (_back_at_two, 2)):
        run_ranks(worker, free_port(), str(out), nprocs=world, timeout_s=300)
    load = lambda name: torch.load(out / name, weights_only=True)  # noqa: E731
    return SimpleNamespace(out=out, first=load("first.pt"), four=load("four.pt"), two=load("two.pt"))


def test_sharded_checkpoint_layout_and_failed_commit(runs):
    path = runs.out / "a" / "checkpoints" / f"step_{BEFORE:06d}"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["layout"] == "dcp" and meta["format_version"] == 2 and meta["lora"] is False
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "dcp", "meta.json", "trainer_state.pt"]
    shards = sorted(p.name for p in (path / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank, no full copy
    assert runs.first["listing"] == [path.name]  # the failed commit left neither a step nor a .tmp folder


@pytest.mark.parametrize("run", ["from_four", "ddp_from_fsdp2", "fsdp2_from_ddp", "fsdp2_from_v1"])
def test_resume_takes_the_uninterrupted_runs_next_steps(runs, run):
    want = torch.tensor(runs.first["want"], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(runs.two[run], dtype=torch.float64), want, rtol=RTOL, atol=0)


def test_four_ranks_resume_two_ranks_checkpoint(runs):
    want = torch.tensor(runs.first["want"], dtype=torch.float64)
    torch.testing.assert_close(
        torch.tensor(runs.four["losses"], dtype=torch.float64), want, rtol=RTOL, atol=0
    )


def test_export_of_a_sharded_checkpoint_gives_the_trained_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from gkd.trainer.export import export_checkpoint

    path = runs.out / "a" / "checkpoints" / f"step_{BEFORE:06d}"
    trained = tiny_llama(5)
    trained.load_state_dict(runs.first["weights"])
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    want = trained(input_ids=ids).logits
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(path, tmp_path / "hf"))
    assert exported.dtype == torch.float32  # trainer.export_dtype=auto: the student folder's own dtype
    torch.testing.assert_close(exported(input_ids=ids).logits, want)
    half = AutoModelForCausalLM.from_pretrained(export_checkpoint(path, tmp_path / "bf16", dtype="bfloat16"))
    assert half.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(half(input_ids=ids).logits.float(), want, rtol=0.1, atol=0.1)


# ------------------------------------------------------------------------------ meta-device student load


def _save_student(folder: Path, tie: bool) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tiny_llama(3, tie=tie).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(67)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0"
    )
    tok.save_pretrained(folder)


def _meta_load(rank: int, port: int, out: str) -> None:
    """The meta-device load (rank 0 reads, a few tensors per broadcast group) against the normal load."""
    from gkd.trainer.setup import _load_student, materialize_student

    torch.set_num_threads(1)
    cpu, ids, res = torch.device("cpu"), torch.tensor([[1, 5, 9, 2, 7, 3]]), {}
    with gloo_group(rank, port, 2, timeout_s=120):
        for name in ("tied", "untied"):
            cfg = Config()
            cfg.model.student_path, cfg.trainer.strategy = f"{out}/{name}", "fsdp2"
            meta = _load_student(cfg, cpu, sharded=True)[0]
            assert all(p.is_meta for p in meta.parameters())
            meta = shard_fsdp2(meta, cpu)
            materialize_student(meta, cfg, cpu, read_bytes=4096)  # several groups
            normal = shard_fsdp2(_load_student(cfg, cpu)[0], cpu)
            got = {"tied": meta.lm_head.weight is meta.model.embed_tokens.weight}
            for label, model in (("meta", meta), ("normal", normal)):
                model.eval()
                got[label] = {
                    "logits": model(input_ids=ids).logits.detach(),
                    "state": full_state_dicts(model)[0],
                    "inv_freq": model.model.rotary_emb.inv_freq.clone(),
                }
            res[name] = got
    if rank == 0:
        torch.save(res, f"{out}/meta.pt")


def test_meta_device_load_equals_the_normal_load(tmp_path):
    for name in ("tied", "untied"):
        _save_student(tmp_path / name, tie=name == "tied")
    run_ranks(_meta_load, free_port(), str(tmp_path), nprocs=2, timeout_s=300)
    res = torch.load(tmp_path / "meta.pt", weights_only=True)
    for name in ("tied", "untied"):
        got, want = res[name]["meta"], res[name]["normal"]
        assert res[name]["tied"] == (name == "tied")
        assert set(got["state"]) == set(want["state"])
        for key, value in want["state"].items():
            assert torch.equal(got["state"][key], value), (name, key)
        assert torch.equal(got["inv_freq"], want["inv_freq"]) and bool(got["inv_freq"].ne(0).all())
        torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=0)


def test_meta_device_load_of_a_folder_with_other_names_fails_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    from gkd.trainer.setup import StartupError, _load_student, materialize_student

    _save_student(tmp_path / "odd", tie=False)
    weights = load_file(str(tmp_path / "odd" / "model.safetensors"))
    weights["transformer.norm.weight"] = weights.pop("model.norm.weight")
    save_file(weights, str(tmp_path / "odd" / "model.safetensors"), metadata={"format": "pt"})
    cfg = Config()
    cfg.model.student_path = str(tmp_path / "odd")
    with gloo_group(0, free_port(), world_size=1):
        model = shard_fsdp2(_load_student(cfg, torch.device("cpu"), sharded=True)[0], torch.device("cpu"))
        with pytest.raises(StartupError, match=r"odd: its safetensors lack \['model.norm.weight'\]") as e:
            materialize_student(model, cfg, torch.device("cpu"))
    assert "\n" not in str(e.value)
