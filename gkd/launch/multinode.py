"""What a multi-node ``gkd train`` derives from the config and the nodes' addresses: where each service
runs and is reached, the trainer's torchrun flags and config additions, and the whole run's plan.

Addresses, all from the roster (``gkd.launch.roster``: every node's bind address, by rank) and the config:

- the teacher service runs on node ``teacher.node_rank``, bound to that node's address, on
  ``teacher.server_port`` / ``teacher.backend_port``; the rollout service likewise (``rollout.*``);
- the weight channel's store is trainer rank 0's, on node 0: the rollout service gets
  ``--weight-channel <node 0>:rollout.weight_port``;
- the trainer ranks: torchrun's static rendezvous (``--nnodes N --node-rank R --master-addr <node 0>
  --master-port <rendezvous port + 1>``): node R runs global ranks ``R*P .. R*P+P-1``, so trainer rank 0
  (the driver: the services' client, the weight channel's host) is always on node 0. (torchrun's c10d
  rendezvous would order the nodes by hostname, not by ``--node-rank``.) The trainer gets
  ``trainer.nnodes`` and each launched service's address as ``teacher.server_ip`` / ``rollout.server_ip``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from gkd.config import Config
from gkd.launch.nodes import NodeSpec, slurm_hosts
from gkd.launch.placement import Found, PlacementError
from gkd.launch.placement import plan as place

__all__ = [
    "check_nodes",
    "dry_run_hosts",
    "node_report",
    "service_host",
    "trainer_overrides",
    "trainer_node_argv",
]


def check_nodes(cfg: Config, nnodes: int) -> None:
    """The services' ``*.node_rank`` name nodes of the run; a launched rollout service has one node's
    workers (``rollout.nnodes=1``). Raises :class:`PlacementError` in one line."""
    for name in ("teacher", "rollout"):
        section = getattr(cfg, name)
        if section.launch and not 0 <= section.node_rank < nnodes:
            raise PlacementError(
                f"{name}.node_rank={section.node_rank} is not a node of this run "
                f"(0..{nnodes - 1}, --nnodes {nnodes})"
            )
    if cfg.rollout.launch and cfg.rollout.nnodes != 1:
        raise PlacementError(
            f"rollout.nnodes={cfg.rollout.nnodes} with rollout.launch=true: `gkd train` starts the rollout "
            "service on one node (rollout.node_rank); set rollout.nnodes=1, or start the service yourself"
        )


def service_host(cfg: Config, name: str, hosts: Sequence[str]) -> str:
    """Where the trainer reaches a service: its node's address when ``gkd train`` launches it, else the
    config's ``<name>.server_ip``."""
    section = getattr(cfg, name)
    return hosts[section.node_rank] if section.launch else section.server_ip


def trainer_overrides(cfg: Config, hosts: Sequence[str]) -> list[str]:
    """The config additions every trainer rank of a multi-node run gets (after the user's overrides)."""
    out = [f"trainer.nnodes={len(hosts)}"]
    for name in ("teacher", "rollout"):
        if getattr(cfg, name).launch:
            out.append(f"{name}.server_ip={service_host(cfg, name, hosts)}")
    return out


def trainer_node_argv(cfg: Config, node: NodeSpec, hosts: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run`` with this node's static-rendezvous flags (before ``-m``)."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", str(node.nnodes)),
        *("--node-rank", str(node.node_rank), "--nproc-per-node", str(cfg.trainer.procs_per_node)),
        *("--rdzv-backend", "static", "--master-addr", hosts[0], "--master-port", str(node.torch_port)),
    ]


def dry_run_hosts(node: NodeSpec, env: Mapping[str, str] | None = None) -> list[str]:
    """Every node's address as far as a dry run knows it (no roster formed): this node's, node 0's (the
    rendezvous host), Slurm's node list, else a placeholder."""
    env = os.environ if env is None else env
    listed: list[str] = []
    if env.get("SLURM_JOB_NODELIST"):
        listed = slurm_hosts(env["SLURM_JOB_NODELIST"])
    hosts = []
    for r in range(node.nnodes):
        if r == node.node_rank:
            hosts.append(node.host)
        elif r < len(listed):
            hosts.append(listed[r])
        elif r == 0:
            hosts.append(node.rdzv_host)
        else:
            hosts.append(f"<node {r}'s --host>")
    return hosts


def _service_lines(cfg: Config, r: int, hosts: Sequence[str]) -> list[str]:
    lines = []
    for name in ("teacher", "rollout"):
        s = getattr(cfg, name)
        if s.launch and s.node_rank == r:
            lines.append(
                f"  {name} service binds {hosts[r]}:{s.server_port} (clients), :{s.backend_port} (workers)"
            )
    if r == 0:
        lines.append(f"  trainer rank 0 hosts the weight channel's store on :{cfg.rollout.weight_port}")
    return lines


def node_report(cfg: Config, found: Found, node: NodeSpec, hosts: Sequence[str]) -> str:
    """Every node's plan (its trainer ranks, services, GPUs, bind addresses and ports), this node's
    marked; every node is assumed to have this node's GPUs."""
    out = [
        f"{node.nnodes} nodes; launchers meet at {node.rdzv_host}:{node.rdzv_port}, torchrun's static "
        f"rendezvous at {hosts[0]}:{node.torch_port}"
    ]
    for r in range(node.nnodes):
        mark = ", this node" if r == node.node_rank else ""
        out.append(place(cfg, found, r).table(node=f"node {r} ({hosts[r]}{mark})"))
        out += _service_lines(cfg, r, hosts)
    return "\n".join(out)
