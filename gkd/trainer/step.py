"""The trainer's building blocks: the distillation loss of one micro-batch on hidden states + lm_head
(never full logits), one optimizer step normalised by the GLOBAL token count, and the AdamW +
warmup/cosine optimizer. Micro-batches (dealing to ranks, packing by token budget) live in
``gkd.trainer.batching`` and are re-exported here. The loop (``gkd/trainer/recipe.py``) reads them top to
bottom:

    micro = rank_micro_batches(samples, teacher_outputs, rank, world, cfg.data.micro_batch_tokens)
    metrics = train_step(model, optimizer, lr_scheduler, micro, cfg, group=None)

Normalisation: every micro-batch contributes ``sum of its per-token losses / N`` where ``N`` is the number
of response tokens in the whole step, over all micro-batches and all data-parallel ranks (all-reduced
before the first backward). The gradient is then that of the token-mean over the global batch, however the
tokens are split into micro-batches or ranks (verl's and TRL's per-micro-batch means weighted short
sequences up; see tests/test_trainer_step.py).

Under DDP and FSDP2 every rank runs the same number of micro-batches (the most any rank packed, agreed
with the token count in one all-gather): a rank short of work runs zero-weight micro-batches, so every
FSDP2 all-gather / reduce-scatter and DDP all-reduce pairs up, and every rank syncs on the same index.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gkd.config.dtypes import torch_dtype
from gkd.kernels import fused_linear_token_logprobs, fused_linear_topk_distill_loss, sampled_reverse_kl_loss
from gkd.rollout.types import GREEDY_BELOW, Sample
from gkd.trainer.batching import MicroBatch, pack_micro_batches, zero_weight_micro_batch

__all__ = [
    "MicroBatch",
    "accumulate_gradients",
    "autocast",
    "autocast_dtype",
    "torch_dtype",
    "build_optimizer",
    "importance_weights",
    "loss_on_micro_batch",
    "lr_factor",
    "pack_micro_batches",
    "StepPlan",
    "agree_on_plan",
    "train_step",
    "union_request",
    "unwrap",
]


# ------------------------------------------------------------------------------------------ micro-batches


def union_request(samples: Sequence[Sample]) -> list[torch.Tensor]:
    """``loss.support=union``: per sample, the ids the teacher must score besides its own top-k,
    ``[R, m + 1]`` int32: the student's top-m (``Sample.topk_ids``, ``rollout.return_topk``) and the
    sampled token."""
    out = []
    for i, s in enumerate(samples):
        if s.topk_ids is None:
            raise ValueError(
                f"sample {i} carries no student top ids: loss.support=union needs rollout.return_topk >= 1 "
                "and a rollout service that returns them"
            )
        sampled = torch.as_tensor(s.response_ids, dtype=torch.int32).reshape(-1, 1)
        out.append(torch.cat([s.topk_ids.to(torch.int32), sampled], dim=1))
    return out


# ----------------------------------------------------------------------------------------------- loss


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _hidden_states(model: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """[N, H] final (normed) hidden states at the response-predicting positions.

    The call goes through the top-level ``model`` (so a DDP / FSDP wrapper's forward hooks run) with
    ``logits_to_keep=1``: the head then computes one [B, 1, V] row per sequence, not [B, L, V].
    """
    out = model(
        input_ids=mb.input_ids,
        attention_mask=mb.attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    hidden = out.hidden_states[-1]  # [B, L, H], after the final norm (transformers ties it)
    return hidden[mb.rows, mb.cols]


def loss_on_micro_batch(
    model: nn.Module,
    mb: MicroBatch,
    loss_cfg,
    *,
    ratio_clip: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_bytes: int | None = None,
    behaviour_temperature: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """(sum of per-token losses, number of tokens) for one micro-batch already on the model's device.

    ``loss_cfg`` is ``cfg.loss`` (name, tail, beta, temperature). Top-k losses run
    :func:`fused_linear_topk_distill_loss` on the hidden states and the lm_head; ``sampled_reverse_kl``
    runs :func:`fused_linear_token_logprobs` + :func:`sampled_reverse_kl_loss` with the rollout
    log-probs as the behaviour policy (importance ratio q/mu for stale samples).

    ``compute_dtype`` (see :func:`autocast_dtype`): the model's forward runs under ``torch.autocast`` in
    that dtype; the fused loss runs outside it on hidden states cast to the lm_head's dtype, with its GEMMs
    in ``compute_dtype`` (the kernels cast hidden states and weight to it once; fp32 accumulation of the
    weight gradient, gradients returned in the parameters' dtype).
    ``chunk_bytes``: the fused loss's chunk memory budget (``loss.chunk_bytes``; None: its default).

    ``loss_cfg.is_correction`` (``token`` | ``sequence``; top-k losses): each token's loss is weighted by
    :func:`importance_weights` of the current student's log-prob of the sampled token at
    ``behaviour_temperature`` (the rollout's sampling temperature) against the rollout's log-prob.
    """
    hf = unwrap(model)
    if getattr(hf.config, "final_logit_softcapping", None) or getattr(hf.config, "logit_scale", None):
        raise NotImplementedError(
            f"{type(hf).__name__} transforms its logits after the lm_head (softcapping / logit_scale), "
            "which the fused losses do not reproduce"
        )
    head = hf.get_output_embeddings()
    with autocast(mb.input_ids.device, compute_dtype):
        hidden = _hidden_states(model, mb)  # [N, H]
    weight, bias = head.weight, getattr(head, "bias", None)  # [V, H], [V] or None
    sampled = loss_cfg.name == "sampled_reverse_kl"
    gemm = None if compute_dtype == weight.dtype else compute_dtype
    options = _loss_options(
        fused_linear_token_logprobs if sampled else fused_linear_topk_distill_loss, gemm, chunk_bytes
    )
    if "compute_dtype" not in options:  # the kernels then take one dtype for both
        hidden = hidden.to(weight.dtype)
    if sampled:
        logq = fused_linear_token_logprobs(
            hidden,
            weight,
            mb.target_ids,
            lm_head_bias=bias,
            temperature=loss_cfg.temperature,
            chunk_size=chunk_size,
            **options,
        )
        total = sampled_reverse_kl_loss(
            logq, mb.rollout_logprobs, mb.teacher_token_logprobs, ratio_clip=ratio_clip, reduction="sum"
        )
    else:
        weights = None
        correction = getattr(loss_cfg, "is_correction", "none")
        if correction != "none":
            with torch.no_grad():  # the weights are constants of the step (truncated IS)
                logq = fused_linear_token_logprobs(
                    hidden.detach(),
                    weight,
                    mb.target_ids,
                    lm_head_bias=bias,
                    temperature=behaviour_temperature,
                    chunk_size=chunk_size,
                    **options,
                )
            weights = importance_weights(
                logq, mb.rollout_logprobs, mb.response_lens, correction, loss_cfg.is_clip
            )
        total = fused_linear_topk_distill_loss(
            hidden,
            weight,
            mb.teacher_ids,
            mb.teacher_logprobs,
            weights,
            lm_head_bias=bias,
            loss=loss_cfg.name,
            tail=loss_cfg.tail,
            beta=loss_cfg.beta,
            temperature=loss_cfg.temperature,
            reduction="sum",
            backend=backend,
            chunk_size=chunk_size,
            check_inputs=False,  # ids/log-probs were checked when the teacher reply was decoded
            **options,
        )
    return total, mb.num_tokens


def importance_weights(
    logq: torch.Tensor,  # [N] log pi_current(y), the sampled tokens under the current student
    logmu: torch.Tensor,  # [N] log pi_behaviour(y), as the rollout returned them
    response_lens: Sequence[int],  # tokens per sequence, in row order (sum = N)
    mode: str,
    clip: float,
) -> torch.Tensor:
    """[N] float32 loss weights ``min(ratio, clip)``: ``token`` takes each token's own ratio
    ``pi_current(y) / pi_behaviour(y)``; ``sequence`` the product over its sequence (one weight for all its
    tokens). Computed in log space, so long sequences do not overflow before the clip. A NaN behaviour
    log-prob (no behaviour policy) counts as ratio 1."""
    logmu = logmu.to(logq.device).float()
    # NaN: an answer the student did not sample (teacher / dataset answers, gkd.trainer.sources): weight 1
    log_ratio = torch.where(logmu.isnan(), 0.0, logq.float() - logmu)
    if mode == "sequence":
        seq = torch.repeat_interleave(
            torch.arange(len(response_lens), device=log_ratio.device),
            torch.as_tensor(response_lens, device=log_ratio.device),
        )
        sums = torch.zeros(len(response_lens), device=log_ratio.device).index_add_(0, seq, log_ratio)
        log_ratio = sums[seq]
    elif mode != "token":
        raise ValueError(f"loss.is_correction={mode!r}: expected none, token or sequence")
    return log_ratio.clamp(max=math.log(clip)).exp()


@functools.cache
def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _loss_options(fn, compute_dtype: torch.dtype | None, chunk_bytes: int | None) -> dict:
    """The fused loss's ``compute_dtype`` / ``chunk_bytes`` keywords, passed only when set and accepted
    (kernels without them run their GEMMs in the weight's dtype with their default chunking)."""
    options = {"compute_dtype": compute_dtype, "chunk_bytes": chunk_bytes}
    return {k: v for k, v in options.items() if v is not None and _accepts(fn, k)}


# ----------------------------------------------------------------------------------------- the step


def autocast_dtype(model: nn.Module, cfg, device: torch.device | str | None = None) -> torch.dtype | None:
    """The dtype the forward autocasts to: ``model.compute_dtype`` resolved (auto: bfloat16 on CUDA,
    float32 elsewhere), or None (no autocast) when it equals the parameters' dtype or when FSDP2's
    ``MixedPrecisionPolicy`` already casts the parameters (see ``gkd.trainer.recipe.shard_fsdp2``). None on
    CPU by default keeps fp32 runs bitwise unchanged; an explicit ``compute_dtype=bfloat16`` autocasts on CPU
    too."""
    name = getattr(getattr(cfg, "model", None), "compute_dtype", "float32")
    if _averages_grads(model) and not isinstance(model, nn.parallel.DistributedDataParallel):
        return None  # FSDP2: the policy's param_dtype is the compute dtype
    if device is None:
        device = next(unwrap(model).parameters()).device
    if name == "auto":
        name = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    dtype = torch_dtype(name)
    return None if dtype == next(unwrap(model).parameters()).dtype else dtype


def autocast(device: torch.device | str | None, dtype: torch.dtype | None):
    """``torch.autocast(device.type, dtype)``; a no-op when ``dtype`` is None. Under it matmuls run in
    ``dtype`` and autocast keeps reductions (softmax, norms) in float32, while the parameters (and AdamW)
    stay in ``model.param_dtype``. Works on CPU (bfloat16) as on CUDA."""
    if dtype is None or device is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _averages_grads(model: nn.Module) -> bool:
    """DDP and FSDP2 average gradients over their group (we want the sum: the loss is already divided by
    the global token count)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(model, FSDPModule)


@dataclass(frozen=True)
class StepPlan:
    """What the data-parallel ranks agree on before the first backward of a step."""

    rank_tokens: tuple[int, ...]  # response tokens (loss terms) of each rank
    micro_batches: int  # the most micro-batches any rank packed: every DDP/FSDP2 rank runs that many

    @property
    def tokens(self) -> int:
        """N_global: the step's response tokens over every rank (the loss normalisation)."""
        return sum(self.rank_tokens)

    @property
    def imbalance(self) -> float:
        """Max over ranks of response tokens / their mean (1.0 = even; ``actor/tokens_imbalance``)."""
        mean = self.tokens / len(self.rank_tokens)
        return max(self.rank_tokens) / mean if mean > 0 else 1.0


def agree_on_plan(micro_batches: Sequence[MicroBatch], group=None, device=None) -> StepPlan:
    """Each rank's (response tokens, micro-batches) by one all-gather over ``group``: a host sync.

    A collective rather than a count each rank derives from the dealing plan: a rank's micro-batches are
    whatever its caller packed (``train_step`` is called with any split), and a plan that differed on one
    rank would hang the step in a collective instead of failing; the all-gather replaces the token-count
    all-reduce the normalisation needed anyway."""
    mine = [sum(mb.num_tokens for mb in micro_batches), len(micro_batches)]
    world = _world(group)
    if world == 1:
        return StepPlan((mine[0],), mine[1])
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    every = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(every, local, group=group)
    rows = torch.stack(every).tolist()
    return StepPlan(tuple(int(t) for t, _ in rows), max(int(n) for _, n in rows))


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[MicroBatch],
    loss_cfg,
    *,
    group=None,
    device: torch.device | str | None = None,
    ratio_clip: float | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_bytes: int | None = None,
    behaviour_temperature: float = 1.0,
    plan: StepPlan | None = None,
) -> tuple[float, int]:
    """Backward over this rank's micro-batches; afterwards every rank holds the gradient of
    ``sum over all ranks' tokens of loss / N_global``. Returns (global loss sum, N_global).

    Works with a plain module (gradients all-reduced here when ``group`` spans several ranks), DDP (sync
    only on the last micro-batch; the loss is scaled by the world size because DDP averages) and FSDP2
    (same scaling). Under DDP/FSDP2 a rank with fewer micro-batches than ``plan.micro_batches`` (even
    none: a batch smaller than the world) runs zero-weight ones (loss x 0) up to that count, so the
    wrappers' collectives pair up and ``last`` is the same index on every rank. Host syncs: the plan's
    all-gather (``plan``: already agreed by the caller), and the loss sum at the end. ``compute_dtype``
    and ``chunk_bytes``: see :func:`loss_on_micro_batch`.
    """
    world = _world(group)
    if device is None:
        device = next(unwrap(model).parameters()).device
    if plan is None:
        plan = agree_on_plan(micro_batches, group, device)
    n_global = plan.tokens
    if n_global == 0:
        raise ValueError("no response tokens in this step on any rank: nothing to train on")
    wrapped = _averages_grads(model)
    micro_batches = list(micro_batches)
    if wrapped and world > 1:
        micro_batches += [zero_weight_micro_batch()] * (plan.micro_batches - len(micro_batches))
    scale = (world if wrapped else 1) / n_global
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    fsdp = wrapped and not ddp
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if fsdp:  # FSDP2 reduce-scatters on the last micro-batch only (unsharded grads accumulate before)
            model.set_requires_gradient_sync(last)
        with model.no_sync() if ddp and not last else nullcontext():  # DDP all-reduces on the last only
            total, _ = loss_on_micro_batch(
                model,
                mb.to(device),
                loss_cfg,
                ratio_clip=ratio_clip,
                compute_dtype=compute_dtype,
                chunk_bytes=chunk_bytes,
                behaviour_temperature=behaviour_temperature,
            )
            # padding: a finite loss times 0 gives exactly zero gradients, through the same collectives
            (total * (0.0 if mb.zero_weight else scale)).backward()
        if not mb.zero_weight:
            loss_sum += total.detach().to(torch.float64)
    if world > 1 and not wrapped:
        for p in unwrap(model).parameters():
            if not p.requires_grad:  # frozen (a LoRA student's base)
                continue
            if p.grad is None:  # a rank with no micro-batches still takes part in every all-reduce
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=group)
    if world > 1:
        dist.all_reduce(loss_sum, group=group)
    return float(loss_sum.item()), n_global


def _seq_stats(micro_batches: Sequence[MicroBatch], group, device) -> dict[str, float]:
    lens = [n for mb in micro_batches for n in mb.response_lens]
    full = [int(mb.attention_mask.sum()) + len(mb.response_lens) for mb in micro_batches]
    sums = torch.tensor([float(sum(lens)), float(len(lens)), float(sum(full))], dtype=torch.float64)
    ext = torch.tensor([max(lens, default=-math.inf), -min(lens, default=math.inf)], dtype=torch.float64)
    if _world(group) > 1:
        sums, ext = sums.to(device), ext.to(device)
        dist.all_reduce(sums, group=group)
        dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=group)
    total, n, tokens = sums.tolist()
    hi, neg_lo = ext.tolist()
    return {
        "response_seq_len/mean": total / max(n, 1.0),
        "response_seq_len/max": hi,
        "response_seq_len/min": -neg_lo,
        "actor/num_sequences": int(n),
        "actor/total_tokens": int(tokens),  # prompt + response tokens (for throughput)
    }


def _sampling_temperature(cfg) -> float:
    """The temperature the rollout's log-probs were taken at (greedy rollouts report them at T = 1)."""
    t = float(getattr(getattr(cfg, "rollout", None), "temperature", 1.0))
    return t if t >= GREEDY_BELOW else 1.0


def any_rank(flag: bool, group=None, device: torch.device | str | None = None) -> bool:
    """``flag`` or-ed over the ranks of ``group`` (one all-reduce of a scalar when it spans several), so
    every rank takes the same branch."""
    if _world(group) <= 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    batch: Sequence[MicroBatch],
    cfg,
    group=None,
    *,
    device: torch.device | str | None = None,
    ratio_clip: float | None = None,
) -> dict[str, float]:
    """One optimizer step on this rank's micro-batches (from :func:`pack_micro_batches`).

    zero grads -> accumulate (global-token normalisation) -> clip to ``cfg.optim.clip_grad`` (0 = measure
    only) -> optimizer step -> LR step. A non-finite loss or gradient norm (on any rank: the ranks agree
    through one all-reduce) skips the optimizer step: the gradients are dropped and the weights and the
    optimizer state stay as they were; the LR schedule still advances. Every rank of ``group`` must call
    it. Returns ``actor/kl_loss`` (global token mean), ``actor/grad_norm`` (before clipping),
    ``actor/skipped_steps`` (1.0: this step was skipped, else 0.0), ``actor/lr`` (used by this step),
    ``response_seq_len/{mean,max,min}``, ``actor/response_tokens``, ``actor/total_tokens``,
    ``actor/num_sequences``, ``actor/micro_batches`` (what each rank ran, zero-weight padding included:
    equal on every DDP/FSDP2 rank) and ``actor/tokens_imbalance`` (max over ranks of response tokens /
    their mean; 1.0 = even).
    """
    if device is None:
        device = next(unwrap(model).parameters()).device
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    plan = agree_on_plan(batch, group, device)
    loss_sum, n_tokens = accumulate_gradients(
        model,
        batch,
        cfg.loss,
        group=group,
        device=device,
        ratio_clip=ratio_clip,
        compute_dtype=autocast_dtype(model, cfg, device),
        chunk_bytes=getattr(cfg.loss, "chunk_bytes", None),
        behaviour_temperature=_sampling_temperature(cfg),
        plan=plan,
    )
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor (the norm over every rank's shards)
        grad_norm = grad_norm.full_tensor()
    skip = any_rank(not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm))), group, device)
    if skip:  # a NaN/inf would reach every weight through AdamW's moments: no update, the batch is spent
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    lr_scheduler.step()  # the schedule follows the batches, skipped or not (resume relies on it)
    metrics = {
        "actor/kl_loss": loss_sum / n_tokens,
        "actor/grad_norm": float(grad_norm),
        "actor/skipped_steps": float(skip),
        "actor/lr": lr,
        "actor/response_tokens": n_tokens,
        "actor/micro_batches": plan.micro_batches if _averages_grads(model) else len(batch),
        "actor/tokens_imbalance": plan.imbalance,
    }
    metrics.update(_seq_stats(batch, group, device))
    return metrics


# ------------------------------------------------------------------------------------------ optimizer


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of ``optim.lr`` at optimizer step ``step`` (0-based): linear warmup ``(step+1)/warmup``
    (so the first step already moves), then 1 (constant) or a cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule={schedule!r}: expected constant or cosine")


def build_optimizer(
    model: nn.Module, optim_cfg, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (no weight decay on biases and norm weights, i.e. tensors of
    fewer than 2 dims) and a LambdaLR with :func:`lr_factor`. Both have state dicts for checkpoints."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas))
    warmup, schedule = optim_cfg.warmup_steps, optim_cfg.schedule
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule={schedule!r}: expected constant or cosine")

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, total_steps=total_steps, schedule=schedule)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
