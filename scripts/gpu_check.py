"""The GPU proof run's driver (``scripts/gpu_check.sh`` runs it): one command on one H100/H200 without
network that installs what is missing, builds the extension and runs its rows, each under its own time
budget, ending with a PASS/FAIL/SKIP table on stdout and ``gpu_check.json`` (every figure) in ``--out``,
rewritten after every row. A row that the run's remaining budget (``TOTAL_BUDGET_S``) cannot fit is
skipped, not failed; so are the rows that need the wheels when setup failed.

    scripts/gpu_wheels.sh                   # here, with network: the missing wheels into .whl/
    scripts/gpu_check.sh --dry-run          # here: prerequisites, the plan, each step's timeout
    scripts/gpu_check.sh --out "$OUT"       # on the GPU machine (the tree and .whl/ copied there)

Standard library only: the driver itself must run before anything is installed. The step bodies live in
the ``scripts/gpu_steps`` package, run through ``scripts/gpu_check_steps.py`` (and ``bench/gpu_kernels.py``
for the kernels); each runs in its own
process group, killed at its timeout, and reports its figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_DIR = ROOT / ".whl"
# the entry point and the package of step bodies it runs (every step needs the package's shared modules)
STEPS_PY = "scripts/gpu_check_steps.py"
STEPS_PKG = ["scripts/gpu_steps/__init__.py", "scripts/gpu_steps/common.py", "scripts/gpu_steps/base.py"]
ROWS_PY = "scripts/gpu_steps/rows.py"  # the bodies of the rows added for the second run
E2E_PY = "scripts/gpu_steps/e2e.py"
KERNELS_PY = "bench/gpu_kernels.py"
KERNELS_PARTS = ["bench/gpu_kernels_fused.py", "bench/gpu_kernels_util.py"]  # modules it imports
# tests/kernels/test_gpu_kernels_script.py is left out: it checks bench/gpu_kernels.py's CPU smoke mode.
TESTS = [
    "tests/kernels/test_fused_linear.py",
    "tests/kernels/test_fused_memory.py",
    "tests/kernels/test_losses.py",
    "tests/kernels/test_losses_edge.py",
    "tests/kernels/test_topk_torch.py",
    "tests/kernels/test_topk_triton.py",
    "tests/test_trainer_step.py",
    "tests/test_ext.py",
    "tests/test_weights.py",
]

# Not in the GPU image (its package list: /work/.library/device/KINDS.md); versions from pyproject.toml's
# pins, setuptools from build-system.requires (the SPDX license field needs setuptools >= 77).
FROM_PYPROJECT = ["pyzmq", "omegaconf"]
#: gkd's dependencies the GPU image has (at its own versions: torch 2.11+cu130, transformers 5.17, ...).
IMAGE_HAS = ["torch", "triton", "numpy", "msgpack", "transformers", "pyarrow", "huggingface_hub", "tqdm",
             "matplotlib", "rich"]  # fmt: skip
#: What the image has of the wheels' own requirements (its package list: KINDS.md).
IMAGE_PROVIDES = ["torch", "triton", "pyyaml", "pytest", "packaging", "zipp"]
#: Wheels whose requirements ship inside them (setuptools/_vendor).
VENDORS_ITS_REQUIREMENTS = ["setuptools"]
#: The GPU machine, for the wheels' requirement markers: CPython 3.12 on x86-64 Linux, no extras.
GPU_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "extra": ""}  # fmt: skip
#: gkd's dependencies that no row imports (neither the image nor .whl/ has them): datasets is imported only
#: for jsonl/json and Hugging Face data, and the e2e row reads parquet; httpx only by the OpenAI-compatible
#: teacher client (teacher.backend: openai), which no row uses.
NOT_IMPORTED = ["datasets", "httpx"]
#: What the rows with ``wheels=False`` must import without (tests/test_gpu_check.py blocks them): what
#: .whl/ brings, and what the image lacks.
WHEEL_MODULES = ["zmq", "omegaconf", "liger_kernel", "xdist", "execnet", "datasets"]
LIGER = "liger-kernel==0.8.5"  # only for the side-by-side benchmark; needs torch >= 2.1.2, triton >= 2.3.1
XDIST = ["pytest-xdist==3.8.0", "execnet==2.1.2"]  # the tests step spreads Triton's compiles over 4 workers
MAX_WHEEL_BYTES = 40 << 20
MAX_TRAVEL_BYTES = 64 << 20
TOTAL_BUDGET_S = 480  # the run must end well inside a 540 s device call


@dataclass
class Step:
    num: str  # the row's number in the table (run order)
    key: str
    title: str
    timeout_s: int  # the row's time budget
    argv: list[str]
    figures_json: bool = True  # the step writes --json FILE
    needs: list[str] = field(default_factory=list)  # files the step runs
    min_s: int = 0  # the least time worth starting it with (less left: SKIP); 0: a third of timeout_s
    wheels: bool = False  # needs what setup installs from .whl/ (pyzmq, omegaconf): SKIP when setup failed
    takes_rest: bool = False  # the last row: runs for all the time the earlier rows left, not timeout_s

    def least_s(self) -> int:
        return self.min_s or max(5, self.timeout_s // 3)


def plan(work: Path, python: str) -> list[Step]:
    """Every step in order, the rows that never ran on a GPU before the long ones; timeouts sum to at most
    TOTAL_BUDGET_S."""
    steps_py = [python, STEPS_PY]
    base = [STEPS_PY, *STEPS_PKG]
    rows = [*base, ROWS_PY]
    setup = [*steps_py, "setup", "--site", str(work / "site"), "--wheels", str(WHEEL_DIR)]
    return [
        Step("0", "setup", "install wheels + gkd (--no-deps), build the extension", 45,
             [*setup, "--log", str(work / "install.log")], needs=base, min_s=45),
        Step("1", "environment", "GPU, driver, torch/triton/CUDA/NCCL, ulimit -l", 15,
             [*steps_py, "environment"], needs=base),
        Step("2", "extension", "pinned 256 MB alloc_host, H2D GB/s vs pageable", 10,
             [*steps_py, "extension", "--log", str(work / "install.log")], needs=base),
        Step("3", "generation", "static-cache CUDA-graph decode vs eager: fp32 tokens, bf16 tokens/s", 30,
             [*steps_py, "generation"], needs=[*rows, E2E_PY], min_s=25),
        Step("4", "receive", "GPU receive path (gloo carrying CUDA tensors) into a static-cache engine", 25,
             [*steps_py, "receive"], needs=rows, min_s=12),
        Step("5", "guard", "fused loss refuses out-of-range ids; reply value checks on CUDA tensors", 20,
             [*steps_py, "guard"], needs=rows, min_s=12),
        Step("6", "checkpoint", "torchrun 1 GPU, NCCL + FSDP2: DCP save in the background, resume, "
             "bitwise next losses", 40, [*steps_py, "checkpoint", "--work", str(work / "checkpoint")],
             needs=rows, min_s=20, wheels=True),
        Step("7", "trainer", "torchrun 1 GPU, NCCL + FSDP2, fp32 master / bf16 compute, lr 1e-6", 30,
             [*steps_py, "trainer"], needs=base, min_s=20, wheels=True),
        Step("8", "weights", "NCCL channel 1 GB bf16; gloo into a CUDA model, pinned", 20,
             [*steps_py, "weights"], needs=base, min_s=15),
        Step("9", "kernels", "Triton correctness vs float64, performance vs copy/naive/Liger/torch", 55,
             [python, KERNELS_PY, "--out", str(work / "kernels.json")], figures_json=False,
             needs=[KERNELS_PY, *KERNELS_PARTS], min_s=30),
        Step("10", "e2e", "gkd train on one shared GPU, 0.5B/1.5B-shaped, sync vs two_step_off", 140,
             [*steps_py, "e2e", "--work", str(work / "e2e")], needs=[*base, E2E_PY], min_s=100,
             wheels=True),
        Step("11", "tests", "pytest " + " ".join(TESTS), 50, [*steps_py, "tests", *TESTS],
             needs=[*base, *TESTS], min_s=30, wheels=True, takes_rest=True),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ wheels


def wheel_specs() -> list[str]:
    """NAME==VERSION of every wheel the GPU machine needs from .whl/."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {re.split(r"[=<>!~ ]", r, maxsplit=1)[0].lower(): r for r in meta["project"]["dependencies"]}
    build = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools==")]
    return [pins[name] for name in FROM_PYPROJECT] + build + [LIGER, *XDIST]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def check_wheels() -> list[str]:
    """Problems with .whl/ (missing, extra or duplicate wheels, wrong versions, too big); [] when fine."""
    if not WHEEL_DIR.is_dir():
        return [f"{WHEEL_DIR.relative_to(ROOT)}/ is missing: run scripts/gpu_wheels.sh (needs network)"]
    problems, found = [], {}
    files = sorted(WHEEL_DIR.glob("*.whl"))
    for f in files:
        name, version = f.name.split("-")[:2]
        found.setdefault(_norm(name), []).append(version)
    for spec in wheel_specs():
        name, version = spec.split("==")
        have = found.pop(_norm(name), [])
        if have != [version]:
            problems.append(f".whl/: {spec} wanted, found {have or 'none'} (rerun scripts/gpu_wheels.sh)")
    for name, versions in found.items():
        problems.append(f".whl/: unexpected {name} {versions} (one version of each listed wheel only)")
    size = sum(f.stat().st_size for f in files)
    if size > MAX_WHEEL_BYTES:
        problems.append(f".whl/ holds {size / 2**20:.1f} MiB, over {MAX_WHEEL_BYTES >> 20} MiB")
    return problems + unmet_requirements(files)


