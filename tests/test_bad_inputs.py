"""Bad input to every ``gkd`` subcommand is one line on stderr naming the key, flag or file, exit status 2,
no traceback, and nothing started: the checks of ``gkd.services.inputs`` and ``gkd.launch.preflight`` run
before any model is loaded.

Every case runs through ``gkd.cli.main``; one per subcommand also as ``python -m gkd.cli ...`` in a
subprocess. Stderr must be exactly one line: the failing checks run before anything logs, so no logging
line is ignored.
The models are stand-in folders (a config.json and empty weight/tokenizer files): a case that got past its
check would fail loading them with a traceback, so a check that goes missing fails its case."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gkd.cli import main
from gkd.demo.run import free_ports

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(*overrides: str) -> list[str]:
    """``gkd train`` on the fixture's config with these overrides."""
    return ["train", "--config", "{cfg}", *overrides]


# id -> (arguments after `gkd`, formatted with the fixture's paths; text the error line must contain)
CASES: dict[str, tuple[list[str], str]] = {
    # gkd train: the config's local inputs, before any service starts
    "train-config-missing": (["train", "--config", "{tmp}/nope.yaml"], "nope.yaml not found"),
    "train-config-value": (
        _train("teacher.gpu_memory_utilization=1.5"),
        "teacher.gpu_memory_utilization=1.5: must lie in (0, 1]",
    ),
    "train-config-nan": (_train("optim.lr=nan"), "optim.lr=nan: must be > 0"),
    "train-student-missing": (
        _train("model.student_path={tmp}/nope"),
        "model.student_path={tmp}/nope: no such folder",
    ),
    "train-student-hub-id": (
        _train("model.student_path=HuggingFaceTB/SmolLM2-135M"),
        "model.student_path=HuggingFaceTB/SmolLM2-135M: no local folder of that name, and the hub model "
        "not in the local cache and HF_HUB_OFFLINE=1",
    ),
    "train-student-no-config": (
        _train("model.student_path={tmp}"),
        "model.student_path={tmp}: no config.json",
    ),
    "train-student-no-tokenizer": (
        _train("model.student_path={teacher}"),
        "model.student_path={teacher}: no tokenizer files",
    ),
    "train-teacher-missing": (
        _train("teacher.model_path={tmp}/nope"),
        "teacher.model_path={tmp}/nope: no such folder",
    ),
    "train-data-missing": (
        _train("data.train_files={tmp}/nope.parquet"),
        "data.train_files: data file {tmp}/nope.parquet not found",
    ),
    "train-data-folder": (
        _train("data.train_files={tmp}"),
        "data.train_files: data file {tmp} is a folder",
    ),
    "train-data-not-parquet": (
        _train("data.train_files={text}"),
        "data.train_files: data file {text}: cannot read as parquet",
    ),
    "train-data-no-rows": (_train("data.train_files={empty}"), "have no rows"),
    "train-prompt-column": (
        _train("data.prompt_key=question"),
        "no column 'question' (data.prompt_key); available columns: prompt",
    ),
    "train-val-missing": (
        _train("data.val_files={tmp}/val.parquet", "trainer.test_freq=1"),
        "data.val_files: data file {tmp}/val.parquet not found",
    ),
    "train-output-under-file": (
        _train("trainer.output_dir={text}/out"),
        "trainer.output_dir={text}/out: cannot be a folder",
    ),
    "train-port-busy": (
        _train("teacher.backend_port={busy}"),
        "teacher.backend_port={busy}: cannot bind 127.0.0.1:{busy}",
    ),
    "train-weight-port-busy": (
        _train("rollout.weight_port={busy}"),
        "rollout.weight_port={busy}: cannot bind",
    ),
    "train-ports-clash": (
        _train("rollout.server_port=15551", "teacher.server_port=15551"),
        "the same port as teacher.server_port",
    ),
    "train-secret-missing": (
        _train("rollout.auth_secret_file={tmp}/nope"),
        "rollout.auth_secret_file={tmp}/nope: cannot read it",
    ),
    "train-secret-short": (
        _train("teacher.auth_secret_file={short}"),
        "teacher.auth_secret_file={short}: the secret is 5 bytes",
    ),
    # gkd timeline
    "timeline-missing": (["timeline", "{tmp}/nope"], "RUN_DIR {tmp}/nope: no such folder or file"),
    "timeline-no-trace": (["timeline", "{teacher}"], "no trace.json in this folder"),
    "timeline-not-json": (["timeline", "{text}"], "{text}: not JSON"),
    "timeline-bad-output": (["timeline", "{trace}", "-o", "{tmp}/chart.txt"], "--output {tmp}/chart.txt"),
    # gkd demo: its flags before any model is built or loaded
    "demo-steps": (["demo", "--tiny", "--steps", "0", "--out", "{tmp}/demo"], "--steps=0: must be >= 1"),
    "demo-lr": (["demo", "--tiny", "--lr", "nan", "--out", "{tmp}/demo"], "--lr=nan"),
    "demo-scheduler": (
        ["demo", "--tiny", "--scheduler", "fast", "--out", "{tmp}/demo"],
        "--scheduler 'fast'",
    ),
    "demo-layers": (["demo", "--tiny", "--student-layers", "x-y", "--out", "{tmp}/demo"], "--student-layers"),
    "demo-out-exists": (["demo", "--tiny", "--out", "{teacher}"], "pass --overwrite or another --out"),
    # gkd teacher serve | join | ping
    "teacher-serve-model-missing": (["teacher", "serve", "--model", "{tmp}/nope"], "--model={tmp}/nope"),
    "teacher-serve-hub-id": (["teacher", "serve", "--model", "Qwen/Qwen3-8B"], "never downloaded"),
    "teacher-serve-model-file": (["teacher", "serve", "--model", "{text}"], "not a folder"),
    "teacher-serve-gguf": (
        ["teacher", "serve", "--model", "{teacher}", "--gguf-file", "t.gguf"],
        "no GGUF file t.gguf",
    ),
    "teacher-serve-top-k": (["teacher", "serve", "--model", "{teacher}", "--top-k", "0"], "--top-k=0"),
    "teacher-serve-port-busy": (
        ["teacher", "serve", "--model", "{teacher}", "--port", "{busy}"],
        "--port={busy}: cannot bind",
    ),
    "teacher-serve-ports-clash": (
        ["teacher", "serve", "--model", "{teacher}", "--port", "15551", "--backend-port", "15551"],
        "--backend-port=15551: the same port as --port",
    ),
    "teacher-join-model": (["teacher", "join", "--broker", "h:1", "--model", "{tmp}"], "no config.json"),
    "teacher-join-broker": (["teacher", "join", "--broker", "h", "--model", "{teacher}"], "--broker=h"),
    "teacher-ping-address": (["teacher", "ping", "localhost"], "address=localhost: expected HOST:PORT"),
    "teacher-ping-secret": (
        ["teacher", "ping", "h:1", "--auth-secret-file", "{tmp}/nope"],
        "--auth-secret-file={tmp}/nope",
    ),
    # gkd rollout serve | join
    "rollout-serve-model": (["rollout", "serve", "--model", "{tmp}/nope"], "--model={tmp}/nope"),
    "rollout-serve-channel": (
        ["rollout", "serve", "--model", "{student}", "--weight-channel", "h:0"],
        "--weight-channel=h:0",
    ),
    "rollout-join-model": (["rollout", "join", "--broker", "h:1", "--model", "{text}"], "not a folder"),
    "rollout-join-world": (
        ["rollout", "join", "--broker", "h:1", "--model", "{student}", "--weight-world-size", "1"],
        "--weight-world-size=1: must be >= 2",
    ),
}


