"""The teacher service end to end in one process (broker + worker threads) and with worker processes:
replies equal the engine's own computation, reach the right future, survive a SIGKILLed worker, and bad
input gets an error naming the sequence while the service keeps serving."""

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import torch

from gkd.services.transport import Auth, RemoteError
from gkd.teacher.client import TeacherClient
from gkd.teacher.hf_engine import HFTeacherEngine
from gkd.teacher.service import EngineSpec, make_broker, make_worker, tokenizer_fingerprint
from tests.teacher.conftest import MAX_LEN, VOCAB, assert_outputs_equal, random_sequences
from tests.transport.helpers import FAST, ServiceThreads, wait_for

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"teacher-service-test-secret-0123"


class Service(ServiceThreads):
    """Broker + worker threads sharing one engine, on free ports; clients closed on exit."""

    def __init__(self, engine, spec, workers=2, auth=None):
        self.auth, self.spec = auth, spec
        broker = make_broker(host="127.0.0.1", port=0, backend_port=0, auth=auth, **FAST).start()
        threads = [
            make_worker(spec, broker.backend_address, engine=engine, auth=auth, **FAST).start()
            for _ in range(workers)
        ]
        super().__init__(broker, threads, TeacherClient, auth=auth)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFTeacherEngine.from_pretrained(tiny_model_dir, max_top_k=16)


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    return EngineSpec(model=tiny_model_dir, top_k=16)


@pytest.fixture(scope="module")
def service(engine, spec):
    svc = Service(engine, spec)
    yield svc
    svc.close()


def test_50_concurrent_requests_from_3_clients_match_the_engine(service, engine):
    requests = [random_sequences(1 + i % 4, seed=100 + i) for i in range(50)]
    top_ks = [1 + i % 16 for i in range(50)]
    temps = [(1.0, 0.7, 1.3)[i % 3] for i in range(50)]
    clients = [service.client() for _ in range(3)]
    futures = [None] * 50
    start = threading.Barrier(3)

    def submit_from(c):
        start.wait(10)
        for i in range(c, 50, 3):
            futures[i] = clients[c].submit(requests[i], top_k=top_ks[i], temperature=temps[i])

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(submit_from, range(3)))
    done, pending = wait(futures, timeout=60)
    assert not pending
    for i, fut in enumerate(futures):
        assert_outputs_equal(fut.result(), engine.score(requests[i], top_ks[i], temps[i]))
    info = clients[0].info()
    served = [w["served"] for w in info["workers"]]
    assert min(served) > 0 and info["stats"]["requests"] >= 50  # both workers took part


def test_split_batch_keeps_order_and_names_the_global_index(service, engine):
    client = service.client(max_sequences_per_request=4, max_tokens_per_request=60)
    seqs = random_sequences(13, seed=7)
    got = client.score(seqs, top_k=5, temperature=0.8)
    assert_outputs_equal(got, engine.score(seqs, 5, 0.8))
    seqs[9] = (seqs[9][0], [*seqs[9][1][:-1], VOCAB])  # falls in the third micro-request
    with pytest.raises(RemoteError, match=rf"sequence 9: response token id {VOCAB} is outside"):
        client.score(seqs, top_k=5)


def test_defaults_come_from_the_service(service, engine):
    out = service.client().score(random_sequences(2, seed=3))
    assert_outputs_equal(out, engine.score(random_sequences(2, seed=3), 16, 1.0))


@pytest.mark.parametrize(
    "bad, top_k, match",
    [
        (([1, 2], [VOCAB + 5]), 4, rf"sequence 2: response token id {VOCAB + 5} is outside the vocabulary"),
        (([-3, 2], [1]), 4, "sequence 2: prompt token id -3 is outside"),
        (([1, 2], []), 4, "sequence 2: empty response"),
        (
            ([1] * MAX_LEN, [2]),
            4,
            f"sequence 2: {MAX_LEN + 1} tokens exceed the teacher's limit of {MAX_LEN}",
        ),
        (([1, 2], [3]), 17, r"top_k=17 is outside \[1, 16\]"),
    ],
)
def test_bad_input_gets_an_error_naming_the_sequence_and_service_keeps_serving(
    service, engine, bad, top_k, match
):
    client = service.client()
    seqs = random_sequences(4, seed=11)
    seqs[2] = bad
    with pytest.raises(RemoteError, match=match) as err:
        client.score(seqs, top_k=top_k)
    assert err.value.code == "handler_error"
    good = random_sequences(3, seed=12)
    assert_outputs_equal(client.score(good, top_k=4), engine.score(good, 4))


