#!/usr/bin/env python3
"""Planted-bug check: each documented claim (README.md, docs/) has a test that fails when it is broken.

Every entry of ``MUTATIONS`` plants one bug (an exact piece of source text replaced by a wrong one) in a
temporary copy of the repository (the git-tracked and untracked-but-not-ignored files plus the built C++
extension; the working tree is never touched) and runs the narrowest tests that must fail on it. It
prints a table (claim, tests, verdict) and exits 1 when any planted bug survives its tests (or its tests
time out or cannot be collected), 2 when an entry's original text is not found exactly once (a refactor
moved it: update the entry).

    scripts/mutation_check.py                  # every entry, two at a time
    scripts/mutation_check.py --only union     # entries whose claim contains "union"
    scripts/mutation_check.py --check          # only verify that every original text is in the tree
    scripts/mutation_check.py --list           # the table, without running anything

Adding a claim is one ``Mutation(...)`` entry: the file, its exact original text (unique in that file),
the replacement, and pytest arguments selecting the tests that must catch it (node ids, ``-k`` ...).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    claim: str  # the documented claim the planted bug breaks
    file: str  # relative to the repository root
    original: str  # exact text, present exactly once in ``file``
    replacement: str  # the planted bug
    tests: tuple[str, ...]  # pytest arguments: the narrowest tests that must fail


_LOSS_VS_REFERENCE = "tests/kernels/test_losses.py::test_topk_distill_loss_matches_reference_fp32"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "forward_kl: gradient of KL(P||Q) on the bucket support",
        "gkd/kernels/topk_torch.py",
        "return (p * (t - s)).sum(-1), -p\n",
        "return (p * (t - s)).sum(-1), -0.5 * p\n",
        (_LOSS_VS_REFERENCE, "-k", "forward_kl"),
    ),
    Mutation(
        "reverse_kl: gradient of KL(Q||P)",
        "gkd/kernels/topk_torch.py",
        "return (q * diff).sum(-1), q * (diff + 1.0)\n",
        # (q * diff alone would be no bug: the softmax Jacobian cancels the q term)
        "return (q * diff).sum(-1), q * (0.5 * diff + 1.0)\n",
        (_LOSS_VS_REFERENCE, "-k", "reverse_kl"),
    ),
    Mutation(
        "jsd: beta-weighted gradient",
        "gkd/kernels/topk_torch.py",
        "grad = -(1.0 - beta) * q * d_s",
        "grad = -beta * q * d_s",
        (_LOSS_VS_REFERENCE, "-k", "jsd"),
    ),
    Mutation(
        "tail=renorm: the teacher's top-k renormalised",
        "gkd/kernels/topk_torch.py",
        "t = lp - torch.logsumexp(torch.where(valid, lp, neg), dim=-1, keepdim=True)",
        "t = lp",
        (_LOSS_VS_REFERENCE, "-k", "renorm"),
    ),
    Mutation(
        "tail=none: forward KL on the teacher's top-k alone",
        "gkd/kernels/topk_torch.py",
        "z.scatter_add_(1, ids, -p * row_g)",
        "z.scatter_add_(1, ids, -0.5 * p * row_g)",
        (_LOSS_VS_REFERENCE, "-k", "forward_kl-none"),
    ),
    Mutation(
        "tail=bucket: the teacher's bucket floored at 1e-6",
        "gkd/kernels/_common.py",
        "TAIL_FLOOR = 1e-6\n",
        "TAIL_FLOOR = 1e-2\n",
        ("tests/kernels/test_losses_edge.py::test_the_teacher_bucket_floor_is_1e_6_by_hand",),
    ),
    Mutation(
        "teacher log-probs are value-checked (<= 0, no NaN)",
        "gkd/kernels/_common.py",
        "bool((teacher_logprobs > 1e-3).any())",
        "bool((teacher_logprobs > 1e3).any())",
        ("tests/kernels/test_losses_edge.py::test_bad_input_names_the_argument",),
    ),
    Mutation(
        "loss.is_correction: weights clipped at loss.is_clip",
        "gkd/trainer/step.py",
        "return log_ratio.clamp(max=math.log(clip)).exp()",
        "return log_ratio.exp()",
        ("tests/test_is_correction.py::test_token_weights_are_clipped_ratios",),
    ),
    Mutation(
        "global token normalisation across ranks",
        "gkd/trainer/step.py",
        "    n_global = plan.tokens\n",
        "    n_global = plan.rank_tokens[dist.get_rank(group) if world > 1 else 0]\n",
        ("tests/test_trainer_step.py::test_two_gloo_ranks_average_to_the_single_process_gradient",),
    ),
    Mutation(
        "DDP/FSDP2 ranks run equal micro-batch counts (a rank short of work pads with zero-weight ones)",
        "gkd/trainer/step.py",
        "micro_batches += [zero_weight_micro_batch()] * (plan.micro_batches - len(micro_batches))",
        "micro_batches += []",
        ("tests/test_balance.py::test_uneven_ranks_run_equal_micro_batch_counts_and_match_one_process[2]",),
    ),
    Mutation(
        "loss.support=union: the trainer asks the teacher for the student's top-m + the sampled token",
        "gkd/trainer/sources.py",
        'wanted = union_request(samples) if cfg.loss.support == "union" and student else None',
        "wanted = None",
        ("tests/test_trainer.py::test_score_requests_the_students_top_m_and_the_sampled_token",),
    ),
    Mutation(
        "union support: requested ids already in the teacher's top-k are not scored twice",
        "gkd/teacher/types.py",
        "~(in_top | repeated)",
        "~in_top",
        ("tests/teacher/test_union.py::test_union_rows_dedup_order_and_padding",),
    ),
    Mutation(
        "val/kl is the training loss per response token",
        "gkd/trainer/validation.py",
        '"val/kl": loss_sum / max(tokens, 1),',
        '"val/kl": loss_sum / max(len(samples), 1),',
        (
            "tests/test_evaluations.py::test_val_kl_is_the_training_loss_per_token_on_answers_of_different_lengths",
        ),
    ),
    Mutation(
        "staleness <= k: a batch is generated on version >= b - k",
        "gkd/trainer/scheduler.py",
        "rec = _Batch(b, max(self._start, b - self.k), self._run_id, self._is_student(b))",
        "rec = _Batch(b, max(self._start, b - self.k - 1), self._run_id, self._is_student(b))",
        ("tests/test_scheduler.py::test_every_batch_once_in_order_with_exact_staleness",),
    ),
    Mutation(
        "weight sync: every bucket's checksum is verified",
        "gkd/weights/transfer.py",
        "        if actual != sent:\n",
        "        if actual != sent and False:\n",
        (
            "tests/test_weights.py::"
            "test_gpu_path_on_cpu_tensors_casts_to_the_engine_dtype_and_the_word_sum_catches_a_flipped_byte",
        ),
    ),
    Mutation(
        "rollout: a min_version request waits for that version",
        "gkd/rollout/versioned.py",
        "            if self.version >= min_version:\n",
        "            if self.version >= min_version - 1:\n",
        ("tests/rollout/test_service.py::test_min_version_that_never_arrives_times_out_with_a_clear_error",),
    ),
    Mutation(
        "resume: the RNG states are restored",
        "gkd/trainer/checkpoint/rng.py",
        '    torch.set_rng_state(state["torch"])\n',
        "    torch.get_rng_state()\n",
        ("tests/test_checkpoint.py::test_rng_state_survives_weights_only_load",),
    ),
    Mutation(
        "resume: the data position is restored (no batch repeated or skipped)",
        "gkd/data/prompts.py",
        "        self.next_batch = batch\n",
        "        self.next_batch = max(batch - 1, 0)\n",
        ("tests/test_data.py::test_resume_continues_without_gap_or_repeat",),
    ),
    Mutation(
        "resume: trainer.resume=auto takes the newest complete checkpoint",
        "gkd/trainer/checkpoint/folders.py",
        "return found[-1][1] if found else None",
        "return found[0][1] if found else None",
        ("tests/test_checkpoint.py::test_resolve_resume",),
    ),
    Mutation(
        "LoRA: the base weights are frozen (bitwise unchanged)",
        "gkd/trainer/lora.py",
        "    for name, layer in wrapped.named_modules():\n"
        "        if not isinstance(layer, peft.tuners.lora.LoraLayer):\n",
        "    wrapped.requires_grad_(True)\n    for name, layer in wrapped.named_modules():\n"
        "        if not isinstance(layer, peft.tuners.lora.LoraLayer):\n",
        ("tests/test_lora.py::test_only_the_adapter_trains_and_the_engine_receives_the_merge",),
    ),
    Mutation(
        "broker: a dead worker's request is re-queued to another worker",
        "gkd/services/transport/broker.py",
        "            self._requeue(job.jid)\n        if not self._workers:\n",
        "            self._forget(job.jid)\n        if not self._workers:\n",
        (
            "tests/transport/test_faults.py::test_sigkilled_worker_request_completes_elsewhere_none_lost_none_duplicated",
        ),
    ),
    Mutation(
        "preflight: a model folder without config.json is refused in one line",
        "gkd/services/inputs.py",
        '    if not (folder / "config.json").is_file():\n',
        '    if not (folder / "config.json").is_file() and False:\n',
        ("tests/test_bad_inputs.py::test_bad_input_is_one_line_exit_2", "-k", "student"),
    ),
    Mutation(
        "GPU placement: an oversubscribed node is refused",
        "gkd/launch/placement.py",
        "shared = total > found.count\n",
        "shared = total > found.count + 2\n",
        ("tests/test_placement.py::test_refusals_are_one_line_naming_the_counts",),
    ),
    Mutation(
        "configuration reference: a key without a description fails the generator",
        "scripts/gen_config_docs.py",
        "        if not meaning:\n            missing.append(key)\n",
        "        if not meaning:\n            pass\n",
        ("tests/test_docs.py::test_a_key_without_a_description_fails_the_generator",),
    ),
    Mutation(
        "scripts/setup.sh gpu installs the vllm extra",
        "scripts/setup.sh",
        'gpu) extras="vllm,tensorboard" ;;',
        'gpu) extras="tensorboard" ;;',
        ("tests/test_docs.py::test_setup_gpu_installs_the_vllm_extra",),
    ),
    Mutation(
        "replies: a NaN log-prob from a worker is refused",
        "gkd/services/values.py",
        "bad = torch.isnan(x) | (x > LOGPROB_SLACK)",
        "bad = x > LOGPROB_SLACK",
        ("tests/test_reply_values.py::test_bad_logprobs_are_refused_naming_the_worker",),
    ),
    Mutation(
        "a non-finite gradient norm skips the optimizer step",
        "gkd/trainer/step.py",
        "skip = any_rank(not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm))), group, device)",
        "skip = any_rank(not math.isfinite(loss_sum), group, device)",
        ("tests/test_skipped_steps.py::test_a_nan_gradient_skips_the_step_and_leaves_the_weights_unchanged",),
    ),
)


def originals_problems(root: Path = ROOT, mutations=MUTATIONS) -> list[str]:
    """One line per entry whose original text is not present exactly once in its file."""
    problems = []
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.claim}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            problems.append(f"{m.claim}: the original text occurs {count} times in {m.file}, not once")
        if m.original == m.replacement:
            problems.append(f"{m.claim}: the replacement equals the original")
    return problems


def _tree_files(root: Path) -> list[str]:
    """The files a test run needs: tracked, untracked but not ignored, and the built extension."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, check=True,
    )  # fmt: skip
    files = [f for f in out.stdout.decode().split("\0") if f and (root / f).is_file()]
    files += [str(p.relative_to(root)) for p in (root / "gkd").glob("_C*.so")]
    return sorted(set(files))


