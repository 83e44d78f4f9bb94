"""``validate(cfg)``: the config's choices, ranges and cross-key rules, one named check per area; every
failure is a ``ConfigError`` naming the key. ``gkd.config.load_config`` runs it on every load."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from gkd.config.schema import Config, ConfigError, LoRAConfig, _sections, parse_scheduler


def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {need}")


def validate(cfg: Config) -> None:
    """Choices, ranges and cross-key rules; each failure names the key."""
    _check_choices(cfg)
    _check_services(cfg)
    _check_engines_and_rollout(cfg)
    _check_trainer(cfg)
    _check_loss(cfg)
    _check_optim(cfg)
    _check_data(cfg)
    _check_features(cfg)
    _check_lora(cfg.model.lora)
    _check_service_limits(cfg)


def _check_choices(cfg: Config) -> None:
    """Every field declared with ``_choice`` holds one of its choices."""
    for name in _sections():
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            choices = f.metadata.get("choices")
            if choices is not None:
                v = getattr(section, f.name)
                _check(v in choices, f"{name}.{f.name}", v, f"expected one of {', '.join(choices)}")


def _check_services(cfg: Config) -> None:
    """The student, the ports, the teacher service."""
    m, t, r = cfg.model, cfg.teacher, cfg.rollout
    _check(
        bool(m.student_path), "model.student_path", m.student_path, "required (a transformers model folder)"
    )
    for key, port in [
        ("teacher.server_port", t.server_port),
        ("teacher.backend_port", t.backend_port),
        ("rollout.server_port", r.server_port),
        ("rollout.backend_port", r.backend_port),
        ("rollout.weight_port", r.weight_port),
    ]:
        _check(0 < port < 65536, key, port, "a TCP port in 1..65535")
    _check(t.top_k >= 1, "teacher.top_k", t.top_k, "must be >= 1")
    _check(t.temperature > 0, "teacher.temperature", t.temperature, "must be > 0")
    _check(t.workers >= 1, "teacher.workers", t.workers, "must be >= 1")
    _check(
        not t.launch or bool(t.model_path), "teacher.model_path", t.model_path, "required when teacher.launch"
    )
    if t.backend == "openai":
        _check_openai_teacher(cfg)


def _check_openai_teacher(cfg: Config) -> None:
    """``teacher.backend=openai``: a server already running at ``teacher.url``, scoring at temperature 1."""
    t, lo = cfg.teacher, cfg.loss
    url = t.url or ""
    _check(
        url.startswith(("http://", "https://")),
        "teacher.url",
        t.url,
        "teacher.backend=openai needs http://HOST:PORT",
    )
    _check(not t.launch, "teacher.launch", t.launch, "teacher.backend=openai uses a server already running")
    _check(
        t.temperature == 1, "teacher.temperature", t.temperature, "teacher.backend=openai scores at 1 only"
    )
    _check(
        lo.lmbda == 1 and (lo.lmbda_schedule != "linear" or lo.lmbda_start == 1) or not lo.seq_kd,
        "loss.seq_kd",
        lo.seq_kd,
        "the teacher's own answers need a gkd teacher service (teacher.backend hf or vllm); "
        "teacher.backend=openai only scores",
    )


def _check_engines_and_rollout(cfg: Config) -> None:
    """The engines' knobs (before a vLLM worker gets them), the rollout service and its sampling."""
    t, r, d = cfg.teacher, cfg.rollout, cfg.data
    for name, sec in (("teacher", t), ("rollout", r)):  # the engines' knobs, before a vLLM worker gets them
        _check(bool(sec.server_ip), f"{name}.server_ip", sec.server_ip, "required (the service's host)")
        util = sec.gpu_memory_utilization
        _check(0 < util <= 1, f"{name}.gpu_memory_utilization", util, "must lie in (0, 1] (vLLM's share)")
        for key in ("max_model_len", "max_num_batched_tokens"):
            v = getattr(sec, key)
            _check(v is None or v >= 1, f"{name}.{key}", v, "must be >= 1 tokens (or null for the default)")
    _check(r.workers >= 1, "rollout.workers", r.workers, "must be >= 1")
    _check(r.nnodes >= 1, "rollout.nnodes", r.nnodes, "must be >= 1")
    _check(r.n_gpus_per_node >= 0, "rollout.n_gpus_per_node", r.n_gpus_per_node, "must be >= 0 (0 = CPU)")
    _check(
        r.backend != "vllm" or r.n_gpus_per_node > 0,
        "rollout.n_gpus_per_node",
        r.n_gpus_per_node,
        "rollout.backend=vllm needs GPUs",
    )
    gpus = cfg.trainer.n_gpus_per_node > 0 and r.n_gpus_per_node > 0
    _check(
        r.weight_backend != "nccl" or gpus,
        "rollout.weight_backend",
        r.weight_backend,
        "nccl needs the trainer and the rollout on GPUs (trainer.n_gpus_per_node and rollout.n_gpus_per_node "
        "> 0); use gloo or auto",
    )
    for key in (
        "weight_timeout_s",
        "weight_ready_timeout_s",
        "weight_idle_timeout_s",
        "weight_heartbeat_timeout_s",
        "weight_reform_timeout_s",
    ):
        _check(getattr(r, key) > 0, f"rollout.{key}", getattr(r, key), "must be > 0 (seconds)")
    for name, section in (("teacher", t), ("rollout", r)):
        n = section.max_worker_restarts
        _check(n >= 0, f"{name}.max_worker_restarts", n, "must be >= 0")
        for key in ("request_timeout_s", "liveness_timeout_s", "restart_window_s", "worker_restart_grace_s"):
            v = getattr(section, key)
            _check(0 < v < float("inf"), f"{name}.{key}", v, "must be a positive number of seconds")
    _check(r.temperature >= 0, "rollout.temperature", r.temperature, "must be >= 0 (0 = greedy)")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must lie in (0, 1]")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
    _check(
        r.max_new_tokens <= d.max_response_length,
        "rollout.max_new_tokens",
        r.max_new_tokens,
        f"must be <= data.max_response_length ({d.max_response_length})",
    )