def test_inconsistent_tensors_are_refused(service):
    from gkd.services.transport import Client
    from gkd.teacher.wire import OP_SCORE, pack_request

    fields, tensors = pack_request(random_sequences(2), 4, 1.0)
    tensors["prompt_lens"] = tensors["prompt_lens"] + 1  # lengths no longer add up to input_ids
    with Client(service.broker.frontend_address, timeout_s=10) as raw:
        with pytest.raises(RemoteError, match="lengths add up to"):
            raw.call(OP_SCORE, fields, tensors)
        tensors["prompt_lens"] = tensors["prompt_lens"].long()
        with pytest.raises(RemoteError, match="prompt_lens must be a 1-D int32 tensor"):
            raw.call(OP_SCORE, fields, tensors)


def test_auth_rejects_strangers_and_serves_members(engine, spec):
    svc = Service(engine, spec, workers=1, auth=Auth(SECRET))
    try:
        stranger = svc.client(auth=None, timeout_s=0.5, retries=0)
        with pytest.raises(TimeoutError):
            stranger.score(random_sequences(1), top_k=2)
        seqs = random_sequences(2, seed=5)
        assert_outputs_equal(svc.client().score(seqs, top_k=3), engine.score(seqs, 3))
        assert svc.clients[0].info()["stats"]["auth_failures"] >= 1
    finally:
        svc.close()


WORKER_MAIN = """
import sys, time
from gkd.teacher.service import EngineSpec, make_worker
from tests.transport.helpers import FAST
worker = make_worker(EngineSpec(model=sys.argv[2], top_k=16), sys.argv[1], **FAST)
inner = worker.handler
def slow(header, tensors):  # long enough to be killed while holding a request
    time.sleep(0.4)
    return inner(header, tensors)
worker.handler = slow
worker.run()
"""


def test_sigkilled_worker_loses_no_request(engine, tiny_model_dir):
    broker = make_broker(host="127.0.0.1", port=0, backend_port=0, **FAST).start()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER_MAIN, broker.backend_address, tiny_model_dir],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(2)
    ]
    client = TeacherClient(broker.frontend_address, timeout_s=30, retries=0)  # the broker must re-queue
    try:
        wait_for(lambda: len(client.info()["workers"]) == 2, timeout_s=60, what="2 worker processes")
        requests = [random_sequences(2, seed=200 + i) for i in range(8)]
        futures = [client.submit(requests[0], top_k=8)]
        victim = wait_for(
            lambda: next((w for w in client.info()["workers"] if w["busy"]), None), what="a busy worker"
        )["info"]["pid"]
        futures += [client.submit(r, top_k=8) for r in requests[1:]]
        os.kill(victim, signal.SIGKILL)
        done, pending = wait(futures, timeout=30)
        assert not pending
        for req, fut in zip(requests, futures, strict=True):
            assert_outputs_equal(fut.result(), engine.score(req, 8))
        stats = client.info()["stats"]
        assert stats["workers_lost"] == 1 and stats["requeued"] == 1
        assert stats["requests"] == stats["replies"] == 8  # exactly one reply per request
        assert client.stats["late_replies"] == 0
    finally:
        client.close()
        for p in procs:
            p.kill()
            p.wait(10)
        broker.stop()


