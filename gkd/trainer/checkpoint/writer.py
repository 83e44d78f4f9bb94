"""Checkpoints off the training critical path (``trainer.async_save``).

:meth:`CheckpointWriter.save` takes what :func:`gkd.trainer.checkpoint.save_checkpoint` takes, copies every
tensor into host memory (buffers reused from the previous save when the shapes match, so steady-state saves
allocate nothing), and writes that copy on a background thread with the same atomic commit (temporary folder,
fsync, rename, then pruning to ``keep_last``). Training goes on while the files are written.

- One write at a time: the next save first waits for the previous one.
- A write that fails is never lost: the next :meth:`~CheckpointWriter.save`, :meth:`~CheckpointWriter.poll`
  (the trainer calls it every step) or :meth:`~CheckpointWriter.wait` raises :class:`CheckpointError`
  naming the step and the cause; the previous complete checkpoint stays the newest.
- The end of training and every exit path wait for the pending write (:meth:`~CheckpointWriter.close`).

With ``background=False`` it is :func:`~gkd.trainer.checkpoint.save_checkpoint`: the files are written before
``save`` returns, from the live tensors.

Sharded (FSDP2) students: :meth:`~CheckpointWriter.save_sharded`, called by every rank, writes each
rank's shards with ``torch.distributed.checkpoint`` (``dcp.async_save`` in the background: each rank copies
only its own shards to host memory); rank 0's thread commits once every rank's shards are written. Every
rank then has a pending write that its next save, ``wait`` or ``close`` collects.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from gkd.trainer.checkpoint import (
    CheckpointError,
    Snapshot,
    begin_sharded,
    checkpoint_root,
    finish_sharded,
    make_trainer_state,
    sharded_tmp,
    snapshot,
    write_snapshot,
)
from gkd.trainer.checkpoint.prune import weights_finite

log = logging.getLogger("gkd.checkpoint")

__all__ = ["CheckpointWriter", "HostCopy"]


class HostCopy:
    """Copies nested dicts / lists / tuples of tensors into CPU tensors it keeps, one per position in the
    structure, reused by the next call when shape and dtype match (a copy, never an alias of the input).
    Other values are returned as they are (they must be immutable: numbers, strings, None)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[Hashable, ...], torch.Tensor] = {}

    def __call__(self, obj: Any, key: tuple[Hashable, ...] = ()) -> Any:
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            buf = self.buffers.get(key)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                # contiguous; pinned for GPU sources, so the device-to-host copy runs at full speed
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
                self.buffers[key] = buf
            buf.copy_(src)
            return buf
        if isinstance(obj, dict):
            return {k: self(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self(v, (*key, i)) for i, v in enumerate(obj))
        return obj

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class CheckpointWriter:
    """``save(output_dir, step, **save_checkpoint kwargs)``: a checkpoint written in the background
    (``background=True``) or before returning; ``poll()`` / ``wait()`` / ``close()`` surface a failed
    background write. Used on the rank that writes (trainer rank 0)."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._copy = HostCopy()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gkd-checkpoint") if background else None
        self._pending: Future | None = None
        self._pending_path: Path | None = None

    def save(self, output_dir: str | os.PathLike, step: int, *, keep_last: int = 2, **kwargs: Any) -> Path:
        """Save step ``step`` (kwargs: :func:`gkd.trainer.checkpoint.save_checkpoint`'s); returns its final
        path, which exists once the write is done (at once when not in the background). Waits for the previous
        write first and raises its failure."""
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1")
        self.wait()
        path = checkpoint_root(output_dir) / f"step_{int(step):06d}"
        if self._pool is None:
            write_snapshot(output_dir, snapshot(step, **kwargs), keep_last=keep_last)
            return path
        t0 = time.perf_counter()
        state = snapshot(step, copy=self._copy, **kwargs)
        copied = time.perf_counter() - t0
        log.info(
            "checkpoint %s: state copied to host memory in %.2fs (%.0f MB); writing in the background",
            path.name,
            copied,
            self._copy.nbytes / 1e6,
        )
        self._pending = self._pool.submit(self._write, output_dir, state, keep_last)
        self._pending_path = path
        return path

    def save_sharded(
        self,
        output_dir: str | os.PathLike,
        step: int,
        *,
        model,
        optimizer=None,
        frozen: bool = True,
        keep_last: int = 2,
        rank0: dict[str, Any] | None = None,
    ) -> Path:
        """Every rank: write its shards of ``model`` / ``optimizer`` (``frozen=False``: trainable tensors
        only, a LoRA adapter) into step ``step``'s checkpoint. ``rank0`` (rank 0 only, None elsewhere): the
        small state, as :meth:`save` takes it (``lr_scheduler``, ``data_state``, ``scheduler_state``,
        ``rng_states``, ``config_yaml``); rank 0 writes it and commits."""
        import torch.distributed as dist

        from gkd.trainer.checkpoint.sharded import checkpoint_group, save_sharded_state

        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1")
        self.wait()
        path = checkpoint_root(output_dir) / f"step_{int(step):06d}"
        tmp, failure = sharded_tmp(output_dir, step), None
        if rank0 is not None:  # taken now: the live objects change once this returns
            rank0 = dict(rank0)
            config_yaml = rank0.pop("config_yaml", "")
            trainer_state = make_trainer_state(step, **rank0, optimizer_format="dcp")
            try:
                begin_sharded(output_dir, step)
            except (CheckpointError, OSError) as e:
                failure = e
        ok = torch.tensor([int(failure is None)])
        dist.broadcast(ok, 0, group=checkpoint_group())  # also the barrier: the folder exists for everyone
        finite = torch.tensor([int(weights_finite(model.parameters()))])  # this rank's shards, for pruning
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=checkpoint_group())
        if not ok.item():
            why = failure or "see rank 0's log"
            raise CheckpointError(f"{path}: rank 0 could not start the checkpoint ({why})")
        t0 = time.perf_counter()
        upload = save_sharded_state(tmp, model, optimizer, frozen=frozen, background=self.background)
        if self.background:
            log.info("checkpoint %s: shards copied to host memory in %.2fs; writing in the background",
                     path.name, time.perf_counter() - t0)  # fmt: skip
        if rank0 is None:
            self._pending, self._pending_path = upload, path
            if not self.background:
                self.wait()
            return path

        def commit() -> Path:
            try:
                upload.result()
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return finish_sharded(output_dir, step, trainer_state, config_yaml, lora=not frozen,
                                  keep_last=keep_last, weights_finite=bool(finite.item()))  # fmt: skip

        if self._pool is None:
            commit()
            return path
        self._pending, self._pending_path = self._pool.submit(commit), path
        return path

    @staticmethod
    def _write(output_dir: str | os.PathLike, state: Snapshot, keep_last: int) -> Path:
        t0 = time.perf_counter()
        path = write_snapshot(output_dir, state, keep_last=keep_last)
        log.info("checkpoint %s written in %.2fs", path, time.perf_counter() - t0)
        return path

    @property
    def pending(self) -> bool:
        """A background write has been started and its outcome not yet collected."""
        return self._pending is not None

    def poll(self) -> None:
        """Raise the failure of a background write that has finished; never blocks."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> Path | None:
        """Block until the pending write is done; its path (None if none was pending). A failed write
        raises :class:`CheckpointError` (once)."""
        pending, path = self._pending, self._pending_path
        if pending is None:
            return None
        self._pending = self._pending_path = None
        try:
            return pending.result()
        except Exception as e:
            raise CheckpointError(
                f"the checkpoint {path} could not be written ({type(e).__name__}: {e}); nothing was "
                "committed, the previous complete checkpoint stays the newest"
            ) from e

    def close(self) -> None:
        """Wait for the pending write (raising its failure) and stop the thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
