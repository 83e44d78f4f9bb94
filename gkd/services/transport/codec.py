"""Wire codec: one message = one msgpack header frame + one raw frame per tensor.

Frame 0 is a msgpack map::

    {"v": PROTOCOL_VERSION, "op": str, "id": int | str | None,
     "tensors": [{"name": str, "dtype": str, "shape": [int, ...]}, ...],
     ...op-specific fields (any msgpack value, keys are str)}

Frames 1..n are the tensors' raw bytes, C-contiguous, little-endian, in the order of ``"tensors"``.

Sending is zero-copy: a contiguous CPU tensor (or numpy array) is handed to ZeroMQ as a memoryview of its
own storage, so the caller must not mutate it until the send has completed (for ``Client.submit``: until
the future resolves). Receiving builds tensors with ``torch.frombuffer`` over the received frame (no copy
unless the frame is misaligned for the dtype).

Nothing from a socket is ever unpickled or ``torch.load``-ed: the header is msgpack (plain data only) and
tensor frames are reinterpreted as a dtype from a fixed allow-list. ``decode`` checks everything a peer
controls -- version, op (caller's allow-list), header shape and types, dtype allow-list, declared shapes
against actual frame sizes (with Python ints, so a huge declared shape cannot overflow), and ``Limits`` --
and raises ``ProtocolError`` naming the problem. Services turn that into an error reply (``error_frames``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

PROTOCOL_VERSION = 1

#: Header keys owned by the codec; op-specific fields may not use them.
RESERVED_KEYS = frozenset({"v", "op", "id", "tensors"})

#: Reply ops every service uses. ``error`` carries ``code`` and ``message`` fields.
REPLY = "reply"
ERROR = "error"
REPLY_OPS = (REPLY, ERROR)

#: Wire dtype name -> (torch dtype, itemsize). The allow-list: nothing else is accepted. ``bool`` is left
#: out on purpose: a byte other than 0/1 reinterpreted as torch.bool is undefined; send masks as uint8.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "uint8": (torch.uint8, 1),
    "int8": (torch.int8, 1),
    "int16": (torch.int16, 2),
    "int32": (torch.int32, 4),
    "int64": (torch.int64, 8),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "float32": (torch.float32, 4),
    "float64": (torch.float64, 8),
}
_TORCH_TO_WIRE = {td: name for name, (td, _) in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError(
        "gkd.services.transport assumes a little-endian host (frames are raw little-endian bytes)"
    )


class ProtocolError(ValueError):
    """A message broke the wire protocol; the text names what was wrong (safe to send back to the peer)."""


@dataclass(frozen=True)
class Limits:
    """Bounds a decoder enforces before touching a message's payload.

    ``max_sequences`` / ``max_tokens`` bound ``shape[0]`` of the tensors named in ``sequence_tensors`` /
    ``token_tensors`` (e.g. a packed ``input_ids [T]`` and per-sequence ``lengths [S]``); in addition no
    tensor may have a leading dimension above ``max_tokens`` (no legitimate tensor of these services has
    more rows than tokens).
    """

    max_message_bytes: int = 1 << 30  # sum of all frames
    max_header_bytes: int = 1 << 16
    max_tensors: int = 64
    max_ndim: int = 4
    max_dim: int = 1 << 31  # any single dimension
    max_sequences: int = 1 << 16
    max_tokens: int = 1 << 24
    sequence_tensors: tuple[str, ...] = ()
    token_tensors: tuple[str, ...] = ()


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message: the full header (``v``, ``op``, ``id``, ``tensors`` + fields) and named tensors."""

    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def op(self) -> str:
        return self.header["op"]

    @property
    def id(self) -> int | str | None:
        return self.header.get("id")

    @property
    def fields(self) -> dict[str, Any]:
        """Op-specific header fields (everything but the reserved keys)."""
        return {k: v for k, v in self.header.items() if k not in RESERVED_KEYS}


# ----------------------------------------------------------------------------------------------- encode


