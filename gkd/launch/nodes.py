"""Which node of a multi-node run this ``gkd train`` is: its rank, the node count, the rendezvous endpoint
and the address its services bind, from ``gkd train``'s flags, else from Slurm's environment.

    gkd train --nnodes 2 --node-rank 1 --rdzv-endpoint node0:29400 [--host 10.0.0.2] --config X.yaml
    srun gkd train --config X.yaml        # Slurm: SLURM_NNODES, SLURM_NODEID, the job's first host

Flags win over Slurm's variables, which win over ``trainer.nnodes``; a ``--nnodes`` (or ``SLURM_NNODES``)
that differs from a ``trainer.nnodes`` the config sets (anything but its default, 1) is refused in one
line naming both. Without a ``--rdzv-endpoint`` under Slurm, the endpoint is the job's first host (its
node list expanded by ``scontrol show hostnames``, or by :func:`expand_hostlist` where scontrol is missing)
at :data:`DEFAULT_RDZV_PORT`.

The bind address (``--host``) defaults to 127.0.0.1 on one node; on several, to the address this machine
uses to reach the rendezvous host (the source address of a UDP "connection" to it: no packet is sent), so
a hostname that ``/etc/hosts`` maps to 127.0.1.1 does not leak into the run; a loopback ``--host`` with a
rendezvous host elsewhere is refused (the other nodes could not reach it).

Imports nothing heavy (``gkd train`` runs it before it starts anything).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_RDZV_PORT",
    "NodeError",
    "NodeSpec",
    "expand_hostlist",
    "node_spec",
    "route_address",
    "slurm_hosts",
]

DEFAULT_RDZV_PORT = 29400


class NodeError(ValueError):
    """A flag or Slurm variable that does not describe a node of the run; the message names it."""


# ------------------------------------------------------------------------------------- Slurm hostlists


def _split_top(text: str) -> list[str]:
    """``"a[1,2],b"`` -> ``["a[1,2]", "b"]``: commas outside brackets separate hosts."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise NodeError(f"hostlist {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise NodeError(f"hostlist {text!r}: '[' without ']'")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_range(item: str, text: str) -> list[str]:
    """``"01-03"`` -> ``["01", "02", "03"]`` (zero padding kept, as Slurm does); ``"7"`` -> ``["7"]``."""
    lo, sep, hi = item.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise NodeError(f"hostlist {text!r}: {item!r} is not a number or a range like 01-03")
    if not sep:
        return [lo]
    if int(hi) < int(lo):
        raise NodeError(f"hostlist {text!r}: range {item!r} runs backwards")
    width = len(lo) if lo.startswith("0") else 0
    return [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]


def _expand_one(host: str, text: str) -> list[str]:
    """One comma-free host pattern; brackets may repeat (``r[1-2]n[3,5]``: the cartesian product)."""
    match = re.search(r"\[([^\[\]]*)\]", host)
    if match is None:
        return [host]
    head, tail = host[: match.start()], host[match.end() :]
    values = [v for item in match.group(1).split(",") for v in _expand_range(item.strip(), text)]
    return [f"{head}{v}{rest}" for v in values for rest in _expand_one(tail, text)]


def expand_hostlist(text: str) -> list[str]:
    """Slurm's hostlist syntax, expanded in order: ``"gpu[01-03,07],cpu5"`` -> ``["gpu01", "gpu02",
    "gpu03", "gpu07", "cpu5"]``. A malformed list raises :class:`NodeError` naming it."""
    hosts = [h for part in _split_top(text) for h in _expand_one(part, text)]
    if not hosts:
        raise NodeError(f"hostlist {text!r} names no host")
    return hosts


def slurm_hosts(nodelist: str, *, scontrol: str | None = None) -> list[str]:
    """The hosts of ``SLURM_JOB_NODELIST``: ``scontrol show hostnames`` when scontrol is on PATH (it knows
    every syntax Slurm has), else :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol") if scontrol is None else scontrol
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            hosts = out.stdout.split()
            if out.returncode == 0 and hosts:
                return hosts
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_hostlist(nodelist)


# -------------------------------------------------------------------------------------- this node


@dataclass(frozen=True)
class NodeSpec:
    """This ``gkd train``'s place in the run. ``rdzv_host:rdzv_port``: where the launchers meet (node 0
    listens there); ``host``: the address this node's services bind and the other nodes use."""

    nnodes: int
    node_rank: int
    rdzv_host: str
    rdzv_port: int
    host: str
    source: str  # "flags" | "slurm" | "config" (one node)

    @property
    def multi(self) -> bool:
        return self.nnodes > 1

    @property
    def torch_port(self) -> int:
        """torchrun's own store (its static rendezvous, hosted by node 0's agent): the next port."""
        return self.rdzv_port + 1


