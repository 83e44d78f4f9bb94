"""The weight channel's membership: generations of :mod:`gkd.weights.transfer` groups that re-form when a
rollout worker dies or a new one (a restart) arrives.

Trainer rank 0 hosts one TCPStore for the whole run (``rollout.weight_port``); every process group lives
under a store prefix of its own generation ``g`` (``g<g>/``), so a new generation never sees an old one's
keys. Keys in the root (``gkd_weights/``) store:

- ``terms``: JSON ``{"backend", "protocol"}``, written by the trainer before anyone joins: the process
  group backend and the weight protocol version of the run. A worker reads it before it asks to join; one
  with no backend of its own adopts the trainer's (``gkd rollout serve`` without ``--weight-backend``), one
  with another backend or protocol still writes its join record, then fails, and the trainer fails on
  reading that record at start-up (later it leaves that worker out, logging the line): both within a poll
  of the store, each with one line naming both values;
- ``want/<g>/count`` and ``want/<g>/<i>``: join records of generation ``g``, JSON ``{"id", "backend",
  "protocol", "staging"}`` (a bare worker id is read as one with the trainer's terms);
- ``gen/<g>``: JSON ``{"members": [ids], "version": v}`` (member i is rank i + 1; ``v``: the version sent
  right after the handshake, or null); ``latest``: the newest generation;
- ``hb/<id>``: a counter each worker bumps every second from a thread of its own (liveness);
- ``sent``: the newest version the trainer sent; a worker that starts while it exists is a late joiner
  (a restart) and takes no generation request before it holds that version.

Re-form (:meth:`ChannelHost.sync`): a sync that fails (a broadcast error, a member whose heartbeat stopped
while the trainer waits for it to be ready, a ready timeout), or a worker waiting to join, makes rank 0
abandon the group (``reform`` in the old store prefix; survivors leave it and ask for the next generation),
wait (``reform_timeout``) until every expected worker asked, or form the next generation with those that
did, handshake, and send the version again. Versions only grow: a re-form resends the version the
trainer holds, which is at least what every worker has.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from gkd.weights.membership import LOOPBACK_NAMES, SignedStore, channel_key, listen_socket
from gkd.weights.transfer import WeightSender
from gkd.weights.wire import (
    PROTOCOL_VERSION,
    ChannelReform,
    WeightGroup,
    WeightSyncError,
    make_process_group,
)

__all__ = ["ChannelHost", "ChannelMember", "ChannelMismatch", "ChannelReform", "member_id"]

log = logging.getLogger("gkd.weights")

HEARTBEAT_INTERVAL_S = 1.0
SETTLE_S = 2.0  # a re-form waits this long after the last worker asked for more to ask
JOIN_RECORD_WAIT_S = 5.0  # a join count without its record after this long is skipped
_PREFIX = "gkd_weights/"


class ChannelMismatch(WeightSyncError):
    """The trainer and a rollout worker disagree on the channel's terms (backend, protocol version)."""


def mismatch_line(field: str, trainer, worker, who: str) -> str | None:
    """The one line both sides print when ``field`` differs, or None when it agrees."""
    if trainer == worker:
        return None
    fix = {
        "backend": "set the same backend on both sides: rollout.weight_backend in the trainer's config, "
        "--weight-backend for `gkd rollout serve|join` (or leave the flag out to follow the trainer)",
        "protocol": "run the same gkd version on the trainer and the rollout workers",
    }[field]
    return (
        f"weight channel {field} mismatch: the trainer uses {trainer}, rollout worker {who} {worker}; {fix}"
    )


def member_id(slot: int) -> str:
    """A worker's id in the channel: unique per process (a restarted worker is a new member)."""
    return f"{socket.gethostname()}/{os.getpid()}/slot{slot}"


