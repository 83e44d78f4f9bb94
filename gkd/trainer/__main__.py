"""torchrun entry point: ``python -m torch.distributed.run --nproc-per-node N -m gkd.trainer --config X.yaml``
(``gkd train`` builds this command). The recipe is :class:`gkd.trainer.recipe.Trainer`; every rank calls
:func:`gkd.trainer.recipe.train`."""

import logging
import os
import sys

from gkd.trainer.recipe import main


def exit_now(status: int) -> None:
    """Leave without interpreter teardown. By the time ``main`` returns, the run has closed what it opened
    (process group destroyed, last checkpoint committed, metrics and W&B closed); what teardown would
    still destroy are torch.distributed's store and gloo objects of the weight channel, and destroying
    those while their C++ threads run has aborted a finished rank ("terminate called without an active
    exception"), turning a successful run into a failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(int(main() or 0))