def unmet_requirements(files: list[Path]) -> list[str]:
    """The wheels' own requirements (``Requires-Dist``, markers evaluated for the GPU machine) that neither
    .whl/ nor the image provides: pip installs them ``--no-deps`` there. Needs ``packaging`` (here, where
    the wheels are downloaded; without it nothing is checked)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return []
    have = {_norm(f.name.split("-")[0]) for f in files} | {_norm(n) for n in IMAGE_PROVIDES}
    problems = []
    for f in files:
        if _norm(f.name.split("-")[0]) in VENDORS_ITS_REQUIREMENTS:
            continue
        try:
            with zipfile.ZipFile(f) as z:
                meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
                text = z.read(meta[0]).decode() if meta else ""
        except zipfile.BadZipFile:
            problems.append(f".whl/{f.name} is not a wheel (rerun scripts/gpu_wheels.sh)")
            continue
        for line in text.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.partition(":")[2].strip())
            if req.marker is not None and not req.marker.evaluate(GPU_MARKERS):
                continue
            if _norm(req.name) not in have:
                problems.append(
                    f".whl/{f.name} needs {req}, which neither .whl/ nor the GPU image has: add it to the "
                    "wheel list in scripts/gpu_check.py"
                )
    return problems


def travel_bytes() -> tuple[int, str]:
    """Bytes that travel to the device machine: tracked + untracked-not-ignored files, plus .whl/."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    paths = {p for p in out.decode().split("\0") if p}
    total = sum((ROOT / p).stat().st_size for p in paths if (ROOT / p).is_file())
    whl = sum(f.stat().st_size for f in WHEEL_DIR.glob("*")) if WHEEL_DIR.is_dir() else 0
    return total + whl, f"{total / 2**20:.1f} MiB tree + {whl / 2**20:.1f} MiB .whl/"


