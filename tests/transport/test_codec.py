"""Codec: encode->decode identity, zero-copy, validation of every peer-controlled field, and a property
test that no mutation of a valid message makes ``decode`` raise anything but ``ProtocolError``."""

import math
import os

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gkd.services.transport.codec import (
    DTYPES,
    PROTOCOL_VERSION,
    Limits,
    ProtocolError,
    decode,
    encode,
    error_frames,
    peek_id,
)

OPS = ("score", "echo")


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a, b) -> bool:
    """Equal headers and bit-identical tensors (NaN-safe)."""
    return (
        msgpack.packb(a.header) == msgpack.packb(b.header)  # bytewise, so NaN fields compare equal
        and list(a.tensors) == list(b.tensors)
        and all(
            a.tensors[k].dtype == b.tensors[k].dtype
            and a.tensors[k].shape == b.tensors[k].shape
            and _raw(a.tensors[k]) == _raw(b.tensors[k])
            for k in a.tensors
        )
    )


def _frames_bytes(frames):
    return [bytes(f) for f in frames]


# --------------------------------------------------------------------------------------------- examples


def test_roundtrip_all_dtypes_and_fields():
    tensors = {f"t_{name}": torch.arange(12).reshape(3, 4).to(td) for name, (td, _) in DTYPES.items()}
    tensors["empty"] = torch.empty(0, 5, dtype=torch.float32)
    tensors["scalar"] = torch.tensor(3.5)
    fields = {"top_k": 64, "temperature": 0.7, "names": ["a", "b"], "nested": {"x": [1, None, True]}}
    msg = decode(encode("score", 17, fields, tensors), ops=OPS)
    assert msg.op == "score" and msg.id == 17 and msg.fields == fields
    assert msg.header["v"] == PROTOCOL_VERSION
    assert list(msg.tensors) == list(tensors)
    for name, t in tensors.items():
        assert msg.tensors[name].dtype == t.dtype and msg.tensors[name].shape == t.shape
        assert torch.equal(msg.tensors[name], t)


def test_numpy_input_and_noncontiguous_input():
    a = np.arange(20, dtype=np.int32).reshape(4, 5)
    t = torch.arange(20, dtype=torch.float32).reshape(4, 5).t()  # strided view
    msg = decode(encode("echo", "x", None, {"a": a, "t": t}), ops=OPS)
    assert torch.equal(msg.tensors["a"], torch.from_numpy(a))
    assert torch.equal(msg.tensors["t"], t)


def test_send_is_zero_copy_and_receive_aliases_frame():
    t = torch.arange(1 << 16, dtype=torch.float32)
    frames = encode("echo", 1, None, {"t": t})
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.asarray(frames[1]), t.numpy())  # no copy on send
    buf = bytearray(frames[1])
    msg = decode([frames[0], buf], ops=OPS)
    buf[0:4] = np.float32(42.0).tobytes()  # the decoded tensor is a view of the received frame
    assert msg.tensors["t"][0].item() == 42.0


