"""The weight channel's receiver inside every vLLM worker process (tensor parallel included).

vLLM runs its model in worker processes of its own (one per tensor-parallel rank) unless the engine core
and a single-GPU executor share the gkd process. Tensors handed to ``collective_rpc`` would then be
pickled (each a view into a 256 MB staging bucket: its whole storage with it). So each worker receives the
weights itself: :class:`WeightReceiverExtension` is mixed into vLLM's worker class
(``LLM(worker_extension_cls=EXTENSION)``) and its methods are called by name, with small arguments only:

- ``gkd_start_weights(channel, spec, reload)``: this worker joins the trainer's weight channel as a member
  of its own (weight rank ``channel["rank"]`` + its own rank in the engine: the service gives each engine
  a block of ``tensor_parallel_size`` ranks) and starts a :class:`StagedVersions` thread, which receives
  every version into its own staging (on its own GPU with NCCL), verified by checksum or MAC, while the
  engine keeps generating with the current weights;
- ``gkd_weight_status()``: ``{"state", "staged", "version", "error"}`` of this rank;
- ``gkd_apply_weights(v)``: load the staged version ``v`` into the model (the full tensors: vLLM's
  ``load_weights`` keeps this rank's shard of each), on the worker's main thread between model steps;
- ``gkd_set_logit_scale(factor)``: the temperature hook (:func:`gkd.services.vllm.set_logit_scale`).

In the gkd process, :func:`follow_workers` (the rollout worker's weight thread) polls the ranks' status
between requests and, once every rank staged the same version, applies it on all of them at the batch
boundary, then resets the prefix cache. A rank that stages a version waits for its apply before it takes
the next one, so the ranks of one engine never hold different versions.

The functions that load into a vLLM model (:func:`load_in_place`, :func:`reload`) are shared with the
in-process path of :mod:`gkd.rollout.vllm_engine`. Everything here but the vLLM worker itself (``self`` of
the extension: ``model_runner``, ``reload_weights``, ``rank``) is plain gkd code, tested without vLLM.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from gkd.rollout.versioned import VersionedEngine, WeightChannel, _AtVersion
from gkd.services.vllm import set_logit_scale

log = logging.getLogger("gkd.rollout")

EXTENSION = "gkd.rollout.vllm_worker.WeightReceiverExtension"  # vLLM's worker_extension_cls
POLL_S = 0.2  # how often the gkd process asks the workers whether a version is staged

# --- loading into a vLLM model (run inside the worker) --------------------------------------------------


def _finish_copies(model) -> None:
    """Wait until the copies into ``model``'s parameters have run on the GPU. They were queued on this
    thread's current stream; generation resumes on the engine's stream, which does not wait for this
    one. A host sync once per weight version, off the hot path."""
    device = next(iter(model.parameters())).device
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def load_in_place(worker, weights: list[tuple[str, torch.Tensor]]) -> int:
    """GPU, unquantized: copy into the existing parameters (vLLM renames/fuses HF names itself)."""
    model = worker.model_runner.get_model()
    with torch.no_grad():
        loaded = model.load_weights(iter(weights))
    _finish_copies(model)
    return len(loaded) if loaded is not None else len(weights)


def reload(worker, weights: list[tuple[str, torch.Tensor]]) -> int:
    """CPU or quantized: vLLM's in-place reload (rebuild layers, load, re-run post-load processing)."""
    worker.reload_weights(weights_iterator=iter(weights))
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and _shares_storage(head.weight, embed.weight):
        # Tied embeddings: the reload re-processed embed_tokens but not the head's processed copy.
        with torch.no_grad():
            head.quant_method.process_weights_after_loading(head)
    _finish_copies(model)
    return len(weights)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --- the receiver of one rank (plain gkd code) ------------------------------------------------------------


def spec_rows(spec: dict[str, torch.Tensor]) -> list[list]:
    """``parameters_spec()`` as plain rows ``[name, dtype, shape]``: what crosses ``collective_rpc``."""
    return [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in spec.items()]


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"weight spec: {name!r} is not a torch dtype")
    return value


class _Target:
    """What :class:`VersionedEngine` drives: the spec, a policy version, and ``load_weights`` by ``load``."""

    def __init__(self, load: Callable[[list[tuple[str, torch.Tensor]]], Any], rows: Sequence[Sequence]):
        self.load = load
        self.spec = {
            str(name): torch.empty(tuple(shape), dtype=_dtype(dtype), device="meta")
            for name, dtype, shape in rows
        }
        self.policy_version = 0

    def parameters_spec(self) -> dict[str, torch.Tensor]:
        return self.spec

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        n = self.load(list(named))
        if version is not None:
            self.policy_version = int(version)
        return n


