"""scripts/gpu_check.py, the GPU proof run's driver, on this machine: the plan fits its time budget and
travels, .whl/ is checked against the pinned list, a step is killed with its whole process group at its
timeout, and the dry run checks the wheels and prints the plan (against stand-in wheels: no .whl/ needed)."""

import argparse
import json
import os
import re
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.tiny_run import ROOT, load_script

gpu_check = load_script("gpu_check")


def test_the_plan_fits_one_device_call_and_names_existing_files(tmp_path):
    steps = gpu_check.plan(tmp_path, "python3")
    assert sum(s.timeout_s for s in steps) <= gpu_check.TOTAL_BUDGET_S <= 480  # a 540 s call, with margin
    assert [s.num for s in steps] == [str(i) for i in range(len(steps))]
    keys = [s.key for s in steps]
    for row in ("generation", "receive", "guard", "checkpoint", "e2e", "tests"):
        assert row in keys
    assert keys.index("generation") < keys.index("e2e")  # the rows that never ran before the long ones
    for step in steps:
        assert 0 < step.least_s() <= step.timeout_s
        for need in step.needs:
            assert (ROOT / need).exists(), f"step {step.key} runs {need}, which is missing"


def test_every_dependency_is_in_the_image_the_wheels_or_never_imported():
    """A new dependency in pyproject.toml must be added to the wheels (or to the image's list, checked on
    the GPU machine), or the GPU run's rows fail to import it."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = {re.split(r"[=<>!~ ;\[]", r, maxsplit=1)[0].lower().replace("-", "_")
             for r in meta["project"]["dependencies"]}  # fmt: skip
    known = {
        n.replace("-", "_") for n in gpu_check.IMAGE_HAS + gpu_check.FROM_PYPROJECT + gpu_check.NOT_IMPORTED
    }
    assert names - known == set()


def test_the_wheel_list_follows_the_pins():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    specs = gpu_check.wheel_specs()
    for name in ("pyzmq", "omegaconf"):
        (pin,) = [r for r in meta["project"]["dependencies"] if r.startswith(name + "==")]
        assert pin in specs
    assert [r for r in meta["build-system"]["requires"] if r.startswith("setuptools==")][0] in specs
    assert any(s.startswith("liger-kernel==") for s in specs)


def test_check_wheels_flags_missing_extra_and_duplicate_wheels(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "WHEEL_DIR", tmp_path)
    _fake_wheels(tmp_path)
    assert gpu_check.check_wheels() == []
    _fake_wheel(tmp_path / "pyzmq-1.0-cp312-abi3-manylinux_2_28_x86_64.whl")
    _fake_wheel(tmp_path / "rich-15.0.0-py3-none-any.whl")
    next(tmp_path.glob("omegaconf-*")).unlink()
    problems = " | ".join(gpu_check.check_wheels())
    assert "pyzmq==" in problems and "omegaconf==" in problems and "unexpected rich" in problems


def test_check_wheels_flags_a_requirement_that_neither_the_wheels_nor_the_image_have(tmp_path, monkeypatch):
    """Requires-Dist lines whose markers hold on the GPU machine (CPython 3.12, x86-64 Linux, no extras)
    must be met by another wheel or by the image; pip installs the wheels --no-deps there."""
    pytest.importorskip("packaging")
    monkeypatch.setattr(gpu_check, "WHEEL_DIR", tmp_path)
    _fake_wheels(tmp_path)
    liger = next(tmp_path.glob("liger_kernel-*"))
    needs = ["torch>=2.1.2", "PyYAML>=5", "jaraco.nope>=1", "ruff; extra == 'dev'",
             "cffi; implementation_name == 'pypy'", "backports.tarfile; python_version < '3.12'",
             "execnet>=2.1"]  # fmt: skip
    _fake_wheel(liger, needs)
    (problem,) = gpu_check.check_wheels()
    assert (
        problem.startswith(f".whl/{liger.name} needs jaraco.nope>=1, which neither")
        and "wheel list" in problem
    )
    liger.write_bytes(b"not a zip")
    assert gpu_check.check_wheels() == [f".whl/{liger.name} is not a wheel (rerun scripts/gpu_wheels.sh)"]


_SLOW_STEP = (  # sleeps far beyond its 2 s step timeout and the test's 60 s wait for the run
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "open(sys.argv[1], 'w').write(str(child.pid)); print('started', flush=True); time.sleep(600)"
)


def test_a_step_past_its_timeout_fails_and_its_process_group_is_killed(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"
    quick = [
        sys.executable,
        "-c",
        "import json, sys; json.dump({'status': 'PASS', 'headline': 'hi'}, "
        "open(sys.argv[sys.argv.index('--json') + 1], 'w'))",
    ]
    steps = [
        gpu_check.Step("1", "quick", "writes its figures", 30, quick),
        gpu_check.Step(
            "2",
            "slow",
            "outlives its timeout",
            2,
            [sys.executable, "-c", _SLOW_STEP, str(pid_file)],
            figures_json=False,
        ),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda work, python: steps)
    args = argparse.Namespace(
        out=str(tmp_path / "out"), work=str(tmp_path / "work"), only=None, no_setup=True
    )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # only the step's timeout can end the run within the 60 s
        assert pool.submit(gpu_check.run, args).result(timeout=60) == 1
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    quick_entry, slow_entry = report["steps"]
    assert quick_entry["status"] == "PASS" and quick_entry["figures"] == {"headline": "hi"}
    assert (
        slow_entry["status"] == "FAIL"
        and "timed out" in slow_entry["why"]
        and "started" in slow_entry["tail"]
    )
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went with the group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {child} outlived the step's timeout")


def _fake_wheel(path: Path, requires: list[str] = ()) -> None:
    """A stand-in wheel: a zip holding only its METADATA (with ``requires`` as Requires-Dist lines)."""
    name, version = path.name.split("-")[:2]
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def _fake_wheels(folder: Path) -> None:
    for spec in gpu_check.wheel_specs():
        name, version = spec.split("==")
        _fake_wheel(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl")


def test_the_dry_run_checks_the_wheels_and_prints_the_plan_starting_nothing(tmp_path, monkeypatch, capsys):
    """The dry run against a stand-in .whl/ (empty files named as the pinned wheels): OK with all of them,
    one line naming the wheel and exit 1 without one; it writes nothing."""
    wheels, out, work = tmp_path / "whl", tmp_path / "out", tmp_path / "work"
    wheels.mkdir()
    _fake_wheels(wheels)
    monkeypatch.setattr(gpu_check, "WHEEL_DIR", wheels)
    argv = ["--dry-run", "--out", str(out), "--work", str(work)]
    assert gpu_check.main(argv) == 0
    text = capsys.readouterr().out
    assert "dry run: OK" in text and "e2e" in text and "timeouts sum to" in text
    next(wheels.glob("pyzmq-*")).unlink()
    assert gpu_check.main(argv) == 1
    got = capsys.readouterr()
    assert "dry run: 1 problem(s)" in got.out
    assert [line for line in got.err.splitlines() if "pyzmq==" in line] == [got.err.strip()]
    assert not out.exists() and not work.exists()


def test_the_dry_run_script_runs_on_a_fresh_machine(tmp_path):
    """scripts/gpu_check.sh --dry-run as CI runs it: without .whl/ (a fresh machine) it says what to run
    and exits 1; with the wheels it passes."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    problems = gpu_check.check_wheels()
    assert done.returncode == (1 if problems else 0), done.stderr
    assert "e2e" in done.stdout and not (tmp_path / "out").exists()
    if not (ROOT / ".whl").is_dir():
        assert "run scripts/gpu_wheels.sh" in done.stderr


