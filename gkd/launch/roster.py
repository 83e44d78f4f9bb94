"""The launchers' rendezvous of a multi-node run: every node's ``gkd train`` learns the address of every
other node before it starts anything, then watches the others until the run ends.

Node 0's ``gkd train`` listens on the rendezvous endpoint (``--rdzv-endpoint HOST:PORT``); node ``r``
connects, retrying until ``join_timeout_s``, and says ``hello`` (its rank, the node count, its bind
address, a digest of its resolved config). When all ``nnodes - 1`` have said it, node 0 answers each
with the ``roster`` (every node's address, by rank); a hello that does not fit (a rank out of range or
taken, another node count, another config) is refused on both sides with one line. The services' and
the weight channel's addresses then follow from the config: a service runs on node ``*.node_rank`` at
that node's address, the weight channel's store on node 0 (trainer rank 0).

The connections stay open: a star around node 0, one JSON line per message, nothing else on the wire
(no pickle). Each side pings every :data:`PING_S`; a peer is lost when its connection closes without a
``done`` (its ``gkd train`` was killed: the kernel closes the socket at once) or stays silent for
``liveness_s`` (its machine or the network went away). ``failed`` says why a node stops; node 0 relays
any node's loss or failure to the others before it stops itself, so every node can name the node that
went first. ``done`` says a node's trainer finished cleanly (its connection closing after that is no
loss).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gkd.launch.nodes import NodeSpec

__all__ = ["Event", "Roster", "RosterError", "config_digest", "form_roster"]

log = logging.getLogger("gkd.roster")

PING_S = 2.0
LIVENESS_S = 30.0
MAX_LINE = 65536


class RosterError(RuntimeError):
    """The nodes could not form the run (a node missing, refused or unreachable); one line."""


@dataclass(frozen=True)
class Event:
    """Something another node did: ``lost`` (gone without a word), ``failed`` (stopping, ``why``),
    ``done`` (its trainer finished)."""

    kind: str
    node: int
    why: str = ""


def config_digest(cfg) -> str:
    """A short digest of a resolved config: nodes started with different configs refuse each other."""
    import dataclasses

    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Peer:
    """One open connection to another node: JSON lines in both directions."""

    def __init__(self, sock: socket.socket, node: int):
        self.sock = sock
        self.node = node
        self.reader = sock.makefile("rb")
        self.lock = threading.Lock()
        self.said_done = False

    def send(self, msg: dict) -> bool:
        data = (json.dumps(msg) + "\n").encode()
        with self.lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def recv(self, timeout_s: float | None) -> dict | None:
        """The next message; None when the connection closed; raises TimeoutError after ``timeout_s``."""
        self.sock.settimeout(timeout_s)
        try:
            line = self.reader.readline(MAX_LINE + 1)
        except TimeoutError:
            raise TimeoutError from None
        except OSError:
            return None
        if not line:
            return None
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise ValueError("an over-long line")
        msg = json.loads(line)
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise ValueError("not a gkd message")
        return msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


class Roster:
    """Every node's address (``hosts[r]``) and the live connections to the other nodes; events from them
    arrive on :meth:`next_event`. Made by :func:`form_roster`."""

    def __init__(self, node: NodeSpec, hosts: Sequence[str], peers: Sequence[_Peer], liveness_s: float):
        self.node = node
        self.hosts = list(hosts)
        self._peers = list(peers)
        self._liveness_s = liveness_s
        self._events: queue.Queue[Event] = queue.Queue()
        self._closed = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(p,), name=f"gkd-roster-{p.node}", daemon=True)
            for p in self._peers
        ]
        self._threads.append(threading.Thread(target=self._ping, name="gkd-roster-ping", daemon=True))
        for t in self._threads:
            t.start()

    def describe(self, node: int) -> str:
        return f"node {node} ({self.hosts[node]})"

    def _read(self, peer: _Peer) -> None:
        while not self._closed.is_set():
            try:
                msg = peer.recv(self._liveness_s)
            except TimeoutError:
                self._report(
                    Event(
                        "lost", peer.node, f"silent for {self._liveness_s:.0f} s (machine or network down?)"
                    )
                )
                return
            except ValueError as e:
                self._report(Event("lost", peer.node, f"it sent {e}"))
                return
            if self._closed.is_set():
                return
            if msg is None:
                if not peer.said_done:
                    why = (
                        "its gkd train's connection closed without a word (killed, or its machine went down)"
                    )
                    self._report(Event("lost", peer.node, why))
                return
            self._handle(peer, msg)

    def _handle(self, peer: _Peer, msg: dict) -> None:
        op = msg["op"]
        if op == "done":
            peer.said_done = True
            self._events.put(Event("done", peer.node))
        elif (
            op in ("failed", "lost")
            and self.node.node_rank != 0
            and msg.get("node") in range(len(self.hosts))
        ):
            self._events.put(Event(op, msg["node"], str(msg.get("why", ""))[:500]))  # relayed by node 0
        elif op == "failed":
            self._report(Event("failed", peer.node, str(msg.get("why", ""))[:500]))

    def _report(self, event: Event) -> None:
        """An event about ``event.node``; node 0 relays it to the others first (they stop next)."""
        if self.node.node_rank == 0:
            msg = {"op": event.kind, "node": event.node, "why": event.why}
            for p in self._peers:
                if p.node != event.node:
                    p.send(msg)
        self._events.put(event)

    def _ping(self) -> None:
        while not self._closed.wait(PING_S):
            for p in self._peers:
                p.send({"op": "ping"})

    def next_event(self, timeout_s: float = 0.0) -> Event | None:
        try:
            return self._events.get(timeout=timeout_s) if timeout_s > 0 else self._events.get_nowait()
        except queue.Empty:
            return None

    def announce(self, kind: str, why: str = "") -> None:
        """Tell the other nodes this node is ``done`` (trainer finished) or ``failed`` (``why``)."""
        msg = {"op": kind, "why": why, "node": self.node.node_rank}
        for p in self._peers:
            p.send(msg)

    def close(self) -> None:
        self._closed.set()
        for p in self._peers:
            p.close()


# ------------------------------------------------------------------------------------------- forming


def _listen(node: NodeSpec) -> socket.socket:
    family = socket.AF_INET6 if ":" in node.rdzv_host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind((node.rdzv_host, node.rdzv_port))
    except OSError as e:
        server.close()
        raise RosterError(
            f"--rdzv-endpoint {node.rdzv_host}:{node.rdzv_port}: node 0 cannot listen there ({e.strerror}); "
            "give node 0's own address and a free port"
        ) from e
    server.listen(64)
    return server


def _check_hello(msg: dict | None, node: NodeSpec, digest: str, hosts: list[str | None]) -> tuple[int, str]:
    """(rank, host) of a joining node's hello; a RosterError saying why a node does not fit the run, a
    ValueError for a connection that is no gkd node (ignored)."""
    if msg is None or msg.get("op") != "hello":
        raise ValueError("no gkd hello")
    rank, host = msg.get("node"), msg.get("host")
    if not isinstance(rank, int) or not isinstance(host, str) or not host:
        raise ValueError("a hello without a rank or address")
    if msg.get("nnodes") != node.nnodes:
        raise RosterError(
            f"node {rank} was started with --nnodes {msg.get('nnodes')}, node 0 with {node.nnodes}"
        )
    if not 0 < rank < node.nnodes:
        raise RosterError(f"a node joined with --node-rank {rank}, not in 1..{node.nnodes - 1}")
    if hosts[rank] is not None:
        raise RosterError(f"two nodes were started with --node-rank {rank}")
    if msg.get("config") != digest:
        raise RosterError(f"node {rank} ({host}) resolved another config than node 0: start every node alike")
    return rank, host


def _serve(node: NodeSpec, digest: str, deadline: float) -> tuple[list[str], list[_Peer]]:
    hosts: list[str | None] = [node.host] + [None] * (node.nnodes - 1)
    peers: list[_Peer] = []
    server = _listen(node)
    try:
        while len(peers) < node.nnodes - 1:
            server.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock, _ = server.accept()
            except TimeoutError:
                missing = ", ".join(str(r) for r, h in enumerate(hosts) if h is None)
                raise RosterError(
                    f"node(s) {missing} did not join {node.rdzv_host}:{node.rdzv_port} in time: start `gkd "
                    "train --node-rank R` there with the same --nnodes and --rdzv-endpoint"
                ) from None
            peer = _Peer(sock, -1)
            try:
                rank, host = _check_hello(peer.recv(30.0), node, digest, hosts)
            except (TimeoutError, ValueError) as e:  # not a gkd node: ignore it
                log.warning("rendezvous endpoint: dropped a connection (%s)", e or "silent")
                peer.close()
                continue
            except RosterError as e:
                peer.send({"op": "refused", "why": str(e)})
                peer.close()
                raise
            peer.node, hosts[rank] = rank, host
            peers.append(peer)
    except BaseException:
        for p in peers:
            p.send({"op": "refused", "why": "node 0 gave up forming the run"})
            p.close()
        raise
    finally:
        server.close()
    for p in peers:
        p.send({"op": "roster", "hosts": hosts})
    return [h for h in hosts if h is not None], peers


def _join(node: NodeSpec, digest: str, deadline: float) -> tuple[list[str], list[_Peer]]:
    hello = {
        "op": "hello",
        "node": node.node_rank,
        "nnodes": node.nnodes,
        "host": node.host,
        "config": digest,
    }
    while True:
        try:
            sock = socket.create_connection((node.rdzv_host, node.rdzv_port), timeout=5.0)
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RosterError(
                    f"node 0 is not reachable at --rdzv-endpoint {node.rdzv_host}:{node.rdzv_port} "
                    f"({e.strerror or e}): start `gkd train --node-rank 0` there"
                ) from None
            time.sleep(0.5)
    peer = _Peer(sock, 0)
    peer.send(hello)
    try:
        reply = peer.recv(max(1.0, deadline - time.monotonic()))
    except (TimeoutError, ValueError):
        reply = None
    if reply is None or reply.get("op") != "roster":
        peer.close()
        why = (reply or {}).get("why") or "node 0 did not answer"
        raise RosterError(f"node 0 refused this node: {why}")
    hosts = reply.get("hosts")
    if not isinstance(hosts, list) or len(hosts) != node.nnodes or not all(isinstance(h, str) for h in hosts):
        peer.close()
        raise RosterError("node 0 sent a malformed roster")
    return hosts, [peer]


def form_roster(
    node: NodeSpec, digest: str, *, join_timeout_s: float, liveness_s: float = LIVENESS_S
) -> Roster:
    """Meet the other nodes (node 0 listens, the others connect); see the module docstring."""
    deadline = time.monotonic() + join_timeout_s
    hosts, peers = (_serve if node.node_rank == 0 else _join)(node, digest, deadline)
    log.info("nodes: %s", ", ".join(f"{r}={h}" for r, h in enumerate(hosts)))
    return Roster(node, hosts, peers, liveness_s)
