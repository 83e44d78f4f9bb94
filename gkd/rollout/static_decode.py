"""Static-shape decode steps of a Llama-family model, replayed as one CUDA graph per step on a GPU.

:class:`~gkd.rollout.llama_decode.FusedLlamaSteps` attends over ``0..t`` (a shape that grows every step)
and drops finished rows (a batch that shrinks), so each step launches its few hundred kernels from Python
one by one: on a GPU a 0.5B model's step costs those launches, not its ~1 GB weight stream. The steps
here fix every shape for a batch of ``B`` rows and ``capacity`` positions:

- per layer, key and value buffers ``[B, kv_heads, capacity, D]``; the step writes its position through
  a one-element index tensor (``cur``) that the step itself advances, so nothing about the step's launch
  depends on ``t``;
- attention runs over all ``capacity`` positions with a mask ``prompt_mask & (position <= cur)`` computed
  on the device (two batched products and a float32 softmax, grouped KV heads without repetition);
- finished rows stay in the batch (:attr:`drops_rows` is False): at decode batch sizes a GPU step costs
  the weight stream whatever ``B`` is, and each row's draws come from its own generator, so the tokens
  are those of the shrinking path.

On a CUDA device :meth:`StaticLlamaSteps.step` copies the step's inputs into the fixed buffers and
replays a captured ``torch.cuda.CUDAGraph`` (captured on first use, after two warm-up runs on a side
stream); elsewhere (CPU tests) it runs the same static-shape body eagerly, so everything but the capture
and replay is tested without a GPU (tests/rollout/test_static_decode.py). A capture that fails leaves one
warning and those steps run eagerly. The graph reads the layers' own parameters: weights loaded in place
(``load_weights``, the weight receiver) are what the next replay uses.
An engine keeps its steps per ``(B, capacity)`` (:class:`StaticStepsCache`) and reuses them, with their
graph, for every later batch of that shape.
"""

from __future__ import annotations

import collections
import logging
import os

import torch

from gkd.rollout.llama_decode import FusedLlamaSteps

__all__ = ["STATIC_CACHE_ENV", "StaticLlamaSteps", "StaticStepsCache", "static_cache_default"]

log = logging.getLogger("gkd.rollout")

#: Set to 0 to turn the static-cache decode path (and its CUDA graphs) off in every engine of a process
#: tree (the services ``gkd train`` launches inherit it); engines then decode as on CPU.
STATIC_CACHE_ENV = "GKD_STATIC_CACHE"
#: Capacities are rounded up to a multiple of this, so batches of nearby lengths share one graph.
CAPACITY_STEP = 64
#: Graphs an engine keeps (least recently used ones go): each holds its batch's buffers and logits.
MAX_GRAPHS = 4


def static_cache_default(device: torch.device) -> bool:
    """Whether an engine on ``device`` decodes through static steps unless told: on CUDA devices, unless
    ``GKD_STATIC_CACHE=0``."""
    return device.type == "cuda" and os.environ.get(STATIC_CACHE_ENV, "1") != "0"


