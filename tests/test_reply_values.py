"""Value checks on decoded replies (gkd.services.values): every score, teacher-generate and rollout reply is
refused, naming the worker that sent it, when a log-prob is NaN, +inf or > 0 (-inf only in top-k slots),
an id lies outside [0, V) or the top-k columns are not the ones asked for; workers refuse to send
non-finite log-probs at all (an error reply naming the worker instead)."""

from __future__ import annotations

import math

import pytest
import torch

from gkd.rollout.types import Sample
from gkd.rollout.wire import REPLY_LIMITS as ROLLOUT_REPLY_LIMITS
from gkd.rollout.wire import pack_reply
from gkd.rollout.wire import unpack_reply as unpack_rollout
from gkd.services.transport.codec import decode, encode
from gkd.services.values import BadValues, worker_label
from gkd.teacher.generate_wire import OP_GENERATE, generate_reply, unpack_generate_reply
from gkd.teacher.types import TeacherAnswer, TeacherOutput
from gkd.teacher.wire import OP_SCORE, REPLY_LIMITS, make_handler, pack_request, unpack_reply

V, K = 50, 4
LENS = torch.tensor([3, 2], dtype=torch.int32)


def _rows(n: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g)
    lp = logits.log_softmax(-1)
    top_lp, top_ids = lp.topk(width, -1)
    return top_ids.to(torch.int32), top_lp, lp[:, 7].contiguous()


def _score_msg(width: int = K, support: str = "topk", top_k: int = K, edit=None):
    ids, lp, tok = _rows(int(LENS.sum()), width)
    tensors = {"topk_ids": ids, "topk_logprobs": lp, "token_logprobs": tok, "response_lens": LENS.clone()}
    if edit is not None:
        edit(tensors)
    fields = {"top_k": top_k, "temperature": 1.0, "support": support, "worker": "node7 pid 42"}
    return decode(encode(OP_SCORE, 1, fields, tensors), ops=[OP_SCORE], limits=REPLY_LIMITS)


def _set(name: str, index: tuple, value: float):
    def edit(t):
        t[name][index] = value

    return edit


def test_a_clean_reply_passes():
    outs = unpack_reply(_score_msg(), LENS, top_k=K, vocab_size=V)
    assert [o.num_tokens for o in outs] == [3, 2]


@pytest.mark.parametrize(
    "name, index, value",
    [
        ("topk_logprobs", (4, 1), math.nan),
        ("topk_logprobs", (0, 0), math.inf),
        ("topk_logprobs", (2, 3), 0.5),
        ("token_logprobs", (1,), math.nan),
        ("token_logprobs", (3,), -math.inf),
        ("token_logprobs", (0,), 0.3),
    ],
)
def test_bad_logprobs_are_refused_naming_the_worker(name, index, value):
    with pytest.raises(BadValues, match=rf"teacher worker node7 pid 42: {name} has 1 .*row {index[0]}"):
        unpack_reply(_score_msg(edit=_set(name, index, value)), LENS, top_k=K, vocab_size=V)


def test_minus_inf_is_a_valid_topk_slot():
    outs = unpack_reply(
        _score_msg(edit=_set("topk_logprobs", (1, 3), -math.inf)), LENS, top_k=K, vocab_size=V
    )
    assert outs[0].topk_logprobs[1, 3] == -math.inf


@pytest.mark.parametrize("value", [V, 1 << 20, -1])
def test_ids_outside_the_vocabulary_are_refused(value):
    with pytest.raises(BadValues, match=rf"node7 pid 42: topk_ids .* \(token ids must be in \[0, {V}\)\)"):
        unpack_reply(_score_msg(edit=_set("topk_ids", (2, 0), value)), LENS, top_k=K, vocab_size=V)


def test_a_reply_without_a_worker_name_still_says_which_service():
    msg = _score_msg(edit=_set("topk_logprobs", (0, 0), math.nan))
    del msg.header["worker"]
    with pytest.raises(BadValues, match="an unnamed teacher worker: topk_logprobs"):
        unpack_reply(msg, LENS, top_k=K, vocab_size=V)


