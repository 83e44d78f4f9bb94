"""LoRA students (``model.lora``, ``gkd.trainer.lora``) on the tiny Llama: only the adapter trains and sits
in the optimizer, the base stays bitwise unchanged, the rollout engine receives peft's merge through the
weight channel (bit for bit in fp32, the bf16 cast of it in bf16) under the base model's names, checkpoints
hold the adapter + optimizer and resume exactly, the export writes a merged Hugging Face folder and peft's
adapter folder; FSDP2 and DDP agree on 2 gloo ranks (merged rows per shard, adapter-only checkpoints); and one
``gkd train`` run with configs/cpu_tiny_lora.yaml (FSDP2, real services) lowers the KL."""

from __future__ import annotations

import copy
import json
import subprocess
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("peft")

from gkd.config import ConfigError, LoRAConfig, LossConfig, ModelConfig, OptimConfig, load_config  # noqa: E402
from gkd.trainer.checkpoint import (  # noqa: E402
    CheckpointError,
    export_hf,
    full_state_dicts,
    load_checkpoint,
    save_checkpoint,
)
from gkd.trainer.lora import (  # noqa: E402
    MergedWeights,
    apply_lora,
    base_name,
    merged_state_dict,
    require_peft,
    weight_source,
)
from gkd.trainer.step import build_optimizer, pack_micro_batches, train_step  # noqa: E402
from tests.ranks import gloo_group  # noqa: E402
from tests.test_trainer_step import make_samples, teacher_outputs, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LORA = LoRAConfig(enabled=True, r=4, alpha=8.0)  # every projection of the tiny Llama
STEPS = 6


@pytest.fixture(autouse=True)
def _one_thread():
    from tests.tiny_llama import one_intra_op_thread

    yield from one_intra_op_thread()


def _cfg(lr: float = 1e-2) -> SimpleNamespace:
    return SimpleNamespace(loss=LossConfig(), optim=OptimConfig(lr=lr), model=ModelConfig(lora=LORA))


def _batch(seed: int = 3):
    samples = make_samples(seed, 8)
    return pack_micro_batches(samples, teacher_outputs(tiny_llama(1), samples), 48)


