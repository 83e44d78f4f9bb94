"""Package names that resolve on first use (PEP 562): a package lists which of its modules defines each
name, and importing the package imports none of them, so a light module (checkpoint folders, dtype names,
process supervision) can be imported without the heavy ones beside it (torch, OmegaConf)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_names(
    package: str, exports: dict[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], list[str]]:
    """``(__getattr__, __all__)`` for ``package``: ``exports`` maps each module (relative to the package) to
    the names it defines; ``__all__`` lists the public ones. A resolved name is cached on the package."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__, sorted(name for name in where if not name.startswith("_"))