# A meta-path finder that refuses the modules .whl/ brings (and those the image lacks), as on a GPU machine
# where setup failed: the rows without ``wheels=True`` must run without them.
_BLOCK = """
import importlib.abc, sys
BLOCKED = set(sys.argv.pop(1).split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked (not on the GPU image)")
sys.meta_path.insert(0, Block())
"""


def _blocked(blocked: list[str], body: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + body, ",".join(blocked), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )


def test_the_rows_without_wheels_run_on_cpu_without_zmq_or_omegaconf(tmp_path):
    """The CPU smoke of the generation, receive and guard rows (the same code as on the GPU, small), with
    every module of .whl/ blocked; the blocked modules were really asked for by nothing that ran."""
    steps = {s.key: s for s in gpu_check.plan(tmp_path, "python3")}
    rows = ["generation", "receive", "guard"]
    assert not any(steps[r].wheels for r in rows) and steps["checkpoint"].wheels and steps["e2e"].wheels
    body = (
        "sys.path.insert(0, 'scripts'); import gpu_steps; out = sys.argv[1]\n"
        "for row in sys.argv[2:]:\n"
        "    assert gpu_steps.main([row, '--json', f'{out}/{row}.json']) == 0\n"
        "print('loaded:', sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n"
    )
    done = _blocked(gpu_check.WHEEL_MODULES, body, str(tmp_path), *rows, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "loaded: []" in done.stdout
    for row in rows:
        figures = json.loads((tmp_path / f"{row}.json").read_text())
        assert figures["status"] == "PASS", (row, figures)
    generation = json.loads((tmp_path / "generation.json").read_text())
    assert generation["fp32_greedy_rows_equal"] == "4/4" and generation["static_graphs"] == 1
    receive = json.loads((tmp_path / "receive.json").read_text())
    assert (
        receive["engine_identical"] and receive["module_identical"] and receive["answers_changed_by_load"] > 0
    )


def test_the_driver_runs_with_only_the_standard_library(tmp_path):
    body = (
        "import runpy; sys.argv = ['gpu_check.py', *sys.argv[1:]]\n"
        "runpy.run_path('scripts/gpu_check.py', run_name='__main__')"
    )
    blocked = ["torch", "numpy", "transformers", "triton", *gpu_check.WHEEL_MODULES]
    done = _blocked(blocked, body, "--dry-run", "--out", str(tmp_path / "out"), timeout=60)
    assert "timeouts sum to" in done.stdout and "Traceback" not in done.stderr, done.stderr


def test_rows_past_the_budget_or_without_their_wheels_are_skipped_and_the_json_follows_each_row(
    tmp_path, monkeypatch
):
    """setup fails: the row that needs the wheels is skipped, the others run; the second row reads
    gpu_check.json as the driver left it after the first; a row that the remaining budget cannot fit is
    skipped, not failed, and the report still has every row; the last row takes the time left."""
    out = tmp_path / "out"

    def step(num, key, code, timeout=20, **kw):
        argv = [
            sys.executable,
            "-c",
            "import json, sys; out = sys.argv[sys.argv.index('--json') + 1]\n" + code,
        ]
        return gpu_check.Step(num, key, key, timeout, argv, **kw)

    steps = [
        step("0", "setup", "sys.exit(3)"),
        step("1", "needs_wheels", "json.dump({'status': 'PASS'}, open(out, 'w'))", wheels=True),
        step("2", "first", "json.dump({'status': 'PASS', 'headline': 'one'}, open(out, 'w'))"),
        step(
            "3",
            "reader",
            f"import time; seen = json.load(open({str(out / 'gpu_check.json')!r}))\n"
            "json.dump({'status': 'PASS', 'seen': [s['key'] for s in seen['steps']]}, open(out, 'w'))\n"
            "time.sleep(3)",
            min_s=1,
        ),
        step("4", "too_long", "json.dump({'status': 'PASS'}, open(out, 'w'))", timeout=30, min_s=25),
        step(  # the last row runs for the time left, past its own 1 s
            "5",
            "rest",
            "import time; time.sleep(2); json.dump({'status': 'PASS'}, open(out, 'w'))",
            timeout=1,
            min_s=1,
            takes_rest=True,
        ),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda work, python: steps)
    monkeypatch.setattr(gpu_check, "TOTAL_BUDGET_S", 25)
    args = argparse.Namespace(out=str(out), work=str(tmp_path / "work"), only=None, no_setup=False)
    assert gpu_check.run(args) == 1  # setup failed
    report = json.loads((out / "gpu_check.json").read_text())
    status = {s["key"]: s["status"] for s in report["steps"]}
    assert status == {"setup": "FAIL", "needs_wheels": "SKIP", "first": "PASS", "reader": "PASS",
                      "too_long": "SKIP", "rest": "PASS"}  # fmt: skip
    rows = {s["key"]: s for s in report["steps"]}
    assert rows["reader"]["figures"]["seen"] == ["setup", "needs_wheels", "first"]
    assert "setup failed" in rows["needs_wheels"]["why"] and "out of time" in rows["too_long"]["why"]
