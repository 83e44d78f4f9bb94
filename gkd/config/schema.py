"""The run configuration's schema: every key and its default lives in the dataclasses below (OmegaConf
structured config); :mod:`gkd.config.load` reads YAML and overrides into them. A run is ``defaults <- YAML
file(s) <- key=value overrides``, checked once:

    cfg = load_config(["configs/cpu_tiny.yaml"], ["trainer.scheduler=two_step_off", "optim.lr=1e-5"])
    cfg.trainer.staleness  # -> 2

Unknown keys are errors that list the valid keys of their section; a value of the wrong type is an error
that names the key; ``choices`` and ranges are checked by :func:`validate`. :func:`load_config` returns
plain dataclass instances (``Config``), so the trainer reads ``cfg.optim.lr`` with no OmegaConf types.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gkd.config.dtypes import DTYPE_NAMES as _DTYPE_NAMES

SCHEDULERS = {"sync": 0, "one_step_off": 1, "two_step_off": 2}


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and the file or override it came from)."""


def _choice(default: str, *choices: str) -> Any:
    """A string field restricted to ``choices`` (checked by :func:`validate`)."""
    assert default in choices, (default, choices)
    return field(default=default, metadata={"choices": choices})


@dataclass
class LoRAConfig:
    """``model.lora``: train a LoRA adapter through peft (``pip install 'gkd[lora]'``) instead of the whole
    student; the rollout engines receive the merged weights, checkpoints hold the adapter + optimizer."""

    enabled: bool = False
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scale = alpha / r
    dropout: float = 0.0  # on the adapter's input (training only)
    # Linear layers to adapt, by module name suffix; [all-linear] = every Linear but the lm_head
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    student_path: str = ""  # required: a transformers model folder (weights + config + tokenizer)
    # master weights and AdamW state; float32 keeps small updates (lr 1e-6) from rounding away
    param_dtype: str = _choice("float32", *_DTYPE_NAMES)
    # forward/backward and loss GEMMs (fp32 accumulation); auto = bfloat16 on CUDA, float32 on CPU
    compute_dtype: str = _choice("auto", "auto", *_DTYPE_NAMES)
    gradient_checkpointing: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # model.student_path may be a hub id (owner/name): downloaded once by `gkd train`; this pins the revision
    revision: str | None = None