def make_base_copy(root: Path, dest: Path) -> Path:
    for rel in _tree_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    return dest


def _env(copy: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(copy),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def check_imports_from(copy: Path) -> None:
    """The copy's gkd must be the one imported (an editable install must not shadow PYTHONPATH)."""
    out = subprocess.run(
        [sys.executable, "-c", "import gkd; print(gkd.__file__)"],
        cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    where = out.stdout.strip()
    if out.returncode != 0 or not where.startswith(str(copy)):
        why = where or out.stderr[-500:]
        raise SystemExit(f"mutation_check: the copy's gkd is not the one imported ({why})")


@dataclass
class Result:
    mutation: Mutation
    verdict: str  # caught | SURVIVED | TIMEOUT | ERROR
    seconds: float
    tail: str


def run_one(i: int, m: Mutation, base: Path, work: Path, timeout_s: float) -> Result:
    copy = work / f"mutant{i}"
    shutil.copytree(base, copy)
    path = copy / m.file
    path.write_text(path.read_text().replace(m.original, m.replacement, 1))
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=copy, env=_env(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        verdict = {0: "SURVIVED", 1: "caught"}.get(proc.returncode, "ERROR")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        verdict = "TIMEOUT"
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return Result(m, verdict, time.monotonic() - start, out[-3000:])


def print_table(rows: list[tuple[str, str, str]], header: tuple[str, str, str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))


def _tests_label(m: Mutation) -> str:
    parts = [t.split("::")[-1] if "::" in t else t for t in m.tests]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="run only the entries whose claim contains this text")
    ap.add_argument("--jobs", type=int, default=2, help="mutations run at once (default 2)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per mutation's tests (default 240)")
    ap.add_argument("--check", action="store_true", help="only verify that every original text is present")
    ap.add_argument("--list", action="store_true", help="print the table of planted bugs and exit")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or args.only in m.claim]
    if args.list:
        print_table([(m.claim, m.file, _tests_label(m)) for m in chosen], ("claim", "file", "tests"))
        return 0
    problems = originals_problems(ROOT, chosen)
    if problems:
        print("mutation_check: entries out of date (update scripts/mutation_check.py):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    if args.check or not chosen:
        print(f"mutation_check: {len(chosen)} original texts present")
        return 0
    with tempfile.TemporaryDirectory(prefix="gkd-mutants-") as tmp:
        base = make_base_copy(ROOT, Path(tmp) / "base")
        check_imports_from(base)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            jobs = [pool.submit(run_one, i, m, base, Path(tmp), args.timeout) for i, m in enumerate(chosen)]
            results = [job.result() for job in jobs]
    bad = [r for r in results if r.verdict != "caught"]
    for r in bad:
        print(f"\n--- {r.verdict}: {r.mutation.claim} ({r.mutation.file})\n{r.tail}")
    rows = [(r.mutation.claim, _tests_label(r.mutation), f"{r.verdict} ({r.seconds:.0f}s)") for r in results]
    print()
    print_table(rows, ("claim", "tests", "caught"))
    print(f"\n{len(results) - len(bad)} of {len(results)} planted bugs caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
