"""Command-line habits: the global flags (``--log-level``, ``--version``) before or after the subcommand,
and ``gkd train``'s ``key=value`` overrides anywhere after its name, between its flags too."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gkd import __version__
from gkd.cli import hoist_global_flags, parse

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "DEBUG", "train", "--config", "c.yaml"],
        ["train", "--config", "c.yaml", "--log-level", "DEBUG"],
        ["train", "--log-level=DEBUG", "--config", "c.yaml"],
        ["train", "--config", "c.yaml", "a.b=1", "--log-level", "DEBUG"],
    ],
)
def test_log_level_before_or_after_the_subcommand(argv):
    args = parse(argv)
    assert (args.command, args.log_level, args.config) == ("train", "DEBUG", ["c.yaml"])


def test_the_default_log_level_and_a_nested_subcommand():
    assert parse(["train", "--config", "c.yaml"]).log_level == "INFO"
    args = parse(["teacher", "ping", "127.0.0.1:1", "--log-level", "ERROR", "--timeout", "2"])
    assert (args.teacher_command, args.log_level, args.timeout) == ("ping", "ERROR", 2.0)


def test_overrides_anywhere_keep_their_order():
    argv = ["train", "a.b=1", "--config", "x.yaml", "c.d=2", "--dry-run", "e.f=3", "--log-level", "WARNING"]
    argv += ["--config", "y.yaml", "a.b=4"]
    args = parse(argv)
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3", "a.b=4"]  # the last a.b wins when loaded
    assert args.config == ["x.yaml", "y.yaml"] and args.dry_run and args.log_level == "WARNING"


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (["train", "--config", "c.yaml", "--bogus"], "--bogus"),
        (["train", "--config", "c.yaml", "a.b=1", "--dry-run", "--what=2", "c.d=3"], "--what=2"),
        # a subcommand without overrides takes no key=value word
        (["teacher", "ping", "127.0.0.1:1", "--timeout", "2", "a.b=1"], "a.b=1"),
    ],
)
def test_anything_else_left_over_is_the_usual_one_line_error(argv, bad, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"gkd: error: unrecognized arguments: {bad}"


def test_version_after_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["train", "--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"gkd {__version__}"


def test_a_bare_double_dash_ends_the_search_and_a_missing_value_stays_an_error(capsys):
    words = ["train", "--config", "c.yaml", "--", "--log-level", "DEBUG"]
    assert hoist_global_flags(words) == words
    assert hoist_global_flags(["train", "--log-level"]) == ["train", "--log-level"]
    with pytest.raises(SystemExit):
        parse(["train", "--config", "c.yaml", "--log-level"])
    assert "--log-level: expected one argument" in capsys.readouterr().err


def test_gkd_train_dry_run_with_flags_and_overrides_interleaved():
    """The real command line: the log level after the subcommand, overrides on both sides of a flag; the
    trainer's command carries the overrides in line order and the plan the thread count one of them set."""
    argv = [sys.executable, "-m", "gkd.cli", "train", "--config", "configs/cpu_tiny.yaml"]
    argv += ["trainer.nproc_per_node=1", "--dry-run", "--log-level", "DEBUG", "rollout.threads=3"]
    env = {k: v for k, v in os.environ.items() if k != "GKD_FAKE_GPUS"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rollout_row = next(line for line in lines if line.startswith("  rollout "))
    assert rollout_row.split()[-1] == "3", done.stdout
    trainer = shlex.split(next(line for line in lines if line.startswith("trainer: ")).split(": ", 1)[1])
    assert trainer[-2:] == ["trainer.nproc_per_node=1", "rollout.threads=3"]
    assert "OMP_NUM_THREADS=3" in next(line for line in lines if line.startswith("rollout: "))
