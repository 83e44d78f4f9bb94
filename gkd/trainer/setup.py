"""The trainer's building blocks, one call per start-up step of :class:`gkd.trainer.recipe.Trainer`: the
process group and device, the student (sharded with FSDP2 or wrapped by DDP later), the service clients and
their secrets, W&B, where the weight channel is hosted and on which backend. ``gkd.trainer.recipe`` re-exports
them."""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from gkd.config import Config
from gkd.metrics.records import WandbRun
from gkd.trainer.step import torch_dtype

log = logging.getLogger("gkd.trainer")  # the trainer's log lines keep one name, wherever they are written


class StartupError(RuntimeError):
    """A check before training failed (service unreachable, vocabularies differ...); says what to do."""


def _init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """torchrun env -> (rank, world, device). Without torchrun env: a single process, no group."""
    gpu = cfg.trainer.n_gpus_per_node > 0
    if gpu and not torch.cuda.is_available():
        raise StartupError(
            f"trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node} asks for GPUs, but CUDA is not available "
            f"here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); set "
            "trainer.n_gpus_per_node=0 to train on the CPU"
        )
    if gpu:
        # fp32 matmuls that remain (e.g. outside autocast) use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        timeout = timedelta(seconds=cfg.trainer.collective_timeout_s)
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timeout)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def param_dtype(cfg: Config) -> str:
    """The student's master weights and AdamW state: ``model.param_dtype`` on every device. (The rollout
    engines run in ``gkd.config.rollout_dtype(cfg)``: weights are cast to it when packed.)"""
    return cfg.model.param_dtype


def _load_student(cfg: Config, device: torch.device, *, sharded: bool = False):
    """(student, tokenizer). ``sharded`` (FSDP2 without LoRA, a folder of safetensors): the parameters are
    left on the meta device (no memory) for :func:`materialize_student` to fill after ``shard_fsdp2``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = cfg.model.student_path
    if not Path(path).is_dir():
        raise StartupError(f"model.student_path={path}: no such folder (a transformers model folder)")
    dtype = torch_dtype(param_dtype(cfg))
    if sharded and not cfg.model.lora.enabled and _weight_files(path):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.model.lora.enabled:  # frozen base + adapter in the base's dtype (before sharding / DDP)
        from gkd.trainer.lora import apply_lora

        with torch.random.fork_rng(devices=[]):  # one adapter init on every rank, whatever the world size
            torch.manual_seed(cfg.trainer.seed)
            model = apply_lora(model, cfg.model.lora)
    model.train()
    return model, AutoTokenizer.from_pretrained(path)


def _weight_files(path: str) -> list[Path]:
    """The safetensors files of a model folder (one file, or the shards an index names)."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def materialize_student(model: torch.nn.Module, cfg: Config, device: torch.device, read_bytes: int = 1 << 30):
    """Fill a sharded student built on the meta device by :func:`_load_student`: allocate each rank's
    shards, recompute the buffers a checkpoint does not hold (rotary ``inv_freq``: transformers'
    ``_init_weights`` of the modules that own them), and load the weights: rank 0 reads them from the
    safetensors files a group at a time (at most ``read_bytes``, and at most 1/(2 x world) of the model), and
    ``set_model_state_dict(..., broadcast_from_rank0=True)`` broadcasts each tensor into every rank's
    shards. Rank 0 holds its shards plus one group, the others their shards plus the tensor being
    broadcast. Tied parameters stay one parameter (loaded once, by their first name)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not any(p.is_meta for p in model.parameters()):
        return
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():  # parameterless modules with buffers: rotary embeddings
            if not list(module.parameters(recurse=False)) and list(module.buffers(recurse=False)):
                model._init_weights(module)
    seen, names, saved = set(), [], set(model.state_dict())
    for name, p in model.named_parameters():  # first names only: a tied alias is the same parameter
        if id(p) not in seen:
            seen.add(id(p))
            names.append((name, p.numel() * p.element_size()))
    names += [(n, b.numel() * b.element_size()) for n, b in model.named_buffers() if n in saved]
    dtype = next(model.parameters()).dtype
    read_bytes = max(1, min(read_bytes, sum(n for _, n in names) // (2 * dist.get_world_size())))
    reader = _WeightReader(cfg.model.student_path, dtype)  # every rank: the names (headers only)
    missing = [n for n, _ in names if n not in reader.where]
    if missing:  # on every rank, before any collective
        raise StartupError(
            f"model.student_path={reader.path}: its safetensors lack {missing[:3]} (other parameter "
            "names?); load it once with transformers and save_pretrained it"
        )
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    group, used = [], 0
    for i, (name, nbytes) in enumerate(names):
        group.append(name)
        used += nbytes
        if used >= read_bytes or i == len(names) - 1:
            set_model_state_dict(model, reader.read(group) if dist.get_rank() == 0 else {}, options=options)
            group, used = [], 0
    if dist.get_rank() == 0:
        log.info(
            "student loaded from %s: %d tensors broadcast into the shards", reader.path, len(reader.done)
        )


class _WeightReader:
    """A student folder's safetensors: which file holds each name (headers only), and groups of tensors
    cast to ``dtype``. Files are opened per group: a mapping kept open would count every page read so far
    in this process's RSS."""

    def __init__(self, path: str, dtype: torch.dtype) -> None:
        from safetensors import safe_open

        self.dtype, self.path, self.where = dtype, path, {}
        for file in _weight_files(path):
            with safe_open(str(file), framework="pt") as f:
                self.where.update(dict.fromkeys(f.keys(), str(file)))
        self.done: set[str] = set()

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for file in sorted({self.where[n] for n in names}):
            with safe_open(file, framework="pt") as f:
                out.update({n: f.get_tensor(n).to(self.dtype) for n in names if self.where[n] == file})
        self.done.update(names)
        return out


