"""One line of meaning for the config keys whose definition in :mod:`gkd.config` carries no comment, and
an introduction per section, for ``docs/configuration.md`` (``scripts/gen_config_docs.py``).

A key's meaning is the comment on its line in ``gkd/config/schema.py`` (or the comment lines right above it);
an entry here wins over that comment. A new key with neither makes the generator fail, naming it.
"""

from __future__ import annotations

__all__ = ["HELP", "SECTIONS"]

SECTIONS = {
    "model": "The student: where it comes from and its precision.",
    "teacher": "The teacher service: where the trainer reaches it and, with `teacher.launch`, how "
    "`gkd train` starts it.",
    "rollout": "The rollout service that samples the student's answers, and the weight channel that "
    "keeps its engines on the trainer's newest weights.",
    "trainer": "The training loop: processes, schedule, checkpoints, validation.",
    "loss": "The distillation loss and GKD's mixture of student, teacher and dataset answers.",
    "optim": "AdamW and its learning-rate schedule.",
    "data": "Prompt sources, lengths and batching.",
    "val": "How validation answers are sampled (`trainer.test_freq`, `data.val_files`).",
    "logging": "Metrics, traces, TensorBoard, W&B and sample completions.",
}

HELP = {
    "model.student_path": "required: the student, a transformers folder (weights, config, tokenizer) or a "
    "hub id (owner/name) that `gkd train` downloads once",
    "teacher.backend": "the teacher engine that scores: hf (transformers; CPU or one GPU), vllm, or another "
    "listed in the type column",
    "teacher.generate.top_p": "nucleus sampling threshold of the teacher's answers",
    "trainer.nnodes": "nodes that run trainer ranks (gkd train --nnodes and Slurm's node count win)",
    "trainer.total_epochs": "passes over the training prompts (when trainer.total_steps is null)",
    "trainer.output_dir": "the run folder: checkpoints, metrics, logs, the final export (shared by every "
    "node of a multi-node run)",
    "trainer.strategy": "ddp (a full student on every rank) or fsdp2 (sharded over the ranks)",
    "loss.name": "the divergence: forward_kl, reverse_kl, jsd (loss.beta) on the top-k support, or "
    "sampled_reverse_kl (a policy-gradient loss on the sampled tokens)",
    "loss.tail": "what happens to the mass outside the support: one bucket (bucket), both "
    "distributions renormalised (renorm), or ignored (none: forward_kl only)",
    "data.truncation": "a prompt over data.max_prompt_length: error (names file, row, length), left "
    "(keep its last tokens) or right (keep its first)",
    "val.seed": "seed of the validation answers (fixed: consecutive evaluations compare)",
    "model.gradient_checkpointing": "recompute each decoder layer's activations in the backward pass "
    "(less memory, about a third more compute)",
    "model.lora": "LoRA adapter training (below)",
    "model.lora.enabled": "train a LoRA adapter on the frozen student instead of the whole model",
    "teacher.server_ip": "the address the trainer reaches the teacher service at",
    "teacher.temperature": "the teacher's softmax temperature for its top-k log-probs",
    "teacher.workers": "teacher engine processes (on GPUs: n_gpus_per_node / tensor_parallel_size)",
    "teacher.auth_secret_file": "a file holding the shared secret: every message is HMAC-SHA256 "
    "authenticated (the service gets the same file)",
    "teacher.liveness_timeout_s": "seconds of broker silence, while requests are pending, after which "
    "every pending request fails (a dead or unreachable service)",
    "teacher.restart_window_s": "the window, in seconds, over which teacher.max_worker_restarts counts",
    "teacher.generate": "the teacher's own answers (below)",
    "rollout.backend": "the rollout engine: hf (transformers; CPU or one GPU) or vllm",
    "rollout.server_ip": "the address the trainer reaches the rollout service at",
    "rollout.nnodes": "nodes that run rollout workers",
    "rollout.temperature": "the student's sampling temperature (0 = greedy)",
    "rollout.top_p": "nucleus sampling threshold of the student's answers",
    "rollout.max_new_tokens": "the longest answer the student samples, in tokens",
    "rollout.auth_secret_file": "as teacher.auth_secret_file, for the rollout service; also adds an "
    "HMAC to every weight bucket",
    "rollout.restart_window_s": "as teacher.restart_window_s, for the rollout workers",
    "rollout.worker_restart_grace_s": "as teacher.worker_restart_grace_s, for the rollout workers",
    "trainer.fsdp": "FSDP2 layout (below)",
    "trainer.allow_shared_gpu": "trainer, rollout and teacher may share GPUs when the node has fewer than "
    "they ask for (configs/gpu_1x.yaml, gpu_2x.yaml); the weight channel is then gloo unless "
    "rollout.weight_backend says nccl",
    "trainer.seed": "seeds the model's RNGs and GKD's per-batch mixture draw",
    "loss.is_clip": "the importance ratio's upper clip for loss.is_correction",
    "loss.seq_kd": "teacher-sampled answers (true) or the dataset's answers (false) for the batches "
    "that loss.lmbda does not give to the student",
    "loss.lmbda_start": "loss.lmbda at batch 0 with loss.lmbda_schedule: linear",
    "loss.lmbda_steps": "batches over which the linear schedule reaches loss.lmbda",
    "optim.lr": "peak learning rate",
    "optim.weight_decay": "AdamW's decoupled weight decay",
    "optim.warmup_steps": "linear warm-up steps from 0 to optim.lr",
    "optim.schedule": "the learning rate after warm-up: constant, or cosine decay to 0 at the last step",
    "optim.betas": "AdamW's beta1, beta2",
    "data.val_files": "validation prompts, in the same forms as data.train_files",
    "data.shuffle": "shuffle the prompts each epoch (false: file order)",
    "val.top_p": "nucleus sampling threshold of the validation answers",
    "logging.progress_bar": "a progress bar on the console",
    "logging.completions_n": "samples per logging.completions_every step",
    "logging.wandb": "Weights & Biases logging (below)",
    "logging.wandb.enabled": "log to Weights & Biases",
    "logging.wandb.project": "the W&B project",
    "logging.wandb.mode": "online, offline (OUTPUT_DIR/wandb/, no network) or disabled",
}