class StagedVersions(VersionedEngine):
    """One rank's member of the weight channel: joins (re-joins after a re-form), stages each version
    and then waits until :meth:`apply` (called by the engine between model steps) loaded it. ``load``
    gets the full tensors, as views into the staging (it must copy them)."""

    def __init__(
        self,
        load,
        rows: Sequence[Sequence],
        channel: WeightChannel,
        *,
        pin: bool | None = None,
        device: int | None = None,
    ):
        super().__init__(_Target(load, rows), channel, pin=pin)
        self.staged: int | None = None
        self._stopping = False
        # the worker's GPU: a new thread starts on device 0, and NCCL takes the current device
        self._device = device

    def _receive_loop(self) -> None:
        if self._device is not None:
            torch.cuda.set_device(self._device)
        super()._receive_loop()

    def _receive_versions(self, receiver) -> bool:
        self._notify(staged=None)  # a new generation: nothing staged
        return super()._receive_versions(receiver)

    def _take(self, receiver, version: int) -> bool:
        """Report ``version`` staged and wait until the engine applied (or discarded) it."""
        with self._changed:
            self.staged = version
            self._changed.notify_all()
            # None: applied, or discarded (another rank of the engine lost this version)
            self._changed.wait_for(lambda: self.staged is None or self._stopping)
            return self._stopping  # the engine gave up on the channel: leave it (the heartbeat stops)

    def apply(self, version: int) -> int:
        """Load the staged ``version`` (which every rank of the engine staged); returns it."""
        with self._changed:
            if self.staged != version or self.receiver is None:
                raise RuntimeError(f"asked to apply version {version}, this rank has {self.staged} staged")
            start = time.perf_counter()
            self.receiver.apply(_AtVersion(self.engine, version))
            self.staged = None
            self._changed.notify_all()
        log.info("applied policy version %d in %.3fs", version, time.perf_counter() - start)
        return version

    def discard(self) -> None:
        """Drop the staged version unapplied: another rank of the engine did not get it (it re-joins the
        channel); this one goes back to the store, where the trainer's re-form reaches it too."""
        self._notify(staged=None)

    def stop(self) -> None:
        """Leave the channel once the receive thread is back from the store (a staged version waiting
        for its apply: at once); the engine calls it when it gives up on the channel."""
        self._notify(_stopping=True)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "staged": self.staged, "version": self.version, "error": self.error}


class WeightReceiverExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); see the module docstring. ``self`` is
    the vLLM worker: ``self.rank`` its rank in the engine, ``self.model_runner`` its model."""

    def gkd_start_weights(self, channel: dict[str, Any], rows: list, reload_path: bool) -> str:
        ch = WeightChannel(**{**channel, "rank": int(channel["rank"]) + int(self.rank), "ranks": 1})
        self._gkd_reload = bool(reload_path)
        device = torch.cuda.current_device() if torch.cuda.is_available() else None  # set by vLLM
        self._gkd_weights = StagedVersions(self._gkd_load, rows, ch, device=device).start()
        return f"weight rank {ch.rank} of {ch.world_size}"

    def _gkd_load(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Load one version's full tensors (views into the staging) into this worker's model."""
        return (reload if self._gkd_reload else load_in_place)(self, weights)

    def gkd_weight_status(self) -> dict[str, Any]:
        return self._gkd_weights.status()

    def gkd_apply_weights(self, version: int) -> int:
        return self._gkd_weights.apply(int(version))

    def gkd_discard_weights(self) -> None:
        self._gkd_weights.discard()

    def gkd_stop_weights(self) -> None:
        self._gkd_weights.stop()

    def gkd_set_logit_scale(self, factor: float) -> float:
        return set_logit_scale(self, factor)


# --- the gkd process's side ---------------------------------------------------------------------------------


def start_receivers(llm, channel: WeightChannel, spec: dict[str, torch.Tensor], reload_path: bool) -> list:
    """Start a receiver in every worker of ``llm``; ``channel.rank`` is the engine's first weight rank."""
    return llm.collective_rpc("gkd_start_weights", args=(asdict(channel), spec_rows(spec), reload_path))


def follow_workers(versioned: VersionedEngine, poll_s: float = POLL_S) -> None:
    """The rollout worker's weight thread when the engine's workers receive the weights themselves: start
    them, then poll their status between requests (the engine lock) and apply each version every rank
    staged. Raises when a rank's channel failed; returns when the sender closed the channel."""
    engine = versioned.engine
    with versioned._batch:
        started = engine.start_weight_receivers(versioned.channel)
    log.info("weight receivers started in the vLLM workers: %s", ", ".join(map(str, started)))
    while True:
        with versioned._batch.shared():  # a status poll runs beside the requests (between engine steps)
            ranks = engine.weight_status()
        failed = [f"rank {i}: {s['error']}" for i, s in enumerate(ranks) if s["state"] == "failed"]
        if failed:  # the other ranks leave too: this worker exits and is restarted
            engine.stop_weight_receivers()
            raise RuntimeError("a vLLM worker's weight channel failed: " + "; ".join(failed))
        if all(s["state"] == "closed" for s in ranks):
            versioned._notify(state="closed")
            log.info("weight channel closed by the sender; keeping version %d", versioned.version)
            return
        staged = {s["staged"] for s in ranks}
        if len(staged) == 1 and None not in staged:
            version = staged.pop()
            start = time.perf_counter()
            with versioned._batch:  # the batch boundary
                try:
                    engine.apply_staged(version)
                except Exception:  # ranks may now differ: no rank takes another version
                    engine.stop_weight_receivers()
                    raise
                versioned._notify(state="ready")
            log.info("applied policy version %d in %.3fs", version, time.perf_counter() - start)
            continue
        states = {s["state"] for s in ranks}
        if staged != {None} and "rejoining" in states:  # a rank lost the version its peers staged
            with versioned._batch:
                engine.discard_staged()
            log.warning("a vLLM worker re-joins the weight channel: the others drop their staged version")
        state = "rejoining" if "rejoining" in states else "ready" if states <= {"ready"} else versioned.state
        if state != versioned.state:
            versioned._notify(state=state)
        threading.Event().wait(poll_s)