def _model(folder: Path, *, tokenizer: bool) -> Path:
    """A stand-in model folder: what the checks look for, nothing a model loader could use."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


# one case per subcommand also runs as a subprocess: the real stderr
# holds no logging line, warning or traceback; the rest run through the same main() in-process (fast)
SUBPROCESS = [
    "train-student-missing",
    "timeline-missing",
    "demo-steps",
    "teacher-serve-hub-id",
    "teacher-join-model",
    "teacher-ping-address",
    "rollout-serve-model",
    "rollout-join-model",
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """The fixture's files, formatted into the cases: stand-in models, prompt files, a config, a busy port."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    paths = {
        "tmp": tmp,
        "student": _model(tmp / "student", tokenizer=True),
        "teacher": _model(tmp / "teacher", tokenizer=False),
        "text": tmp / "notes.txt",
        "empty": tmp / "empty.parquet",
        "trace": tmp / "trace.json",
        "short": tmp / "secret",
    }
    paths["short"].write_text("short\n")
    paths["text"].write_text("not parquet, not json\n")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), paths["empty"])
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp / "train.parquet")
    paths["trace"].write_text(json.dumps([{"ph": "X", "name": "s", "ts": 0, "dur": 1, "pid": 1, "tid": 1}]))
    ports = dict(zip(("t_port", "t_back", "r_port", "r_back", "w_port"), free_ports(5), strict=True))
    (tmp / "cfg.yaml").write_text(  # the defaults' ports may be in use on this machine
        """model: {{student_path: {student}}}
teacher: {{launch: true, model_path: {teacher}, top_k: 4, server_port: {t_port}, backend_port: {t_back}}}
rollout: {{launch: true, max_new_tokens: 4, server_port: {r_port}, backend_port: {r_back},
          weight_port: {w_port}}}
trainer: {{total_steps: 1, output_dir: {tmp}/out}}
data: {{train_files: [{tmp}/train.parquet], max_prompt_length: 8, max_response_length: 4,
       train_batch_size: 2, micro_batch_tokens: 64}}
""".format(**paths, **ports)
    )
    paths["cfg"] = tmp / "cfg.yaml"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        paths["busy"] = busy.getsockname()[1]
        yield {k: str(v) for k, v in paths.items()}


