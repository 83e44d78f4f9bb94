"""Optional shared-secret authentication: HMAC-SHA256 over every frame of every message.

Choice: HMAC rather than ZeroMQ CURVE, because
- a message that fails it can be dropped *and counted* per message by the broker (CURVE rejects at the
  handshake inside libzmq, invisible to the service without a ZAP handler and a socket monitor);
- it needs one secret file shared by all parties (``--auth-secret-file``) instead of a key pair per party
  plus a list of authorised public keys;
- it authenticates the payload bytes too, so with auth on *any* mutation of a message is rejected.
What it does not give: confidentiality. Traffic is readable on the wire; run over a trusted network or an
SSH/WireGuard tunnel if token ids are sensitive. (Default binds are 127.0.0.1 anyway.)

Wire form: the sender appends one trailer frame to the message's frames::

    MAGIC (5 bytes "GKDA1") | timestamp (8 bytes, big-endian uint64 ns since the epoch)
    | nonce (16 random bytes) | HMAC-SHA256 (32 bytes)

The MAC covers ``label | MAGIC | timestamp | nonce | for each frame: len (8 bytes BE) | bytes``. The length
prefixes make frame boundaries part of the MAC (moving bytes between frames is detected); ``label`` names
the direction of the hop (``client>broker``, ``broker>client``, ``worker>broker``, ``broker>worker``) so a
message cannot be reflected back as another kind. Replay is bounded: a receiver accepts a timestamp within
``max_skew_s`` of its own clock and remembers every accepted nonce for ``2 * max_skew_s``, so a captured
message can be replayed neither later nor twice; and it refuses a message stamped before it was created
(``Auth`` is made once per process start), so a message captured before a broker restart cannot be
replayed to the new one whose nonce memory is empty. (A peer whose clock lags by ``d`` seconds is
refused for the first ``d`` seconds after a restart; its retries then pass.) Each hop is signed separately
(the broker verifies, then re-signs what it forwards), so a re-queued request is a fresh message to the
next worker.

Order of the checks: the MAC first, then the timestamp and the nonce. The timestamp is only trusted once
the MAC says it is the sender's: a made-up fresh timestamp gets a message no further than the MAC, and
what the MAC costs is bounded by the socket's message size limit (``MAXMSGSIZE``) and receive queue
(``RCVHWM``) and by the broker's per-turn byte budget.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAGIC = b"GKDA1"
_TRAILER = len(MAGIC) + 8 + 16 + 32
MIN_SECRET_BYTES = 16

CLIENT_TO_BROKER = b"client>broker"
BROKER_TO_CLIENT = b"broker>client"
WORKER_TO_BROKER = b"worker>broker"
BROKER_TO_WORKER = b"broker>worker"


class AuthError(Exception):
    """A message failed authentication. Receivers drop it (no reply) and count it."""


class Auth:
    """Signs and verifies messages with a shared secret. Thread-safe; one instance may serve many sockets."""

    def __init__(self, secret: bytes, *, max_skew_s: float = 30.0):
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the shared secret must be at least {MIN_SECRET_BYTES} bytes")
        self._key = secret
        self.max_skew_ns = int(max_skew_s * 1e9)
        self.created_ns = time.time_ns()  # nothing stamped earlier is accepted (replays across restarts)
        self._seen: set[bytes] = set()
        self._expiry: collections.deque[tuple[int, bytes]] = collections.deque()
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> Auth:
        """Read the secret from a file (surrounding whitespace stripped), e.g. ``--auth-secret-file``."""
        secret = Path(path).read_bytes().strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"{path}: the secret is {len(secret)} bytes, need at least {MIN_SECRET_BYTES} "
                "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > FILE`)"
            )
        return cls(secret, **kwargs)

    def _mac(self, label: bytes, stamp: bytes, frames: Sequence[Any]) -> bytes:
        mac = hmac.new(self._key, label + MAGIC + stamp, hashlib.sha256)
        for frame in frames:
            view = memoryview(getattr(frame, "buffer", frame))
            mac.update(struct.pack(">Q", view.nbytes))
            mac.update(view)
        return mac.digest()

    def sign(self, frames: Sequence[Any], label: bytes) -> list[Any]:
        """Return ``frames`` plus the trailer frame."""
        stamp = struct.pack(">Q", time.time_ns()) + os.urandom(16)
        return [*frames, MAGIC + stamp + self._mac(label, stamp, frames)]

    def verify(self, frames: Sequence[Any], label: bytes) -> list[Any]:
        """Check the trailer and return the frames without it; raise ``AuthError`` saying why not."""
        if len(frames) < 2:
            raise AuthError("message has no authentication trailer")
        trailer = bytes(memoryview(getattr(frames[-1], "buffer", frames[-1])))
        if len(trailer) != _TRAILER or not trailer.startswith(MAGIC):
            raise AuthError("message has no valid authentication trailer")
        stamp, tag = trailer[len(MAGIC) : -32], trailer[-32:]
        body = list(frames[:-1])
        # The MAC first: the timestamp is the sender's only if the MAC says so (see the module docstring).
        if not hmac.compare_digest(tag, self._mac(label, stamp, body)):
            raise AuthError("bad MAC (wrong secret, wrong direction or modified message)")
        (sent_ns,) = struct.unpack(">Q", stamp[:8])
        now = time.time_ns()
        if abs(now - sent_ns) > self.max_skew_ns:
            raise AuthError(f"timestamp is {(now - sent_ns) / 1e9:+.1f}s off (clock skew or replay)")
        if sent_ns < self.created_ns:
            raise AuthError(
                f"timestamp is {(self.created_ns - sent_ns) / 1e9:.1f}s before this process started "
                "(a replay across a restart, or a lagging clock)"
            )
        nonce = stamp[8:]
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                self._seen.discard(self._expiry.popleft()[1])
            if nonce in self._seen:
                raise AuthError("replayed message (nonce already seen)")
            self._seen.add(nonce)
            self._expiry.append((now + 2 * self.max_skew_ns, nonce))
        return body


def sign(auth: Auth | None, frames: Sequence[Any], label: bytes) -> list[Any]:
    """``auth.sign`` or the frames unchanged when auth is off."""
    return list(frames) if auth is None else auth.sign(frames, label)


def verify(auth: Auth | None, frames: Sequence[Any], label: bytes) -> list[Any]:
    """``auth.verify`` or the frames unchanged when auth is off."""
    return list(frames) if auth is None else auth.verify(frames, label)
