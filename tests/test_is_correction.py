"""``loss.is_correction``: the top-k losses weighted by the clipped ratio pi_current(y) / pi_behaviour(y)."""

import math
from types import SimpleNamespace

import pytest
import torch

from gkd.kernels import fused_linear_topk_distill_loss
from gkd.rollout.types import Sample
from gkd.teacher.types import TeacherOutput
from gkd.trainer.step import importance_weights, loss_on_micro_batch, pack_micro_batches, union_request
from tests.rollout.test_hf_engine import _tiny


def test_token_weights_are_clipped_ratios():
    logq = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    logmu = torch.tensor([-1.0, -1.0, -2.0, -3.5])
    w = importance_weights(logq, logmu, [2, 2], "token", 2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(-1.0), 2.0, math.exp(0.5)]))


def test_sequence_weights_share_one_clipped_product():
    logq = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0])
    logmu = torch.tensor([-1.0, -1.0, -2.0, -3.5, -1.2])
    w = importance_weights(logq, logmu, [2, 3], "sequence", 2.0)
    first = math.exp(-1.0)  # 0 + (-1)
    torch.testing.assert_close(w, torch.tensor([first, first, 2.0, 2.0, 2.0]))  # e^(1.5 + 0.5 + 0.2) > 2
    long = importance_weights(torch.zeros(4000), torch.full((4000,), -1.0), [4000], "sequence", 3.0)
    assert torch.isfinite(long).all() and torch.allclose(long, torch.full((4000,), 3.0))  # no overflow


def _batch(k=5, m=3):
    g = torch.Generator().manual_seed(1)
    samples, outs = [], []
    for p, r in ((4, 6), (3, 5)):
        resp = torch.randint(0, 320, (r,), generator=g).tolist()
        samples.append(
            Sample(
                torch.randint(0, 320, (p,), generator=g).tolist(),
                resp,
                -torch.rand(r, generator=g) * 4,
                "length",
                0,
                topk_ids=torch.randint(0, 320, (r, m), generator=g).int(),
            )
        )
        lp = torch.log_softmax(torch.randn(r, 320, generator=g) * 3, -1)
        top = lp.topk(k, -1)
        outs.append(
            TeacherOutput(top.indices.int(), top.values, lp.gather(1, torch.tensor(resp)[:, None])[:, 0])
        )
    return samples, outs


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_the_loss_is_the_weighted_sum_of_per_token_losses(mode):
    model = _tiny()
    samples, outs = _batch()
    (mb,) = pack_micro_batches(samples, outs, 4096)
    cfg = SimpleNamespace(name="reverse_kl", tail="bucket", beta=0.5, temperature=1.0)
    plain, _ = loss_on_micro_batch(model, mb, SimpleNamespace(**vars(cfg), is_correction="none"))
    weighted, _ = loss_on_micro_batch(
        model, mb, SimpleNamespace(**vars(cfg), is_correction=mode, is_clip=1.5), behaviour_temperature=0.8
    )
    with torch.no_grad():
        out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-1][mb.rows, mb.cols]
        logq = torch.log_softmax(out.logits[mb.rows, mb.cols].float() / 0.8, -1)
        logq = logq.gather(1, mb.target_ids[:, None])[:, 0]
        per_token = fused_linear_topk_distill_loss(
            hidden,
            model.lm_head.weight,
            mb.teacher_ids,
            mb.teacher_logprobs,
            loss="reverse_kl",
            reduction="none",
        )
    w = importance_weights(logq, mb.rollout_logprobs, mb.response_lens, mode, 1.5)
    assert not torch.allclose(w, torch.ones_like(w))  # the weighting is not trivial here
    torch.testing.assert_close(weighted.detach(), (w * per_token).sum(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain.detach(), per_token.sum(), atol=1e-4, rtol=1e-4)


def test_union_request_is_top_m_plus_the_sampled_token():
    samples, _ = _batch(m=3)
    req = union_request(samples)
    assert [tuple(t.shape) for t in req] == [(6, 4), (5, 4)] and req[0].dtype == torch.int32
    assert req[1][:, 3].tolist() == samples[1].response_ids and torch.equal(
        req[1][:, :3], samples[1].topk_ids
    )
    samples[0].topk_ids = None
    with pytest.raises(ValueError, match="rollout.return_topk"):
        union_request(samples)
