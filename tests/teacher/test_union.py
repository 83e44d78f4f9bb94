"""The union support: the teacher scores its own top-k plus ids the request names (the student's top-m and
the sampled token), deduplicated and padded to a fixed width, exactly (the transformers engine)."""

import pytest
import torch

from gkd.services.transport.codec import decode, encode
from gkd.teacher.hf_engine import HFTeacherEngine
from gkd.teacher.types import union_rows
from gkd.teacher.wire import OP_SCORE, REPLY_LIMITS, make_handler, pack_request, unpack_reply
from tests.teacher.conftest import VOCAB, random_sequences


def test_union_rows_dedup_order_and_padding():
    logp = torch.log_softmax(torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]), -1)  # top-2 = ids 0, 1
    requested = torch.tensor([[1, 4, 4, 2]])  # 1 is in the top-2, 4 is repeated
    ids, lps = union_rows(logp, 2, requested)
    assert ids.dtype == torch.int32 and ids.shape == (1, 6)  # K + M slots, whatever the duplicates
    assert ids[0, :4].tolist() == [0, 1, 4, 2]  # the top-k first, then new ids in the request's order
    torch.testing.assert_close(lps[0, :4], logp[0, [0, 1, 4, 2]])
    assert ids[0, 4:].tolist() == [0, 0] and torch.isinf(lps[0, 4:]).all() and (lps[0, 4:] < 0).all()


def test_union_rows_width_is_capped_by_the_vocabulary():
    logp = torch.log_softmax(torch.randn(3, 5), -1)
    ids, lps = union_rows(logp, 4, torch.tensor([[0, 1, 2], [4, 4, 4], [3, 2, 1]]))
    assert ids.shape == (3, 5)
    for row_ids, row_lp in zip(ids, lps, strict=True):
        used = row_ids[row_lp > float("-inf")]
        assert used.unique().numel() == used.numel()  # no id twice among the used slots


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFTeacherEngine.from_pretrained(tiny_model_dir, max_top_k=16, max_batch_tokens=64)


def _requested(seqs, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (len(r), m), generator=g) for _, r in seqs]


def test_hf_engine_union_is_exact_against_full_logits(engine):
    seqs, k, m = random_sequences(5, seed=3), 8, 5
    wanted = _requested(seqs, m)
    outs = engine.score(seqs, k, 0.7, requested_ids=wanted)
    plain = engine.score(seqs, k, 0.7)
    model = engine.model
    for (prompt, response), out, base, req in zip(seqs, outs, plain, wanted, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].float() / 0.7
        full = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) + len(response) - 1]  # [R, V]
        assert out.support == "union" and out.topk_ids.shape == (len(response), k + m)
        assert torch.equal(out.topk_ids[:, :k], base.topk_ids)  # the top-k part is unchanged
        used = out.topk_logprobs > float("-inf")
        for j in range(len(response)):
            row = out.topk_ids[j][used[j]].long()
            assert set(row.tolist()) == set(base.topk_ids[j].tolist()) | set(req[j].tolist())
            torch.testing.assert_close(out.topk_logprobs[j][used[j]], full[j, row], atol=1e-5, rtol=0)


def test_requested_ids_round_trip_through_the_handler(engine):
    seqs, k, m = random_sequences(3, seed=4), 4, 3
    wanted = _requested(seqs, m, seed=1)
    handle = make_handler(engine, default_top_k=k, logprob_dtype="float16")
    fields, tensors = pack_request(seqs, k, 1.0, requested_ids=wanted)
    assert tensors["requested_ids"].dtype == torch.int32 and tensors["requested_ids"].shape[1] == m
    reply_fields, reply = handle(fields, tensors)
    msg = decode(encode(OP_SCORE, 1, reply_fields, reply), ops=[OP_SCORE], limits=REPLY_LIMITS)
    outs = unpack_reply(msg, tensors["response_lens"], top_k=k, requested=m)
    want = engine.score(seqs, k, 1.0, requested_ids=wanted)
    for got, ref in zip(outs, want, strict=True):
        assert got.support == "union" and torch.equal(got.topk_ids, ref.topk_ids)
        assert got.topk_logprobs.dtype == torch.float16
        torch.testing.assert_close(got.topk_logprobs.float(), ref.topk_logprobs, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda w: [w[0][:, :2], *w[1:]], "needs the same number"),
        (lambda w: [w[0].clamp(max=VOCAB) + VOCAB, *w[1:]], "outside the vocabulary"),
        (lambda w: [w[0][:-1], *w[1:]], "requested ids"),
    ],
)
def test_bad_requested_ids_are_one_clear_error(engine, bad, message):
    seqs = random_sequences(2, seed=5)
    with pytest.raises(ValueError, match=message):
        engine.score(seqs, 4, 1.0, requested_ids=bad(_requested(seqs, 3)))
