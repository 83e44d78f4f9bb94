"""The trainer: the distillation recipe every torchrun rank runs (``recipe``; ``python -m gkd.trainer`` is
the rank entry point), building the student, optimizer and clients (``setup``), one optimizer step's
micro-batches and losses (``step``, ``batching``), the bounded-staleness scheduler (``scheduler``), the
batches' sources and the mixture of student and teacher answers (``sources``), the commands rank 0 sends
the others (``ranks``), start-up checks (``checks``), stopping (``stop``), skipped steps (``skips``),
validation, LoRA, the Hugging Face export, and checkpoints (``checkpoint``). May import every part below
it: config, kernels, weights, data, services, rollout, teacher, metrics.
"""
