"""``gkd eval``: how close a student is to its teacher, and what it says, on held-out prompts (the
measures ``gkd demo`` reports before and after training, in one place).

    gkd eval MODEL [--teacher T] [--data F] [--n 64] [--json OUT]

``MODEL``: a Hugging Face folder, or a gkd checkpoint folder (``checkpoints/step_N``: its
``model.safetensors`` loaded into the architecture of the run's ``model.student_path``, read from the
checkpoint's ``config.yaml``). Measures (all on the first ``--n`` prompts of ``--data``, default the demo's
held-out prompts; greedy answers unless said otherwise):

- on-policy: the student samples answers (the sampler and settings the rollout service uses), and the
  per-token KL(teacher || student) is measured over the full vocabulary on those answers;
- off-policy: the same measure on the teacher's greedy answers (the same answers before and after);
- both directions: KL(teacher || student) (forward) and KL(student || teacher) (reverse);
- the teacher's mean log-prob of the student's greedy answers (how plausible the teacher finds them);
- without a teacher as well: ``repetition`` (share of answers with a repeated token 4-gram: the loops a
  weak student falls into), ``distinct_2`` (distinct token bigrams / all bigrams over the answers) and the
  mean answer length in tokens; a table of samples (prompt, student, teacher).

Full-vocabulary KL is affordable here (a few thousand tokens); training itself only ever sees top-k.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gkd.rollout.hf_engine import HFRolloutEngine
from gkd.rollout.types import SamplingConfig

DEMO_PROMPTS = Path(__file__).resolve().parent / "demo" / "prompts.parquet"  # held-out split: the default

Pair = tuple[list[int], list[int]]  # (prompt ids, response ids)


@dataclass
class KLResult:
    kl: float  # mean per-token KL(teacher || student), nats
    reverse_kl: float  # mean per-token KL(student || teacher), nats
    tokens: int  # response tokens measured
    answers: list[list[int]]  # the responses measured, one per prompt


def _batches(pairs: Sequence[Pair], max_tokens: int):
    """Consecutive groups of pairs whose padded size stays under ``max_tokens``."""
    group: list[Pair] = []
    width = 0
    for p in pairs:
        w = max(width, len(p[0]) + len(p[1]))
        if group and w * (len(group) + 1) > max_tokens:
            yield group
            group, w = [], len(p[0]) + len(p[1])
        group.append(p)
        width = w
    if group:
        yield group


@torch.no_grad()
def _response_logprobs(model, pairs: Sequence[Pair], pad_id: int) -> list[torch.Tensor]:
    """Full-vocabulary log-probs ``[R, V]`` at each response position, per pair (right padding)."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(pairs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    return [
        torch.log_softmax(logits[i, len(p) - 1 : len(p) + len(r) - 1], -1) for i, (p, r) in enumerate(pairs)
    ]


@torch.no_grad()
def token_kl(teacher, student, pairs: Sequence[Pair], *, pad_id: int, max_tokens: int = 4096) -> KLResult:
    """Mean over response tokens of KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), and of
    the reverse KL(student || teacher)."""
    total, reverse, count = 0.0, 0.0, 0
    kept = [(p, r) for p, r in pairs if r]
    for group in _batches(kept, max_tokens):
        for lt, ls in zip(
            _response_logprobs(teacher, group, pad_id),
            _response_logprobs(student, group, pad_id),
            strict=True,
        ):
            total += float((lt.exp() * (lt - ls)).sum())
            reverse += float((ls.exp() * (ls - lt)).sum())
            count += lt.shape[0]
    n = max(count, 1)
    return KLResult(kl=total / n, reverse_kl=reverse / n, tokens=count, answers=[list(r) for _, r in pairs])


@torch.no_grad()
def teacher_logprob(teacher, pairs: Sequence[Pair], *, pad_id: int, max_tokens: int = 4096) -> float:
    """Mean over response tokens of the teacher's log-prob of each token (nats; higher is better)."""
    total, count = 0.0, 0
    for group in _batches([(p, r) for p, r in pairs if r], max_tokens):
        for lt, (_, r) in zip(_response_logprobs(teacher, group, pad_id), group, strict=True):
            total += float(lt.gather(1, torch.tensor(r)[:, None]).sum())
            count += len(r)
    return total / max(count, 1)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    stop: Sequence[int],
    pad_id: int,
) -> list[list[int]]:
    """Answers from ``model`` with the rollout service's sampler (``temperature=0``: greedy)."""
    engine = HFRolloutEngine(model, pad_token_id=pad_id, max_batch_size=32)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=tuple(stop), seed=seed
    )
    return [s.response_ids for s in engine.generate([list(p) for p in prompts], sampling)]


