"""Weight sync from trainer rank 0 to every rollout worker: versioned, bucketed, single-shot, verified.

Group: :func:`init_weight_group` builds a process group of its own (TCPStore rendezvous; gloo on CPU, NCCL
on GPU) between trainer rank 0 (rank 0 here) and the rollout workers (ranks 1..N). It never touches
``torch.distributed``'s default group, which belongs to the trainer's torchrun world.

Protocol, all broadcasts from rank 0; nothing is pickled, metadata is JSON bytes:

1. Handshake, once: the metadata (names, the engine dtypes the weights are cast to, shapes, offsets, the
   bucket plan). Every receiver diffs it against the tensors its engine expects; then an all-reduce of
   per-rank status, so every rank fails together, the sender with each receiver's diff, before any weight
   moves.
2. Per sync, first through the channel's TCPStore, never in a collective: the sender announces the version
   under ``announce/<n>`` (n = 0, 1, ... counts announcements); a receiver waits for that key on its own
   clock (a heartbeat line every minute while idle), answers ``ready/<n>/<rank>`` when it can take the
   version; once every receiver is ready the sender sets ``go/<n>``, and only then do both sides post
   collectives. Nobody idles inside a broadcast, where NCCL's watchdog would abort the process after the
   group timeout, and a receiver that died before the transfer costs no collective: the sender writes
   ``reform`` into ``go/<n>`` instead and the survivors leave the group (:class:`ChannelReform`;
   ``gkd.weights.channel`` forms the next generation of the channel with the current workers).
3. Then a header ``int64 [magic, version, n_buckets, op]``; each bucket as one broadcast of exactly its
   bytes (verl sends the full bucket capacity every time) plus a 32-byte trailer ``int64 [version, index,
   kind, checksum]`` (and 32 bytes of MAC with a channel key); then an all-reduce of per-rank status.
   ``kind`` says which checksum: CRC-32 (host buffers, the C++ extension) or the device word sum
   (:func:`gkd.weights.native.device_checksum`, computed where a GPU bucket lives: no copy to the host, and
   on the sender no host sync). The receiver computes the same kind over its own bytes. With the run's channel
   key (``group.key``, :mod:`gkd.weights.membership`) the MAC is HMAC-SHA256 over the bucket's version, index
   and bytes, and it decides (a checksum catches corruption, not forgery); it is computed on host bytes,
   so a GPU bucket is copied down for it. A receiver that sees a bad checksum
   or MAC keeps its previous weights and raises :class:`WeightSyncError`; so does the sender.
4. ``close()`` announces ``stop``: receivers' ``receive()`` returns None; ``abandon()`` announces
   ``reform``: receivers' ``receive()`` raises :class:`ChannelReform`.

Floating-point weights are cast to the engine dtype (``dtype=``) as they are packed (FSDP2 shards before
they are gathered), so a bf16 engine receives bf16 bytes from fp32 master weights. Every wait has a timeout.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from threading import Lock

import torch
import torch.distributed as dist

from gkd.weights import native
from gkd.weights.flat import Bucket, FlatBuffer, MetadataMismatch, TensorMeta, diff_metas, plan_buckets
from gkd.weights.wire import (  # the channel's group, constants and wire helpers; public names re-exported
    _ABANDONED,
    _CHECK_BYTES,
    _CHECKSUM_NAMES,
    _MAGIC,
    _MAX_METADATA_BYTES,
    _OP_WEIGHTS,
    _REFORM,
    _STOP,
    _TRAILER_BYTES,
    CHECKSUMS,
    HEARTBEAT_S,
    PROTOCOL_VERSION,
    ChannelReform,
    NamedTensors,
    WeightGroup,
    WeightSyncError,
    _metadata_bytes,
    _parse_metadata_doc,
    _write_trailer,
    bucket_mac,
    init_weight_group,
    make_process_group,
    trailer_bytes,
)

__all__ = [
    "CHECKSUMS",
    "ChannelReform",
    "PROTOCOL_VERSION",
    "WeightGroup",
    "WeightReceiver",
    "WeightSender",
    "WeightSyncError",
    "init_weight_group",
    "make_process_group",
    "named_weights",
]

log = logging.getLogger("gkd.weights")


def named_weights(source: torch.nn.Module | NamedTensors) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs to sync: a module's parameters (a DDP wrapper's ``module.`` dropped), detached,
    or what a source object's own ``named_weights()`` lists (``gkd.trainer.lora.MergedWeights``: the base
    names)."""
    if isinstance(source, torch.nn.parallel.DistributedDataParallel):
        source = source.module
    if not isinstance(source, torch.nn.Module | Mapping) and hasattr(source, "named_weights"):
        return list(source.named_weights())
    if isinstance(source, torch.nn.Module):
        return [(n, p.detach()) for n, p in source.named_parameters()]
    return list(source.items() if isinstance(source, Mapping) else source)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _wire_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """What ``t`` travels as: floating-point tensors in ``dtype`` (the engine's), the rest as they are."""
    return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype


