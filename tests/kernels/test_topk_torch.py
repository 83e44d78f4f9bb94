"""Torch-path vocabulary passes: the in-place logsumexp and the row max on transposed chunks."""

import pytest
import torch

from gkd.kernels.topk_torch import _exp_lse_, _row_max


@pytest.mark.parametrize("vocab,rows", [(1271, 13), (4096, 8), (17, 3), (9, 2)])
@pytest.mark.parametrize("transposed", [False, True])
def test_exp_lse_matches_logsumexp(vocab, rows, transposed):
    x = torch.randn(rows, vocab) * 4
    x[0, : vocab // 2] = float("-inf")  # a partly masked row
    x[-1] = float("-inf")  # a fully masked row (bucket tail with K = V)
    z = x.t().contiguous().t() if transposed else x.clone()
    assert torch.equal(_row_max(z), x.amax(-1, keepdim=True))
    lse, sums = _exp_lse_(z)
    ref = torch.logsumexp(x.double(), -1, keepdim=True)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double() - ref)[finite].abs().max() <= 1e-5
    soft = torch.softmax(x.double()[finite[:, 0]], -1)
    assert ((z / sums).double()[finite[:, 0]] - soft).abs().max() <= 1e-6
    assert torch.equal(z[~finite[:, 0]], torch.zeros_like(z[~finite[:, 0]]))
