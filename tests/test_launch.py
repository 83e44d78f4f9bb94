"""``gkd train``'s launcher: the commands it builds, the GPU plan it prints (``--dry-run``, ``GKD_FAKE_GPUS``)
and its one-line refusals, the services' per-worker GPU slices, the health wait, Ctrl-C (SIGINT to
the launcher) stopping every process it started: torchrun and its ranks, both services and their
workers; the trainer started together with the services, and one DDP process started without torchrun."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gkd.config import load_config
from gkd.launch.placement import FAKE_GPUS_ENV, Found, plan
from gkd.launch.run import (
    Command,
    LaunchError,
    commands,
    rollout_command,
    run,
    teacher_command,
    torchrun_command,
    wait_healthy,
)
from tests.tiny_run import build_tiny, train_argv

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
        "-m", "gkd.trainer", "--config", "configs/cpu_tiny.yaml", "trainer.total_steps=3",
    ]  # fmt: skip
    r = rollout_command(cfg)
    assert r[r.index("--weight-channel") + 1] == "127.0.0.1:29777"
    assert r[r.index("--weight-backend") + 1] == "gloo" and r[r.index("--workers") + 1] == "2"
    assert r[r.index("--model") + 1] == "S"  # the rollout serves the student
    t = teacher_command(cfg)
    assert t[t.index("--port") + 1] == "17000" and t[t.index("--model") + 1] == "T"
    assert t[t.index("--top-k") + 1] == "16"


def test_multi_node_config_without_this_nodes_place_is_refused():
    with pytest.raises(LaunchError, match="--node-rank R --rdzv-endpoint NODE0:PORT"):
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
@pytest.mark.parametrize(
    "sig, status, grace_s",
    [(signal.SIGINT, 130, 30), (signal.SIGKILL, -signal.SIGKILL, 10)],
    ids=["ctrl-c", "kill-9"],
)
def test_stopping_the_launcher_stops_every_child(tmp_path, sig, status, grace_s):
    """Ctrl-C stops every child in order; ``kill -9`` of the launcher (nothing runs in it any more) leaves
    no process behind within 10 s: parent-death signals and the ranks' watch on torchrun."""
    tiny = build_tiny(tmp_path / "tiny", num_prompts=8)
    ports = [_free_port() for _ in range(5)]
    out = tmp_path / "run"
    argv = train_argv(
        tiny,
        out,
        ports,
        "trainer.total_steps=100000",
        "logging.progress_bar=false",
        "rollout.max_new_tokens=4",
    )
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
        launcher.send_signal(sig)
        assert launcher.wait(timeout=60) == status
        deadline = time.monotonic() + grace_s
        while (left := _pids_mentioning(marks)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"still running {grace_s}s after {sig.name}: {left}"
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
    assert (
        dtype(rollout_command(_cfg("trainer.n_gpus_per_node=1", "model.compute_dtype=float16"))) == "float16"
    )
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
        assert out.rstrip().endswith("-m gkd.trainer --config configs/cpu_tiny.yaml trainer.total_steps=3 "
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


def _gkd_train(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "gkd.cli", "train", *args]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _no_fake_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in ENV.items() if k != FAKE_GPUS_ENV}, **extra}


