"""Run the benchmark suite and compare every ratio it reports with this machine's committed baselines.

    scripts/bench_check.sh [--quick] [--json OUT] [--baselines FILE] [--machine FP] [--update]
                           [-- extra pytest args]

Every benchmark stores figures as ``benchmark.extra_info["ratios"] = {name: value}``, each higher-is-better.
A ratio's key is ``<file>::<test>[<params>]::<name>``, e.g.
``bench_losses.py::test_fused_vs_naive_cpu[vocab8k]::fused_bucket_speedup`` (parametrize ids must not
depend on quick/full mode). Ratios still depend on the CPU (its vector units, caches and memory), so the
baselines file keys them by machine: ``{"machines": {fingerprint: {key: {"expected": x, "tolerance": t}}}}``
with the fingerprint of :func:`machine_fingerprint` (CPU model, architecture, ISA level, CPU count); a
file without ``machines`` is one machine's table, used on any machine. Verdicts:

- PASS         measured >= expected * (1 - t)        (only lower is worse)
- FAIL         measured <  expected * (1 - t)
- NEW          measured, no baseline                 (reported, not a failure)
- MISSING      a baseline, its ratio not produced    (a failure; its test ran, failed or was not collected)
- SKIP         a baseline whose test was skipped     (with the reason; not a failure)
- NOT RUN      a baseline whose test the extra pytest args did not select (not a failure)
- NO-BASELINE  the file has no table for this CPU     (every ratio; not a failure: run --calibrate)

Exit status 1 on any FAIL or MISSING, or when pytest itself failed; ``--update`` writes the measured
values as this machine's expectations (tolerances kept; new keys get DEFAULT_TOLERANCE) and exits 0 unless
pytest failed. ``--calibrate RUN.json ...`` sets this machine's expectations and tolerances from several
runs' JSON instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINES = ROOT / "bench" / "baselines" / "cpu.json"
DEFAULT_TOLERANCE = 0.3
MAX_TOLERANCE = 0.45  # a 2x regression (the ratio halves) must still fail
FAILING = ("FAIL", "MISSING")
NO_BASELINE_NOTE = "no baseline for this CPU: run with --calibrate"
#: x86 ISA levels, best first, as torch names its CPU capability: the flags each needs (/proc/cpuinfo).
ISA_LEVELS = (("AVX512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}), ("AVX2", {"avx2", "fma"}))


def machine_fingerprint(cpuinfo: str | None = None, cpus: int | None = None) -> str:
    """``"<CPU model> | <architecture> <ISA level> | <n> CPUs"``, e.g. ``"AMD EPYC | x86_64 AVX2 | 2 CPUs"``:
    what a baseline table is keyed by (a virtual machine may name only the CPU family, so the CPU count
    tells a 2-core VM from a 64-core host). ``cpuinfo``: the text of /proc/cpuinfo (default: read it;
    absent off Linux); ``cpus``: default ``os.cpu_count()``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() not in fields:
            fields[name.strip()] = value.strip()
    model = fields.get("model name") or fields.get("Model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    isa = next((level for level, need in ISA_LEVELS if need <= flags), "DEFAULT" if flags else "")
    arch = f"{platform.machine()} {isa}".rstrip()
    return f"{' '.join(model.split())} | {arch} | {cpus or os.cpu_count()} CPUs"


def machine_table(content: dict, fingerprint: str) -> dict | None:
    """This machine's baselines in a baselines file's ``content`` (None: the file has none for it)."""
    if "machines" not in content:
        return content
    return content["machines"].get(fingerprint)


def with_machine_table(content: dict, fingerprint: str, table: dict) -> dict:
    """``content`` with this machine's table replaced by ``table`` (a new file gets the ``machines`` map)."""
    if content and "machines" not in content:
        return table
    out = dict(content)
    out["machines"] = {**content.get("machines", {}), fingerprint: table}
    return out


def short_test_id(nodeid: str) -> str:
    """``bench/bench_x.py::test_y[id]`` -> ``bench_x.py::test_y[id]``."""
    path, sep, rest = nodeid.partition("::")
    return Path(path).name + sep + rest


def collect_ratios(bench_json: dict) -> dict[str, float]:
    """``{key: ratio}`` from a ``--benchmark-json`` file's content."""
    ratios = {}
    for bench in bench_json.get("benchmarks", []):
        for name, value in (bench.get("extra_info", {}).get("ratios") or {}).items():
            ratios[f"{short_test_id(bench['fullname'])}::{name}"] = float(value)
    return ratios


def compare(
    measured: dict[str, float],
    baselines: dict[str, dict] | None,
    session: dict | None = None,
    narrowed: bool = False,
) -> list[dict]:
    """One row per key (sorted): key, ratio, expected, tolerance, verdict, note.

    ``baselines``: this machine's table, or None when there is none (every ratio NO-BASELINE).
    ``session``: conftest's record (``selected``, ``skipped`` {test: reason}); ``narrowed``: the run
    selected a subset (extra pytest args), so baselines of tests it did not select are NOT RUN."""
    if baselines is None:
        return [
            {
                "key": k,
                "ratio": v,
                "expected": None,
                "tolerance": None,
                "verdict": "NO-BASELINE",
                "note": NO_BASELINE_NOTE,
            }  # fmt: skip
            for k, v in sorted(measured.items())
        ]
    session = session or {}
    selected, skipped = set(session.get("selected", [])), session.get("skipped", {})
    rows = []
    for key in sorted(set(measured) | {k for k in baselines if not k.startswith("_")}):
        base = baselines.get(key)
        row = {"key": key, "ratio": measured.get(key), "expected": None, "tolerance": None, "note": ""}
        if base is not None:
            row["expected"], row["tolerance"] = float(base["expected"]), float(base["tolerance"])
        test = key.rsplit("::", 1)[0]
        if base is None:
            row["verdict"] = "NEW"
        elif row["ratio"] is not None:
            floor = row["expected"] * (1 - row["tolerance"])
            row["verdict"] = "PASS" if row["ratio"] >= floor else "FAIL"
            if row["verdict"] == "FAIL":
                row["note"] = f"below {floor:.3g}"
        elif test in skipped:
            row["verdict"], row["note"] = "SKIP", skipped[test]
        elif narrowed and test not in selected:
            row["verdict"] = "NOT RUN"
        else:
            row["verdict"] = "MISSING"
            row["note"] = "its test ran but did not report it" if test in selected else "test not collected"
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def num(x, fmt):
        return format("-", ">" + fmt.split(".")[0]) if x is None else format(x, fmt)

    width = max([len("key")] + [len(r["key"]) for r in rows])
    lines = [f"{'key':<{width}}  {'ratio':>8}  {'baseline':>8}  {'tol':>5}  verdict"]
    for r in rows:
        lines.append(
            f"{r['key']:<{width}}  {num(r['ratio'], '8.3f')}  {num(r['expected'], '8.3f')}  "
            f"{num(r['tolerance'], '5.2f')}  {r['verdict']}" + (f"  ({r['note']})" if r["note"] else "")
        )
    return "\n".join(lines)


def updated(baselines: dict, measured: dict[str, float]) -> dict:
    """The baselines with each measured key's expectation replaced (tolerances kept, new keys added)."""
    out = dict(baselines)
    for key, value in measured.items():
        tol = baselines.get(key, {}).get("tolerance", DEFAULT_TOLERANCE)
        out[key] = {**baselines.get(key, {}), "expected": round(value, 4), "tolerance": tol}
    return out


def calibrate(runs: list[dict[str, float]], baselines: dict, floor: float = DEFAULT_TOLERANCE) -> dict:
    """Expectations = median over the runs; tolerance = max(floor, 3 x (max - min) / median), at most
    MAX_TOLERANCE (a ratio noisier than that is reported on stderr: it cannot catch a 2x regression)."""
    out = {k: v for k, v in baselines.items() if k.startswith("_")}
    for key in sorted(set().union(*runs)):
        values = [r[key] for r in runs if key in r]
        med = statistics.median(values)
        spread = (max(values) - min(values)) / med if med > 0 else float("inf")
        tol = max(floor, 3 * spread)
        if tol > MAX_TOLERANCE:
            print(f"bench_check: {key}: spread {spread:.2f} over {len(values)} runs is too wide "
                  f"for a tolerance below 0.5; clamped to {MAX_TOLERANCE}", file=sys.stderr)  # fmt: skip
            tol = MAX_TOLERANCE
        out[key] = {"expected": round(med, 4), "tolerance": round(tol, 3), "spread": round(spread, 4),
                    "runs": len(values)}  # fmt: skip
    return out


def _load_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        sys.exit(f"bench_check: {what} {path} does not exist")
    except json.JSONDecodeError as e:
        sys.exit(f"bench_check: {what} {path} is not valid JSON ({e}); fix or delete it")


def _run_pytest(args, out_json: Path, session_json: Path) -> int:
    extra = list(args.pytest_args)
    # extra args naming a path (bench/bench_x.py[::test]) replace the default target
    named = any(Path(a.split("::")[0]).exists() for a in extra if not a.startswith("-"))
    targets = [] if named else ["bench/"]
    cmd = [sys.executable, "-m", "pytest", *targets, "--benchmark-only", f"--benchmark-json={out_json}"]
    cmd += ["-q", "-p", "no:cacheprovider", *extra]
    env = dict(os.environ, GKD_BENCH_SESSION=str(session_json))
    if args.quick:
        env["GKD_BENCH_QUICK"] = "1"
    print("bench_check: " + ("GKD_BENCH_QUICK=1 " if args.quick else "") + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="bench_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="GKD_BENCH_QUICK=1: small shapes, few rounds")
    p.add_argument("--json", type=Path, help="where the --benchmark-json output goes (default: a temp file)")
    p.add_argument("--baselines", type=Path, default=DEFAULT_BASELINES)
    p.add_argument("--update", action="store_true", help="write the measured ratios into --baselines")
    p.add_argument("--input", type=Path, help="compare this --benchmark-json file; run nothing")
    p.add_argument(
        "--calibrate",
        type=Path,
        nargs="+",
        metavar="RUN_JSON",
        help="set --baselines from several runs' JSON (median, 3x spread); run nothing",
    )
    p.add_argument(
        "--machine",
        default=None,
        metavar="FINGERPRINT",
        help="use this machine's baselines (default: this CPU's fingerprint, printed by every run)",
    )
    args = p.parse_args(argv)
    args.pytest_args = extra
    machine = args.machine or machine_fingerprint()
    if args.baselines.exists() or not (args.update or args.calibrate):
        content = _load_json(args.baselines, "--baselines")
    else:
        content = {}
    baselines = machine_table(content, machine)
    if args.calibrate:
        runs = [collect_ratios(_load_json(f, "--calibrate")) for f in args.calibrate]
        table = calibrate(runs, baselines or {})
        args.baselines.write_text(json.dumps(with_machine_table(content, machine, table), indent=2) + "\n")
        print(f"bench_check: wrote {args.baselines} ({machine!r}) from {len(runs)} runs")
        return 0

    rc, session = 0, {}
    if args.input:
        bench_json = _load_json(args.input, "--input")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_check-"))
        out = args.json or tmp / "bench.json"
        session_json = tmp / "session.json"
        rc = _run_pytest(args, out.resolve(), session_json)
        bench_json = json.loads(out.read_text()) if out.exists() else {}  # absent: no benchmark ran
        session = json.loads(session_json.read_text()) if session_json.exists() else {}
    measured = collect_ratios(bench_json)
    rows = compare(measured, baselines, session, narrowed=bool(extra))
    _report(rows, session, f"baselines {args.baselines}, machine {machine!r}")
    if rc != 0:  # 5: nothing collected
        print(f"bench_check: pytest exited with status {rc}")
        return 1
    if args.update:
        args.baselines.parent.mkdir(parents=True, exist_ok=True)
        table = updated(baselines or {}, measured)
        args.baselines.write_text(json.dumps(with_machine_table(content, machine, table), indent=2) + "\n")
        print(f"bench_check: wrote {len(measured)} ratios into {args.baselines} ({machine!r})")
        return 0
    return 1 if any(r["verdict"] in FAILING for r in rows) else 0


def _report(rows: list[dict], session: dict, where: str) -> None:
    print()
    print(format_table(rows))
    verdicts = ("PASS", "FAIL", "NEW", "MISSING", "SKIP", "NO-BASELINE")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in verdicts}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n or v != "NO-BASELINE")
    print(f"bench_check: {summary} ({where})")
    if counts["NO-BASELINE"]:
        print(f"bench_check: {NO_BASELINE_NOTE} (scripts/bench_check.py --calibrate RUN.json ...)")
    if session.get("plants"):
        print(f"bench_check: PLANTED REGRESSION active: GKD_BENCH_PLANT={','.join(session['plants'])}")
    for test in session.get("failed", []):
        print(f"bench_check: benchmark FAILED: {test} (see the pytest output above)")


if __name__ == "__main__":
    sys.exit(main())
