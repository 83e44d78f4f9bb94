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
    "PinWarning",
    "alloc_host",
    "checksum",
    "device_checksum",
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
