"""This process's RNG states as tensors (python, numpy, torch, CUDA), so trainer ranks can all-gather them
without pickling and a checkpoint's ``trainer_state.pt`` reads them back with ``weights_only=True``."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["capture_rng_state", "gather_rng_states", "restore_rng_state"]


def capture_rng_state() -> dict[str, torch.Tensor]:
    """This process's python / numpy / torch (and CUDA) RNG states as fixed-size tensors (so ranks can
    all-gather them without pickling, and ``torch.load(weights_only=True)`` reads them back)."""
    version, words, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)  # ('MT19937', key[624] uint32, pos, has_gauss, gauss)
    state = {
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([*np_state[1].tolist(), np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((int(py[0]), tuple(int(w) for w in py[1:]), gauss if has_gauss else None))
    npy = state["numpy"].tolist()
    key = np.array(npy[:624], dtype=np.uint32)
    np.random.set_state(("MT19937", key, int(npy[624]), int(npy[625]), float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(group=None) -> list[dict[str, torch.Tensor]]:
    """Every trainer rank's :func:`capture_rng_state` (call on all ranks; rank 0 saves the list). Tensors
    travel through all_gather, on the device the group's backend needs."""
    import torch.distributed as dist

    mine = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [mine]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    world = dist.get_world_size(group)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for name, t in sorted(mine.items()):
        local = t.to(device) if device is not None else t
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        for r, part in enumerate(parts):
            out[r][name] = part.cpu()
    return out
