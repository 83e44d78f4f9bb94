"""The one bridge to the compiled extension ``gkd._C``, with torch fallbacks of the same behaviour.

Nothing else in gkd imports ``gkd._C``. ``HAS_EXT`` says whether it loaded; every function takes
``use_ext`` (``None``: the extension when it is present and the tensors are on the CPU) so tests and
benchmarks can run both paths side by side without a global switch.

Checksum: CRC-32 as zlib computes it (reflected polynomial 0xEDB88320, init/final xor 0xFFFFFFFF). The
extension computes it by carry-less-multiply folding (PCLMULQDQ, ~8 GB/s a core here; slicing-by-8
tables elsewhere) on several threads and combines the chunk CRCs exactly; the fallback is the standard
library's ``zlib.crc32`` (~2 GB/s), so the two agree bit for bit by construction rather than through a
second implementation. (crc32c would need a Python reimplementation; xxhash64 does not vectorise in numpy.)

Device checksum: :func:`device_checksum` runs where the bytes live (torch ops, no host copy, no host sync),
for GPU buckets of the weight channel, where a CRC would first copy the bucket to the host (~1 s per GB on
one core). It is a position-weighted sum over 32-bit words modulo the prime ``M = 2**31 - 1``
(``s1 = sum(w_i) mod M``, ``s2 = sum((i + 1) w_i) mod M``, Fletcher-style): any single changed byte changes
``s1`` (a byte change is ``d * 256**j`` with ``0 < |d| < 256``, never a multiple of the prime ``M``), and
reordered words change ``s2``. Integer ops only, so every device computes the same value.

Rebuild the extension in place (faster than ``pip install -e .``)::

    cmake -S . -B build/ext -DPython_EXECUTABLE=.venv/bin/python -DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$PWD/gkd \\
      -DCMAKE_PREFIX_PATH=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)') \\
      && cmake --build build/ext -j
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

try:
    from gkd import _C
except ImportError as exc:  # built with GKD_SKIP_EXT=1, or no compiler at install time
    _C = None
    EXT_ERROR: str | None = (
        f"gkd._C is not available ({exc}); using torch fallbacks (no page-locked host memory on CPU-only "
        "torch, single-threaded checksums). Reinstall without GKD_SKIP_EXT=1 to build it."
    )
else:
    EXT_ERROR = None

HAS_EXT: bool = _C is not None

__all__ = [
    "EXT_ERROR",
    "HAS_EXT",
    "HostMemory",
    "LayoutMismatch",
    "PinWarning",
    "alloc_host",
    "checksum",
    "code_dtype",
    "copy_layout",
    "device_checksum",
    "dtype_code",
    "layout_records",
    "pack",
    "unpack",
]


class PinWarning(RuntimeWarning):
    """Host memory was asked to be page-locked and could not be (see ``HostMemory.error``)."""


class HostMemory(NamedTuple):
    tensor: torch.Tensor  # [nbytes] uint8, CPU
    pinned: bool  # page-locked (mlock) and, when CUDA is available, registered with CUDA
    error: str  # why pinning was refused; "" when it was not asked for or succeeded


def _want_ext(use_ext: bool | None, *tensors: torch.Tensor) -> bool:
    if use_ext is None:
        return HAS_EXT and all(t.device.type == "cpu" for t in tensors)
    if use_ext and not HAS_EXT:
        raise RuntimeError(EXT_ERROR)
    if use_ext:
        for t in tensors:
            if t.device.type != "cpu":
                raise RuntimeError(f"the extension copies CPU tensors only, got one on {t.device}")
    return use_ext


def alloc_host(nbytes: int, *, pin: bool = False, use_ext: bool | None = None) -> HostMemory:
    """Zero-filled host memory as a uint8 tensor ``[nbytes]`` that frees itself.

    With the extension the memory is page-aligned (mmap); ``pin=True`` mlocks it and, when
    ``torch.cuda.is_available()``, registers it with CUDA so host-to-device copies are asynchronous. When
    the kernel refuses (RLIMIT_MEMLOCK) a ``PinWarning`` is issued and ``pinned`` is False; the memory still
    works.
    The fallback uses torch's allocator (64-byte aligned) and can pin only through CUDA torch.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    cuda = torch.cuda.is_available()
    if _want_ext(use_ext):
        tensor, locked, registered, error = _C.alloc_host(nbytes, pin, cuda)
        pinned = locked and (registered or not cuda)
    elif pin and cuda:
        tensor, pinned, error = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True), True, ""
    else:
        tensor, pinned = torch.zeros(nbytes, dtype=torch.uint8), False
        why = EXT_ERROR or "no extension"
        error = f"cannot page-lock memory: CPU-only torch and {why}" if pin else ""
    if pin and not pinned:
        warnings.warn(
            f"pinned host buffer of {nbytes} bytes is not page-locked: {error}", PinWarning, stacklevel=2
        )
    return HostMemory(tensor, pin and pinned, error if pin and not pinned else "")