def _wait_listening(host: str, port: int, timeout_s: float, poll_s: float = 0.05) -> None:
    """Plain connects until ``host:port`` accepts (or ``timeout_s`` passes): a TCPStore client that finds
    no server retries with a back-off growing to seconds, which would delay a worker that starts before
    the trainer hosts the store (``gkd train`` starts them together)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(poll_s)


def _root_store(host: str, port: int, *, master: bool, timeout: timedelta) -> dist.PrefixStore:
    if not master:
        store = dist.TCPStore(host, port, None, is_master=False, timeout=timeout, wait_for_workers=False)
        return dist.PrefixStore(_PREFIX, store)
    # the server gets a socket bound to ``host`` only (given just a host, it listens on every interface);
    # it owns a duplicate of the descriptor, this side closes its own
    sock = listen_socket(host, port)
    try:
        store = dist.TCPStore(
            host,
            sock.getsockname()[1],
            None,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,
            master_listen_fd=os.dup(sock.fileno()),
        )
    finally:
        sock.close()
    return dist.PrefixStore(_PREFIX, store)


def _group_stores(root: dist.Store, g: int, key: bytes | None, timeout: timedelta):
    """Generation ``g``'s store prefix: raw for its process group's rendezvous, signed for the channel."""
    raw = dist.PrefixStore(f"g{g}/", root)
    return raw, SignedStore(raw, key, f"{_PREFIX}g{g}/", timeout)


class ChannelHost:
    """Trainer rank 0's end: the store, the current generation's group and the :class:`WeightSender`.

    ``expected``: the rollout workers the service runs; :meth:`form` waits (``timeout``) for all of them
    at start-up, a re-form (``reform_timeout``) takes those that asked in time (at least one). A member
    whose heartbeat counter has not moved for ``heartbeat_timeout_s`` while the trainer waits for it is
    dead. ``on_reform(generation, members, seconds)`` is told about every re-form (metrics, tests)."""

    def __init__(
        self,
        host: str,
        port: int,
        expected: int,
        *,
        backend: str | None = None,
        timeout: timedelta = timedelta(minutes=10),
        reform_timeout: timedelta = timedelta(seconds=120),
        heartbeat_timeout_s: float = 15.0,
        max_reforms: int = 3,
        key: bytes | None = None,
        bucket_macs: bool = False,
    ):
        self.host, self.expected, self.timeout = host, expected, timeout
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")  # as make_process_group
        self.reform_timeout, self.heartbeat_timeout_s, self.max_reforms = (
            reform_timeout,
            heartbeat_timeout_s,
            max_reforms,
        )
        self.key = key if key is not None else channel_key()  # default: the run's GKD_CHANNEL_TOKEN
        # the weights' bytes carry an HMAC only when asked (a secret configured: a pass over every byte on
        # the host, a device-to-host copy per bucket on GPUs); the store's records are signed either way
        self.bucket_key = self.key if bucket_macs else None
        self.raw = _root_store(host, port, master=True, timeout=timeout)
        self.store = SignedStore(self.raw, self.key, _PREFIX, timeout)
        if self.key is None and host not in LOOPBACK_NAMES:
            log.warning(
                "weight channel store on %s:%d without a channel token: anyone who reaches it can join and "
                "receive the weights (start the run with `gkd train`, or set GKD_CHANNEL_TOKEN everywhere)",
                host,
                port,
            )
        # the run's terms, before any worker can ask to join (a worker reads them first)
        self.store.set("terms", json.dumps({"backend": self.backend, "protocol": PROTOCOL_VERSION}))
        self.generation = -1
        self.members: list[str] = []
        self.group: WeightGroup | None = None
        self.sender: WeightSender | None = None
        self.reforms: list[dict] = []  # {"generation", "members", "seconds", "cause"} per re-form
        # abandoned groups stay referenced: a process group's destructor waits for its pending collectives,
        # which in an abandoned gloo group end only at their timeout
        self._retired: list[WeightGroup] = []
        self._beats: dict[str, tuple[int, float]] = {}

    # ---------------------------------------------------------------------------------- generations
    def _asked(self, g: int) -> int:
        return int(self.store.add(f"want/{g}/count", 0))

    def _join_record(self, g: int, i: int) -> str | None:
        """Join record ``i`` of generation ``g``: a worker id, or None (missing or not signed with the
        token: a count bumped by someone else). A worker on other terms: :class:`ChannelMismatch`."""
        try:  # a worker bumps the count just before it writes its record
            self.store.wait([f"want/{g}/{i}"], timedelta(seconds=JOIN_RECORD_WAIT_S))
        except (RuntimeError, dist.DistError):
            log.warning("weight channel generation %d: join request %d came without a record; skipped", g, i)
            return None
        value = self.store.verified(f"want/{g}/{i}")
        if value is None:
            return None
        text = value.decode(errors="replace")
        if not text.startswith("{"):
            return text  # a bare id: a worker that takes the trainer's terms
        try:
            record = json.loads(text)
            who = str(record["id"])
        except (ValueError, KeyError, TypeError):
            log.warning("weight channel generation %d: unreadable join record %d skipped", g, i)
            return None
        for field, ours in (("backend", self.backend), ("protocol", PROTOCOL_VERSION)):
            line = mismatch_line(field, ours, record.get(field), who)
            if line is not None and self.generation < 0:  # at start-up the run cannot go on as asked
                raise ChannelMismatch(line)
            if line is not None:  # later: a misconfigured extra worker does not stop a running job
                log.error("%s (left out of generation %d)", line, g)
                return None
        log.info(
            "weight channel generation %d: %s asks to join (staging in %s memory)",
            g,
            who,
            record.get("staging", "?"),
        )
        return who

    def pending(self) -> bool:
        """A worker asks to join the next generation (a restarted worker, or a survivor of a failure)."""
        return self._asked(self.generation + 1) > 0

    def form(self, version: int | None = None, *, wait: timedelta | None = None, need_all: bool = True):
        """Form the next generation and return its group. ``need_all``: wait until every expected worker
        asked (``wait``, default ``timeout``). Otherwise go on with those that asked once no one else has
        asked for ``SETTLE_S`` (a worker still loading joins a later generation), waiting at most ``wait``
        for the first one."""
        g = self.generation + 1
        wait_s = (wait or self.timeout).total_seconds()
        deadline = time.monotonic() + wait_s
        members: list[str] = []
        read, changed = 0, time.monotonic()  # join records read so far; when the last genuine one came
        while len(members) < self.expected and time.monotonic() < deadline:
            if not need_all and members and time.monotonic() - changed > SETTLE_S:
                break
            asked = self._asked(g)
            while read < asked:
                read += 1
                who = self._join_record(g, read)
                if who is not None and who not in members:
                    members.append(who)
                    changed = time.monotonic()
            if len(members) < self.expected:
                time.sleep(0.05)
        if len(members) < (self.expected if need_all else 1):
            raise WeightSyncError(
                f"weight channel generation {g}: {len(members)} of {self.expected} rollout worker(s) joined "
                f"within {wait_s:g}s (are the workers up, with --weight-channel {self.host}:"
                "<rollout.weight_port>, and the run's channel token?)"
            )
        self.store.set(f"gen/{g}", json.dumps({"members": members, "version": version}))
        self.store.set("latest", str(g))
        world = 1 + len(members)
        raw, signed = _group_stores(self.raw, g, self.key, self.timeout)
        pg, device = make_process_group(raw, self.host, 0, world, self.backend, self.timeout)
        if self.group is not None:
            self._retired.append(self.group)
        self.group = WeightGroup(pg, signed, 0, world, device, self.timeout, key=self.bucket_key)
        self.group.liveness = self._check_heartbeats
        self.generation, self.members = g, members
        now = time.monotonic()
        self._beats = {m: (int(self.store.add(f"hb/{m}", 0)), now) for m in members}
        log.info(
            "weight channel generation %d: %d rollout worker(s): %s", g, len(members), ", ".join(members)
        )
        return self.group

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for rank, m in enumerate(self.members, start=1):
            beat = int(self.store.add(f"hb/{m}", 0))
            last, since = self._beats.get(m, (beat, now))
            if beat != last:
                self._beats[m] = (beat, now)
            elif now - since > self.heartbeat_timeout_s:
                raise WeightSyncError(
                    f"rollout worker {m} (weight rank {rank}, generation {self.generation}) missed its "
                    f"heartbeat for {now - since:.0f}s"
                )

    # ---------------------------------------------------------------------------------- the sender
    def start(self, make_sender: Callable[[WeightGroup], WeightSender]) -> WeightSender:
        """Form generation 0 with every expected worker and handshake; returns the sender."""
        self.sender = make_sender(self.form())
        self.sender.handshake()
        return self.sender

    def reform(self, version: int, cause: BaseException | str) -> None:
        """Abandon the current group, form the next generation with the workers that ask, handshake."""
        assert self.sender is not None
        start = time.monotonic()
        log.warning(
            "weight channel generation %d: re-forming before version %d (%s)", self.generation, version, cause
        )
        self.sender.abandon()
        while True:
            group = self.form(version, wait=self.reform_timeout, need_all=False)
            self.sender.rebind(group)
            try:
                self.sender.handshake()
                break
            except ChannelReform:
                raise
            except WeightSyncError as exc:  # a member died during the handshake: once more without it
                log.warning("weight channel generation %d: handshake failed (%s)", self.generation, exc)
                self.sender.abandon()
        seconds = time.monotonic() - start
        self.reforms.append(
            {
                "generation": self.generation,
                "members": list(self.members),
                "seconds": seconds,
                "cause": str(cause),
            }
        )
        log.warning(
            "weight channel generation %d formed in %.1fs with %d of %d worker(s); sending version %d again",
            self.generation,
            seconds,
            len(self.members),
            self.expected,
            version,
        )

    def sync(self, version: int, *, before_transfer: Callable[[], None] | None = None) -> dict[str, float]:
        """Send ``version``, re-forming the channel first when a worker waits to join, and after a failed
        attempt (at most ``max_reforms`` times). ``before_transfer`` runs once every receiver is ready,
        right before the transfer (FSDP2: tell the other trainer ranks to help gather)."""
        assert self.sender is not None
        for attempt in range(self.max_reforms + 1):
            try:
                if self.pending():
                    self.reform(version, "a rollout worker asks to join")
                self.sender.wait_ready(version)
                if before_transfer is not None:
                    before_transfer()
                out = self.sender.sync(version)
            except WeightSyncError as exc:
                if attempt == self.max_reforms:
                    raise
                self.reform(version, exc)
                continue
            self.store.set("sent", str(version))
            if attempt < self.max_reforms and self.pending():  # a survivor left during this sync: take it
                self.reform(version, "a rollout worker asks to join")  # back now, not one sync later
                continue
            return out
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


class ChannelMember:
    """A rollout worker's end: its id, the heartbeat thread, and :meth:`join` (ask for the next generation
    and wait until it is formed with this worker in it)."""

    def __init__(
        self,
        host: str,
        port: int,
        ident: str,
        *,
        backend: str | None = None,
        timeout: timedelta = timedelta(minutes=10),
        idle_timeout: timedelta = timedelta(days=1),
        key: bytes | None = None,
        bucket_macs: bool = False,
        staging: str = "host",
    ):
        self.host, self.port, self.id, self.backend = host, port, ident, backend
        self.staging = staging  # reported in the join record (the trainer logs it)
        self.timeout, self.idle_timeout = timeout, idle_timeout
        self.key = key if key is not None else channel_key()  # default: the run's GKD_CHANNEL_TOKEN
        # the weights' bytes carry an HMAC only when asked (a secret configured: a pass over every byte on
        # the host, a device-to-host copy per bucket on GPUs); the store's records are signed either way
        self.bucket_key = self.key if bucket_macs else None
        _wait_listening(host, port, timeout.total_seconds())
        self.raw = _root_store(host, port, master=False, timeout=timeout)
        self.store = SignedStore(self.raw, self.key, _PREFIX, timeout)
        self.generation = -1
        self._groups: list[WeightGroup] = []  # every group joined stays referenced (see ChannelHost._retired)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="gkd-weights-heartbeat", daemon=True)
        self._beat.start()

    @staticmethod
    def sent_version(host: str, port: int, timeout_s: float = 2.0, key: bytes | None = None) -> int | None:
        """The newest version the trainer has sent, or None (no trainer yet, nothing sent, or no genuine
        record of it). ``key``: default the run's ``GKD_CHANNEL_TOKEN``."""
        try:  # a plain connect first: a TCPStore client that finds no server logs a C++ stack trace
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError:
            return None
        try:
            raw = _root_store(host, port, master=False, timeout=timedelta(seconds=timeout_s))
            value = SignedStore(raw, key if key is not None else channel_key(), _PREFIX).verified("sent")
            return None if value is None else int(value)
        except (RuntimeError, dist.DistError, ValueError):
            return None

    def _heartbeat(self) -> None:
        # its own connection: the receive thread may be blocked in a store wait on the shared one
        try:
            store = _root_store(self.host, self.port, master=False, timeout=self.timeout)
            while not self._stop.wait(HEARTBEAT_INTERVAL_S):
                store.add(f"hb/{self.id}", 1)
        except Exception as exc:  # noqa: BLE001 - the trainer is gone; the receive thread reports it
            log.info("weight channel heartbeat stopped: %s", exc)

    def _terms(self) -> dict:
        """The trainer's terms (``terms`` in the store), waiting at most ``timeout`` for them to appear;
        empty when the record is not signed with this worker's token (the trainer then skips its join
        record as forged and this worker learns nothing more)."""
        start = time.monotonic()
        while not self.store.check(["terms"]):
            if time.monotonic() - start > self.timeout.total_seconds():
                raise WeightSyncError(
                    f"weight channel {self.host}:{self.port}: the trainer announced no terms within "
                    f"{self.timeout.total_seconds():g}s (is it a gkd trainer of the same version?)"
                )
            time.sleep(0.05)
        raw = self.store.verified("terms")
        return {} if raw is None else json.loads(raw)

    def join(self) -> tuple[WeightGroup, int | None]:
        """Ask for the next generation until one includes this worker; returns its group and the version
        the trainer sends right after the handshake (None: none). A worker on other terms than the
        trainer's still writes its join record (so the trainer fails too), then raises
        :class:`ChannelMismatch`."""
        terms = self._terms()
        if self.backend is None:  # no choice of its own: the trainer's
            self.backend = terms.get("backend")
        problems = [
            mismatch_line(field, terms[field], ours, self.id)
            for field, ours in (("backend", self.backend), ("protocol", PROTOCOL_VERSION))
            if field in terms
        ]
        problem = next((p for p in problems if p is not None), None)
        record = json.dumps(
            {"id": self.id, "backend": self.backend, "protocol": PROTOCOL_VERSION, "staging": self.staging}
        )
        while True:
            latest = self.store.verified("latest")
            g = max(-1 if latest is None else int(latest), self.generation) + 1
            n = int(self.store.add(f"want/{g}/count", 1))
            self.store.set(f"want/{g}/{n}", record)
            if problem is not None:
                raise ChannelMismatch(problem)
            start = time.monotonic()
            # only a generation record signed with the token counts: a forged one is ignored (logged once)
            while (raw_doc := self.store.verified(f"gen/{g}")) is None:
                if time.monotonic() - start > self.idle_timeout.total_seconds():
                    raise WeightSyncError(
                        f"weight channel: generation {g} was not formed within "
                        f"{self.idle_timeout.total_seconds():g}s"
                    )
                time.sleep(0.05)
            doc = json.loads(raw_doc)
            self.generation = g
            if self.id not in doc["members"]:
                continue  # formed just before this worker asked: ask for the next one
            rank, world = doc["members"].index(self.id) + 1, len(doc["members"]) + 1
            raw, signed = _group_stores(self.raw, g, self.key, self.timeout)
            pg, device = make_process_group(raw, self.host, rank, world, self.backend, self.timeout)
            self._groups.append(
                WeightGroup(pg, signed, rank, world, device, self.timeout, key=self.bucket_key)
            )
            return self._groups[-1], doc["version"]

    def close(self) -> None:
        self._stop.set()
        if self._beat is not threading.current_thread():
            # a heartbeat still inside the store's C++ client when the interpreter exits aborts the process
            self._beat.join(HEARTBEAT_INTERVAL_S + 5.0)
