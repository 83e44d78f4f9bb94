"""gkd.weights.flat: bitwise round trips, strict copies, and bucket plans."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gkd.weights import native as _ext
from gkd.weights.flat import (
    DTYPES,
    FlatBuffer,
    MetadataMismatch,
    TensorMeta,
    diff_metas,
    layout,
    plan_buckets,
)

PATHS = [
    pytest.param(False, id="fallback"),
    pytest.param(True, id="ext", marks=pytest.mark.skipif(not _ext.HAS_EXT, reason=str(_ext.EXT_ERROR))),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w.fp32": torch.randn(3, 5, generator=g),
        "w.bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "w.fp16": torch.randn(1, 13, generator=g).half(),
        "w.fp64": torch.randn(3, generator=g).double(),
        "ids.i64": torch.randint(-(2**50), 2**50, (5, 1), generator=g),
        "ids.i32": torch.randint(-99, 99, (11,), generator=g, dtype=torch.int32),
        "ids.i16": torch.randint(-99, 99, (3,), generator=g, dtype=torch.int16),
        "ids.i8": torch.randint(-99, 99, (5,), generator=g, dtype=torch.int8),
        "mask": torch.rand(2, 9, generator=g) > 0.5,
        "bytes": torch.randint(0, 256, (17,), generator=g, dtype=torch.uint8),
        "empty": torch.empty(0, 4),
        "empty.bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "nan": torch.tensor([float("nan"), float("-inf"), -0.0]),
    }


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("alignment", [8, 64, 256, 4096])
def test_round_trip_is_bitwise(use_ext, alignment):
    state = _state()
    fb = FlatBuffer.pack(state, alignment=alignment, use_ext=use_ext)
    assert [m.name for m in fb.metas] == list(state)
    assert all(m.offset % alignment == 0 for m in fb.metas)
    assert fb.nbytes == fb.metas[-1].end  # exact size, no padding after the last tensor
    views = fb.unpack()
    for name, t in state.items():
        assert views[name].dtype == t.dtype and views[name].shape == t.shape
        assert torch.equal(_bits(views[name]), _bits(t)), name
    dest = {
        n: torch.full_like(t, 1) if t.dtype != torch.bool else torch.zeros_like(t) for n, t in state.items()
    }
    fb.copy_into(dest, use_ext=use_ext)
    for name, t in state.items():
        assert torch.equal(_bits(dest[name]), _bits(t)), name


@pytest.mark.skipif(not _ext.HAS_EXT, reason=str(_ext.EXT_ERROR))
@pytest.mark.parametrize("alignment", [8, 256])
def test_ext_and_fallback_give_identical_buffers(alignment):
    state = _state(seed=3)
    a = FlatBuffer.pack(state, alignment=alignment, use_ext=True)
    b = FlatBuffer.pack(state, alignment=alignment, use_ext=False)
    assert a.metas == b.metas
    assert torch.equal(a.buffer, b.buffer)
    assert a.checksum(use_ext=True) == b.checksum(use_ext=False)


def test_unpack_returns_views_not_copies():
    fb = FlatBuffer.pack({"a": torch.zeros(4), "b": torch.zeros(2, 2, dtype=torch.bfloat16)})
    views = fb.unpack()
    fb.buffer.fill_(0x3F)
    assert views["a"][0].item() == torch.tensor([0x3F3F3F3F], dtype=torch.int32).view(torch.float32).item()
    assert views["b"].untyped_storage().data_ptr() == fb.buffer.untyped_storage().data_ptr()


@pytest.mark.parametrize("use_ext", PATHS)
def test_non_contiguous_input_is_rejected_by_name(use_ext):
    with pytest.raises(ValueError, match=r"'w' is not contiguous"):
        FlatBuffer.pack({"ok": torch.ones(3), "w": torch.ones(4, 6).t()}, use_ext=use_ext)


@pytest.mark.parametrize("use_ext", PATHS)
def test_copy_into_non_contiguous_destination(use_ext):
    src = torch.arange(12.0).reshape(3, 4)
    base = torch.zeros(3, 8)
    dest = base[:, ::2]  # non-contiguous: filled by copy_ instead of the threaded path
    FlatBuffer.pack({"x": src}, use_ext=use_ext).copy_into({"x": dest}, use_ext=use_ext)
    assert torch.equal(base[:, ::2], src) and torch.equal(base[:, 1::2], torch.zeros(3, 4))


def test_copy_into_is_strict_and_writes_nothing_on_mismatch():
    fb = FlatBuffer.pack({"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.ones(1)})
    dest = {"a": torch.zeros(3, 2), "b": torch.zeros(4, dtype=torch.float16), "d": torch.zeros(1)}
    with pytest.raises(MetadataMismatch) as err:
        fb.copy_into(dest)
    msg = str(err.value)
    assert "missing (1): c" in msg and "unexpected (1): d" in msg
    assert "a: expected torch.float32[2, 3], got torch.float32[3, 2]" in msg
    assert "b: expected torch.float32[4], got torch.float16[4]" in msg
    assert all(int(t.count_nonzero()) == 0 for t in dest.values())


def test_model_parameters_round_trip_into_another_model():
    torch.manual_seed(1)
    mlp = lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    src, dst = mlp().to(torch.bfloat16), mlp().to(torch.bfloat16)
    fb = FlatBuffer.pack({n: p.detach() for n, p in src.named_parameters()})
    fb.copy_into(dst.named_parameters())
    x = torch.randn(4, 5).to(torch.bfloat16)
    assert torch.equal(src(x), dst(x))


def test_bad_alignment_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="power of two >= 8"):
        FlatBuffer.pack({"a": torch.ones(2)}, alignment=4)
    with pytest.raises(ValueError, match="power of two >= 8"):
        FlatBuffer.pack({"a": torch.ones(2)}, alignment=24)
    with pytest.raises(TypeError, match="complex64"):
        FlatBuffer.pack({"z": torch.ones(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="appears twice"):
        layout([TensorMeta("a", torch.float32, (1,)), TensorMeta("a", torch.float32, (2,))])


def test_meta_json_round_trip_and_validation():
    metas, _ = layout([TensorMeta(f"t{i}", dt, (i, 2)) for i, dt in enumerate(DTYPES.values())], 64)
    assert [TensorMeta.from_json(m.to_json()) for m in metas] == metas
    good = metas[1].to_json()
    for bad in (
        {**good, "dtype": "object"},
        {**good, "shape": "3"},
        {**good, "nbytes": 1},
        {**good, "offset": 1.5},
        {k: v for k, v in good.items() if k != "name"},
    ):
        with pytest.raises(ValueError):
            TensorMeta.from_json(bad)


def test_diff_metas_ignores_offsets():
    a = [TensorMeta("x", torch.float32, (2,), offset=0)]
    assert diff_metas(a, [TensorMeta("x", torch.float32, (2,), offset=256)]) is None
    assert "x: expected torch.float32[2], got torch.bfloat16[2]" in diff_metas(
        a, [TensorMeta("x", torch.bfloat16, (2,))]
    )


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), max_size=40),
    bucket_bytes=st.integers(1, 8000),
    alignment=st.sampled_from([8, 64, 256]),
)
def test_plan_buckets_properties(sizes, bucket_bytes, alignment):
    metas = [TensorMeta(f"t{i}", torch.uint8, (n,)) for i, n in enumerate(sizes)]
    buckets = plan_buckets(metas, bucket_bytes, alignment)
    assert [m.name for b in buckets for m in b.metas] == [m.name for m in metas]  # all, in order, once
    for i, b in enumerate(buckets):
        assert b.index == i and b.metas
        relaid, nbytes = layout(b.metas, alignment)
        assert list(b.metas) == relaid and b.nbytes == nbytes
        assert b.nbytes <= bucket_bytes or len(b.metas) == 1  # only a lone oversized tensor may exceed
        if i + 1 < len(buckets):  # greedy: the next tensor did not fit
            nxt = buckets[i + 1].metas[0]
            assert (b.nbytes + alignment - 1) // alignment * alignment + nxt.nbytes > bucket_bytes


def test_plan_buckets_large_tensor_alone():
    metas = [
        TensorMeta("a", torch.float32, (10,)),
        TensorMeta("big", torch.float32, (1000,)),
        TensorMeta("b", torch.float32, (10,)),
        TensorMeta("c", torch.float32, (10,)),
    ]
    buckets = plan_buckets(metas, 512, alignment=64)
    assert [[m.name for m in b.metas] for b in buckets] == [["a"], ["big"], ["b", "c"]]
    assert [b.nbytes for b in buckets] == [40, 4000, 104]
    assert plan_buckets([], 512) == []


@pytest.mark.parametrize("use_ext", PATHS)
def test_pack_builds_the_layout_of_layout(use_ext):
    state = _state(seed=5)
    fb = FlatBuffer.pack(state, alignment=64, use_ext=use_ext)
    metas, nbytes = layout((TensorMeta.of(n, t) for n, t in state.items()), 64)
    assert list(fb.metas) == metas and fb.nbytes == nbytes  # the metas, built from the plan when read
    pairs = FlatBuffer.pack(list(state.items()), alignment=64, use_ext=use_ext)
    assert torch.equal(pairs.buffer, fb.buffer)
    with pytest.raises(ValueError, match="'w.fp32' appears twice"):
        FlatBuffer.pack([*state.items(), ("w.fp32", torch.ones(1))], use_ext=use_ext)


@pytest.mark.parametrize("use_ext", PATHS)
def test_pack_into_out(use_ext):
    state = _state(seed=6)
    out = torch.full((4096,), 0xAB, dtype=torch.uint8)
    fb = FlatBuffer.pack(state, out=out, use_ext=use_ext)
    assert fb.buffer.data_ptr() == out.data_ptr() and fb.nbytes == fb.metas[-1].end
    assert bool((out[fb.nbytes :] == 0xAB).all())  # nothing written past the layout
    for name, t in state.items():
        assert torch.equal(_bits(fb.unpack()[name]), _bits(t)), name
    with pytest.raises(ValueError, match=r"out must be uint8 \[>= "):
        FlatBuffer.pack(state, out=out[:100], use_ext=use_ext)
    with pytest.raises(ValueError, match="either out= or pin=/device="):
        FlatBuffer.pack(state, out=out, pin=True, use_ext=use_ext)


@pytest.mark.parametrize("use_ext", PATHS)
def test_bucket_metas_share_one_copy_plan_across_writes(use_ext):
    # The weight sender's pattern: a new FlatBuffer over the same bucket every version, fp32 master
    # weights cast into a bf16 layout; every version's values must land, nothing stale from the plan.
    shapes = {f"w{i}": (i + 1, 5) for i in range(6)}
    metas = [
        TensorMeta(n, torch.bfloat16 if i % 2 else torch.float32, s)
        for i, (n, s) in enumerate(shapes.items())
    ]
    (bucket,) = plan_buckets(metas, 1 << 20, alignment=64)
    buffers = [torch.zeros(bucket.nbytes, dtype=torch.uint8) for _ in range(2)]
    assert FlatBuffer(buffers[0], bucket.metas)._plan is FlatBuffer(buffers[1], bucket.metas)._plan
    for version in range(3):
        src = {n: torch.randn(s, generator=torch.Generator().manual_seed(version)) for n, s in shapes.items()}
        fb = FlatBuffer(buffers[version % 2], bucket.metas)
        fb.write(src, cast=True, use_ext=use_ext)
        views = fb.unpack()
        for m in bucket.metas:
            assert views[m.name].dtype == m.dtype
            assert torch.equal(views[m.name], src[m.name].to(m.dtype)), (version, m.name)


@pytest.mark.parametrize("use_ext", PATHS)
def test_write_is_strict_and_writes_nothing_on_mismatch(use_ext):
    fb = FlatBuffer.empty(
        layout([TensorMeta("a", torch.float32, (2, 3)), TensorMeta("b", torch.int32, (4,))])[0]
    )
    ones = {"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.int32)}
    cases = [
        ({"a": ones["a"]}, "missing (1): b"),
        ({**ones, "c": torch.ones(1)}, "unexpected (1): c"),
        ({**ones, "a": torch.ones(3, 2)}, "a: expected torch.float32[2, 3], got torch.float32[3, 2]"),
        ({**ones, "b": torch.ones(4)}, "b: expected torch.int32[4], got torch.float32[4]"),
        # a non-contiguous tensor before the mismatch: the mismatch is reported, as a full diff
        ({"a": torch.ones(3, 2).t(), "b": torch.ones(4, dtype=torch.int64)}, "b: expected torch.int32[4]"),
    ]
    for source, message in cases:
        with pytest.raises(MetadataMismatch, match=re.escape(message)):
            fb.write(source, cast=True, use_ext=use_ext)
    with pytest.raises(MetadataMismatch, match="repeat a name"):
        fb.write([*ones.items(), ("a", ones["a"])], use_ext=use_ext)
    with pytest.raises(ValueError, match="'a' is not contiguous"):
        fb.write({**ones, "a": torch.ones(3, 2).t()}, use_ext=use_ext)
    with pytest.raises(ValueError, match=r"'b' is torch.sparse_coo, not dense"):
        fb.write({**ones, "b": ones["b"].to_sparse()}, use_ext=use_ext)
    assert int(fb.buffer.count_nonzero()) == 0
    with pytest.raises(ValueError, match=r"'s' is torch.sparse_coo, not dense"):
        FlatBuffer.pack({"x": torch.ones(2), "s": torch.ones(3).to_sparse()}, use_ext=use_ext)