def _check_args(
    tensors: Sequence[torch.Tensor], offsets: Sequence[int], buffer: torch.Tensor, what: str
) -> None:
    # The same checks, in the same words, as csrc/bindings.cpp; they run before every call into gkd._C, so
    # bad arguments never reach its TORCH_CHECKs (kept there as a backstop). On the GPU proof run's machine
    # (torch 2.11+cu130, an H100) an exception thrown by gkd._C crashed the process (SIGSEGV) instead of
    # arriving as a RuntimeError.
    if len(tensors) != len(offsets):
        raise RuntimeError(
            f"{what} and offsets must have equal lengths, got {len(tensors)} and {len(offsets)}"
        )
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise RuntimeError(f"buffer must be a 1-D uint8 tensor, got {buffer.dtype} with {buffer.dim()} dims")
    for i, (t, off) in enumerate(zip(tensors, offsets, strict=True)):
        if not t.is_contiguous():
            raise RuntimeError(f"{what}[{i}] must be contiguous (call .contiguous() first)")
        if off < 0 or off + t.nbytes > buffer.numel():
            raise RuntimeError(
                f"offsets[{i}] = {off} with {t.nbytes} bytes does not fit in a buffer of "
                f"{buffer.numel()} bytes"
            )


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def pack(
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int],
    buffer: torch.Tensor,
    *,
    num_threads: int = 0,
    use_ext: bool | None = None,
) -> None:
    """Copy contiguous tensors (any dtype and shape) into ``buffer`` (uint8 ``[N]``) at byte ``offsets``.

    Bytes between tensors are left as they are. The extension copies on ``num_threads`` threads
    (``<= 0``: ``torch.get_num_threads()``) without the GIL; the fallback runs one ``torch.cat`` when the
    offsets ascend without overlap (gaps filled with zeros), else one ``copy_`` per tensor.
    """
    _check_args(tensors, offsets, buffer, "tensors")  # here, not as a C++ exception (see _check_args)
    if _want_ext(use_ext, buffer, *tensors):
        _C.pack(list(tensors), list(offsets), buffer, num_threads)
        return
    order = sorted(range(len(tensors)), key=lambda i: offsets[i])
    pieces, pos = [], offsets[order[0]] if order else 0
    start = pos
    for i in order:
        if offsets[i] < pos:  # overlapping layout: no single cat
            for t, off in zip(tensors, offsets, strict=True):
                buffer[off : off + t.nbytes].copy_(_as_bytes(t))
            return
        if offsets[i] > pos:
            pieces.append(torch.zeros(offsets[i] - pos, dtype=torch.uint8, device=buffer.device))
        pieces.append(_as_bytes(tensors[i]).to(buffer.device))
        pos = offsets[i] + tensors[i].nbytes
    if pieces:
        torch.cat(pieces, out=buffer[start:pos])


