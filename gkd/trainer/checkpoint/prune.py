"""Which checkpoints ``keep_last`` deletes, and the finiteness record it relies on.

Every checkpoint's ``meta.json`` says whether its weights were finite when it was saved
(``"weights_finite"``: one vectorised pass over the parameters at save time; a sharded save or-s each
rank's verdict). Pruning keeps the newest ``keep_last`` checkpoints and, when none of those has finite
weights, also the newest one that has: a run whose weights went NaN never deletes its last good state.
Checkpoints written before this record existed count as finite."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

log = logging.getLogger("gkd.checkpoint")


def weights_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """No NaN or inf in any floating-point tensor (a DTensor: this rank's shard); one host sync."""
    flags = [
        torch.isfinite(local).all()
        for t in tensors
        if (local := t.to_local() if hasattr(t, "to_local") else t).is_floating_point() and local.numel()
    ]
    if not flags:
        return True
    if len({f.device for f in flags}) > 1:  # parameters on several devices: one sync per device
        return all(
            bool(torch.stack([f for f in flags if f.device == d]).all()) for d in {f.device for f in flags}
        )
    return bool(torch.stack(flags).all())


def _recorded_finite(path: Path) -> bool:
    """The checkpoint's ``weights_finite`` (True when not recorded; False when meta.json is unreadable)."""
    try:
        return bool(json.loads((path / "meta.json").read_text()).get("weights_finite", True))
    except (OSError, ValueError, AttributeError):
        return False


def to_prune(found: Sequence[tuple[int, Path]], keep_last: int) -> list[Path]:
    """Of ``found`` (complete checkpoints, oldest first), the ones to delete: all but the newest
    ``keep_last``, except the newest with finite weights when none of the kept ones has them."""
    old, kept = list(found[:-keep_last]), found[-keep_last:]
    if old and not any(_recorded_finite(p) for _, p in kept):
        good = [entry for entry in old if _recorded_finite(entry[1])]
        if good:
            old.remove(good[-1])
            log.warning(
                "the newest %d checkpoint(s) hold non-finite weights: %s (the newest with finite weights) "
                "is kept beyond trainer.keep_last=%d",
                len(kept),
                good[-1][1],
                keep_last,
            )
    return [p for _, p in old]
