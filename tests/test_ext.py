"""gkd.weights.native: the extension and the torch fallback agree bit for bit; checks name their argument."""

import ctypes
import os
import resource
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from gkd.weights import native as _ext

PATHS = [
    pytest.param(False, id="fallback"),
    pytest.param(True, id="ext", marks=pytest.mark.skipif(not _ext.HAS_EXT, reason=str(_ext.EXT_ERROR))),
]
needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=str(_ext.EXT_ERROR))


def _random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("use_ext", PATHS)
# 255/256/257/320 straddle where the carry-less-multiply path starts (256 B) and its 64/16-byte steps.
@pytest.mark.parametrize(
    "n, offset",
    [(0, 0), (1, 0), (7, 3), (255, 1), (256, 0), (257, 2), (320, 0), (4099, 17), (9 * 2**20 + 3, 5)],
)
@pytest.mark.parametrize("num_threads", [1, 4])
def test_checksum_is_zlib_crc32(use_ext, n, offset, num_threads):
    # Above 2 MiB per thread the extension splits the range and combines chunk CRCs: must still be exact.
    buf = _random_bytes(n + offset + 11)
    want = zlib.crc32(buf[offset : offset + n].numpy())
    assert _ext.checksum(buf, offset, n, num_threads=num_threads, use_ext=use_ext) == want


@pytest.mark.parametrize("use_ext", PATHS)
def test_checksum_detects_one_flipped_bit(use_ext):
    buf = _random_bytes(3 * 2**20)
    before = _ext.checksum(buf, use_ext=use_ext)
    buf[1_234_567] ^= 4
    assert _ext.checksum(buf, use_ext=use_ext) != before


def _mixed_tensors():
    return [
        torch.randn(3, 5),
        torch.randn(7).to(torch.bfloat16),
        torch.randn(2, 3, 1).half(),
        torch.randint(-(2**40), 2**40, (5,)),
        torch.randint(-9, 9, (3,), dtype=torch.int32),
        torch.rand(13) > 0.5,
        torch.randint(0, 255, (9,), dtype=torch.uint8),
        torch.empty(0, 4),
        torch.tensor(3.5),
    ]


