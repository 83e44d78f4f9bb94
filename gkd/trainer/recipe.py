"""The training loop, top to bottom. torchrun entry: ``python -m gkd.trainer --config X.yaml [key=value ...]``
(``gkd train`` builds that command and starts the services).

The recipe is :class:`Trainer`. ``setup()``, every rank: init torch.distributed (gloo on CPU, NCCL on GPU)
-> student -> step count (rank 0 owns the data) -> optimizer + LR schedule -> resume. ``train()``, rank 0
alone: the teacher and rollout clients, the weight channel (rank 0 of a group with the rollout workers),
startup checks, the :class:`~gkd.trainer.scheduler.Scheduler` calling the phases (``generate``, ``score``,
``update``, ``sync``) and the loop. Rank 0 drives the other ranks, which run ``follow()``, with commands
over the trainer's own group (flat tensors, never pickles); the building blocks (process group, student,
clients, FSDP2) live in ``gkd.trainer.setup``:

- ``TRAIN``: the whole batch (samples + teacher top-k) is broadcast; every rank deals it by sequence length
  (``gkd.trainer.batching.deal``, the same plan everywhere), packs its share and calls ``train_step``
  (gradients averaged by DDP / FSDP2, loss normalised by the global token count, equal micro-batch counts);
- ``SAVE``: every rank's RNG state is gathered; rank 0 writes the checkpoint (sharded: every rank writes its
  shards with torch.distributed.checkpoint, rank 0 commits);
- ``SYNC`` (FSDP2 only): every rank helps gather the weight shards rank 0 sends to the rollout engines;
- ``EXPORT`` (FSDP2 LoRA only): the full state is gathered for the final Hugging Face folder;
- ``EVAL`` (FSDP2 only): the validation answers are broadcast and every rank computes the loss on all of them
  (no gradient; the sharded forward needs every rank);
- ``STOP``: the run is over (done, or failed on rank 0).

``trainer.strategy``: ``ddp`` replicates the student on every rank; ``fsdp2`` shards it with
``torch.distributed.fsdp.fully_shard`` (each decoder layer, then the root; works with gloo on CPU too), so a
larger student fits: parameters, gradients and AdamW state are split over the ranks (over groups of
``trainer.fsdp.shard_size`` ranks, replicated across the groups: HSDP, ``gkd.trainer.setup.fsdp_mesh``).

``model.lora.enabled``: the student is a peft model (``gkd.trainer.lora``) whose base is frozen; the same
units are sharded (FSDP2 shards per parameter, so a unit may mix frozen and trainable tensors: only the
trainable ones get gradients and reduce-scatters, and they share one dtype), the rollout engines receive
merged weights under the base names, checkpoints hold the adapter, the export both folders.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from gkd.config import Config, compute_dtype, load_config, rollout_dtype, to_yaml
from gkd.metrics.records import (
    MetricsLogger,
    SpanRecorder,
    completion_rows,
    cpu_memory_used_gb,
    max_memory_allocated_gb,
    mfu,
    resolve_peak_tflops,
    service_throughput,
    training_flops,
)
from gkd.services.inputs import check_run
from gkd.services.startup import StartupClock
from gkd.services.transport.process import dump_stacks_on_sigusr1, exit_with_parent
from gkd.trainer.batching import rank_micro_batches
from gkd.trainer.checkpoint import (
    CheckpointError,
    checkpoint_root,
    export_hf,
    full_state_dicts,
    gather_rng_states,
    has_checkpoint,
    load_checkpoint,
    resolve_resume,
    should_save,
)
from gkd.trainer.checkpoint.carried import decode_carried, encode_carried
from gkd.trainer.checkpoint.runs import check_drift, start_run
from gkd.trainer.checkpoint.writer import CheckpointWriter
from gkd.trainer.checks import check_services
from gkd.trainer.export import export_checkpoint, export_dtype
from gkd.trainer.lora import weight_source
from gkd.trainer.ranks import (
    OP_EVAL,
    OP_EXPORT,
    OP_SAVE,
    OP_STOP,
    OP_SYNC,
    OP_TRAIN,
    Commands,
    broadcast_batch,
    broadcast_tensor,
)
from gkd.trainer.scheduler import Carried, PhaseFailed, Scheduler, SchedulerState, Stopped
from gkd.trainer.setup import (  # re-exported: the building blocks' public home stays gkd.trainer.recipe
    StartupError,
    _init_distributed,
    _load_student,
    _weight_host,
    materialize_student,
    open_clients,
    open_wandb,
    param_dtype,
    secret_auth,
    shard_fsdp2,
    weight_backend,
)
from gkd.trainer.skips import SkipGuard
from gkd.trainer.sources import BatchSources, required_metrics, source_of
from gkd.trainer.step import (
    build_optimizer,
    pack_micro_batches,
    torch_dtype,
    train_step,
    unwrap,
)
from gkd.trainer.stop import StopBeforeTraining, StopRequest

__all__ = [
    "StartupError", "Trainer", "broadcast_batch", "check_services", "main", "open_clients", "open_wandb",
    "param_dtype", "secret_auth", "shard_fsdp2", "train", "weight_backend",
]  # fmt: skip

log = logging.getLogger("gkd.trainer")

# ------------------------------------------------------------------------------------------ the recipe


class Trainer:
    """One rank's part of a run. ``setup()`` builds what every rank needs (process group, student, data size,
    optimizer, resume); rank 0 then runs :meth:`train` (services, weight channel, scheduler, the loop) and
    the other ranks :meth:`follow`, which obeys rank 0's commands until ``STOP``. The phases the scheduler
    calls (:meth:`generate`, :meth:`score`, :meth:`update`, :meth:`sync`, :meth:`on_failure`) are methods."""

    def __init__(self, cfg: Config) -> None:
        self.startup: StartupClock | None = StartupClock()  # one log line, and the first step's metrics
        self.cfg = cfg
        self.sharded = cfg.trainer.strategy == "fsdp2"
        self.lora = cfg.model.lora.enabled
        self.out = Path(cfg.trainer.output_dir)
        self.k = cfg.trainer.staleness
        self.n_rollout = cfg.rollout.workers * cfg.rollout.nnodes
        self.others_busy = False  # see others_in_collective
        self.skips = SkipGuard(cfg.trainer.max_skipped_steps)  # rank 0: stops a run that only skips
        self.stop = StopRequest()  # SIGTERM / SIGINT: gkd.trainer.stop
        self.carried: list[Carried] = []  # batches the resumed checkpoint generated already
        self.scheduler: Scheduler | None = None

    # ---- every rank

    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world, self.device = _init_distributed(cfg)
        self.commands = Commands() if self.world > 1 else None  # rank 0's orders, through the store
        self.startup.mark("distributed")
        # model folder, prompt files, output folder: one line, before loading
        check_run(cfg, data=self.rank == 0)
        if self.rank == 0:  # leftovers removed, another run's checkpoints refused, the run id written
            start_run(cfg.trainer.resume, self.out)
        torch.manual_seed(cfg.trainer.seed + self.rank)
        self.model, self.tokenizer = _load_student(cfg, self.device, sharded=self.sharded)  # FSDP2: on meta
        if self.sharded:  # before the optimizer: it holds the shards
            compute = torch_dtype(compute_dtype(cfg))
            self.model = shard_fsdp2(self.model, self.device, compute, cfg.trainer.fsdp.shard_size)
            materialize_student(self.model, cfg, self.device)  # rank 0 reads, every rank keeps its shards
        self.startup.mark("student")
        self.setup_data()
        self.startup.mark("data")
        self.optimizer, self.lr_scheduler = build_optimizer(self.model, cfg.optim, self.total)
        self.state = self.resume()
        if self.world > 1 and not self.sharded:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.startup.mark("optimizer")
        # trainer.async_save: rank 0 copies the state to host memory and writes it on a thread
        self.saver = CheckpointWriter(background=cfg.trainer.async_save)

    def setup_data(self) -> None:
        """The prompt loader (rank 0 only: it alone draws batches); the step count goes to every rank for
        the LR schedule."""
        cfg = self.cfg
        self.loader, self.total = None, 0
        if self.rank == 0:
            from gkd.data.prompts import PromptDataset, PromptLoader

            self.loader = PromptLoader.from_config(
                PromptDataset.from_config(cfg.data, self.tokenizer), cfg.data
            )
            self.total = cfg.trainer.total_steps or self.loader.num_batches(cfg.trainer.total_epochs)
        if self.world > 1:
            self.total = int(broadcast_tensor(torch.tensor([self.total]), self.device).item())

    def resume(self) -> SchedulerState:
        """Every rank loads the model, optimizer, LR schedule and its own RNG state; rank 0 the data state
        and the batches the checkpoint carries. A changed data key is refused, other changes warned."""
        path = resolve_resume(self.cfg.trainer.resume, self.out)
        if path is None:
            return SchedulerState()
        check_drift(path, self.cfg, warn=self.rank == 0)
        ck = load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, rank=self.rank
        )
        saved = dict(ck.scheduler_state or {"next_batch": ck.step, "version": ck.step})
        self.carried = decode_carried(saved.pop("carried", None))
        state = SchedulerState(**saved)
        if self.loader is not None and ck.data_state:
            self.loader.load_state_dict(ck.data_state)
        log.info("rank %d resumed from %s at step %d", self.rank, path, state.next_batch)
        return state

    def train_on(self, samples, outputs) -> dict[str, float]:
        """This rank's share of the batch (dealt by length, the same plan on every rank), packed, trained."""
        budget = self.cfg.data.micro_batch_tokens
        micro = rank_micro_batches(samples, outputs, self.rank, self.world, budget, pad_id=self.pad_id)
        return train_step(self.model, self.optimizer, self.lr_scheduler, micro, self.cfg, device=self.device)

    def evaluate_on(self, samples, outputs) -> tuple[float, int]:
        """The loss on validation answers, no gradient: rank 0 alone on its replica (DDP, one process), or
        every rank on all of them (FSDP2: the same micro-batches everywhere, so the gathers match)."""
        from gkd.trainer.validation import eval_loss

        micro = pack_micro_batches(samples, outputs, self.cfg.data.micro_batch_tokens, pad_id=self.pad_id)
        return eval_loss(self.model if self.sharded else unwrap(self.model), micro, self.cfg, self.device)

    def checkpoint(self, done: int, sched_state: SchedulerState, carried: list[Carried] = ()) -> None:
        """Every rank gives its RNG state; rank 0 writes step ``done`` (sharded: every rank its shards),
        with the ``carried`` batches (generated for the next steps: an exact resume at k >= 1)."""
        rngs, keep, small, b = gather_rng_states(), self.cfg.trainer.keep_last, None, sched_state.next_batch
        if self.rank == 0:
            sched = {"next_batch": b, "version": sched_state.version, "carried": encode_carried(carried)}
            small = dict(lr_scheduler=self.lr_scheduler, rng_states=rngs, config_yaml=to_yaml(self.cfg),
                         data_state=self.loader.state_dict_at(b), scheduler_state=sched)  # fmt: skip
        if self.sharded:  # DCP: each rank its shards, never a full copy
            path = self.saver.save_sharded(self.out, done, model=self.model, optimizer=self.optimizer,
                                           frozen=not self.lora, keep_last=keep, rank0=small)  # fmt: skip
        elif small is not None:
            path = self.saver.save(self.out, done, model=self.model, optimizer=self.optimizer, keep_last=keep,
                                   **small)  # fmt: skip
        if self.rank == 0 and not self.saver.background:  # else logged by the writer
            log.info("checkpoint %s", path)

    def follow(self) -> int:
        """Ranks other than 0: obey rank 0's commands until ``STOP``."""
        from gkd.weights.transfer import WeightSender

        # gathers shards for rank 0's syncs (the same dtype, hence the same bucket plan, as rank 0's)
        dtype = torch_dtype(rollout_dtype(self.cfg))
        helper = WeightSender(None, weight_source(self.model), dtype=dtype) if self.sharded else None
        obey = {
            OP_TRAIN: lambda step: self.train_on(*broadcast_batch(None, None, self.device)),
            OP_SAVE: lambda step: self.checkpoint(step, SchedulerState(step, step)),
            OP_SYNC: lambda step: helper.sync(step),
            OP_EXPORT: lambda step: full_state_dicts(self.model),
            OP_EVAL: lambda step: self.evaluate_on(*broadcast_batch(None, None, self.device)),
        }
        self.stop.training = True  # a signal from now on is passed on to rank 0, which stops every rank

        def pass_on_stop() -> None:
            if self.stop.requested:
                self.commands.ask_stop()

        while (command := self.commands.receive(idle=pass_on_stop))[0] in obey:
            op, step = command
            obey[op](step)
        self.saver.close()  # this rank's shards of the last checkpoint are written
        dist.destroy_process_group()
        return self.stop.exit_status if self.stop.requested else 0

    # ---- rank 0: the driver

    def tell(self, op: int, step: int = 0) -> None:
        """Send the other ranks a command (nothing to do in a one-process run)."""
        if self.commands is not None:
            self.commands.send(op, step)

    @contextlib.contextmanager
    def others_in_collective(self):
        """While open, the other ranks are inside collectives with rank 0 (``train_step``, the export's
        gather). When the block raises they stay there: the run's end then sends no ``STOP`` (torchrun
        tears them down)."""
        self.others_busy = True
        yield
        self.others_busy = False

    def open_services(self, cleanup: contextlib.ExitStack) -> None:
        """The teacher and rollout clients (closed by ``cleanup``), checked against the student."""
        self.teacher, self.rollout = open_clients(self.cfg)
        cleanup.enter_context(self.teacher)
        cleanup.enter_context(self.rollout)
        check_services(self.cfg, self.teacher, self.rollout, self.model, self.n_rollout, self.tokenizer)

    def open_channel(self) -> None:
        """The weight channel to the rollout workers; a dead worker makes it re-form with the current ones."""
        from gkd.weights.channel import ChannelHost
        from gkd.weights.transfer import WeightSender

        cfg = self.cfg
        members = self.n_rollout * cfg.rollout.tensor_parallel_size  # a vLLM engine: one per TP rank
        log.info(
            "weight channel: waiting for %d rollout member(s) on port %d", members, cfg.rollout.weight_port
        )
        self.channel = ChannelHost(
            _weight_host(cfg),
            cfg.rollout.weight_port,
            members,
            backend=weight_backend(cfg),
            timeout=timedelta(seconds=cfg.rollout.weight_timeout_s),
            reform_timeout=timedelta(seconds=cfg.rollout.weight_reform_timeout_s),
            heartbeat_timeout_s=cfg.rollout.weight_heartbeat_timeout_s,
            bucket_macs=cfg.rollout.auth_secret_file is not None,  # as the rollout service decides
        )
        try:
            # the engines receive their own dtype (bf16 engines: half the bytes of fp32 master weights)
            self.channel.start(
                lambda group: WeightSender(
                    group,
                    weight_source(self.model),  # LoRA: merged weights under the base model's names
                    dtype=torch_dtype(rollout_dtype(cfg)),
                    ready_timeout=timedelta(seconds=cfg.rollout.weight_ready_timeout_s),
                )
            )
        except Exception as e:
            raise StartupError(f"the weight channel to the rollout engines failed: {e}") from e

    def open_logging(self, cleanup: contextlib.ExitStack) -> None:
        """Spans, the metrics logger (JSONL, TensorBoard, W&B) and the wait for the pending checkpoint write,
        all closed by ``cleanup`` however the run ends; the validator; the peak TFLOP/s behind perf/mfu."""
        cfg = self.cfg
        self.spans = SpanRecorder(self.out / "trace.json" if cfg.logging.trace else None)
        cleanup.callback(self.spans.close)
        self.logger = MetricsLogger(
            self.out,
            total_steps=self.total,
            start_step=self.state.next_batch,
            tensorboard=cfg.logging.tensorboard,
            progress=cfg.logging.progress_bar,
            required=required_metrics(self.k, self.sources.mixed),
            wandb=open_wandb(cfg, self.out),
        )
        cleanup.callback(self.logger.close)
        cleanup.callback(self.finish_saves)
        self.validator = self.evaluations = None
        if cfg.trainer.test_freq > 0 or cfg.trainer.val_before_train:
            from gkd.trainer.validation import Evaluations, Validator, val_prompts

            prompts = val_prompts(cfg, self.tokenizer)
            self.validator = Validator(
                cfg, prompts, self.rollout, self.teacher, self.val_loss, eos_id=self.tokenizer.eos_token_id
            )
            self.evaluations = Evaluations(self.validator, cfg.trainer.test_freq, self.total, cfg.val.overlap)
        compute = torch_dtype(compute_dtype(cfg))
        self.peak = resolve_peak_tflops(self.device, compute, cfg.trainer.peak_tflops)  # logs its source
        self.sent = self.state.version  # the newest version the rollout engines hold or will hold

    def finish_saves(self) -> None:
        """Every exit path waits for the pending checkpoint write."""
        try:
            self.saver.close()
        except CheckpointError as e:  # on an exception path: reported, the exception stays the cause
            log.error("%s", e)

    def val_loss(self, samples, outputs) -> tuple[float, int]:
        if self.sharded and self.world > 1:
            self.tell(OP_EVAL)
            broadcast_batch(samples, outputs, self.device)
        return self.evaluate_on(samples, outputs)

    def generate(self, b: int, min_version: int):
        """Batch ``b``'s answers: the student's (rollout), the teacher's or the data's
        (``gkd.trainer.sources``)."""
        return self.sources.generate(b, min_version)

    def score(self, b: int, samples):
        return self.sources.score(b, samples)

    def update(self, b: int, samples, outputs) -> dict[str, float]:
        with self.others_in_collective():
            self.tell(OP_TRAIN, b)
            if self.world > 1:
                broadcast_batch(samples, outputs, self.device)
            t0 = time.perf_counter()
            metrics = self.train_on(samples, outputs)
            seconds = time.perf_counter() - t0
        self.skips.after(b, metrics)  # too many non-finite steps in a row: PhaseFailed("update"), no save
        lens = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples if s.response_ids]
        flops = training_flops(unwrap(self.model).config, lens, int(metrics["actor/response_tokens"]))
        metrics["perf/model_tflops"] = flops / 1e12
        metrics["perf/mfu"] = mfu(flops, seconds, self.peak, self.world)
        metrics["actor/num_prompts"] = len(samples) // self.cfg.rollout.n
        source = source_of(samples)
        metrics[f"actor/kl_loss_{source}"] = metrics["actor/kl_loss"]  # student | teacher | data
        metrics.update(service_throughput(samples, outputs))
        every = self.cfg.logging.completions_every
        if every and (b + 1) % every == 0 and source == "student":
            rows = completion_rows(samples, outputs, self.tokenizer.decode, self.cfg.logging.completions_n)
            self.logger.log_completions(b, rows)
        return metrics

    def sync(self, version: int) -> dict[str, float]:
        self.sent = max(self.sent, version)
        if not (self.sharded and self.world > 1):
            return self.channel.sync(version)

        def gather_too() -> None:  # every worker is ready: the other ranks wait in no collective until now
            self.others_busy = True  # they hold shards: they take part in the gather
            self.tell(OP_SYNC, version)

        try:
            return self.channel.sync(version, before_transfer=gather_too)
        finally:
            # the sender finishes every gather even when a broadcast failed, so the other ranks are back at
            # their command loop: the failure path (checkpoint, stop) may use the group
            self.others_busy = False

    def on_failure(self, sched_state: SchedulerState, err: PhaseFailed) -> None:
        if err.phase == "update":  # the model may be half-updated: keep the last good checkpoint
            return
        self.saver.wait()  # a periodic save of this step may still be being written
        if has_checkpoint(self.out, sched_state.next_batch):  # the periodic save of this step is there
            log.info("checkpoint of step %d already saved", sched_state.next_batch)
            return
        self.save(sched_state.next_batch, sched_state, self.scheduler.in_flight(timeout_s=0))
        self.saver.wait()

    def save(self, done: int, sched_state: SchedulerState, carried: list[Carried] = ()) -> None:
        self.tell(OP_SAVE, done)
        self.checkpoint(done, sched_state, carried)

    def step_metrics(self, step) -> dict[str, float]:
        """A finished step's record: the scheduler's timings, throughput, memory, the start-up breakdown
        (the first step of this run) and, when due, validation."""
        m = dict(step.metrics)
        m["perf/throughput_tokens_per_s"] = m.get("actor/total_tokens", 0) / max(m["timing/step"], 1e-9)
        m["perf/cpu_memory_used_gb"] = cpu_memory_used_gb()
        m["perf/max_memory_allocated_gb"] = max_memory_allocated_gb(self.device)
        m["data/batch"] = step.batch
        if self.startup is not None:
            m.update(self.startup.metrics())
            self.startup = None
        return m

    def evaluate(self, done: int) -> dict[str, float]:
        """The ``val/*`` metrics due in the record of step ``done`` (none if no evaluation is due or
        finished). An evaluation that fails is logged and dropped: it never stops training."""
        if self.evaluations is None:
            return {}
        try:
            return self.evaluations.for_record(done, self.val_version)
        except Exception as e:  # a validation request that failed, a broken reply...
            self.evaluations.pending = None
            log.error(
                "the evaluation after step %d failed (%s: %s); training goes on", done, type(e).__name__, e
            )
            return {}

    def val_version(self, done: int) -> int:
        """The version an evaluation after ``done`` steps asks for (the final one: the final weights)."""
        if done == self.total and self.sent < self.total:
            self.sync(self.total)
        return self.sent

    def export(self) -> None:
        """The final Hugging Face folder in ``trainer.export_dtype`` (FSDP2: streamed from the final
        checkpoint by rank 0 alone; FSDP2 LoRA: every rank helps gather the full state)."""
        dtype, final, state = export_dtype(self.cfg), self.out / "final", None
        self.saver.wait()  # a pending final checkpoint is committed
        if self.sharded and not self.lora and has_checkpoint(self.out, self.total):  # streamed, rank 0 alone
            export_checkpoint(checkpoint_root(self.out) / f"step_{self.total:06d}", final, dtype=dtype)
        else:
            if self.sharded:
                with self.others_in_collective():
                    self.tell(OP_EXPORT)
                    state = full_state_dicts(self.model)[0]
            export_hf(self.model, self.tokenizer, final, state=state, dtype=dtype)
        log.info("final student exported to %s%s", final, " (adapter: final_adapter)" if self.lora else "")
        if self.cfg.logging.wandb.enabled and self.cfg.logging.trace:
            from gkd.metrics.timeline import draw_timeline

            self.spans.flush()
            draw_timeline(self.out / "trace.json", self.out / "timeline.png")
            self.logger.log_image("timeline", self.out / "timeline.png")

    def train(self) -> int:
        """Rank 0: services, weight channel, scheduler; then the loop (each step: log, trace, maybe save);
        the export. Returns the exit status."""
        cfg, status = self.cfg, 1
        cleanup = contextlib.ExitStack()  # whatever is open when the run ends, however it ends
        try:
            self.open_services(cleanup)
            self.sources = BatchSources(cfg, self.loader, self.tokenizer, self.rollout, self.teacher)
            self.startup.mark("services")
            self.open_channel()
            self.startup.mark("weight_channel")
            self.open_logging(cleanup)
            self.scheduler = scheduler = Scheduler(
                self.k,
                self.generate,
                self.score,
                self.update,
                self.sync,
                clock=time.time,
                on_failure=self.on_failure,
                sync_gate="pipelined" if self.n_rollout == 1 else "strict",
                source=self.sources.source,
                stop_grace_s=cfg.trainer.stop_grace_s / 4,  # generations on their way: the rest to save
            )
            self.startup.mark("setup")
            log.info("%s", self.startup.summary())
            if self.validator is not None and cfg.trainer.val_before_train and self.state.next_batch == 0:
                self.logger.log(-1, self.validator.run(min_version=0), check=False)  # the initial weights
            self.stop.on_stop, self.stop.training = scheduler.stop, True
            if self.stop.requested:  # arrived while setting up
                self.stop.fire()
            for step in scheduler.run(self.total, self.state, self.carried):
                self.finish_step(step)
            if self.total == self.state.next_batch:  # resumed at the end: nothing trained, still exported
                self.export()
            self.saver.wait()  # the last checkpoint is committed (or its failure raised) before a clean exit
            self.channel.close()  # the rollout workers keep their last version
            status = 0
        except Stopped as e:
            log.warning("%s", e)
            status = self.stop.exit_status
        finally:
            self.stop.on_stop = None
            cleanup.close()
            if self.commands is not None and not self.others_busy:  # else torchrun tears the ranks down
                self.commands.send(OP_STOP)
            if dist.is_initialized():
                dist.destroy_process_group()
        return status

    def finish_step(self, step) -> None:
        """A trained step: its record and spans, a checkpoint when due (with the batches generated for the
        next steps). After the last step the checkpoint and the export come first, the final evaluation
        (whose failure is only logged) last."""
        self.saver.poll()  # a background checkpoint write that failed stops the run here
        done, cfg = step.batch + 1, self.cfg
        m = self.step_metrics(step)
        for s in step.spans:
            self.spans.add(s.name, s.start, s.end, process=s.lane, lane=s.name, batch=s.batch)
        if done < self.total:
            m.update(self.evaluate(done))
            self.logger.log(step.batch, m)
        if should_save(done, cfg.trainer.save_freq, self.total):
            self.save(done, step.state, self.scheduler.in_flight() if done < self.total else [])
        if done == self.total:
            self.export()
            m.update(self.evaluate(done))
            self.logger.log(step.batch, m)
        if self.commands is not None and self.commands.stop_asked():  # another rank got a stop signal
            self.stop.signum = self.stop.signum or signal.SIGTERM
            self.scheduler.stop("a stop signal on another trainer rank")


