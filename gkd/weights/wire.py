"""The weight channel's wire: its process group (:class:`WeightGroup`, :func:`init_weight_group`), the
protocol constants, the per-bucket trailer and the handshake metadata. :mod:`gkd.weights.transfer` (sender and
receiver) builds on it; the protocol itself is described there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gkd.weights import native
from gkd.weights.flat import DTYPES, Bucket, TensorMeta
from gkd.weights.membership import mac

log = logging.getLogger("gkd.weights")

PROTOCOL_VERSION = 2
_MAGIC = 0x676B6477  # "gkdw"
_OP_WEIGHTS = 0
_STOP = "stop"
_REFORM = "reform"
_ABANDONED = "abandoned"  # set by the sender in an abandoned group's store: receivers leave its collectives
_CHECK_BYTES = 32  # int64 [version, index, kind, checksum]
_MAC_BYTES = 32  # with a channel key: HMAC-SHA256 of the bucket after the checksum
_TRAILER_BYTES = _CHECK_BYTES + _MAC_BYTES  # the most a trailer takes (buffers are sized for it)
_MAX_METADATA_BYTES = 64 << 20
# trailer kinds: crc32 on host bytes (C++/zlib), wsum (gkd.weights.native.device_checksum) where the bytes
# live
CHECKSUMS = {"crc32": 0, "wsum": 1}
_CHECKSUM_NAMES = {v: k for k, v in CHECKSUMS.items()}
HEARTBEAT_S = 60.0

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A sync or handshake failed on some rank; receivers keep the weights they had."""


class ChannelReform(WeightSyncError):
    """The sender abandoned this group (a member died): join the channel's next generation."""


