"""The run configuration: what the user asked for, and whether it holds together.

Owns: the schema (``schema``: every key, its type and default, as dataclasses), loading YAML files and
``key=value`` overrides into it (``load``), the checks of values and of their combinations (``checks``),
the limits a run's settings put on the services (``limits``), dtype names (``dtypes``) and the help text
of ``gkd config`` (``help``). May import: nothing of gkd outside this package (the lowest part).

    cfg = load_config(["configs/cpu_tiny.yaml"], ["trainer.scheduler=two_step_off", "optim.lr=1e-5"])
    cfg.trainer.staleness  # -> 2
"""

from gkd._lazy import lazy_names

# Names resolve on first use (PEP 562): ``gkd.config.dtypes`` or ``.limits`` alone does not load OmegaConf.
__getattr__, __all__ = lazy_names(
    __name__,
    {
        "checks": ("validate",),
        "load": ("_valid_keys", "from_mapping", "load_config", "to_yaml"),
        "schema": (
            "SCHEDULERS",
            "Config",
            "ConfigError",
            "DataConfig",
            "DataSourceConfig",
            "FSDPConfig",
            "LoggingConfig",
            "LoRAConfig",
            "LossConfig",
            "ModelConfig",
            "OptimConfig",
            "RolloutConfig",
            "TeacherConfig",
            "TeacherGenerateConfig",
            "TrainerConfig",
            "ValConfig",
            "WandbConfig",
            "_sections",
            "compute_dtype",
            "parse_scheduler",
            "rollout_dtype",
            "rollout_seeded",
            "teacher_dtype",
        ),
    },
)
