"""Checkpoints of a run: atomic, resumable, in two layouts (whole files, or every rank's DCP shards), read
back into any strategy and world size; their folders, the run they belong to, and the background writer.

Modules: ``folders`` (finding checkpoints and resume targets; no torch: the launcher reads it),
``save`` (writing one, the final Hugging Face export), ``load`` (reading one), ``sharded`` (the DCP
layout), ``writer`` (saving in the background), ``runs`` (a run's id, config drift, resume checks),
``rng``, ``prune``, ``carried`` (the scheduler's carried batches). May import: config, weights, data,
services, the trainer's own modules.

The names below resolve on first use (PEP 562), so ``gkd.trainer.checkpoint.folders`` alone loads no
torch.
"""

from gkd._lazy import lazy_names

__getattr__, __all__ = lazy_names(
    __name__,
    {
        "folders": (
            "CheckpointError",
            "checkpoint_root",
            "has_checkpoint",
            "latest",
            "list_checkpoints",
            "resolve_resume",
            "should_save",
        ),
        "load": ("LoadedCheckpoint", "load_checkpoint", "read_meta"),
        "rng": ("capture_rng_state", "gather_rng_states", "restore_rng_state"),
        "save": (
            "FORMAT_VERSION",
            "Snapshot",
            "begin_sharded",
            "export_hf",
            "finish_sharded",
            "full_state_dicts",
            "is_sharded",
            "make_trainer_state",
            "save_checkpoint",
            "sharded_tmp",
            "snapshot",
            "write_snapshot",
        ),
    },
)