def test_dry_run_prints_the_plan_and_commands_with_matching_devices():
    """GKD_FAKE_GPUS=8 gkd train --config configs/gpu_example.yaml --dry-run: trainer 4, rollout 2,
    teacher 2 GPUs, disjoint, and each command carries its own set; nothing is started."""
    done = _gkd_train(
        "--config", "configs/gpu_example.yaml", "--dry-run", env=_no_fake_env(GKD_FAKE_GPUS="8")
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("GPU plan for this node: 8 GPU(s) (GKD_FAKE_GPUS=8)"), out
    cmds = {line.split(": ", 1)[0]: shlex.split(line.split(": ", 1)[1]) for line in out.splitlines()
            if line.split(":")[0] in ("trainer", "rollout", "teacher")}  # fmt: skip
    assert set(cmds) == {"trainer", "rollout", "teacher"}, out

    def visible(argv):
        assert argv[0].startswith("CUDA_VISIBLE_DEVICES="), argv
        return argv[0].split("=", 1)[1].split(",")

    trainer, rollout, teacher = visible(cmds["trainer"]), visible(cmds["rollout"]), visible(cmds["teacher"])
    assert (len(trainer), len(rollout), len(teacher)) == (4, 2, 2)
    assert len(set(trainer + rollout + teacher)) == 8
    t = cmds["trainer"]
    assert t[t.index("--nproc-per-node") + 1] == "4"
    for name, devices in (("rollout", rollout), ("teacher", teacher)):
        argv = cmds[name]
        assert argv[argv.index("--gpus") + 1].split(",") == devices  # the service slices it per worker
        assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--dtype") + 1] == "bfloat16"
        rows = [line.split() for line in out.splitlines() if line.startswith(f"  {name} ")]
        assert [r[3] for r in rows] == devices  # the table shows the same slices
    r, te = cmds["rollout"], cmds["teacher"]
    assert r[r.index("--weight-backend") + 1] == "nccl"
    assert te[te.index("--gpu-memory-utilization") + 1] == "0.8"
    assert te[te.index("--max-model-len") + 1] == "2048"  # data.max_prompt_length + max_response_length


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--config", "configs/gpu_example.yaml", "--dry-run", "trainer.n_gpus_per_node=6"],
         {FAKE_GPUS_ENV: "8"},
         "node oversubscribed: trainer 6 + rollout 2 + teacher 2 = 10 GPUs asked, 8 present"),
        # a machine without CUDA (hidden on a GPU host too) asked for trainer GPUs: CUDA and the key named
        (["--config", "configs/cpu_tiny.yaml", "trainer.n_gpus_per_node=2"], {"CUDA_VISIBLE_DEVICES": ""},
         "trainer.n_gpus_per_node=2 asks for GPUs, but CUDA is not available here"),
        # fake GPUs plan only
        (["--config", "configs/gpu_example.yaml"], {FAKE_GPUS_ENV: "8"}, "GKD_FAKE_GPUS=8 only plans"),
        # a thread count is planned (and refused) with the GPUs, before anything starts
        (["--config", "configs/cpu_tiny.yaml", "--dry-run", "teacher.threads=-1"], {},
         "teacher.threads=-1: expected an integer >= 0"),
    ],
)  # fmt: skip
def test_gkd_train_refuses_in_one_line(args, env, message):
    done = _gkd_train(*args, env=_no_fake_env(**env))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.splitlines() == [f"gkd train: error: {done.stderr.split('error: ', 1)[1].strip()}"]
    assert message in done.stderr and "Traceback" not in done.stderr


def _stop_after_30s() -> threading.Event:
    """The service's stop event, set by a timer so that a supervisor that fails to notice its exited
    workers returns 0 (and the test fails) instead of hanging."""
    stop = threading.Event()
    timer = threading.Timer(30, stop.set)
    timer.daemon = True
    timer.start()
    return stop


class _Spawned:
    """A recorded worker process: alive until the supervisor stops it (SIGTERM)."""

    def __init__(self, argv, env, pid):
        self.argv, self.env, self.pid, self.returncode = argv, env, pid, None

    def poll(self):
        return self.returncode

    def send_signal(self, _signum):
        self.returncode = 0

    def wait(self, timeout=None):
        return self.returncode


def _stop_after(seconds: float) -> Callable[[], threading.Event]:
    def stop_on_signals() -> threading.Event:
        stop = threading.Event()
        timer = threading.Timer(seconds, stop.set)
        timer.daemon = True
        timer.start()
        return stop

    return stop_on_signals


