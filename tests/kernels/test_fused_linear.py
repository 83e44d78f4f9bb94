"""Fused lm_head losses: GEMMs in a compute dtype below the weights' (bf16 with fp32 master weights),
chunks sized by a memory budget, no host syncs. On CUDA tensors when there is a GPU (the fp32-output
accumulating GEMM runs there), on CPU otherwise."""

from __future__ import annotations

import pytest
import torch

from gkd.kernels import (
    fused_linear,
    fused_linear_token_logprobs,
    fused_linear_topk_distill_loss,
    grad_accumulate,
)
from gkd.kernels._common import default_chunk_rows
from gkd.kernels.memory import FusedShape, fused_chunk_rows
from gkd.kernels.reference import topk_distill_loss_reference as reference
from tests.kernels.helpers import rand_mask, teacher_topk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V, K, H = 41, 1271, 7, 64


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    bias = torch.randn(V, generator=g) * 0.1
    ids, lp, _ = teacher_topk(N, V, K, seed=seed)
    return [t.to(DEVICE) for t in (hidden, weight, bias, ids, lp, rand_mask(N, seed))]


def _normwise(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _grads(fn, leaves, up):
    leaves = [t.clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(up.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


TOPK_CASES = [("forward_kl", "bucket"), ("jsd", "renorm"), ("reverse_kl", "bucket")]


@pytest.mark.parametrize("loss,tail", TOPK_CASES)
def test_bf16_compute_with_fp32_weights_within_2x_plain_bf16(loss, tail):
    hidden, weight, bias, ids, lp, mask = _inputs()
    kw = dict(loss=loss, tail=tail, temperature=1.3, reduction="none")  # per-row values: a normwise error
    up = torch.linspace(-1.0, 2.0, N, device=DEVICE)

    want = _grads(
        lambda h, w, b: reference(h @ w.t() + b, ids, lp, mask, **kw),
        [hidden.double(), weight.double(), bias.double()],
        up,
    )

    def plain_bf16(h, w, b):  # what autocast would do: bf16 GEMM, fp32 loss on its output
        z = (h.bfloat16() @ w.bfloat16().t() + b.bfloat16()).float()
        return reference(z, ids, lp.float(), mask, **kw)

    def fused(h, w, b, **extra):
        return fused_linear_topk_distill_loss(
            h, w, ids, lp.float(), mask, lm_head_bias=b, chunk_size=16, **kw, **extra
        )

    base = _grads(plain_bf16, [hidden, weight, bias], up)
    got = _grads(lambda h, w, b: fused(h, w, b, compute_dtype=torch.bfloat16), [hidden, weight, bias], up)
    fp32 = _grads(fused, [hidden, weight, bias], up)
    for name, g, b, f, w in zip(("value", "hidden", "weight", "bias"), got, base, fp32, want, strict=True):
        assert g.dtype == torch.float32, name  # gradients come back in the inputs' dtype (fp32)
        err, err_base = _normwise(g, w), _normwise(b, w)
        print(f"{loss}/{tail} {name}: bf16 compute {err:.2e}, plain bf16 {err_base:.2e}")
        assert err <= 2 * err_base, f"{name}: {err:.2e} > 2 x plain bf16 {err_base:.2e}"
        # the GEMMs did run in bf16: far from the fp32 run (whose round-off is ~1e-7)
        assert _normwise(g, f.double()) > 5e-6, name


def test_bf16_compute_token_logprobs_within_2x_plain_bf16():
    hidden, weight, bias, _, _, _ = _inputs(1)
    tok = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    up = torch.linspace(-1.0, 2.0, N, device=DEVICE)

    def logq(z):
        return torch.log_softmax(z / 0.8, -1).gather(1, tok[:, None])[:, 0]

    want = _grads(lambda h, w, b: logq(h @ w.t() + b), [hidden.double(), weight.double(), bias.double()], up)
    base = _grads(
        lambda h, w, b: logq((h.bfloat16() @ w.bfloat16().t() + b.bfloat16()).float()),
        [hidden, weight, bias],
        up,
    )
    got = _grads(
        lambda h, w, b: fused_linear_token_logprobs(
            h, w, tok, lm_head_bias=b, temperature=0.8, chunk_size=16, compute_dtype=torch.bfloat16
        ),
        [hidden, weight, bias],
        up,
    )
    for name, g, b, w in zip(("value", "hidden", "weight", "bias"), got, base, want, strict=True):
        assert g.dtype == torch.float32, name
        err, err_base = _normwise(g, w), _normwise(b, w)
        assert err <= 2 * err_base, f"{name}: {err:.2e} > 2 x plain bf16 {err_base:.2e}"
        assert err > 1e-5, name  # bf16 GEMMs, not fp32


def test_mixed_dtypes_need_compute_dtype():
    hidden, weight, _, ids, lp, _ = _inputs()
    with pytest.raises(ValueError, match="must share a dtype, or pass compute_dtype="):
        fused_linear_topk_distill_loss(hidden.bfloat16(), weight, ids, lp)
    # bf16 hidden (an autocast forward) with fp32 master weights, GEMMs in bf16: weight grad stays fp32
    w = weight.clone().requires_grad_()
    h = hidden.bfloat16().requires_grad_()
    fused_linear_topk_distill_loss(h, w, ids, lp, compute_dtype=torch.bfloat16).backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16


def _chunk_rows_seen(monkeypatch):
    """Record the rows of every logits chunk the fused losses compute."""
    seen = []
    for name in ("_logits", "_logits_t"):
        real = getattr(fused_linear, name)

        def spy(h, *a, _real=real, **kw):
            seen.append(h.shape[0])
            return _real(h, *a, **kw)

        monkeypatch.setattr(fused_linear, name, spy)
    return seen


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunk_bytes_sets_the_chunks_not_the_result(monkeypatch, backend):
    hidden, weight, bias, ids, lp, mask = _inputs(2)
    up = torch.tensor(1.3, device=DEVICE)

    def run(**extra):
        fn = lambda h, w, b: fused_linear_topk_distill_loss(  # noqa: E731
            h, w, ids, lp.float(), mask, lm_head_bias=b, backend=backend, reduction="sum", **extra
        )
        return _grads(fn, [hidden, weight, bias], up)

    seen = _chunk_rows_seen(monkeypatch)
    default = run()
    assert seen == [
        N
    ]  # the default (CPU: about N/8 rows but >= 4M logits; CUDA: 1.375 GiB in all) is one chunk here
    seen.clear()
    budget = run(chunk_bytes=V * 4 * 9)  # nine fp32 rows: 41 rows -> 5 balanced chunks of <= 9
    assert seen == [9, 9, 9, 9, 5]
    for a, b in zip(budget, default, strict=True):
        assert _normwise(a, b.double()) < 1e-5


def test_chunk_bytes_token_logprobs(monkeypatch):
    hidden, weight, _, _, _, _ = _inputs(3)
    tok = torch.randint(0, V, (N,)).to(DEVICE)
    seen = _chunk_rows_seen(monkeypatch)
    a = fused_linear_token_logprobs(hidden, weight, tok, chunk_bytes=V * 2 * 20, compute_dtype=torch.bfloat16)
    assert seen == [16, 16, 9]  # 20 bf16 rows per chunk at most: 3 chunks of 14 rounded up to 16
    seen.clear()
    b = fused_linear_token_logprobs(hidden, weight, tok, compute_dtype=torch.bfloat16)
    assert len(seen) == 1 and _normwise(a, b.double()) < 1e-6


def _shape(vocab, n, dtype=torch.bfloat16, hidden=1024):
    return FusedShape(n, vocab, hidden, dtype, dtype, dtype, "topk_triton")


def test_fused_chunk_rows():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # the CUDA default keeps the whole call within 1.375 GiB: 16384 tokens at V = 152k, H = 1024 in bf16
    # run as five 3280-row chunks (a 0.29 GiB weight-gradient correction beside them)
    assert fused_chunk_rows(_shape(151936, 16384), cuda, None, None) == 3280
    assert fused_chunk_rows(_shape(151936, 100), cuda, None, None) == 100
    # CPU keeps its default unless a budget is given; chunk_size wins over both
    f32 = torch.float32
    assert fused_chunk_rows(_shape(151936, 16384, f32), cpu, None, None) == default_chunk_rows(151936, 16384)
    assert fused_chunk_rows(_shape(1000, 100, f32), cpu, None, 4000 * 30) == 25  # 30 rows fit: 4 of 25
    assert fused_chunk_rows(_shape(1000, 100, f32), cpu, 7, 4000 * 30) == 7
    assert fused_chunk_rows(_shape(1000, 100, f32), cpu, None, 1) == 1  # less than a row: one row a chunk
    for bad in ({"chunk_bytes": 0}, {"chunk_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fused_chunk_rows(_shape(1000, 100, f32), cpu, bad.get("chunk_size"), bad.get("chunk_bytes"))


def test_wide_accumulator_paths(monkeypatch):
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randn(m, 16, generator=g).bfloat16() for m in (30, 20))
    want = a.double() @ b.double().t() * 2
    # where the fp32-output GEMM is missing (CPU, older torch): one reused bf16 product buffer
    acc = grad_accumulate._WideAccumulator(torch.zeros(30, 20))
    acc.fused = True  # try it first, as on CUDA: the CPU refuses and the fallback takes over
    acc.add(a, b.t())
    acc.add(a, b.t())
    assert not acc.fused and acc.prod is not None and acc.prod.dtype == torch.bfloat16
    assert _normwise(acc.acc, want) < 1e-2
    # with it: addmm accumulates into the fp32 buffer itself, no product buffer

    def fp32_addmm(inp, m1, m2, *, out_dtype, out):
        assert inp is out and out.dtype == out_dtype == torch.float32
        return out.add_(m1.float() @ m2.float())

    monkeypatch.setattr(grad_accumulate.torch, "addmm", fp32_addmm)
    acc = grad_accumulate._WideAccumulator(torch.zeros(30, 20))
    acc.fused = True
    acc.add(a, b.t())
    acc.add(a, b.t())
    assert acc.fused and acc.prod is None
    assert _normwise(acc.acc, want) < 1e-5


def test_no_host_sync_with_check_inputs_off(monkeypatch):
    """Every host sync goes through one of these Tensor methods; none may run in the step."""
    hidden, weight, bias, ids, lp, mask = _inputs(5)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    tok = torch.randint(0, V, (N,)).to(DEVICE)

    def refuse(*_a, **_k):
        raise AssertionError("host sync in the fused loss")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "any", "all"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for backend in ("torch", "triton"):
        out = fused_linear_topk_distill_loss(
            leaves[0],
            leaves[1],
            ids,
            lp,
            mask,
            lm_head_bias=leaves[2],
            backend=backend,
            compute_dtype=torch.bfloat16,
            chunk_size=16,
            reduction="mean",
            check_inputs=False,
        )
        out.backward()
    logq = fused_linear_token_logprobs(
        leaves[0],
        leaves[1],
        tok,
        lm_head_bias=leaves[2],
        compute_dtype=torch.bfloat16,
        chunk_size=16,
        check_inputs=False,
    )
    logq.sum().backward()
    monkeypatch.undo()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