def _check_trainer(cfg: Config) -> None:
    """Staleness, processes, steps, checkpoints and resume."""
    tr = cfg.trainer
    k = parse_scheduler(tr.scheduler)
    _check(k >= 0, "trainer.scheduler", tr.scheduler, "staleness must be >= 0")
    _check(tr.n_gpus_per_node >= 0, "trainer.n_gpus_per_node", tr.n_gpus_per_node, "must be >= 0 (0 = CPU)")
    _check(tr.nproc_per_node >= 1, "trainer.nproc_per_node", tr.nproc_per_node, "must be >= 1")
    _check(tr.nnodes >= 1, "trainer.nnodes", tr.nnodes, "must be >= 1")
    _check(
        tr.total_steps is None or tr.total_steps >= 1,
        "trainer.total_steps",
        tr.total_steps,
        "must be >= 1 (or null: use trainer.total_epochs)",
    )
    _check(tr.total_epochs >= 1, "trainer.total_epochs", tr.total_epochs, "must be >= 1")
    _check(tr.save_freq >= 0, "trainer.save_freq", tr.save_freq, "must be >= 0 (0 = final checkpoint only)")
    _check(tr.keep_last >= 1, "trainer.keep_last", tr.keep_last, "must be >= 1")
    _check(tr.max_skipped_steps >= 0, "trainer.max_skipped_steps", tr.max_skipped_steps, "must be >= 0")
    for key in ("stop_grace_s", "collective_timeout_s"):
        v = getattr(tr, key)
        _check(0 < v < float("inf"), f"trainer.{key}", v, "must be a positive number of seconds")
    _check(bool(tr.output_dir), "trainer.output_dir", tr.output_dir, "required")
    _check_fsdp(tr)
    _check(
        tr.resume in ("auto", "never") or os.path.exists(tr.resume),
        "trainer.resume",
        tr.resume,
        "expected auto, never or the path of an existing checkpoint",
    )


def _check_fsdp(tr) -> None:
    """``trainer.fsdp.shard_size``: fsdp2 only, and it divides the trainer world size."""
    size, world = tr.fsdp.shard_size, tr.procs_per_node * tr.nnodes
    if size is None:
        return
    key = "trainer.fsdp.shard_size"
    _check(tr.strategy == "fsdp2", key, size, "needs trainer.strategy=fsdp2 (or null)")
    _check(size >= 1, key, size, "must be >= 1 (or null: shard over all trainer ranks)")
    _check(
        world % size == 0,
        key,
        size,
        f"must divide the {world} trainer ranks (trainer.nnodes x processes per node); use a divisor or null",
    )


