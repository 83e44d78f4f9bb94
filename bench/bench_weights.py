"""Weight transfer: packing into flat buffers and gloo syncs, every variant against its baseline in one run.

Run: ``.venv/bin/python -m pytest bench/bench_weights.py --benchmark-only -s``
(``GKD_BENCH_SIZE=small`` for smaller shapes; ``GKD_BENCH_ROUNDS`` rounds per variant, default 5).
Ratios are printed at the end and written to bench/results/weights.json.

In the regression suite (``benchmark.extra_info["ratios"]``, higher is better), through the public API:
- ``flatbuffer/small_vs_loop``: a Python ``copy_`` loop over 20,000 tensors of 4 KB (layout computed
  beforehand, buffer faulted in) / ``FlatBuffer.pack(..., out=buf)`` (layout included) into the same
  buffer; ``flatbuffer/small_vs_loop_reused_layout``: the loop / ``fb.write`` of an existing layout
  (the weight sender's case: the same names and shapes every version);
- ``flatbuffer/large_fraction_of_copy``: one ``copy_`` of the byte count of a Qwen2-0.5B-shaped bf16
  state / ``FlatBuffer.pack(..., out=buf)`` of it (the fraction of ``copy_`` bandwidth reached);
  ``..._reused_layout`` the same for ``fb.write``.
``GKD_BENCH_QUICK=1`` (the suite's quick mode): smaller shapes (a 1/8 vocabulary and 4 layers for the
Qwen2 state; the 20,000 tensors stay), and only these ratio benchmarks: the per-variant pack rows and the
gloo broadcasts (spawned receivers, tens of seconds) are skipped.

- pack of a Qwen2-0.5B-shaped bf16 state dict (~1 GB): extension vs torch fallback vs a Python
  ``copy_`` loop vs one ``copy_`` of the same byte count (the memory-bandwidth limit);
- pack of 20,000 tensors of 4 KB: extension vs fallback vs the Python loop;
- gloo broadcast to 2 receiver processes of a SmolLM2-135M-shaped bf16 state (272 tensors, 257 MiB) and
  of 300 tensors of 16 KB: one broadcast per tensor vs bucketed single-shot vs one raw broadcast of the
  whole byte count vs a full gkd sync (pack + checksum + broadcast + verify + copy into the receivers'
  tensors). The sender is unsharded, so "gather" is free here (FSDP2 gathering is tested, not timed).
Torch-side loops are also timed with one torch thread (``_1t``): see ``_one_thread``.
Destination buffers are allocated and touched once, outside the timings.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bench._common import interleaved_times
from gkd.weights import native as _ext
from gkd.weights.flat import FlatBuffer, TensorMeta, layout, plan_buckets
from gkd.weights.transfer import WeightReceiver, WeightSender, init_weight_group

QUICK = os.environ.get("GKD_BENCH_QUICK") == "1"
SMALL = QUICK or os.environ.get("GKD_BENCH_SIZE", "full") == "small"
ROUNDS = int(os.environ.get("GKD_BENCH_ROUNDS", "5"))
skip_in_quick = pytest.mark.skipif(QUICK, reason="GKD_BENCH_QUICK=1 runs only the ratio benchmarks")
RESULTS = Path(__file__).resolve().parent / "results" / "weights.json"
BUCKET_BYTES = 64 << 20
_TIMEOUT = timedelta(seconds=120)  # rendezvous and every collective
_SETTLE_S = 0.02  # pause before each interleaved call (see _interleaved_medians)
_TIMES: dict[str, float] = {}  # variant -> median seconds, filled by the benchmarks, read by the report


def _lm_shapes(
    vocab: int, hidden: int, layers: int, inter: int, heads: int, kv_heads: int, bias: bool
) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Llama/Qwen2-style decoder with tied embeddings."""
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
        ]
        if bias:
            shapes += [
                (p + "self_attn.q_proj.bias", (hidden,)),
                (p + "self_attn.k_proj.bias", (kv_heads * head_dim,)),
                (p + "self_attn.v_proj.bias", (kv_heads * head_dim,)),
            ]
        shapes += [
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return shapes + [("model.norm.weight", (hidden,))]


def qwen2_05b() -> list[tuple[str, tuple[int, ...]]]:
    return _lm_shapes(151936 // (8 if SMALL else 1), 896, 4 if SMALL else 24, 4864, 14, 2, bias=True)


def smollm2_135m() -> list[tuple[str, tuple[int, ...]]]:
    return _lm_shapes(49152 // (8 if SMALL else 1), 576, 4 if SMALL else 30, 1536, 9, 3, bias=False)


def small_300() -> list[tuple[str, tuple[int, ...]]]:
    """300 tensors of 16 KB (bf16): a state where per-message latency, not bandwidth, dominates."""
    return [(f"t{i}", (64, 128)) for i in range(300)]


BROADCAST_STATES = {"smollm2": smollm2_135m, "small300": small_300}


def make_state(shapes, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random bf16 tensors, all views into one flat tensor (so the bandwidth baseline can copy it at once)."""
    numels = [int(torch.Size(s).numel()) for _, s in shapes]
    flat = torch.empty(sum(numels), dtype=torch.bfloat16)
    flat.view(torch.int16).random_(generator=torch.Generator().manual_seed(seed))
    views, pos = {}, 0
    for (name, shape), n in zip(shapes, numels, strict=True):
        views[name] = flat[pos : pos + n].view(shape)
        pos += n
    return flat, views


def _record(benchmark, key: str) -> None:
    if benchmark.stats is not None:
        _TIMES[key] = benchmark.stats.stats.median


def _python_loop(views: dict[str, torch.Tensor], metas: list[TensorMeta], buf: torch.Tensor) -> None:
    for m in metas:
        buf[m.offset : m.end].copy_(views[m.name].reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------------------------------------- pack
@pytest.fixture(scope="module")
def qwen_state():
    flat, views = make_state(qwen2_05b())
    metas, nbytes = layout((TensorMeta.of(n, t) for n, t in views.items()), 256)
    buf = _ext.alloc_host(nbytes).tensor
    buf.fill_(0)  # fault the pages in once, outside every timing
    return flat, views, metas, buf


PACK_VARIANTS = ["ext", "fallback", "fallback_1t", "loop", "loop_1t", "memcpy_torch", "memcpy_ext"]


def _one_thread(fn):
    """fn with torch on one thread: on an oversubscribed machine each of torch's OpenMP regions can cost
    milliseconds, which a loop of ~300 copy_ calls multiplies (measured: 8x on this 2-core box)."""

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(before)

    return run


@skip_in_quick
@pytest.mark.parametrize("variant", PACK_VARIANTS)
def test_pack_qwen2_05b(benchmark, qwen_state, variant):
    flat, views, metas, buf = qwen_state
    tensors, offsets = [views[m.name] for m in metas], [m.offset for m in metas]
    benchmark.group = f"pack Qwen2-0.5B shapes, {flat.nbytes / 2**20:.0f} MiB bf16"
    benchmark.extra_info["bytes"] = flat.nbytes
    fn = {
        "ext": lambda: _ext.pack(tensors, offsets, buf, use_ext=True),
        "fallback": lambda: _ext.pack(tensors, offsets, buf, use_ext=False),
        "fallback_1t": _one_thread(lambda: _ext.pack(tensors, offsets, buf, use_ext=False)),
        "loop": lambda: _python_loop(views, metas, buf),
        "loop_1t": _one_thread(lambda: _python_loop(views, metas, buf)),
        # the limit: one copy of the same byte count, by torch and by the extension's threaded memcpy
        "memcpy_torch": lambda: buf[: flat.nbytes].copy_(flat.view(torch.uint8)),
        "memcpy_ext": lambda: _ext.pack([flat], [0], buf, use_ext=True),
    }[variant]
    if variant in ("ext", "memcpy_ext") and not _ext.HAS_EXT:
        pytest.skip(_ext.EXT_ERROR)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, f"pack_large/{variant}")


@pytest.fixture(scope="module")
def small_state():
    views = {f"t{i}": t for i, t in enumerate(torch.randn(20_000, 1024).unbind(0))}  # 20,000 x 4 KB
    metas, nbytes = layout((TensorMeta.of(n, t) for n, t in views.items()), 256)
    buf = _ext.alloc_host(nbytes).tensor
    buf.fill_(0)
    return views, metas, buf


@skip_in_quick
@pytest.mark.parametrize("variant", ["ext", "fallback", "loop", "loop_1t"])
def test_pack_20k_small(benchmark, small_state, variant):
    views, metas, buf = small_state
    tensors, offsets = [views[m.name] for m in metas], [m.offset for m in metas]
    benchmark.group = "pack 20,000 x 4 KB"
    if variant == "ext" and not _ext.HAS_EXT:
        pytest.skip(_ext.EXT_ERROR)
    fn = {
        "ext": lambda: _ext.pack(tensors, offsets, buf, use_ext=True),
        "fallback": lambda: _ext.pack(tensors, offsets, buf, use_ext=False),
        "loop": lambda: _python_loop(views, metas, buf),
        "loop_1t": _one_thread(lambda: _python_loop(views, metas, buf)),
    }[variant]
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, f"pack_small/{variant}")


# ------------------------------------------------------------------------- FlatBuffer, the public API
def _interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, called round-robin (one warm-up call each first), so that a
    noisy machine's drift hits every variant alike and their ratios stay comparable. Each call starts
    after a short pause: a torch ``copy_`` leaves its OpenMP threads spin-waiting for a few milliseconds,
    which slowed the variant that came next by ~25 % on a 2-core machine (measured: 15.0 vs 11.6 ms,
    equal with OMP_WAIT_POLICY=PASSIVE), whichever it was."""
    times = interleaved_times(fns, rounds, settle_s=_SETTLE_S)
    return {k: statistics.median(v) for k, v in times.items()}


def _flatbuffer_ratios(benchmark, prefix, fns, baseline, ratio_names):
    """Time ``fns`` interleaved, store ``baseline time / variant time`` under ``ratio_names[variant]`` in
    ``extra_info["ratios"]``, and let pytest-benchmark time the first variant (the first write)."""
    t = _interleaved_medians(fns, max(ROUNDS, 9))
    benchmark.extra_info["median_seconds"] = t
    benchmark.extra_info["ratios"] = {name: t[baseline] / t[key] for key, name in ratio_names.items()}
    _TIMES.update({f"{prefix}/{k}": v for k, v in t.items()})
    benchmark.pedantic(fns[next(iter(ratio_names))], rounds=ROUNDS, warmup_rounds=1)


def test_flatbuffer_small(benchmark, small_state):
    views, metas, buf = small_state
    fb = FlatBuffer(buf, metas)
    benchmark.group = "FlatBuffer public API: 20,000 x 4 KB"
    fns = {
        "loop": lambda: _python_loop(views, metas, buf),
        "pack": lambda: FlatBuffer.pack(views, out=buf),
        "write": lambda: fb.write(views),
    }
    names = {"pack": "flatbuffer/small_vs_loop", "write": "flatbuffer/small_vs_loop_reused_layout"}
    _flatbuffer_ratios(benchmark, "flatbuffer_small", fns, "loop", names)


def test_flatbuffer_large(benchmark, qwen_state):
    flat, views, metas, buf = qwen_state
    fb = FlatBuffer(buf, metas)
    benchmark.group = f"FlatBuffer public API: Qwen2-0.5B shapes, {flat.nbytes / 2**20:.0f} MiB bf16"
    benchmark.extra_info["bytes"] = flat.nbytes
    fns = {
        "copy_": lambda: buf[: flat.nbytes].copy_(flat.view(torch.uint8)),
        "pack": lambda: FlatBuffer.pack(views, out=buf),
        "write": lambda: fb.write(views),
    }
    names = {
        "pack": "flatbuffer/large_fraction_of_copy",
        "write": "flatbuffer/large_fraction_of_copy_reused_layout",
    }
    _flatbuffer_ratios(benchmark, "flatbuffer_large", fns, "copy_", names)


# ------------------------------------------------------------------------------------------- broadcast
# The benchmark process is rank 0 (the sender); two receiver processes follow its commands, each a
# header broadcast [op, arg]; every op ends with an all-reduce so rank 0 times the whole transfer.
_OP_QUIT, _OP_PER_TENSOR, _OP_BUCKETED, _OP_RAW, _OP_SYNC = range(5)


def _done(group) -> None:
    group.wait(group.pg.allreduce([torch.zeros(1)]), "done")


def _bcast(group, t: torch.Tensor) -> None:
    group.wait(group.broadcast(t), "broadcast")


class _ReceiverState:
    def __init__(self, group, shapes):
        self.model = {n: torch.zeros(s, dtype=torch.bfloat16) for n, s in shapes}
        metas = [TensorMeta.of(n, t) for n, t in self.model.items()]
        self.staging = [FlatBuffer.empty(b.metas, b.nbytes) for b in plan_buckets(metas, BUCKET_BYTES)]
        self.raw = torch.zeros(sum(m.nbytes for m in metas), dtype=torch.uint8)
        self.rx = WeightReceiver(group, metas)
        self.rx.handshake()


def _receiver(index: int, port: int) -> None:
    torch.set_num_threads(1)
    group = init_weight_group("127.0.0.1", port, index + 1, 3, timeout=_TIMEOUT)
    states = [_ReceiverState(group, shapes()) for shapes in BROADCAST_STATES.values()]
    header = torch.zeros(2, dtype=torch.int64)
    while True:
        _bcast(group, header)
        op = int(header[0])
        if op == _OP_QUIT:
            return
        st = states[int(header[1])]
        model, staging, raw, rx = st.model, st.staging, st.raw, st.rx
        if op == _OP_PER_TENSOR:
            for t in model.values():
                _bcast(group, t)
        elif op == _OP_BUCKETED:
            for fb in staging:
                _bcast(group, fb.buffer)
                fb.copy_into({m.name: model[m.name] for m in fb.metas})
        elif op == _OP_RAW:
            _bcast(group, raw)
        elif op == _OP_SYNC:
            rx.receive()
            rx.apply(model)
        _done(group)


@pytest.fixture(scope="module")
def channel():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_receiver, args=(port,), nprocs=2, join=False, start_method="spawn")
    group = init_weight_group("127.0.0.1", port, 0, 3, timeout=_TIMEOUT)
    states = {}
    for key, shapes in BROADCAST_STATES.items():  # handshakes in the receivers' order
        flat, state = make_state(shapes(), seed=1)
        sender = WeightSender(group, state, bucket_bytes=BUCKET_BYTES)
        sender.handshake()
        staging = [FlatBuffer.empty(b.metas, b.nbytes) for b in sender.buckets]
        states[key] = (flat, state, sender, staging)
    yield group, states
    _bcast(group, torch.tensor([_OP_QUIT, 0]))
    ctx.join(timeout=60)


def _command(group, op: int, arg: int) -> None:
    _bcast(group, torch.tensor([op, arg], dtype=torch.int64))


def _per_tensor(group, key, state, *_):
    _command(group, _OP_PER_TENSOR, key)
    for t in state.values():
        _bcast(group, t)
    _done(group)


def _bucketed(group, key, state, sender, staging):
    _command(group, _OP_BUCKETED, key)
    for fb in staging:
        fb.write({m.name: state[m.name] for m in fb.metas})
        _bcast(group, fb.buffer)
    _done(group)


def _raw(group, key, state, sender, staging, flat):
    _command(group, _OP_RAW, key)
    _bcast(group, flat.view(torch.uint8))
    _done(group)


def _full_sync(group, key, state, sender, staging, version=[0]):  # noqa: B006 -- a round counter
    version[0] += 1
    _command(group, _OP_SYNC, key)
    sender.sync(version[0])
    _done(group)


@skip_in_quick
@pytest.mark.parametrize("key", list(BROADCAST_STATES))
@pytest.mark.parametrize("variant", ["per_tensor", "bucketed", "raw", "full_sync"])
def test_broadcast(benchmark, channel, key, variant):
    group, states = channel
    flat, state, sender, staging = states[key]
    size = f"{len(state)} tensors, {flat.nbytes / 2**20:.1f} MiB"
    benchmark.group = f"gloo broadcast to 2 receivers, {key}: {size}"
    fn = {
        "per_tensor": _per_tensor,
        "bucketed": _bucketed,
        "full_sync": _full_sync,
        "raw": lambda *a: _raw(*a, flat),
    }[variant]
    index = list(BROADCAST_STATES).index(key)
    benchmark.pedantic(fn, args=(group, index, state, sender, staging), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, f"broadcast_{key}/{variant}")


# ---------------------------------------------------------------------------------------------- report
@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module's benchmarks: print the ratios and write them to RESULTS (a fixture, not a test,
    so that ``--benchmark-only`` does not skip it)."""
    yield
    t = _TIMES
    ratios = {}

    def ratio(name, num, den):
        if num in t and den in t:
            ratios[name] = t[num] / t[den]

    ratio("pack_large: ext / one threaded memcpy (the limit)", "pack_large/memcpy_ext", "pack_large/ext")
    ratio("pack_large: ext / one torch copy_", "pack_large/memcpy_torch", "pack_large/ext")
    ratio("pack_large: fallback / one threaded memcpy", "pack_large/memcpy_ext", "pack_large/fallback")
    ratio("pack_large: loop / one threaded memcpy", "pack_large/memcpy_ext", "pack_large/loop")
    ratio(
        "pack_large: loop (1 torch thread) / one threaded memcpy",
        "pack_large/memcpy_ext",
        "pack_large/loop_1t",
    )
    ratio("pack_large: ext speed-up over loop (1 torch thread)", "pack_large/loop_1t", "pack_large/ext")
    ratio("pack_large: ext speed-up over loop", "pack_large/loop", "pack_large/ext")
    ratio("pack_small: ext speed-up over loop", "pack_small/loop", "pack_small/ext")
    ratio("pack_small: ext speed-up over loop (1 torch thread)", "pack_small/loop_1t", "pack_small/ext")
    ratio("pack_small: fallback speed-up over loop", "pack_small/loop", "pack_small/fallback")
    ratio("FlatBuffer.pack (20k x 4 KB) speed-up over loop", "flatbuffer_small/loop", "flatbuffer_small/pack")
    ratio(
        "FlatBuffer.write (20k x 4 KB) speed-up over loop", "flatbuffer_small/loop", "flatbuffer_small/write"
    )
    ratio("FlatBuffer.pack (Qwen2) / one torch copy_", "flatbuffer_large/copy_", "flatbuffer_large/pack")
    ratio("FlatBuffer.write (Qwen2) / one torch copy_", "flatbuffer_large/copy_", "flatbuffer_large/write")
    for key in BROADCAST_STATES:
        b = f"broadcast_{key}/"
        ratio(f"{key}: bucketed speed-up over per-tensor broadcast", b + "per_tensor", b + "bucketed")
        ratio(f"{key}: full-sync speed-up over per-tensor broadcast", b + "per_tensor", b + "full_sync")
        ratio(f"{key}: sync efficiency (raw broadcast / full sync)", b + "raw", b + "full_sync")
    if not ratios:
        return  # --benchmark-disable, or a selection without both sides of any ratio
    print("\nweight-transfer ratios" + (" (GKD_BENCH_SIZE=small)" if SMALL else ""))
    for name, r in ratios.items():
        print(f"  {name:55s} {r:7.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "size": "small" if SMALL else "full",
                "threads": torch.get_num_threads(),
                "median_seconds": t,
                "ratios": ratios,
            },
            indent=2,
        )
    )