def _as_buffer(name: str, value: torch.Tensor | np.ndarray) -> tuple[str, list[int], memoryview]:
    """Return (wire dtype, shape, memoryview over the contiguous bytes) without copying when possible."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        kind = type(value).__name__
        raise TypeError(f"tensor {name!r}: expected a torch.Tensor or numpy array, got {kind}")
    if value.device.type != "cpu":
        raise ValueError(f"tensor {name!r} is on {value.device}; move it to the CPU before sending")
    wire = _TORCH_TO_WIRE.get(value.dtype)
    if wire is None:
        raise ValueError(f"tensor {name!r}: dtype {value.dtype} is not sendable; allowed: {sorted(DTYPES)}")
    t = value.detach()
    if not t.is_contiguous():
        t = t.contiguous()  # the one copy: a strided view cannot be sent as one frame
    shape = list(t.shape)
    # Reinterpret as bytes: works for every dtype including bool/bfloat16, which numpy cannot view directly.
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return wire, shape, memoryview(raw.numpy())


def encode(
    op: str,
    id: int | str | None,
    fields: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor | np.ndarray] | Iterable[tuple[str, Any]] | None = None,
) -> list[bytes | memoryview]:
    """Encode one message into frames ``[header, tensor_0, ...]`` (tensor frames are zero-copy views).

    Raises ``ValueError``/``TypeError`` for a message the caller built wrongly (reserved field names,
    non-CPU tensors, unsupported dtypes) -- those are programming errors, not protocol errors.
    """
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op, "id": id}
    descs: list[dict[str, Any]] = []
    frames: list[bytes | memoryview] = [b""]
    items = tensors.items() if isinstance(tensors, Mapping) else (tensors or ())
    seen: set[str] = set()
    for name, value in items:
        if not isinstance(name, str) or name in seen:
            raise ValueError(f"tensor names must be unique strings, got {name!r}")
        seen.add(name)
        dtype, shape, buf = _as_buffer(name, value)
        descs.append({"name": name, "dtype": dtype, "shape": shape})
        frames.append(buf)
    header["tensors"] = descs
    for key, value in (fields or {}).items():
        if key in RESERVED_KEYS:
            raise ValueError(f"field name {key!r} is reserved by the codec ({sorted(RESERVED_KEYS)})")
        header[key] = value
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def with_id(frames: Sequence[Any], new_id: int | str | None) -> list[Any]:
    """The same message under another request id (re-packs only the small header frame)."""
    header = msgpack.unpackb(_frame_view(frames[0]), raw=False)
    header["id"] = new_id
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def reply_frames(request_id, fields=None, tensors=None) -> list[bytes | memoryview]:
    """Frames of a successful reply to request ``request_id``."""
    return encode(REPLY, request_id, fields, tensors)


def error_frames(request_id: int | str | None, code: str, message: str) -> list[bytes]:
    """Frames of an error reply. ``code`` is machine-readable (``bad_request``, ``busy``, ``no_workers``,
    ``handler_error``, ``worker_failed``); ``message`` is for humans."""
    return encode(ERROR, request_id, {"code": code, "message": message[:4000]})  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- decode


def _frame_view(frame: Any) -> memoryview:
    """A memoryview of a received frame: ``zmq.Frame`` (``copy=False``), bytes, or any buffer."""
    buf = getattr(frame, "buffer", frame)
    try:
        view = memoryview(buf)
    except TypeError as e:
        raise ProtocolError(f"frame is not a byte buffer ({type(frame).__name__})") from e
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_id(value: Any) -> None:
    if value is None or (type(value) is int and -(1 << 63) <= value < (1 << 64)):
        return
    if isinstance(value, str) and len(value) <= 256:
        return
    kind = type(value).__name__
    raise ProtocolError(f"header 'id' must be an int, a str of at most 256 chars, or nil; got {kind}")


def peek_id(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> int | str | None:
    """Best-effort request id of a (possibly malformed) message, for addressing an error reply. A header
    over ``limits.max_header_bytes`` is not unpacked at all (a large frame of msgpack nils would become a
    list many times its size), and the unpacker's own buffer and container sizes are bounded by it."""
    try:
        view = _frame_view(frames[0])
        if view.nbytes > limits.max_header_bytes:
            return None
        header = _unpack_header(view, limits)
        value = header.get("id") if isinstance(header, dict) else None
        _check_id(value)
        return value
    except Exception:  # noqa: BLE001 - any garbage simply has no usable id
        return None


def _unpack_header(view: memoryview, limits: Limits) -> Any:
    """msgpack with every size bounded by the header limit: no container or string can claim more
    entries than the header has bytes (callers check the frame's size first)."""
    n = limits.max_header_bytes
    return msgpack.unpackb(
        view,
        raw=False,
        strict_map_key=True,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n,
        max_ext_len=n,
    )


