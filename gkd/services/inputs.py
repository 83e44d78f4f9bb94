"""Checks of a command's inputs before it starts anything: local model folders, prompt files, ports,
output folders, secret files and numeric flags -- for every command (the launcher's own checks, which add
the ports it binds and the tokenizers, are :mod:`gkd.launch.preflight`).

Each check raises :class:`InputError` with one line that names the config key, flag or file and says what
to do; ``gkd`` prints it as ``gkd <command>: error: <line>`` and exits with status 2, with no traceback
(``--log-level DEBUG`` adds one). The checks read metadata only (a parquet schema, a folder listing, a
test bind), so they take well under a second and run before any model is loaded or child started.

    check_run(cfg)            # every trainer rank: models, data, output folder, secret files
    check_service_args(args)  # gkd teacher|rollout serve|join|ping: the flags of one command line
"""

from __future__ import annotations

import argparse
import math
import socket
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from gkd.config import Config, ConfigError

__all__ = [
    "InputError",
    "check_run",
    "check_service_args",
    "data_files",
    "data_sources",
    "host_port",
    "model_folder",
    "number",
    "port_free",
    "secret_file",
    "writable_folder",
]

_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")  # a folder without any of these holds no model
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class InputError(ConfigError):
    """A bad input of a gkd command (flag, config key, file, folder, port); the message is one line naming
    it and what to do. A :class:`ConfigError`, so every caller that reports config errors reports these."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def number(value: float | int, name: str, *, minimum: float, strict: bool = False) -> None:
    """``value`` is finite and ``>= minimum`` (``> minimum`` when ``strict``); ``name``: the flag or key."""
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise InputError(f"{name}={value!r}: must be {'>' if strict else '>='} {minimum:g}")


def model_folder(path: str, key: str, *, gguf_file: str | None = None, tokenizer: bool = False) -> Path:
    """``path`` is a local model folder: ``config.json`` and weight files (or ``gguf_file`` inside it), plus
    tokenizer files when ``tokenizer``. A missing folder is never taken for a hub id: nothing is fetched."""
    if not path:
        raise InputError(f"{key} is required: a local model folder (config.json, weights, tokenizer)")
    folder = Path(path).expanduser()
    what = f"{key}={path}"
    if not folder.exists():
        raise InputError(
            f"{what}: no such folder; give a local model folder (config.json, weights, tokenizer): "
            "models are never downloaded here (`gkd train` fetches hub ids such as owner/name)"
        )
    if not folder.is_dir():
        raise InputError(f"{what}: not a folder; give the model's folder (it holds config.json)")
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise InputError(f"{what}: no GGUF file {gguf_file} in it (--gguf-file names a file in --model)")
        return folder
    if not (folder / "config.json").is_file():
        raise InputError(f"{what}: no config.json in this folder; give a transformers model folder")
    if not any(next(folder.glob(p), None) for p in _WEIGHTS):
        raise InputError(f"{what}: no weight files (*.safetensors, *.bin) in this folder")
    if tokenizer and not any((folder / name).is_file() for name in _TOKENIZER):
        raise InputError(f"{what}: no tokenizer files ({', '.join(_TOKENIZER)}) in this folder")
    return folder


def data_files(patterns: Sequence[str], key: str, prompt_key: str) -> list[str]:
    """Every file of ``key`` exists, is readable parquet, has the ``prompt_key`` column, and together they
    hold at least one row. Reads schemas and footers only."""
    from gkd.data.prompts import DataError, inspect_files

    try:
        return inspect_files(patterns, prompt_key)
    except (FileNotFoundError, DataError) as e:
        raise InputError(f"{key}: {_first_line(e)}") from e


def data_sources(data_cfg) -> None:
    """Every ``data.sources`` entry exists, has its prompt column and rows (headers only; hub datasets are
    read by the trainer)."""
    from gkd.data.prompts import DataError, inspect_source, sources_from_config

    for i, source in enumerate(sources_from_config(data_cfg)):
        try:
            inspect_source(source)
        except (FileNotFoundError, DataError) as e:
            raise InputError(f"data.sources[{i}]: {_first_line(e)}") from e


def writable_folder(path: str, key: str) -> Path:
    """``path`` is a folder this process can write, or can be created (the nearest existing parent is a
    writable folder). Creates nothing."""
    if not path:
        raise InputError(f"{key} is required: an output folder")
    folder = Path(path).expanduser().absolute()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == folder else f" ({probe} is a file)"
        raise InputError(f"{key}={path}: cannot be a folder{where}; choose another path")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise InputError(f"{key}={path}: {probe} is not writable ({e.strerror}); choose another path") from e
    return folder


def secret_file(path: str | None, key: str) -> None:
    """A set auth secret file is readable and long enough."""
    if not path:
        return
    from gkd.services.transport.auth import Auth

    try:
        Auth.from_file(path)
    except OSError as e:
        raise InputError(f"{key}={path}: cannot read it ({e.strerror}); give the shared secret's file") from e
    except ValueError as e:
        raise InputError(f"{key}={path}: {_first_line(e).removeprefix(f'{path}: ')}") from e


def host_port(address: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` with a port in 1..65535."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{key}={address}: expected HOST:PORT (a port in 1..65535), e.g. 127.0.0.1:15555")
    return host, int(port)


def port_free(host: str, port: int, key: str) -> None:
    """Nothing listens on ``host:port`` (a test bind with SO_REUSEADDR, as ZeroMQ and TCPStore bind)."""
    number(port, key, minimum=1)
    if port > 65535:
        raise InputError(f"{key}={port}: must be a TCP port in 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            reason = f"cannot bind {host}:{port} ({e.strerror})"
            raise InputError(f"{key}={port}: {reason}; stop what uses it or choose another port") from e


def _distinct(ports: Iterable[tuple[str, int]]) -> None:
    seen: dict[int, str] = {}
    for key, port in ports:
        if port in seen:
            raise InputError(f"{key}={port}: the same port as {seen[port]}; give each service its own port")
        seen[port] = key


# ----------------------------------------------------------------------------------------- gkd train


def check_run(cfg: Config, *, data: bool = True) -> None:
    """What a trainer process reads and writes: the student's model folder, the prompt files and their
    column (``data``: only trainer rank 0 reads them), the output folder, the services' secret files."""
    model_folder(cfg.model.student_path, "model.student_path", tokenizer=True)
    if data and cfg.data.train_files:
        data_files(cfg.data.train_files, "data.train_files", cfg.data.prompt_key)
    if data and cfg.data.sources:
        data_sources(cfg.data)
    if data and cfg.data.val_files:
        data_files(cfg.data.val_files, "data.val_files", cfg.data.prompt_key)
    writable_folder(cfg.trainer.output_dir, "trainer.output_dir")
    secret_file(cfg.teacher.auth_secret_file, "teacher.auth_secret_file")
    secret_file(cfg.rollout.auth_secret_file, "rollout.auth_secret_file")