# ------------------------------------------------------------------------------------------ running


def _run_step(step: Step, timeout_s: float, env: dict, log) -> tuple[int | None, float, str]:
    """Run one step in its own process group; kill the whole group at the timeout.
    Returns (exit code or None on timeout, seconds, the output's last lines)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        step.argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
        errors="replace",
    )
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            log.write(line)

    import threading  # only here: the dry run never starts a thread

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    # children that outlived the step (e.g. services of a killed gkd train) go too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=5)
    return rc, time.monotonic() - start, "".join(lines[-40:])


def _kernel_figures(path: Path) -> dict:
    """bench/gpu_kernels.py's JSON (rewritten after every row, so a timed-out run keeps its rows)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    counts = data.get("summary", {})
    headline = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("PASS", "FAIL", "SKIP")) + " rows"
    return {**data, "headline": headline, "status": "PASS" if not counts.get("FAIL") else "FAIL"}


def _skip_reason(
    step: Step, left: float, only: set[str] | None, no_setup: bool, setup_failed: bool
) -> str | None:
    """Why ``step`` does not run (None: it runs): not selected, its wheels missing, or too little time."""
    if step.key == "setup" and no_setup or step.key != "setup" and only is not None and step.key not in only:
        return "not selected"
    if step.wheels and setup_failed:
        return "setup failed: needs the wheels from .whl/"
    if left < step.least_s():
        return (
            f"out of time: {left:.0f}s of the run's {TOTAL_BUDGET_S}s left, the row needs {step.least_s()}s"
        )
    return None


