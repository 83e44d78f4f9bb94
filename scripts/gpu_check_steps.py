"""Entry point of one step of the GPU proof run: ``python scripts/gpu_check_steps.py STEP [options] --json
FILE`` (``scripts/gpu_check.py`` runs each step in its own process; torchrun re-runs it as one rank). The
steps live in the ``gpu_steps`` package beside this file."""

import sys

from gpu_steps import main

if __name__ == "__main__":
    sys.exit(main())
