"""Membership of the weight channel: the run's channel token, the store values signed with it, and the
listening socket the channel's TCPStore is given.

The TCPStore has no authentication of its own, so every value the channel's logic trusts is signed:
HMAC-SHA256 with a key derived from the run's channel token over the value's full key name (its
generation prefix included, so a value cannot be moved to another key or generation) and its bytes. A
reader checks the MAC before it uses a value; a value that fails (written by someone without the token)
is ignored and logged once per key. Counters (``store.add``: join counts, heartbeats) cannot be signed;
the records they count can, and a count without a valid record is skipped.

The token: ``gkd train`` makes a random one per run, passes it to every child in ``GKD_CHANNEL_TOKEN``
and writes it to ``<output_dir>/channel.token`` (mode 0600) for rollout workers started by hand,
which read it with ``gkd rollout serve|join --channel-token-file FILE``. Without a token (the API used
directly, no environment variable) the channel is unauthenticated, as before, and says so when its store
is bound beyond loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

log = logging.getLogger("gkd.weights")

TOKEN_ENV = "GKD_CHANNEL_TOKEN"
TOKEN_FILE = "channel.token"
MIN_TOKEN_CHARS = 16
_MARK = b"\x00gkdmac1"  # between a signed value and its MAC
_MAC_BYTES = 32


class ChannelAuthError(ValueError):
    """A weight-channel value is signed and this side has no token, or a token is unusable."""


def new_token() -> str:
    return secrets.token_hex(32)


def token_env(folder: str | os.PathLike) -> dict[str, str]:
    """The run's channel token for the children of ``gkd train``: reuse ``GKD_CHANNEL_TOKEN`` when set,
    else make one; write it to ``folder/channel.token`` (0600) for hand-started workers. Returns the
    environment addition."""
    token = os.environ.get(TOKEN_ENV) or new_token()
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("weight channel token: %s (rollout workers started by hand: --channel-token-file)", path)
    return {TOKEN_ENV: token}


def shared_token_env(folder: str | os.PathLike) -> dict[str, str]:
    """The run's token on nodes other than 0: ``GKD_CHANNEL_TOKEN`` when set (e.g. exported once by the
    batch script), else the file node 0's ``gkd train`` wrote in the shared output folder before the nodes
    met. ``ChannelAuthError`` in one line when neither is there."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return {TOKEN_ENV: token}
    path = Path(folder) / TOKEN_FILE
    if not path.is_file():
        raise ChannelAuthError(
            f"{path}: node 0 wrote no weight channel token here; put trainer.output_dir on a file system "
            f"every node shares, or export the same {TOKEN_ENV} on every node"
        )
    return {TOKEN_ENV: read_token_file(path)}


def read_token_file(path: str | os.PathLike) -> str:
    """The token in ``path`` (whitespace stripped); ``ChannelAuthError`` naming the file otherwise."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ChannelAuthError(f"--channel-token-file {path}: cannot read it ({exc.strerror})") from exc
    if len(token) < MIN_TOKEN_CHARS:
        raise ChannelAuthError(
            f"--channel-token-file {path}: the token is {len(token)} characters, need at least "
            f"{MIN_TOKEN_CHARS} (use the file `gkd train` writes: <output_dir>/{TOKEN_FILE})"
        )
    return token


def channel_key(token: str | bytes | None = None) -> bytes | None:
    """The MAC key for ``token`` (default: ``GKD_CHANNEL_TOKEN``); None when there is none."""
    token = os.environ.get(TOKEN_ENV) if token is None else token
    if not token:
        return None
    raw = token.encode() if isinstance(token, str) else token
    return hmac.new(raw, b"gkd weight channel v1", hashlib.sha256).digest()


def mac(key: bytes, *parts: bytes | memoryview) -> bytes:
    """HMAC-SHA256 over ``parts``, each length-prefixed (no two splits of the bytes agree)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        view = memoryview(part)
        h.update(view.nbytes.to_bytes(8, "big"))
        h.update(view)
    return h.digest()


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def listen_address(host: str) -> str:
    """The address to bind for a store hosted on ``host``: that address itself, except a machine name
    that resolves to loopback (Debian's 127.0.1.1 for the hostname): remote workers could not reach it,
    so every interface is bound, as torch would (the token still guards membership), with a warning."""
    if host in LOOPBACK_NAMES:
        return host
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0]
    except (OSError, IndexError):
        return host  # the bind names the problem
    address = addr[0]
    if address.startswith("127.") or address == "::1":
        log.warning(
            "weight channel: %s resolves to %s (loopback), which remote workers cannot reach; the store "
            "listens on every interface",
            host,
            address,
        )
        return "::" if family == socket.AF_INET6 else "0.0.0.0"
    return address


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` only (:func:`listen_address`). torch's TCPStore server binds
    every interface whatever host it is given; given this socket's descriptor (``master_listen_fd``) it
    serves on it instead."""
    address = listen_address(host)
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class SignedStore:
    """A store whose ``set``/``get`` values carry a MAC (see the module docstring); everything else is
    passed through. ``scope``: the store's key prefix, part of every MAC. ``key`` None: no signing."""

    def __init__(
        self, store, key: bytes | None, scope: str = "", timeout: timedelta = timedelta(seconds=600)
    ):
        self.raw, self.key, self.scope, self.timeout = store, key, scope, timeout
        self._warned: set[str] = set()

    def _tag(self, name: str, value: bytes) -> bytes:
        assert self.key is not None
        return mac(self.key, (self.scope + name).encode(), value)

    def set(self, name: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        if self.key is not None:
            data += _MARK + self._tag(name, data)
        self.raw.set(name, data)

    def verified(self, name: str) -> bytes | None:
        """The value of ``name`` if it is there and genuine, else None (a forged one is logged once)."""
        if not self.raw.check([name]):
            return None
        data = self.raw.get(name)
        signed = (
            len(data) >= len(_MARK) + _MAC_BYTES and data[-_MAC_BYTES - len(_MARK) : -_MAC_BYTES] == _MARK
        )
        if self.key is None:
            if signed:
                raise ChannelAuthError(
                    "the weight channel is authenticated and this worker has no channel token: pass "
                    f"--channel-token-file (the trainer's <output_dir>/{TOKEN_FILE}) or set {TOKEN_ENV}"
                )
            return data
        if signed:
            value = data[: -_MAC_BYTES - len(_MARK)]
            if hmac.compare_digest(data[-_MAC_BYTES:], self._tag(name, value)):
                return value
        if name not in self._warned:
            self._warned.add(name)
            log.warning(
                "weight channel: ignoring a forged value of %r (not signed with this run's channel token; "
                "someone without it can reach the store)",
                self.scope + name,
            )
        return None

    def get(self, name: str) -> bytes:
        """The genuine value of ``name``, waiting (``timeout``) while it is missing or forged."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while True:
            value = self.verified(name)
            if value is not None:
                return value
            if time.monotonic() > deadline:
                from gkd.weights.wire import WeightSyncError

                raise WeightSyncError(
                    f"weight channel: no genuine value of {self.scope + name!r} within "
                    f"{self.timeout.total_seconds():g}s"
                )
            time.sleep(0.05)

    def check(self, names: Sequence[str]) -> bool:
        return self.raw.check(list(names))

    def wait(self, names: Sequence[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self.raw.wait(list(names))
        else:
            self.raw.wait(list(names), timeout)

    def add(self, name: str, amount: int) -> int:
        return self.raw.add(name, amount)
