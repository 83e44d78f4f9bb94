"""Deprecated: the rank entry point is ``python -m gkd.trainer``. Kept so commands written with ``-m
gkd.train`` (torchrun lines copied from ``gkd train --dry-run`` before the move) still run; to be removed
in the next release."""

import runpy

if __name__ == "__main__":
    runpy.run_module("gkd.trainer", run_name="__main__", alter_sys=True)