def _gather_to_root(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Full tensor of a DTensor on mesh rank 0 (None elsewhere), cast to its wire dtype first (a bf16
    engine: half the gather traffic). Dim-0 shards (FSDP2; HSDP: replicated across the first mesh dims)
    go through one ``gather`` to rank 0 within its shard group only; other placements fall back to
    ``full_tensor()`` (an all-gather)."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, coordinate = t.device_mesh, t.device_mesh.get_coordinate()
    if t.placements[-1] != Shard(0) or any(p != Replicate() for p in t.placements[:-1]):
        full = t.full_tensor()
        return full if not any(coordinate) else None
    if any(coordinate[:-1]):  # HSDP: another shard group holds the same tensor; the root's group sends it
        return None
    pg = mesh.get_group(mesh.ndim - 1)
    world, me = pg.size(), dist.get_rank(pg)
    rows = -(-t.shape[0] // world)  # torch.chunk's chunk size, which FSDP2 shards by
    local = t.to_local()
    padded = torch.zeros((rows, *t.shape[1:]), dtype=_wire_dtype(t, dtype), device=local.device)
    padded[: local.shape[0]].copy_(local)
    root = dist.get_global_rank(pg, 0)
    if me == 0:
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.gather(padded, pieces, dst=root, group=pg)
        return torch.cat(pieces)[: t.shape[0]]
    dist.gather(padded, None, dst=root, group=pg)
    return None


class WeightSender:
    """Sends a model's weights; constructed and called on *every* trainer rank.

    ``group`` is the weight group on trainer rank 0 and ``None`` on the other trainer ranks. With plain
    tensors (single process, DDP) only rank 0 does anything. With FSDP2 (DTensor parameters) every trainer
    rank takes part in gathering each bucket's tensors to rank 0 (``gather``, not all-gather); every rank
    must then pass the same ``dtype`` (it decides the bucket plan).

    ``source``: a module, named tensors, or an object with ``named_weights()`` (names, shapes and dtypes of
    what is sent) and ``materialize(name, tensor)`` (the value to send, computed as its bucket is packed;
    ``gkd.trainer.lora.MergedWeights`` merges LoRA adapters there).
    ``dtype``: the engines' dtype; floating-point weights are cast to it while packed (None: as they are).
    ``checksum``: "auto" (the device word sum for GPU buckets, CRC-32 for host buckets), "wsum" or "crc32".
    ``ready_timeout``: how long :meth:`wait_ready` waits for every receiver to be ready for a version (a
    receiver first applies its previous version between two requests).

    Peak memory, FSDP2: rank 0 holds its shard + the gathered full tensors of one bucket + two bucket
    buffers (one being broadcast while the next is packed), i.e. shard + 3 x ``bucket_bytes`` (+ twice the
    largest tensor while it is gathered, if that exceeds a bucket); other trainer ranks hold their shard + one
    padded shard of one tensor. Unsharded (DDP): the model + 2 x ``bucket_bytes`` on rank 0 only.
    """

    def __init__(
        self,
        group: WeightGroup | None,
        source: torch.nn.Module | NamedTensors,
        *,
        dtype: torch.dtype | None = None,
        bucket_bytes: int = 256 << 20,
        alignment: int = 256,
        pin: bool = False,
        checksum: str = "auto",
        ready_timeout: timedelta = timedelta(minutes=30),
    ):
        if checksum not in ("auto", *CHECKSUMS):
            raise ValueError(f"checksum must be auto, {' or '.join(CHECKSUMS)}; got {checksum!r}")
        self.group = group
        self._source = source
        self.dtype = dtype
        tensors = named_weights(source)
        self._sharded = any(_is_dtensor(t) for _, t in tensors)
        metas = [TensorMeta(n, _wire_dtype(t, dtype), tuple(t.shape)) for n, t in tensors]
        self.buckets = plan_buckets(metas, bucket_bytes, alignment)
        self.alignment = alignment
        self.ready_timeout = ready_timeout
        self.bucket_hook: Callable[[int, torch.Tensor], None] | None = None  # test hook, see tests
        self._buffers: list[torch.Tensor] = []
        self._announced = 0  # announcements made (versions, stop, reform)
        self._ready_version: int | None = None  # announced, every receiver ready, not yet sent
        self._go_pending: int | None = None  # an announcement whose go/<n> is not written yet
        self.checksum = checksum
        if group is not None:
            if checksum == "auto":
                self.checksum = "wsum" if group.device.type == "cuda" else "crc32"
            biggest = max((b.nbytes for b in self.buckets), default=0) + _TRAILER_BYTES
            for _ in range(min(2, len(self.buckets))):
                self._buffers.append(FlatBuffer.empty([], biggest, pin=pin, device=group.device).buffer)

    def handshake(self) -> None:
        """Send the metadata; raise :class:`WeightSyncError` with every receiver's diff if any rejects it."""
        if self.group is None:
            return
        g = self.group
        meta = _metadata_bytes(self.buckets, self.alignment, self.dtype, mac=g.key is not None)
        payload = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
        g.wait(
            g.broadcast(torch.tensor([payload.numel()], dtype=torch.int64, device=g.device)), "handshake size"
        )
        g.wait(g.broadcast(payload.to(g.device)), "handshake metadata")
        failed = g.agree(True, "handshake status")
        if failed:
            diffs = [f"rank {r}: {g.store.get(f'handshake/{r}').decode()}" for r in failed]
            raise WeightSyncError("rollout workers rejected the weight metadata: " + " | ".join(diffs))

    def _announce(self, value: str) -> int:
        n = self._announced
        self.group.store.set(f"announce/{n}", value)
        self._announced += 1
        return n

    def wait_ready(self, version: int) -> None:
        """Announce ``version`` in the store and wait (``ready_timeout``, or until ``group.liveness``
        raises) until every receiver is ready to take it, then tell them to go; :meth:`sync` does this
        itself when it was not called first. No-op off rank 0. After a failure (:class:`WeightSyncError`)
        this group is unusable: :meth:`abandon` it (ready receivers wait for their go)."""
        g = self.group
        if g is None or self._ready_version == version:
            return
        n = self._announce(str(version))
        self._go_pending = n
        keys = [f"ready/{n}/{r}" for r in range(1, g.world_size)]
        g.await_keys(
            keys, self.ready_timeout, f"rollout workers ready for version {version}", check=g.liveness
        )
        g.store.set(f"go/{n}", "go")
        self._go_pending = None
        self._ready_version = version

    def rebind(self, group: WeightGroup) -> None:
        """Use ``group`` (the channel's next generation) from now on; :meth:`handshake` it next."""
        self.group, self._announced, self._ready_version, self._go_pending = group, 0, None, None

    def abandon(self) -> None:
        """Give up this group (a member died): receivers waiting for a go or for the next announcement
        raise :class:`ChannelReform` and join the channel's next generation. Never raises: the store may
        be all that still works."""
        g = self.group
        if g is None:
            return
        try:
            g.store.set(_ABANDONED, "1")  # receivers inside a collective of this group leave it
            if self._go_pending is not None:
                g.store.set(f"go/{self._go_pending}", _REFORM)
            self._announce(_REFORM)
        except Exception as exc:  # noqa: BLE001 - best effort; the next generation has its own store prefix
            log.warning("weight channel: could not announce the re-form in the old group: %s", exc)
        self._ready_version, self._go_pending = None, None
        try:
            g.pg.abort()  # peers blocked in a collective with this rank get an error now, not at the timeout
        except Exception as exc:  # noqa: BLE001
            log.debug("weight channel: abort of the old group: %s", exc)

    def sync(self, version: int) -> dict[str, float]:
        """Send version ``version`` of the weights. Returns {"bytes", "buckets", "seconds"} on rank 0."""
        start = time.perf_counter()
        if self.group is None and not self._sharded:
            return {"bytes": 0.0, "buckets": 0.0, "seconds": 0.0}
        tensors = dict(named_weights(self._source))
        # a source may compute a tensor's value as it is packed (a LoRA merge: no second model copy)
        value = getattr(self._source, "materialize", lambda name, t: t)
        g = self.group
        if g is not None:
            self.wait_ready(version)
            self._ready_version = None
        # Once the other FSDP ranks were told to sync they take part in every bucket's gather, so rank 0
        # gathers every bucket too, even after its broadcast failed, and raises only then: the other
        # ranks are back at their command loop and the failure path (checkpoint, stop) can use the group.
        failure: WeightSyncError | None = None
        in_flight: list[dist.Work | None] = [None] * len(self._buffers)
        sent = 0
        if g is not None:
            try:
                header = torch.tensor([_MAGIC, version, len(self.buckets), _OP_WEIGHTS], dtype=torch.int64)
                g.wait(g.broadcast(header.to(g.device)), f"version {version} header")
            except RuntimeError as exc:  # WeightSyncError, or gloo refusing the post at once
                failure = (
                    exc if isinstance(exc, WeightSyncError) else WeightSyncError(f"version {version}: {exc}")
                )
        for bucket in self.buckets:
            full = {}
            for m in bucket.metas:
                t = value(m.name, tensors[m.name])
                full[m.name] = _gather_to_root(t, self.dtype) if self._sharded else t
            if g is None or failure is not None:
                if failure is not None and not self._sharded:
                    break
                continue  # a non-root FSDP rank only helps gather; a failed root only gathers
            try:
                slot = bucket.index % len(self._buffers)
                if in_flight[slot] is not None:  # the buffer's previous bucket must have left
                    g.wait(in_flight[slot], f"version {version} bucket {bucket.index - len(self._buffers)}")
                buf = self._buffers[slot][: bucket.nbytes + trailer_bytes(g.key)]
                FlatBuffer(buf, bucket.metas).write(full, cast=True)
                _write_trailer(buf, bucket.nbytes, version, bucket.index, self.checksum, g.key)
                if self.bucket_hook is not None:
                    self.bucket_hook(bucket.index, buf)
                in_flight[slot] = g.broadcast(buf)
                sent += buf.numel()
            except RuntimeError as exc:
                failure = (
                    exc if isinstance(exc, WeightSyncError) else WeightSyncError(f"version {version}: {exc}")
                )
        if g is None:
            return {"bytes": 0.0, "buckets": 0.0, "seconds": time.perf_counter() - start}
        if failure is not None:
            raise failure
        for i, work in enumerate(in_flight):
            if work is not None:
                g.wait(work, f"version {version} bucket slot {i}")
        failed = g.agree(True, f"version {version} status")
        if failed:
            why = [f"rank {r}: {g.store.get(f'sync/{version}/{r}').decode()}" for r in failed]
            raise WeightSyncError(
                f"version {version} was rejected (receivers keep their previous weights): " + " | ".join(why)
            )
        return {
            "bytes": float(sent),
            "buckets": float(len(self.buckets)),
            "seconds": time.perf_counter() - start,
        }

    def close(self) -> None:
        """Tell the receivers there are no more versions (their ``receive()`` returns ``None``)."""
        if self.group is not None:
            self._announce(_STOP)


class WeightReceiver:
    """Receives weights on a rollout worker, double-buffered against the engine's own weights.

    ``expected``: what the engine holds, as named tensors, a module, or ``TensorMeta``s. :meth:`receive`
    waits (in the store, not in a collective) for the next version, stages it whole and verifies every
    bucket's checksum while the next bucket is still arriving; the engine is untouched, so it can keep
    generating with the old version (:meth:`receive_async` does this on a background thread). :meth:`apply`
    then copies the staged version into the engine at a batch boundary. A version is applied whole or not at
    all, which is why buckets are staged rather than copied into the engine as they arrive.

    ``staging``: where the staged copy lives. "host" (default): host memory, page-locked when ``pin``
    (default: when CUDA is available) so the engine load is an asynchronous copy; with a GPU channel each
    bucket lands in one of two device bucket buffers, is verified there and copied down. "device": on the
    channel's device (a GPU copy of the whole model next to the engine's own; buckets land in place).
    ``bounce``: force the bucket-buffer path (default: when the staging memory is not on the channel's
    device); tests use it to run the GPU path with CPU tensors.

    Memory: one full copy of the weights in the engine dtype (the staging), plus two bucket buffers on the
    channel's device when bouncing. ``idle_timeout``: the longest wait for the next version announcement
    (default: the group's timeout), with a log line every ``heartbeat_s``.
    """

    def __init__(
        self,
        group: WeightGroup,
        expected: torch.nn.Module | NamedTensors | Sequence[TensorMeta],
        *,
        staging: str = "host",
        pin: bool | None = None,
        bounce: bool | None = None,
        idle_timeout: timedelta | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        if staging not in ("host", "device"):
            raise ValueError(f"staging must be 'host' or 'device', got {staging!r}")
        self.group = group
        items = list(expected) if not isinstance(expected, torch.nn.Module | Mapping) else None
        if items and isinstance(items[0], TensorMeta):
            self.expected = items
        else:
            self.expected = [
                TensorMeta(n, t.dtype, tuple(t.shape))
                for n, t in named_weights(expected if items is None else items)
            ]
        self.staging_device = torch.device("cpu") if staging == "host" else group.device
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.bounce = self.staging_device != group.device if bounce is None else bounce
        self.idle_timeout = idle_timeout or group.timeout
        self.heartbeat_s = heartbeat_s
        self.buckets: list[Bucket] = []
        self.sender_dtype: str | None = None
        self._staging: list[FlatBuffer] = []
        self._slots: list[torch.Tensor] = []
        self._announced = 0  # announcements consumed
        self._trailer = _CHECK_BYTES  # a bucket's trailer size, known from the handshake
        self.staged_version: int | None = None
        self.applied_version: int | None = None
        self._handshaken = False
        self._lock = Lock()
        self._executor: ThreadPoolExecutor | None = None

    def handshake(self) -> None:
        """Receive the metadata and check it against ``expected``; raise with the diff on mismatch."""
        g = self.group
        size = torch.zeros(1, dtype=torch.int64, device=g.device)
        g.wait(g.broadcast(size), "handshake size")
        n = int(size.item())
        if not 0 < n <= _MAX_METADATA_BYTES:
            raise WeightSyncError(f"weight metadata of {n} bytes is outside (0, {_MAX_METADATA_BYTES}]")
        payload = torch.zeros(n, dtype=torch.uint8, device=g.device)
        g.wait(g.broadcast(payload), "handshake metadata")
        problem = None
        try:
            raw = payload.cpu().numpy().tobytes()
            buckets, cast = _parse_metadata_doc(raw)
            if bool(json.loads(raw).get("mac")) != (g.key is not None):
                raise WeightSyncError(
                    "the trainer and this worker disagree on bucket MACs: give both the same secret "
                    "(rollout.auth_secret_file for the trainer, --auth-secret-file for the rollout) "
                    "or neither"
                )
            diff = diff_metas(self.expected, [m for b in buckets for m in b.metas])
            if diff is not None:
                hint = (
                    f" (the trainer casts floating weights to {cast}: start the engine in it)" if cast else ""
                )
                problem = f"sender's weights do not match this engine: {diff}{hint}"
        except (ValueError, KeyError, TypeError, WeightSyncError) as exc:
            problem = f"unreadable weight metadata: {exc}"
        if problem is not None:  # read by the sender when the all-reduce names this rank
            g.store.set(f"handshake/{g.rank}", problem)
        failed = g.agree(problem is None, "handshake status")
        if problem is not None:
            raise MetadataMismatch(problem)
        if failed:
            raise WeightSyncError(f"weight handshake failed on ranks {failed}; see their errors")
        self.buckets, self.sender_dtype = buckets, cast
        pin = self.pin and self.staging_device.type == "cpu"
        self._trailer = trailer_bytes(g.key)
        self._staging = [
            FlatBuffer.empty(b.metas, b.nbytes + self._trailer, pin=pin, device=self.staging_device)
            for b in buckets
        ]
        if self.bounce:
            biggest = max((b.nbytes for b in buckets), default=0) + self._trailer
            self._slots = [
                torch.zeros(biggest, dtype=torch.uint8, device=g.device) for _ in range(min(2, len(buckets)))
            ]
        self._handshaken = True

    def _next_announcement(self, timeout: timedelta | None) -> str:
        g, n = self.group, self._announced
        key = f"announce/{n}"
        g.await_keys(
            [key], timeout or self.idle_timeout, "waiting for the next version", heartbeat_s=self.heartbeat_s
        )
        self._announced += 1
        return g.store.get(key).decode()

    def receive(self, timeout: timedelta | None = None) -> int | None:
        """Block until the next version is staged and verified; return it, or ``None`` when the sender
        closed. ``timeout`` bounds the wait for the version's announcement (default ``idle_timeout``)."""
        if not self._handshaken:
            raise WeightSyncError("call handshake() before receive()")
        g = self.group
        with self._lock:
            value = self._next_announcement(timeout)
            if value == _STOP:
                return None
            if value == _REFORM:
                raise ChannelReform("the sender re-forms the weight channel")
            n = self._announced - 1
            g.store.set(f"ready/{n}/{g.rank}", "1")
            # no collective until every receiver is ready: a dead one makes the sender say "reform" here
            g.await_keys([f"go/{n}"], self.idle_timeout, f"waiting for the go of version {value}")
            if g.store.get(f"go/{n}").decode() == _REFORM:
                raise ChannelReform(f"the sender re-forms the weight channel before version {value}")
            header = torch.zeros(4, dtype=torch.int64, device=g.device)
            g.wait(g.broadcast(header), "version header")
            magic, version, n_buckets, op = header.tolist()
            if magic != _MAGIC or op != _OP_WEIGHTS or str(version) != value:
                raise WeightSyncError(
                    f"bad version header {header.tolist()} for announced version {value} "
                    "(not from a gkd WeightSender?)"
                )
            if n_buckets != len(self.buckets):
                raise WeightSyncError(
                    f"version {version} has {n_buckets} buckets, handshake said {len(self.buckets)}"
                )
            self.staged_version = None  # the staging buffers are being overwritten
            bad = self._receive_bounced(version) if self.bounce else self._receive_in_place(version)
            if bad:  # read by the sender when the all-reduce names this rank
                g.store.set(f"sync/{version}/{g.rank}", "; ".join(bad))
            failed = g.agree(not bad, f"version {version} status")
            if bad:
                raise WeightSyncError(
                    f"version {version} rejected, keeping version {self.applied_version}: " + "; ".join(bad)
                )
            if failed:
                raise WeightSyncError(
                    f"version {version} was rejected by ranks {failed}; keeping version "
                    f"{self.applied_version}"
                )
            self.staged_version = version
            return version

    def _receive_in_place(self, version: int) -> list[str]:
        # Post every bucket at once: bucket i is verified while later ones are still arriving.
        g = self.group
        works = [g.broadcast(fb.buffer) for fb in self._staging]
        bad = []
        for bucket, fb, work in zip(self.buckets, self._staging, works, strict=True):
            g.wait(work, f"version {version} bucket {bucket.index}")
            bad += self._verify(version, bucket, fb.buffer, g.key)
        return bad

    def _receive_bounced(self, version: int) -> list[str]:
        # Two bucket buffers on the channel's device: one arrives while the other is verified and copied
        # to staging. Stream order makes reuse safe: on CUDA, NCCL's stream waits for the current stream,
        # where the copy out of the slot was queued.
        g = self.group
        n_slots = len(self._slots)
        works = [
            g.broadcast(self._slots[i][: b.nbytes + self._trailer])
            for i, b in enumerate(self.buckets[:n_slots])
        ]
        bad = []
        for bucket, fb in zip(self.buckets, self._staging, strict=True):
            slot = self._slots[bucket.index % n_slots]
            g.wait(works[bucket.index], f"version {version} bucket {bucket.index}")
            landed = slot[: bucket.nbytes + self._trailer]
            bad += self._verify(version, bucket, landed, g.key)
            fb.buffer.copy_(landed, non_blocking=fb.pinned)
            following = bucket.index + n_slots
            if following < len(self.buckets):
                works.append(g.broadcast(slot[: self.buckets[following].nbytes + self._trailer]))
        if g.device.type == "cuda":
            torch.cuda.current_stream(g.device).synchronize()  # staging complete before apply reads it
        return bad

    @staticmethod
    def _verify(version: int, bucket: Bucket, buf: torch.Tensor, key: bytes | None = None) -> list[str]:
        # The trailer follows the exact payload, so it may sit at any byte offset: copy before the view.
        trailer = buf[bucket.nbytes : bucket.nbytes + _CHECK_BYTES].cpu().clone().view(torch.int64)
        if key is not None:  # with the channel key, the MAC decides (a checksum can be forged to match)
            tag = bytes(buf[bucket.nbytes + _CHECK_BYTES : bucket.nbytes + _TRAILER_BYTES].cpu().numpy())
            if not hmac.compare_digest(tag, bucket_mac(key, buf, bucket.nbytes, version, bucket.index)):
                return [f"bucket {bucket.index} fails its MAC (not sent with this run's channel token)"]
        got_version, index, kind, sent = trailer.tolist()
        if (got_version, index) != (version, bucket.index):
            return [f"bucket {bucket.index} is tagged version {got_version} bucket {index}"]
        name = _CHECKSUM_NAMES.get(kind)
        if name == "wsum":  # where the bytes are: on a GPU, no copy to the host
            actual = int(native.device_checksum(buf, 0, bucket.nbytes).item())
        elif name == "crc32":
            actual = native.checksum(buf, 0, bucket.nbytes)
        else:
            return [f"bucket {bucket.index} has unknown checksum kind {kind}"]
        if actual != sent:
            return [f"bucket {bucket.index} {name} checksum {actual:#x} != sent {sent:#x}"]
        return []

    def receive_async(self, timeout: timedelta | None = None) -> Future:
        """:meth:`receive` on a background thread; the engine keeps running with its current weights."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gkd-weights")
        return self._executor.submit(self.receive, timeout)

    def apply(self, engine) -> int:
        """Copy the staged version into ``engine`` and return its number.

        ``engine``: an object with ``load_weights(iterable of (name, tensor))`` (gets views into the staging
        buffers and must copy them), a module, or named tensors (filled strictly, threaded).
        """
        with self._lock:
            if self.staged_version is None:
                raise WeightSyncError("no verified version is staged; call receive() first")
            if hasattr(engine, "load_weights") and callable(engine.load_weights):
                engine.load_weights((n, t) for fb in self._staging for n, t in fb.unpack().items())
            else:
                dest = dict(named_weights(engine))
                diff = diff_metas(self.expected, [TensorMeta.of(n, t) for n, t in dest.items()])
                if diff is not None:
                    raise MetadataMismatch(f"engine does not match the received weights: {diff}")
                for fb in self._staging:
                    fb.copy_into({m.name: dest[m.name] for m in fb.metas})
                if any(t.is_cuda for t in dest.values()):  # pinned copies are asynchronous, and the next
                    torch.cuda.synchronize()  # receive overwrites the staging from another stream or gloo
            self.applied_version = self.staged_version
            return self.applied_version

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
