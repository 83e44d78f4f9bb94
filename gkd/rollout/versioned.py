"""The rollout worker's versioned engine: weights arrive over the weight channel while requests generate.

A rollout worker (``gkd.rollout.service.make_worker``) wraps its engine in a :class:`VersionedEngine`:

- A background thread joins the weight channel (rank ``1..N``; trainer rank 0 sends), waits in the
  channel's store (not in a collective) for each new version's announcement, receives it into the
  ``WeightReceiver``'s staging buffers (``--weight-staging``: host memory, pinned with CUDA, or a GPU copy)
  while requests keep generating with the current weights, and then applies it at the next batch
  boundary: it takes the engine lock exclusively, while every request holds it shared from its first
  token to its last (an engine with several requests in flight runs them side by side; a waiting update
  holds new ones back). A request therefore never sees half-loaded or mixed weights, and every sample
  reports the single version that produced it.
- The receiver has one set of staging buffers, so the worker stages at most one version ahead: the
  trainer's ``sync(v + 2)`` waits until ``v + 1`` has been applied (at most one request's duration).
- A request with ``min_version`` waits (at most ``wait_s``, capped by the worker's ``--max-wait``) until
  the worker holds that version; on timeout it gets an error reply saying which version it has and the
  channel's state.
- A worker that left the weight channel (its group was re-formed: another member died) and waits to
  rejoin is not listed at the broker: a request waiting for a version it lacks is handed back
  (``HandBack``: the broker gives it to another worker), and it takes requests again once it is back in
  the channel. A restarted worker registers only once it holds the version the trainer last sent.
- A vLLM engine whose own workers receive the weights (``engine.receives_in_workers``: vLLM's
  multiprocessing, tensor parallelism) has each worker join the channel itself
  (:mod:`gkd.rollout.vllm_worker`); the thread here then only polls their status between requests and
  tells them to load a version every rank staged (:func:`gkd.rollout.vllm_worker.follow_workers`).
- A worker whose weight-channel thread died (``failed``: an error other than a re-form) leaves the broker
  and its process exits (``failure()``), so its service restarts it and it joins the channel anew.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from gkd.services.transport import HandBack

log = logging.getLogger("gkd.rollout")


class SharedLock:
    """``with lock:`` exclusive, ``with lock.shared():`` shared. A waiting exclusive holder keeps new
    shared ones out, so an update is not starved by a stream of requests."""

    def __init__(self):
        self._cv = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting

    def __enter__(self):
        with self._cv:
            self._waiting += 1
            self._cv.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._waiting -= 1
            self._exclusive = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._exclusive = False
            self._cv.notify_all()

    @contextlib.contextmanager
    def shared(self):
        with self._cv:
            self._cv.wait_for(lambda: not self._exclusive and self._waiting == 0)
            self._shared += 1
        try:
            yield self
        finally:
            with self._cv:
                self._shared -= 1
                self._cv.notify_all()


@dataclass(frozen=True)
class WeightChannel:
    """This worker's place in the weight channel (``gkd.weights.transfer``): trainer rank 0 hosts the
    TCPStore on ``host:port``; rollout members are ranks ``1..world_size-1``. A worker takes ``ranks`` of them
    from ``rank`` on: one, or ``tensor_parallel_size`` for a vLLM engine whose workers each receive."""

    host: str
    port: int
    rank: int
    world_size: int
    backend: str | None = None  # gloo | nccl; default: the trainer's (announced in the channel's store)
    timeout_s: float = 600.0  # rendezvous and every collective (posted only once both sides are ready)
    idle_timeout_s: float = 86400.0  # the wait for the next version's announcement in the store
    staging: str = "host"  # where a received version waits: host (pinned with CUDA) | device (GPU copy)
    bucket_macs: bool = False  # HMAC every bucket with the channel token (on with --auth-secret-file)
    ranks: int = 1  # weight ranks rank .. rank + ranks - 1 (a tensor-parallel vLLM engine's workers)

    def __post_init__(self):
        last = self.rank + self.ranks - 1
        if not 1 <= self.rank <= last < self.world_size:
            what = f"weight rank {self.rank}" if self.ranks == 1 else f"weight ranks {self.rank}..{last}"
            raise ValueError(f"{what} must lie in [1, {self.world_size}) (0 is the trainer)")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


class _AtVersion:
    """Hands ``WeightReceiver.apply`` an engine whose ``load_weights`` also sets the policy version."""

    def __init__(self, engine, version: int):
        self.engine, self.version = engine, version

    def load_weights(self, named):
        return self.engine.load_weights(named, version=self.version)


class VersionedEngine:
    """An engine whose weights change only between requests; see the module docstring."""

    def __init__(self, engine, channel: WeightChannel | None = None, *, pin: bool | None = None):
        self.engine, self.channel, self.pin = engine, channel, pin  # pin None: when CUDA is available
        self._batch = SharedLock()  # requests share it; a weight update takes it alone (between requests)
        self._changed = threading.Condition()
        self.state = "off" if channel is None else "connecting"  # -> ready -> closed | failed
        self.error: str | None = None
        self.receiver = None  # the WeightReceiver, once the handshake is done
        self._thread: threading.Thread | None = None

    @property
    def version(self) -> int:
        return int(self.engine.policy_version)

    def start(self) -> VersionedEngine:
        if self.channel is not None and self._thread is None:
            # a vLLM engine whose own workers receive the weights: this thread only tells them when to load
            inside = getattr(self.engine, "receives_in_workers", False)
            target = self._follow_workers if inside else self._receive_loop
            self._thread = threading.Thread(target=target, name="gkd-weights", daemon=True)
            self._thread.start()
        return self

    def _follow_workers(self) -> None:
        from gkd.rollout.vllm_worker import follow_workers

        try:
            follow_workers(self)
        except Exception as e:  # as in _receive_loop: the worker keeps serving its current version
            log.exception(
                "weight channel %s failed in the vLLM workers; no further updates", self.channel.address
            )
            self._notify(state="failed", error=f"{type(e).__name__}: {e}")

    @property
    def available(self) -> bool:
        """False while this worker waits to rejoin the weight channel: it takes no requests then."""
        return self.state not in ("rejoining", "failed")

    def failure(self) -> str | None:
        """Why this worker's weight channel is gone for good (its thread died), or None: the worker then
        leaves the broker and its process exits to be restarted, so no request waits on a version that
        will never come."""
        return f"weight channel failed: {self.error}" if self.state == "failed" else None

    def wait_for(self, min_version: int, timeout_s: float, *, hand_back: bool = True) -> int:
        """Block until the engine holds at least ``min_version``; ``TimeoutError`` after ``timeout_s`` or
        once the channel failed. ``hand_back``: raise ``HandBack`` while the worker waits to rejoin the
        channel (the version comes no sooner than the trainer's next sync, which may be waiting for this
        very request: another worker takes it)."""
        stops = ("failed", "rejoining") if hand_back else ("failed",)
        with self._changed:
            self._changed.wait_for(lambda: self.version >= min_version or self.state in stops, timeout_s)
            if self.version >= min_version:
                return self.version
            if self.state == "rejoining" and hand_back:
                raise HandBack(
                    f"version {min_version} not here (holds {self.version}); rejoining the channel"
                )
        why = f"; weight channel {self.state}" + (f": {self.error}" if self.error else "")
        if self.channel is None:
            why = "; this worker has no weight channel (--weight-channel)"
        raise TimeoutError(
            f"policy version {min_version} did not arrive within {timeout_s:g}s (this worker holds "
            f"version {self.version}{why})"
        )

    def generate(self, prompts, sampling, *, seed_offset: int = 0):
        """``(samples, version)``; the staged next version cannot be applied until this returns."""
        with self._batch.shared():
            version = self.version
            samples = self.engine.generate(prompts, sampling, seed_offset=seed_offset) if prompts else []
        if any(s.policy_version != version for s in samples):  # the engine broke the contract; never ship it
            raise RuntimeError(
                f"engine reported versions {sorted({s.policy_version for s in samples})} "
                f"for a batch generated with version {version}"
            )
        return samples, version

    def _notify(self, **state: Any) -> None:
        with self._changed:
            for k, v in state.items():
                setattr(self, k, v)
            self._changed.notify_all()

    def _receive_loop(self) -> None:
        from gkd.weights.channel import ChannelMember, member_id
        from gkd.weights.transfer import ChannelReform, WeightReceiver, WeightSyncError

        ch = self.channel
        member = None
        try:
            member = ChannelMember(
                ch.host,
                ch.port,
                member_id(ch.rank),
                backend=ch.backend,
                timeout=timedelta(seconds=ch.timeout_s),
                idle_timeout=timedelta(seconds=ch.idle_timeout_s),
                bucket_macs=ch.bucket_macs,
                staging=ch.staging,
            )
            while True:  # one generation of the channel per pass; a member's death re-forms it
                group, _ = member.join()
                receiver = WeightReceiver(
                    group,
                    self.engine.parameters_spec(),
                    staging=ch.staging,
                    pin=self.pin,
                    idle_timeout=timedelta(seconds=ch.idle_timeout_s),
                )
                try:
                    receiver.handshake()
                    self.receiver = receiver  # for inspection (tests, logs)
                    self._notify(state="ready")
                    log.info(
                        "weight channel %s generation %d: rank %d of %d ready (%s, staging in %s memory%s, "
                        "weights arrive as %s)",
                        ch.address,
                        member.generation,
                        group.rank,
                        group.world_size,
                        group.device.type,
                        ch.staging,
                        ", pinned" if receiver.pin and receiver.staging_device.type == "cpu" else "",
                        receiver.sender_dtype or "sent",
                    )
                    if self._receive_versions(receiver):
                        return
                except ChannelReform as e:
                    log.warning("weight channel generation %d ends: %s; rejoining", member.generation, e)
                except WeightSyncError as e:
                    if "store is gone" in str(e):
                        raise
                    log.warning("weight channel generation %d failed: %s; rejoining", member.generation, e)
                finally:
                    receiver.close()
                self._notify(state="rejoining")
        except Exception as e:  # the worker keeps serving its current version; min_version waits report this
            log.exception("weight channel %s failed; no further updates", ch.address)
            self._notify(state="failed", error=f"{type(e).__name__}: {e}")
        finally:
            if member is not None:
                member.close()  # its heartbeat thread ends with the channel

    def _receive_versions(self, receiver) -> bool:
        """Stage and apply versions until the sender closes (-> True) or the group fails (raises)."""
        while True:
            # waits in the store (not in a collective) for the next version, then stages it here
            # while requests keep generating with the old weights
            version = receiver.receive()
            if version is None:
                self._notify(state="closed")
                log.info("weight channel closed by the sender; keeping version %d", self.version)
                return True
            if version < self.version:  # versions never go back on a worker
                log.warning("ignoring version %d: this worker holds %d", version, self.version)
                continue
            if self._take(receiver, version):
                return True

    def _take(self, receiver, version: int) -> bool:
        """Apply the staged ``version`` at the batch boundary; True: leave the channel."""
        start = time.perf_counter()
        with self._batch:  # the batch boundary
            receiver.apply(_AtVersion(self.engine, version))
            self._notify()
        log.info("applied policy version %d in %.3fs", version, time.perf_counter() - start)
        return False
