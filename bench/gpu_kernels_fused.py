"""The fused section of bench/gpu_kernels.py: the fused lm_head loss (gkd's variants, a naive
full-logits loss, Liger-Kernel) timed and its extra peak memory measured, beside its modelled peak; the
weight-gradient accumulators' CUDA checks; no host sync in a step."""

from __future__ import annotations

import math

from gpu_kernels_util import Skip, _sync, extra_peak_bytes, median_seconds, normwise

TARGETS = {"fused_speedup_vs_liger": 1.5, "fused_peak_ratio_vs_liger": 1.0}


def fused_inputs(dev, n, h, vocab, k):
    import torch

    gen = torch.Generator(device=dev).manual_seed(5)
    hidden = torch.randn(n, h, device=dev, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(vocab, h, device=dev, generator=gen) / h**0.5).to(torch.bfloat16)
    # distinct ids per row, drawn 2048 rows at a time (a [N, V] random matrix would be 10 GB)
    blocks = [torch.rand(min(2048, n - i), vocab, device=dev, generator=gen) for i in range(0, n, 2048)]
    ids = torch.cat([b.topk(k, dim=-1).indices for b in blocks])
    lp = torch.log_softmax(torch.randn(n, k, device=dev, generator=gen) * 2, -1) + math.log(0.9)
    return hidden, weight, ids, lp


def fused_variants(dev, hidden, weight, ids, lp):
    """name -> (leaves needing grad, loss function of them, the fused call's keywords or None)."""
    import torch

    from gkd.kernels import fused_linear_topk_distill_loss

    n = hidden.shape[0]

    def gkd(backend, **kw):
        return lambda h, w: fused_linear_topk_distill_loss(
            h, w, ids, lp, backend=backend, reduction="mean", check_inputs=False, **kw
        )

    def naive(h, w):  # full logits, torch log_softmax, the same value as tail="none"
        logq = torch.log_softmax((h @ w.t()).float(), dim=-1)
        return (lp.exp() * (lp - logq.gather(1, ids))).sum() / n

    variants = {
        "gkd_triton": ((hidden, weight), "triton", {}),
        "gkd_triton_fp32_master": ((hidden, weight.float()), "triton", {"compute_dtype": torch.bfloat16}),
        # the memory / time trade-off of chunk_bytes, and the former default's 4096-row chunks
        "gkd_triton_chunk_320MiB": ((hidden, weight), "triton", {"chunk_bytes": 320 << 20}),
        "gkd_triton_4096_rows": ((hidden, weight), "triton", {"chunk_size": 4096}),
        "gkd_torch": ((hidden, weight), "torch", {}),
    }
    out = {
        name: (leaves, gkd(backend, **kw), (backend, kw)) for name, (leaves, backend, kw) in variants.items()
    }
    out["naive"] = ((hidden, weight), naive, None)
    return out


def modelled_peak(dev, leaves, backend, kw) -> dict:
    """Rows per chunk and the extra peak gkd.kernels.memory models for a gkd variant."""
    import torch

    from gkd.kernels.memory import FusedShape, extra_peak_bytes, fused_chunk_rows

    hidden, weight = (t.detach().requires_grad_() for t in leaves)
    cdt = kw.get("compute_dtype") or hidden.dtype
    shape = FusedShape.of(hidden, weight, None, cdt, f"topk_{backend}")
    rows = fused_chunk_rows(shape, torch.device(dev), kw.get("chunk_size"), kw.get("chunk_bytes"))
    return {"rows": min(rows, shape.n), "modelled_extra_GiB": extra_peak_bytes(shape, rows) / 2**30}


def fused_step(leaves, fn):
    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward()

    return step


def fused_case(dev, leaves, fn, iters, warmup=1, call=None):
    import torch

    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    step = fused_step(leaves, fn)
    t = median_seconds(step, dev, iters, warmup)
    peak = extra_peak_bytes(step, dev)
    if not all(torch.isfinite(x.grad).all() for x in leaves):
        raise AssertionError("non-finite gradient")
    res = {"ms": t * 1e3, "extra_peak_GiB": None if peak is None else peak / 2**30}
    if call is not None:
        res.update(modelled_peak(dev, leaves, *call))
        if peak is not None:
            res["model_ratio"] = res["extra_peak_GiB"] / res["modelled_extra_GiB"]
    return res


