"""The rollout wire format's checks on what a peer sends: every float finite (a NaN ``wait_s`` used to
spin a worker at 100 % CPU), temperatures the engines can divide by, and the request size bound."""

import math
import threading

import pytest
import torch

from gkd.rollout.service import VersionedEngine, make_handler
from gkd.rollout.types import SamplingConfig
from gkd.rollout.wire import LIMITS, pack_request, unpack_request
from gkd.services.transport.codec import ProtocolError, decode_header, encode


class _Engine:
    """Just enough engine for the handler: it never gets to generate in these tests."""

    vocab_size, max_len, policy_version = 50, 64, 0

    def generate(self, prompts, sampling, seed_offset=0):
        raise AssertionError("not reached")


def _request(**fields):
    header, tensors = pack_request([[1, 2, 3]], SamplingConfig(max_new_tokens=4), min_version=5, wait_s=1.0)
    header.update(fields)
    return header, tensors


@pytest.mark.parametrize("name", ["wait_s", "temperature", "top_p"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(name, value):
    header, tensors = _request(**{name: value})
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        unpack_request(header, tensors)


def test_a_nan_wait_is_an_error_reply_not_a_spinning_worker():
    """Before the fix, ``min(max(nan, 0), 600)`` reached ``Condition.wait_for(pred, nan)``: a busy loop."""
    handler = make_handler(VersionedEngine(_Engine()))
    header, tensors = _request(wait_s=math.nan)
    outcome = []

    def run():
        try:
            handler(header, tensors)
        except Exception as e:  # the worker turns this into a handler_error reply
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the handler is stuck waiting with a NaN timeout"
    assert isinstance(outcome[0], ValueError) and "wait_s" in str(outcome[0])
    # and on the wire the codec refuses it before any worker sees it
    with pytest.raises(ProtocolError, match="wait_s"):
        decode_header(encode("generate", 1, header, tensors), ops=("generate",), limits=LIMITS)


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0, -1e-9])
def test_temperature_must_be_finite_and_non_negative(temperature):
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=temperature)


@pytest.mark.parametrize("temperature", [0.0, 1e-12, 9.9e-6])
def test_a_tiny_temperature_is_greedy(temperature):
    """``logits / 1e-12`` is inf/NaN and reached ``multinomial`` (a device-side assert on CUDA)."""
    assert SamplingConfig(temperature=temperature).temperature == 0.0
    assert SamplingConfig(temperature=1e-5).temperature == 1e-5


def test_a_request_over_the_size_limit_is_refused_before_decoding():
    prompt = torch.zeros(LIMITS.max_message_bytes // 4, dtype=torch.int32)
    header, tensors = pack_request([prompt], SamplingConfig(max_new_tokens=1))
    with pytest.raises(ProtocolError, match="limit is"):
        decode_header(encode("generate", 1, header, tensors), ops=("generate",), limits=LIMITS)