def _merge(model) -> dict[str, torch.Tensor]:
    """peft's own merge of a copy: the reference the engines must hold."""
    return copy.deepcopy(model).merge_and_unload().state_dict()


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_only_the_adapter_trains_and_the_engine_receives_the_merge():
    from gkd.rollout.hf_engine import HFRolloutEngine
    from gkd.weights.transfer import WeightReceiver, WeightSender
    from tests.test_weights import _free_port, _in_thread, _pair

    student = apply_lora(tiny_llama(0), LORA)
    base = {n: t.clone() for n, t in MergedWeights(student).named_weights()}
    assert set(base) == set(dict(tiny_llama(0).named_parameters()))  # the engine's names, no peft names
    cfg = _cfg()
    optimizer, sched = build_optimizer(student, cfg.optim, STEPS)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    adapter = {id(p) for n, p in student.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert held == adapter and len(adapter) == 2 * 7 * 2  # A and B of 7 projections x 2 layers
    micro = _batch()
    kl = [train_step(student, optimizer, sched, micro, cfg)["actor/kl_loss"] for _ in range(STEPS)]
    assert kl[-1] < 0.9 * kl[0], kl
    after = dict(MergedWeights(student).named_weights())
    assert all(torch.equal(after[n], base[n]) for n in base)  # the base did not move
    merged = _merge(student)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # the adapter changed the merged weight

    # the weight channel: fp32 engine = the merge bit for bit; bf16 engine = its bf16 cast
    for dtype in (torch.float32, torch.bfloat16):
        engine = HFRolloutEngine(tiny_llama(5).to(dtype))
        tx, rx = _pair(_free_port(), timedelta(seconds=60))
        receiver = WeightReceiver(rx, engine.model)

        def send(tx=tx, dtype=dtype):
            sender = WeightSender(tx, weight_source(student), dtype=dtype, bucket_bytes=4096)
            sender.handshake()  # base names, shapes and dtypes: the engine's own
            sender.sync(1)
            sender.close()

        done = _in_thread(send)
        receiver.handshake()
        assert receiver.receive() == 1
        receiver.apply(engine)
        done()
        for name, p in engine.model.named_parameters():
            assert torch.equal(p, merged[name].to(dtype)), (dtype, name)


def test_checkpoint_holds_the_adapter_and_resumes_and_the_export_has_both_folders(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg()
    student = apply_lora(tiny_llama(0), LORA)
    optimizer, sched = build_optimizer(student, cfg.optim, STEPS)
    micro = _batch()
    for _ in range(2):
        train_step(student, optimizer, sched, micro, cfg)
    path = save_checkpoint(tmp_path / "lora", 2, model=student, optimizer=optimizer, lr_scheduler=sched)
    files = sorted(p.name for p in path.iterdir())
    assert files == ["adapter.safetensors", "config.yaml", "meta.json", "optimizer.pt", "trainer_state.pt"]
    from safetensors.torch import load_file

    saved = load_file(str(path / "adapter.safetensors"))
    assert set(saved) == set(_adapter(student)) and all(".lora_" in k for k in saved)
    # the size next to a full student's checkpoint (same model, its own AdamW state after one step)
    full = tiny_llama(0)
    full_opt, full_sched = build_optimizer(full, cfg.optim, STEPS)
    train_step(full, full_opt, full_sched, micro, cfg)
    full_path = save_checkpoint(tmp_path / "full", 1, model=full, optimizer=full_opt, lr_scheduler=full_sched)

    def size(p: Path, names) -> int:
        return sum((p / n).stat().st_size for n in names)

    lora_bytes = size(path, ["adapter.safetensors", "optimizer.pt"])
    full_bytes = size(full_path, ["model.safetensors", "optimizer.pt"])
    with capsys.disabled():
        print(f"\ntiny Llama checkpoint (weights + optimizer): full {full_bytes} B, LoRA r=4 {lora_bytes} B")
    assert lora_bytes < full_bytes / 2

    want = train_step(student, optimizer, sched, micro, cfg)["actor/kl_loss"]  # the run that did not stop
    fresh = apply_lora(tiny_llama(0), LORA)  # the base from model.student_path again
    fresh_opt, fresh_sched = build_optimizer(fresh, cfg.optim, STEPS)
    assert load_checkpoint(path, model=fresh, optimizer=fresh_opt, lr_scheduler=fresh_sched).step == 2
    assert train_step(fresh, fresh_opt, fresh_sched, micro, cfg)["actor/kl_loss"] == want
    with pytest.raises(CheckpointError, match=r"model.lora.enabled=true"):
        load_checkpoint(path, model=tiny_llama(0))
    with pytest.raises(CheckpointError, match=r"model.lora.enabled=false"):
        load_checkpoint(full_path, model=apply_lora(tiny_llama(0), LORA))

    export_hf(student, None, tmp_path / "final")
    merged = _merge(student)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert set(loaded) == set(merged)
    assert all(torch.equal(loaded[k], merged[k]) for k in merged)
    assert (tmp_path / "final_adapter" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "final_adapter")
    assert all(torch.equal(dict(reloaded.named_parameters())[k], v) for k, v in _adapter(student).items())


def test_lora_config_errors_are_one_line(monkeypatch):
    base = ["model.student_path=x", "data.train_files=[x.parquet]", "model.lora.enabled=true"]
    for override, match in [
        ("model.lora.r=0", r"model.lora.r=0: must be >= 1"),
        ("model.lora.dropout=1.0", r"model.lora.dropout=1.0: must lie in \[0, 1\)"),
        ("model.lora.target_modules=[]", r"model.lora.target_modules=\[\]: name the Linear layers"),
        ("model.lora.rank=4", r"valid keys in 'model.lora': enabled, r, alpha, dropout, target_modules"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            load_config([], [*base, override])
        assert "\n" not in str(e.value)
    for targets, match in [
        (["nope_proj"], r"model.lora.target_modules=\['nope_proj'\]: Target modules .*not found"),
        (["embed_tokens"], r"embed_tokens is a Embedding; only Linear layers"),
    ]:
        with pytest.raises(ConfigError, match=match):
            apply_lora(tiny_llama(0), LoRAConfig(enabled=True, target_modules=targets))
    with pytest.raises(ConfigError, match=r"lm_head is the output embedding, which the fused loss reads"):
        apply_lora(tiny_llama(0), LoRAConfig(enabled=True, target_modules=["lm_head"]))
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.up_proj.weight is tied to model.layers.1"):
        tied = tiny_llama(0)
        tied.model.layers[0].mlp.up_proj.weight = tied.model.layers[1].mlp.up_proj.weight
        apply_lora(tied, LoRAConfig(enabled=True, target_modules=["up_proj"]))
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'gkd\[lora\]' \(peft==0.21.2\)"):
        require_peft()


# ------------------------------------------------------------------------------ FSDP2 and DDP, 2 ranks


def _ranks_worker(rank: int, port: int, out: str) -> None:
    from gkd.trainer.recipe import shard_fsdp2
    from gkd.weights.transfer import _gather_to_root

    torch.set_num_threads(1)
    with gloo_group(rank, port, timeout_s=120):
        cfg = _cfg(lr=3e-3)
        samples = make_samples(3, 8)
        teacher = teacher_outputs(tiny_llama(1), samples)
        micro = pack_micro_batches(samples[rank::2], teacher[rank::2], 24)
        res: dict = {}

        def build(strategy: str):
            model = apply_lora(tiny_llama(0), LORA)
            if strategy == "fsdp2":
                return shard_fsdp2(model, torch.device("cpu"))
            return torch.nn.parallel.DistributedDataParallel(model)

        for strategy in ("ddp", "fsdp2"):
            model = build(strategy)
            opt, sched = build_optimizer(model, cfg.optim, STEPS)
            res[strategy] = [train_step(model, opt, sched, micro, cfg)["actor/kl_loss"] for _ in range(3)]
            state = full_state_dicts(model)[0] if strategy == "fsdp2" else model.module.state_dict()
            if rank == 0:
                res[f"{strategy}_state"] = {k: v.detach().clone() for k, v in state.items()}
        # fsdp2: what the sender packs (merged rows per shard, gathered to rank 0) against the full merge
        source = weight_source(model)
        sent = {n: _gather_to_root(source.materialize(n, t)) for n, t in source.named_weights()}
        adapter_state, optim_state = full_state_dicts(model, opt, frozen=False)
        if rank == 0:
            res["sent"] = sent
            res["merged"] = merged_state_dict(model, res["fsdp2_state"])
            res["adapter_keys"] = sorted(adapter_state)
            save_checkpoint(f"{out}/run", 3, model=model, lr_scheduler=sched, model_state=adapter_state,
                            optimizer_state=optim_state)  # fmt: skip
            export_hf(model, None, f"{out}/final", state=res["fsdp2_state"])
        dist.barrier()
        res["next"] = train_step(model, opt, sched, micro, cfg)["actor/kl_loss"]
        fresh = build("fsdp2")
        fresh_opt, fresh_sched = build_optimizer(fresh, cfg.optim, STEPS)
        load_checkpoint(f"{out}/run/checkpoints/step_000003", model=fresh, optimizer=fresh_opt,
                        lr_scheduler=fresh_sched, rank=rank)  # fmt: skip
        res["resumed"] = train_step(fresh, fresh_opt, fresh_sched, micro, cfg)["actor/kl_loss"]
        if rank == 0:
            torch.save(res, f"{out}/rank0.pt")


def test_fsdp2_and_ddp_lora_agree_merge_per_shard_and_checkpoint_the_adapter():
    from transformers import AutoModelForCausalLM

    from tests.ranks import rank0_result

    with rank0_result(_ranks_worker, timeout_s=240) as (out, res):
        files = sorted(p.name for p in Path(f"{out}/run/checkpoints/step_000003").iterdir())
        exported = AutoModelForCausalLM.from_pretrained(f"{out}/final").state_dict()
        adapter_folder = sorted(p.name for p in Path(f"{out}/final_adapter").iterdir())
    torch.testing.assert_close(torch.tensor(res["fsdp2"]), torch.tensor(res["ddp"]), rtol=1e-5, atol=0)
    assert res["ddp"][-1] < res["ddp"][0]
    base = tiny_llama(0).state_dict()
    for strategy in ("ddp", "fsdp2"):  # the frozen base is bitwise the loaded one under both
        frozen = {base_name(k): v for k, v in res[f"{strategy}_state"].items() if base_name(k) is not None}
        assert set(frozen) == set(base)
        assert all(torch.equal(frozen[k], base[k]) for k in base), strategy
    # each rank merged its own rows of W with its rows of B (A all-gathered): the same as the full merge
    assert set(res["sent"]) == set(base)
    for name, want in res["merged"].items():
        torch.testing.assert_close(res["sent"][name], want, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(exported[name], want), name
    assert all(".lora_" in k for k in res["adapter_keys"])
    assert files == ["adapter.safetensors", "config.yaml", "meta.json", "optimizer.pt", "trainer_state.pt"]
    assert "adapter_config.json" in adapter_folder
    assert res["resumed"] == res["next"]


# ------------------------------------------------------------------------------------- gkd train


def _reachable_pair(tiny: dict[str, str], root: Path) -> tuple[str, str]:
    """(student, teacher) folders: the tiny student with a 4x lm_head, and a teacher that differs from it by
    rank-2 changes of every o_proj and down_proj, which LoRA can learn exactly (the tiny teacher's edge is
    a sharper lm_head, which a frozen head and final norm cannot follow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    g = torch.Generator().manual_seed(0)
    paths = []
    for name in ("student", "teacher"):
        model = AutoModelForCausalLM.from_pretrained(tiny["student"])
        with torch.no_grad():
            model.lm_head.weight.mul_(4.0)
            for layer in model.model.layers if name == "teacher" else ():
                for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    out_f, in_f = lin.weight.shape
                    lin.weight += (
                        2.0 * torch.randn(out_f, 2, generator=g) @ torch.randn(2, in_f, generator=g) / in_f
                    )
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


@pytest.mark.slow
def test_gkd_train_lora_fsdp2_run(tmp_path):
    """configs/cpu_tiny_lora.yaml over configs/cpu_tiny.yaml: 2 FSDP2 ranks, real services and weight
    channel; the KL falls, checkpoints hold the adapter only, both final folders load."""
    from transformers import AutoModelForCausalLM

    from gkd.demo.tiny import build
    from tests.test_train_e2e import ENV, _argv

    tiny = build(tmp_path / "tiny", num_prompts=24)
    student, teacher = _reachable_pair(tiny, tmp_path)
    out = tmp_path / "run"
    steps = 10
    argv = _argv(tiny, out, f"trainer.total_steps={steps}", "trainer.save_freq=5", "trainer.scheduler=sync",
                 f"model.student_path={student}", f"teacher.model_path={teacher}")  # fmt: skip
    argv[6:6] = ["--config", "configs/cpu_tiny_lora.yaml"]  # after configs/cpu_tiny.yaml, before overrides
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [r["actor/kl_loss"] for r in records]
    assert [r["step"] for r in records] == list(range(steps))
    assert sum(kl[-3:]) < 0.8 * sum(kl[:3]), kl
    from torch.distributed.checkpoint import FileSystemReader

    for step in ("step_000005", "step_000010"):  # FSDP2: DCP shards of the adapter and its optimizer state
        assert json.loads((out / "checkpoints" / step / "meta.json").read_text())["lora"] is True
        saved = FileSystemReader(str(out / "checkpoints" / step / "dcp")).read_metadata().state_dict_metadata
        weights = [k for k in saved if k.startswith("model.")]
        assert weights and all(".lora_" in k for k in weights), weights
    assert (out / "final_adapter" / "adapter_config.json").is_file()
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    start = AutoModelForCausalLM.from_pretrained(student).state_dict()
    assert set(final) == set(start)
    assert not torch.equal(final["model.layers.0.self_attn.o_proj.weight"],
                           start["model.layers.0.self_attn.o_proj.weight"])  # fmt: skip
    assert torch.equal(final["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
