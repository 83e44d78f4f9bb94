"""torchrun entry point: ``python -m torch.distributed.run --nproc-per-node N -m gkd.train --config X.yaml``
(``gkd train`` builds this command). The recipe is :class:`gkd.trainer.Trainer`; every rank calls
:func:`gkd.trainer.train`."""

from gkd.trainer import main

if __name__ == "__main__":
    raise SystemExit(main())