def liger_case(dev, hidden, weight, iters):
    import torch

    if dev.type != "cuda":
        raise Skip("Liger's comparison runs on CUDA only (smoke run)")
    try:
        import inspect
        from importlib.metadata import version

        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.chunked_loss import jsd_loss as liger_jsd
    except ImportError as e:
        raise Skip(f"liger_kernel not importable: {e}") from None
    src = inspect.getsource(liger_jsd.LigerFusedLinearJSDFunction.distillation_loss_fn)
    meaning = (
        "forward KL(teacher || student) over the full vocabulary"
        if "beta == 0" in src
        else "KL(student || teacher) over the full vocabulary (this version's beta=0 convention)"
    )
    # the student part is gkd's; the teacher's full logits come from its own lm_head inside Liger's
    # chunk loop (an extra [N, H] x [H, V] GEMM per chunk): what one runs without served top-k
    gen = torch.Generator(device=dev).manual_seed(9)
    t_hidden = torch.randn(hidden.shape, device=dev, generator=gen).to(hidden.dtype)
    t_weight = (torch.randn(weight.shape, device=dev, generator=gen) / weight.shape[1] ** 0.5).to(
        weight.dtype
    )
    labels = torch.randint(0, weight.shape[0], (hidden.shape[0],), device=dev, generator=gen)
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=True)
    fn = lambda h, w: loss(h, w, t_hidden, t_weight, labels, None, None)  # noqa: E731
    res = fused_case(dev, (hidden, weight), fn, iters, warmup=2)  # warm-up includes torch.compile
    return {
        **res,
        "liger_version": version("liger-kernel"),
        "liger_beta0": meaning,
        "comparison": "gkd: forward KL on the teacher's served top-64 + tail bucket; Liger: "
        "LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta=0, compiled=True) = "
        f"{meaning}, "
        "teacher logits from a teacher lm_head of the same shape; both bf16, mean over tokens",
    }


def no_sync_case(dev, hidden, weight, ids, lp):
    import torch

    from gkd.kernels import fused_linear_topk_distill_loss

    if dev.type != "cuda":
        raise Skip("torch.cuda.set_sync_debug_mode needs CUDA")
    leaves = [hidden.detach().clone().requires_grad_(), weight.float().requires_grad_()]
    fn = lambda h, w: fused_linear_topk_distill_loss(  # noqa: E731
        h, w, ids, lp, backend="triton", reduction="mean", check_inputs=False, compute_dtype=torch.bfloat16
    )
    step = fused_step(leaves, fn)
    step()  # compile first: only the steady state counts
    _sync(dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _sync(dev)
    return {"host_syncs": 0}


def wide_addmm_case(dev):
    import torch

    if dev.type != "cuda":
        raise Skip("the fp32-output addmm is a CUDA op")
    a = torch.randn(64, 32, device=dev).to(torch.bfloat16)
    b = torch.randn(32, 48, device=dev).to(torch.bfloat16)
    acc = torch.ones(64, 48, device=dev)
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError) as e:
        return {"fp32_output_addmm": False, "note": f"fallback (bf16 product buffer) in use: {str(e)[:200]}"}
    err = normwise(acc, 1 + a.double() @ b.double())
    return {"fp32_output_addmm": True, "err": err, "status": "PASS" if err < 1e-5 else "FAIL"}


def pair_accumulator_case(dev):
    """The pair accumulator's Triton pass against its torch ops (bit for bit: both round to nearest
    even), and its sum of 8 chunk products of a [4096, 1024] gradient against fp32 accumulation."""
    import torch

    from gkd.kernels import grad_accumulate

    if dev.type != "cuda":
        raise Skip("the Triton pass runs on CUDA tensors here (the CPU tests run it in the interpreter)")
    gen = torch.Generator(device=dev).manual_seed(3)
    n = 1 << 22
    hi = torch.randn(n, device=dev, generator=gen).bfloat16()
    lo = (torch.randn(n, device=dev, generator=gen) * 1e-3).bfloat16()
    prod = torch.randn(n, device=dev, generator=gen) * 10
    hi_t, lo_t = hi.clone(), lo.clone()
    grad_accumulate.pair_add_(hi_t, lo_t, prod.clone())
    grad_accumulate.pair_add_torch_(hi, lo, prod.clone())
    bitwise = bool(torch.equal(hi_t, hi) and torch.equal(lo_t, lo))
    parts = [
        (torch.randn(4096, 512, device=dev, generator=gen).bfloat16(),
         torch.randn(512, 1024, device=dev, generator=gen).bfloat16())
        for _ in range(8)
    ]  # fmt: skip
    acc = grad_accumulate._PairAccumulator(torch.zeros(4096, 1024, device=dev, dtype=torch.bfloat16), 8)
    wide = torch.zeros(4096, 1024, device=dev)
    for a, b in parts:
        acc.add(a, b)
        wide += a.float() @ b.float()
    got = acc.result()
    mismatch = (got != wide.bfloat16()).double().mean().item()
    ok = bitwise and mismatch < 0.01
    return {"bitwise_vs_torch": bitwise, "fraction_differing_from_fp32_sum": mismatch,
            "status": "PASS" if ok else "FAIL"}  # fmt: skip


def versus_liger(ours: dict, liger: dict) -> dict:
    if liger["status"] != "PASS" or ours["status"] != "PASS":
        raise Skip("gkd's or Liger's row did not pass")
    speedup = liger["ms"] / ours["ms"]
    peak = ours["extra_peak_GiB"] / liger["extra_peak_GiB"]
    ok = speedup >= TARGETS["fused_speedup_vs_liger"] and peak <= TARGETS["fused_peak_ratio_vs_liger"]
    return {"speedup": speedup, "peak_ratio": peak, "status": "PASS" if ok else "FAIL"}