@pytest.mark.parametrize(
    ("name", "overrides", "slices"),
    [
        ("teacher", [], [["6"], ["7"]]),
        ("rollout", [], [["4"], ["5"]]),
        ("rollout",
         ["trainer.n_gpus_per_node=2", "rollout.n_gpus_per_node=4", "rollout.tensor_parallel_size=2"],
         [["2", "3"], ["4", "5"]]),
    ],
)  # fmt: skip
def test_services_hand_each_worker_its_slice(monkeypatch, name, overrides, slices):
    """The launcher's service command, parsed by the real CLI and served with spawning recorded: worker i
    gets the i-th tensor-parallel slice of --gpus as CUDA_VISIBLE_DEVICES and the engine flags."""
    import importlib

    from gkd.cli import build_parser

    cfg = load_config(
        ["configs/gpu_example.yaml"],
        ["model.student_path=S", "data.train_files=[p]", "teacher.model_path=T", *overrides],
    )
    cmd = next(
        c for c in commands(cfg, plan(cfg, Found(tuple("01234567"), FAKE_GPUS_ENV)), [], []) if c.name == name
    )
    args = build_parser().parse_args(cmd.argv[3:])  # after `python -m gkd.cli`
    args.port = args.backend_port = 0  # free ports for the broker
    module = importlib.import_module("gkd.services.host")  # both services spawn and stop through it
    spawned: list[_Spawned] = []

    def popen(argv, env):
        spawned.append(_Spawned(argv, env, pid=len(spawned) + 1))
        return spawned[-1]

    monkeypatch.setattr(module.subprocess, "Popen", popen)
    monkeypatch.setattr(module, "check_vllm_imports", lambda: None)  # vLLM is not installed here
    monkeypatch.setattr(module, "stop_on_signals", _stop_after(1.5))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")  # the flag wins over the inherited list
    assert args.func(args) == 0  # stopped by its (timed) signal, every worker still running
    assert all(w.returncode == 0 for w in spawned)  # ... and then stopped by the supervisor
    assert [w.env["CUDA_VISIBLE_DEVICES"].split(",") for w in spawned] == slices
    for w in spawned:
        assert "--gpus" not in w.argv and w.argv[w.argv.index("--device") + 1] == "cuda"
        tp = w.argv[w.argv.index("--tensor-parallel-size") + 1]
        assert int(tp) == len(slices[0]) and "--gpu-memory-utilization" in w.argv


@pytest.mark.parametrize("name", ["teacher", "rollout"])
def test_a_single_worker_narrows_its_own_devices_before_loading(monkeypatch, name):
    import importlib

    module = importlib.import_module(f"gkd.{name}.service")
    spec_class = module.EngineSpec if name == "teacher" else module.RolloutSpec
    seen = []

    def make_worker(*_args, **_kwargs):
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        raise InterruptedError("stop before loading anything")

    monkeypatch.setattr(module, "make_worker", make_worker)
    monkeypatch.setattr("gkd.services.host.stop_on_signals", _stop_after_30s)  # the shared join path
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(InterruptedError):
        module.join(spec_class(model="M", device="cuda"), "127.0.0.1:1", gpus="3")
    with pytest.raises(InterruptedError):  # inherited: the first tensor-parallel slice
        module.join(spec_class(model="M", device="cuda"), "127.0.0.1:1")
    assert seen == ["3", "3"]


def test_bad_gpus_flag_is_one_line(capsys, tmp_path):
    from gkd.cli import main

    model = tmp_path / "M"  # a stand-in folder that passes the model-folder check; nothing loads it
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    argv = ["teacher", "serve", "--model", str(model), "--device", "cuda", "--workers", "2", "--gpus", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err == "gkd teacher serve: error: --gpus 1: expected 2 distinct GPU ids (--workers 2 x "
        "--tensor-parallel-size 1), got 1\n"
    )


# ----------------------------------------------------------------------------- watching the children


def _child(tmp_path, name: str, code: str, console=None):
    from gkd.launch.run import _start

    return _start(Command(name, [sys.executable, "-c", code]), tmp_path, {}, console=console)


_FAIL = "import sys, time; time.sleep({delay}); print('Traceback (most recent call last):'); " + (
    "print('  File \"x.py\", line 1'); print('ValueError: boom {name}'); sys.exit({status})"
)