@dataclass
class TeacherGenerateConfig:
    """``teacher.generate``: how the teacher samples its own answers (``loss.lmbda < 1`` with
    ``loss.seq_kd``); the answers' top-k rows are taken at ``teacher.temperature``, as for scoring."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int | None = None  # null = rollout.max_new_tokens


@dataclass
class TeacherConfig:
    server_ip: str = "127.0.0.1"
    server_port: int = 15555  # the teacher broker's client (frontend) port
    backend_port: int = 15556  # where teacher workers connect (used when teacher.launch)
    top_k: int = 64  # teacher top-k per response position
    temperature: float = 1.0
    launch: bool = False  # start a local teacher service with the settings below
    node_rank: int = 0  # several nodes: the `gkd train` node that starts it (when launch)
    model_path: str = ""  # required when launch; a hub id (owner/name) is downloaded once by `gkd train`
    revision: str | None = None  # the hub revision of teacher.model_path (branch, tag or commit)
    # hf | vllm: a gkd teacher service; openai: an OpenAI-compatible server already running (vllm serve)
    # at teacher.url, scored through /v1/completions (prompt_logprobs; temperature 1 only)
    backend: str = _choice("hf", "hf", "vllm", "openai")
    url: str | None = None  # teacher.backend=openai: the server's base address, http://HOST:PORT
    api_key_file: str | None = None  # teacher.backend=openai: a file holding the server's API key
    served_model: str | None = None  # teacher.backend=openai: the model name to request; null = the first
    workers: int = 1
    auth_secret_file: str | None = None
    # engine precision; auto = bfloat16 when the teacher has GPUs, float32 on CPU
    dtype: str = _choice("auto", "auto", *_DTYPE_NAMES)
    n_gpus_per_node: int = 0  # 0 = CPU engines; else GPUs of the teacher pool on each node
    tensor_parallel_size: int = 1  # GPUs per teacher engine (workers per node = n_gpus_per_node / this)
    # vLLM: 0.8, not 0.9, because the prompt-logprobs path allocates [tokens, vocab] logits plus an fp32
    # log-softmax outside what vLLM's memory profiler counts (~7.5 GiB at 8192 tokens x 152k vocab)
    gpu_memory_utilization: float = 0.8
    max_model_len: int | None = None  # vLLM; null = data.max_prompt_length + data.max_response_length
    max_num_batched_tokens: int | None = None  # vLLM scheduler token budget; null = vLLM's default
    enforce_eager: bool = False  # vLLM: no CUDA graphs (faster start, slower steps)
    # client (trainer rank 0), seconds: one request attempt may take this long on a live service; a dead
    # one is noticed by liveness instead: the broker unanswered for liveness_timeout_s fails the request
    request_timeout_s: float = 600.0
    liveness_timeout_s: float = 15.0
    # the service restarts a worker that exits, at most max_worker_restarts times within restart_window_s
    # (then it stops, unhealthy, with the reason); rollout.* the same for the rollout service
    max_worker_restarts: int = 5
    restart_window_s: float = 600.0
    # while a worker restarts and none is up, the broker holds requests this long for it (the broker's
    # no_worker_grace_s, 30 s, otherwise): a large engine reloads for minutes
    worker_restart_grace_s: float = 600.0
    threads: int = 0  # torch/OpenMP threads per teacher worker started here; 0 = auto (see trainer.threads)
    generate: TeacherGenerateConfig = field(default_factory=TeacherGenerateConfig)


@dataclass
class RolloutConfig:
    backend: str = _choice("hf", "hf", "vllm")
    server_ip: str = "127.0.0.1"
    server_port: int = 15557  # the rollout broker's client (frontend) port
    backend_port: int = 15558  # where rollout workers connect (used when rollout.launch)
    weight_port: int = 29600  # TCPStore of the weight channel, hosted by trainer rank 0
    n_gpus_per_node: int = 0  # 0 = CPU engines
    nnodes: int = 1
    workers: int = 1  # engine processes per node
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1  # samples per prompt (distinct seeds); the trainer's batch is train_batch_size x n sequences
    # m > 0: every sample also carries the student's top-m ids per response position (from the logits it
    # sampled from; int32 [R, m] on the wire); loss.support=union sends them to the teacher
    return_topk: int = 0
    # each sample drawn with its own seed (trainer.seed, batch, index): reproducible, but vLLM then samples
    # seeded requests one by one with their own generators; null = seeded on the hf engine, not on vllm
    seeded: bool | None = None
    launch: bool = False  # start a local rollout service
    node_rank: int = 0  # several nodes: the `gkd train` node that starts it (when launch)
    auth_secret_file: str | None = None
    dtype: str = _choice("auto", "auto", *_DTYPE_NAMES)  # engine precision; auto = model's compute dtype
    tensor_parallel_size: int = 1  # GPUs per rollout engine
    gpu_memory_utilization: float = 0.9  # vLLM
    max_model_len: int | None = None  # vLLM; null = data.max_prompt_length + data.max_response_length
    max_num_batched_tokens: int | None = None  # vLLM; null = vLLM's default
    enforce_eager: bool = False  # vLLM: no CUDA graphs
    # where received weights wait before the in-place load: host (pinned memory; no second GPU copy
    # next to vLLM's reservation) | device (a GPU copy of the whole model; faster swap, more memory)
    weight_staging: str = _choice("host", "host", "device")
    # the weight channel's torch.distributed backend; auto = nccl when trainer and rollout are both on
    # GPUs they do not share, else gloo. The trainer announces it in the channel's store; a worker started
    # with another --weight-backend fails at once naming both (one without the flag follows the trainer)
    weight_backend: str = _choice("auto", "auto", "gloo", "nccl")
    # weight channel (seconds): rendezvous and each collective once both sides are posted (NCCL's watchdog
    # aborts a process after it, so nothing waits inside a collective: versions are announced in the store)
    weight_timeout_s: float = 600.0
    # the trainer's wait for every worker to be ready for a version (a worker applies the previous one
    # between requests, so this bounds one request's duration plus the swap)
    weight_ready_timeout_s: float = 1800.0
    # a worker's wait for the next version announcement (a log line every minute while idle); a dead
    # trainer is noticed at once through the store, so this only bounds a live but silent trainer
    weight_idle_timeout_s: float = 86400.0
    request_timeout_s: float = 600.0  # as teacher.request_timeout_s (one generate request attempt)
    liveness_timeout_s: float = 15.0  # as teacher.liveness_timeout_s
    # a worker whose heartbeat (a store counter bumped every second) stops this long while the trainer
    # waits for it is dead: the channel re-forms without it (a restarted worker joins a later generation)
    weight_heartbeat_timeout_s: float = 15.0
    # a re-form waits this long for the first worker to ask for the new generation
    weight_reform_timeout_s: float = 120.0
    # as teacher.max_worker_restarts / restart_window_s / worker_restart_grace_s, for the rollout workers
    max_worker_restarts: int = 5
    restart_window_s: float = 600.0
    worker_restart_grace_s: float = 600.0
    threads: int = 0  # torch/OpenMP threads per rollout worker started here; 0 = auto (see trainer.threads)


@dataclass
class FSDPConfig:
    """``trainer.fsdp``: how ``trainer.strategy=fsdp2`` lays the student over the trainer ranks."""

    # ranks one copy of the student is sharded over; null = all of them (plain FSDP2). Fewer (HSDP):
    # shards within groups of shard_size ranks, replicated across the groups (a 2-D device mesh); it must
    # divide the trainer world size (e.g. 8 = one node of 8 GPUs: gathers stay on the node's links)
    shard_size: int | None = None


@dataclass
class TrainerConfig:
    scheduler: str = "one_step_off"  # sync | one_step_off | two_step_off | an integer staleness k >= 0
    n_gpus_per_node: int = 0  # 0 = CPU (gloo); otherwise torchrun --nproc-per-node
    nnodes: int = 1
    nproc_per_node: int = 1  # CPU only: trainer processes when n_gpus_per_node == 0
    total_steps: int | None = None  # when set, wins over total_epochs
    total_epochs: int = 1
    save_freq: int = 100  # steps between checkpoints; 0 = only the final one
    keep_last: int = 2  # checkpoints kept; older ones are deleted (never the newest with finite weights)
    # optimizer steps skipped in a row (non-finite loss or gradient norm) before the run stops
    max_skipped_steps: int = 3
    # copy the state to host memory and write the checkpoint on a background thread (false: write it
    # before training goes on); either way a checkpoint is committed atomically
    async_save: bool = True
    resume: str = "auto"  # auto (newest checkpoint in output_dir, if any) | never | PATH to a checkpoint
    output_dir: str = "runs/gkd"
    # SIGTERM / SIGINT, or a service that died: gkd train gives the trainer this long to save the last
    # trained step (SIGTERM first; SIGKILL after it), then stops the services
    stop_grace_s: float = 120.0
    # the trainer ranks' collectives (one step's batch broadcast, gradient all-reduce, a checkpoint's
    # gathers); waits between steps are not collectives and have no such limit
    collective_timeout_s: float = 1800.0
    # dtype of the final Hugging Face export (output_dir/final; `gkd export` takes it as its default): auto =
    # the dtype the student's own config.json names (bf16 for a bf16 hub model, not the fp32 master weights)
    export_dtype: str = _choice("auto", "auto", *_DTYPE_NAMES)
    strategy: str = _choice("ddp", "ddp", "fsdp2")
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    seed: int = 0
    # trainer, rollout and teacher may share GPUs (configs/gpu_1x.yaml, gpu_2x.yaml: they split the memory;
    # the weight channel is gloo when the rollout shares the trainer's GPU: NCCL refuses two ranks on one)
    allow_shared_gpu: bool = False
    # validation on data.val_files every test_freq steps and after the last (0 = off; needs val_files)
    test_freq: int = 0
    val_before_train: bool = False  # also evaluate before the first step (fresh runs; logged as step -1)
    # perf/mfu's denominator: peak dense TFLOP/s of ONE trainer device in the compute dtype (e.g. 989 for
    # an H100 in bf16); null = the datasheet figure for the GPU's name (gkd/metrics/flops.py), else measured
    # once at start-up with a GEMM on the trainer's device
    peak_tflops: float | None = None
    # torch/OpenMP threads per trainer process (OMP_NUM_THREADS of each child `gkd train` starts); 0 = auto:
    # this node's cores (its CPU affinity) less the explicit *.threads, split evenly between the processes
    # of the roles left on auto, at least 1 each
    threads: int = 0

    @property
    def procs_per_node(self) -> int:
        """torchrun ``--nproc-per-node``: one process per GPU, else ``nproc_per_node`` CPU processes."""
        return self.n_gpus_per_node or self.nproc_per_node

    @property
    def staleness(self) -> int:
        """The bounded staleness ``k`` that ``scheduler`` names."""
        return parse_scheduler(self.scheduler)


@dataclass
class LossConfig:
    name: str = _choice("forward_kl", "forward_kl", "reverse_kl", "jsd", "sampled_reverse_kl")
    tail: str = _choice("bucket", "bucket", "renorm", "none")
    beta: float = 0.5  # jsd mixture weight
    temperature: float = 1.0  # student logit temperature
    # where the divergence is computed: teacher_topk (the teacher's top-k + bucket) | union (the teacher's
    # top-k, the student's top-m (rollout.return_topk) and the sampled token, all scored by the teacher)
    support: str = _choice("teacher_topk", "teacher_topk", "union")
    # staleness correction of the top-k losses: each token's (none | token) or sequence's (sequence) loss
    # is weighted by min(pi_current(y) / pi_behaviour(y), is_clip), from the rollout's log-probs
    is_correction: str = _choice("none", "none", "token", "sequence")
    is_clip: float = 2.0
    # bytes of the fused loss's [rows, vocab] logits chunk (null on CUDA: chunks that keep the whole call
    # within 1.375 GiB of extra memory, gkd/kernels/memory.py; on CPU about N/8 rows)
    chunk_bytes: int | None = None
    # GKD's mixture (Agarwal et al. 2024): each batch's answers come from the student with probability lmbda
    # (a draw seeded by (trainer.seed, batch), the same on resume), else from the teacher (seq_kd: true,
    # teacher.generate.*) or the dataset's data.response_key column (seq_kd: false); the teacher scores all.
    lmbda: float = 1.0  # 1 = on-policy only; 0 with seq_kd = sequence-level KD
    seq_kd: bool = True
    # linear: lmbda goes from lmbda_start (batch 0) to lmbda (batch lmbda_steps and after)
    lmbda_schedule: str = _choice("constant", "constant", "linear")
    lmbda_start: float = 0.0
    lmbda_steps: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # max global grad norm; 0 = no clipping
    warmup_steps: int = 0
    schedule: str = _choice("constant", "constant", "cosine")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class DataSourceConfig:
    """One entry of ``data.sources``: a prompt source and its share of the mixture."""

    path: str = ""  # parquet/jsonl/json file or glob, a datasets.save_to_disk folder, or a hub dataset id
    weight: float = 1.0  # relative share of the training prompts drawn from this source
    prompt_key: str | None = None  # null = data.prompt_key
    config: str | None = None  # hub datasets: configuration name
    split: str = "train"  # hub and saved datasets
    revision: str | None = None  # hub datasets: branch, tag or commit


@dataclass
class DataConfig:
    # parquet/jsonl/json paths or globs, save_to_disk folders or hub dataset ids, concatenated (a,b on the
    # command line); required unless data.sources is set
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"  # column: a string or a chat-message list [{role, content}, ...]
    # weighted training sources, mixed by a seeded draw per batch (instead of data.train_files)
    sources: list[DataSourceConfig] = field(default_factory=list)
    # passed to the tokenizer's apply_chat_template, e.g. {enable_thinking: false} (Qwen3)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None  # a system message before every prompt that has none
    response_key: str | None = None  # column of reference answers (loss.seq_kd: false with loss.lmbda < 1)
    max_prompt_length: int = 512  # tokens, after the chat template
    max_response_length: int = 512  # tokens
    train_batch_size: int = 8  # prompts per step
    truncation: str = _choice("error", "error", "left", "right")
    micro_batch_tokens: int = 8192  # token budget of one forward/backward micro-batch
    seed: int = 0  # shuffle seed; epoch e uses (seed, e)
    shuffle: bool = True
    val_batch_size: int | None = None  # prompts per validation request; null = data.train_batch_size
    val_max_samples: int | None = None  # the first N validation prompts (file order); null = all


@dataclass
class ValConfig:
    """``val``: sampling of the validation answers (fixed seed: consecutive evaluations are comparable)."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int | None = None  # null = rollout.max_new_tokens
    seed: int = 1234
    # mid-run evaluations run beside training and are measured at the first step boundary after their
    # scores are back (their val/* in that step's record); false: the trainer waits at the due step
    overlap: bool = True