def _auth_hint(service: str, secret_file: str | None) -> str:
    """A service with authentication on drops unsigned or wrongly signed requests without a reply, so a
    missing or wrong secret looks like an unreachable service: say so."""
    if secret_file:
        return (
            f"; if it runs with --auth-secret-file, {service}.auth_secret_file={secret_file} must hold "
            "the same secret (a wrong secret gets no reply)"
        )
    return (
        f"; if it runs with --auth-secret-file (authentication on), set {service}.auth_secret_file to the "
        "same secret file: requests without it get no reply"
    )


def secret_auth(key: str, path: str | None):
    """The :class:`~gkd.services.transport.auth.Auth` for the secret file at config key ``key`` (None: auth
    off); an unreadable or too short file is a :class:`StartupError` naming the key."""
    from gkd.services.transport.process import auth_from_file

    try:
        return auth_from_file(path)
    except (OSError, ValueError) as e:
        raise StartupError(f"{key}={path}: {e}") from e


def open_clients(cfg: Config, *, timeout_s: float | None = None, retries: int = 2):
    """(TeacherClient, RolloutClient) for the configured services, signing every message with
    ``teacher.auth_secret_file`` / ``rollout.auth_secret_file`` when set (the services' own secrets)."""
    from gkd.rollout.client import RolloutClient
    from gkd.teacher.client import TeacherClient

    def client(cls, key: str, service, **kwargs):
        return cls(
            f"{service.server_ip}:{service.server_port}",
            timeout_s=timeout_s or service.request_timeout_s,
            liveness_timeout_s=service.liveness_timeout_s,
            retries=retries,
            auth=secret_auth(f"{key}.auth_secret_file", service.auth_secret_file),
            **kwargs,
        )

    n_rollout = cfg.rollout.workers * cfg.rollout.nnodes
    if cfg.teacher.backend == "openai":  # a server already running (gkd.teacher.openai_engine)
        from gkd.teacher.openai_engine import OpenAITeacherClient

        try:
            teacher = OpenAITeacherClient.from_config(cfg, timeout_s=timeout_s, retries=retries)
        except ValueError as e:
            raise StartupError(str(e)) from None
    else:
        teacher = client(TeacherClient, "teacher", cfg.teacher)
    try:
        # one worker: a batch is one request (the pipelined sync gate's exactness needs it); several:
        # spread a batch over them and use the strict gate
        per_request = -(-cfg.data.train_batch_size * cfg.rollout.n // n_rollout)
        rollout = client(RolloutClient, "rollout", cfg.rollout, max_prompts_per_request=per_request)
    except BaseException:
        teacher.close()
        raise
    return teacher, rollout


def fsdp_mesh(device: torch.device, shard_size: int | None = None):
    """The device mesh ``fully_shard`` lays the student on: 1-D over every rank (FSDP2), or with
    ``shard_size`` < world a 2-D ``(replicate, shard)`` mesh (HSDP): ranks ``g * shard_size ...
    (g + 1) * shard_size - 1`` hold one sharded copy, and the copies are replicated across the groups.
    Needs an initialised process group; every rank must call it (it creates the groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if shard_size is None or shard_size == world:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    if shard_size < 1 or world % shard_size:
        raise StartupError(
            f"trainer.fsdp.shard_size={shard_size} does not divide the {world} trainer ranks; use a divisor "
            "of the world size, or null to shard over all ranks"
        )
    return init_device_mesh(
        device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
    )


def shard_fsdp2(
    model: torch.nn.Module,
    device: torch.device,
    compute: torch.dtype | None = None,
    shard_size: int | None = None,
) -> torch.nn.Module:
    """``fully_shard`` every decoder layer (the model's ``_no_split_modules`` classes), then the root
    (embeddings, final norm and lm_head: the root's parameters stay gathered from forward to backward, so
    the fused loss can read the lm_head weight after the forward). Needs an initialised process group.

    ``compute``: when it differs from the parameters' dtype, ``MixedPrecisionPolicy(param_dtype=compute,
    reduce_dtype=float32)``: the shards (master weights, AdamW) keep their dtype, the gathered parameters
    used by forward and backward are cast to ``compute``, gradients are reduced in fp32.
    ``shard_size`` (``trainer.fsdp.shard_size``): see :func:`fsdp_mesh`; with HSDP the forward's
    all-gathers and the gradients' reduce-scatter stay within a shard group, and the reduced gradient
    shards are then all-reduced across the groups (FSDP2 averages over all ranks either way)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise StartupError("trainer.strategy=fsdp2 needs torchrun (a process group); use ddp for one process")
    mesh = fsdp_mesh(device, shard_size)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        log.warning("%s names no decoder layer class: fsdp2 shards it as one unit", type(model).__name__)
    kwargs = {}
    if compute is not None and compute != next(model.parameters()).dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def open_wandb(cfg: Config, out: Path):
    """The W&B run of ``logging.wandb`` (None when off), with the resolved config logged once."""
    w = cfg.logging.wandb
    if not w.enabled:
        return None
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    try:
        return WandbRun(out, project=w.project, name=w.name, mode=w.mode, config=config)
    except RuntimeError as e:
        raise StartupError(str(e)) from e


def _weight_host(cfg: Config) -> str:
    """Where trainer rank 0 hosts the weight channel's store: loopback when the rollout service is local."""
    import socket

    return "127.0.0.1" if cfg.rollout.server_ip in ("127.0.0.1", "localhost") else socket.gethostname()


def weight_backend(cfg: Config) -> str:
    """NCCL only when both ends are on GPUs they do not share (``gkd.services.gpus.weight_backend``: gloo with
    trainer.allow_shared_gpu); the launcher passes the same to ``gkd rollout serve``."""
    from gkd.services.gpus import weight_backend as channel_backend

    return channel_backend(cfg)
