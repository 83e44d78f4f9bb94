"""CPU/transformers rollout engine: batched sampling with a KV cache.

An own decoding loop rather than ``model.generate``: it needs per-prompt seeded generators (results must
not depend on batching), the sampled tokens' log-probs under softmax(logits / T) before truncation, and
it drops finished rows from the batch and the cache as it goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from gkd.rollout.types import Sample, SamplingConfig, check_named_tensors, check_prompts
from gkd.transport.worker import check_cancelled

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. ``logits``: [B, V], scaled."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        probs = srt.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the first is always kept)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return logits


class HFRolloutEngine:
    """``generate(prompts, sampling) -> list[Sample]`` and strict ``load_weights`` on a transformers model."""

    def __init__(self, model, *, device: str = "cpu", max_batch_size: int = 64, pad_token_id: int = 0):
        self.model = model.eval()
        self.device = torch.device(device)
        self.max_batch_size = int(max_batch_size)
        self.pad_token_id = int(pad_token_id)
        self.policy_version = 0
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        # prompt + response positions the model supports (the rollout service refuses longer requests)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 1 << 31))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", device: str = "cpu", **kwargs):
        from transformers import AutoModelForCausalLM

        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype]).to(device)
        return cls(model, device=device, **kwargs)

    def parameters_spec(self) -> dict[str, torch.Tensor]:
        """The parameters load_weights expects, by name (tied weights appear once)."""
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> int:
        """Copy a full state into the model (strict: every parameter, no unknown name, same shapes)."""
        params = self.parameters_spec()
        incoming = check_named_tensors(params, named_tensors)
        for name, tensor in incoming.items():
            params[name].copy_(tensor)
        if version is not None:
            self.policy_version = int(version)
        return len(incoming)

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed_offset: int = 0
    ) -> list[Sample]:
        check_prompts(prompts, vocab_size=self.vocab_size)
        out: list[Sample] = []
        version = self.policy_version  # one version for the whole call: weights change only between calls
        for start in range(0, len(prompts), self.max_batch_size):
            batch = prompts[start : start + self.max_batch_size]
            out.extend(self._generate_batch(batch, sampling, seed_offset + start, version))
        return out

    @torch.no_grad()
    def _generate_batch(
        self, prompts, sampling: SamplingConfig, seed_base: int, version: int
    ) -> list[Sample]:
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token lands in the last column
            ids[i, width - len(p) :] = torch.tensor(list(p))
            attn[i, width - len(p) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        gens = None
        if sampling.seed is not None and sampling.temperature > 0:
            gens = [
                torch.Generator(device=self.device).manual_seed(sampling.seed + seed_base + i)
                for i in range(b)
            ]
        stop = torch.tensor(sampling.stop_token_ids or [-1], device=self.device)

        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        rows = list(range(b))  # batch row -> prompt index, shrinks as rows finish
        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        m = min(sampling.return_topk, self.vocab_size)
        tops: list[list[torch.Tensor]] = [[] for _ in range(b)]
        finish = ["length"] * b
        next_pos = pos[:, -1:] + 1
        for step in range(sampling.max_new_tokens):
            check_cancelled()  # the broker withdrew this request (its client gave up): stop here
            logits = out.logits[:, -1].float()  # [B', V]
            tok, lp = self._sample(logits, sampling, [gens[r] for r in rows] if gens else None)
            # the student's top-m: softmax(logits / T) keeps the logits' order, so no rescaling needed
            top = logits.topk(m, dim=-1).indices.to(torch.int32).cpu() if m else None  # [B', m]
            done = torch.isin(tok, stop)
            for j, r in enumerate(rows):
                tokens[r].append(int(tok[j]))
                logps[r].append(float(lp[j]))
                if top is not None:
                    tops[r].append(top[j])
                if bool(done[j]):
                    finish[r] = "stop"
            if step + 1 == sampling.max_new_tokens:
                break
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            if keep.numel() < len(rows):  # drop finished rows from the batch and the KV cache
                cache.batch_select_indices(keep)
                rows = [rows[int(j)] for j in keep]
                tok, attn, next_pos = tok[keep], attn[keep], next_pos[keep]
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=attn,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
            next_pos = next_pos + 1
        samples = [
            Sample(list(p), tokens[i], torch.tensor(logps[i], dtype=torch.float32), finish[i], version)
            for i, p in enumerate(prompts)
        ]
        if m:
            for i, s in enumerate(samples):
                s.topk_ids = torch.stack(tops[i])  # [R, m]
        return samples

    @staticmethod
    def _sample(logits: torch.Tensor, s: SamplingConfig, gens) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens [B] and their log-probs under softmax(logits / T) (T = 1 when greedy)."""
        if s.temperature == 0:
            tok = logits.argmax(-1)
            return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
        scaled = logits / s.temperature
        logp = torch.log_softmax(scaled, -1)
        probs = filter_logits(scaled, s.top_k, s.top_p).softmax(-1)
        if gens is None:
            tok = torch.multinomial(probs, 1)[:, 0]
        else:
            tok = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])
        return tok, logp.gather(1, tok[:, None])[:, 0]