def train(cfg: Config) -> int:
    """One rank of a run (every rank calls it; rank 0 drives). Returns the exit status (128 + the signal
    number after SIGTERM / SIGINT: ``gkd.trainer.stop``)."""
    trainer = Trainer(cfg)
    trainer.stop.install()
    try:
        trainer.setup()
        return trainer.train() if trainer.rank == 0 else trainer.follow()
    except StopBeforeTraining as e:
        log.warning("%s: stopping (nothing trained yet in this run)", e)
        if dist.is_initialized():
            dist.destroy_process_group()
        return trainer.stop.exit_status
    finally:
        trainer.stop.uninstall()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gkd.trainer", description="gkd trainer (run under torchrun)")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    exit_with_parent()  # a SIGKILLed torchrun agent must not leave this rank running
    dump_stacks_on_sigusr1()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s[pid %(process)d] %(message)s"
    )
    from gkd.config import ConfigError
    from gkd.data.prompts import DataError
    from gkd.trainer.checkpoint import CheckpointError

    try:
        return train(load_config(args.config, args.overrides))
    except (StartupError, PhaseFailed, ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        # a problem the message explains: no traceback (torchrun tears down the other ranks)
        log.error("%s: %s", type(e).__name__, e)
        return getattr(e, "exit_code", 1)  # 2: a limit that crosses services (gkd.config.limits)