@dataclass
class WeightGroup:
    """The weight channel: a process group of trainer rank 0 (rank 0) and the rollout workers."""

    pg: dist.ProcessGroup  # gloo or NCCL backend object, not registered with torch.distributed
    store: dist.Store
    rank: int
    world_size: int
    device: torch.device  # where bucket buffers live: cpu for gloo, cuda for NCCL
    timeout: timedelta
    # raises WeightSyncError when a member is known dead (gkd.weights.channel: missed heartbeats); polled
    # while the sender waits in the store for the receivers
    liveness: Callable[[], None] | None = None
    # the run's channel key (gkd.weights.membership): every bucket carries a MAC with it; None: checksums only
    key: bytes | None = None

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.pg.broadcast([tensor], opts)

    def wait(self, work: dist.Work, what: str, timeout: timedelta | None = None) -> None:
        """Wait for a collective. A receiver polls it and watches the store meanwhile: when the sender
        abandoned the group (:meth:`WeightSender.abandon`: a member died) it raises :class:`ChannelReform`
        at once; a gloo peer otherwise only notices at ``timeout``, since an abandoned group's
        connections to the living stay open."""
        timeout = left = timeout or self.timeout
        if self.rank != 0:  # what is left of the timeout once the op completed (or none is left)
            left = timedelta(seconds=max(0.001, self._watch(work, what, timeout)))
        try:
            work.wait(left)
        except RuntimeError as exc:
            raise WeightSyncError(
                f"weight group rank {self.rank}: {what} failed or timed out after "
                f"{timeout.total_seconds():.0f}s: {exc}"
            ) from exc

    def _watch(self, work: dist.Work, what: str, timeout: timedelta) -> float:
        """Poll ``work`` until it completes or ``timeout`` passes; returns the seconds left."""
        deadline = time.monotonic() + timeout.total_seconds()
        pause, checked = 0.0005, time.monotonic()
        try:
            while not work.is_completed() and time.monotonic() < deadline:
                if time.monotonic() - checked >= 0.05:
                    checked = time.monotonic()
                    if self.store.check([_ABANDONED]) and _genuine(self.store, _ABANDONED):
                        raise ChannelReform(f"the sender abandoned the weight channel during the {what}")
                time.sleep(pause)
                pause = min(pause * 2, 0.005)
            return deadline - time.monotonic()
        except dist.DistNetworkError as exc:
            raise WeightSyncError(
                f"weight group rank {self.rank}: the channel's store is gone (trainer rank 0 exited?) "
                f"during the {what}: {exc}"
            ) from exc

    def await_keys(
        self,
        keys: Sequence[str],
        timeout: timedelta,
        what: str,
        *,
        heartbeat_s: float | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        """Wait until every key of ``keys`` is set in the channel's store (polled: no collective is posted
        meanwhile). A log line every ``heartbeat_s`` while waiting; :class:`WeightSyncError` naming the
        missing keys after ``timeout``, or at once when the store's host (trainer rank 0) is gone.
        ``check`` is called about twice a second meanwhile and may raise (a member known dead)."""
        if not keys:  # a channel without receivers (world size 1)
            return
        start = time.monotonic()
        beat, pause = start + (heartbeat_s or float("inf")), 0.001
        checked = start
        try:
            while not self.store.check(list(keys)):
                now = time.monotonic()
                if check is not None and now - checked >= 0.5:
                    checked = now
                    check()
                if now - start >= timeout.total_seconds():
                    missing = [k for k in keys if not self.store.check([k])]
                    raise WeightSyncError(
                        f"weight group rank {self.rank}: {what}: not there after "
                        f"{timeout.total_seconds():g}s (missing {', '.join(missing)})"
                    )
                if now >= beat:
                    log.info("weight channel rank %d: %s (idle %.0f s)", self.rank, what, now - start)
                    beat += heartbeat_s or float("inf")
                time.sleep(pause)
                pause = min(pause * 2, 0.05)  # a version is noticed within 50 ms
        except dist.DistNetworkError as exc:
            raise WeightSyncError(
                f"weight group rank {self.rank}: the channel's store is gone (trainer rank 0 exited?) "
                f"while {what}: {exc}"
            ) from exc

    def agree(self, ok: bool, what: str) -> list[int]:
        """All-reduce one status per rank; returns the ranks that reported failure."""
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        flags[self.rank] = 0 if ok else 1
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self.wait(self.pg.allreduce([flags], opts), what)
        return [r for r, f in enumerate(flags.tolist()) if f]


def init_weight_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    *,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> WeightGroup:
    """Join the weight channel: ``rank`` 0 is trainer rank 0 (it hosts the TCPStore on ``host:port``),
    ranks ``1..world_size-1`` are rollout workers. ``backend``: "gloo" or "nccl" (default: NCCL when CUDA
    is available). ``timeout`` bounds the rendezvous and every collective; collectives are only posted when
    both sides are ready (see the module docstring), so it need not cover idle time between versions."""
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore("gkd_weights/", store)
    pg, device = make_process_group(prefixed, host, rank, world_size, backend, timeout)
    return WeightGroup(pg, store, rank, world_size, device, timeout)


def make_process_group(
    store: dist.Store, host: str, rank: int, world_size: int, backend: str | None, timeout: timedelta
) -> tuple[dist.ProcessGroup, torch.device]:
    """A gloo or NCCL process group over ``store`` (not registered with ``torch.distributed``) and the
    device its buffers live on. ``host``: the store's host (loopback binds gloo to loopback too)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        # Loopback rendezvous: bind gloo there too (hostname resolution may pick an unreachable address).
        local = host in ("127.0.0.1", "localhost")
        opts._devices = [
            dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
            if local
            else dist.ProcessGroupGloo.create_default_device()
        ]
        opts._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, world_size, opts), torch.device("cpu")
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        device = torch.device("cuda", torch.cuda.current_device())
        return dist.ProcessGroupNCCL(store, rank, world_size, opts), device
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


def _write_trailer(
    buf: torch.Tensor, nbytes: int, version: int, index: int, kind: str, key: bytes | None = None
) -> None:
    """Checksum ``buf[:nbytes]`` and write the trailer after it. The word sum is computed and written on
    the buffer's device with no host sync (a GPU sender does not wait for its own kernels). With ``key``
    the trailer also carries :func:`bucket_mac` (computed on host bytes: a GPU bucket is copied down)."""
    trailer = torch.empty(4, dtype=torch.int64, device=buf.device)
    for i, value in enumerate((version, index, CHECKSUMS[kind])):
        trailer[i].fill_(value)  # device-side fills: torch.tensor(...).to(cuda) would sync
    if kind == "wsum":
        trailer[3].copy_(native.device_checksum(buf, 0, nbytes))
    else:
        trailer[3].fill_(native.checksum(buf, 0, nbytes))
    buf[nbytes : nbytes + _CHECK_BYTES].copy_(trailer.view(torch.uint8))
    if key is not None:
        tag = torch.frombuffer(bytearray(bucket_mac(key, buf, nbytes, version, index)), dtype=torch.uint8)
        buf[nbytes + _CHECK_BYTES : nbytes + _TRAILER_BYTES].copy_(tag)


def trailer_bytes(key: bytes | None) -> int:
    """A bucket's trailer: the checksum words, and the MAC when the channel has a key."""
    return _CHECK_BYTES + (_MAC_BYTES if key is not None else 0)


def bucket_mac(key: bytes, buf: torch.Tensor, nbytes: int, version: int, index: int) -> bytes:
    """HMAC-SHA256 of bucket ``index`` of ``version``: its bytes and where they belong."""
    data = buf[:nbytes]
    if data.device.type != "cpu":
        data = data.cpu()  # GPU-only: the MAC is computed on host bytes
    where = version.to_bytes(8, "big", signed=True) + index.to_bytes(8, "big")
    return mac(key, where, data.numpy().data)


def _genuine(store, name: str) -> bool:
    """``name``'s value is signed with the channel key (a plain store: always)."""
    verified = getattr(store, "verified", None)
    return verified is None or verified(name) is not None


def _metadata_bytes(
    buckets: Sequence[Bucket], alignment: int, dtype: torch.dtype | None = None, mac: bool = False
) -> bytes:
    names = {v: k for k, v in DTYPES.items()}
    doc = {
        "v": PROTOCOL_VERSION,
        "mac": mac,  # buckets carry a MAC (the sender has the run's channel key): receivers need it too
        "alignment": alignment,
        "dtype": None if dtype is None else names[dtype],  # floating weights were cast to it (None: not)
        "buckets": [{"nbytes": b.nbytes, "tensors": [m.to_json() for m in b.metas]} for b in buckets],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _parse_metadata(payload: bytes) -> list[Bucket]:
    return _parse_metadata_doc(payload)[0]


def _parse_metadata_doc(payload: bytes) -> tuple[list[Bucket], str | None]:
    """(buckets, the dtype the sender casts floating weights to, or None)."""
    doc = json.loads(payload)
    if not isinstance(doc, dict) or doc.get("v") != PROTOCOL_VERSION:
        raise WeightSyncError(
            f"weight metadata protocol {doc.get('v') if isinstance(doc, dict) else doc!r}, "
            f"this side speaks {PROTOCOL_VERSION}"
        )
    cast = doc.get("dtype")
    if cast is not None and cast not in DTYPES:
        raise WeightSyncError(f"weight metadata: dtype {cast!r} is not one of {sorted(DTYPES)}")
    buckets = []
    for i, b in enumerate(doc["buckets"]):
        metas = tuple(TensorMeta.from_json(m) for m in b["tensors"])
        nbytes = b["nbytes"]
        if nbytes != max((m.end for m in metas), default=0):  # buckets are exact: no slack, no overrun
            raise WeightSyncError(
                f"weight metadata: bucket {i} declares {nbytes!r} bytes, but its tensors "
                f"end at {max((m.end for m in metas), default=0)}"
            )
        buckets.append(Bucket(i, metas, nbytes))
    return buckets, cast
