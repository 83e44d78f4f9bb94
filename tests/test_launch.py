"""``gkd train``'s launcher: the commands it builds, the health wait, and Ctrl-C (SIGINT to the launcher)
stopping every process it started: torchrun and its ranks, both services and their workers."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gkd.config import load_config
from gkd.launch import LaunchError, rollout_command, run, teacher_command, torchrun_command, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cfg(*overrides: str):
    base = ["model.student_path=S", "data.train_files=[p.parquet]", "teacher.model_path=T"]
    return load_config(["configs/cpu_tiny.yaml"], [*base, *overrides])


def test_commands_carry_the_config():
    cfg = _cfg("rollout.weight_port=29777", "rollout.workers=2", "teacher.server_port=17000")
    argv = torchrun_command(cfg, ["configs/cpu_tiny.yaml"], ["trainer.total_steps=3"])
    assert argv[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "gkd.train", "--config", "configs/cpu_tiny.yaml", "trainer.total_steps=3",
    ]  # fmt: skip
    r = rollout_command(cfg)
    assert r[r.index("--weight-channel") + 1] == "127.0.0.1:29777"
    assert r[r.index("--weight-backend") + 1] == "gloo" and r[r.index("--workers") + 1] == "2"
    assert r[r.index("--model") + 1] == "S"  # the rollout serves the student
    t = teacher_command(cfg)
    assert t[t.index("--port") + 1] == "17000" and t[t.index("--model") + 1] == "T"
    assert t[t.index("--top-k") + 1] == "16"


def test_multi_node_trainer_is_refused_with_the_torchrun_flags():
    with pytest.raises(LaunchError, match="--nnodes N --node-rank R --rdzv-endpoint"):
        overrides = [
            "model.student_path=S",
            "data.train_files=[p]",
            "teacher.model_path=T",
            "trainer.nnodes=2",
        ]
        run(["configs/cpu_tiny.yaml"], overrides)


def test_wait_healthy_reports_a_dead_service_and_a_timeout():
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(LaunchError, match="teacher service exited with status 3"):
        wait_healthy("teacher", dead, lambda: {"workers": []}, 1, 5)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(LaunchError, match="rollout service has 1 of 2 workers"):
            wait_healthy("rollout", alive, lambda: {"workers": [{}]}, 2, 1.0)
        wait_healthy("rollout", alive, lambda: {"workers": [{}, {}]}, 2, 1.0)  # enough: returns
    finally:
        alive.kill()
        alive.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_mentioning(marks: list[str]) -> set[int]:
    """Processes whose command line holds one of ``marks`` (a run's unique ports and folder)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if state != "Z" and any(m in cmd for m in marks):
            found.add(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the children")
def test_ctrl_c_stops_every_child(tmp_path):
    spec = importlib.util.spec_from_file_location("make_cpu_tiny", ROOT / "scripts" / "make_cpu_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = module.build(tmp_path / "tiny", num_prompts=8)
    ports = [_free_port() for _ in range(5)]
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "gkd.cli", "train", "--config", "configs/cpu_tiny.yaml"]
    argv += [
        f"model.student_path={tiny['student']}",
        f"teacher.model_path={tiny['teacher']}",
        f"data.train_files={tiny['prompts']}",
        f"trainer.output_dir={out}",
        f"teacher.server_port={ports[0]}",
        f"teacher.backend_port={ports[1]}",
        f"rollout.server_port={ports[2]}",
        f"rollout.backend_port={ports[3]}",
        f"rollout.weight_port={ports[4]}",
        "trainer.total_steps=100000",
        "logging.progress_bar=false",
        "rollout.max_new_tokens=4",
    ]
    marks = [str(out), f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[3]}", f"127.0.0.1:{ports[4]}"]
    marks += [f"--port {p}" for p in (ports[0], ports[2])]
    launcher = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # training is under way
            assert launcher.poll() is None, f"gkd train exited early with {launcher.returncode}"
            assert time.monotonic() < deadline, "no training step within 180 s"
            time.sleep(0.5)
        children = _pids_mentioning(marks)
        # torchrun agent + 2 ranks, teacher broker + worker, rollout broker + worker
        assert len(children) >= 7, children
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 130
        deadline = time.monotonic() + 30
        while (left := _pids_mentioning(marks)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"still running after Ctrl-C: {left}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_engines_get_their_resolved_dtypes():
    """The rollout starts in the dtype the trainer's weights arrive in (rollout.dtype, auto = the compute
    dtype: float32 on CPU, bfloat16 with trainer GPUs); the teacher in teacher.dtype (auto = bfloat16 on
    GPUs), never the float32 a vLLM teacher used to load in."""

    def dtype(argv):
        return argv[argv.index("--dtype") + 1]

    assert dtype(rollout_command(_cfg("model.param_dtype=float32"))) == "float32"
    gpu = _cfg("trainer.n_gpus_per_node=1", "rollout.n_gpus_per_node=1", "teacher.n_gpus_per_node=1")
    assert dtype(rollout_command(gpu)) == "bfloat16" and dtype(teacher_command(gpu)) == "bfloat16"
    assert dtype(rollout_command(_cfg("trainer.n_gpus_per_node=1", "model.compute_dtype=float16"))) == "float16"
    assert dtype(rollout_command(_cfg("rollout.dtype=bfloat16"))) == "bfloat16"
    assert dtype(teacher_command(_cfg())) == "float32"
    assert dtype(teacher_command(_cfg("teacher.dtype=float16"))) == "float16"


def test_launch_sh_builds_the_torchrun_command_of_one_node():
    """``scripts/launch.sh`` (one node of a multi-node run): flags or environment variables, printed."""
    script = str(ROOT / "scripts" / "launch.sh")
    cmd = [script, "--dry-run", "--config", "configs/cpu_tiny.yaml", "trainer.total_steps=3"]
    env = {**os.environ, "NNODES": "2", "NODE_RANK": "1", "RDZV_ENDPOINT": "10.0.0.1:29400"}
    by_env = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert by_env.returncode == 0, by_env.stderr
    flags = ["--nnodes", "3", "--node-rank", "2", "--rdzv-endpoint", "h0:1234", "--nproc-per-node", "4"]
    by_flags = subprocess.run([*cmd, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert by_flags.returncode == 0, by_flags.stderr
    for out, want in [
        (by_env.stdout, "--nnodes 2 --node-rank 1 --nproc-per-node 2 --rdzv-backend c10d "
                        "--rdzv-endpoint 10.0.0.1:29400"),
        (by_flags.stdout, "--nnodes 3 --node-rank 2 --nproc-per-node 4 --rdzv-backend c10d "
                          "--rdzv-endpoint h0:1234"),
    ]:  # fmt: skip
        assert "-m torch.distributed.run " + want in out, out
        assert out.rstrip().endswith("-m gkd.train --config configs/cpu_tiny.yaml trainer.total_steps=3 "
                                     f"trainer.nnodes={want.split()[1]}"), out  # fmt: skip
    for extra, message in [
        (["--node-rank", "2"], "node rank 2 is not in 0..1"),
        (["trainer.totl_steps=3"], "unknown config key 'trainer.totl_steps'"),
    ]:
        bad = subprocess.run([*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    env.pop("NODE_RANK")
    missing = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--node-rank or NODE_RANK" in missing.stderr
