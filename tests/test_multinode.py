"""``gkd train`` on several nodes: Slurm's hostlist syntax and environment, this node's place from flags,
Slurm or the config (one-line refusals), every node's plan and commands, the launchers' roster (address
exchange, refusals, a lost node), and two nodes simulated on one machine: two ``gkd train --nnodes 2``
processes on 127.0.0.1 (CPU, tiny models, 2 DDP ranks each, the teacher on node 0 and the rollout on node
1) train every step once and end with the same weights as one node with 4 ranks; ``kill -9`` of one
node's ``gkd train`` stops the other with a line naming the lost node."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gkd.config import load_config
from gkd.launch.multinode import check_nodes, node_report
from gkd.launch.nodes import DEFAULT_RDZV_PORT, NodeError, NodeSpec, expand_hostlist, node_spec, slurm_hosts
from gkd.launch.placement import FAKE_GPUS_ENV, Found, PlacementError, plan
from gkd.launch.roster import RosterError, form_roster
from gkd.launch.run import commands
from tests.tiny_run import tiny_fixture, train_argv

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN_TIMEOUT_S = 400


# ------------------------------------------------------------------------------------- Slurm, flags


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("node7", ["node7"]),
        ("n[9-11]", ["n9", "n10", "n11"]),  # no padding: the numbers as they are
        ("x[08-10]-ib", ["x08-ib", "x09-ib", "x10-ib"]),  # padding kept past the bracket's end
        ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),  # several brackets: every combination
        ("a, b[1,2]", ["a", "b1", "b2"]),
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    ("text", "message"),
    [("gpu[01-03", "'[' without ']'"), ("gpu]1", "']' without '['"), ("gpu[3-1]", "runs backwards"),
     ("gpu[a-b]", "not a number or a range"), ("", "names no host")],
)  # fmt: skip
def test_expand_hostlist_refuses_malformed_lists(text, message):
    with pytest.raises(NodeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        expand_hostlist(text)


def test_slurm_hosts_asks_scontrol_first_and_falls_back_to_the_parser(tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "alpha\\nbeta\\n"\n')
    scontrol.chmod(0o755)
    assert slurm_hosts("whatever[1-2]", scontrol=str(scontrol)) == ["alpha", "beta"]
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    assert slurm_hosts("gpu[1-2]", scontrol=str(failing)) == ["gpu1", "gpu2"]
    assert slurm_hosts("gpu[1-2]", scontrol="") == ["gpu1", "gpu2"]  # no scontrol on PATH


def _spec(env=None, config_nnodes=1, **flags):
    args = {"nnodes": None, "node_rank": None, "rdzv_endpoint": None, "host": "10.0.0.9"} | flags
    return node_spec(**args, config_nnodes=config_nnodes, env=env or {})


def test_node_spec_reads_slurms_environment():
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert _spec(env) == NodeSpec(2, 1, "gpu07", DEFAULT_RDZV_PORT, "10.0.0.9", "slurm")
    # flags win over Slurm; a config that sets trainer.nnodes agrees
    got = _spec(env, config_nnodes=3, nnodes=3, node_rank=2, rdzv_endpoint="head:1234")
    assert got == NodeSpec(3, 2, "head", 1234, "10.0.0.9", "flags")
    assert got.torch_port == 1235


def test_one_node_binds_loopback_and_several_bind_the_route_to_the_rendezvous_host():
    assert _spec(host=None) == NodeSpec(1, 0, "127.0.0.1", DEFAULT_RDZV_PORT, "127.0.0.1", "config")
    assert _spec(host=None, nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:5000").host == "127.0.0.1"


@pytest.mark.parametrize(
    ("flags", "env", "config_nnodes", "message"),
    [
        ({"nnodes": 3}, {}, 2, "--nnodes=3 does not match trainer.nnodes=2 in the config"),
        ({}, {"SLURM_NNODES": "4", "SLURM_NODEID": "0"}, 2, "SLURM_NNODES=4 does not match trainer.nnodes=2"),
        ({"nnodes": 2, "rdzv_endpoint": "h:1"}, {}, 1, "--nnodes 2 needs --node-rank R"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, {}, 1, "--node-rank 2 is not in 0..1"),
        ({"nnodes": 1}, {"SLURM_NNODES": "2", "SLURM_NODEID": "1"}, 1, "SLURM_NODEID 1 is not in 0..0"),
        ({"nnodes": 2, "node_rank": 1}, {}, 1, "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        ({"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "h:port"}, {}, 1, "--rdzv-endpoint=h:port: expected"),
        ({}, {"SLURM_NNODES": "two", "SLURM_NODEID": "0"}, 1, "SLURM_NNODES='two': expected an integer"),
        (
            {"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "10.0.0.1:9", "host": "127.0.0.1"},
            {},
            1,
            "--host 127.0.0.1 is a loopback address, which the other nodes cannot reach",
        ),
    ],
)
def test_node_spec_refuses_in_one_line(flags, env, config_nnodes, message):
    with pytest.raises(NodeError, match=message) as e:
        _spec(env, config_nnodes, **flags)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------- per-node plans


def _gpu_2nodes(*overrides: str):
    return load_config(["configs/gpu_2nodes.yaml"], list(overrides))


def test_each_node_plans_its_trainer_ranks_and_its_own_services():
    cfg = _gpu_2nodes()
    found = Found(tuple(str(i) for i in range(8)), FAKE_GPUS_ENV)
    p0, p1 = plan(cfg, found, 0), plan(cfg, found, 1)
    assert p0.trainer == p1.trainer == ("0", "1", "2", "3")
    assert p0.teacher == (("4",), ("5",), ("6",), ("7",)) and p0.rollout == ()
    assert p1.rollout == (("4",), ("5",), ("6",), ("7",)) and p1.teacher == ()
    node = NodeSpec(2, 1, "h0", 29400, "h1", "flags")
    report = node_report(cfg, found, node, ["h0", "h1"])
    assert "torchrun's static rendezvous at h0:29401" in report
    assert "GPU plan for node 1 (h1, this node)" in report and "ranks 4-7" in report
    assert "teacher service binds h0:15555" in report and "rollout service binds h1:15557" in report

    teacher = commands(cfg, p0, ["c.yaml"], [], NodeSpec(2, 0, "h0", 29400, "h0", "flags"), ["h0", "h1"])
    rollout = commands(cfg, p1, ["c.yaml"], [], node, ["h0", "h1"])
    assert [c.name for c in teacher] == ["teacher", "trainer"]
    assert [c.name for c in rollout] == ["rollout", "trainer"]
    r, trainer = rollout[0].argv, rollout[1].argv
    assert r[r.index("--host") + 1] == "h1" and r[r.index("--weight-channel") + 1] == "h0:29600"
    assert r[r.index("--dtype") + 1] == "bfloat16" and r[r.index("--device") + 1] == "cuda"
    assert rollout[0].env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    i = trainer.index("--nnodes")
    assert trainer[i : i + 12] == [
        "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "4",
        "--rdzv-backend", "static", "--master-addr", "h0", "--master-port", "29401",
    ]  # fmt: skip
    assert trainer[-3:] == ["trainer.nnodes=2", "teacher.server_ip=h0", "rollout.server_ip=h1"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher.node_rank=2"], "teacher.node_rank=2 is not a node of this run (0..1, --nnodes 2)"),
        (["rollout.nnodes=2"], "rollout.nnodes=2 with rollout.launch=true"),
    ],
)
def test_service_nodes_outside_the_run_are_refused(overrides, message):
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_nodes(_gpu_2nodes(*overrides), 2)


def test_dry_run_prints_every_nodes_plan():
    argv = [sys.executable, "-m", "gkd.cli", "train", "--config", "configs/gpu_2nodes.yaml", "--nnodes", "2"]
    argv += ["--node-rank", "0", "--rdzv-endpoint", "10.0.0.1:29400", "--host", "10.0.0.1", "--dry-run"]
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
    done = subprocess.run(
        argv, cwd=ROOT, env={**env, FAKE_GPUS_ENV: "8"}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert (
        "GPU plan for node 0 (10.0.0.1, this node)" in out
        and "GPU plan for node 1 (<node 1's --host>)" in out
    )
    assert "trainer  ranks 4-7" in out and "--node-rank 0" in out and "--host 10.0.0.1" in out


# ------------------------------------------------------------------------------------------ roster


def _free_port(pair: bool = False) -> int:
    """A free port (``pair``: and the next one free too: torchrun's store takes PORT + 1)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def _form(nodes: list[NodeSpec], digests: list[str], **kwargs) -> list:
    """Form a roster from each node on its own thread; each result is a Roster or the exception raised."""
    results: list = [None] * len(nodes)

    def one(i: int) -> None:
        try:
            results[i] = form_roster(nodes[i], digests[i], join_timeout_s=20, **kwargs)
        except RosterError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def _nodes(n: int) -> list[NodeSpec]:
    port = _free_port()
    return [NodeSpec(n, r, "127.0.0.1", port, f"127.0.0.{r + 1}", "flags") for r in range(n)]


def test_roster_exchanges_addresses_and_names_a_lost_node():
    rosters = _form(_nodes(3), ["d"] * 3)
    try:
        assert [r.hosts for r in rosters] == [["127.0.0.1", "127.0.0.2", "127.0.0.3"]] * 3
        rosters[2].announce("done")  # a node whose trainer finished may close: no loss
        rosters[2].close()
        assert rosters[0].next_event(10).kind == "done"
        assert rosters[0].next_event(1) is None
        rosters[1].close()  # gone without a word: node 0 notices, and tells the others
        event = rosters[0].next_event(10)
        assert (event.kind, event.node) == ("lost", 1) and "closed without a word" in event.why
    finally:
        for r in rosters:
            r.close()


def test_a_silent_node_is_lost_after_the_liveness_timeout(monkeypatch):
    monkeypatch.setattr("gkd.launch.roster.PING_S", 60.0)  # nobody pings: both sides go silent
    rosters = _form(_nodes(2), ["d", "d"], liveness_s=0.5)
    try:
        event = rosters[1].next_event(10)
        assert (event.kind, event.node) == ("lost", 0) and "silent for" in event.why
    finally:
        for r in rosters:
            r.close()


def test_roster_refuses_nodes_with_another_config_on_both_sides():
    results = _form(_nodes(2), ["d0", "d1"])
    assert all(isinstance(r, RosterError) for r in results), results
    assert "node 1 (127.0.0.2) resolved another config than node 0" in str(results[0])
    assert "node 0 refused this node: node 1 (127.0.0.2) resolved another config" in str(results[1])


def test_a_missing_node_is_named():
    node = _nodes(3)[0]
    with pytest.raises(RosterError, match=r"node\(s\) 1, 2 did not join"):
        form_roster(node, "d", join_timeout_s=0.5)


# --------------------------------------------------------------------------- two nodes on one machine


tiny = tiny_fixture()


def _node_argv(tiny, out: Path, ports, rank: int | None, rdzv: int, *overrides: str) -> list[str]:
    """``gkd train`` of node ``rank`` of 2 (None: one node with 4 ranks) on the tiny models."""
    common = ("teacher.top_k=8", "rollout.max_new_tokens=8", "logging.progress_bar=false")
    common += ("trainer.scheduler=sync", "trainer.save_freq=0")  # k = 0: deterministic end to end
    argv = train_argv(tiny, out, ports, *common, *overrides)
    if rank is None:
        return argv + ["trainer.nproc_per_node=4"]
    flags = ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{rdzv}"]
    return argv[:4] + flags + argv[4:] + ["trainer.nproc_per_node=2", "rollout.node_rank=1"]


def _start_nodes(tiny, out: Path, *overrides: str) -> list[subprocess.Popen]:
    ports, rdzv = [_free_port() for _ in range(5)], _free_port(pair=True)
    return [
        subprocess.Popen(
            _node_argv(tiny, out, ports, rank, rdzv, *overrides),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


@pytest.mark.slow
def test_two_nodes_train_like_one_node_with_the_same_ranks(tiny, tmp_path):
    from safetensors.torch import load_file

    steps = 3
    nodes = _start_nodes(tiny, tmp_path / "two", f"trainer.total_steps={steps}")
    try:
        for p in nodes:
            _, err = p.communicate(timeout=RUN_TIMEOUT_S)
            assert p.returncode == 0, err[-4000:]
    finally:
        _stop(nodes)
    ports = [_free_port() for _ in range(5)]
    one = _node_argv(tiny, tmp_path / "one", ports, None, 0, f"trainer.total_steps={steps}")
    done = subprocess.run(one, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]

    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(steps))  # every step once
    assert all(r["actor/num_sequences"] == 4 for r in records)  # one sequence on each of the 4 ranks
    assert (tmp_path / "two" / "logs" / "node1" / "rollout.log").is_file()
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    ref = load_file(tmp_path / "one" / "final" / "model.safetensors")
    # bitwise: the same 4 gloo ranks reduce the same gradients in the same order, on the same samples
    assert set(two) == set(ref) and all(two[k].equal(ref[k]) for k in ref)


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])
def test_kill_9_of_one_node_stops_the_other_naming_it(tiny, tmp_path, killed):
    out = tmp_path / "run"
    nodes = _start_nodes(tiny, out, "trainer.total_steps=100000")
    try:
        metrics = out / "metrics.jsonl"
        stopped = threading.Event()
        threading.Timer(RUN_TIMEOUT_S, stopped.set).start()
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # training has begun
            assert all(p.poll() is None for p in nodes) and not stopped.wait(0.2), "the run ended or stalled"
        nodes[killed].send_signal(signal.SIGKILL)
        other = nodes[1 - killed]
        _, err = other.communicate(timeout=60)
        assert other.returncode != 0
        assert f"gkd train: lost node {killed} (127.0.0.1): its gkd train's connection closed" in err, err[
            -3000:
        ]
        stopped.set()
    finally:
        _stop(nodes)


