"""Trainer pieces that need no services: the startup checks (fake clients: each failure a clear message,
before any training) and the batch broadcast from rank 0 over two gloo ranks (flat tensors, no pickles)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gkd.config import load_config
from gkd.rollout.types import FINISH_REASONS, Sample
from gkd.teacher.service import tokenizer_fingerprint
from gkd.teacher.types import TeacherOutput
from gkd.trainer.recipe import StartupError, broadcast_batch, check_services
from tests.ranks import gloo_group, run_ranks
from tests.tiny_run import ROOT, build_tiny, make_cpu_tiny
from tests.transport.helpers import free_port


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> str:
    """A folder holding only the tiny tokenizer (what the fingerprint check reads)."""
    path = tmp_path_factory.mktemp("student")
    make_cpu_tiny().tokenizer().save_pretrained(path)
    return str(path)


class FakeClient:
    def __init__(self, workers=None, error: Exception | None = None):
        self.workers, self.error = workers or [], error

    def info(self, timeout_s: float = 5.0):
        if self.error is not None:
            raise self.error
        return {"workers": [{"info": w} for w in self.workers]}


def _cfg(student_dir: str):
    return load_config(
        [], [f"model.student_path={student_dir}", "data.train_files=[x.parquet]", "teacher.top_k=8"]
    )


def _teacher(student_dir: str, **info):
    w = {"model": "T", "vocab_size": 303, "max_top_k": 64, "tokenizer": tokenizer_fingerprint(student_dir)}
    return FakeClient([{**w, **info}])


MODEL = SimpleNamespace(config=SimpleNamespace(vocab_size=303))


def test_startup_checks_pass_and_each_failure_says_what_to_do(student_dir):
    cfg = _cfg(student_dir)
    rollout = FakeClient([{"vocab_size": 303}])
    check_services(cfg, _teacher(student_dir), rollout, MODEL, 1)  # all good: no error
    # a teacher embedding padded further than the student's, serving only the tokenizer's ids: fine
    check_services(cfg, _teacher(student_dir, vocab_size=512, token_ids=300), rollout, MODEL, 1)

    cases = [
        (
            FakeClient(error=TimeoutError("no reply")),
            rollout,
            r"teacher service at 127\.0\.0\.1:15555 .*gkd teacher serve",
        ),
        (FakeClient([]), rollout, "has no workers"),
        (_teacher(student_dir, vocab_size=512), rollout, "serves ids below 512, the student .* has 303 rows"),
        (_teacher(student_dir, tokenizer="sha256:0123456789abcdef"), rollout, "tokenizer .* differs"),
        (
            _teacher(student_dir),
            FakeClient(error=TimeoutError("x")),
            "rollout service at .*rollout.launch=true",
        ),
        (_teacher(student_dir), FakeClient([{"vocab_size": 7}]), "rollout worker vocabulary 7"),
    ]
    for teacher, roll, message in cases:
        with pytest.raises(StartupError, match=message):
            check_services(cfg, teacher, roll, MODEL, 1)


def _batch():
    g = torch.Generator().manual_seed(0)
    samples, outputs = [], []
    for i, (p, r, k) in enumerate(
        [(3, 2, 4), (1, 5, 4), (6, 1, 2)]
    ):  # a teacher answering with fewer columns
        samples.append(
            Sample(
                list(range(i, i + p)),
                list(range(50, 50 + r)),
                torch.randn(r, generator=g),
                ("stop", "length")[i % 2],
                7 + i,
            )
        )
        ids = torch.randint(0, 100, (r, k), generator=g, dtype=torch.int32)
        outputs.append(TeacherOutput(ids, torch.randn(r, k, generator=g).half(), torch.randn(r, generator=g)))
    return samples, outputs


def _bcast_worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port):
        samples, outputs = _batch() if rank == 0 else (None, None)
        got_s, got_t = broadcast_batch(samples, outputs, torch.device("cpu"))
        flat = {}
        for i, (s, t) in enumerate(zip(got_s, got_t, strict=True)):
            flat[f"{i}/prompt"] = torch.tensor(s.prompt_ids)
            flat[f"{i}/response"] = torch.tensor(s.response_ids)
            flat[f"{i}/version"] = torch.tensor(s.policy_version)
            flat[f"{i}/finish"] = torch.tensor(FINISH_REASONS.index(s.finish_reason))
            flat[f"{i}/rlp"] = s.response_logprobs
            flat[f"{i}/ids"], flat[f"{i}/lp"], flat[f"{i}/tok"] = (
                t.topk_ids,
                t.topk_logprobs,
                t.token_logprobs,
            )
        torch.save(flat, f"{out_dir}/rank{rank}.pt")


def test_batch_broadcast_rebuilds_samples_and_padded_teacher_outputs_on_other_ranks():
    with tempfile.TemporaryDirectory() as out:
        run_ranks(_bcast_worker, free_port(), out)
        got = torch.load(f"{out}/rank1.pt", weights_only=True)
    samples, outputs = _batch()
    for i, (s, t) in enumerate(zip(samples, outputs, strict=True)):
        assert got[f"{i}/prompt"].tolist() == s.prompt_ids and got[f"{i}/response"].tolist() == s.response_ids
        assert int(got[f"{i}/version"]) == s.policy_version
        assert FINISH_REASONS[int(got[f"{i}/finish"])] == s.finish_reason
        torch.testing.assert_close(got[f"{i}/rlp"], s.response_logprobs)
        torch.testing.assert_close(got[f"{i}/tok"], t.token_logprobs)
        k = t.topk_ids.shape[1]
        assert got[f"{i}/ids"].dtype == torch.int32 and got[f"{i}/ids"].shape[1] == 4
        assert torch.equal(got[f"{i}/ids"][:, :k], t.topk_ids)
        torch.testing.assert_close(got[f"{i}/lp"][:, :k], t.topk_logprobs.float())
        assert torch.isneginf(got[f"{i}/lp"][:, k:]).all()  # padded slots are unused


def test_unreachable_teacher_fails_fast_with_a_clear_message(tmp_path, student_dir):
    """``python -m gkd.trainer`` alone (no torchrun: one process) against a port nobody serves."""
    tiny = build_tiny(tmp_path / "tiny", num_prompts=4)
    port = free_port()
    argv = [sys.executable, "-m", "gkd.trainer", "--config", "configs/cpu_tiny.yaml"]
    argv += [f"model.student_path={tiny['student']}", f"data.train_files={tiny['prompts']}"]
    argv += [f"trainer.output_dir={tmp_path / 'out'}", "teacher.launch=false", "rollout.launch=false"]
    # the request timeout (600 s) and liveness (15 s) are far above the start-up check's own 10 s: the
    # message says which ended the wait
    argv += [f"teacher.server_port={port}", "logging.progress_bar=false", "teacher.request_timeout_s=600"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"teacher service at 127.0.0.1:{port} is not reachable" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "no reply to 'info'" in proc.stderr and "within 10.0s (1 attempt(s))" in proc.stderr


def test_gkd_train_bad_key_is_an_error_naming_the_valid_keys(capsys):
    from gkd.cli import main

    assert main(["train", "--config", "configs/cpu_tiny.yaml", "trainer.totl_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'trainer.totl_steps'" in err and "total_steps" in err, err


def test_authenticated_services_need_the_same_secret_file(tmp_path, student_dir, monkeypatch):
    """Brokers started with a secret: the trainer's clients (``open_clients``) reach them with the same
    ``*.auth_secret_file``; without it the startup check fails with a message that names the key."""
    import gkd.trainer.checks
    import gkd.trainer.recipe
    from gkd.services.transport import Auth
    from gkd.services.transport.broker import Broker
    from gkd.trainer.recipe import open_clients

    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    monkeypatch.setattr(gkd.trainer.checks, "STARTUP_TIMEOUT_S", 1.0)
    auth = Auth.from_file(secret)
    with (
        Broker(("score",), frontend_port=0, backend_port=0, auth=auth) as teacher_broker,
        Broker(("generate",), frontend_port=0, backend_port=0, auth=auth) as rollout_broker,
    ):
        ports = [b.frontend_address.rsplit(":", 1)[1] for b in (teacher_broker, rollout_broker)]
        base = [f"teacher.server_port={ports[0]}", f"rollout.server_port={ports[1]}"]

        def check(*overrides: str) -> None:
            cfg = load_config([], [f"model.student_path={student_dir}", "data.train_files=[x.parquet]", *base,
                                   *overrides])  # fmt: skip
            teacher, rollout = open_clients(cfg, timeout_s=5, retries=0)
            with teacher, rollout:
                check_services(cfg, teacher, rollout, MODEL, 1)

        with pytest.raises(StartupError, match="has no workers"):  # reached: the broker answered info
            check(f"teacher.auth_secret_file={secret}", f"rollout.auth_secret_file={secret}")
        with pytest.raises(StartupError, match=r"not reachable.*set teacher\.auth_secret_file"):
            check()
        for key, want in [("rollout.auth_secret_file", 0), ("teacher.auth_secret_file", None)]:
            cfg = load_config([], ["model.student_path=S", "data.train_files=[x.parquet]", *base,
                                   f"{key}={secret}"])  # fmt: skip
            _, rollout = open_clients(cfg, timeout_s=5, retries=0)
            with _, rollout:
                if want is None:  # the rollout client has no secret: no reply
                    with pytest.raises(TimeoutError):
                        rollout.info(timeout_s=1.0)
                else:
                    assert len(rollout.info(timeout_s=5)["workers"]) == want
        with pytest.raises(StartupError, match="teacher.auth_secret_file=.*missing"):
            check(f"teacher.auth_secret_file={tmp_path / 'missing'}")
        assert teacher_broker.stats.auth_failures >= 1  # the unsigned request was dropped, not answered


# ------------------------------------------------------------------------------------ precision


def test_gpus_asked_without_cuda_is_one_clear_line(student_dir, monkeypatch, caplog):
    import gkd.trainer.checks
    import gkd.trainer.recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU host
    argv = [f"model.student_path={student_dir}", "data.train_files=[x.parquet]", "trainer.n_gpus_per_node=2"]
    with caplog.at_level("ERROR", logger="gkd.trainer"):
        assert gkd.trainer.recipe.main(argv) == 1
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    line = record.getMessage()
    assert line.startswith("StartupError: trainer.n_gpus_per_node=2 asks for GPUs, but CUDA is not available")
    assert "set trainer.n_gpus_per_node=0" in line and "\n" not in line and record.exc_info is None


def _export_after_one_step(folder: Path, out: Path, param_dtype: str) -> dict[str, torch.Tensor]:
    """The trainer's own pieces: load the student from ``folder`` per the config, one step at lr 1e-6
    with bf16 compute, export the Hugging Face folder; returns the exported weights."""
    from transformers import AutoModelForCausalLM

    from gkd.trainer.checkpoint import export_hf
    from gkd.trainer.recipe import _load_student
    from gkd.trainer.step import build_optimizer, pack_micro_batches, train_step
    from tests.test_trainer_step import make_samples, teacher_outputs, tiny_llama

    overrides = [f"model.param_dtype={param_dtype}", "model.compute_dtype=bfloat16", "optim.lr=1e-6"]
    cfg = load_config([], [f"model.student_path={folder}", "data.train_files=[x.parquet]", *overrides])
    model, tokenizer = _load_student(cfg, torch.device("cpu"))
    assert next(model.parameters()).dtype == getattr(torch, param_dtype)
    samples = make_samples(5, 24)
    micro = pack_micro_batches(samples, teacher_outputs(tiny_llama(1), samples), 200)
    train_step(model, *build_optimizer(model, cfg.optim, 1), micro, cfg)
    want = getattr(torch, param_dtype)  # master weights and their gradients stay in model.param_dtype
    assert all(p.dtype == want and p.grad.dtype == want for p in model.parameters())
    export_hf(model, tokenizer, out)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()


def test_fp32_master_bf16_compute_at_lr_1e6_changes_the_exported_student_and_bf16_master_does_not(
    tmp_path, student_dir
):
    """fp32 master weights + bf16 compute: AdamW's ~1e-6 steps land (fp32 spacing near 0.02 is ~2e-9) and
    reach the exported student; the bf16-master control rounds nearly all of them away (bf16 spacing near
    0.02 is ~1e-4). The one test of this claim on one process (FSDP2's: tests/test_trainer_fsdp2.py)."""
    from transformers import AutoTokenizer

    from tests.test_trainer_step import tiny_llama

    folder = tmp_path / "student"
    tiny_llama(0).save_pretrained(folder)  # fp32 weights on disk
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(folder)
    start = {k: v.clone() for k, v in tiny_llama(0).state_dict().items()}

    def changed(exported: dict[str, torch.Tensor], like: torch.dtype) -> float:
        moved = sum(int((exported[k] != v.to(like).float()).sum()) for k, v in start.items())
        return moved / sum(v.numel() for v in start.values())

    fp32 = _export_after_one_step(folder, tmp_path / "fp32", "float32")
    assert changed(fp32, torch.float32) > 0.9
    control = _export_after_one_step(folder, tmp_path / "bf16", "bfloat16")
    assert changed(control, torch.bfloat16) < 0.05  # the update rounded away (bar weights near zero)


class RecordingTeacher:
    """A teacher client that records what the trainer asks it to score."""

    def __init__(self):
        self.calls = []

    def submit(self, pairs, top_k, temperature, requested_ids=None):
        self.calls.append({"pairs": pairs, "top_k": top_k, "requested_ids": requested_ids})
        return "future"


def _topk_samples(m: int) -> list[Sample]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i, r in enumerate((4, 1, 6)):  # answers of different lengths
        response = torch.randint(0, 50, (r,), generator=g).tolist()
        top = torch.randint(0, 50, (r, m), generator=g).to(torch.int32)
        out.append(Sample([1, 2 + i], response, torch.zeros(r), "length", 0, topk_ids=top))
    return out


@pytest.mark.parametrize("support", ["union", "teacher_topk"])
def test_score_requests_the_students_top_m_and_the_sampled_token(support):
    """``loss.support=union``: each score request carries, per response position, the student's top-m ids
    (from the rollout) followed by the sampled token; ``teacher_topk`` requests none."""
    from types import SimpleNamespace

    from gkd.trainer.recipe import Trainer
    from gkd.trainer.sources import BatchSources

    m = 3
    cfg = load_config(["configs/cpu_tiny.yaml"], [f"loss.support={support}", f"rollout.return_topk={m}"])
    trainer = Trainer(cfg)
    trainer.teacher = RecordingTeacher()
    # what Trainer.train builds before the scheduler runs (answers from the student only: lmbda 1)
    trainer.sources = BatchSources(cfg, None, SimpleNamespace(eos_token_id=0), None, trainer.teacher)
    samples = _topk_samples(m)
    assert trainer.score(0, samples) == "future"
    (call,) = trainer.teacher.calls
    assert call["pairs"] == [(s.prompt_ids, s.response_ids) for s in samples]
    assert call["top_k"] == cfg.teacher.top_k
    if support == "teacher_topk":
        assert call["requested_ids"] is None
        return
    wanted = call["requested_ids"]
    assert len(wanted) == len(samples)
    for s, w in zip(samples, wanted, strict=True):
        assert w.dtype == torch.int32 and tuple(w.shape) == (len(s.response_ids), m + 1)
        assert torch.equal(w[:, :m], s.topk_ids)
        assert w[:, m].tolist() == s.response_ids
