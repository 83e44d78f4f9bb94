"""``gkd`` command line. Each subcommand group registers its parser here and dispatches to a library
function; the work lives in those functions (``gkd.teacher.service`` for ``gkd teacher ...``).

    gkd teacher serve --model PATH [--backend hf|vllm] [--workers N] [--port 15555] [--backend-port 15556]
                      [--gpus 4,5] [--tensor-parallel-size 1] [--dtype bfloat16] [vLLM knobs]
                      [--max-restarts 5] [--restart-window 600]
    gkd teacher join  --broker HOST:15556 --model PATH [--workers N] [--gpus 4,5]
    gkd teacher ping  HOST:15555
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from gkd.placement import VLLMOptions, run_service
from gkd.transport.process import add_restart_args


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher engine")
    g.add_argument(
        "--model", required=True, help="local model folder (transformers layout; never downloaded)"
    )
    g.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load instead")
    g.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="engine (default: hf)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    g.add_argument("--top-k", type=int, default=64, help="maximum (and default) top-k served (default 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="default teacher temperature")
    g.add_argument(
        "--logprob-dtype",
        choices=("float16", "float32"),
        default="float32",
        help="top-k log-probs on the wire (token log-probs are always float32)",
    )
    g.add_argument("--max-batch-tokens", type=int, default=8192, help="hf engine: padded tokens per batch")
    g.add_argument("--device", default="cpu", help="hf engine: torch device (default cpu)")
    g.add_argument("--workers", type=int, default=1, help="engine processes to start (default 1)")
    g.add_argument("--auth-secret-file", default=None, help="shared secret; clients need the same file")
    from gkd.teacher.service import GPU_MEMORY_UTILIZATION

    VLLMOptions.add_args(p, memory_default=GPU_MEMORY_UTILIZATION)


def _engine_spec(args: argparse.Namespace):
    from gkd.teacher.service import EngineSpec

    return EngineSpec(
        model=args.model,
        backend=args.backend,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        top_k=args.top_k,
        temperature=args.temperature,
        logprob_dtype=args.logprob_dtype,
        max_batch_tokens=args.max_batch_tokens,
        device=args.device,
        vllm=VLLMOptions.from_args(args),
    )


def _teacher_serve(args: argparse.Namespace) -> int:
    from gkd.teacher import service
    from gkd.transport.process import configure_logging

    configure_logging(args.log_level)
    return run_service(
        "gkd teacher serve",
        lambda: _engine_spec(args),
        lambda spec: service.serve(
            spec,
            host=args.host,
            port=args.port,
            backend_port=args.backend_port,
            workers=args.workers,
            auth_secret_file=args.auth_secret_file,
            gpus=args.gpus,
            max_restarts=args.max_restarts,
            restart_window_s=args.restart_window,
        ),
    )


def _teacher_join(args: argparse.Namespace) -> int:
    from gkd.teacher import service
    from gkd.transport.process import configure_logging

    configure_logging(args.log_level)
    return run_service(
        "gkd teacher join",
        lambda: _engine_spec(args),
        lambda spec: service.join(
            spec, args.broker, workers=args.workers, auth_secret_file=args.auth_secret_file, gpus=args.gpus
        ),
    )


def _teacher_ping(args: argparse.Namespace) -> int:
    from gkd.teacher import service

    return service.ping(args.address, timeout_s=args.timeout, auth_secret_file=args.auth_secret_file)


def _add_teacher(sub: argparse._SubParsersAction) -> None:
    teacher = sub.add_parser("teacher", help="the teacher scoring service")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="{serve,join,ping}")

    serve = tsub.add_parser("serve", help="start a broker and N teacher worker processes")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=15555, help="client (frontend) port")
    serve.add_argument("--backend-port", type=int, default=15556, help="worker (backend) port")
    add_restart_args(serve)
    serve.set_defaults(func=_teacher_serve)

    join = tsub.add_parser("join", help="add teacher workers to a running broker (e.g. from another machine)")
    join.add_argument("--broker", required=True, help="the broker's backend, HOST:PORT (default port 15556)")
    _add_engine_args(join)
    join.set_defaults(func=_teacher_join)

    ping = tsub.add_parser("ping", help="print a teacher service's state; exit 0 if healthy, 1 if not")
    ping.add_argument("address", help="the broker's client port, HOST:PORT (default port 15555)")
    ping.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply")
    ping.add_argument("--auth-secret-file", default=None)
    ping.set_defaults(func=_teacher_ping)


# subcommand -> (module, its registration function), in --help order after ``teacher``
_GROUPS = {
    "rollout": ("gkd.rollout.service", "add_rollout_cli"),  # gkd rollout serve|join
    "timeline": ("gkd.timeline", "add_timeline_cli"),  # gkd timeline RUN_DIR -o PNG
    "train": ("gkd.launch", "add_train_cli"),  # gkd train --config X.yaml [k=v ...]
    "demo": ("gkd.demo.run", "add_demo_cli"),  # gkd demo [--tiny] [--steps N ...]
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand, or only the ``only`` group: then only its module is imported (``gkd train``
    starts its children without importing torch or the services' modules)."""
    parser = argparse.ArgumentParser(prog="gkd", description="asynchronous on-policy knowledge distillation")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True)
    if only in (None, "teacher"):
        _add_teacher(sub)
    for name, (module, register) in _GROUPS.items():
        if only in (None, name):
            getattr(importlib.import_module(module), register)(sub)
    return parser


def _group(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (the first word that is not a top-level option), if it is one."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word if word == "teacher" or word in _GROUPS else None
    return None


def _command(args: argparse.Namespace) -> str:
    """``gkd teacher serve`` etc.: the words that name the subcommand, for error lines."""
    words = [args.command] + [v for k, v in vars(args).items() if k.endswith("_command") and v]
    return " ".join(["gkd", *words])


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check the inputs of the service commands (:mod:`gkd.preflight`; the other commands check
    theirs first thing), then run. A bad input is one line on stderr and status 2; with ``--log-level
    DEBUG`` its traceback too. Anything else propagates: a traceback means a bug."""
    from gkd.preflight import InputError, check_service_args

    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_group(words)).parse_args(words)
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