def test_sbatch_script_starts_gkd_train_on_every_node(tmp_path):
    """``scripts/slurm/gkd.sbatch`` under a stand-in ``srun`` (each node's task in turn, its
    SLURM_NODEID set) and ``scontrol``: every node's ``gkd train`` gets its rank and node 0's endpoint."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\nprintf "gpu07\\ngpu08\\n"\n')
    srun = '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
    srun += 'for n in 0 1; do SLURM_NODEID=$n "$@" || exit $?; done\n'
    (bin_dir / "srun").write_text(srun)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": sys.executable, FAKE_GPUS_ENV: "8"}
    env |= {"SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "123", "SLURM_NNODES": "2"}
    env |= {"SLURM_JOB_NODELIST": "gpu[07-08]"}
    args = ["--config", "configs/gpu_2nodes.yaml", "--host", "10.0.0.7", "--dry-run"]
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/slurm/gkd.sbatch"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "launchers meet at gpu07:29646" in out  # 29400 + 123 * 2
    assert "GPU plan for node 0 (10.0.0.7, this node)" in out and "GPU plan for node 1 (gpu08)" in out
    assert "GPU plan for node 0 (gpu07)" in out and "GPU plan for node 1 (10.0.0.7, this node)" in out
    assert "--node-rank 0 --nproc-per-node 4" in out and "--node-rank 1 --nproc-per-node 4" in out
