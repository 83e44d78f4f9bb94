"""bench/gpu_kernels.py, the kernels' part of the GPU proof run: its --smoke mode runs here (tiny shapes,
CPU, Triton interpreter) through the same code as on a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.test_topk_triton import COMBOS

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_kernels.py"


def test_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["meta"]["interpreter"] is True and data["summary"]["FAIL"] == 0
    assert all(r["status"] in ("PASS", "SKIP") for r in rows)
    by_name = {r["name"]: r for r in rows}
    correctness = [r for r in rows if r["section"] == "correctness"]
    for loss, tail in COMBOS:  # every loss x tail, with its errors and the torch backend's
        (row,) = [
            r for r in correctness if r["name"].startswith(f"fp32 {loss}/{tail} ") and "T=0.9" in r["name"]
        ]
        assert row["status"] == "PASS" and row["err_grad"] <= max(1e-4, 2 * row["torch_err_grad"])
    assert any(r["name"].startswith("bf16 jsd/bucket") for r in correctness)
    assert any(r["name"].startswith("unfused bf16") and r["status"] == "PASS" for r in correctness)
    (kernel,) = [r for r in rows if r["section"] == "kernel"]
    assert kernel["kernel_GBps"] > 0 and kernel["copy_GBps"] > 0 and "fraction_of_copy" in kernel
    for name in ("gkd_triton", "gkd_triton_fp32_master", "gkd_torch", "naive"):
        assert by_name[f"{name} N=32 H=16 V=300"]["ms"] > 0
    # CUDA-only rows say why they did not run
    assert by_name["liger N=32 H=16 V=300"]["status"] == "SKIP" and by_name["liger N=32 H=16 V=300"]["reason"]
    assert "PASS" in proc.stdout and str(out) in proc.stdout


def _module():
    spec = importlib.util.spec_from_file_location("gpu_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failing_case_is_recorded_and_the_run_goes_on(tmp_path):
    mod = _module()
    report = mod.Report(tmp_path / "r.json", {"device": "cpu"})

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def skipped():
        raise mod.Skip("needs CUDA")

    report.run("kernel", "broken", broken)
    report.run("kernel", "skipped", skipped)
    report.run("kernel", "fine", lambda: {"GBps": 1.0})
    data = json.loads((tmp_path / "r.json").read_text())
    assert [r["status"] for r in data["rows"]] == ["FAIL", "SKIP", "PASS"]
    assert "illegal memory access" in data["rows"][0]["error"] and "Traceback" in data["rows"][0]["traceback"]
    assert data["rows"][1]["reason"] == "needs CUDA" and data["rows"][2]["GBps"] == 1.0
    assert data["summary"] == {"PASS": 1, "FAIL": 1, "SKIP": 1}


def test_without_cuda_and_without_smoke_it_says_so(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full run would start")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