def _case(case: str, paths: dict[str, str]) -> tuple[list[str], str]:
    argv, needle = CASES[case]
    return [a.format(**paths) for a in argv], needle.format(**paths)


def _assert_one_line(case: str, status: int, out: str, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    report = f"status {status}\nstdout: {out[-2000:]}\nstderr: {err[-4000:]}"
    assert "Traceback" not in err + out, report
    assert status == 2, report
    assert len(lines) == 1, report
    argv = CASES[case][0]
    command = " ".join(["gkd", *argv[: 2 if argv[0] in ("teacher", "rollout") else 1]])
    assert lines[0].startswith(f"{command}: error: "), report
    assert needle in lines[0], report
    assert not out.strip(), report  # nothing planned or started before the check


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(paths, case, capsys):
    argv, needle = _case(case, paths)
    status = main(argv)
    out, err = capsys.readouterr()
    _assert_one_line(case, status, out, err, needle)


@pytest.fixture(scope="module")
def subprocess_results(paths):
    def run(case: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "gkd.cli", *_case(case, paths)[0]]
        return subprocess.run(cmd, cwd=paths["tmp"], env=ENV, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(SUBPROCESS, pool.map(run, SUBPROCESS), strict=True))


@pytest.mark.parametrize("case", SUBPROCESS)
def test_bad_input_subprocess_stderr_is_one_line(paths, subprocess_results, case):
    proc = subprocess_results[case]
    _assert_one_line(case, proc.returncode, proc.stdout, proc.stderr, _case(case, paths)[1])


def test_debug_log_level_adds_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gkd.cli", "--log-level", "DEBUG", "timeline", str(tmp_path / "nope")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "InputError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("gkd timeline: error: RUN_DIR")


def test_trainer_checks_its_inputs_before_loading_the_student(tmp_path, caplog):
    """``python -m gkd.trainer`` (what torchrun runs, e.g. from scripts/launch.sh): a stand-in student that
    no loader could read, and a missing prompt file: the error names the data key, not a load failure."""
    from gkd.trainer.recipe import main

    student = _model(tmp_path / "student", tokenizer=True)
    overrides = [
        f"model.student_path={student}",
        f"data.train_files={tmp_path / 'nope.parquet'}",
        f"trainer.output_dir={tmp_path / 'out'}",
    ]
    assert main(overrides) == 1
    assert "data.train_files: data file" in caplog.text and "nope.parquet not found" in caplog.text