def unpack(
    buffer: torch.Tensor,
    offsets: Sequence[int],
    dests: Sequence[torch.Tensor],
    *,
    num_threads: int = 0,
    use_ext: bool | None = None,
) -> None:
    """Copy bytes of ``buffer`` at byte ``offsets`` into the contiguous tensors ``dests`` (pack reversed)."""
    _check_args(dests, offsets, buffer, "dests")
    if _want_ext(use_ext, buffer, *dests):
        _C.unpack(buffer, list(offsets), list(dests), num_threads)
        return
    for t, off in zip(dests, offsets, strict=True):
        _as_bytes(t).copy_(buffer[off : off + t.nbytes])


# Layout records: a layout as tensors the extension reads without Python work per tensor. ``records`` is
# int64 [n, 4], a row (offset, nbytes, dtype code, ndim) per tensor, ``dims`` int64 [sum of ndim] their
# sizes back to back. Dtype codes are c10::ScalarType values with the extension, positions in a fixed list
# without it: compare them only with codes from this module.
_ALL_DTYPES = list(dict.fromkeys(v for v in vars(torch).values() if isinstance(v, torch.dtype)))
_DTYPE_CODES = {d: (_C.dtype_code(d) if HAS_EXT else i) for i, d in enumerate(_ALL_DTYPES)}
_CODE_DTYPES = {c: d for d, c in _DTYPE_CODES.items()}
_RECORD_FIELDS = 4

# Why a tensor does not match its record, by the codes gkd._C returns (csrc/bindings.cpp, enum Mismatch).
MISMATCHES = (
    "matches its record",
    "is not a dense (strided) tensor",
    "is not on the CPU",
    "must be contiguous (call .contiguous() first)",
    "does not have its record's shape",
    "does not have its record's dtype",
    "does not fit in the buffer at its record's offset",
)
NOT_STRIDED, NOT_CPU, NOT_CONTIGUOUS, SHAPE, DTYPE, RANGE = range(1, 7)


class LayoutMismatch(RuntimeError):
    """The tensor at ``index`` does not match its layout record; ``reason`` indexes :data:`MISMATCHES`.
    ``label`` names it in the message (``tensors[3]``; gkd.weights.flat uses the tensor's name)."""

    def __init__(self, label: str, index: int, reason: int):
        super().__init__(f"{label} {MISMATCHES[reason]}")
        self.index, self.reason = index, reason


def dtype_code(dtype: torch.dtype) -> int:
    """The code of ``dtype`` in layout records."""
    return _DTYPE_CODES[dtype]


def code_dtype(code: int) -> torch.dtype:
    """The dtype of a layout record's code (inverse of :func:`dtype_code`)."""
    return _CODE_DTYPES[code]


