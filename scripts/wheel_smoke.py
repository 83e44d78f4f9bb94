"""Smoke test of an installed gkd (scripts/check_wheel.sh runs it in a clean venv, outside the tree).

The fused loss from hidden states must equal the loss on explicit logits, gradients included; the
extension's CRC must equal zlib's. Exits non-zero with one line naming what is wrong.
"""

import os
import sys
import zlib
from pathlib import Path

import torch


def main() -> int:
    import gkd
    from gkd.kernels import fused_linear_topk_distill_loss, topk_distill_loss
    from gkd.weights import native as _ext

    where = Path(gkd.__file__).resolve().parent
    if "site-packages" not in where.parts:
        print(f"wheel_smoke: gkd was imported from {where}, not from an installed wheel", file=sys.stderr)
        return 1
    if os.environ.get("GKD_SMOKE_REQUIRE_EXT") == "1" and not _ext.HAS_EXT:
        print(f"wheel_smoke: the wheel has no compiled extension: {_ext.EXT_ERROR}", file=sys.stderr)
        return 1

    g = torch.Generator().manual_seed(0)
    n, h, v, k = 37, 16, 101, 5
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logprobs = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1) - 0.1
    mask = torch.rand(n, generator=g) > 0.2

    fused = fused_linear_topk_distill_loss(hidden, weight, ids, logprobs, mask, loss="forward_kl")
    fused.backward()
    got = (fused.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad, weight.grad = None, None
    plain = topk_distill_loss(hidden @ weight.T, ids, logprobs, mask, loss="forward_kl")
    plain.backward()
    want = (plain.detach(), hidden.grad, weight.grad)
    for name, a, b in zip(("loss", "hidden grad", "weight grad"), got, want, strict=True):
        if not torch.allclose(a, b, rtol=1e-9, atol=1e-12):
            print(f"wheel_smoke: fused {name} differs from the explicit-logits {name}", file=sys.stderr)
            return 1

    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=g)
    if _ext.checksum(data) != zlib.crc32(data.numpy()):
        print("wheel_smoke: gkd.weights.native.checksum differs from zlib.crc32", file=sys.stderr)
        return 1
    print(f"wheel_smoke: OK (gkd from {where}, HAS_EXT={_ext.HAS_EXT}, loss={fused.item():.6f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