def _run_one(step: Step, timeout: float, work: Path, env: dict, log) -> dict:
    """Run ``step`` under ``timeout`` seconds; its report entry (status, seconds, figures, why, tail)."""
    figures_path = work / f"{step.key}.json"
    figures_path.unlink(missing_ok=True)
    (work / "kernels.json").unlink(missing_ok=True) if step.key == "kernels" else None
    argv = [*step.argv, "--json", str(figures_path)] if step.figures_json else step.argv
    log.write(f"\n===== step {step.num} {step.key}: {' '.join(argv)}\n")
    log.flush()
    print(f"[gpu_check] step {step.num} {step.key} (timeout {timeout:.0f}s) ...", flush=True)
    env["GKD_CHECK_BUDGET_S"] = str(max(1.0, timeout - 5))  # for steps that split their time
    rc, seconds, tail = _run_step(Step(**{**step.__dict__, "argv": argv}), timeout, env, log)
    if step.key == "kernels":
        figures = _kernel_figures(work / "kernels.json")
    else:
        figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    ok = rc == 0 and figures.get("status", "PASS") == "PASS"
    entry = {
        "status": "PASS" if ok else "FAIL",
        "seconds": round(seconds, 1),
        "exit_code": rc,
        "figures": {k: v for k, v in figures.items() if k != "status"},
    }
    if rc is None:
        entry["why"] = f"timed out after {seconds:.0f}s"
    if not ok:
        entry["tail"] = tail
    print(f"[gpu_check] step {step.num} {step.key}: {entry['status']} in {seconds:.1f}s", flush=True)
    return entry


def _write_report(out: Path, report: dict) -> None:
    """gpu_check.json as it stands (rewritten after every row: a run cut short keeps the rows it did)."""
    report["total_s"] = round(sum(s.get("seconds", 0.0) for s in report["steps"]), 1)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out / "gpu_check.json")