def test_a_dying_service_stops_the_run_with_one_line(tmp_path, capfd):
    """The watch returns as soon as a service exits; the console line says what died, how, its last error
    and where its log is; the traceback stays in the log."""
    from concurrent.futures import ThreadPoolExecutor

    from gkd.launch.run import watch

    rollout = _child(tmp_path, "rollout", _FAIL.format(delay=0.5, name="rollout", status=3))
    trainer = _child(tmp_path, "trainer", "import time; time.sleep(600)")  # far beyond the 60 s below
    pool = ThreadPoolExecutor(1)
    try:
        assert pool.submit(watch, [rollout, trainer], interval_s=0.1).result(timeout=60) == 1
        assert trainer.proc.poll() is None  # the rollout's exit ended the watch, the trainer still runs
    finally:
        for c in (trainer, rollout):
            c.proc.kill()
            c.proc.wait()
        pool.shutdown()
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if "exited" in x)
    assert "the rollout service exited with status 3" in line and "ValueError: boom rollout" in line
    assert str(tmp_path / "rollout.log") in line and "Traceback" not in err
    assert "Traceback (most recent call last)" in (tmp_path / "rollout.log").read_text()


def test_a_failing_trainer_shows_its_output_but_not_its_traceback(tmp_path, capfd):
    import io

    from gkd.launch.run import watch

    console = io.BytesIO()
    code = "print('step 1 loss 0.5', flush=True); " + _FAIL.format(delay=0, name="trainer", status=1)
    code += "\nprint('=' * 60); print('gkd.trainer FAILED')"
    trainer = _child(tmp_path, "trainer", code, console=console)
    assert watch([trainer], interval_s=0.1) == 1
    shown = console.getvalue().decode()
    assert "step 1 loss 0.5" in shown and "Traceback" not in shown and "boom" not in shown
    line = capfd.readouterr().err.strip()
    assert "\n" not in line and "the trainer (torchrun) exited with status 1" in line
    assert "ValueError: boom trainer" in line and str(tmp_path / "trainer.log") in line
    assert "Traceback" in (tmp_path / "trainer.log").read_text()


def test_console_filter_keeps_ordinary_lines_and_drops_reports():
    from gkd.launch.console import ConsoleFilter

    f = ConsoleFilter()
    lines = [
        ("INFO step 3\n", True),
        ("Traceback (most recent call last):\n", False),
        ('  File "a.py", line 2, in <module>\n', False),
        ("    ^^^^\n", False),
        ("KeyError: 'x'\n", False),
        ("INFO still running\n", True),
        (" 40%|####      | 4/10\r", True),
        (
            "E1126 12:00:00 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 1)\n",
            False,
        ),
        ("anything after torchrun's report\n", False),
    ]
    assert [f.keep(text) for text, _ in lines] == [want for _, want in lines]