def test_tokenizer_fingerprint(tmp_path, tiny_model_dir):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    assert tokenizer_fingerprint(tiny_model_dir) == "none"
    prints = []
    for vocab in ({"a": 0, "b": 1, "[UNK]": 2}, {"a": 0, "b": 1, "[UNK]": 2}, {"a": 1, "b": 0, "[UNK]": 2}):
        folder = tmp_path / f"tok{len(prints)}"
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
        prints.append(tokenizer_fingerprint(str(folder)))
    assert prints[0].startswith("sha256:") and prints[0] == prints[1] != prints[2]


def test_engine_spec_round_trips_through_join_options(tiny_model_dir):
    from gkd.cli import _engine_spec, build_parser

    spec = EngineSpec(model=tiny_model_dir, top_k=7, temperature=0.5, logprob_dtype="float16")
    args = build_parser().parse_args(["teacher", "join", "--broker", "h:1", *spec.to_argv()])
    assert _engine_spec(args) == spec


def test_fp16_logprobs_on_the_wire(engine, tiny_model_dir):
    spec16 = EngineSpec(model=tiny_model_dir, top_k=16, logprob_dtype="float16")
    svc = Service(engine, spec16, workers=1)
    try:
        seqs = random_sequences(3, seed=9)
        got = svc.client().score(seqs, top_k=4)
        want = engine.score(seqs, 4)
        assert all(o.topk_logprobs.dtype == torch.float16 for o in got)
        assert_outputs_equal(got, want, atol=1e-2)
    finally:
        svc.close()


def test_supervise_restarts_exited_workers_then_reports_unhealthy(caplog):
    """A worker that exits is restarted with a line naming its exit status; past the bound the service
    stops (status 1) and says why."""
    import logging
    import subprocess
    import sys
    import threading

    from gkd.services.transport.process import supervise

    spawned = []

    def spawn(slot):
        # slot 0 dies at once (status 3), slot 1 lives until stopped
        code = "import sys; sys.exit(3)" if slot == 0 else "import time; time.sleep(60)"
        p = subprocess.Popen([sys.executable, "-c", code])
        spawned.append((slot, p))
        return p

    stop = threading.Event()
    with caplog.at_level(logging.INFO, logger="gkd.service"):
        status = supervise([spawn(0), spawn(1)], stop, spawn, max_restarts=2, window_s=60)
    assert status == 1
    assert [s for s, _ in spawned] == [0, 1, 0, 0]  # two restarts of slot 0, none of slot 1
    text = caplog.text
    assert text.count("exited (status 3); restarted as process") == 2
    assert "unhealthy: worker 0" in text and "after 2 restarts within 60 s" in text
    assert all(p.poll() is not None for _, p in spawned)  # the healthy one was stopped too


def test_restart_bounds_reach_both_services_from_the_config(monkeypatch):
    """teacher.* / rollout.max_worker_restarts and restart_window_s -> the launcher's ``gkd teacher serve``
    and ``gkd rollout serve`` commands -> each service's supervisor."""
    from gkd import cli
    from gkd.config import load_config
    from gkd.launch.run import rollout_command, teacher_command
    from gkd.rollout import service as rollout_service
    from gkd.teacher import service as teacher_service

    keys = ["teacher.max_worker_restarts=2", "teacher.restart_window_s=30", "rollout.max_worker_restarts=7"]
    cfg = load_config(
        [], ["model.student_path=S", "teacher.model_path=T", "data.train_files=[x.parquet]", *keys]
    )
    monkeypatch.setattr("gkd.services.host.run_service", lambda name, spec, serve: serve(None))
    monkeypatch.setattr("gkd.services.transport.process.configure_logging", lambda level: None)
    got = {}
    for name, module, argv in (
        ("teacher", teacher_service, teacher_command(cfg)),
        ("rollout", rollout_service, rollout_command(cfg)),
    ):
        monkeypatch.setattr(module, "serve", lambda spec, n=name, **kw: got.setdefault(n, kw) and 0)
        args = cli.build_parser().parse_args(argv[argv.index(name) :])
        args.func(args)
    assert (got["teacher"]["max_restarts"], got["teacher"]["restart_window_s"]) == (2, 30.0)
    assert (got["rollout"]["max_restarts"], got["rollout"]["restart_window_s"]) == (7, 600.0)
