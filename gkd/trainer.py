"""The training loop, top to bottom. torchrun entry: ``python -m gkd.train --config X.yaml [key=value ...]``
(``gkd train`` builds that command and starts the services).

Every rank: init torch.distributed (gloo on CPU, NCCL on GPU) -> config -> student -> optimizer + LR schedule
-> resume. Rank 0 alone: data, the teacher and rollout clients, the weight channel (rank 0 of a group with
the rollout workers), startup checks, and the :class:`~gkd.scheduler.Scheduler`. Rank 0 drives the other
ranks with commands over the trainer's own group (flat tensors, never pickles):

- ``TRAIN``: the whole batch (samples + teacher top-k) is broadcast; rank r trains on samples r, r + W, ...
  and every rank calls ``train_step`` (gradients averaged by DDP, loss normalised by the global token count);
- ``SAVE``: every rank's RNG state (and, sharded, the full model and optimizer state) is gathered; rank 0
  writes the checkpoint;
- ``SYNC`` (FSDP2 only): every rank helps gather the weight shards rank 0 sends to the rollout engines;
- ``EXPORT`` (FSDP2 only): the full state is gathered for the final Hugging Face folder;
- ``EVAL`` (FSDP2 only): the validation answers are broadcast and every rank computes the loss on all of them
  (no gradient; the sharded forward needs every rank);
- ``STOP``: the run is over (done, or failed on rank 0).

``trainer.strategy``: ``ddp`` replicates the student on every rank; ``fsdp2`` shards it with
``torch.distributed.fsdp.fully_shard`` (each decoder layer, then the root; works with gloo on CPU too), so a
larger student fits: parameters, gradients and AdamW state are split over the ranks.

``model.lora.enabled``: the student is a peft model (``gkd.lora``) whose base is frozen; the same units are
sharded (FSDP2 shards per parameter, so a unit may mix frozen and trainable tensors: only the trainable ones
get gradients and reduce-scatters, and they share one dtype), the rollout engines receive merged weights
under the base names, checkpoints hold the adapter, the export both folders.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from gkd.checkpoint import (
    CheckpointError,
    export_hf,
    full_state_dicts,
    gather_rng_states,
    has_checkpoint,
    load_checkpoint,
    resolve_resume,
    should_save,
)
from gkd.checkpoint_writer import CheckpointWriter
from gkd.config import Config, compute_dtype, load_config, rollout_dtype, to_yaml
from gkd.lora import weight_source
from gkd.metrics import (
    MetricsLogger,
    SpanRecorder,
    WandbRun,
    completion_rows,
    cpu_memory_used_gb,
    max_memory_allocated_gb,
    measure_peak_tflops,
    metric_names,
    service_throughput,
    training_flops,
)
from gkd.preflight import check_run
from gkd.rollout.types import FINISH_REASONS, Sample, SamplingConfig
from gkd.scheduler import PhaseFailed, Scheduler, SchedulerState
from gkd.startup import StartupClock, service_info
from gkd.teacher.types import TeacherOutput
from gkd.trainer_step import (
    build_optimizer,
    pack_micro_batches,
    torch_dtype,
    train_step,
    union_request,
    unwrap,
)
from gkd.transport.process import dump_stacks_on_sigusr1, exit_with_parent
from gkd.validation import evaluation_due

log = logging.getLogger("gkd.trainer")

OP_TRAIN, OP_SAVE, OP_STOP, OP_SYNC, OP_EXPORT, OP_EVAL = 0, 1, 2, 3, 4, 5
STARTUP_TIMEOUT_S = 10.0  # a broker answers info itself (no worker involved): slow means unreachable


class StartupError(RuntimeError):
    """A check before training failed (service unreachable, vocabularies differ...); says what to do."""


# ------------------------------------------------------------------------------------------ batch wire


def _bcast(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    moved = t.to(device)
    dist.broadcast(moved, src=0)
    return moved.cpu()


def broadcast_batch(
    samples: Sequence[Sample] | None, outputs: Sequence[TeacherOutput] | None, device
) -> tuple[list[Sample], list[TeacherOutput]]:
    """Rank 0 sends ``OP_TRAIN`` + the batch as flat tensors; the others (``samples=None``) receive it.
    Call after the other ranks have read the command header."""
    if samples is not None:
        assert outputs is not None
        k = max(int(o.topk_ids.shape[1]) for o in outputs)
        meta = torch.tensor(
            [
                [
                    len(s.prompt_ids),
                    len(s.response_ids),
                    int(s.policy_version),
                    FINISH_REASONS.index(s.finish_reason),
                ]
                for s in samples
            ],
            dtype=torch.int64,
        )  # [B, 4]
        tokens = torch.tensor(
            [t for s in samples for t in [*s.prompt_ids, *s.response_ids]], dtype=torch.int64
        )  # [sum(P + R)]
        r_lp = torch.cat([s.response_logprobs.float() for s in samples])  # [sum R]
        padded = [o.padded(k) for o in outputs]  # teachers answering with fewer columns: unused slots
        t_ids = torch.cat([ids for ids, _ in padded])  # [sum R, K]
        t_lp = torch.cat([lp for _, lp in padded])
        t_tok = torch.cat([o.token_logprobs.float() for o in outputs])  # [sum R]
        sizes = torch.tensor([len(samples), tokens.numel(), r_lp.numel(), k], dtype=torch.int64)
    else:
        sizes = torch.zeros(4, dtype=torch.int64)
    sizes = _bcast(sizes, device)
    b, n_tok, n_resp, k = sizes.tolist()
    if samples is None:
        meta = torch.empty(b, 4, dtype=torch.int64)
        tokens = torch.empty(n_tok, dtype=torch.int64)
        r_lp, t_tok = torch.empty(n_resp), torch.empty(n_resp)
        t_ids, t_lp = torch.empty(n_resp, k, dtype=torch.int32), torch.empty(n_resp, k)
    meta, tokens, r_lp, t_ids, t_lp, t_tok = (
        _bcast(x, device) for x in (meta, tokens, r_lp, t_ids, t_lp, t_tok)
    )
    if samples is not None:
        return list(samples), list(outputs)
    out_s, out_t, tok_at, resp_at = [], [], 0, 0
    for p, r, version, finish in meta.tolist():
        ids = tokens[tok_at : tok_at + p + r].tolist()
        span = slice(resp_at, resp_at + r)
        out_s.append(Sample(ids[:p], ids[p:], r_lp[span].clone(), FINISH_REASONS[finish], version))
        out_t.append(TeacherOutput(t_ids[span].clone(), t_lp[span].clone(), t_tok[span].clone()))
        tok_at, resp_at = tok_at + p + r, resp_at + r
    return out_s, out_t


def _command(op: int, step: int, device) -> tuple[int, int]:
    """Rank 0 sends (op, step); every other rank receives it."""
    got = _bcast(torch.tensor([op, step], dtype=torch.int64), device).tolist()
    return int(got[0]), int(got[1])


# ------------------------------------------------------------------------------------------ setup


def _init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """torchrun env -> (rank, world, device). Without torchrun env: a single process, no group."""
    gpu = cfg.trainer.n_gpus_per_node > 0
    if gpu and not torch.cuda.is_available():
        raise StartupError(
            f"trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node} asks for GPUs, but CUDA is not available "
            f"here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); set "
            "trainer.n_gpus_per_node=0 to train on the CPU"
        )
    if gpu:
        # fp32 matmuls that remain (e.g. outside autocast) use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(minutes=30))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def param_dtype(cfg: Config) -> str:
    """The student's master weights and AdamW state: ``model.param_dtype`` on every device. (The rollout
    engines run in ``gkd.config.rollout_dtype(cfg)``: weights are cast to it when packed.)"""
    return cfg.model.param_dtype


def _load_student(cfg: Config, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.model.student_path
    if not Path(path).is_dir():
        raise StartupError(f"model.student_path={path}: no such folder (a transformers model folder)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(param_dtype(cfg))).to(device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.model.lora.enabled:  # frozen base + adapter in the base's dtype (before sharding / DDP)
        from gkd.lora import apply_lora

        with torch.random.fork_rng(devices=[]):  # one adapter init on every rank, whatever the world size
            torch.manual_seed(cfg.trainer.seed)
            model = apply_lora(model, cfg.model.lora)
    model.train()
    return model, AutoTokenizer.from_pretrained(path)


def _auth_hint(service: str, secret_file: str | None) -> str:
    """A service with authentication on drops unsigned or wrongly signed requests without a reply, so a
    missing or wrong secret looks like an unreachable service: say so."""
    if secret_file:
        return (
            f"; if it runs with --auth-secret-file, {service}.auth_secret_file={secret_file} must hold "
            "the same secret (a wrong secret gets no reply)"
        )
    return (
        f"; if it runs with --auth-secret-file (authentication on), set {service}.auth_secret_file to the "
        "same secret file: requests without it get no reply"
    )


def secret_auth(key: str, path: str | None):
    """The :class:`~gkd.transport.auth.Auth` for the secret file at config key ``key`` (None: auth off);
    an unreadable or too short file is a :class:`StartupError` naming the key."""
    from gkd.transport.process import auth_from_file

    try:
        return auth_from_file(path)
    except (OSError, ValueError) as e:
        raise StartupError(f"{key}={path}: {e}") from e


def open_clients(cfg: Config, *, timeout_s: float | None = None, retries: int = 2):
    """(TeacherClient, RolloutClient) for the configured services, signing every message with
    ``teacher.auth_secret_file`` / ``rollout.auth_secret_file`` when set (the services' own secrets)."""
    from gkd.rollout.client import RolloutClient
    from gkd.teacher.client import TeacherClient

    n_rollout = cfg.rollout.workers * cfg.rollout.nnodes
    teacher = TeacherClient(
        f"{cfg.teacher.server_ip}:{cfg.teacher.server_port}",
        timeout_s=timeout_s or cfg.teacher.request_timeout_s,
        liveness_timeout_s=cfg.teacher.liveness_timeout_s,
        retries=retries,
        auth=secret_auth("teacher.auth_secret_file", cfg.teacher.auth_secret_file),
    )
    try:
        rollout = RolloutClient(
            f"{cfg.rollout.server_ip}:{cfg.rollout.server_port}",
            timeout_s=timeout_s or cfg.rollout.request_timeout_s,
            liveness_timeout_s=cfg.rollout.liveness_timeout_s,
            retries=retries,
            auth=secret_auth("rollout.auth_secret_file", cfg.rollout.auth_secret_file),
            # one worker: a batch is one request (the pipelined sync gate's exactness needs it);
            # several: spread a batch over them and use the strict gate
            max_prompts_per_request=-(-cfg.data.train_batch_size * cfg.rollout.n // n_rollout),
        )
    except BaseException:
        teacher.close()
        raise
    return teacher, rollout


def shard_fsdp2(
    model: torch.nn.Module, device: torch.device, compute: torch.dtype | None = None
) -> torch.nn.Module:
    """``fully_shard`` every decoder layer (the model's ``_no_split_modules`` classes), then the root
    (embeddings, final norm and lm_head: the root's parameters stay gathered from forward to backward, so
    the fused loss can read the lm_head weight after the forward). Needs an initialised process group.

    ``compute``: when it differs from the parameters' dtype, ``MixedPrecisionPolicy(param_dtype=compute,
    reduce_dtype=float32)``: the shards (master weights, AdamW) keep their dtype, the gathered parameters
    used by forward and backward are cast to ``compute``, gradients are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise StartupError("trainer.strategy=fsdp2 needs torchrun (a process group); use ddp for one process")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        log.warning("%s names no decoder layer class: fsdp2 shards it as one unit", type(model).__name__)
    kwargs = {}
    if compute is not None and compute != next(model.parameters()).dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def check_services(cfg: Config, teacher, rollout, model, n_rollout: int, tokenizer=None) -> None:
    """Teacher reachable and on the student's vocabulary; rollout reachable with its workers. Services
    that ``gkd train`` started with the trainer (``*.launch``) are waited for until their workers are up."""
    from gkd.teacher.service import tokenizer_fingerprint

    vocab = int(unwrap(model).config.vocab_size)
    t_addr = f"{cfg.teacher.server_ip}:{cfg.teacher.server_port}"
    try:
        info = service_info(teacher, cfg.teacher.workers, cfg.teacher.launch, STARTUP_TIMEOUT_S)
    except Exception as e:
        raise StartupError(
            f"teacher service at {t_addr} is not reachable ({type(e).__name__}: {e}); start it with "
            "`gkd teacher serve` or set teacher.launch=true"
            + _auth_hint("teacher", cfg.teacher.auth_secret_file)
        ) from e
    workers = [w.get("info", {}) for w in info.get("workers", [])]
    if not workers:
        raise StartupError(f"teacher service at {t_addr} has no workers; start some with `gkd teacher join`")
    mine = tokenizer_fingerprint(cfg.model.student_path, tokenizer=tokenizer)
    for w in workers:
        if int(w.get("vocab_size", -1)) != vocab:
            raise StartupError(
                f"teacher {w.get('model')} has vocabulary size {w.get('vocab_size')}, the student "
                f"{cfg.model.student_path} has {vocab}: distillation needs one shared vocabulary"
            )
        theirs = str(w.get("tokenizer", "none"))
        if mine.startswith("sha256:") and theirs.startswith("sha256:") and theirs != mine:
            raise StartupError(
                f"teacher {w.get('model')} tokenizer {theirs} differs from the student's {mine}: "
                "the same text would map to different ids"
            )
        if int(w.get("max_top_k", cfg.teacher.top_k)) < cfg.teacher.top_k:
            raise StartupError(
                f"teacher.top_k={cfg.teacher.top_k} exceeds the teacher's {w.get('max_top_k')}"
            )
    r_addr = f"{cfg.rollout.server_ip}:{cfg.rollout.server_port}"
    try:
        info = service_info(rollout, n_rollout, cfg.rollout.launch, STARTUP_TIMEOUT_S)
    except Exception as e:
        raise StartupError(
            f"rollout service at {r_addr} is not reachable ({type(e).__name__}: {e}); start it with "
            "`gkd rollout serve --weight-channel ...` or set rollout.launch=true"
            + _auth_hint("rollout", cfg.rollout.auth_secret_file)
        ) from e
    for w in (w.get("info", {}) for w in info.get("workers", [])):
        if int(w.get("vocab_size", -1)) != vocab:
            raise StartupError(f"rollout worker vocabulary {w.get('vocab_size')} != the student's {vocab}")
    log.info(
        "services ok: teacher %s (%d workers), rollout %s; %d rollout workers expected",
        t_addr,
        len(workers),
        r_addr,
        n_rollout,
    )


def open_wandb(cfg: Config, out: Path):
    """The W&B run of ``logging.wandb`` (None when off), with the resolved config logged once."""
    w = cfg.logging.wandb
    if not w.enabled:
        return None
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    try:
        return WandbRun(out, project=w.project, name=w.name, mode=w.mode, config=config)
    except RuntimeError as e:
        raise StartupError(str(e)) from e


def _weight_host(cfg: Config) -> str:
    """Where trainer rank 0 hosts the weight channel's store: loopback when the rollout service is local."""
    import socket

    return "127.0.0.1" if cfg.rollout.server_ip in ("127.0.0.1", "localhost") else socket.gethostname()


def weight_backend(cfg: Config) -> str:
    """NCCL only when both ends are on GPUs they do not share (``gkd.placement.weight_backend``: gloo with
    trainer.allow_shared_gpu); the launcher passes the same to ``gkd rollout serve``."""
    from gkd.placement import weight_backend as channel_backend

    return channel_backend(cfg)


# ------------------------------------------------------------------------------------------ the loop


def train(cfg: Config) -> int:
    startup = StartupClock()  # where start-up time goes: one log line, and the first step's metrics
    rank, world, device = _init_distributed(cfg)
    startup.mark("distributed")
    check_run(cfg, data=rank == 0)  # model folder, prompt files, output folder: one line, before loading
    torch.manual_seed(cfg.trainer.seed + rank)
    model, tokenizer = _load_student(cfg, device)
    sharded = cfg.trainer.strategy == "fsdp2"
    lora = cfg.model.lora.enabled
    if sharded:  # before the optimizer: it holds the shards
        model = shard_fsdp2(model, device, torch_dtype(compute_dtype(cfg)))
    startup.mark("student")
    out = Path(cfg.trainer.output_dir)
    k = cfg.trainer.staleness

    # data (rank 0 only: it alone draws batches); the step count goes to every rank for the LR schedule
    loader, total = None, 0
    if rank == 0:
        from gkd.data import PromptDataset, PromptLoader, batch_seed, repeat_prompts

        loader = PromptLoader.from_config(PromptDataset.from_config(cfg.data, tokenizer), cfg.data)
        total = cfg.trainer.total_steps or loader.num_batches(cfg.trainer.total_epochs)
        if cfg.data.train_batch_size < world:
            raise StartupError(f"data.train_batch_size={cfg.data.train_batch_size} < {world} trainer ranks")
    if world > 1:
        total = int(_bcast(torch.tensor([total]), device).item())
    startup.mark("data")
    optimizer, lr_scheduler = build_optimizer(model, cfg.optim, total)

    # resume: every rank loads the model, optimizer, LR schedule and its own RNG state
    state = SchedulerState()
    resume = resolve_resume(cfg.trainer.resume, out)
    if resume is not None:
        ck = load_checkpoint(resume, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, rank=rank)
        state = (
            SchedulerState(**ck.scheduler_state) if ck.scheduler_state else SchedulerState(ck.step, ck.step)
        )
        if loader is not None and ck.data_state:
            loader.load_state_dict(ck.data_state)
        log.info("rank %d resumed from %s at step %d", rank, resume, state.next_batch)
    if world > 1 and not sharded:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    startup.mark("optimizer")

    def train_on(samples, outputs) -> dict[str, float]:
        mine = list(range(rank, len(samples), world))  # this rank's shard
        micro = pack_micro_batches(
            [samples[i] for i in mine], [outputs[i] for i in mine], cfg.data.micro_batch_tokens, pad_id=pad_id
        )
        return train_step(model, optimizer, lr_scheduler, micro, cfg, device=device)

    def evaluate_on(samples, outputs) -> tuple[float, int]:
        """The loss on validation answers, no gradient: rank 0 alone on its replica (DDP, one process), or
        every rank on all of them (FSDP2: the same micro-batches everywhere, so the gathers match)."""
        from gkd.validation import eval_loss

        micro = pack_micro_batches(samples, outputs, cfg.data.micro_batch_tokens, pad_id=pad_id)
        return eval_loss(model if sharded else unwrap(model), micro, cfg, device)

    # trainer.async_save: rank 0 copies the state to host memory and writes it on a thread
    saver = CheckpointWriter(background=cfg.trainer.async_save)

    def checkpoint(done: int, sched_state: SchedulerState) -> None:
        rngs = gather_rng_states()
        model_state, optimizer_state = (
            full_state_dicts(model, optimizer, frozen=not lora) if sharded else (None, None)
        )
        if rank == 0:
            assert loader is not None
            path = saver.save(
                out,
                done,
                model=model,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                data_state=loader.state_dict_at(sched_state.next_batch),
                scheduler_state={"next_batch": sched_state.next_batch, "version": sched_state.version},
                config_yaml=to_yaml(cfg),
                rng_states=rngs,
                keep_last=cfg.trainer.keep_last,
                model_state=model_state,
                optimizer_state=optimizer_state,
            )
            if not saver.background:
                log.info("checkpoint %s", path)

    if rank != 0:  # follow rank 0's commands until STOP
        from gkd.weights import WeightSender

        # gathers shards for rank 0's syncs (the same dtype, hence the same bucket plan, as rank 0's)
        dtype = torch_dtype(rollout_dtype(cfg))
        helper = WeightSender(None, weight_source(model), dtype=dtype) if sharded else None
        while True:
            op, step = _command(0, 0, device)
            if op == OP_TRAIN:
                samples, outputs = broadcast_batch(None, None, device)
                train_on(samples, outputs)
            elif op == OP_SAVE:
                checkpoint(step, SchedulerState(step, step))
            elif op == OP_SYNC:
                assert helper is not None
                helper.sync(step)
            elif op == OP_EXPORT:
                full_state_dicts(model)
            elif op == OP_EVAL:
                samples, outputs = broadcast_batch(None, None, device)
                evaluate_on(samples, outputs)
            else:
                break
        dist.destroy_process_group()
        return 0

    # ---- rank 0: services, weight channel, scheduler
    from gkd.channel import ChannelHost
    from gkd.weights import WeightSender

    assert loader is not None
    n_rollout = cfg.rollout.workers * cfg.rollout.nnodes
    # mid_update: the other ranks are inside collectives (train_step, or a sharded sync / export gather)
    status, mid_update = 1, False
    cleanup = contextlib.ExitStack()  # whatever is open when the run ends, however it ends
    try:
        teacher, rollout = open_clients(cfg)
        cleanup.enter_context(teacher)
        cleanup.enter_context(rollout)
        check_services(cfg, teacher, rollout, model, n_rollout, tokenizer)
        startup.mark("services")
        log.info(
            "weight channel: waiting for %d rollout worker(s) on port %d", n_rollout, cfg.rollout.weight_port
        )
        # generations of the channel: a dead rollout worker makes it re-form with the current ones
        channel = ChannelHost(
            _weight_host(cfg),
            cfg.rollout.weight_port,
            n_rollout,
            backend=weight_backend(cfg),
            timeout=timedelta(seconds=cfg.rollout.weight_timeout_s),
            reform_timeout=timedelta(seconds=cfg.rollout.weight_reform_timeout_s),
            heartbeat_timeout_s=cfg.rollout.weight_heartbeat_timeout_s,
        )
        try:
            # the engines receive their own dtype (bf16 engines: half the bytes of fp32 master weights)
            channel.start(
                lambda group: WeightSender(
                    group,
                    weight_source(model),  # LoRA: merged weights under the base model's names
                    dtype=torch_dtype(rollout_dtype(cfg)),
                    ready_timeout=timedelta(seconds=cfg.rollout.weight_ready_timeout_s),
                )
            )
        except Exception as e:
            raise StartupError(f"the weight channel to the rollout engines failed: {e}") from e
        startup.mark("weight_channel")

        eos = tokenizer.eos_token_id
        spans = SpanRecorder(out / "trace.json" if cfg.logging.trace else None)
        cleanup.callback(spans.close)
        logger = MetricsLogger(
            out,
            total_steps=total,
            start_step=state.next_batch,
            tensorboard=cfg.logging.tensorboard,
            progress=cfg.logging.progress_bar,
            required=metric_names(k),
            wandb=open_wandb(cfg, out),
        )
        cleanup.callback(logger.close)

        def finish_saves() -> None:  # every exit path waits for the pending checkpoint write
            try:
                saver.close()
            except CheckpointError as e:  # on an exception path: reported, the exception stays the cause
                log.error("%s", e)

        cleanup.callback(finish_saves)
        validator = None
        if cfg.trainer.test_freq > 0 or cfg.trainer.val_before_train:
            from gkd.validation import Validator, val_prompts

            def val_loss(samples, outputs) -> tuple[float, int]:
                if sharded and world > 1:
                    _command(OP_EVAL, 0, device)
                    broadcast_batch(samples, outputs, device)
                return evaluate_on(samples, outputs)

            prompts = val_prompts(cfg, tokenizer)
            validator = Validator(cfg, prompts, rollout, teacher, val_loss, eos_id=eos)
        peak = cfg.trainer.peak_tflops or measure_peak_tflops(device, torch_dtype(compute_dtype(cfg)))
        log.info("perf/mfu against %.3g TFLOP/s per trainer device (%s)", peak,
                 "trainer.peak_tflops" if cfg.trainer.peak_tflops else "measured")  # fmt: skip
        n = cfg.rollout.n
        sent = state.version  # the newest version the rollout engines hold or will hold (validation)

        def generate(b: int, min_version: int):
            sampling = SamplingConfig(
                max_new_tokens=cfg.rollout.max_new_tokens,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                stop_token_ids=(eos,) if eos is not None else (),
                seed=batch_seed(cfg.trainer.seed, b, cfg.data.train_batch_size, n),
                return_topk=cfg.rollout.return_topk,
            )
            # rollout.n: the copies of a prompt get distinct seeds (sample j of the batch: base + j)
            return rollout.submit(
                repeat_prompts(loader.batch(b).prompt_ids, n), sampling, min_version=min_version
            )

        def score(b: int, samples):
            pairs = [(s.prompt_ids, s.response_ids) for s in samples]
            wanted = union_request(samples) if cfg.loss.support == "union" else None
            return teacher.submit(pairs, cfg.teacher.top_k, cfg.teacher.temperature, requested_ids=wanted)

        def update(b: int, samples, outputs) -> dict[str, float]:
            nonlocal mid_update
            mid_update = True
            if world > 1:
                _command(OP_TRAIN, b, device)
                broadcast_batch(samples, outputs, device)
            t0 = time.perf_counter()
            metrics = train_on(samples, outputs)
            seconds = time.perf_counter() - t0
            mid_update = False
            lens = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples if s.response_ids]
            flops = training_flops(unwrap(model).config, lens, int(metrics["actor/response_tokens"]))
            metrics["perf/model_tflops"] = flops / 1e12
            metrics["perf/mfu"] = flops / max(seconds, 1e-9) / (peak * 1e12 * world)
            metrics["actor/num_prompts"] = len(samples) // n
            metrics.update(service_throughput(samples, outputs))
            every = cfg.logging.completions_every
            if every and (b + 1) % every == 0:
                rows = completion_rows(samples, outputs, tokenizer.decode, cfg.logging.completions_n)
                logger.log_completions(b, rows)
            return metrics

        def on_failure(sched_state: SchedulerState, err: PhaseFailed) -> None:
            if err.phase == "update":  # the model may be half-updated: keep the last good checkpoint
                return
            saver.wait()  # a periodic save of this step may still be being written
            if has_checkpoint(out, sched_state.next_batch):  # the periodic save of this step is there
                log.info("checkpoint of step %d already saved", sched_state.next_batch)
                return
            if world > 1:
                _command(OP_SAVE, sched_state.next_batch, device)
            checkpoint(sched_state.next_batch, sched_state)
            saver.wait()

        def sync(version: int) -> dict[str, float]:
            nonlocal mid_update, sent
            sent = max(sent, version)
            if not (sharded and world > 1):
                return channel.sync(version)

            # every worker ready first: the other ranks then wait in no collective for the rollout
            def gather_too():
                nonlocal mid_update
                mid_update = True  # the other ranks hold shards: they take part in the gather
                _command(OP_SYNC, version, device)

            try:
                return channel.sync(version, before_transfer=gather_too)
            finally:
                # the sender finishes every gather even when a broadcast failed, so the other ranks are
                # back at their command loop: the failure path (checkpoint, stop) may use the group
                mid_update = False

        scheduler = Scheduler(
            k,
            generate,
            score,
            update,
            sync,
            clock=time.time,
            on_failure=on_failure,
            sync_gate="pipelined" if n_rollout == 1 else "strict",
        )
        startup.mark("setup")
        log.info("%s", startup.summary())
        if validator is not None and cfg.trainer.val_before_train and state.next_batch == 0:
            logger.log(-1, validator.run(min_version=0), check=False)  # the initial weights, step -1
        for step in scheduler.run(total, state):
            saver.poll()  # a background checkpoint write that failed stops the run here
            m = dict(step.metrics)
            m["perf/throughput_tokens_per_s"] = m.get("actor/total_tokens", 0) / max(m["timing/step"], 1e-9)
            m["perf/cpu_memory_used_gb"] = cpu_memory_used_gb()
            m["perf/max_memory_allocated_gb"] = max_memory_allocated_gb(device)
            m["data/batch"] = step.batch
            if startup is not None:  # the first step of this run holds its start-up breakdown
                m.update(startup.metrics())
                startup = None
            if validator is not None and evaluation_due(step.batch + 1, cfg.trainer.test_freq, total):
                if step.batch + 1 == total and sent < total:
                    sync(total)  # the final evaluation answers with the final weights
                m.update(validator.run(min_version=sent))
            logger.log(step.batch, m)
            for s in step.spans:
                spans.add(s.name, s.start, s.end, process=s.lane, lane=s.name, batch=s.batch)
            done = step.batch + 1
            if should_save(done, cfg.trainer.save_freq, total):
                if world > 1:
                    _command(OP_SAVE, done, device)
                checkpoint(done, step.state)
        final_state = None
        if sharded:
            mid_update = True
            if world > 1:
                _command(OP_EXPORT, 0, device)
            final_state = full_state_dicts(model)[0]
            mid_update = False
        export_hf(model, tokenizer, out / "final", state=final_state)
        log.info("final student exported to %s%s", out / "final", " (adapter: final_adapter)" if lora else "")
        if cfg.logging.wandb.enabled and cfg.logging.trace:
            from gkd.timeline import draw_timeline

            spans.flush()
            draw_timeline(out / "trace.json", out / "timeline.png")
            logger.log_image("timeline", out / "timeline.png")
        saver.wait()  # the last checkpoint is committed (or its failure raised) before a clean exit
        channel.close()  # the rollout workers keep their last version
        status = 0
    finally:
        cleanup.close()
        if world > 1 and not mid_update:  # else torchrun tears down the ranks stuck in a collective
            _command(OP_STOP, 0, device)
        if dist.is_initialized():
            dist.destroy_process_group()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gkd.train", description="gkd trainer (run under torchrun)")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    exit_with_parent()  # a SIGKILLed torchrun agent must not leave this rank running
    dump_stacks_on_sigusr1()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s[pid %(process)d] %(message)s"
    )
    from gkd.checkpoint import CheckpointError
    from gkd.config import ConfigError
    from gkd.data import DataError

    try:
        return train(load_config(args.config, args.overrides))
    except (StartupError, PhaseFailed, ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        # a problem the message explains: no traceback (torchrun tears down the other ranks)
        log.error("%s: %s", type(e).__name__, e)
        return 1
