"""``gkd teacher|rollout serve|join``'s engine defaults: ``--device auto`` (CUDA when present) and ``--dtype
auto`` (bfloat16 on CUDA, float32 on CPU), and ``--backend vllm`` refused in one line, before any worker
starts, where vLLM does not import."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("device", "dtype", "cuda", "want"),
    [
        ("auto", "auto", True, ("cuda", "bfloat16")),
        ("auto", "auto", False, ("cpu", "float32")),
        ("cuda:1", "auto", None, ("cuda:1", "bfloat16")),  # the dtype follows an explicit device
        ("cpu", "auto", None, ("cpu", "float32")),
        ("auto", "float16", False, ("cpu", "float16")),  # an explicit dtype stays
    ],
)
def test_auto_device_and_dtype(device, dtype, cuda, want):
    from argparse import Namespace

    from gkd.services.host import resolve_auto

    args = Namespace(device=device, dtype=dtype)
    resolve_auto(args, cuda=cuda)
    assert (args.device, args.dtype) == want


@pytest.mark.parametrize("argv", [["teacher", "serve"], ["teacher", "join", "--broker", "h:1"],
                                  ["rollout", "serve"], ["rollout", "join", "--broker", "h:1"]])  # fmt: skip
def test_service_commands_default_to_auto(argv):
    from gkd.cli import build_parser

    args = build_parser().parse_args([*argv, "--model", "m"])
    assert (args.device, args.dtype) == ("auto", "auto")
    args = build_parser().parse_args([*argv, "--model", "m", "--dtype", "bfloat16", "--device", "cpu"])
    assert (args.device, args.dtype) == ("cpu", "bfloat16")


def _fake_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="needs an environment without vLLM")
@pytest.mark.parametrize("service", ["teacher", "rollout"])
def test_vllm_backend_without_vllm_is_one_line_before_any_worker(service, tmp_path, monkeypatch, capsys):
    from gkd.cli import main
    from gkd.services import host as service_module

    started = []
    monkeypatch.setattr(service_module, "spawn_join", lambda *a, **k: started.append(a))
    monkeypatch.delenv("GKD_PARENT_PID", raising=False)
    model = _fake_model(tmp_path / "m")
    ports = ["--port", str(_free_port()), "--backend-port", str(_free_port())]
    status = main([service, "serve", "--model", str(model), "--backend", "vllm", *ports])
    err = capsys.readouterr().err
    assert status == 2 and not started
    assert err.splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith(f"gkd {service} serve: error: --backend vllm: vLLM does not import here")
    assert "install the `vllm` extra (pip install 'gkd[vllm]')" in err


def test_vllm_check_passes_where_vllm_imports(tmp_path):
    from gkd.services.host import check_vllm_imports
    from gkd.services.inputs import InputError

    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    check_vllm_imports(env={**os.environ, "PYTHONPATH": str(tmp_path)})  # imports: no error
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('libcudart.so.12: not found')")
    with pytest.raises(InputError, match=r"\(ImportError: libcudart.so.12: not found\); install the `vllm`"):
        check_vllm_imports(env={**os.environ, "PYTHONPATH": str(tmp_path)})
