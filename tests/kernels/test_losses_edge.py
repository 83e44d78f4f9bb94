"""Edge cases, gradcheck and input errors for the distillation losses (torch path)."""

import math

import pytest
import torch

from gkd.kernels import (
    fused_linear_token_logprobs,
    fused_linear_topk_distill_loss,
    sampled_reverse_kl_loss,
    topk_distill_loss,
)
from gkd.kernels.reference import topk_distill_loss_reference as reference
from tests.kernels.helpers import GRID, max_err, teacher_topk


def full_kl(teacher_logp, student_logits, t=1.0):
    s = torch.log_softmax(student_logits / t, dim=-1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(-1)


def test_full_support_bucket_forward_kl_is_full_vocabulary_kl():
    n, vocab = 9, 50
    ids, lp, logp = teacher_topk(n, vocab, vocab, holes=False)  # K = V
    x = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
    out = topk_distill_loss(x, ids, lp, reduction="none", temperature=0.7)
    expected = full_kl(logp, x, 0.7)
    assert max_err(out, expected) < 1e-12
    g = torch.autograd.grad(out.sum(), x)[0]
    g_exp = torch.autograd.grad(expected.sum(), x)[0]
    assert max_err(g, g_exp) < 1e-12
    # fp32 stays finite (the bucket is empty, and S rounds to ~1)
    out32 = topk_distill_loss(x.detach().float(), ids, lp.float(), reduction="none")
    assert torch.isfinite(out32).all()


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_teacher_mass_one_and_student_mass_near_one_stay_finite(loss):
    n, vocab, k = 6, 40, 4
    ids = torch.stack([torch.randperm(vocab)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k), -1).float()  # S = 1: the teacher's top-k is everything
    x = torch.randn(n, vocab) * 0.1
    x.scatter_(1, ids, 60.0)  # Q -> 1 in fp32: 1 - Q underflows by subtraction
    x.requires_grad_()
    out = topk_distill_loss(x, ids, lp, loss=loss, reduction="none")
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    x64 = x.detach().double().requires_grad_()
    ref = reference(x64, ids, lp.double(), loss=loss, reduction="none")
    (g_ref,) = torch.autograd.grad(ref.sum(), x64)
    assert max_err(out, ref) <= 1e-4 * (ref.abs().max().item() + 1)
    assert max_err(g, g_ref) <= 1e-5


def test_the_teacher_bucket_floor_is_1e_6_by_hand():
    """Reverse KL on the bucket support, written out by hand: the teacher's top-2 hold all of its mass
    (S = 1), so its bucket is the floor 1e-6 (a literal here: the reference reads the library's constant),
    and the student's bucket holds what its two ids leave."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2]])
    p = [0.75, 0.25]
    lp = torch.tensor([[math.log(p[0]), math.log(p[1])]], dtype=torch.float64)
    z = [2.0, 1.0, 0.5, -1.0]
    total = sum(math.exp(v) for v in z)
    q = [math.exp(z[0]) / total, math.exp(z[2]) / total]
    q_tail = 1.0 - q[0] - q[1]
    want = q[0] * math.log(q[0] / p[0]) + q[1] * math.log(q[1] / p[1]) + q_tail * math.log(q_tail / 1e-6)
    for fn in (topk_distill_loss, reference):
        got = fn(logits, ids, lp, loss="reverse_kl", tail="bucket", reduction="sum")
        assert got.item() == pytest.approx(want, rel=1e-12), fn.__name__
    fwd = topk_distill_loss(logits, ids, lp, loss="forward_kl", tail="bucket", reduction="sum")
    # forward KL: the teacher's bucket contributes 1e-6 * log(1e-6 / q_tail)
    want_fwd = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1]) + 1e-6 * math.log(1e-6 / q_tail)
    assert fwd.item() == pytest.approx(want_fwd, rel=1e-12)


@pytest.mark.parametrize("loss,tail,red", GRID)
def test_all_masked_and_empty(loss, tail, red):
    n, vocab, k = 7, 30, 3
    ids, lp, _ = teacher_topk(n, vocab, k, holes=False)
    x = torch.randn(n, vocab, requires_grad=True)
    out = topk_distill_loss(x, ids, lp, torch.zeros(n, dtype=torch.bool), loss=loss, tail=tail, reduction=red)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.all(out == 0) and torch.all(g == 0)

    empty = torch.zeros(0, vocab, requires_grad=True)
    out0 = topk_distill_loss(empty, ids[:0], lp[:0], loss=loss, tail=tail, reduction=red)
    assert out0.shape == ((0,) if red == "none" else ())
    (g0,) = torch.autograd.grad(out0.sum(), empty)
    assert g0.shape == (0, vocab)
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(vocab, 8, requires_grad=True)
    out_f = fused_linear_topk_distill_loss(h, w, ids[:0], lp[:0], loss=loss, tail=tail, reduction=red)
    gh, gw = torch.autograd.grad(out_f.sum(), (h, w))
    assert gh.shape == (0, 8) and torch.all(gw == 0)


def test_unused_slots_are_ignored():
    """A row whose slots are partly -inf equals the same row with those slots removed."""
    n, vocab, k = 5, 60, 6
    ids, lp, _ = teacher_topk(n, vocab, k, holes=False)
    x = torch.randn(n, vocab, dtype=torch.float64)
    lp_holes, ids_holes = lp.clone(), ids.clone()
    lp_holes[:, 3:] = float("-inf")
    ids_holes[:, 3:] = ids[:, :1]  # padding repeats a used id
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        for tail in ("bucket", "renorm"):
            a = topk_distill_loss(x, ids_holes, lp_holes, loss=loss, tail=tail, reduction="none")
            b = topk_distill_loss(x, ids[:, :3], lp[:, :3], loss=loss, tail=tail, reduction="none")
            assert max_err(a, b) < 1e-12


def test_float_mask_weights_and_mean():
    n, vocab, k = 8, 40, 5
    ids, lp, _ = teacher_topk(n, vocab, k, holes=False)
    x = torch.randn(n, vocab, dtype=torch.float64)
    w = torch.rand(n, dtype=torch.float64)
    per_row = topk_distill_loss(x, ids, lp, reduction="none")
    assert max_err(topk_distill_loss(x, ids, lp, w, reduction="sum"), (per_row * w).sum()) < 1e-12
    assert max_err(topk_distill_loss(x, ids, lp, w, reduction="mean"), (per_row * w).sum() / w.sum()) < 1e-12


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_jsd_beta_endpoints_and_normalisation(tail):
    n, vocab, k = 12, 200, 8
    ids, lp, _ = teacher_topk(n, vocab, k, scale=2.0)
    x = torch.randn(n, vocab)
    kw = dict(tail=tail, reduction="none")
    fkl = topk_distill_loss(x, ids, lp, loss="forward_kl", **kw)
    rkl = topk_distill_loss(x, ids, lp, loss="reverse_kl", **kw)
    for norm in (False, True):
        assert torch.equal(topk_distill_loss(x, ids, lp, loss="jsd", beta=0.0, normalize_jsd=norm, **kw), fkl)
        assert torch.equal(topk_distill_loss(x, ids, lp, loss="jsd", beta=1.0, normalize_jsd=norm, **kw), rkl)
    mid = topk_distill_loss(x, ids, lp, loss="jsd", beta=0.5, **kw)
    mid_n = topk_distill_loss(x, ids, lp, loss="jsd", beta=0.5, normalize_jsd=True, **kw)
    assert max_err(mid_n, 4 * mid) < 1e-5
    assert torch.all(mid >= -1e-6) and torch.all(mid <= math.log(2) + 1e-5)  # JSD_0.5 <= log 2
    # continuity at the ends, in fp32: normalised JSD -> forward KL (beta -> 0), reverse KL (beta -> 1)
    lo = topk_distill_loss(x, ids, lp, loss="jsd", beta=1e-6, normalize_jsd=True, **kw)
    hi = topk_distill_loss(x, ids, lp, loss="jsd", beta=1 - 1e-6, normalize_jsd=True, **kw)
    assert max_err(lo, fkl) <= 1e-3 * (fkl.abs().max().item() + 1)
    assert max_err(hi, rkl) <= 1e-3 * (rkl.abs().max().item() + 1)


def test_temperature_scales_student_logits():
    n, vocab, k = 6, 80, 5
    ids, lp, _ = teacher_topk(n, vocab, k)
    x = torch.randn(n, vocab, dtype=torch.float64)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        a = topk_distill_loss(x, ids, lp, loss=loss, temperature=2.5)
        b = topk_distill_loss(x / 2.5, ids, lp, loss=loss)
        assert max_err(a, b) < 1e-12


@pytest.mark.parametrize("loss,tail,red", GRID)
def test_gradcheck_custom_functions(loss, tail, red):
    n, vocab, k, h = 4, 13, 3, 5
    ids, lp, _ = teacher_topk(n, vocab, k, holes=False)
    lp[1, 2] = float("-inf")
    mask = torch.tensor([True, True, False, True])
    kw = dict(loss=loss, tail=tail, reduction=red, beta=0.4, temperature=1.3)
    x = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: topk_distill_loss(z, ids, lp, mask, **kw), (x,))
    hid = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, h, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    f = lambda a, c, d: fused_linear_topk_distill_loss(
        a, c, ids, lp, mask, lm_head_bias=d, chunk_size=3, **kw
    )
    assert torch.autograd.gradcheck(f, (hid, w, b))


def test_token_logprobs_values_gradients_and_gradcheck():
    n, vocab, h = 11, 57, 6
    hid = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, h, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    tok = torch.randint(0, vocab, (n,))
    out = fused_linear_token_logprobs(hid, w, tok, lm_head_bias=b, temperature=0.8, chunk_size=4)
    ref = torch.log_softmax((hid @ w.t() + b) / 0.8, -1).gather(1, tok[:, None])[:, 0]
    assert max_err(out, ref) < 1e-12
    up = torch.randn(n, dtype=torch.float64)
    g = torch.autograd.grad(out, (hid, w, b), up)
    g_ref = torch.autograd.grad(ref, (hid, w, b), up)
    assert all(max_err(a, c) < 1e-12 for a, c in zip(g, g_ref, strict=True))
    f = lambda a, c, d: fused_linear_token_logprobs(a, c, tok, lm_head_bias=d, temperature=1.7, chunk_size=5)
    assert torch.autograd.gradcheck(f, (hid, w, b))


def test_sampled_reverse_kl_gradient_is_policy_gradient():
    n = 16
    logq = torch.randn(n, dtype=torch.float64, requires_grad=True)
    logmu = logq.detach() + 0.1 * torch.randn(n, dtype=torch.float64)
    logp = torch.randn(n, dtype=torch.float64)
    mask = torch.rand(n) > 0.3
    loss = sampled_reverse_kl_loss(logq, logmu, logp, mask)
    ratio = (logq.detach() - logmu).exp()
    adv = -(logmu - logp)
    assert max_err(loss, -(ratio * adv * mask).sum()) < 1e-12
    (g,) = torch.autograd.grad(loss, logq)
    assert max_err(g, -(ratio * adv * mask)) < 1e-12  # d/dlogq of -ratio*A = -ratio*A
    # on-policy: the gradient is (log q - log p) per token, the policy gradient of reverse KL
    on = sampled_reverse_kl_loss(logq, logq.detach(), logp, reduction="sum")
    (g_on,) = torch.autograd.grad(on, logq)
    assert max_err(g_on, logq.detach() - logp) < 1e-12
    # truncated importance weights
    clipped = sampled_reverse_kl_loss(logq, logmu, logp, ratio_clip=1.02, reduction="none")
    (g_c,) = torch.autograd.grad(clipped.sum(), logq)
    w = ratio.clamp(max=1.02)
    assert max_err(clipped, -w * adv) < 1e-12 and max_err(g_c, -w * adv) < 1e-12
    mean = sampled_reverse_kl_loss(logq, logmu, logp, mask, reduction="mean")
    assert max_err(mean, loss / mask.sum()) < 1e-12


@pytest.mark.parametrize(
    "mutate,match",
    [
        (
            lambda a: a.update(ids=a["ids"].clone().fill_(99)),
            r"teacher_ids\[0, 0\] = 99 is outside \[0, V=30\)",
        ),
        (lambda a: a.update(ids=a["ids"][:, :2]), "teacher_logprobs must have the shape of teacher_ids"),
        (lambda a: a.update(ids=a["ids"][:3], lp=a["lp"][:3]), r"teacher_ids must have shape \[N=5, K\]"),
        (lambda a: a.update(ids=a["ids"].float()), "teacher_ids must be int32 or int64"),
        (lambda a: a.update(mask=torch.ones(4, dtype=torch.bool)), r"mask must have shape \[N=5\]"),
        (lambda a: a.update(lp=a["lp"].abs() + 1), "teacher_logprobs must be log-probabilities"),
        (
            lambda a: a.update(kw={"loss": "reverse_kl", "tail": "none"}),
            "tail='none' defines forward_kl only",
        ),
        (lambda a: a.update(kw={"loss": "kl"}), "loss='kl' is not one of"),
        (lambda a: a.update(kw={"reduction": "avg"}), "reduction='avg' is not one of"),
        (lambda a: a.update(kw={"backend": "cuda"}), "backend='cuda' is not one of"),
        (lambda a: a.update(kw={"loss": "jsd", "beta": 1.5}), r"beta=1.5 must lie in \[0, 1\]"),
        (lambda a: a.update(kw={"temperature": 0.0}), "temperature=0.0 must be a positive"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    ids, lp, _ = teacher_topk(5, 30, 3, holes=False)
    args = {"ids": ids, "lp": lp, "mask": None, "kw": {}}
    mutate(args)
    x = torch.randn(5, 30)
    with pytest.raises(ValueError, match=match):
        topk_distill_loss(x, args["ids"], args["lp"], args["mask"], **args["kw"])


def test_duplicate_ids_and_linear_shapes_are_rejected():
    ids, lp, _ = teacher_topk(5, 30, 3, holes=False)
    dup = ids.clone()
    dup[2, 1] = dup[2, 0]
    with pytest.raises(ValueError, match="teacher_ids row 2 repeats an id"):
        topk_distill_loss(torch.randn(5, 30), dup, lp)
    with pytest.raises(ValueError, match=r"lm_head_weight must have shape \[V, H=8\]"):
        fused_linear_topk_distill_loss(torch.randn(5, 8), torch.randn(30, 7), ids, lp)
    with pytest.raises(ValueError, match=r"lm_head_bias must have shape \[V=30\]"):
        fused_linear_topk_distill_loss(
            torch.randn(5, 8), torch.randn(30, 8), ids, lp, lm_head_bias=torch.randn(3)
        )
    with pytest.raises(ValueError, match=r"token_ids\[1\] = 30 is outside"):
        fused_linear_token_logprobs(torch.randn(2, 8), torch.randn(30, 8), torch.tensor([0, 30]))


def test_retained_graph_second_backward_recomputes():
    ids, lp, _ = teacher_topk(6, 40, 4, holes=False)
    hid = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    out = fused_linear_topk_distill_loss(hid, w, ids, lp)
    first = torch.autograd.grad(out, (hid, w), torch.tensor(2.0, dtype=torch.float64), retain_graph=True)
    second = torch.autograd.grad(out, (hid, w), torch.tensor(3.0, dtype=torch.float64))
    assert all(max_err(a * 1.5, b) < 1e-12 for a, b in zip(first, second, strict=True))