def test_misaligned_frame_is_copied_not_rejected():
    payload = bytearray(b"\0" + np.arange(4, dtype=np.float64).tobytes())
    frames = encode("echo", 1, None, {"t": torch.arange(4, dtype=torch.float64)})
    msg = decode([frames[0], memoryview(payload)[1:]], ops=OPS)
    assert msg.tensors["t"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_encode_rejects_caller_mistakes():
    with pytest.raises(ValueError, match="reserved"):
        encode("echo", 1, {"tensors": 1})
    with pytest.raises(ValueError, match="not sendable"):
        encode("echo", 1, None, {"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="numpy"):
        encode("echo", 1, None, {"x": [1, 2]})


def _with_header(frames, **changes):
    header = msgpack.unpackb(frames[0], raw=False)
    header.update(changes)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda f: _with_header(f, v=PROTOCOL_VERSION + 1), "protocol version 2"),
        (lambda f: _with_header(f, v=True), "protocol version True"),
        (lambda f: _with_header(f, op="rm -rf"), "op 'rm -rf' is not accepted"),
        (lambda f: _with_header(f, id=[1]), "'id' must be"),
        (lambda f: _with_header(f, tensors={}), "'tensors' must be a list"),
        (
            lambda f: _with_header(f, tensors=[{"name": "x", "dtype": "object", "shape": [2]}]),
            "dtype 'object'",
        ),
        (
            lambda f: _with_header(f, tensors=[{"name": "x", "dtype": "int32", "shape": [2**62, 2**62]}]),
            "has a dim that is not an int",
        ),
        (
            lambda f: _with_header(f, tensors=[{"name": "x", "dtype": "int32", "shape": [3, 1]}]),
            "needs 12 bytes but its frame has 8",
        ),
        (lambda f: _with_header(f, tensors=[{"name": "x", "dtype": "int32", "shape": [-2]}]), "has a dim"),
        (lambda f: _with_header(f, tensors=[{"name": "x", "dtype": "int32"}]), "exactly name, dtype, shape"),
        (lambda f: [f[0]], "declares 1 tensors but the message has 0"),
        (lambda f: [f[0], f[1], b"xx"], "declares 1 tensors but the message has 2"),
        (lambda f: [f[0], bytes(f[1])[:-1]], "needs 8 bytes but its frame has 7"),
        (lambda f: [b"\xc1", f[1]], "not valid msgpack"),
        (lambda f: [msgpack.packb([1, 2]), f[1]], "must be a msgpack map"),
        (lambda f: [msgpack.packb({b"k": 2}, use_bin_type=True), f[1]], "keys must be strings"),
        (lambda f: [msgpack.packb({1: 2}), f[1]], "not allowed for map key"),
        (lambda f: [], "empty message"),
    ],
)
def test_decode_names_what_is_wrong(mutate, needle):
    frames = encode("echo", 5, None, {"x": torch.tensor([1, 2], dtype=torch.int32)})
    with pytest.raises(ProtocolError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        decode(mutate(frames), ops=OPS)


def test_limits():
    frames = encode(
        "echo",
        1,
        None,
        {"ids": torch.zeros(100, dtype=torch.int32), "lens": torch.zeros(10, dtype=torch.int32)},
    )
    decode(frames, ops=OPS, limits=Limits(max_tokens=100, max_sequences=10, sequence_tensors=("lens",)))
    cases = [
        (Limits(max_message_bytes=400), "limit is 400"),
        (Limits(max_tensors=1), "limit is 1"),
        (Limits(max_header_bytes=10), "header is"),
        (Limits(max_tokens=99), "exceeds max_tokens=99"),
        (Limits(max_sequences=9, sequence_tensors=("lens",)), "10 sequences exceeds max_sequences=9"),
        (Limits(max_tokens=200, token_tensors=("ids",), max_ndim=0), "at most 0 dims"),
    ]
    for limits, needle in cases:
        with pytest.raises(ProtocolError, match=needle):
            decode(frames, ops=OPS, limits=limits)


def test_error_frames_and_peek_id():
    msg = decode(error_frames(9, "busy", "queue full"), ops=("error",))
    assert msg.fields == {"code": "busy", "message": "queue full"}
    assert peek_id(encode("echo", "abc")) == "abc"
    assert peek_id([b"\xff\x00garbage"]) is None
    assert peek_id([msgpack.packb({"id": [1, 2]})]) is None


# --------------------------------------------------------------------------------------------- properties

_names = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=6)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)  # the protocol refuses non-finite floats
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_names, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def messages(draw):
    tensors = {}
    for name in draw(st.lists(_names, unique=True, max_size=4)):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        td, itemsize = DTYPES[dtype]
        raw = draw(st.binary(min_size=math.prod(shape) * itemsize, max_size=math.prod(shape) * itemsize))
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        tensors[name] = t.view(td).reshape(shape)
    fields = draw(st.dictionaries(_names.filter(lambda k: k not in {"v", "op", "id"}), _json, max_size=3))
    rid = draw(st.none() | st.integers(0, 2**63 - 1) | st.text(max_size=10))
    return draw(st.sampled_from(OPS)), rid, fields, tensors