def _non_finite(value: Any, path: str = "", depth: int = 0) -> str | None:
    """The path of the first non-finite float in a decoded header, or None. Every float a peer sends must
    be finite: NaN slips through range checks (``min(max(nan, 0), 600)`` is NaN) and then spins waits."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path or "<header>"
    if depth > 32:  # msgpack nests no deeper in anything we send; refuse rather than recurse without end
        return path or "<header>"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key), depth + 1)
        if found is not None:
            return found
    return None


def decode_header(
    frames: Sequence[Any], *, ops: Collection[str], limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], list[tuple[str, str, tuple[int, ...]]], list[memoryview]]:
    """Validate a message without building tensors; return (header, [(name, dtype, shape)], frame views).

    Used by the broker, which only routes frames, and by ``decode``.
    """
    if not isinstance(frames, Sequence) or len(frames) == 0:
        raise ProtocolError("empty message (expected a header frame)")
    if len(frames) - 1 > limits.max_tensors:
        raise ProtocolError(f"message has {len(frames) - 1} tensor frames, limit is {limits.max_tensors}")
    views = [_frame_view(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message is {total} bytes, limit is {limits.max_message_bytes}")
    if views[0].nbytes > limits.max_header_bytes:
        raise ProtocolError(f"header is {views[0].nbytes} bytes, limit is {limits.max_header_bytes}")
    try:
        header = _unpack_header(views[0], limits)
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # the types msgpack raises on garbage
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    for key in header:
        if not isinstance(key, str):
            raise ProtocolError(f"header keys must be strings, got {type(key).__name__}")
    bad = _non_finite(header)
    if bad is not None:
        raise ProtocolError(f"header field {bad!r} holds a non-finite float (NaN or infinity)")
    version = header.get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    op = header.get("op")
    if not isinstance(op, str) or op not in ops:
        raise ProtocolError(f"op {op!r} is not accepted here; expected one of {sorted(ops)}")
    if "id" not in header:
        raise ProtocolError("header has no 'id' (use nil when there is none)")
    _check_id(header["id"])
    descs = header.get("tensors")
    if not isinstance(descs, list):
        raise ProtocolError("header 'tensors' must be a list of {name, dtype, shape} maps")
    if len(descs) != len(views) - 1:
        raise ProtocolError(
            f"header declares {len(descs)} tensors but the message has {len(views) - 1} tensor frames"
        )
    out: list[tuple[str, str, tuple[int, ...]]] = []
    names: set[str] = set()
    for i, desc in enumerate(descs):
        out.append(_check_desc(i, desc, views[i + 1].nbytes, names, limits))
    return header, out, views


def _check_desc(
    i: int, desc: Any, nbytes: int, names: set[str], limits: Limits
) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(desc, dict) or set(desc) != {"name", "dtype", "shape"}:
        raise ProtocolError(f"tensor descriptor {i} must be a map with exactly name, dtype, shape")
    name, dtype, shape = desc["name"], desc["dtype"], desc["shape"]
    if not isinstance(name, str) or not name or len(name) > 128:
        raise ProtocolError(f"tensor descriptor {i}: name must be a non-empty str of at most 128 chars")
    if name in names:
        raise ProtocolError(f"tensor name {name!r} appears twice")
    names.add(name)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} is not allowed; allowed: {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise ProtocolError(f"tensor {name!r}: shape must be a list of at most {limits.max_ndim} dims")
    for d in shape:
        if type(d) is not int or not 0 <= d <= limits.max_dim:
            raise ProtocolError(
                f"tensor {name!r}: shape {shape!r} has a dim that is not an int in [0, {limits.max_dim}]"
            )
    # Python ints: a declared shape like [2**62, 2**62] cannot overflow, it just mismatches.
    expected = math.prod(shape) * DTYPES[dtype][1]
    if expected != nbytes:
        raise ProtocolError(
            f"tensor {name!r}: declared {dtype}{shape} needs {expected} bytes but its frame has {nbytes}"
        )
    lead = shape[0] if shape else 1
    if lead > limits.max_tokens:
        raise ProtocolError(f"tensor {name!r}: leading dim {lead} exceeds max_tokens={limits.max_tokens}")
    if name in limits.token_tensors and math.prod(shape) > limits.max_tokens:
        n = math.prod(shape)
        raise ProtocolError(f"tensor {name!r}: {n} tokens exceeds max_tokens={limits.max_tokens}")
    if name in limits.sequence_tensors and lead > limits.max_sequences:
        raise ProtocolError(f"tensor {name!r}: {lead} sequences exceeds max_sequences={limits.max_sequences}")
    return name, dtype, tuple(shape)


def decode(frames: Sequence[Any], *, ops: Collection[str], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate and decode frames into a ``Message``; tensors alias the received frames (no copy).

    Raises ``ProtocolError`` (and nothing else) for any malformed input.
    """
    header, descs, views = decode_header(frames, ops=ops, limits=limits)
    tensors: dict[str, torch.Tensor] = {}
    for (name, dtype, shape), view in zip(descs, views[1:], strict=True):
        torch_dtype, itemsize = DTYPES[dtype]
        if view.nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=torch_dtype)
            continue
        if view.readonly:  # e.g. ``bytes`` from recv(copy=True): torch cannot alias read-only memory safely
            view = memoryview(bytearray(view))
        flat = torch.frombuffer(view, dtype=torch.uint8)
        if flat.data_ptr() % itemsize:
            flat = flat.clone()  # misaligned (tiny frames can be stored inline by libzmq): copy once
        tensors[name] = flat.view(torch_dtype).reshape(shape)
    return Message(header, tensors)
