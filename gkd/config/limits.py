"""Limits that cross services, checked when the trainer first reaches them (the workers' ``info``), before
step 0: a config whose keys each look valid but which asks a service for more than it serves fails here in
one line naming both sides, instead of failing every request of the first batch.

- ``teacher.top_k`` against each teacher worker's ``max_top_k`` (``gkd teacher serve --top-k``);
- ``loss.support=union``: the teacher scores ``rollout.return_topk + 1`` requested ids per position (the
  student's top ids and the sampled token), which its ``max_top_k`` bounds too;
- ``data.max_prompt_length`` + the longest response the run asks for against each engine's ``max_len``
  (the rollout samples ``rollout.max_new_tokens``; the teacher scores that, or its own
  ``teacher.generate.max_new_tokens`` answers).

:func:`static_limits` holds the checks the config alone decides (a service this run launches serves what
the config says); ``gkd.config.checks`` runs them at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gkd.config.schema import ConfigError

EXIT_LIMITS = 2  # the exit status of a run stopped by a limit, as of any config error


class LimitError(ConfigError):
    """A request the run would make exceeds what a service serves (a config error found at start-up)."""

    exit_code = EXIT_LIMITS


def union_width(cfg) -> int:
    """Requested ids per position the teacher is asked to score (0 without ``loss.support=union``)."""
    return cfg.rollout.return_topk + 1 if cfg.loss.support == "union" else 0


def response_tokens(cfg) -> tuple[int, str]:
    """The longest response the teacher scores, and the key that sets it."""
    gen = cfg.teacher.generate.max_new_tokens
    teacher_answers = cfg.loss.lmbda < 1 and gen is not None and gen > cfg.rollout.max_new_tokens
    if teacher_answers:
        return gen, "teacher.generate.max_new_tokens"
    return cfg.rollout.max_new_tokens, "rollout.max_new_tokens"


def _top_k_problems(cfg, max_top_k: int, where: str) -> list[str]:
    out = []
    if cfg.teacher.top_k > max_top_k:
        out.append(f"teacher.top_k={cfg.teacher.top_k} exceeds {where} max_top_k={max_top_k}")
    m = union_width(cfg)
    if m > max_top_k:
        out.append(
            f"loss.support=union asks the teacher for rollout.return_topk + 1 = {m} ids per position, above "
            f"{where} max_top_k={max_top_k}: set rollout.return_topk <= {max_top_k - 1} or serve a larger "
            "top-k (teacher.top_k / `gkd teacher serve --top-k`)"
        )
    return out


def _length_problems(cfg, service: str, max_len: int, where: str) -> list[str]:
    prompt = cfg.data.max_prompt_length
    rollout = (cfg.rollout.max_new_tokens, "rollout.max_new_tokens")
    new, key = rollout if service == "rollout" else response_tokens(cfg)
    if prompt + new <= max_len:
        return []
    return [
        f"data.max_prompt_length={prompt} + {key}={new} exceed {where} max_len={max_len} (prompt + response "
        f"tokens; {service}.max_model_len / `gkd {service} serve --max-model-len`)"
    ]


def service_limits(
    cfg, teacher_workers: Sequence[dict[str, Any]], rollout_workers: Sequence[dict[str, Any]]
) -> None:
    """Raise :class:`LimitError` (one line per problem, the first few) when the run asks the services, as
    their workers' ``info`` describes them, for more than they serve."""
    problems: list[str] = []
    for w in teacher_workers:
        where = f"teacher worker {w.get('host', '?')} pid {w.get('pid', '?')}'s"
        if isinstance(w.get("max_top_k"), int):
            problems += _top_k_problems(cfg, w["max_top_k"], where)
        if isinstance(w.get("max_len"), int):
            problems += _length_problems(cfg, "teacher", w["max_len"], where)
    for w in rollout_workers:
        if isinstance(w.get("max_len"), int):
            where = f"rollout worker {w.get('host', '?')} pid {w.get('pid', '?')}'s"
            problems += _length_problems(cfg, "rollout", w["max_len"], where)
    if problems:
        raise LimitError("; ".join(dict.fromkeys(problems)))


def static_limits(cfg) -> list[str]:
    """The problems the config alone shows: a service that ``gkd train`` launches serves ``teacher.top_k``
    (``--top-k``) and, with vLLM, ``*.max_model_len`` (null: data.max_prompt_length +
    data.max_response_length)."""
    problems: list[str] = []
    t, r, d = cfg.teacher, cfg.rollout, cfg.data
    if t.launch:
        problems += [p for p in _top_k_problems(cfg, t.top_k, "the launched teacher's") if "union" in p]
    for name, section in (("teacher", t), ("rollout", r)):
        if section.launch and section.backend == "vllm":
            max_len = section.max_model_len or d.max_prompt_length + d.max_response_length
            problems += _length_problems(cfg, name, max_len, f"the launched {name}'s")
    return problems
