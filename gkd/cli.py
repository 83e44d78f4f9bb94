"""``gkd`` command line. Each subcommand group is registered by its own module (``gkd.teacher.service``
for ``gkd teacher ...``, ``gkd.rollout.service`` for ``gkd rollout ...``, both through ``gkd.services.host``)
and dispatches to a library function that does the work.

    gkd teacher serve --model PATH [--backend hf|vllm] [--workers N] [--port 15555] [--backend-port 15556]
                      [--gpus 4,5] [--tensor-parallel-size 1] [--dtype auto] [--device auto] [vLLM knobs]
                      [--max-restarts 5] [--restart-window 600]
    gkd teacher join  --broker HOST:15556 --model PATH [--workers N] [--gpus 4,5]
    gkd teacher ping  HOST:15555
    gkd train --config X.yaml [--nnodes N --node-rank R --rdzv-endpoint HOST:PORT [--host ADDR]] [--dry-run]
              [key=value ...]

The global flags (``--log-level``, ``--version``) may stand before or after the subcommand, and a
subcommand that takes ``key=value`` overrides (``gkd train``) takes them anywhere after its name, between
its flags too: ``gkd train --config X trainer.total_steps=3 --dry-run --log-level DEBUG optim.lr=1e-5``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

# top-level flags accepted anywhere before a bare ``--``: flag -> how many values follow it
GLOBAL_FLAGS = {"--log-level": 1, "--version": 0}

# subcommand -> (module, its registration function), in --help order
_GROUPS = {
    "teacher": ("gkd.teacher.service", "add_teacher_cli"),  # gkd teacher serve|join|ping
    "rollout": ("gkd.rollout.service", "add_rollout_cli"),  # gkd rollout serve|join
    "timeline": ("gkd.metrics.timeline", "add_timeline_cli"),  # gkd timeline RUN_DIR -o PNG
    "export": ("gkd.trainer.export", "add_export_cli"),  # gkd export CHECKPOINT OUT [--dtype D]
    "train": ("gkd.launch.run", "add_train_cli"),  # gkd train --config X.yaml [k=v ...]
    "demo": ("gkd.demo.run", "add_demo_cli"),  # gkd demo [--tiny] [--steps N ...]
    "eval": ("gkd.evaluate", "add_eval_cli"),  # gkd eval MODEL [--teacher T] [--data F] [--json OUT]
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand, or only the ``only`` group: then only its module is imported (``gkd train``
    starts its children without importing torch or the services' modules)."""
    parser = argparse.ArgumentParser(prog="gkd", description="asynchronous on-policy knowledge distillation")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, register) in _GROUPS.items():
        if only in (None, name):
            getattr(importlib.import_module(module), register)(sub)
    return parser


def _version() -> str:
    from gkd import __version__

    return __version__


def hoist_global_flags(words: Sequence[str]) -> list[str]:
    """``words`` with every global flag (:data:`GLOBAL_FLAGS`, as ``--flag VALUE`` or ``--flag=VALUE``)
    moved in front, where the top-level parser reads it; a bare ``--`` ends the search. A flag missing its
    value stays where it is (:func:`parse` names it)."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            rest += words[i:]
            break
        name = word.split("=", 1)[0]
        take = 1 if name not in GLOBAL_FLAGS or "=" in word else 1 + GLOBAL_FLAGS[name]
        values = words[i + 1 : i + take]
        whole = len(values) == take - 1 and not any(v.startswith("-") for v in values)
        (front if name in GLOBAL_FLAGS and whole else rest).extend(words[i : i + take] if whole else [word])
        i += take if whole else 1
    return front + rest


def _take_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Words argparse left over: ``key=value`` overrides after a flag join ``args.overrides`` (in line
    order) for a subcommand that takes overrides; anything else is argparse's usual error."""
    takes = isinstance(getattr(args, "overrides", None), list)
    bad = [w for w in extra if not (takes and "=" in w and not w.startswith("-"))]
    if any(w in GLOBAL_FLAGS for w in bad):
        parser.error(f"argument {next(w for w in bad if w in GLOBAL_FLAGS)}: expected one argument")
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line as :func:`main` reads it: global flags anywhere, overrides between flags."""
    words = hoist_global_flags(list(argv))
    parser = build_parser(_group(words))
    args, extra = parser.parse_known_args(words)
    _take_overrides(parser, args, extra)
    return args


def _group(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (the first word that is not a top-level option), if it is one."""
    words = iter(argv)
    for word in words:
        if word in GLOBAL_FLAGS:
            for _ in range(GLOBAL_FLAGS[word]):
                next(words, None)
        elif not word.startswith("-"):
            return word if word in _GROUPS else None
    return None


def _command(args: argparse.Namespace) -> str:
    """``gkd teacher serve`` etc.: the words that name the subcommand, for error lines."""
    words = [args.command] + [v for k, v in vars(args).items() if k.endswith("_command") and v]
    return " ".join(["gkd", *words])


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check the inputs of the service commands (:mod:`gkd.launch.preflight`; the other commands check
    theirs first thing), then run. A bad input is one line on stderr and status 2; with ``--log-level
    DEBUG`` its traceback too. Anything else propagates: a traceback means a bug."""
    from gkd.services.inputs import InputError, check_service_args

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.command in ("teacher", "rollout"):
            check_service_args(args)
        return int(args.func(args) or 0)
    except InputError as e:
        if args.log_level == "DEBUG":
            traceback.print_exc()
        print(f"{_command(args)}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())


def __getattr__(name: str):
    # the teacher's engine options moved to gkd.teacher.service; loaded on first use (no torch for gkd train)
    if name == "_engine_spec":
        from gkd.teacher.service import engine_spec

        return engine_spec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
