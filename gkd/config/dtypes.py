"""The dtype names the config, the CLI and the engines accept, and the torch dtype each one names.

One home for the mapping: ``gkd.config`` validates keys against :data:`DTYPE_NAMES` without importing
torch; engines and the trainer turn a name into a ``torch.dtype`` with :func:`torch_dtype`.
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name: a ValueError naming ``key`` and the choices."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"{key}={name!r} is not one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, name)
