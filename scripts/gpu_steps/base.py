"""The GPU proof run's first steps: install, environment, the extension, the test suite on CUDA, one
NCCL trainer rank, the weight channel, and the e2e row's entry."""

from __future__ import annotations

import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_steps.common import (
    ROOT,
    _cuda_time,
    _free_port,
    _gbps,
    _on_gpu,
    _sh,
    _sync,
    _tiny_qwen,
    random_batch,
    start_sender,
)

STEPS_PY = str(ROOT / "scripts" / "gpu_check_steps.py")  # torchrun re-runs the entry point as one rank


def step_setup(args) -> dict:
    """Wheels from .whl/ and gkd itself (--no-deps) into the site dir; the extension is built there
    against this machine's torch (GKD_REQUIRE_EXT=1: a failed build fails the step) and copied next to
    the tree's gkd/, so the tests (which import gkd from the tree) load it too."""
    site = Path(args.site)
    site.mkdir(parents=True, exist_ok=True)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(site),
    ]
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
    start = time.perf_counter()
    if not wheels or _sh([*pip, "--no-compile", *wheels]) != 0:
        return {"status": "FAIL", "headline": f"no wheels installed from {args.wheels}"}
    t_wheels = time.perf_counter() - start
    env = {**os.environ, "GKD_REQUIRE_EXT": "1"}
    with open(args.log, "w") as log:
        rc = _sh([*pip, "-v", "--no-build-isolation", str(ROOT)], log=log, env=env)
    t_build = time.perf_counter() - start - t_wheels
    built = sorted((site / "gkd").glob("_C*.so"))
    if rc != 0 or not built:
        print(Path(args.log).read_text()[-4000:])
        return {"status": "FAIL", "headline": f"pip install of gkd failed (exit {rc}); see install.log"}
    for so in built:
        shutil.copy2(so, ROOT / "gkd" / so.name)
    return {
        "status": "PASS",
        "headline": f"wheels {t_wheels:.0f}s, gkd + extension {t_build:.0f}s",
        "wheels": [Path(w).name for w in wheels],
        "wheels_s": round(t_wheels, 1),
        "build_s": round(t_build, 1),
        "extension": built[0].name,
    }


def step_environment(args) -> dict:
    import torch
    import transformers
    import triton

    from gkd.weights import native as _ext

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    fmt = lambda v: "unlimited" if v == resource.RLIM_INFINITY else f"{v // 1024} KiB"  # noqa: E731
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        smi_text = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        smi_text = f"nvidia-smi failed: {e}"
    figs = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "nvidia_smi": smi_text,
        "ulimit_l": f"soft {fmt(soft)}, hard {fmt(hard)}",
        "cpus": os.cpu_count(),
        "gkd_has_ext": _ext.HAS_EXT,
    }
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        figs["liger_kernel"] = version("liger-kernel")
    except ImportError as e:
        figs["liger_kernel"] = f"missing ({e})"
    if not torch.cuda.is_available():
        return {**figs, "status": "FAIL", "headline": f"no CUDA device (torch {torch.__version__})"}
    p = torch.cuda.get_device_properties(0)
    figs.update(
        gpu=p.name,
        capability=f"{p.major}.{p.minor}",
        sms=p.multi_processor_count,
        memory_gib=round(p.total_memory / 2**30, 1),
        nccl=".".join(map(str, torch.cuda.nccl.version())),
    )
    headline = (
        f"{p.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"triton {triton.__version__}, "
        f"NCCL {figs['nccl']}, ulimit -l {fmt(soft)}"
    )
    return {**figs, "status": "PASS", "headline": headline}