def evaluate(
    teacher,
    student,
    prompts: Sequence[Sequence[int]],
    teacher_answers: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    stop: Sequence[int],
    pad_id: int,
) -> dict[str, KLResult]:
    """``{"on_policy": ..., "off_policy": ...}`` for ``student`` on held-out ``prompts``."""
    own = generate(
        student,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        stop=stop,
        pad_id=pad_id,
    )
    on = token_kl(teacher, student, list(zip(map(list, prompts), own, strict=True)), pad_id=pad_id)
    off_pairs = list(zip(map(list, prompts), map(list, teacher_answers), strict=True))
    off = token_kl(teacher, student, off_pairs, pad_id=pad_id)
    return {"on_policy": on, "off_policy": off}


# ------------------------------------------------------------------------------------ answer statistics


def loops(answer: Sequence[int], n: int = 4) -> bool:
    """True when some token ``n``-gram occurs twice in ``answer`` (a repetition loop)."""
    seen = set()
    for i in range(len(answer) - n + 1):
        gram = tuple(answer[i : i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def answer_stats(answers: Sequence[Sequence[int]]) -> dict[str, float]:
    """``repetition`` (share of answers that :func:`loops`), ``looping`` (their count), ``distinct_2``
    (distinct bigrams / bigrams, over all answers) and ``mean_length`` (tokens)."""
    bigrams = [tuple(a[i : i + 2]) for a in answers for i in range(len(a) - 1)]
    looping = sum(loops(a) for a in answers)
    return {
        "repetition": looping / max(len(answers), 1),
        "looping": float(looping),
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "mean_length": sum(len(a) for a in answers) / max(len(answers), 1),
    }


# ---------------------------------------------------------------------------------------- gkd eval


def load_model(path: str):
    """(model, tokenizer) from a Hugging Face folder or a gkd checkpoint folder; ``InputError`` otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gkd.services.inputs import InputError

    folder = Path(path)
    if (folder / "meta.json").is_file():  # a gkd checkpoint: weights onto the run's student architecture
        import yaml

        from gkd.trainer.checkpoint import load_checkpoint

        if (folder / "adapter.safetensors").is_file():
            raise InputError(f"{path} is a LoRA checkpoint (adapter only): evaluate the run's final/ folder")
        config = folder / "config.yaml"
        base = (
            (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("student_path")
            if config.is_file()
            else None
        )
        if not base or not (Path(base) / "config.json").is_file():
            raise InputError(
                f"checkpoint {path}: its config.yaml names no readable model.student_path ({base!r}) to take "
                "the architecture and tokenizer from; export the checkpoint to a Hugging Face folder first"
            )
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        load_checkpoint(folder, model=model, restore_rng=False)
        return model.eval(), AutoTokenizer.from_pretrained(base)
    if not (folder / "config.json").is_file():
        raise InputError(
            f"{path}: not a Hugging Face model folder (no config.json) nor a gkd checkpoint (no meta.json)"
        )
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def encode_prompt(tok, text: str) -> list[int]:
    """A user turn rendered with the tokenizer's chat template (plain tokens without one)."""
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])
    return list(tok(text)["input_ids"])


def read_prompts(data: str | None, n: int, prompt_key: str = "prompt") -> list[str]:
    """The first ``n`` prompts of the parquet file ``data`` (default: the demo's held-out prompts)."""
    import pyarrow.parquet as pq

    from gkd.services.inputs import InputError

    if data is None:
        rows = pq.read_table(DEMO_PROMPTS).to_pylist()
        return [r["prompt"] for r in rows if r["split"] == "heldout"][:n]
    if not Path(data).is_file():
        raise InputError(f"--data {data}: no such file (a parquet file with a '{prompt_key}' column)")
    table = pq.read_table(data)
    if prompt_key not in table.column_names:
        raise InputError(
            f"--data {data}: no column '{prompt_key}' (columns: {', '.join(table.column_names)})"
        )
    prompts = [p for p in table.column(prompt_key).to_pylist()[:n] if isinstance(p, str) and p.strip()]
    if not prompts:
        raise InputError(f"--data {data}: column '{prompt_key}' holds no prompt strings")
    return prompts