@needs_ext
def test_pack_unpack_ext_equals_fallback():
    tensors = _mixed_tensors()
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        pos = (pos + t.nbytes + 63) // 64 * 64
    a, b = torch.zeros(pos, dtype=torch.uint8), torch.zeros(pos, dtype=torch.uint8)
    _ext.pack(tensors, offsets, a, use_ext=True)
    _ext.pack(tensors, offsets, b, use_ext=False)
    assert torch.equal(a, b)
    for use_ext in (True, False):
        dests = [torch.empty_like(t) for t in tensors]
        _ext.unpack(a, offsets, dests, num_threads=3, use_ext=use_ext)
        for d, t in zip(dests, tensors, strict=True):
            assert torch.equal(d.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


@needs_ext
def test_threaded_pack_of_large_tensors_matches_fallback():
    tensors = [torch.randn(1_500_000), torch.randn(3, 700_001).half(), torch.randn(11)]
    offsets = [0, 6_000_128, 10_200_256]
    a, b = torch.zeros(10_200_300, dtype=torch.uint8), torch.zeros(10_200_300, dtype=torch.uint8)
    _ext.pack(tensors, offsets, a, num_threads=4, use_ext=True)
    _ext.pack(tensors, offsets, b, use_ext=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("use_ext", PATHS)
def test_errors_name_the_argument(use_ext):
    buf = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] must be contiguous"):
        _ext.pack([torch.ones(2), torch.ones(4, 4).t()], [0, 16], buf, use_ext=use_ext)
    with pytest.raises(RuntimeError, match=r"offsets\[0\] = 40 with 32 bytes does not fit"):
        _ext.pack([torch.ones(8)], [40], buf, use_ext=use_ext)
    with pytest.raises(RuntimeError, match="buffer must be a 1-D uint8 tensor"):
        _ext.unpack(torch.zeros(16), [0], [torch.ones(1)], use_ext=use_ext)
    with pytest.raises(RuntimeError, match="dests and offsets must have equal lengths"):
        _ext.unpack(buf, [0, 8], [torch.ones(1)], use_ext=use_ext)
    with pytest.raises(RuntimeError, match="offset = 60 with 8 bytes does not fit"):
        _ext.checksum(buf, 60, 8, use_ext=use_ext)


@needs_ext
def test_the_native_checks_raise_instead_of_crashing():
    # gkd/weights/native.py checks arguments before calling gkd._C; these calls skip that and reach its
    # TORCH_CHECKs. A child process: an exception that crashes the interpreter (seen once on a CUDA torch)
    # fails this test with the signal instead of taking the test run down.
    code = textwrap.dedent(
        """
        import torch
        from gkd.weights import native as _ext
        buf = torch.zeros(64, dtype=torch.uint8)
        for call in (
            lambda: _ext._C.pack([torch.ones(4, 4).t()], [0], buf, 1),
            lambda: _ext._C.unpack(buf, [60], [torch.ones(2)], 1),
            lambda: _ext._C.checksum(buf, 60, 8, 1),
            lambda: _ext._C.copy_layout([torch.ones(2)], torch.zeros(2, 4, dtype=torch.int64),
                                        torch.zeros(1, dtype=torch.int64), buf, True, False, 1),
        ):
            try:
                call()
            except RuntimeError as e:
                print("raised:", str(e).splitlines()[0])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and "tensors[0] must be contiguous" in lines[0], lines
    assert "offsets[0] = 60 with 8 bytes does not fit" in lines[1] and "offset = 60" in lines[2], lines
    assert "records must be int64 [1, 4]" in lines[3], lines


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize("alignment", [8, 256])
def test_layout_records_and_copy_layout_round_trip(use_ext, alignment):
    tensors = _mixed_tensors()
    records, dims, end = _ext.layout_records(tensors, alignment, use_ext=use_ext)
    offsets = records[:, 0].tolist()
    assert all(o % alignment == 0 for o in offsets) and end == offsets[-1] + tensors[-1].nbytes
    assert records[:, 1].tolist() == [t.nbytes for t in tensors]
    assert records[:, 3].tolist() == [t.dim() for t in tensors]
    assert dims.tolist() == [d for t in tensors for d in t.shape]
    assert [_ext.code_dtype(c) for c in records[:, 2].tolist()] == [t.dtype for t in tensors]
    buf, ref = torch.zeros(end, dtype=torch.uint8), torch.zeros(end, dtype=torch.uint8)
    _ext.copy_layout(tensors, records, dims, buf, use_ext=use_ext)
    _ext.pack(tensors, offsets, ref, use_ext=False)
    assert torch.equal(buf, ref)
    dests = [torch.zeros_like(t) for t in tensors]
    _ext.copy_layout(dests, records, dims, buf, to_buffer=False, num_threads=3, use_ext=use_ext)
    for d, t in zip(dests, tensors, strict=True):
        assert torch.equal(d.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def _one_record(t: torch.Tensor, offset: int = 0):
    records = torch.tensor([[offset, t.nbytes, _ext.dtype_code(t.dtype), t.dim()]], dtype=torch.int64)
    return records, torch.tensor(list(t.shape), dtype=torch.int64)


@pytest.mark.parametrize("use_ext", PATHS)
@pytest.mark.parametrize(
    "tensor, reason",
    [
        (torch.ones(4, 3).t(), _ext.NOT_CONTIGUOUS),
        (torch.ones(4, 3), _ext.SHAPE),
        (torch.ones(3, 4, dtype=torch.int32), _ext.DTYPE),
        (torch.ones(3, 4, dtype=torch.float64), _ext.DTYPE),  # castable, but allow_cast is off
        (torch.ones(3, 4).to_sparse(), _ext.NOT_STRIDED),
    ],
    ids=["non-contiguous", "shape", "dtype", "float-without-cast", "sparse"],
)
def test_copy_layout_mismatches_copy_nothing(use_ext, tensor, reason):
    records, dims = _one_record(torch.ones(3, 4))  # float32 [3, 4] at offset 0
    good = torch.full((5,), 7, dtype=torch.int16)
    good_records, good_dims = _one_record(good, offset=64)
    records, dims = torch.cat([good_records, records]), torch.cat([good_dims, dims])
    buf = torch.zeros(128, dtype=torch.uint8)
    with pytest.raises(_ext.LayoutMismatch) as err:
        _ext.copy_layout([good, tensor], records, dims, buf, use_ext=use_ext)
    assert (err.value.index, err.value.reason) == (1, reason)
    assert str(err.value) == f"tensors[1] {_ext.MISMATCHES[reason]}"
    assert int(buf.count_nonzero()) == 0  # the matching tensor before it was not copied either


@pytest.mark.parametrize("use_ext", PATHS)
def test_copy_layout_range_and_cast(use_ext):
    src = torch.randn(3, 4, dtype=torch.float64)
    records, dims = _one_record(torch.ones(3, 4), offset=40)  # float32 [3, 4]: 48 bytes
    with pytest.raises(_ext.LayoutMismatch, match=r"tensors\[0\] does not fit in the buffer"):
        _ext.copy_layout([src.float()], records, dims, torch.zeros(64, dtype=torch.uint8), use_ext=use_ext)
    buf = torch.zeros(96, dtype=torch.uint8)
    _ext.copy_layout([src], records, dims, buf, allow_cast=True, use_ext=use_ext)  # converted on the way
    assert torch.equal(buf[40:88].view(torch.float32).view(3, 4), src.float())
    with pytest.raises(_ext.LayoutMismatch, match="dtype"):  # never into an integer record
        _ext.copy_layout(
            [src], *_one_record(torch.ones(3, 4, dtype=torch.int64)), buf, allow_cast=True, use_ext=use_ext
        )


@needs_ext
@pytest.mark.parametrize("nbytes", [0, 1, 5000, 3 * 4096])
def test_alloc_host_is_page_aligned_and_zeroed(nbytes):
    mem = _ext.alloc_host(nbytes, pin=True, use_ext=True)
    assert mem.tensor.shape == (nbytes,) and mem.tensor.dtype == torch.uint8
    assert mem.tensor.data_ptr() % os.sysconf("SC_PAGESIZE") == 0
    assert int(mem.tensor.sum()) == 0
    mem.tensor.fill_(7)  # writable to the last byte


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@needs_ext
def test_alloc_host_memory_is_freed_with_the_tensor():
    _ext.alloc_host(4096, pin=True, use_ext=True)  # with CUDA: the context exists before RSS is read
    before = _rss_bytes()
    for _ in range(24):  # 1.5 GiB touched and locked in total: a leak shows in RSS
        mem = _ext.alloc_host(64 << 20, pin=True, use_ext=True)
        mem.tensor.fill_(1)
        del mem
    assert _rss_bytes() - before < 256 << 20


_REFUSED_LOCK = textwrap.dedent("""
    import warnings
    import torch
    from gkd.weights import native as _ext
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mem = _ext.alloc_host(1 << 20, pin=True, use_ext=True)
    mem.tensor.fill_(3)
    if mem.pinned:  # only CUDA may pin past the limit: cudaHostRegister locks pages through the driver
        assert torch.cuda.is_available() and mem.tensor.is_pinned(), mem
        print("OK pinned by CUDA")
    else:
        assert "RLIMIT_MEMLOCK" in mem.error, mem
        assert any(issubclass(w.category, _ext.PinWarning) for w in caught), caught
        print("OK")
""")


def _no_memlock():
    # In the child before exec: no lockable memory and, as root, no CAP_IPC_LOCK (it overrides the limit).
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    if os.geteuid() == 0:
        pr_capbset_drop, cap_ipc_lock = 24, 14
        if ctypes.CDLL(None, use_errno=True).prctl(pr_capbset_drop, cap_ipc_lock, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_IPC_LOCK) failed")


@needs_ext
def test_refused_page_lock_warns_and_flags():
    out = subprocess.run(
        [sys.executable, "-c", _REFUSED_LOCK],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_no_memlock,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


_NO_EXT = textwrap.dedent("""
    import sys, warnings
    sys.modules["gkd._C"] = None  # as if installed with GKD_SKIP_EXT=1
    import torch
    from gkd.weights import native as _ext
    from gkd.weights.flat import FlatBuffer
    assert not _ext.HAS_EXT and "GKD_SKIP_EXT" in _ext.EXT_ERROR
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fb = FlatBuffer.pack({"a": torch.arange(5.0), "b": torch.ones(3, dtype=torch.bfloat16)}, pin=True)
    if torch.cuda.is_available():  # CUDA torch pins without the extension
        assert fb.pinned and fb.buffer.is_pinned(), fb
        assert not any(issubclass(w.category, _ext.PinWarning) for w in caught), caught
    else:
        assert not fb.pinned and fb.pin_error and any(issubclass(w.category, _ext.PinWarning) for w in caught)
    assert torch.equal(fb.unpack()["a"], torch.arange(5.0))
    print("OK")
""")


def test_without_extension_everything_falls_back():
    out = subprocess.run([sys.executable, "-c", _NO_EXT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: page-locking through cudaHostRegister")
def test_pinned_host_memory_is_registered_with_cuda():
    mem = _ext.alloc_host(8 << 20, pin=True, use_ext=True)
    assert mem.pinned and mem.error == "" and mem.tensor.is_pinned()
    mem.tensor.copy_(_random_bytes(8 << 20))
    on_gpu = mem.tensor.to("cuda", non_blocking=True)
    assert torch.equal(on_gpu.cpu(), mem.tensor)
