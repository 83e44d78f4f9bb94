"""gkd: asynchronous on-policy knowledge distillation for language models.

``gkd.distill(config, overrides, out=...)`` runs a distillation from Python (what ``gkd train`` runs);
``gkd.Config`` and its sections (``gkd.ModelConfig``, ``gkd.TrainerConfig``, ...) build a configuration
in code. Both load on first use: ``import gkd`` imports neither torch nor the config machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "distill": "gkd.api",
    "DistillError": "gkd.api",
    "DistillResult": "gkd.api",
    "read_metrics": "gkd.api",
    "Config": "gkd.config",
    "ConfigError": "gkd.config",
    "load_config": "gkd.config",
    "ModelConfig": "gkd.config",
    "LoRAConfig": "gkd.config",
    "TeacherConfig": "gkd.config",
    "TeacherGenerateConfig": "gkd.config",
    "RolloutConfig": "gkd.config",
    "TrainerConfig": "gkd.config",
    "FSDPConfig": "gkd.config",
    "LossConfig": "gkd.config",
    "OptimConfig": "gkd.config",
    "DataConfig": "gkd.config",
    "DataSourceConfig": "gkd.config",
    "ValConfig": "gkd.config",
    "LoggingConfig": "gkd.config",
    "WandbConfig": "gkd.config",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads them
    from gkd.api import DistillError, DistillResult, distill, read_metrics  # noqa: F401
    from gkd.config import (  # noqa: F401
        Config,
        ConfigError,
        DataConfig,
        DataSourceConfig,
        FSDPConfig,
        LoggingConfig,
        LoRAConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        RolloutConfig,
        TeacherConfig,
        TeacherGenerateConfig,
        TrainerConfig,
        ValConfig,
        WandbConfig,
        load_config,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