@dataclass
class WandbConfig:
    """``logging.wandb`` (``pip install 'gkd[wandb]'``): the metrics.jsonl numbers, the config once, the
    completion tables and the timeline chart. mode offline writes OUTPUT_DIR/wandb/ with no network."""

    enabled: bool = False
    project: str = "gkd"
    name: str | None = None  # null = W&B's generated name
    mode: str = _choice("online", "online", "offline", "disabled")


@dataclass
class LoggingConfig:
    jsonl: bool = True  # OUTPUT_DIR/metrics.jsonl; always written, this only names the intent
    tensorboard: bool = False  # OUTPUT_DIR/tensorboard (needs `pip install gkd[tensorboard]`)
    progress_bar: bool = True
    trace: bool = True  # OUTPUT_DIR/trace.json (Chrome/Perfetto)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # every N steps, the first completions_n samples of the batch to OUTPUT_DIR/completions.jsonl (and
    # TensorBoard / W&B text tables): prompt, response, per-token KL, teacher top-1 agreement (0 = off)
    completions_every: int = 0
    completions_n: int = 4


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val: ValConfig = field(default_factory=ValConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        """Sections may be given as mappings, ``Config(trainer={"total_steps": 3})`` (nested dataclasses
        inside them too): checked like a YAML file's, an unknown key or a bad value is a ConfigError."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        raw = {name: value for name, value in given.items() if isinstance(value, Mapping)}
        for name, value in given.items():
            if name not in raw and not dataclasses.is_dataclass(value):
                raise ConfigError(
                    f"Config({name}=...): expected a mapping of {name}.* keys, got {value!r:.60}"
                )
        if raw:
            from gkd.config.load import from_mapping  # loading builds on these classes: imported when used

            built = from_mapping(raw, "Config(...)")
            for name in raw:
                setattr(self, name, getattr(built, name))

    @classmethod
    def load(cls, paths: Sequence[str] | str = (), overrides: Sequence[str] = ()) -> Config:
        """:func:`load_config`: defaults, the YAML files, the ``key=value`` overrides; checked."""
        from gkd.config.load import load_config

        return load_config(paths, overrides)

    def override(self, *overrides: str) -> Config:
        """A copy with ``key=value`` overrides applied (the command line's syntax); the types are checked
        (a section's dataclass holding a wrong value is a ConfigError), not the ranges (:func:`validate`)."""
        from gkd.config.load import _merge, _parse_overrides, _to_config

        try:
            base = OmegaConf.structured(self)
        except OmegaConfBaseException as e:
            msg = str(e.msg or e).splitlines()[0]
            raise ConfigError(f"Config: bad value for config key '{e.full_key}': {msg}") from None
        return _to_config(_merge(base, _parse_overrides(overrides), "override"))


def parse_scheduler(value: str | int) -> int:
    """``sync`` -> 0, ``one_step_off`` -> 1, ``two_step_off`` -> 2, ``"3"`` or 3 -> 3."""
    s = str(value).strip()
    if s in SCHEDULERS:
        return SCHEDULERS[s]
    if s.lstrip("+").isdigit():
        return int(s)
    raise ConfigError(
        f"trainer.scheduler={value!r}: expected one of {', '.join(SCHEDULERS)} or an integer staleness k >= 0"
    )


def compute_dtype(cfg: Config) -> str:
    """``model.compute_dtype`` resolved: auto = bfloat16 when the trainer has GPUs, else float32."""
    c = cfg.model.compute_dtype
    if c != "auto":
        return c
    return "bfloat16" if cfg.trainer.n_gpus_per_node > 0 else "float32"


def rollout_dtype(cfg: Config) -> str:
    """``rollout.dtype`` resolved: auto = the trainer's compute dtype (weights are cast to it when packed)."""
    return compute_dtype(cfg) if cfg.rollout.dtype == "auto" else cfg.rollout.dtype


def rollout_seeded(cfg: Config) -> bool:
    """``rollout.seeded`` resolved: null = seeded on the hf engine, unseeded on vllm (throughput)."""
    return cfg.rollout.backend == "hf" if cfg.rollout.seeded is None else bool(cfg.rollout.seeded)


def teacher_dtype(cfg: Config) -> str:
    """``teacher.dtype`` resolved: auto = bfloat16 when the teacher has GPUs, else float32."""
    if cfg.teacher.dtype != "auto":
        return cfg.teacher.dtype
    return "bfloat16" if cfg.teacher.n_gpus_per_node > 0 else "float32"


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}
