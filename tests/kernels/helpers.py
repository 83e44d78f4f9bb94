"""Shared builders for the loss tests: teacher top-k data and the full loss/tail/reduction grid."""

import itertools

import torch

GRID = [
    (loss, tail, red)
    for loss, tail, red in itertools.product(
        ("forward_kl", "reverse_kl", "jsd"), ("bucket", "renorm", "none"), ("sum", "mean", "none")
    )
    if tail != "none" or loss == "forward_kl"
]


def teacher_topk(n, vocab, k, *, scale=3.0, holes=True, seed=0):
    """Teacher top-k ids [N, K] int64 and log-probs [N, K] float64 from a random full distribution.

    With ``holes``, some rows have -inf (unused) slots and one row has none used at all.
    """
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, dim=-1)
    lp, ids = logp.topk(k, dim=-1)
    if holes and n >= 6:
        lp[1, k // 2 :] = float("-inf")
        ids[1, k // 2 :] = 0  # padding ids may collide with used ids: they must be ignored
        lp[4, :] = float("-inf")
    return ids, lp, logp


def rand_mask(n, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.rand(n, generator=g) > 0.25
    if n >= 3:
        m[2] = False
    return m


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
