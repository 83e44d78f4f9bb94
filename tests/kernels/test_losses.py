"""Torch-path distillation losses against the float64 reference: values and gradients."""

import pytest
import torch

from gkd.kernels import fused_linear_topk_distill_loss, topk_distill_loss
from gkd.kernels.reference import topk_distill_loss_reference as reference
from tests.kernels.helpers import GRID, max_err, rand_mask, teacher_topk

SHAPES = [(41, 1271, 7, 24), (96, 4096, 64, 48)]  # odd and realistic-shaped (N, V, K, H)


def _kw(loss, tail, red):
    return dict(loss=loss, tail=tail, reduction=red, beta=0.3, temperature=1.4)


@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "regular"])
@pytest.mark.parametrize("loss,tail,red", GRID)
def test_topk_distill_loss_matches_reference_fp32(shape, loss, tail, red):
    n, vocab, k, _ = shape
    ids, lp, _ = teacher_topk(n, vocab, k)
    mask = rand_mask(n)
    x = torch.randn(n, vocab) * 2
    kw = _kw(loss, tail, red)

    x64 = x.double().requires_grad_()
    ref = reference(x64, ids, lp, mask, **kw)
    up = torch.randn_like(ref) + 1.5  # upstream gradient != 1
    (g_ref,) = torch.autograd.grad(ref, x64, up)

    x32 = x.clone().requires_grad_()
    out = topk_distill_loss(x32, ids.int(), lp.float(), mask, backend="torch", chunk_size=16, **kw)
    (g_out,) = torch.autograd.grad(out, x32, up.float())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    scale = ref.abs().max().item() + 1.0
    assert max_err(out, ref) <= 2e-5 * scale
    assert max_err(g_out, g_ref) <= 2e-5 * (g_ref.abs().max().item() + 1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "regular"])
@pytest.mark.parametrize("loss,tail,red", GRID)
def test_fused_linear_matches_reference_fp32(shape, loss, tail, red):
    n, vocab, k, h = shape
    ids, lp, _ = teacher_topk(n, vocab, k, seed=1)
    mask = rand_mask(n, seed=1)
    hidden, weight, bias = torch.randn(n, h), torch.randn(vocab, h) / h**0.5, torch.randn(vocab) * 0.1
    kw = _kw(loss, tail, red)

    leaves64 = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    ref = reference(leaves64[0] @ leaves64[1].t() + leaves64[2], ids, lp, mask, **kw)
    up = torch.randn_like(ref) + 1.5
    g_ref = torch.autograd.grad(ref, leaves64, up)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fused_linear_topk_distill_loss(
        leaves[0],
        leaves[1],
        ids,
        lp.float(),
        mask,
        lm_head_bias=leaves[2],
        chunk_size=13,
        backend="torch",
        **kw,
    )
    g_out = torch.autograd.grad(out, leaves, up.float())
    assert max_err(out, ref) <= 2e-5 * (ref.abs().max().item() + 1.0)
    for name, a, b in zip(("hidden", "weight", "bias"), g_out, g_ref, strict=True):
        assert max_err(a, b) <= 2e-5 * (b.abs().max().item() + 1e-3), name


@pytest.mark.parametrize("loss,tail,red", [g for g in GRID if g[2] != "mean"])
def test_bf16_error_within_twice_plain_torch_bf16(loss, tail, red):
    """Our bf16 path (bf16 GEMM, fp32 loss math) vs plain torch autograd run entirely in bf16."""
    n, vocab, k, h = 41, 1271, 7, 32
    ids, lp, _ = teacher_topk(n, vocab, k, seed=2)
    mask = rand_mask(n, seed=2)
    hidden, weight = torch.randn(n, h), torch.randn(vocab, h) / h**0.5
    kw = _kw(loss, tail, red)
    hb, wb = hidden.bfloat16(), weight.bfloat16()

    leaves64 = [hb.double().requires_grad_(), wb.double().requires_grad_()]  # same rounded inputs
    ref = reference(leaves64[0] @ leaves64[1].t(), ids, lp, mask, **kw)
    up = torch.randn_like(ref).abs() + 0.5
    g_ref = torch.autograd.grad(ref, leaves64, up)

    base_leaves = [hb.clone().requires_grad_(), wb.clone().requires_grad_()]
    base = reference(base_leaves[0] @ base_leaves[1].t(), ids, lp.bfloat16(), mask, **kw)
    g_base = torch.autograd.grad(base, base_leaves, up.bfloat16())

    leaves = [hb.clone().requires_grad_(), wb.clone().requires_grad_()]
    out = fused_linear_topk_distill_loss(leaves[0], leaves[1], ids, lp, mask, backend="torch", **kw)
    g_out = torch.autograd.grad(out, leaves, up.float())
    floor = 1e-4 * (ref.abs().max().item() + 1.0)
    assert max_err(out, ref) <= 2 * max_err(base, ref) + floor
    for a, b, c in zip(g_out, g_base, g_ref, strict=True):
        assert a.dtype == torch.bfloat16
        assert max_err(a, c) <= 2 * max_err(b, c) + 1e-3 * c.abs().max().item()

    xl = (hb.float() @ wb.float().t()).bfloat16().requires_grad_()
    out_l = topk_distill_loss(xl, ids, lp, mask, backend="torch", **kw)
    (g_l,) = torch.autograd.grad(out_l, xl, up.float())
    xb = xl.detach().clone().requires_grad_()
    base_l = reference(xb, ids, lp.bfloat16(), mask, **kw)
    (g_bl,) = torch.autograd.grad(base_l, xb, up.bfloat16())
    x64 = xl.detach().double().requires_grad_()
    ref_l = reference(x64, ids, lp, mask, **kw)
    (g_rl,) = torch.autograd.grad(ref_l, x64, up)
    assert g_l.dtype == torch.bfloat16
    assert max_err(out_l, ref_l) <= 2 * max_err(base_l, ref_l) + floor
    assert max_err(g_l, g_rl) <= 2 * max_err(g_bl, g_rl) + 1e-3 * g_rl.abs().max().item()


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunk_size_does_not_change_results(chunk):
    n, vocab, k, h = 29, 500, 5, 16
    ids, lp, _ = teacher_topk(n, vocab, k, seed=3)
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, h, dtype=torch.float64, requires_grad=True)
    out = fused_linear_topk_distill_loss(hidden, weight, ids, lp, loss="jsd", chunk_size=chunk)
    g = torch.autograd.grad(out, (hidden, weight))
    ref = reference(hidden @ weight.t(), ids, lp, loss="jsd")
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    assert max_err(out, ref) < 1e-10
    assert all(max_err(a, b) < 1e-10 for a, b in zip(g, g_ref, strict=True))


def test_no_grad_forward_allocates_no_gradients_and_matches():
    n, vocab, k, h = 20, 300, 4, 8
    ids, lp, _ = teacher_topk(n, vocab, k, seed=4)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(vocab, h, requires_grad=True)
    with torch.no_grad():
        a = fused_linear_topk_distill_loss(hidden, weight, ids, lp)
    b = fused_linear_topk_distill_loss(hidden, weight, ids, lp)
    assert not a.requires_grad and b.requires_grad
    assert torch.equal(a, b.detach())