# ---------------------------------------------------------------------------- gkd teacher / rollout


def check_service_args(args: argparse.Namespace) -> None:
    """The flags of ``gkd teacher serve|join|ping`` / ``gkd rollout serve|join`` (by argparse dest; a flag
    the command lacks is skipped): model folder, counts and timeouts, addresses, free ports, secret file."""
    get = vars(args).get
    if get("address") is not None:  # ping
        host_port(args.address, "address")
    if get("model") is not None:
        model_folder(args.model, "--model", gguf_file=get("gguf_file"))
    for dest, minimum in (
        ("workers", 1),
        ("top_k", 1),
        ("max_batch_tokens", 1),
        ("max_batch_size", 1),
        ("weight_rank", 1),
        ("max_restarts", 0),
    ):
        if get(dest) is not None:
            number(get(dest), f"--{dest.replace('_', '-')}", minimum=minimum)
    for dest in (
        "temperature",
        "timeout",
        "weight_timeout",
        "weight_idle_timeout",
        "max_wait",
        "restart_window",
    ):
        if get(dest) is not None:
            number(get(dest), f"--{dest.replace('_', '-')}", minimum=0, strict=True)
    if get("weight_world_size") is not None:
        number(
            args.weight_world_size, "--weight-world-size", minimum=get("weight_rank", 1) + get("workers", 1)
        )
    for dest in ("broker", "weight_channel"):
        if get(dest) is not None:
            host_port(get(dest), f"--{dest.replace('_', '-')}")
    secret_file(get("auth_secret_file"), "--auth-secret-file")
    if get("port") is not None and get("backend_port") is not None:  # serve: the broker binds both
        _distinct([("--port", args.port), ("--backend-port", args.backend_port)])
        port_free(args.host, args.port, "--port")
        port_free(args.host, args.backend_port, "--backend-port")