def run(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = plan(work, sys.executable)
    only = set(args.only.split(",")) if args.only else None
    unknown = sorted((only or set()) - {s.key for s in steps})
    if unknown:
        print(
            f"gpu_check: --only {','.join(unknown)}: no such step; steps: " + ", ".join(s.key for s in steps),
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    site = work / "site"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(site), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join((str(site / "bin"), env.get("PATH", "")))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)
    report = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "budget_s": TOTAL_BUDGET_S,
        "steps": [],
    }
    deadline = time.monotonic() + TOTAL_BUDGET_S
    setup_failed = False
    with open(out / "gpu_check.log", "w") as log:
        for step in steps:
            entry = {"step": step.num, "key": step.key, "title": step.title, "timeout_s": step.timeout_s}
            report["steps"].append(entry)
            left = deadline - time.monotonic()
            why = _skip_reason(step, left, only, args.no_setup, setup_failed)
            if why is not None:
                entry.update(status="SKIP", seconds=0.0, why=why)
            else:
                timeout = left if step.takes_rest else min(step.timeout_s, left)
                entry.update(_run_one(step, timeout, work, env, log))
                if step.key == "setup" and entry["status"] != "PASS":
                    setup_failed = True
                    print(
                        "[gpu_check] setup failed; rows that need its wheels are skipped:\n" + entry["tail"]
                    )
            _write_report(out, report)
    print_table(report)
    print(f"[gpu_check] figures: {out / 'gpu_check.json'}, logs: {out / 'gpu_check.log'}")
    return 0 if all(s["status"] in ("PASS", "SKIP") for s in report["steps"]) else 1


def print_table(report: dict) -> None:
    print(f"\n{'#':>3}  {'step':<12} {'result':<6} {'seconds':>8}  headline")
    for s in report["steps"]:
        figs = s.get("figures") or {}
        headline = figs.get("headline") or s.get("why") or ""
        print(f"{s['step']:>3}  {s['key']:<12} {s['status']:<6} {s.get('seconds', 0):>8.1f}  {headline}")
    print(f"total {report['total_s']:.0f}s")


# ------------------------------------------------------------------------------------------ dry run


def dry_run(args) -> int:
    work = Path(args.work)
    steps = plan(work, "python3")
    problems = check_wheels()
    for step in steps:
        for need in step.needs:
            if not (ROOT / need).exists():
                problems.append(f"step {step.key}: {need} is missing")
    size, what = travel_bytes()
    if size > MAX_TRAVEL_BYTES:
        problems.append(f"what travels is {size / 2**20:.1f} MiB ({what}), over {MAX_TRAVEL_BYTES >> 20} MiB")
    total = sum(s.timeout_s for s in steps)
    if total > TOTAL_BUDGET_S:
        problems.append(f"step timeouts sum to {total}s, over {TOTAL_BUDGET_S}s")
    print(f"gpu_check plan (out: {args.out}, work: {work}); timeouts sum to {total}s of {TOTAL_BUDGET_S}s")
    for s in steps:
        print(f"{s.num:>3}  {s.key:<12} {s.timeout_s:>4}s  {s.title}")
        print(f"    $ {' '.join(shlex.quote(a) for a in s.argv)}")
    print(f"travels: {what} = {size / 2**20:.1f} MiB of {MAX_TRAVEL_BYTES >> 20} MiB")
    print("wheels: " + ", ".join(wheel_specs()))
    for p in problems:
        print(f"gpu_check: {p}", file=sys.stderr)
    print("dry run: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.environ.get("OUT") or str(ROOT / "bench" / "results")
    p.add_argument(
        "--out",
        default=default_out,
        help="folder for gpu_check.json and gpu_check.log (default: $OUT if set, else bench/results/)",
    )
    p.add_argument("--work", default="/tmp/gkd_gpu_check", help="scratch folder (site dir, models, runs)")
    p.add_argument("--dry-run", action="store_true", help="check prerequisites and print the plan only")
    p.add_argument(
        "--only",
        help="comma-separated step keys to run (setup too, unless --no-setup), e.g. extension,weights",
    )
    p.add_argument(
        "--no-setup",
        action="store_true",
        help="skip setup: use the gkd and packages importable "
        "now (a warm machine's second run, or a smoke test of the driver without a GPU)",
    )
    p.add_argument("--wheels", action="store_true", help="print the wheels .whl/ must hold, one a line")
    p.add_argument("--check-wheels", action="store_true", help="check .whl/ against that list")
    args = p.parse_args(argv)
    if args.wheels:
        print("\n".join(wheel_specs()))
        return 0
    if args.check_wheels:
        problems = check_wheels()
        for problem in problems:
            print(f"gpu_check: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if args.dry_run:
        return dry_run(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