def step_extension(args) -> dict:
    import torch

    from gkd.weights import native as _ext

    log = Path(args.log).read_text(errors="replace").splitlines() if Path(args.log).is_file() else []
    build_lines = [l for l in log if re.search(r"gkd:|\[\d+/\d+\]|Building CXX|Linking CXX|error", l)]
    figs: dict = {"build_log_tail": build_lines[-12:] or log[-12:], "has_ext": _ext.HAS_EXT}
    if not _ext.HAS_EXT:
        return {**figs, "status": "FAIL", "headline": f"gkd._C not importable: {_ext.EXT_ERROR}"}
    n = 256 << 20
    tensor, locked, registered, error = _ext._C.alloc_host(n, True, True)
    mem = _ext.alloc_host(n, pin=True)  # the public path: pinned must be True here
    figs.update(
        locked=locked,
        cuda_registered=registered,
        torch_is_pinned=tensor.is_pinned(),  # torch's own bookkeeping; see the verdict below
        error=error,
        public_pinned=mem.pinned,
    )
    tensor.fill_(1)
    pageable = torch.ones(n, dtype=torch.uint8)
    torch_pinned = torch.ones(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    for name, src in (("gkd_pinned", tensor), ("pageable", pageable), ("torch_pinned", torch_pinned)):
        figs[f"h2d_gbps_{name}"] = _gbps(n, _cuda_time(lambda s=src: dst.copy_(s, non_blocking=True)))
    figs["pinned_over_pageable"] = round(figs["h2d_gbps_gkd_pinned"] / figs["h2d_gbps_pageable"], 2)
    # The verdict is the copy engine's: memory the driver has registered copies at pinned speed.
    # torch 2.11's Tensor.is_pinned() says False for memory registered outside its host allocator
    # (measured on an H100: 54.6 GB/s, the same as torch's own pin_memory), so it is recorded, not judged.
    figs["fraction_of_torch_pinned"] = round(figs["h2d_gbps_gkd_pinned"] / figs["h2d_gbps_torch_pinned"], 3)
    ok = (
        locked
        and registered
        and mem.pinned
        and figs["fraction_of_torch_pinned"] >= 0.8
        and torch.equal(dst.cpu()[:4096], torch_pinned[:4096])
    )
    headline = (
        f"locked={locked} registered={registered} torch.is_pinned={figs['torch_is_pinned']}; H2D "
        f"{figs['h2d_gbps_gkd_pinned']} GB/s pinned vs {figs['h2d_gbps_pageable']} pageable "
        f"(torch pin_memory {figs['h2d_gbps_torch_pinned']})"
    )
    return {**figs, "status": "PASS" if ok else "FAIL", "headline": headline}


def step_tests(args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rsf",
        "-p",
        "no:cacheprovider",
        "--durations=10",
        *args.paths,
    ]
    try:
        import xdist  # noqa: F401

        cmd[4:4] = ["-n", "4"]  # Triton compiles on the CPU: four workers share the GPU
    except ImportError:
        pass
    # Lines go to the log as they come, so a step killed at its timeout still shows how far it got.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    kept: list[str] = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        kept.append(line.rstrip("\n"))
    proc.wait()
    out = subprocess.CompletedProcess(cmd, proc.returncode, "\n".join(kept), "")
    lines = out.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", summary)}
    skips = [l for l in lines if l.startswith("SKIPPED")]
    failures = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
    return {
        "status": "PASS" if out.returncode == 0 else "FAIL",
        "headline": summary.strip("= "),
        "counts": counts,
        "skipped": skips,
        "failed": failures,
        "exit_code": out.returncode,
    }


def step_trainer(args) -> dict:
    """Re-runs itself as one torchrun rank (NCCL), so the step is one process tree under one timeout."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        STEPS_PY,
        "trainer-rank",
        "--json",
        args.json,
    ]
    rc = _sh(cmd)
    if rc != 0 or not Path(args.json).is_file():
        return {"status": "FAIL", "headline": f"torchrun exited {rc}"}
    return json.loads(Path(args.json).read_text())


def step_trainer_rank(args) -> dict:
    import torch
    import torch.distributed as dist

    from gkd.config import load_config
    from gkd.trainer.recipe import _init_distributed, shard_fsdp2
    from gkd.trainer.step import build_optimizer, pack_micro_batches, train_step

    gpus = 1 if _on_gpu() else 0  # 0: gloo on CPU, the smoke test of this code off the GPU
    cfg = load_config(
        [],
        [
            "model.student_path=unused",
            f"trainer.n_gpus_per_node={gpus}",
            "trainer.strategy=fsdp2",
            "model.param_dtype=float32",
            "model.compute_dtype=bfloat16",
            "optim.lr=1e-6",
        ],
        check=False,
    )
    rank, world, device = _init_distributed(cfg)
    backend = dist.get_backend() if dist.is_initialized() else "none"
    torch.manual_seed(0)
    vocab, k = 32000, 64
    model = _tiny_qwen(vocab, hidden=512, layers=4, intermediate=1408, heads=8, kv_heads=2).to(device)
    model = shard_fsdp2(model, device, torch.bfloat16)
    optimizer, lr_sched = build_optimizer(model, cfg.optim, total_steps=10)
    samples, teachers = random_batch(vocab, k, seed=1)
    full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()  # noqa: E731
    before = {n: full(p).float().clone() for n, p in model.named_parameters()}
    micro = pack_micro_batches(samples, teachers, 4096, pad_id=0)
    _sync()
    start = time.perf_counter()
    metrics = train_step(model, optimizer, lr_sched, micro, cfg, device=device)
    _sync()
    seconds = time.perf_counter() - start
    changed = total = 0
    for n, p in model.named_parameters():
        after = full(p)
        changed += int((after.float() != before[n]).sum())
        total += after.numel()
    dtypes = sorted({str(full(p).dtype) for p in model.parameters()})
    frac = changed / total
    figs = {
        "backend": backend,
        "world": world,
        "loss": metrics["actor/kl_loss"],
        "grad_norm": metrics["actor/grad_norm"],
        "fraction_changed": round(frac, 4),
        "param_dtypes": dtypes,
        "tokens": metrics["actor/response_tokens"],
        "step_s": round(seconds, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpus else None,
    }
    import math

    ok = (
        backend == ("nccl" if gpus else "gloo")
        and frac > 0.9
        and math.isfinite(figs["loss"])
        and dtypes == ["torch.float32"]
    )
    headline = (
        f"{backend} fsdp2, loss {figs['loss']:.4f}, grad norm {figs['grad_norm']:.4f}, "
        f"{100 * frac:.1f}% of parameters changed at lr 1e-6"
    )
    if dist.is_initialized():
        dist.destroy_process_group()
    return {**figs, "status": "PASS" if ok else "FAIL", "headline": headline}


def _nccl_channel() -> dict:
    import torch

    from gkd.weights import native as _ext
    from gkd.weights.transfer import WeightSender, init_weight_group

    gpu = _on_gpu()
    device = "cuda" if gpu else "cpu"
    group = init_weight_group("127.0.0.1", _free_port(), 0, 1, backend="nccl" if gpu else "gloo")
    g = torch.Generator(device=device).manual_seed(0)
    # fp32 master weights, 2 GiB: 1 GiB on the wire as bf16 (1/64 of it off the GPU)
    rows = 4096 if gpu else 64
    master = {f"layer{i}.w": torch.randn(rows, 8192, device=device, generator=g) for i in range(16)}
    sender = WeightSender(group, master, dtype=torch.bfloat16)
    sender.handshake()
    sender.sync(1)  # warm-up: buffers, NCCL communicator
    _sync()
    start = time.perf_counter()
    stats = sender.sync(2)
    _sync()
    sync_s = time.perf_counter() - start
    buf = sender._buffers[0]
    figs = {
        "backend": "nccl" if gpu else "gloo",
        "wire_bytes": stats["bytes"],
        "buckets": stats["buckets"],
        "sync_s": round(sync_s, 4),
        "sync_gbps": _gbps(int(stats["bytes"]), sync_s),
        "checksum": sender.checksum,
        "bucket_bytes": buf.numel(),
    }
    figs["broadcast_ms_per_bucket"] = round(
        1e3 * _cuda_time(lambda: group.wait(group.broadcast(buf), "b")), 3
    )
    if hasattr(_ext, "device_checksum"):
        figs["checksum_ms_per_bucket"] = round(1e3 * _cuda_time(lambda: _ext.device_checksum(buf)), 3)
    host = buf.cpu()
    figs["crc32_host_ms_per_bucket"] = round(1e3 * _cuda_time(lambda: _ext.checksum(host), reps=2), 1)
    sender.close()
    return figs


def _gloo_into_cuda_model() -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from gkd.weights.transfer import WeightReceiver, init_weight_group

    port = _free_port()
    with ThreadPoolExecutor(2) as pool:
        tx, rx = [
            f.result(timeout=60)
            for f in [pool.submit(init_weight_group, "127.0.0.1", port, r, 2, backend="gloo") for r in (0, 1)]
        ]
    torch.manual_seed(0)
    source = _tiny_qwen(32000, hidden=512, layers=4, intermediate=1408, heads=8, kv_heads=2)  # fp32, CPU
    engine = _tiny_qwen(32000, hidden=512, layers=4, intermediate=1408, heads=8, kv_heads=2)
    engine = engine.to("cuda" if _on_gpu() else "cpu", torch.bfloat16)
    receiver = WeightReceiver(rx, engine, staging="host", pin=_on_gpu())
    t, errors = start_sender(tx, source, torch.bfloat16)
    receiver.handshake()
    start = time.perf_counter()
    version = receiver.receive()
    receiver.apply(engine)
    _sync()
    seconds = time.perf_counter() - start
    t.join(60)
    if errors:
        raise errors[0]
    want = dict(source.named_parameters())
    same = all(
        torch.equal(p.detach().cpu(), want[n].detach().to(torch.bfloat16))
        for n, p in engine.named_parameters()
    )
    staged_pinned = all(getattr(fb, "pinned", False) for fb in receiver._staging)
    return {
        "gloo_version": version,
        "gloo_identical": same,
        "gloo_staging_pinned": staged_pinned,
        "gloo_receive_apply_s": round(seconds, 3),
    }


def step_weights(args) -> dict:
    figs = _nccl_channel()
    figs.update(_gloo_into_cuda_model())
    pinned_ok = figs["gloo_staging_pinned"] or not _on_gpu()
    ok = figs["gloo_identical"] and pinned_ok and figs["gloo_version"] == 1
    headline = (
        f"{figs['backend']} sync {figs['wire_bytes'] / 2**30:.2f} GiB bf16 in {figs['sync_s']:.3f}s; "
        "per "
        f"{figs['bucket_bytes'] >> 20} MiB bucket: broadcast {figs['broadcast_ms_per_bucket']} ms, "
        f"checksum {figs.get('checksum_ms_per_bucket', 'n/a')} ms; gloo->CUDA identical="
        f"{figs['gloo_identical']}, pinned staging={figs['gloo_staging_pinned']}"
    )
    return {**figs, "status": "PASS" if ok else "FAIL", "headline": headline}


def step_e2e(args) -> dict:
    from gpu_steps.e2e import run

    return run(args)