def layout_records(
    tensors: Sequence[torch.Tensor], alignment: int, *, use_ext: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(records, dims, end)`` of ``tensors`` laid out back to back, each offset a multiple of
    ``alignment`` (a power of two), ``end`` the end of the last. Reads only metadata, on any device; raises
    :class:`LayoutMismatch` for a sparse or nested tensor."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    if _want_ext(use_ext):
        records, dims, end, bad, why = _C.layout_records(list(tensors), alignment)
        if bad >= 0:
            raise LayoutMismatch(f"tensors[{bad}]", bad, why)
        return records, dims, end
    rows, dims, end = [], [], 0
    for i, t in enumerate(tensors):
        if t.layout != torch.strided:
            raise LayoutMismatch(f"tensors[{i}]", i, NOT_STRIDED)
        offset = (end + alignment - 1) & -alignment
        end = offset + t.nbytes
        rows.append((offset, t.nbytes, _DTYPE_CODES[t.dtype], t.dim()))
        dims.extend(t.shape)
    records = torch.tensor(rows, dtype=torch.int64).reshape(-1, _RECORD_FIELDS)
    return records, torch.tensor(dims, dtype=torch.int64), end


def _check_layout_args(
    tensors: Sequence[torch.Tensor], records: torch.Tensor, dims: torch.Tensor, buffer: torch.Tensor
) -> None:
    # csrc/bindings.cpp's copy_layout checks these again (see _check_args); the tensors' own checks are
    # its per-tensor results, returned and raised here as LayoutMismatch, never thrown.
    for t, name in ((records, "records"), (dims, "dims")):
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype != torch.int64:
            raise RuntimeError(f"{name} must be a contiguous int64 CPU tensor, got {t.dtype} on {t.device}")
    if records.dim() != 2 or records.shape != (len(tensors), _RECORD_FIELDS):
        raise RuntimeError(
            f"records must be int64 [{len(tensors)}, {_RECORD_FIELDS}], got {list(records.shape)}"
        )
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise RuntimeError(f"buffer must be a 1-D uint8 tensor, got {buffer.dtype} with {buffer.dim()} dims")
    if not buffer.is_contiguous():
        raise RuntimeError("buffer must be contiguous (call .contiguous() first)")


def _mismatch_py(
    t: torch.Tensor, record: list[int], shape: list[int], to_buffer: bool, allow_cast: bool, total: int
) -> int:
    offset, nbytes, code, _ = record
    if t.layout != torch.strided:
        return NOT_STRIDED
    if not t.is_contiguous():
        return NOT_CONTIGUOUS
    if list(t.shape) != shape:
        return SHAPE
    if offset < 0 or nbytes < 0 or offset + nbytes > total:
        return RANGE
    if _DTYPE_CODES[t.dtype] != code:
        want = _CODE_DTYPES.get(code)
        castable = to_buffer and allow_cast and t.is_floating_point() and want is not None
        return 0 if castable and want.is_floating_point else DTYPE
    return RANGE if t.nbytes != nbytes else 0


def copy_layout(
    tensors: Sequence[torch.Tensor],
    records: torch.Tensor,
    dims: torch.Tensor,
    buffer: torch.Tensor,
    *,
    to_buffer: bool = True,
    allow_cast: bool = False,
    num_threads: int = 0,
    use_ext: bool | None = None,
) -> None:
    """Check every tensor against its record, then copy them into ``buffer`` (uint8 ``[N]``) at their
    records' offsets (``to_buffer=False``: out of it, into the tensors).

    A tensor that does not match (not dense, not contiguous, another shape or dtype, outside the buffer)
    raises :class:`LayoutMismatch` before anything is copied. ``allow_cast``: a floating-point tensor whose
    record has another floating dtype is converted on the way in (one ``copy_`` into its view). The
    extension checks and copies in one call, on ``num_threads`` threads without the GIL, with no Python
    work per tensor; it takes CPU tensors only: with ``use_ext=None`` another device goes to the fallback
    (per-tensor checks, then :func:`pack` / :func:`unpack`'s torch code, which moves the bytes across).
    """
    _check_layout_args(tensors, records, dims, buffer)
    what = "tensors" if to_buffer else "dests"
    ext = _want_ext(use_ext, buffer)
    casts: list[int] = []
    if ext:
        bad, why, casts = _C.copy_layout(
            list(tensors), records, dims, buffer, to_buffer, allow_cast, num_threads
        )
        if bad >= 0 and not (why == NOT_CPU and use_ext is None):
            raise LayoutMismatch(f"{what}[{bad}]", bad, why)
        ext = bad < 0
    rows = records.tolist() if casts or not ext else []  # [n, 4] as lists: microseconds per tensor
    if not ext:
        flat_dims, pos, copied = dims.tolist(), 0, []
        for i, (t, row) in enumerate(zip(tensors, rows, strict=True)):
            shape = flat_dims[pos : pos + row[3]]
            pos += row[3]
            why = _mismatch_py(t, row, shape, to_buffer, allow_cast, buffer.numel())
            if why:
                raise LayoutMismatch(f"{what}[{i}]", i, why)
            (copied if _DTYPE_CODES[t.dtype] == row[2] else casts).append(i)
        if to_buffer:
            pack([tensors[i] for i in copied], [rows[i][0] for i in copied], buffer, use_ext=False)
        else:
            unpack(buffer, [rows[i][0] for i in copied], [tensors[i] for i in copied], use_ext=False)
    with torch.no_grad():
        for i in casts:
            offset, nbytes, code, _ = rows[i]
            t = tensors[i]
            buffer[offset : offset + nbytes].view(_CODE_DTYPES[code]).view(t.shape).copy_(t)


def checksum(
    buffer: torch.Tensor,
    offset: int = 0,
    nbytes: int = -1,
    *,
    num_threads: int = 0,
    use_ext: bool | None = None,
) -> int:
    """CRC-32 (zlib's) of ``buffer[offset:offset + nbytes]``, in [0, 2**32); ``nbytes < 0``: to the end.

    A CUDA buffer is copied to the host first (a sync point).
    """
    if nbytes < 0:
        nbytes = buffer.numel() - offset
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise RuntimeError(f"buffer must be a 1-D uint8 tensor, got {buffer.dtype} with {buffer.dim()} dims")
    if offset < 0 or offset + nbytes > buffer.numel():
        raise RuntimeError(
            f"offset = {offset} with {nbytes} bytes does not fit in a buffer of {buffer.numel()} bytes"
        )
    if _want_ext(use_ext, buffer):
        return _C.checksum(buffer, offset, nbytes, num_threads)
    return zlib.crc32(buffer[offset : offset + nbytes].cpu().contiguous().numpy())


_SUM_MOD = (1 << 31) - 1  # a Mersenne prime: s1 catches every single-byte change
_SUM_CHUNK_WORDS = 1 << 21  # 8 MB of data per step: int64 temporaries stay ~16 MB each


def device_checksum(buffer: torch.Tensor, offset: int = 0, nbytes: int = -1) -> torch.Tensor:
    """The position-weighted word sum of ``buffer[offset:offset + nbytes]`` (see the module docstring) as
    a 0-dim int64 tensor ``s2 << 31 | s1`` on the buffer's device: no copy to the host and no host sync
    (``.item()`` it when the value is needed on the host). ``nbytes < 0``: to the end.

    The bytes are read as little-endian uint32 words, a last partial word zero-padded; word ``i`` (from 0)
    is weighted ``i + 1``. Temporaries: a few int64 tensors of ``_SUM_CHUNK_WORDS`` elements.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise RuntimeError(f"buffer must be a 1-D uint8 tensor, got {buffer.dtype} with {buffer.dim()} dims")
    if nbytes < 0:
        nbytes = buffer.numel() - offset
    if offset < 0 or offset + nbytes > buffer.numel():
        raise RuntimeError(
            f"offset = {offset} with {nbytes} bytes does not fit in a buffer of {buffer.numel()} bytes"
        )
    data = buffer[offset : offset + nbytes]
    if data.storage_offset() % 4:  # the int32 view needs 4-byte aligned storage
        data = data.clone()
    n_words, tail = divmod(nbytes, 4)
    words = data[: n_words * 4].view(torch.int32)
    s1 = torch.zeros((), dtype=torch.int64, device=buffer.device)
    s2 = torch.zeros((), dtype=torch.int64, device=buffer.device)

    def add(w: torch.Tensor, first: int) -> None:  # w: [c] int64 in [0, 2**32), word index of w[0]
        nonlocal s1, s2
        w = w.remainder_(_SUM_MOD)
        pos = torch.arange(first + 1, first + 1 + w.numel(), dtype=torch.int64, device=w.device)
        if first + w.numel() >= _SUM_MOD:  # only buffers of 8 GB and more need the positions reduced
            pos.remainder_(_SUM_MOD)
        s1 = (s1 + w.sum()).remainder_(_SUM_MOD)  # c < 2**22 terms < 2**31: the sum fits in int64
        s2 = (s2 + w.mul_(pos).remainder_(_SUM_MOD).sum()).remainder_(_SUM_MOD)  # products < 2**62

    for start in range(0, n_words, _SUM_CHUNK_WORDS):
        chunk = words[start : start + _SUM_CHUNK_WORDS]
        add(chunk.to(torch.int64).bitwise_and_(0xFFFFFFFF), start)
    if tail:
        shifts = torch.arange(0, 8 * tail, 8, dtype=torch.int64, device=buffer.device)  # made on device
        last = (data[n_words * 4 :].to(torch.int64) << shifts).sum()
        add(last.reshape(1), n_words)
    return s1 | (s2 << 31)
