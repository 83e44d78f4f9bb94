"""Flat byte buffers holding many tensors, their metadata, and bucket plans.

A :class:`FlatBuffer` is one uint8 tensor plus a tuple of :class:`TensorMeta` (name, dtype, shape, byte
offset, byte count) and the copy plan built from them once (see :class:`FlatBuffer`). Packing copies
every tensor in once (threaded, in C++ when ``gkd._C`` is built); :meth:`FlatBuffer.unpack` gives views
without copying; :meth:`FlatBuffer.copy_into` writes into existing
tensors (e.g. an inference model's parameters) and is strict about names, shapes and dtypes.

Dtypes travel as they are (bf16 stays bf16) unless :meth:`FlatBuffer.write` is asked to ``cast``: then a
floating-point tensor is converted to its meta's floating dtype while it is copied in (fp32 master weights
into a bf16 engine's layout, with no temporary copy). Input tensors must be contiguous; a non-contiguous
tensor is rejected with its name (call ``.contiguous()``), never silently copied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from gkd.weights import native

__all__ = [
    "DTYPES",
    "Bucket",
    "FlatBuffer",
    "MetadataMismatch",
    "TensorMeta",
    "diff_metas",
    "layout",
    "plan_buckets",
]

# The dtypes a buffer (and the weight wire format) may carry, by their wire names.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ALLOWED_CODES = torch.tensor([native.dtype_code(d) for d in DTYPES.values()], dtype=torch.int64)
_MAX_ITEMSIZE = 8


class MetadataMismatch(ValueError):
    """Two tensor layouts disagree; the message lists missing, unexpected and mismatched names."""


def _dtype_name(dtype: torch.dtype, name: str) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"tensor {name!r} has dtype {dtype}, not one of {sorted(DTYPES)}")
    return _DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a flat buffer. ``offset`` and ``nbytes`` are in bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0
    nbytes: int = -1  # -1: derived from dtype and shape

    def __post_init__(self) -> None:
        _dtype_name(self.dtype, self.name)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 0 for s in self.shape):
            raise ValueError(f"tensor {self.name!r} has a negative dimension in {self.shape}")
        size = math.prod(self.shape) * self.dtype.itemsize
        if self.nbytes == -1:
            object.__setattr__(self, "nbytes", size)
        elif self.nbytes != size:
            raise ValueError(
                f"tensor {self.name!r}: nbytes={self.nbytes} but {self.dtype}{list(self.shape)} takes {size}"
            )
        if self.offset < 0:
            raise ValueError(f"tensor {self.name!r} has a negative offset {self.offset}")

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, offset: int = 0) -> TensorMeta:
        return cls(name, tensor.dtype, tuple(tensor.shape), offset)

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def to_json(self) -> dict:
        """A JSON-able dict (the weight handshake sends these; never pickle)."""
        return {
            "name": self.name,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_json(cls, d: Mapping) -> TensorMeta:
        """Inverse of :meth:`to_json`; validates types, the dtype allow-list and the byte count."""
        try:
            name, dtype, shape = d["name"], d["dtype"], d["shape"]
            offset, nbytes = d["offset"], d["nbytes"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad tensor metadata {d!r}: missing {exc}") from exc
        if not isinstance(name, str) or dtype not in DTYPES or not isinstance(shape, list):
            raise ValueError(
                f"bad tensor metadata {d!r}: need a str name, a dtype in {sorted(DTYPES)} and a list shape"
            )
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in [*shape, offset, nbytes]):
            raise ValueError(f"bad tensor metadata {d!r}: shape, offset and nbytes must be ints")
        return cls(name, DTYPES[dtype], tuple(shape), offset, nbytes)


def _align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _check_alignment(alignment: int) -> None:
    # >= 8 so every offset suits every dtype's element size and views need no copy.
    if alignment < _MAX_ITEMSIZE or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two >= {_MAX_ITEMSIZE}, got {alignment}")


def layout(metas: Iterable[TensorMeta], alignment: int = 256) -> tuple[list[TensorMeta], int]:
    """Lay tensors out back to back, each offset a multiple of ``alignment``.

    Returns the metas with their offsets set and the buffer size: the end of the last tensor, exact (not
    rounded up), so nothing past the last byte is ever sent.
    """
    _check_alignment(alignment)
    out, pos, end, seen = [], 0, 0, set()
    for m in metas:
        if m.name in seen:
            raise ValueError(f"tensor name {m.name!r} appears twice")
        seen.add(m.name)
        pos = _align_up(pos, alignment)
        out.append(TensorMeta(m.name, m.dtype, m.shape, pos))
        pos += m.nbytes
        end = pos
    return out, end


class _Plan:
    """What a copy needs of a layout, as :func:`gkd.weights.native.copy_layout` takes it: the names in layout
    order, the records (int64 [n, 4]: offset, nbytes, dtype code, ndim), the dims (int64 [sum of ndim]) and
    the end of the last tensor. Built once per layout, so a write or copy does no Python work per tensor
    beyond picking it by name."""

    __slots__ = ("dims", "end", "names", "records")

    def __init__(self, names: list[str], records: torch.Tensor, dims: torch.Tensor, end: int):
        self.names, self.records, self.dims, self.end = names, records, dims, end

    @classmethod
    def of(cls, metas: Sequence[TensorMeta]) -> _Plan:
        rows = [(m.offset, m.nbytes, native.dtype_code(m.dtype), len(m.shape)) for m in metas]
        dims = [d for m in metas for d in m.shape]
        records = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        end = max((m.end for m in metas), default=0)
        return cls([m.name for m in metas], records, torch.tensor(dims, dtype=torch.int64), end)

    def metas(self) -> _Metas:
        """The :class:`TensorMeta` of every tensor (a few microseconds each: built only when asked)."""
        out, pos, dims = [], 0, self.dims.tolist()
        for name, (offset, nbytes, code, ndim) in zip(self.names, self.records.tolist(), strict=True):
            out.append(
                TensorMeta(name, native.code_dtype(code), tuple(dims[pos : pos + ndim]), offset, nbytes)
            )
            pos += ndim
        return _Metas(out, self)


class _Metas(tuple):
    """An immutable run of :class:`TensorMeta` (a tuple) that keeps its :class:`_Plan` once built."""

    def __new__(cls, metas: Iterable[TensorMeta] = (), plan: _Plan | None = None) -> _Metas:
        self = super().__new__(cls, metas)
        self._plan = plan
        return self

    def plan(self) -> _Plan:
        if self._plan is None:
            self._plan = _Plan.of(self)
        return self._plan

    def __reduce__(self):  # pickled without the plan, which is rebuilt when first needed
        return _Metas, (tuple(self),)


@dataclass(frozen=True)
class Bucket:
    """A run of consecutive tensors sent as one flat buffer. Meta offsets are relative to the bucket."""

    index: int
    metas: tuple[TensorMeta, ...]
    nbytes: int  # exact: end of the last tensor

    def __post_init__(self) -> None:
        if not isinstance(self.metas, _Metas):  # every FlatBuffer over this bucket shares one copy plan
            object.__setattr__(self, "metas", _Metas(self.metas))


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int, alignment: int = 256) -> list[Bucket]:
    """Split ``metas`` (in order) into buckets of consecutive tensors whose aligned layout is at most
    ``bucket_bytes``; a tensor larger than that gets a bucket of its own. Every tensor is in exactly one
    bucket; an empty ``metas`` gives no buckets."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    _check_alignment(alignment)
    groups: list[list[TensorMeta]] = []
    size = 0
    for m in metas:
        start = _align_up(size, alignment)
        if groups and start + m.nbytes <= bucket_bytes:
            groups[-1].append(m)
            size = start + m.nbytes
        else:
            groups.append([m])
            size = m.nbytes
    buckets = []
    for i, group in enumerate(groups):
        laid, nbytes = layout(group, alignment)
        buckets.append(Bucket(i, tuple(laid), nbytes))
    return buckets


