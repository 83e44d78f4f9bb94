"""``gkd teacher serve`` in a subprocess (2 worker processes, auth, free ports, stack dumps on SIGUSR1,
SIGTERM shutdown) checked with ``gkd teacher ping`` and a TeacherClient."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gkd.cli import build_parser, main
from gkd.services.transport import Auth
from gkd.teacher.client import TeacherClient
from gkd.teacher.hf_engine import HFTeacherEngine
from tests.teacher.conftest import assert_outputs_equal, random_sequences, save_tiny_model
from tests.transport.helpers import free_port, pid_alive

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model; spare the shared cores


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-teacher"))


def test_serve_ping_score_and_clean_shutdown(tiny_model_dir, tmp_path, capsys):
    port, backend_port = free_port(), free_port()
    secret = tmp_path / "secret"
    secret.write_text("cli-test-secret-0123456789abcdef\n")
    address = f"127.0.0.1:{port}"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gkd.cli",
            "teacher",
            "serve",
            "--model",
            tiny_model_dir,
            "--workers",
            "2",
            "--top-k",
            "16",
            "--port",
            str(port),
            "--backend-port",
            str(backend_port),
            "--auth-secret-file",
            str(secret),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    auth = Auth.from_file(secret)
    try:
        with TeacherClient(address, timeout_s=2, retries=0, auth=auth) as probe:  # wait cheaply, in-process
            deadline = time.monotonic() + 60
            while serve.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    if len(probe.info(timeout_s=2)["workers"]) == 2:
                        break
                time.sleep(0.2)
        # ping in-process (the same main() the console script calls; a subprocess would only add imports)
        status = main(["teacher", "ping", address, "--timeout", "5", "--auth-secret-file", str(secret)])
        out, err = capsys.readouterr()
        assert status == 0, out + err
        for line in (
            f"model: {tiny_model_dir}",
            "vocab_size: 300",
            "tokenizer: none",
            "max_top_k: 16",
            "protocol: 1",
            "workers: 2 live",
            "healthy",
        ):
            assert line in out, out
        pids = [int(line.rsplit(":", 1)[1].split()[0]) for line in out.splitlines() if "worker " in line]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)

        # Unauthenticated: no reply (dropped), so unhealthy with the reason.
        assert main(["teacher", "ping", address, "--timeout", "0.3"]) == 1
        assert "unhealthy: no reply" in capsys.readouterr().err

        seqs = random_sequences(5, seed=21)
        with TeacherClient(address, timeout_s=30, auth=auth) as client:
            got = client.score(seqs, top_k=6, temperature=0.9)
        assert_outputs_equal(got, HFTeacherEngine.from_pretrained(tiny_model_dir).score(seqs, 6, 0.9))

        # kill -USR1 of the service and of a worker: each writes its threads' stacks and runs on. One at a
        # time, a request through the service between them: both write to this one stderr, and two dumps
        # written at once interleave byte by byte
        with TeacherClient(address, timeout_s=30, auth=auth) as client:
            serve.send_signal(signal.SIGUSR1)
            assert_outputs_equal(client.score(seqs, top_k=6, temperature=0.9), got)
            os.kill(pids[0], signal.SIGUSR1)
            assert_outputs_equal(client.score(seqs, top_k=6, temperature=0.9), got)

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(20) == 0
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(p) for p in pids), "worker processes outlived serve"
        err = serve.stderr.read()
        assert "teacher service stopped" in err
        stacks = err.split("Current thread 0x")[1:]  # one per dump: the interrupted thread's stack
        assert len(stacks) == 2, err[-4000:]
        assert any("in supervise" in s for s in stacks)  # the service (its workers' supervisor)
        assert any(
            "gkd/services/transport/worker.py" in s for s in err.split("(most recent call first)")
        )  # a worker
    finally:
        if serve.poll() is None:
            serve.kill()
        serve.wait(10)


def test_ping_nothing_there_is_unhealthy_with_reason(capsys):
    assert main(["teacher", "ping", f"127.0.0.1:{free_port()}", "--timeout", "0.3"]) == 1
    assert "unhealthy: no reply from 127.0.0.1" in capsys.readouterr().err


def test_parser_structure():
    parser = build_parser()
    args = parser.parse_args(["teacher", "serve", "--model", "m", "--backend", "vllm", "--workers", "3"])
    assert (args.command, args.teacher_command, args.backend, args.workers, args.port) == (
        "teacher",
        "serve",
        "vllm",
        3,
        15555,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["teacher", "serve", "--model", "m", "--backend", "tgi"])