@settings(max_examples=60, deadline=None)
@given(messages())
def test_property_roundtrip_identity(m):
    op, rid, fields, tensors = m
    msg = decode(_frames_bytes(encode(op, rid, fields, tensors)), ops=OPS)
    assert msg.op == op and msg.id == rid and msg.fields == fields
    assert list(msg.tensors) == list(tensors)
    for k, t in tensors.items():
        assert msg.tensors[k].dtype == t.dtype and msg.tensors[k].shape == t.shape
        assert _raw(msg.tensors[k]) == _raw(t)


_wire_ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
_evil_desc = st.fixed_dictionaries(
    {
        "name": _names | _wire_ints,
        "dtype": st.sampled_from([*DTYPES, "object", "bool", 3]),
        "shape": st.lists(_wire_ints | st.integers(0, 4) | st.text(max_size=2), max_size=5) | _wire_ints,
    },
)


@st.composite
def mutations(draw, frames):
    frames = [bytearray(f) for f in frames]
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "drop", "insert", "header", "desc"]))
    touched_payload_only = False
    if kind == "flip":
        i = draw(st.integers(0, len(frames) - 1))
        if frames[i]:
            j = draw(st.integers(0, len(frames[i]) - 1))
            frames[i][j] = draw(st.integers(0, 255))
            touched_payload_only = i > 0
    elif kind == "truncate":
        i = draw(st.integers(0, len(frames) - 1))
        frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))]
    elif kind == "extend":
        i = draw(st.integers(0, len(frames) - 1))
        frames[i] += draw(st.binary(min_size=1, max_size=16))
    elif kind == "drop":
        del frames[draw(st.integers(0, len(frames) - 1))]
    elif kind == "insert":
        frames.insert(draw(st.integers(0, len(frames))), bytearray(draw(st.binary(max_size=32))))
    elif kind == "header":
        frames[0] = bytearray(msgpack.packb(draw(_json), use_bin_type=True))
    else:
        header = msgpack.unpackb(bytes(frames[0]), raw=False)
        header[draw(st.sampled_from(["v", "op", "id", "tensors"]))] = draw(
            _json | st.lists(_evil_desc, max_size=3) | st.integers(0, 3)
        )
        frames[0] = bytearray(msgpack.packb(header, use_bin_type=True))
    return [bytes(f) for f in frames], touched_payload_only


# GKD_FUZZ_EXAMPLES=5000 for a longer local run; the default keeps the suite fast.
@settings(
    max_examples=int(os.environ.get("GKD_FUZZ_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(messages(), st.data())
def test_property_mutation_decodes_faithfully_or_raises_protocol_error(m, data):
    op, rid, fields, tensors = m
    original = _frames_bytes(encode(op, rid, fields, tensors))
    mutated, payload_only = data.draw(mutations(original))
    try:
        msg = decode(mutated, ops=OPS, limits=Limits(max_message_bytes=1 << 16))
    except ProtocolError:
        return
    # Accepted: then it must be a well-formed message that is exactly what the bytes say.
    again = decode(_frames_bytes(encode(msg.op, msg.id, msg.fields, msg.tensors)), ops=OPS)
    assert _same(msg, again)
    assert [_raw(t) for t in msg.tensors.values()] == mutated[1:]
    if mutated == original or payload_only:
        # Same header: identical apart from the (unauthenticated) payload bytes the mutation changed.
        assert msg.header == msgpack.unpackb(original[0], raw=False)


def test_peek_id_does_not_unpack_an_oversized_header():
    """8 MB of msgpack nils as one array would become a 64 MB list; peek_id must not build it."""
    import tracemalloc

    n = 8_000_000
    garbage = b"\xdd" + n.to_bytes(4, "big") + b"\xc0" * n
    tracemalloc.start()
    try:
        assert peek_id([garbage]) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peek_id allocated {peak} bytes"
    # a small header of the same kind is bounded by the unpacker's container limits
    assert peek_id([b"\xdd" + (1 << 30).to_bytes(4, "big") + b"\xc0" * 100]) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), [1.0, float("nan")]])
def test_non_finite_floats_in_a_header_are_refused(value):
    frames = encode("sum", 1, {"wait_s": value})
    with pytest.raises(ProtocolError, match="wait_s.*non-finite"):
        decode(frames, ops=("sum",))
    assert decode(encode("sum", 1, {"wait_s": 2.5}), ops=("sum",)).fields["wait_s"] == 2.5