def measure(
    student,
    tok,
    prompts: Sequence[str],
    *,
    teacher=None,
    max_new_tokens: int = 32,
    seed: int = 0,
    samples: int = 5,
) -> dict:
    """Every ``gkd eval`` figure of ``student`` (and against ``teacher`` when given) as a JSON-ready dict."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen_kw = dict(max_new_tokens=max_new_tokens, stop=[tok.eos_token_id], pad_id=pad)
    held = [encode_prompt(tok, q) for q in prompts]
    greedy = generate(student, held, temperature=0.0, seed=0, **gen_kw)
    report: dict = {"prompts": len(held), "max_new_tokens": max_new_tokens, **answer_stats(greedy)}
    teacher_answers: list[list[int]] = []
    if teacher is not None:
        teacher_answers = generate(teacher, held, temperature=0.0, seed=0, **gen_kw)
        kl = evaluate(teacher, student, held, teacher_answers, temperature=1.0, seed=seed, **gen_kw)
        for kind, res in kl.items():
            report[kind] = {"kl": res.kl, "reverse_kl": res.reverse_kl, "tokens": res.tokens}
        pairs = list(zip(held, greedy, strict=True))
        report["teacher_logprob_of_greedy"] = teacher_logprob(teacher, pairs, pad_id=pad)
        report["teacher"] = answer_stats(teacher_answers)

    def text(ids):
        return tok.decode(ids, skip_special_tokens=True)

    report["samples"] = [
        {
            "prompt": q,
            "student": text(a),
            **({"teacher": text(teacher_answers[i])} if teacher_answers else {}),
        }
        for i, (q, a) in enumerate(zip(prompts[:samples], greedy, strict=False))
    ]
    return report


def render_table(table) -> str:
    """A rich table as plain text (120 columns, no colour)."""
    from rich.console import Console

    console = Console(width=120, record=True, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(table)
    return cap.get().rstrip()


def report_text(report: dict, name: str) -> str:
    """The console tables of a :func:`measure` report."""
    from rich.table import Table

    t = Table(
        title=f"gkd eval {name}: {report['prompts']} prompts, greedy answers of <= {report['max_new_tokens']}"
    )
    t.add_column("measure")
    t.add_column("value", justify="right")
    for kind in ("on_policy", "off_policy"):
        if kind in report:
            t.add_row(f"KL(teacher || student), {kind.replace('_', '-')}", f"{report[kind]['kl']:.3f}")
            t.add_row(
                f"KL(student || teacher), {kind.replace('_', '-')}", f"{report[kind]['reverse_kl']:.3f}"
            )
    if "teacher_logprob_of_greedy" in report:
        t.add_row("teacher log-prob of the greedy answers", f"{report['teacher_logprob_of_greedy']:.3f}")
    t.add_row("answers looping (repeated 4-gram)", f"{int(report['looping'])} / {report['prompts']}")
    t.add_row("distinct-2", f"{report['distinct_2']:.3f}")
    t.add_row("mean answer length (tokens)", f"{report['mean_length']:.1f}")
    s = Table(title="samples", show_lines=True)
    cols = ["prompt", "student"] + (
        ["teacher"] if report["samples"] and "teacher" in report["samples"][0] else []
    )
    for c in cols:
        s.add_column(c, overflow="fold", ratio=1)
    for row in report["samples"]:
        s.add_row(*(row[c][:200] for c in cols))
    return render_table(t) + "\n" + render_table(s)


def _eval(args: argparse.Namespace) -> int:
    from gkd.services.inputs import InputError, number

    number(args.n, "--n", minimum=1)
    number(args.max_new_tokens, "--max-new-tokens", minimum=1)
    torch.manual_seed(args.seed)
    prompts = read_prompts(args.data, args.n, args.prompt_key)
    student, tok = load_model(args.model)
    teacher = None
    if args.teacher:
        teacher, _ = load_model(args.teacher)
        sv, tv = student.config.vocab_size, teacher.config.vocab_size
        if sv != tv:
            raise InputError(
                f"--teacher {args.teacher} has vocabulary {tv}, {args.model} has {sv}: KL needs one"
            )
    report = measure(
        student, tok, prompts, teacher=teacher, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    report["model"], report["teacher_model"] = str(args.model), args.teacher
    print(report_text(report, args.model))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}", file=sys.stderr)
    return 0


def add_eval_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``gkd eval``."""
    p = sub.add_parser("eval", help="measure a student (and its KL to a teacher) on held-out prompts")
    p.add_argument("model", help="Hugging Face model folder or gkd checkpoint folder")
    p.add_argument("--teacher", help="teacher model folder: adds the KLs and the teacher's log-prob")
    p.add_argument("--data", help="parquet file of prompts (default: the demo's held-out prompts)")
    p.add_argument(
        "--prompt-key", dest="prompt_key", default="prompt", help="its prompt column (default prompt)"
    )
    p.add_argument("--n", type=int, default=64, help="prompts measured (default 64)")
    p.add_argument(
        "--max-new-tokens", dest="max_new_tokens", type=int, default=32, help="answer length (default 32)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the on-policy samples (default 0)")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(func=_eval)