def _check_service_limits(cfg: Config) -> None:
    """The limits that cross services, where the config alone decides them (``gkd.config.limits``: a
    service ``gkd train`` launches serves what the config says); the rest is checked at start-up."""
    from gkd.config.limits import static_limits

    problems = static_limits(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def _check_loss(cfg: Config) -> None:
    """The loss and the support it is computed on."""
    lo, r = cfg.loss, cfg.rollout
    _check(0 <= lo.beta <= 1, "loss.beta", lo.beta, "must lie in [0, 1]")
    _check(lo.temperature > 0, "loss.temperature", lo.temperature, "must be > 0")
    _check(
        lo.support != "union" or r.return_topk >= 1,
        "loss.support",
        lo.support,
        "union needs the student's top ids: set rollout.return_topk >= 1 (e.g. 16)",
    )
    _check(
        lo.support != "union" or lo.name != "sampled_reverse_kl",
        "loss.support",
        lo.support,
        "union applies to forward_kl, reverse_kl and jsd; sampled_reverse_kl uses the sampled token only",
    )
    _check(
        lo.is_correction == "none" or lo.name != "sampled_reverse_kl",
        "loss.is_correction",
        lo.is_correction,
        "sampled_reverse_kl has its own importance ratio; use none",
    )
    _check(lo.is_clip > 0 and math.isfinite(lo.is_clip), "loss.is_clip", lo.is_clip, "must be finite and > 0")
    _check_mixture(cfg)
    _check(0 <= r.return_topk <= 128, "rollout.return_topk", r.return_topk, "must lie in [0, 128] (0 = off)")
    _check(
        lo.chunk_bytes is None or lo.chunk_bytes > 0,
        "loss.chunk_bytes",
        lo.chunk_bytes,
        "must be > 0 bytes (or null for the default)",
    )


def _check_mixture(cfg: Config) -> None:
    """loss.lmbda and its schedule, loss.seq_kd, teacher.generate.*."""
    lo, g = cfg.loss, cfg.teacher.generate
    _check(0 <= lo.lmbda <= 1, "loss.lmbda", lo.lmbda, "must lie in [0, 1] (the share of student batches)")
    _check(0 <= lo.lmbda_start <= 1, "loss.lmbda_start", lo.lmbda_start, "must lie in [0, 1]")
    linear = lo.lmbda_schedule == "linear"
    _check(
        not linear or lo.lmbda_steps >= 1,
        "loss.lmbda_steps",
        lo.lmbda_steps,
        "loss.lmbda_schedule=linear needs lmbda_steps >= 1 (batches from lmbda_start to lmbda)",
    )
    mixed = min(lo.lmbda, lo.lmbda_start if linear else 1.0) < 1
    _check(
        not mixed or lo.seq_kd or bool(cfg.data.response_key),
        "loss.seq_kd",
        lo.seq_kd,
        "false with loss.lmbda < 1 trains on the dataset's answers: set data.response_key to their column",
    )
    _check(
        not mixed or lo.name != "sampled_reverse_kl",
        "loss.lmbda",
        lo.lmbda,
        "sampled_reverse_kl needs the student's own samples: use lmbda 1, or forward_kl/reverse_kl/jsd",
    )
    _check(
        math.isfinite(g.temperature) and g.temperature >= 0,
        "teacher.generate.temperature",
        g.temperature,
        "must be a finite number >= 0 (0 = greedy)",
    )
    _check(0 < g.top_p <= 1, "teacher.generate.top_p", g.top_p, "must lie in (0, 1]")
    _check(
        g.max_new_tokens is None or g.max_new_tokens >= 1,
        "teacher.generate.max_new_tokens",
        g.max_new_tokens,
        "must be >= 1 (or null: rollout.max_new_tokens)",
    )


def _check_optim(cfg: Config) -> None:
    """AdamW and its schedule."""
    o = cfg.optim
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, "must be >= 0 (0 = no clipping)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        o.betas,
        "expected two values in [0, 1)",
    )


