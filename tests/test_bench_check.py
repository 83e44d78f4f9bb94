"""scripts/bench_check.py: the ratio comparison on synthetic benchmark JSON, and the real check failing on a
planted regression (GKD_BENCH_PLANT, read by bench/conftest.py) while passing without it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_check.py"


@pytest.fixture(scope="module")
def bc():
    spec = importlib.util.spec_from_file_location("bench_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_json(entries: dict[str, dict[str, float]]) -> dict:
    """--benchmark-json content: one benchmark per test id with its ratios."""
    return {
        "benchmarks": [{"fullname": f"bench/{t}", "extra_info": {"ratios": r}} for t, r in entries.items()]
    }


BASELINES = {
    "_comment": "synthetic",
    "bench_a.py::test_x[p1]::speedup": {"expected": 2.0, "tolerance": 0.3},
    "bench_a.py::test_x[p1]::saving": {"expected": 4.0, "tolerance": 0.3},
    "bench_a.py::test_gone::speedup": {"expected": 1.0, "tolerance": 0.3},
    "bench_b.py::test_gpu::speedup": {"expected": 3.0, "tolerance": 0.3},
    "bench_c.py::test_other::speedup": {"expected": 1.0, "tolerance": 0.3},
}


def test_keys_are_file_test_params_and_ratio_name(bc):
    measured = bc.collect_ratios(_bench_json({"bench_a.py::test_x[p1]": {"speedup": 1.5, "saving": 4}}))
    assert measured == {"bench_a.py::test_x[p1]::speedup": 1.5, "bench_a.py::test_x[p1]::saving": 4.0}
    assert bc.collect_ratios({"benchmarks": [{"fullname": "bench/bench_a.py::t", "extra_info": {}}]}) == {}


def test_verdicts_pass_fail_new_missing_skip(bc):
    measured = {
        "bench_a.py::test_x[p1]::speedup": 1.41,  # floor 2.0 * 0.7 = 1.4: passes
        "bench_a.py::test_x[p1]::saving": 2.0,  # floor 2.8: a 2x regression fails
        "bench_a.py::test_x[p1]::brand_new": 7.0,
    }
    session = {
        "selected": ["bench_a.py::test_x[p1]", "bench_b.py::test_gpu"],
        "skipped": {"bench_b.py::test_gpu": "GPU section: needs CUDA"},
    }
    rows = {r["key"]: r for r in bc.compare(measured, BASELINES, session)}
    verdicts = {k: r["verdict"] for k, r in rows.items()}
    assert verdicts == {
        "bench_a.py::test_x[p1]::speedup": "PASS",
        "bench_a.py::test_x[p1]::saving": "FAIL",
        "bench_a.py::test_x[p1]::brand_new": "NEW",
        "bench_a.py::test_gone::speedup": "MISSING",
        "bench_b.py::test_gpu::speedup": "SKIP",
        "bench_c.py::test_other::speedup": "MISSING",
    }
    assert rows["bench_b.py::test_gpu::speedup"]["note"] == "GPU section: needs CUDA"
    assert "_comment" not in rows
    table = bc.format_table(list(rows.values()))
    assert "FAIL  (below 2.8)" in table and "GPU section: needs CUDA" in table
    # only lower is worse: far above the expectation passes
    assert bc.compare({"bench_c.py::test_other::speedup": 50.0}, BASELINES)[-1]["verdict"] == "PASS"


def test_a_narrowed_run_does_not_report_unselected_baselines_missing(bc):
    session = {"selected": ["bench_a.py::test_x[p1]"], "skipped": {}}
    measured = {"bench_a.py::test_x[p1]::speedup": 2.0}  # saving not reported: its test ran
    verdicts = {r["key"]: r["verdict"] for r in bc.compare(measured, BASELINES, session, narrowed=True)}
    assert verdicts["bench_c.py::test_other::speedup"] == "NOT RUN"
    assert verdicts["bench_a.py::test_x[p1]::saving"] == "MISSING"


def test_update_keeps_tolerances_and_calibrate_widens_for_spread(bc):
    new = bc.updated(BASELINES, {"bench_a.py::test_x[p1]::speedup": 2.5, "bench_d.py::t::r": 1.0})
    assert new["bench_a.py::test_x[p1]::speedup"] == {"expected": 2.5, "tolerance": 0.3}
    assert new["bench_d.py::t::r"] == {"expected": 1.0, "tolerance": bc.DEFAULT_TOLERANCE}
    assert new["_comment"] == "synthetic"
    runs = [
        {"k::steady": s, "k::noisy": n, "k::wild": w}
        for s, n, w in [(0.99, 1.0, 1), (1, 1.06, 1.5), (1, 1.12, 2)]
    ]
    cal = bc.calibrate(runs, {"_comment": "c"})
    assert cal["k::steady"]["expected"] == 1.0 and cal["k::steady"]["tolerance"] == bc.DEFAULT_TOLERANCE
    assert cal["k::noisy"]["expected"] == 1.06
    assert cal["k::noisy"]["tolerance"] == pytest.approx(3 * 0.12 / 1.06, abs=1e-3)  # 3x the spread
    assert cal["k::wild"]["tolerance"] == bc.MAX_TOLERANCE < 0.5  # clamped: a 2x regression still fails
    assert cal["_comment"] == "c"


def test_main_exit_status_from_a_json_file(bc, tmp_path, capsys):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"bench_a.py::test_x[p1]::speedup": {"expected": 2.0, "tolerance": 0.3}}))
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_bench_json({"bench_a.py::test_x[p1]": {"speedup": 1.9}})))
    bad.write_text(json.dumps(_bench_json({"bench_a.py::test_x[p1]": {"speedup": 0.9}})))
    assert bc.main(["--baselines", str(base), "--input", str(good)]) == 0
    assert bc.main(["--baselines", str(base), "--input", str(bad)]) == 1
    assert "1 FAIL" in capsys.readouterr().out
    assert bc.main(["--baselines", str(base), "--input", str(bad), "--update"]) == 0
    assert json.loads(base.read_text())["bench_a.py::test_x[p1]::speedup"]["expected"] == 0.9


def test_committed_baselines_are_valid_and_catch_a_2x_regression(bc):
    content = json.loads(bc.DEFAULT_BASELINES.read_text())
    assert "_comment" in content and content["machines"]
    for machine, baselines in content["machines"].items():
        assert " | " in machine and "_comment" in baselines, machine
        for key, base in baselines.items():
            if key.startswith("_"):
                continue
            assert key.count("::") >= 2, key
            assert base["expected"] > 0 and 0 < base["tolerance"] < 0.5, key


EPYC = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC  7B13\n"
    "flags\t\t: fpu sse4_1 avx avx2 fma\n"
)


def test_machine_fingerprint_is_cpu_model_and_isa_level(bc, monkeypatch):
    monkeypatch.setattr(bc.platform, "machine", lambda: "x86_64")
    assert bc.machine_fingerprint(EPYC, 2) == "AMD EPYC 7B13 | x86_64 AVX2 | 2 CPUs"
    assert bc.machine_fingerprint(EPYC, 64) == "AMD EPYC 7B13 | x86_64 AVX2 | 64 CPUs"
    avx512 = EPYC.replace("fma", "fma avx512f avx512bw avx512vl avx512dq").replace("AMD EPYC  7B13", "Xeon")
    assert bc.machine_fingerprint(avx512, 8) == "Xeon | x86_64 AVX512 | 8 CPUs"
    assert (
        bc.machine_fingerprint(EPYC.replace(" avx avx2 fma", ""), 2)
        == "AMD EPYC 7B13 | x86_64 DEFAULT | 2 CPUs"
    )
    fp = bc.machine_fingerprint()  # this machine: the same every call
    assert fp == bc.machine_fingerprint() and " | " in fp


def test_an_unknown_cpu_reads_no_baseline_and_exits_0(bc, tmp_path, capsys):
    base = tmp_path / "base.json"
    table = {"bench_a.py::test_x[p1]::speedup": {"expected": 2.0, "tolerance": 0.3}}
    base.write_text(json.dumps({"_comment": "c", "machines": {"Known CPU | x86_64 AVX512": table}}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_bench_json({"bench_a.py::test_x[p1]": {"speedup": 0.9, "other": 1.0}})))
    argv = ["--baselines", str(base), "--input", str(bad)]
    assert bc.main([*argv, "--machine", "Other CPU | x86_64 AVX2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("bench_a.py")]
    assert len(rows) == 2 and all(
        "NO-BASELINE  (no baseline for this CPU: run with --calibrate)" in r for r in rows
    )
    assert "2 NO-BASELINE" in out and "0 FAIL" in out
    assert bc.main([*argv, "--machine", "Known CPU | x86_64 AVX512"]) == 1  # its own machine still fails
    assert "1 FAIL" in capsys.readouterr().out
    # calibrating the unknown machine adds its table and leaves the known one alone
    assert (
        bc.main(["--baselines", str(base), "--machine", "Other CPU | x86_64 AVX2", "--calibrate", str(bad)])
        == 0
    )
    content = json.loads(base.read_text())
    assert content["machines"]["Known CPU | x86_64 AVX512"] == table
    assert (
        content["machines"]["Other CPU | x86_64 AVX2"]["bench_a.py::test_x[p1]::speedup"]["expected"] == 0.9
    )
    assert content["_comment"] == "c"
    assert bc.main([*argv, "--machine", "Other CPU | x86_64 AVX2"]) == 0
    assert "2 PASS" in capsys.readouterr().out


def test_update_writes_this_machines_table_of_a_new_file(bc, tmp_path):
    base, run = tmp_path / "new.json", tmp_path / "run.json"
    run.write_text(json.dumps(_bench_json({"bench_a.py::test_x[p1]": {"speedup": 1.5}})))
    assert (
        bc.main(["--baselines", str(base), "--input", str(run), "--update", "--machine", "M | x86_64 AVX2"])
        == 0
    )
    table = json.loads(base.read_text())["machines"]["M | x86_64 AVX2"]
    assert table == {"bench_a.py::test_x[p1]::speedup": {"expected": 1.5, "tolerance": bc.DEFAULT_TOLERANCE}}


# ------------------------------------------------------------------------ the real check, one benchmark

ONE = "bench/bench_losses.py::test_fused_vs_naive_cpu[V32000]"


def _check(plant: str | None, out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GKD_BENCH_PLANT"}
    if plant:
        env["GKD_BENCH_PLANT"] = plant
    argv = [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--", ONE]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bench_check_fails_on_a_planted_regression_and_passes_without(bc, tmp_path):
    machine = bc.machine_fingerprint()
    if machine not in json.loads(bc.DEFAULT_BASELINES.read_text())["machines"]:
        pytest.skip(f"no committed baselines for this CPU ({machine!r}): scripts/bench_check.py --calibrate")
    clean = _check(None, tmp_path / "clean.json")
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-2000:]
    assert "::fused_bucket_speedup" in clean.stdout and " PASS" in clean.stdout
    assert "NOT RUN" in clean.stdout  # the other benchmarks' baselines, not selected here
    planted = _check("fused_rows8", tmp_path / "planted.json")
    assert planted.returncode == 1, planted.stdout[-3000:] + planted.stderr[-2000:]
    failed = [
        line for line in planted.stdout.splitlines() if line.rstrip().endswith(")") and " FAIL " in line
    ]
    assert any("test_fused_vs_naive_cpu[V32000]::fused_bucket_speedup" in line for line in failed), (
        planted.stdout[-3000:]
    )
    assert "PLANTED REGRESSION active: GKD_BENCH_PLANT=fused_rows8" in planted.stdout


def test_an_unknown_plant_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", ONE, "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env={**os.environ, "GKD_BENCH_PLANT": "nope"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "GKD_BENCH_PLANT=nope: unknown plant nope; valid: fused_rows<R>" in proc.stdout + proc.stderr