def _grandchild_outlives_a_killed_parent(pidfile: Path, parent_code: str, within_s: float = 5.0) -> bool:
    """Run ``parent_code`` (it starts a grandchild that writes its pid to ``pidfile`` once set up),
    SIGKILL the parent, and say whether the grandchild is still running ``within_s`` later."""
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline, "the grandchild did not start"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z":
                return False
        except OSError:  # gone and reaped
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_parent_death_signal_reaches_a_child_of_a_killed_parent(tmp_path):
    """The launcher's children get SIGTERM when it dies, even by SIGKILL (Linux prctl)."""
    pidfile = tmp_path / "child.pid"
    child = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    for spawn in (  # the launcher's exec wrapper (no Python in the forked copy), and the preexec_fn form
        f"subprocess.Popen(with_parent_death_signal([sys.executable, '-c', {child!r}]))",
        f"subprocess.Popen([sys.executable, '-c', {child!r}], preexec_fn=set_parent_death_signal)",
    ):
        parent_code = (
            "import subprocess, sys, time\n"
            "from gkd.services.transport.process import set_parent_death_signal, with_parent_death_signal\n"
            f"{spawn}\n"
            "time.sleep(60)\n"
        )
        pidfile.unlink(missing_ok=True)
        assert not _grandchild_outlives_a_killed_parent(pidfile, parent_code), spawn


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_rank_exits_when_its_parent_is_killed(tmp_path):
    """``exit_with_parent`` (the trainer ranks' watch on their torchrun agent)."""
    pidfile = tmp_path / "rank.pid"
    rank = (
        "import os, time\n"
        "from gkd.services.transport.process import exit_with_parent\n"
        "exit_with_parent(0.1)\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    spawn = f"subprocess.Popen([sys.executable, '-c', {rank!r}])"
    assert not _grandchild_outlives_a_killed_parent(
        pidfile, f"import subprocess, sys, time\n{spawn}\ntime.sleep(60)\n"
    )


# ------------------------------------------------------------------------------------------ start-up


def test_the_trainer_starts_with_the_services_and_is_told_to_wait_for_them(tmp_path, monkeypatch):
    """The services never become healthy here; the trainer starts anyway (it waits for their workers
    itself, ``GKD_SERVICE_WAIT_S``), gets the launcher's start time, and the run ends when it exits."""
    import json

    import gkd.launch.run as launch

    service = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text('up'); time.sleep(120)"
    trainer = (
        "import json, os, pathlib, sys, time\n"
        "keys = ('GKD_SERVICE_WAIT_S', 'GKD_LAUNCH_T0')\n"
        "seen = {k: os.environ.get(k) for k in keys}\n"
        "pathlib.Path(sys.argv[1]).write_text(json.dumps({**seen, 'now': time.time()}))\n"
    )

    def fake_commands(*_args, **_kwargs):
        return [
            Command("teacher", [sys.executable, "-c", service, str(tmp_path / "teacher.up")]),
            Command("rollout", [sys.executable, "-c", service, str(tmp_path / "rollout.up")]),
            Command("trainer", [sys.executable, "-c", trainer, str(tmp_path / "trainer.json")]),
        ]

    monkeypatch.setattr(launch, "commands", fake_commands)
    monkeypatch.setattr(launch, "check_launch", lambda *_a, **_k: None)
    overrides = ["model.student_path=S", "data.train_files=[p]", "teacher.model_path=T"]
    started = time.time()
    status = run(["configs/cpu_tiny.yaml"], [*overrides, f"trainer.output_dir={tmp_path / 'run'}"],
                 health_timeout_s=45.0, started_at=started)  # fmt: skip
    assert status == 0
    seen = json.loads((tmp_path / "trainer.json").read_text())
    assert seen["GKD_SERVICE_WAIT_S"] == "45.0" and float(seen["GKD_LAUNCH_T0"]) == started
    assert (tmp_path / "teacher.up").exists() and (tmp_path / "rollout.up").exists()  # started as well
    assert sorted(p.name for p in (tmp_path / "run" / "logs").iterdir()) == [
        "rollout.log", "teacher.log", "trainer.log"
    ]  # fmt: skip


def test_one_ddp_trainer_process_runs_without_torchrun():
    from gkd.launch.run import trainer_command

    one = trainer_command(_cfg("trainer.nproc_per_node=1"), ["c.yaml"], ["trainer.total_steps=3"])
    assert one[1:] == ["-u", "-m", "gkd.trainer", "--config", "c.yaml", "trainer.total_steps=3"]
    for overrides in (["trainer.nproc_per_node=2"], ["trainer.nproc_per_node=1", "trainer.strategy=fsdp2"]):
        argv = trainer_command(_cfg(*overrides), ["c.yaml"], [])
        assert argv[1:4] == ["-m", "torch.distributed.run", "--standalone"], overrides


def test_children_run_from_a_thread_other_than_the_main_one(tmp_path):
    """``gkd.distill`` may be called from a worker thread (no signal handlers can be set there): the
    children still start, are watched and stopped, and the trainer's status comes back."""
    from gkd.launch.run import _run_children

    service = Command("rollout", [sys.executable, "-c", "import time; time.sleep(60)"])
    trainer = Command("trainer", [sys.executable, "-c", "print('trained')"])
    got: list[int] = []
    worker = threading.Thread(
        target=lambda: got.append(_run_children([service, trainer], tmp_path, {}, {}, None))
    )
    worker.start()
    worker.join(60)
    assert not worker.is_alive() and got == [0]
    assert "trained" in (tmp_path / "trainer.log").read_text()
