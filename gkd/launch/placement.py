"""Which GPUs each process of a run gets on this node, and how a GPU engine is sized.

``plan(cfg, gpus)`` is pure: from the config and the number of GPUs on this node it returns disjoint
device sets for the trainer (``trainer.n_gpus_per_node``, one torchrun process per GPU), each rollout
worker and each teacher worker (``tensor_parallel_size`` GPUs each, ``n_gpus_per_node / tensor_parallel_size``
workers) -- only for the services this launcher starts (``teacher.launch`` / ``rollout.launch``; with
several nodes, those whose ``*.node_rank`` is this node's: ``plan(cfg, gpus, node_rank)``) -- or
raises :class:`PlacementError` with one line naming the keys and counts. Device ids are strings, as
``CUDA_VISIBLE_DEVICES`` takes them: the node's physical ids (``0..N-1``, or the launcher's own inherited
``CUDA_VISIBLE_DEVICES`` list), so each child gets its own ``CUDA_VISIBLE_DEVICES``.

Refused:
- a role asking for GPUs on a machine without CUDA (``GKD_FAKE_GPUS`` not set);
- ``n_gpus_per_node`` not divisible by ``tensor_parallel_size``; ``workers`` that differ from
  ``n_gpus_per_node / tensor_parallel_size`` (the trainer sizes the weight channel from ``workers``, so
  the launcher does not silently derive it);
- an oversubscribed node (the roles' GPUs add up to more than are present), unless
  ``trainer.allow_shared_gpu`` (one or two GPUs: configs/gpu_1x.yaml, gpu_2x.yaml): roles then share
  GPUs round-robin and the weight channel is gloo where the rollout shares the trainer's GPU, but a
  NCCL group (the trainer's ranks, one tensor-parallel engine) still never has two members on one GPU.

CPU threads: every process this node starts gets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (torch's
intra-op threads) from ``trainer.threads``, ``rollout.threads``, ``teacher.threads`` (per process); 0 =
auto: the node's cores (this launcher's CPU affinity) less those of the explicit roles, split evenly
between the processes of the roles left on auto, at least 1 each (:func:`plan_threads`).

``GKD_FAKE_GPUS=N`` is a testing knob read only by :func:`detect_gpus` (the launcher): plan for N GPUs on a
machine without them (``gkd train --dry-run``).

:class:`VLLMOptions` carries the vLLM engine knobs of one service (CLI flags <-> spec <-> ``vllm.LLM``
keyword arguments); :func:`worker_gpus` cuts a service's GPU list into one slice per worker (both in
:mod:`gkd.services.gpus`, re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gkd.config import Config
from gkd.services.gpus import (
    VISIBLE_ENV,
    PlacementError,
    VLLMOptions,
    _ids,
    weight_backend,
    worker_gpus,
)

__all__ = [
    "FAKE_GPUS_ENV",
    "Plan",
    "PlacementError",
    "VLLMOptions",
    "detect_gpus",
    "available_cores",
    "launched_here",
    "plan",
    "plan_threads",
    "weight_backend",
    "worker_gpus",
]

FAKE_GPUS_ENV = "GKD_FAKE_GPUS"
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch's intra-op pool reads them at start-up


@dataclass(frozen=True)
class Found:
    """The GPUs this node has: ``ids`` as ``CUDA_VISIBLE_DEVICES`` takes them; ``source`` says how known."""

    ids: tuple[str, ...]
    source: str  # "cuda" | "GKD_FAKE_GPUS" | "none" (no CUDA) | "unprobed" (nothing asked for GPUs)

    @property
    def count(self) -> int:
        return len(self.ids)


def detect_gpus(env: Mapping[str, str] | None = None) -> Found:
    """``GKD_FAKE_GPUS=N`` -> ids 0..N-1; else torch's CUDA devices (their physical ids: an inherited
    ``CUDA_VISIBLE_DEVICES`` list, else 0..count-1); else none."""
    env = os.environ if env is None else env
    fake = env.get(FAKE_GPUS_ENV)
    if fake is not None:
        if not fake.strip().isdigit():
            raise PlacementError(f"{FAKE_GPUS_ENV}={fake!r}: expected a GPU count (an integer >= 0)")
        return Found(tuple(str(i) for i in range(int(fake))), FAKE_GPUS_ENV)
    import torch

    if not torch.cuda.is_available():
        return Found((), "none")
    count = torch.cuda.device_count()
    inherited = [d.strip() for d in env.get(VISIBLE_ENV, "").split(",") if d.strip()]
    ids = inherited[:count] if len(inherited) >= count else [str(i) for i in range(count)]
    return Found(tuple(ids), "cuda")


@dataclass(frozen=True)
class Plan:
    """Device sets for this node; an empty set means the role runs on CPU (or is not started here)."""

    found: Found
    trainer: tuple[str, ...]
    rollout: tuple[tuple[str, ...], ...]  # one slice per rollout worker started here
    teacher: tuple[tuple[str, ...], ...]  # one slice per teacher worker started here
    shared: bool  # roles share GPUs (trainer.allow_shared_gpu and more asked than present)
    weight_backend: str
    trainer_procs: int  # torchrun processes on this node
    cpu_services: tuple[tuple[str, int], ...] = ()  # (role, workers) of services started here on CPU
    node_rank: int = 0  # this node of trainer.nnodes; its trainer ranks follow the lower nodes'
    threads: tuple[tuple[str, int], ...] = ()  # (role, torch threads per process) of the roles here
    cores: int = 0  # CPU cores the threads were planned for

    def threads_of(self, role: str) -> int | None:
        """Torch threads per process of ``role`` (None: not planned, the child inherits the environment)."""
        return dict(self.threads).get(role)

    def child_env(self, role: str, devices: Sequence[str]) -> dict[str, str]:
        """What a child of ``role`` on ``devices`` adds to the launcher's environment: its
        ``CUDA_VISIBLE_DEVICES`` (when it has GPUs) and its thread counts."""
        env = {VISIBLE_ENV: _ids(devices)} if devices else {}
        n = self.threads_of(role)
        return env if n is None else {**env, **{k: str(n) for k in THREAD_ENVS}}

    @staticmethod
    def pool(slices: Sequence[Sequence[str]]) -> tuple[str, ...]:
        return tuple(d for s in slices for d in s)

    def table(self, node: str = "this node") -> str:
        """The plan as a small table (printed by ``gkd train`` before anything starts); ``node`` names
        the node in its first line."""
        source = {"cuda": "CUDA", FAKE_GPUS_ENV: f"{FAKE_GPUS_ENV}={self.found.count}", "none": "no CUDA"}
        source["unprobed"] = "not probed: no role asks for GPUs"
        lines = [f"GPU plan for {node}: {self.found.count} GPU(s) ({source[self.found.source]})"]
        rows = [("role", "worker", "GPUs", "CUDA_VISIBLE_DEVICES", "threads")]
        n, first = self.trainer_procs, self.node_rank * self.trainer_procs
        ranks = f"rank {first}" if n == 1 else f"ranks {first}-{first + n - 1}"

        def threads(role: str) -> str:
            n = self.threads_of(role)
            return "-" if n is None else str(n)

        if self.trainer:
            rows.append(("trainer", ranks, str(len(self.trainer)), _ids(self.trainer), threads("trainer")))
        else:
            rows.append(("trainer", ranks, "cpu", "-", threads("trainer")))
        for name, slices in (("rollout", self.rollout), ("teacher", self.teacher)):
            rows += [(name, str(i), str(len(s)), _ids(s), threads(name)) for i, s in enumerate(slices)]
        rows += [
            (name, "0" if n == 1 else f"0-{n - 1}", "cpu", "-", threads(name))
            for name, n in self.cpu_services
        ]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        used = set(self.trainer) | set(self.pool(self.rollout)) | set(self.pool(self.teacher))
        idle = [d for d in self.found.ids if d not in used]
        if idle:
            lines.append(f"  idle: {_ids(idle)}")
        if self.shared:
            lines.append("  roles share GPUs (trainer.allow_shared_gpu=true: they split each GPU's memory)")
        lines.append(f"  weight channel (trainer rank 0 -> rollout workers): {self.weight_backend}")
        if self.cores:
            lines.append(
                f"  threads: OMP_NUM_THREADS per process ({self.cores} CPU cores here; "
                "*.threads=0 splits them)"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Pool:
    role: str  # config section
    gpus: int
    tp: int
    workers: int
    launched: bool


def launched_here(section, node_rank: int) -> bool:
    """The teacher or rollout ``section`` is started by the ``gkd train`` of node ``node_rank``."""
    return section.launch and section.node_rank == node_rank


def _pools(cfg: Config, node_rank: int) -> list[_Pool]:
    t, r = cfg.teacher, cfg.rollout
    return [
        _Pool("rollout", r.n_gpus_per_node, r.tensor_parallel_size, r.workers, launched_here(r, node_rank)),
        _Pool("teacher", t.n_gpus_per_node, t.tensor_parallel_size, t.workers, launched_here(t, node_rank)),
    ]


def _check_pool(p: _Pool, backend: str) -> None:
    key = f"{p.role}.n_gpus_per_node"
    if p.gpus < 0:
        raise PlacementError(f"{key}={p.gpus}: must be >= 0 (0 = CPU engines)")
    if p.tp < 1:
        raise PlacementError(f"{p.role}.tensor_parallel_size={p.tp}: must be >= 1")
    if p.tp > 1 and backend != "vllm":
        raise PlacementError(
            f"{p.role}.tensor_parallel_size={p.tp} needs {p.role}.backend=vllm "
            "(the hf engine runs on one device)"
        )
    if p.gpus == 0:
        if p.tp > 1:
            raise PlacementError(f"{p.role}.tensor_parallel_size={p.tp} needs GPUs ({key}=0 runs on CPU)")
        return
    if p.gpus % p.tp:
        raise PlacementError(
            f"{key}={p.gpus} is not divisible by {p.role}.tensor_parallel_size={p.tp} (each engine takes "
            f"{p.tp} GPUs)"
        )
    if p.workers != p.gpus // p.tp:
        raise PlacementError(
            f"{p.role}.workers={p.workers} does not match {key}={p.gpus} / {p.role}.tensor_parallel_size="
            f"{p.tp} = {p.gpus // p.tp} engines per node; set {p.role}.workers={p.gpus // p.tp}"
        )


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (taskset, Slurm, cgroup cpusets), else
    ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _role_processes(cfg: Config, node_rank: int) -> dict[str, int]:
    """The compute processes of each role started on node ``node_rank``: the trainer's ranks, one per
    engine GPU (a GPU service) or per worker (a CPU one)."""
    out = {"trainer": cfg.trainer.procs_per_node}
    for p in _pools(cfg, node_rank):
        if p.launched:
            out[p.role] = p.gpus or p.workers
    return out


def plan_threads(cfg: Config, node_rank: int, cores: int) -> dict[str, int]:
    """Torch threads per process for each role node ``node_rank`` runs: ``<role>.threads`` when set; the
    roles on 0 (auto) share the ``cores`` the others leave, evenly per process, at least 1 each."""
    for role in ("trainer", "rollout", "teacher"):
        n = getattr(cfg, role).threads
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PlacementError(
                f"{role}.threads={n!r}: expected an integer >= 0 (torch threads per {role} process; 0 = "
                f"auto, this node's {cores} core(s) split between its processes)"
            )
    procs = _role_processes(cfg, node_rank)
    out = {role: getattr(cfg, role).threads for role in procs if getattr(cfg, role).threads}
    auto = [role for role in procs if role not in out]
    left = cores - sum(out[role] * procs[role] for role in out)
    share = max(1, left // max(1, sum(procs[role] for role in auto)))
    return {**out, **{role: share for role in auto}}


def plan(cfg: Config, found: Found, node_rank: int = 0, cores: int | None = None) -> Plan:
    """Place the trainer and the services launched on node ``node_rank`` (``*.launch`` and
    ``*.node_rank``) on ``found``'s GPUs, and size each process's CPU threads for ``cores`` (default:
    :func:`available_cores`); see the module docstring."""
    cores = available_cores() if cores is None else cores
    threads = plan_threads(cfg, node_rank, cores)
    tr = cfg.trainer
    pools = _pools(cfg, node_rank)
    backends = {"rollout": cfg.rollout.backend, "teacher": cfg.teacher.backend}
    for p in pools:
        if p.launched:
            _check_pool(p, backends[p.role])
    local = [p for p in pools if p.launched and p.gpus > 0]
    asked = [("trainer", tr.n_gpus_per_node)] + [(p.role, p.gpus) for p in local]
    asked = [(role, n) for role, n in asked if n > 0]
    total = sum(n for _, n in asked)
    counts = " + ".join(f"{role} {n}" for role, n in asked)
    if asked and found.source == "none":
        keys = ", ".join(f"{role}.n_gpus_per_node={n}" for role, n in asked)
        verb = "asks" if len(asked) == 1 else "ask"
        raise PlacementError(
            f"{keys} {verb} for GPUs, but CUDA is not available here (torch.cuda.is_available() is False); "
            f"set {' and '.join(f'{role}.n_gpus_per_node=0' for role, _ in asked)} to run on CPU "
            f"({FAKE_GPUS_ENV}=N with --dry-run only plans for N GPUs)"
        )
    shared = total > found.count
    if shared and not tr.allow_shared_gpu:
        raise PlacementError(
            f"node oversubscribed: {counts} = {total} GPUs asked, {found.count} present; lower the "
            "*.n_gpus_per_node keys (roles may not share a GPU: NCCL refuses two ranks on one; "
            "trainer.allow_shared_gpu=true lets them share, as configs/gpu_1x.yaml does)"
        )
    for role, n in asked:  # shared or not, one NCCL group never has two members on one GPU
        per_group = n if role == "trainer" else next(p.tp for p in local if p.role == role)
        if per_group > found.count:
            what = "the trainer's ranks" if role == "trainer" else "one engine's tensor-parallel ranks"
            key = "trainer.n_gpus_per_node" if role == "trainer" else f"{role}.tensor_parallel_size"
            raise PlacementError(
                f"{key}={per_group} > {found.count} GPU(s) present: {what} form a NCCL group, which refuses "
                "two ranks on one GPU (trainer.allow_shared_gpu shares GPUs between roles only)"
            )
    cursor = 0

    def take(n: int) -> tuple[str, ...]:  # the next n GPUs, round-robin when the roles share them
        nonlocal cursor
        out = tuple(found.ids[(cursor + i) % found.count] for i in range(n))
        cursor += n
        return out

    trainer = take(tr.n_gpus_per_node) if tr.n_gpus_per_node else ()
    slices: dict[str, tuple[tuple[str, ...], ...]] = {"rollout": (), "teacher": ()}
    for p in local:
        slices[p.role] = tuple(take(p.tp) for _ in range(p.gpus // p.tp))
    return Plan(
        found=found,
        trainer=trainer,
        rollout=slices["rollout"],
        teacher=slices["teacher"],
        shared=shared,
        weight_backend=weight_backend(cfg),
        trainer_procs=tr.procs_per_node,
        cpu_services=tuple((p.role, p.workers) for p in pools if p.launched and p.gpus == 0),
        node_rank=node_rank,
        threads=tuple(threads.items()),
        cores=cores,
    )


# ------------------------------------------------------------------------------- services: GPUs, vLLM