def _check_data(cfg: Config) -> None:
    """Prompt files and lengths."""
    d = cfg.data
    _check(
        len(d.train_files) > 0 or len(d.sources) > 0,
        "data.train_files",
        d.train_files,
        "required (parquet/jsonl paths or globs, dataset folders or hub ids), or set data.sources",
    )
    _check(
        not (d.train_files and d.sources),
        "data.sources",
        [s.path for s in d.sources],
        "set data.sources or data.train_files, not both (data.sources mixes the training prompts)",
    )
    for i, s in enumerate(d.sources):
        _check(bool(s.path), f"data.sources[{i}].path", s.path, "required: a file, glob, folder or hub id")
        ok = s.weight > 0 and s.weight < float("inf")
        _check(ok, f"data.sources[{i}].weight", s.weight, "must be > 0 (its relative share)")
    _check(bool(d.prompt_key), "data.prompt_key", d.prompt_key, "required")
    _check(d.max_prompt_length >= 1, "data.max_prompt_length", d.max_prompt_length, "must be >= 1")
    _check(d.max_response_length >= 1, "data.max_response_length", d.max_response_length, "must be >= 1")
    _check(d.train_batch_size >= 1, "data.train_batch_size", d.train_batch_size, "must be >= 1")
    need = d.max_prompt_length + d.max_response_length
    _check(
        d.micro_batch_tokens >= need,
        "data.micro_batch_tokens",
        d.micro_batch_tokens,
        f"must hold one full sequence (>= data.max_prompt_length + data.max_response_length = {need})",
    )


def _check_lora(lora: LoRAConfig) -> None:
    """``model.lora`` when enabled: ranges, and peft importable (one line before anything starts)."""
    if not lora.enabled:
        return
    import importlib.util

    _check(lora.r >= 1, "model.lora.r", lora.r, "must be >= 1 (the adapter rank)")
    _check(0 < lora.alpha < float("inf"), "model.lora.alpha", lora.alpha, "must be finite and > 0")
    _check(0 <= lora.dropout < 1, "model.lora.dropout", lora.dropout, "must lie in [0, 1)")
    _check(
        len(lora.target_modules) > 0 and all(lora.target_modules),
        "model.lora.target_modules",
        lora.target_modules,
        "name the Linear layers to adapt (e.g. [q_proj, v_proj], or [all-linear])",
    )
    _check(
        importlib.util.find_spec("peft") is not None,
        "model.lora.enabled",
        lora.enabled,
        "needs peft, which is not installed: pip install 'gkd[lora]' (peft==0.21.2)",
    )


def _check_features(cfg: Config) -> None:
    """Validation, samples per prompt, W&B, completion logs, MFU."""
    tr, d, v, lg = cfg.trainer, cfg.data, cfg.val, cfg.logging
    _check(cfg.rollout.n >= 1, "rollout.n", cfg.rollout.n, "must be >= 1 (samples per prompt)")
    _check(tr.test_freq >= 0, "trainer.test_freq", tr.test_freq, "must be >= 0 (0 = no validation)")
    _check(
        (tr.test_freq == 0 and not tr.val_before_train) or len(d.val_files) > 0,
        "data.val_files",
        d.val_files,
        "required by trainer.test_freq > 0 or trainer.val_before_train (parquet paths or globs)",
    )
    _check(
        tr.test_freq > 0 or tr.val_before_train or not d.val_files,
        "trainer.test_freq",
        tr.test_freq,
        "data.val_files is set but never used: set trainer.test_freq >= 1 (or drop data.val_files)",
    )
    for key in ("val_batch_size", "val_max_samples"):
        n = getattr(d, key)
        _check(n is None or n >= 1, f"data.{key}", n, "must be >= 1 (or null)")
    _check(v.temperature >= 0, "val.temperature", v.temperature, "must be >= 0 (0 = greedy)")
    _check(0 < v.top_p <= 1, "val.top_p", v.top_p, "must lie in (0, 1]")
    _check(
        v.max_new_tokens is None or 1 <= v.max_new_tokens <= d.max_response_length,
        "val.max_new_tokens",
        v.max_new_tokens,
        f"must lie in [1, data.max_response_length={d.max_response_length}] (or null)",
    )
    _check(
        tr.peak_tflops is None or 0 < tr.peak_tflops < float("inf"),
        "trainer.peak_tflops",
        tr.peak_tflops,
        "must be a positive number of TFLOP/s (or null: measured at start-up)",
    )
    modes = ("online", "offline", "disabled")
    _check(lg.wandb.mode in modes, "logging.wandb.mode", lg.wandb.mode, f"expected one of {', '.join(modes)}")
    _check(bool(lg.wandb.project), "logging.wandb.project", lg.wandb.project, "required when W&B is on")
    _check(lg.completions_every >= 0, "logging.completions_every", lg.completions_every, "must be >= 0")
    _check(lg.completions_n >= 1, "logging.completions_n", lg.completions_n, "must be >= 1")