def diff_metas(expected: Iterable[TensorMeta], actual: Iterable[TensorMeta]) -> str | None:
    """``None`` when both list the same names with the same dtypes and shapes (offsets ignored), else a
    human-readable diff: missing (expected, not in actual), unexpected, and mismatched tensors."""
    exp = {m.name: m for m in expected}
    act = {m.name: m for m in actual}
    missing = [n for n in exp if n not in act]
    unexpected = [n for n in act if n not in exp]
    mismatched = [
        f"{n}: expected {exp[n].dtype}{list(exp[n].shape)}, got {act[n].dtype}{list(act[n].shape)}"
        for n in exp
        if n in act and (exp[n].dtype, exp[n].shape) != (act[n].dtype, act[n].shape)
    ]
    if not (missing or unexpected or mismatched):
        return None

    def section(title: str, items: list[str]) -> str:
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        return f"{title} ({len(items)}): " + ", ".join(shown)

    sections = (("missing", missing), ("unexpected", unexpected), ("shape/dtype mismatch", mismatched))
    parts = [section(t, items) for t, items in sections if items]
    return "; ".join(parts)


def _named(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]):
    return list(tensors.items() if isinstance(tensors, Mapping) else tensors)


class FlatBuffer:
    """One uint8 buffer ``[nbytes]`` holding tensors at the offsets in ``metas`` (a tuple of
    :class:`TensorMeta`).

    ``pinned`` is True when the host memory is page-locked; when pinning was asked for and refused (e.g.
    RLIMIT_MEMLOCK) it is False and ``pin_error`` says why (a ``PinWarning`` was issued too).

    Writes and copies go through the layout's copy plan, built once per layout: FlatBuffers made over the
    same metas tuple (a :class:`Bucket`'s, or another FlatBuffer's ``metas``) share it, so writing the
    same names and shapes again, as the weight sender does every version, costs no Python work per
    tensor beyond picking it by name.
    """

    def __init__(
        self, buffer: torch.Tensor, metas: Sequence[TensorMeta], *, pinned: bool = False, pin_error: str = ""
    ):
        metas = metas if isinstance(metas, _Metas) else _Metas(metas)
        self._init(buffer, metas.plan(), metas, pinned, pin_error)

    def _init(
        self, buffer: torch.Tensor, plan: _Plan, metas: _Metas | None, pinned: bool, pin_error: str
    ) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < plan.end:
            raise ValueError(f"buffer must be uint8 [>= {plan.end}], got {buffer.dtype}{list(buffer.shape)}")
        self.buffer = buffer  # [nbytes] uint8
        self._plan = plan
        self._metas = metas  # None until asked for (pack builds the plan straight from the tensors)
        self.pinned = pinned
        self.pin_error = pin_error

    @property
    def metas(self) -> tuple[TensorMeta, ...]:
        if self._metas is None:
            self._metas = self._plan.metas()
        return self._metas

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @classmethod
    def empty(
        cls,
        metas: Sequence[TensorMeta],
        nbytes: int | None = None,
        *,
        pin: bool = False,
        device: torch.device | str = "cpu",
        use_ext: bool | None = None,
    ) -> FlatBuffer:
        """A zero-filled buffer for an existing layout (host memory from the extension on CPU)."""
        metas = metas if isinstance(metas, _Metas) else _Metas(metas)
        plan = metas.plan()
        nbytes = plan.end if nbytes is None else nbytes
        if torch.device(device).type == "cpu":
            mem = native.alloc_host(nbytes, pin=pin, use_ext=use_ext)
            return cls(mem.tensor, metas, pinned=mem.pinned, pin_error=mem.error)
        return cls(torch.zeros(nbytes, dtype=torch.uint8, device=device), metas)

    @classmethod
    def pack(
        cls,
        named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        alignment: int = 256,
        pin: bool = False,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
        num_threads: int = 0,
        use_ext: bool | None = None,
    ) -> FlatBuffer:
        """Lay out and copy ``named_tensors`` into a new buffer (on ``device``, default: the tensors').

        ``out``: pack into the front of this uint8 buffer instead (e.g. a staging buffer kept across
        versions: no allocation and no page faults); the FlatBuffer's buffer is ``out[:nbytes]``.
        The layout is computed from the tensors in one pass (in C++ with the extension); the
        :class:`TensorMeta` list is built only when ``metas`` is first read."""
        _check_alignment(alignment)
        if isinstance(named_tensors, Mapping):
            names, tensors = list(named_tensors.keys()), list(named_tensors.values())
        else:
            items = list(named_tensors)
            names, tensors = [n for n, _ in items], [t for _, t in items]
            if len(set(names)) != len(names):
                seen: set[str] = set()
                twice = next(n for n in names if n in seen or seen.add(n))
                raise ValueError(f"tensor name {twice!r} appears twice")
        try:
            records, dims, end = native.layout_records(tensors, alignment, use_ext=use_ext)
        except native.LayoutMismatch as exc:
            t = tensors[exc.index]
            raise ValueError(
                f"tensor {names[exc.index]!r} is {t.layout}, not dense; pass t.to_dense()"
            ) from None
        allowed = torch.isin(records[:, 2], _ALLOWED_CODES)
        if not bool(allowed.all()):
            i = int((~allowed).nonzero()[0])
            _dtype_name(tensors[i].dtype, names[i])  # raises the TypeError naming the tensor
        plan = _Plan(names, records, dims, end)
        if out is not None:
            if pin or device is not None:
                raise ValueError("FlatBuffer.pack: pass either out= or pin=/device=, not both")
            if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < end:
                raise ValueError(f"out must be uint8 [>= {end}], got {out.dtype}{list(out.shape)}")
            fb = cls.__new__(cls)
            fb._init(out[:end], plan, None, False, "")
        else:
            if device is None:
                device = tensors[0].device if tensors else "cpu"
            fb = cls.empty((), end, pin=pin, device=device, use_ext=use_ext)
            fb._plan, fb._metas = plan, None
        fb._copy(tensors, "source", cast=False, num_threads=num_threads, use_ext=use_ext)
        return fb

    def write(
        self,
        named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        cast: bool = False,
        num_threads: int = 0,
        use_ext: bool | None = None,
    ) -> None:
        """Copy ``named_tensors`` (exactly this buffer's names, dtypes, shapes) into the buffer.

        ``cast=True``: a floating-point tensor may have another floating dtype than its meta; it is
        converted on the way in (one ``copy_`` into the buffer's view, on the buffer's device)."""
        tensors = self._in_order(named_tensors, "source", cast)
        self._copy(tensors, "source", cast=cast, num_threads=num_threads, use_ext=use_ext)

    def view(self, meta: TensorMeta) -> torch.Tensor:
        """The tensor ``meta`` describes, as a view into the buffer (no copy)."""
        return self.buffer[meta.offset : meta.end].view(meta.dtype).view(meta.shape)

    def unpack(self) -> dict[str, torch.Tensor]:
        """name -> view into ``buffer`` with the original dtype and shape; no copy."""
        return {m.name: self.view(m) for m in self.metas}

    def copy_into(
        self,
        dest: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        num_threads: int = 0,
        use_ext: bool | None = None,
    ) -> None:
        """Copy every tensor into the same-named tensor of ``dest`` (e.g. ``model.named_parameters()``).

        Strict: missing or extra names, or a shape/dtype mismatch, raise :class:`MetadataMismatch` naming
        them before anything is written. Contiguous CPU destinations are filled by one threaded call; the rest
        (GPU, non-contiguous) by ``copy_`` per tensor (asynchronous from pinned memory).
        """
        tensors = self._in_order(dest, "destination")
        if use_ext is not False and native.HAS_EXT and self.buffer.device.type == "cpu":
            try:  # all contiguous CPU tensors (the usual case): one call, nothing per tensor in Python
                self._copy(tensors, "destination", cast=False, num_threads=num_threads, use_ext=True)
                return
            except native.LayoutMismatch as exc:
                if exc.reason not in (native.NOT_CPU, native.NOT_CONTIGUOUS):
                    raise
        pairs = list(zip(self.metas, tensors, strict=True))
        if any(t.dtype != m.dtype or tuple(t.shape) != m.shape for m, t in pairs):
            self._check_names_match(list(zip(self._plan.names, tensors, strict=True)), "destination")
        fast, slow = [], []
        for m, t in pairs:
            plain = t.device.type == "cpu" and t.is_contiguous() and self.buffer.device.type == "cpu"
            (fast if plain else slow).append((m, t))
        with torch.no_grad():
            if fast:
                native.unpack(
                    self.buffer,
                    [m.offset for m, _ in fast],
                    [t.detach() for _, t in fast],
                    num_threads=num_threads,
                    use_ext=use_ext,
                )
            for m, t in slow:
                t.copy_(self.view(m), non_blocking=self.pinned)

    def _in_order(
        self,
        named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        what: str,
        cast: bool = False,
    ) -> list[torch.Tensor]:
        """The tensors of ``named`` in layout order; :class:`MetadataMismatch` with the full diff unless
        they carry exactly this layout's names."""
        items = None if isinstance(named, Mapping) else list(named)
        by_name = named if items is None else dict(items)
        names = self._plan.names
        if len(by_name) == len(names) and (items is None or len(items) == len(names)):
            try:
                return [by_name[n] for n in names]
            except KeyError:
                pass
        self._check_names_match(_named(named) if items is None else items, what, cast=cast)
        raise MetadataMismatch(f"{what} tensors do not match the buffer's names")  # not reached

    def _copy(
        self, tensors: list[torch.Tensor], what: str, *, cast: bool, num_threads: int, use_ext: bool | None
    ) -> None:
        """Copy ``tensors`` (in layout order) into the buffer (``what="source"``) or out of it."""
        plan = self._plan
        try:
            native.copy_layout(
                tensors,
                plan.records,
                plan.dims,
                self.buffer,
                to_buffer=what == "source",
                allow_cast=cast,
                num_threads=num_threads,
                use_ext=use_ext,
            )
        except native.LayoutMismatch as exc:
            # Nothing was copied. Name the tensor, and report every name/dtype/shape mismatch first,
            # as the checks did before the copy plan existed.
            self._check_names_match(list(zip(plan.names, tensors, strict=True)), what, cast=cast)
            name, t = plan.names[exc.index], tensors[exc.index]
            if exc.reason == native.NOT_CONTIGUOUS and what == "source":
                raise ValueError(
                    f"tensor {name!r} is not contiguous; pass t.contiguous() (gkd never "
                    "copies behind your back)"
                ) from None
            if exc.reason == native.NOT_STRIDED:
                raise ValueError(f"tensor {name!r} is {t.layout}, not dense; pass t.to_dense()") from None
            raise native.LayoutMismatch(f"{what} tensor {name!r}", exc.index, exc.reason) from None

    def checksum(self, *, use_ext: bool | None = None) -> int:
        """CRC-32 of the whole buffer (see :mod:`gkd.weights.native`)."""
        return native.checksum(self.buffer, use_ext=use_ext)

    def _check_names_match(
        self, items: list[tuple[str, torch.Tensor]], what: str, cast: bool = False
    ) -> None:
        if len({n for n, _ in items}) != len(items):
            raise MetadataMismatch(f"{what} tensors repeat a name")
        mine = {m.name: m.dtype for m in self.metas}

        def dtype(n: str, t: torch.Tensor) -> torch.dtype:  # floating -> floating is allowed with cast
            want = mine.get(n)
            ok = cast and want is not None and want.is_floating_point and t.dtype.is_floating_point
            return want if ok else t.dtype

        diff = diff_metas(self.metas, [TensorMeta(n, dtype(n, t), tuple(t.shape)) for n, t in items])
        if diff is not None:
            raise MetadataMismatch(f"{what} tensors do not match the buffer: {diff}")