def route_address(peer: str, port: int = DEFAULT_RDZV_PORT) -> str:
    """The local address this machine uses to reach ``peer`` (a UDP socket's source address after
    ``connect``; nothing is sent). A loopback ``peer`` gives 127.0.0.1."""
    try:
        infos = socket.getaddrinfo(peer, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise NodeError(
            f"rendezvous host {peer!r} does not resolve ({e.strerror}); check --rdzv-endpoint"
        ) from e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
        except OSError as e:
            raise NodeError(
                f"no route from this machine to the rendezvous host {peer} ({e.strerror}); pass --host ADDR "
                "(the address the other nodes reach this one at)"
            ) from e
        return s.getsockname()[0]


def _int(value: str | int, name: str, minimum: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise NodeError(f"{name}={value!r}: expected an integer >= {minimum}") from None
    if n < minimum:
        raise NodeError(f"{name}={n}: must be >= {minimum}")
    return n


def _endpoint(text: str, name: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_RDZV_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise NodeError(
            f"{name}={text}: expected HOST:PORT (a port in 1..65534), e.g. node0:{DEFAULT_RDZV_PORT}"
        )
    return host, int(port)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def node_spec(
    *,
    nnodes: int | None,
    node_rank: int | None,
    rdzv_endpoint: str | None,
    host: str | None,
    config_nnodes: int,
    env: Mapping[str, str],
) -> NodeSpec:
    """Resolve this node from the flags (None: not given), Slurm's variables in ``env`` and the config's
    ``trainer.nnodes``; see the module docstring. Raises :class:`NodeError` with one line."""
    slurm = "SLURM_NNODES" in env and "SLURM_NODEID" in env
    source = "flags" if nnodes is not None else ("slurm" if slurm else "config")
    if nnodes is None:
        nnodes = _int(env["SLURM_NNODES"], "SLURM_NNODES", 1) if slurm else config_nnodes
        given = "SLURM_NNODES" if slurm else None
    else:
        nnodes = _int(nnodes, "--nnodes", 1)
        given = "--nnodes"
    if given and config_nnodes != 1 and config_nnodes != nnodes:
        raise NodeError(
            f"{given}={nnodes} does not match trainer.nnodes={config_nnodes} in the config; make them equal "
            f"or drop trainer.nnodes ({given} wins over its default)"
        )
    rank_name = "--node-rank"
    if node_rank is None:
        rank_name = "SLURM_NODEID"
        node_rank = _int(env["SLURM_NODEID"], "SLURM_NODEID", 0) if slurm else 0
        if nnodes > 1 and not slurm:
            raise NodeError(
                f"--nnodes {nnodes} needs --node-rank R (0..{nnodes - 1}; node 0 hosts trainer rank 0)"
            )
    node_rank = _int(node_rank, rank_name, 0)
    if node_rank >= nnodes:
        raise NodeError(f"{rank_name} {node_rank} is not in 0..{nnodes - 1} (nodes: {nnodes})")
    if rdzv_endpoint is not None:
        rdzv_host, rdzv_port = _endpoint(rdzv_endpoint, "--rdzv-endpoint")
    elif nnodes == 1:
        rdzv_host, rdzv_port = "127.0.0.1", DEFAULT_RDZV_PORT
    elif slurm and env.get("SLURM_JOB_NODELIST"):
        rdzv_host, rdzv_port = slurm_hosts(env["SLURM_JOB_NODELIST"])[0], DEFAULT_RDZV_PORT
    else:
        raise NodeError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node)"
        )
    if host is None:
        host = "127.0.0.1" if nnodes == 1 else route_address(rdzv_host, rdzv_port)
    if nnodes > 1 and _loopback(host) and not _loopback(rdzv_host):
        raise NodeError(
            f"--host {host} is a loopback address, which the other nodes cannot reach; give this node's "
            "address on the network the nodes share"
        )
    return NodeSpec(nnodes, node_rank, rdzv_host, rdzv_port, host, source)