@pytest.mark.parametrize(
    "width, support, top_k, asked, requested, message",
    [
        (K - 1, "topk", K, K, 0, "3 columns per row where top_k=4 and 0 requested id\\(s\\)"),
        (K + 2, "topk", K, K, 3, "6 columns .* give 7"),  # vLLM-style top-W must be K + M
        (K + 4, "union", K, K, 3, "8 columns .* give 4..7"),
        (K, "topk", K, 8, 0, "applied top_k=4 but 8 was asked for"),
    ],
)
def test_columns_other_than_asked_are_refused(width, support, top_k, asked, requested, message):
    with pytest.raises(BadValues, match=message):
        unpack_reply(_score_msg(width, support, top_k), LENS, top_k=asked, requested=requested, vocab_size=V)


def test_columns_as_asked_pass():
    unpack_reply(_score_msg(K + 3, "topk"), LENS, top_k=K, requested=3, vocab_size=V)
    unpack_reply(_score_msg(K + 2, "union"), LENS, top_k=None, requested=3, vocab_size=V)


# ------------------------------------------------------------------------------------ teacher generate


def _answers(n: int = 2, response=(3, 9, 11), nan: bool = False) -> list[TeacherAnswer]:
    out = []
    for i in range(n):
        ids, lp, tok = _rows(len(response), K, seed=i)
        if nan:
            lp[0, 0] = math.nan
        out.append(TeacherAnswer(list(response), "length", TeacherOutput(ids, lp, tok)))
    return out


def _generate_msg(answers):
    fields = {"top_k": K, "temperature": 1.0, "support": "topk", "worker": "node3 pid 9"}
    tensors = generate_reply(answers, K, torch.float32)
    return decode(encode(OP_GENERATE, 1, fields, tensors), ops=[OP_GENERATE], limits=REPLY_LIMITS)


def test_generate_reply_answer_ids_outside_the_vocabulary_are_refused():
    ok = unpack_generate_reply(_generate_msg(_answers()), 2, 8, top_k=K, vocab_size=V)
    assert [a.response_ids for a in ok] == [[3, 9, 11]] * 2
    with pytest.raises(BadValues, match=rf"teacher worker node3 pid 9: response_ids .* \[0, {V}\)"):
        unpack_generate_reply(_generate_msg(_answers(response=(3, V, 1))), 2, 8, top_k=K, vocab_size=V)


def test_generate_reply_nan_logprobs_are_refused():
    with pytest.raises(BadValues, match="teacher worker node3 pid 9: topk_logprobs has 2 non-finite"):
        unpack_generate_reply(_generate_msg(_answers(nan=True)), 2, 8, top_k=K, vocab_size=V)


# ------------------------------------------------------------------------------------ rollout


def _samples(n: int = 2, topk: int | None = None) -> list[Sample]:
    out = []
    for i in range(n):
        lp = torch.tensor([-0.5, -1.25, -3.0])
        s = Sample([1, 2], [4, 5, 6 + i], lp, "length", 3)
        if topk is not None:
            s.topk_ids = torch.arange(3 * topk, dtype=torch.int32).reshape(3, topk) % V
        out.append(s)
    return out


def _rollout_msg(samples, edit=None):
    fields, tensors = pack_reply(samples, 3)
    if edit is not None:
        edit(tensors)
    return decode(encode("generate", 1, fields, tensors), ops=["generate"], limits=ROLLOUT_REPLY_LIMITS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.2])
def test_rollout_bad_logprobs_are_refused_naming_the_worker(value):
    msg = _rollout_msg(_samples(), _set("response_logprobs", (4,), value))
    with pytest.raises(BadValues, match=f"rollout worker {worker_label()}: response_logprobs has 1 .* row 4"):
        unpack_rollout(msg, [[1, 2]] * 2, return_topk=0, vocab_size=V)


