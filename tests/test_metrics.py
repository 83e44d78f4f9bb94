"""Metrics: JSONL per step, TensorBoard, progress bar text, Chrome trace spans, the timeline PNG and CLI."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from gkd.cli import main as cli_main
from gkd.metrics.records import (
    METRIC_NAMES,
    MetricsLogger,
    SpanRecorder,
    cpu_memory_used_gb,
    max_memory_allocated_gb,
    metric_names,
    pack_lanes,
)
from gkd.metrics.timeline import draw_timeline, read_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _step_metrics(step: int) -> dict:
    m = dict.fromkeys(metric_names(2), 0.5)
    m["actor/kl_loss"] = 1.0 / (step + 1)
    m["rollout/policy_version"] = step
    return m


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_one_line_per_step_with_every_metric(tmp_path):
    import torch

    with MetricsLogger(tmp_path, total_steps=3, progress=False, required=metric_names(2)) as log:
        for t in range(3):
            m = _step_metrics(t)
            m["actor/grad_norm"] = torch.tensor(2.5)  # 0-d tensors become numbers
            log.log(t, m)
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(metric_names(2)) <= set(r)
        assert r["actor/grad_norm"] == 2.5
    assert rows[2]["actor/kl_loss"] == pytest.approx(1 / 3)
    assert "timing/wait_prev_prev_teacher" in metric_names(2)
    assert "timing/wait_prev_prev_teacher" not in metric_names(1) and set(METRIC_NAMES) <= set(
        metric_names(0)
    )


def test_required_metric_missing_and_non_numbers_are_errors(tmp_path):
    with MetricsLogger(tmp_path, progress=False, required=["actor/kl_loss", "timing/step"]) as log:
        with pytest.raises(KeyError, match="metrics missing timing/step"):
            log.log(0, {"actor/kl_loss": 1.0})
        with pytest.raises(TypeError, match="metric 'timing/step': expected a number"):
            log.log(0, {"actor/kl_loss": 1.0, "timing/step": "slow"})


def test_resume_drops_steps_of_the_interrupted_run(tmp_path):
    with MetricsLogger(tmp_path, progress=False) as log:
        for t in range(5):
            log.log(t, {"actor/kl_loss": float(t)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "actor/kl')  # torn line of a kill -9
    with MetricsLogger(tmp_path, progress=False, start_step=3) as log:  # resumed from the step-3 checkpoint
        log.log(3, {"actor/kl_loss": 30.0})
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["actor/kl_loss"] == 30.0


def test_progress_bar_shows_loss_throughput_staleness(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=4, progress=True) as log:
        for t in range(2):
            log.log(t, _step_metrics(t) | {"perf/throughput_tokens_per_s": 1234.4, "staleness/mean": 2.0})
        bar = log._bar
        assert bar.n == 2 and bar.total == 4
        assert "kl_loss=0.5000 tok/s=1234 staleness=2" in str(bar)


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, progress=False, tensorboard=True) as log:
        for t in range(3):
            log.log(t, {"actor/kl_loss": float(t), "timing/step": 0.1})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("actor/kl_loss")] == [0.0, 1.0, 2.0]


def test_memory_helpers_agree_with_the_kernel_and_follow_an_allocation():
    """``cpu_memory_used_gb`` is MemTotal - MemAvailable (psutil reads the same /proc/meminfo); on CPU
    ``max_memory_allocated_gb`` is this process's peak RSS (VmHWM) and grows by a 256 MiB buffer once its
    pages are touched."""
    import psutil

    vm = psutil.virtual_memory()
    assert cpu_memory_used_gb() == pytest.approx((vm.total - vm.available) / 2**30, abs=0.25)

    def vm_hwm_gb() -> float:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024 / 2**30

    assert max_memory_allocated_gb() == pytest.approx(vm_hwm_gb(), abs=0.01)
    rss = psutil.Process().memory_info().rss / 2**30
    buf = torch.ones(64 << 20)  # 256 MiB of float32, every page written
    peak = max_memory_allocated_gb()
    del buf
    assert peak == pytest.approx(vm_hwm_gb(), abs=0.01)
    assert peak >= rss + 0.24  # the peak holds what was resident before plus the buffer


def test_pack_lanes():
    assert pack_lanes([(0, 1), (1, 2), (2, 3)]) == [0, 0, 0]  # touching spans share a lane
    assert pack_lanes([(0, 3), (1, 2), (2.5, 4), (3, 5)]) == [0, 1, 1, 0]


def _recorded(tmp_path):
    """Two steps of a k=1 pipeline: generation of the next batch overlaps the update; two teacher
    requests overlap each other in the same lane."""
    rec = SpanRecorder(tmp_path / "trace.json")
    t = time.time() - 3.0
    rec.add("generate", t + 0.0, t + 1.0, process="rollout", batch=0)
    rec.add("generate", t + 1.0, t + 2.0, process="rollout", batch=1)
    rec.add("score", t + 1.0, t + 1.8, process="teacher", batch=0)
    rec.add("score", t + 1.5, t + 2.5, process="teacher", batch=1)  # overlaps batch 0's request
    rec.add("update", t + 1.8, t + 2.6, process="trainer", step=0)
    rec.add("sync", t + 2.6, t + 2.7, process="trainer", step=0, version=1)
    with rec.span("wait_prev_gen", lane="wait", step=1):
        time.sleep(0.01)
    rec.close()
    return rec


def test_trace_is_a_valid_chrome_trace(tmp_path):
    _recorded(tmp_path)
    trace = json.loads((tmp_path / "trace.json").read_text())
    events = trace["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == 7
    for e in spans:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e)
        assert isinstance(e["ts"], int | float) and e["dur"] >= 0
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(names.values()) == ["rollout", "teacher", "trainer"]
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    score = [e for e in spans if e["name"] == "score"]
    assert score[0]["tid"] != score[1]["tid"]  # overlapping requests on separate tids
    assert {lanes[(e["pid"], e["tid"])] for e in score} == {"score", "score #2"}
    update = next(e for e in spans if e["name"] == "update")
    assert update["dur"] == pytest.approx(0.8e6) and update["args"]["step"] == 0
    wait = next(e for e in spans if e["name"] == "wait_prev_gen")
    assert 0.009e6 < wait["dur"] < 5e6 and lanes[(wait["pid"], wait["tid"])] == "wait"


def test_trace_survives_resume_and_threads(tmp_path):
    _recorded(tmp_path)
    rec = SpanRecorder(tmp_path / "trace.json")  # a resumed run extends the trace

    def worker(i):
        for j in range(50):
            rec.add("generate", 2000.0 + i + j * 1e-3, 2000.0 + i + j * 1e-3 + 5e-4, process="rollout")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    rec.close()
    spans = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 7 + 200
    score = [e for e in spans if e["name"] == "score"]
    assert len({e["tid"] for e in score}) == 2  # sub-lanes are recomputed, not accumulated


def test_timeline_png_separates_overlapping_spans(tmp_path):
    _recorded(tmp_path)
    out = tmp_path / "plots" / "timeline.png"
    rows = draw_timeline(tmp_path / "trace.json", out)
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    labels = [r.label for r in rows]
    assert labels == [
        "rollout / generate",
        "teacher / score",
        "teacher / score #2",
        "trainer / update",
        "trainer / sync",
        "trainer / wait",
    ]
    for row in rows:  # no two spans drawn in one row overlap
        ordered = sorted(row.spans, key=lambda s: s[1])
        assert all(a[2] <= b[1] + 1e-9 for a, b in zip(ordered, ordered[1:], strict=False))
    gen = rows[0].spans
    assert gen[0][1] == pytest.approx(0.0) and gen[1][2] == pytest.approx(2.0)  # seconds from the first span
    assert [s[3] for s in gen] == ["b0", "b1"] and rows[3].spans[0][3] == "s0"  # bar labels


def test_timeline_cli_and_errors(tmp_path, capsys):
    _recorded(tmp_path)
    assert cli_main(["timeline", str(tmp_path)]) == 0
    assert (tmp_path / "timeline.png").read_bytes()[:8] == PNG_MAGIC
    assert cli_main(["timeline", str(tmp_path / "trace.json"), "-o", str(tmp_path / "t2.png")]) == 0
    assert "7 spans in 6 rows" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no trace at"):
        read_rows(tmp_path / "missing" / "trace.json")
    (tmp_path / "empty.json").write_text('{"traceEvents": []}')
    with pytest.raises(ValueError, match="no spans"):
        read_rows(tmp_path / "empty.json")


# ------------------------------------------------------------------------------------------ perf/mfu


@pytest.mark.parametrize(
    "name,table_name,bf16",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", "NVIDIA H200 SXM", 989.4),
        ("NVIDIA H200 NVL", "NVIDIA H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", "NVIDIA GH200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312.0),
        ("NVIDIA A100-PCIE-40GB", "NVIDIA A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100", 312.0),
        ("NVIDIA L40S", "NVIDIA L40S", 362.05),
        ("NVIDIA L40", "NVIDIA L40", 181.05),
        ("NVIDIA L4", "NVIDIA L4", 121.0),
        ("NVIDIA A10", "NVIDIA A10", 125.0),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA B200", "NVIDIA B200 (HGX)", 2250.0),
        ("AMD Instinct MI300X", "AMD Instinct MI300X", 1307.4),
    ],
)
def test_datasheet_peak_by_device_name(name, table_name, bf16):
    from gkd.metrics.flops import datasheet_peak

    peak = datasheet_peak(name)
    assert peak is not None and peak.name == table_name and peak.bf16 == bf16
    assert peak.fp32 < peak.bf16 and (peak.tf32 is None or peak.tf32 <= peak.bf16)


@pytest.mark.parametrize(
    "name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090 D", "NVIDIA GB200", "NVIDIA Tesla T4", "Some GPU"]
)
def test_unknown_device_names_are_not_guessed(name):
    from gkd.metrics.flops import datasheet_peak

    assert datasheet_peak(name) is None


def test_peak_sources_override_datasheet_measured(monkeypatch, caplog):
    import logging

    import torch

    from gkd.metrics import flops as peak_flops

    measured = []
    monkeypatch.setattr(peak_flops, "measure_peak_tflops", lambda dev, dt: measured.append((dev, dt)) or 42.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(peak_flops, "tf32_allowed", lambda: False)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="gkd.metrics.flops"):
        assert peak_flops.resolve_peak_tflops(cuda, torch.bfloat16, 700.0) == 700.0
        assert "700 TFLOP/s" in caplog.text and "(trainer.peak_tflops)" in caplog.text
        assert peak_flops.resolve_peak_tflops(cuda, torch.bfloat16) == 989.4
        assert "datasheet: NVIDIA H100 SXM, bf16/fp16 dense" in caplog.text
        assert peak_flops.resolve_peak_tflops(cuda, torch.float32) == 67.0  # TF32 off: plain FP32
        monkeypatch.setattr(peak_flops, "tf32_allowed", lambda: True)
        assert peak_flops.resolve_peak_tflops(cuda, torch.float32) == 494.7
        assert measured == []
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
        assert peak_flops.resolve_peak_tflops(cuda, torch.bfloat16) == 42.0
        assert measured == [(cuda, torch.bfloat16)]
        assert "'NVIDIA A10G' is not in gkd.metrics.flops.DATASHEET" in caplog.text
        # CPU: measured, never a device-name lookup
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: pytest.fail("CPU asked"))
        assert peak_flops.resolve_peak_tflops(torch.device("cpu"), torch.float32) == 42.0
        assert "(CPU; set trainer.peak_tflops)" in caplog.text


def test_measured_peak_leaves_the_rng_alone():
    import torch

    from gkd.metrics.flops import measure_peak_tflops

    torch.manual_seed(5)
    state = torch.get_rng_state()
    assert measure_peak_tflops("cpu", torch.float32, size=64, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), state)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the draws a seeded run expects


def test_mfu_formula():
    from gkd.metrics.flops import mfu

    # 6 TFLOP in 2 s on 2 devices of 1.5 TFLOP/s each: exactly their peak
    assert mfu(6e12, 2.0, 1.5, 2) == pytest.approx(1.0)
    assert mfu(6e12, 4.0, 1.5, 2) == pytest.approx(0.5)
    assert mfu(1e12, 0.0, 1.0, 1) > 0  # a zero duration stays finite
