"""The denominator of ``perf/mfu``: one trainer device's peak dense TFLOP/s in the compute dtype.

Sources, first that applies (:func:`resolve_peak_tflops`, one log line says which):

1. ``trainer.peak_tflops`` (the config);
2. the vendor's datasheet figure for the device, matched on ``torch.cuda.get_device_name()``
   (:data:`DATASHEET`; dense, i.e. without 2:4 structured sparsity, which datasheets print at twice the
   dense rate). bf16 / fp16 compute take the 16-bit tensor-core figure; fp32 compute takes TF32 when
   torch lets fp32 matmuls use it (``torch.backends.cuda.matmul.allow_tf32``), else plain FP32;
3. a measured GEMM (:func:`measure_peak_tflops`): on a GPU whose name is not in the table, 8192^3 in
   the compute dtype, the best of a few repeats (large enough to reach the plateau: a 1024^3 product
   reached about a twentieth of an H100's bf16 peak); on CPU, 1024^3.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import NamedTuple

log = logging.getLogger(__name__)


class Peak(NamedTuple):
    """Dense TFLOP/s of one device from its datasheet: 16-bit (bf16/fp16) and TF32 tensor cores,
    plain FP32 (None: no such mode)."""

    name: str
    bf16: float
    tf32: float | None
    fp32: float


# (pattern on the lower-cased device name, figures). First match wins: specific variants before
# the family. Each figure is the datasheet's dense value (its sparse value halved where it only
# prints that).
DATASHEET: list[tuple[str, Peak]] = [
    # NVIDIA GH200 Grace Hopper Superchip datasheet (the H100 SXM's compute)
    (r"\bgh200\b", Peak("NVIDIA GH200", 989.4, 494.7, 67.0)),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 NVL, H200 SXM
    (r"\bh200\b.*\bnvl\b", Peak("NVIDIA H200 NVL", 835.5, 417.5, 60.0)),
    (r"\bh200\b", Peak("NVIDIA H200 SXM", 989.4, 494.7, 67.0)),
    # NVIDIA H100 Tensor Core GPU datasheet: H100 NVL, H100 PCIe, H100 SXM ("H100 80GB HBM3")
    (r"\bh100\b.*\bnvl\b", Peak("NVIDIA H100 NVL", 835.5, 417.5, 60.0)),
    (r"\bh100\b.*\bpcie\b", Peak("NVIDIA H100 PCIe", 756.5, 378.0, 51.0)),
    (r"\bh100\b", Peak("NVIDIA H100 SXM", 989.4, 494.7, 67.0)),
    # NVIDIA A100 Tensor Core GPU datasheet: the same figures for 40GB / 80GB, PCIe / SXM
    (r"\ba100\b", Peak("NVIDIA A100", 312.0, 156.0, 19.5)),
    # NVIDIA HGX B200 datasheet, per GPU (HGX B200, up to 1,000 W)
    (r"\bb200\b", Peak("NVIDIA B200 (HGX)", 2250.0, 1100.0, 75.0)),
    # NVIDIA L40S / L40 / L4 / A10 datasheets
    (r"\bl40s\b", Peak("NVIDIA L40S", 362.05, 183.0, 91.6)),
    (r"\bl40\b", Peak("NVIDIA L40", 181.05, 90.5, 90.5)),
    (r"\bl4\b", Peak("NVIDIA L4", 121.0, 60.0, 30.3)),
    (r"\ba10\b", Peak("NVIDIA A10", 125.0, 62.5, 31.2)),
    # NVIDIA Ada Lovelace GPU architecture whitepaper: GeForce RTX 4090, FP32 accumulate (not the 4090 D)
    (r"\brtx 4090\b(?! ?d\b)", Peak("NVIDIA GeForce RTX 4090", 165.2, 82.6, 82.6)),
    # AMD Instinct MI300X / MI325X data sheets (same peak compute); MI250X: no TF32, FP32 matrix
    (r"\bmi300x\b", Peak("AMD Instinct MI300X", 1307.4, 653.7, 163.4)),
    (r"\bmi325x\b", Peak("AMD Instinct MI325X", 1307.4, 653.7, 163.4)),
    (r"\bmi250x\b", Peak("AMD Instinct MI250X", 383.0, None, 95.7)),
]


def datasheet_peak(device_name: str) -> Peak | None:
    """The table's entry for a device name (as ``torch.cuda.get_device_name()`` gives it), or None."""
    name = " ".join(device_name.lower().replace("-", " ").replace("_", " ").split())
    for pattern, peak in DATASHEET:
        if re.search(pattern, name):
            return peak
    return None


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls on CUDA run on TF32 tensor cores."""
    import torch

    return bool(torch.backends.cuda.matmul.allow_tf32)


def _dtype_figure(peak: Peak, dtype, tf32: bool) -> tuple[float, str]:
    import torch

    if dtype in (torch.bfloat16, torch.float16):
        return peak.bf16, "bf16/fp16 dense"
    if dtype == torch.float32 and tf32 and peak.tf32 is not None:
        return peak.tf32, "tf32 dense"
    return peak.fp32, "fp32"


def measure_peak_tflops(device=None, dtype=None, *, size: int | None = None, repeats: int = 5) -> float:
    """Dense matmul TFLOP/s of this device, measured: the best of ``repeats`` timed
    ``[size, size] @ [size, size]`` products in ``dtype`` (default float32) after a warm-up; ``size``
    8192 on a GPU (the plateau), 1024 on CPU. Its random operands come from a generator of its own, so
    the global RNG state (restored by a resumed run before this runs) is left as it was."""
    import torch

    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    best = math.inf
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()  # a host sync: the product is done
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e12


def resolve_peak_tflops(device, dtype, override: float | None = None) -> float:
    """One trainer device's peak TFLOP/s for ``perf/mfu``: ``override`` (``trainer.peak_tflops``), else
    the datasheet figure for a known GPU, else a measured GEMM; logs which source it used."""
    import torch

    device = torch.device(device)
    if override:
        value, source = float(override), "trainer.peak_tflops"
    else:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        peak = datasheet_peak(name) if name else None
        if peak is not None:
            value, kind = _dtype_figure(peak, dtype, tf32_allowed())
            source = f"datasheet: {peak.name}, {kind}"
        else:
            value = measure_peak_tflops(device, dtype)
            what = f"{name!r} is not in gkd.metrics.flops.DATASHEET" if name else "CPU"
            source = f"measured GEMM in {str(dtype).replace('torch.', '')} ({what}; set trainer.peak_tflops)"
    log.info("perf/mfu against %.4g TFLOP/s per trainer device (%s)", value, source)
    return value


def mfu(flops: float, seconds: float, peak_tflops: float, devices: int) -> float:
    """Model FLOPs utilisation: ``flops`` done in ``seconds`` by ``devices`` devices of
    ``peak_tflops`` each."""
    return flops / max(seconds, 1e-9) / (peak_tflops * 1e12 * max(devices, 1))