def test_rollout_ids_outside_the_vocabulary_are_refused():
    msg = _rollout_msg(_samples(), _set("response_ids", (2,), V + 5))
    with pytest.raises(BadValues, match=rf"response_ids has 1 out-of-range value\(s\), the first {V + 5}"):
        unpack_rollout(msg, [[1, 2]] * 2, return_topk=0, vocab_size=V)
    msg = _rollout_msg(_samples(topk=2), _set("topk_ids", (1, 1), -3))
    with pytest.raises(BadValues, match="topk_ids has 1 out-of-range"):
        unpack_rollout(msg, [[1, 2]] * 2, return_topk=2, vocab_size=V)


@pytest.mark.parametrize("sent, asked", [(None, 2), (2, 0), (3, 2)])
def test_rollout_topk_columns_other_than_asked_are_refused(sent, asked):
    msg = _rollout_msg(_samples(topk=sent))
    with pytest.raises(BadValues, match=f"top-k column\\(s\\) per token but return_topk={asked}"):
        unpack_rollout(msg, [[1, 2]] * 2, return_topk=asked, vocab_size=V)
    assert (
        len(unpack_rollout(_rollout_msg(_samples(topk=asked or None)), [[1, 2]] * 2, return_topk=asked)) == 2
    )


# ------------------------------------------------------------------------------------ worker side


class _NaNTeacher:
    """Scores like a teacher whose weights are NaN."""

    def score(self, sequences, top_k, temperature, requested=None, index_offset=0):
        return [
            TeacherOutput(
                torch.zeros(len(r), top_k, dtype=torch.int32),
                torch.full((len(r), top_k), math.nan),
                torch.full((len(r),), math.nan),
            )
            for _, r in sequences
        ]


def test_a_teacher_worker_refuses_to_send_nan_logprobs():
    handle = make_handler(_NaNTeacher(), default_top_k=K, logprob_dtype="float16")
    fields, tensors = pack_request([([1, 2], [3, 4])], K, 1.0)
    with pytest.raises(ValueError, match=f"teacher worker {worker_label()} refuses to send its reply"):
        handle(fields, tensors)


def test_a_rollout_worker_refuses_to_send_nan_logprobs():
    samples = _samples()
    samples[1].response_logprobs[0] = math.nan
    with pytest.raises(
        ValueError, match=f"rollout worker {worker_label()} refuses to send .*response_logprobs"
    ):
        pack_reply(samples, 3)


def test_replies_name_their_worker():
    fields, _ = pack_reply(_samples(), 3)
    assert fields["worker"] == worker_label()


# ------------------------------------------------------------------------------------ through a service


class _OutOfVocabTeacher:
    """Finite log-probs (the worker sends them) but top-k ids past the student's vocabulary."""

    def score(self, sequences, top_k, temperature, requested=None, index_offset=0):
        outs = []
        for _, r in sequences:
            ids, lp, tok = _rows(len(r), top_k)
            outs.append(TeacherOutput(ids + V, lp, tok))
        return outs


def test_a_teacher_client_refuses_a_reply_naming_the_worker_that_sent_it():
    from gkd.services.transport.worker import Worker
    from gkd.teacher.client import TeacherClient
    from gkd.teacher.service import make_broker
    from gkd.teacher.wire import LIMITS, OPS
    from tests.transport.helpers import FAST, ServiceThreads

    broker = make_broker(host="127.0.0.1", port=0, backend_port=0, **FAST).start()
    handler = make_handler(_OutOfVocabTeacher(), default_top_k=K, logprob_dtype="float32")
    worker = Worker(broker.backend_address, handler, ops=OPS, limits=LIMITS, **FAST).start()
    svc = ServiceThreads(broker, [worker], TeacherClient)
    try:
        client = svc.client()
        assert len(client.submit([([1, 2], [3, 4, 5])], top_k=K).result(timeout=30)) == 1  # ids >= 0 only
        client.vocab_size = V  # what the trainer sets once it has checked the services
        with pytest.raises(BadValues, match=f"teacher worker {worker_label()}: topk_ids has 12 out-of-range"):
            client.submit([([1, 2], [3, 4, 5])], top_k=K).result(timeout=30)
    finally:
        svc.close()