def bucket_capacity(positions: int) -> int:
    """``positions`` rounded up to a multiple of :data:`CAPACITY_STEP`."""
    return -(-positions // CAPACITY_STEP) * CAPACITY_STEP


class StaticLlamaSteps(FusedLlamaSteps):
    """Decode steps of a ``batch`` x ``capacity`` shape, reusable across batches (:meth:`start`)."""

    drops_rows = False

    def __init__(self, model, batch: int, capacity: int, *, graphs: bool | None = None):
        self._bind(model, None)  # the layers' own weights: a captured graph reads them where they live
        p = model.get_output_embeddings().weight
        dev, dtype = p.device, p.dtype
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        # zeros, never uninitialised memory: a masked position still enters the products (weight 0)
        self.keys = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.layers]
        self.batch, self.capacity = batch, capacity
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)  # [B] the step's input tokens
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # [B, 1] their positions
        self.cur = torch.zeros(1, dtype=torch.long, device=dev)  # [1] the cache position the step writes
        self.prompt_mask = torch.ones(batch, capacity, dtype=torch.bool, device=dev)  # [B, C] not padding
        self.cols = torch.arange(capacity, device=dev)  # [C]
        self.graphs = dev.type == "cuda" if graphs is None else graphs
        self.graph = None
        self.capture_error: str | None = None  # why the capture failed (the steps then run eagerly)
        self.out: torch.Tensor | None = None  # [B, V] float32 the graph's logits (overwritten per replay)
        self.padded = True  # the mask is always applied (it also hides positions past cur)

    def start(self, cache, attn: torch.Tensor) -> StaticLlamaSteps:
        """Begin a batch: its prompt pass's ``cache`` (keys/values [B, kv_heads, L, D] per layer) and prompt
        ``attn`` [B, L] (0: padding). Later positions keep the previous batch's values, masked until
        written."""
        width = cache.layers[0].keys.shape[2]
        if width >= self.capacity or attn.shape != (self.batch, width):
            raise ValueError(
                f"static decode steps for {self.batch} rows x {self.capacity} positions got a prompt pass of "
                f"{tuple(attn.shape)}"
            )
        for i, layer in enumerate(cache.layers):
            self.keys[i][:, :, :width].copy_(layer.keys)
            self.values[i][:, :, :width].copy_(layer.values)
        self.prompt_mask[:, :width].copy_(attn.bool())
        self.prompt_mask[:, width:] = True
        self.cur.fill_(width)
        self.length = width
        return self

    def select(self, keep: torch.Tensor) -> None:
        raise RuntimeError("static decode steps keep every row (drops_rows is False)")

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """As :meth:`FusedLlamaSteps.step` (``attn`` is not read: the mask lives on the device). On a GPU the
        returned logits are the graph's output buffer, valid until the next step."""
        if self.length >= self.capacity:
            raise ValueError(
                f"static decode steps: position {self.length} is past the {self.capacity} reserved"
            )
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if self.graphs and self.graph is None:
            try:
                self._capture()
            except RuntimeError as e:  # e.g. an operation CUDA refuses while capturing
                self.graphs, self.capture_error = False, str(e).splitlines()[0] if str(e) else repr(e)
                log.warning(
                    "rollout: CUDA graph capture failed (%s); these decode steps run without a graph "
                    "(%s=0 turns the static path off)",
                    self.capture_error,
                    STATIC_CACHE_ENV,
                )
        if self.graphs:
            self.graph.replay()
            logits = self.out
        else:
            logits = self._body()
        self.length += 1
        return logits

    def _body(self) -> torch.Tensor:
        """One step on the fixed buffers; advances ``cur``. Returns logits [B, V] float32."""
        # [B, 1, 1, C]: a real prompt position or a generated one written so far (this step's included)
        valid = (self.prompt_mask & (self.cols <= self.cur))[:, None, None, :]
        logits = self.forward(
            self.tokens, self.positions, lambda i, q, k, v: self._attend_all(i, q, k, v, valid)
        )
        self.cur.add_(1)
        return logits

    def _attend_all(self, i: int, q, k, v, valid: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s ``k``/``v`` [B, kv_heads, D] written at ``cur``; ``q`` [B, heads, D] attends over all
        ``capacity`` positions where ``valid``. Returns [B, heads * D] in the model's dtype."""
        b, kvh, d = k.shape
        self.keys[i].index_copy_(2, self.cur, k[:, :, None])
        self.values[i].index_copy_(2, self.cur, v[:, :, None])
        g = self.heads // kvh
        qg = q.reshape(b, kvh, g, d)  # the query heads that share a KV head, together
        scores = torch.matmul(qg, self.keys[i].transpose(-1, -2)).float() * self.scale  # [B, kvh, g, C]
        probs = scores.masked_fill(~valid, float("-inf")).softmax(-1).to(v.dtype)
        return torch.matmul(probs, self.values[i]).reshape(b, self.heads * d)

    def _capture(self) -> None:  # GPU-only: capture needs CUDA
        """Two warm-up runs on a side stream (lazy initialisation stays out of the graph), then the capture
        of one step. ``cur`` is restored after each: the warm-up writes land at the position the first real
        step overwrites."""
        at = self.cur.clone()
        try:
            with torch.cuda.device(self.cur.device):  # the buffers' GPU, whichever is current
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._body()
                        self.cur.copy_(at)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: the rollout service's weight thread may poll its NCCL work meanwhile
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    out = self._body()
        finally:
            self.cur.copy_(at)  # however far a failed capture got
        self.graph, self.out = graph, out


class StaticStepsCache:
    """An engine's :class:`StaticLlamaSteps` by ``(batch, capacity)``, the :data:`MAX_GRAPHS` most recently
    used."""

    def __init__(self, model, *, graphs: bool | None = None):
        self.model, self.graphs = model, graphs
        self._steps: collections.OrderedDict[tuple[int, int], StaticLlamaSteps] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._steps)

    def get(self, batch: int, positions: int) -> StaticLlamaSteps:
        """Steps for ``batch`` rows and at least ``positions`` positions (prompt + answer)."""
        key = (batch, bucket_capacity(positions))
        steps = self._steps.pop(key, None)
        if steps is None:
            steps = StaticLlamaSteps(self.model, *key, graphs=self.graphs)
        self._steps[key] = steps
        while len(self._steps) > MAX_GRAPHS:
            self._steps.popitem(last=False)
        return steps

    def clear(self) -> None:
        self._steps.clear()
