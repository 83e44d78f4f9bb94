"""``gkd.launch.placement``: the per-node GPU plan (layouts, tensor parallelism, fake and inherited GPUs,
shared single-GPU runs), each refusal's one-line message, the services' per-worker slices and the vLLM knobs;
the CPU threads of each process (auto split, explicit values, bad values)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from gkd.config import ConfigError, load_config
from gkd.launch.placement import (
    FAKE_GPUS_ENV,
    Found,
    PlacementError,
    VLLMOptions,
    available_cores,
    detect_gpus,
    plan,
    plan_threads,
    weight_backend,
    worker_gpus,
)

BASE = ["model.student_path=S", "data.train_files=[p.parquet]", "teacher.model_path=T"]


def _gpu_cfg(*overrides: str):
    return load_config(["configs/gpu_example.yaml"], [*BASE, *overrides])


def _gpus(n: int) -> Found:
    return Found(tuple(str(i) for i in range(n)), FAKE_GPUS_ENV)


def _all_devices(p) -> list[str]:
    return [*p.trainer, *p.pool(p.rollout), *p.pool(p.teacher)]


def test_the_8_gpu_example_gets_disjoint_sets():
    p = plan(_gpu_cfg(), _gpus(8))
    assert p.trainer == ("0", "1", "2", "3")
    assert p.rollout == (("4",), ("5",)) and p.teacher == (("6",), ("7",))
    assert sorted(_all_devices(p), key=int) == [str(i) for i in range(8)]  # each GPU exactly once
    assert p.weight_backend == "nccl" and not p.shared
    table = p.table()
    for row in (
        "trainer  ranks 0-3  4     0,1,2,3",
        "rollout  1          1     5",
        "teacher  0          1     6",
    ):
        assert row in table, table


@pytest.mark.parametrize(
    ("overrides", "trainer", "rollout", "teacher"),
    [
        # tensor parallelism: one slice of tensor_parallel_size GPUs per engine
        (
            ["trainer.n_gpus_per_node=2", "rollout.tensor_parallel_size=2", "rollout.workers=1",
             "teacher.n_gpus_per_node=4", "teacher.tensor_parallel_size=2"],
            ("0", "1"), (("2", "3"),), (("4", "5"), ("6", "7")),
        ),
        # a teacher served elsewhere takes no GPU here, whatever its section says
        (["teacher.launch=false", "trainer.n_gpus_per_node=6"], tuple("012345"), (("6",), ("7",)), ()),
        # CPU engines next to a GPU trainer: nothing to place for them; idle GPUs stay idle
        (["rollout.backend=hf", "rollout.n_gpus_per_node=0", "rollout.workers=3", "teacher.backend=hf",
          "teacher.n_gpus_per_node=0"], ("0", "1", "2", "3"), (), ()),
    ],
)  # fmt: skip
def test_layouts(overrides, trainer, rollout, teacher):
    p = plan(_gpu_cfg(*overrides), _gpus(8))
    assert (p.trainer, p.rollout, p.teacher) == (trainer, rollout, teacher)
    assert len(set(_all_devices(p))) == len(_all_devices(p))


def test_cpu_only_run_needs_no_gpu():
    cfg = load_config(["configs/cpu_tiny.yaml"], BASE)
    p = plan(cfg, Found((), "none"))
    assert (p.trainer, p.rollout, p.teacher, p.weight_backend) == ((), (), (), "gloo")
    for row in ("trainer  ranks 0-1  cpu   -", "rollout  0          cpu   -", "teacher  0          cpu   -"):
        assert row in p.table(), p.table()


@pytest.mark.parametrize(
    ("overrides", "found", "message"),
    [
        (["trainer.n_gpus_per_node=6"], 8,
         "node oversubscribed: trainer 6 + rollout 2 + teacher 2 = 10 GPUs asked, 8 present"),
        (["rollout.n_gpus_per_node=3", "rollout.tensor_parallel_size=2"], 8,
         "rollout.n_gpus_per_node=3 is not divisible by rollout.tensor_parallel_size=2"),
        (["teacher.workers=1"], 8,
         "teacher.workers=1 does not match teacher.n_gpus_per_node=2 / teacher.tensor_parallel_size=1 = 2 "
         "engines per node; set teacher.workers=2"),
        (["teacher.backend=hf", "teacher.tensor_parallel_size=2", "teacher.workers=1"], 8,
         "teacher.tensor_parallel_size=2 needs teacher.backend=vllm"),
        ([], 0, "trainer.n_gpus_per_node=4, rollout.n_gpus_per_node=2, teacher.n_gpus_per_node=2 ask for "
                "GPUs, but CUDA is not available here"),
        # allow_shared_gpu lets roles share, never two members of one NCCL group
        (["trainer.allow_shared_gpu=true"], 2,
         "trainer.n_gpus_per_node=4 > 2 GPU(s) present: the trainer's ranks form a NCCL group"),
        (["trainer.allow_shared_gpu=true", "trainer.n_gpus_per_node=1", "rollout.tensor_parallel_size=2",
          "rollout.workers=1"], 1,
         "rollout.tensor_parallel_size=2 > 1 GPU(s) present: one engine's tensor-parallel ranks form a NCCL"),
    ],
)  # fmt: skip
def test_refusals_are_one_line_naming_the_counts(overrides, found, message):
    cfg = _gpu_cfg(*overrides)
    with pytest.raises(PlacementError) as e:
        plan(cfg, _gpus(found) if found else Found((), "none"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_no_cuda_error_names_the_key_to_change():
    cfg = load_config(["configs/cpu_tiny.yaml"], [*BASE, "trainer.n_gpus_per_node=2"])
    with pytest.raises(
        PlacementError, match=r"^trainer\.n_gpus_per_node=2 asks for GPUs, but CUDA is not"
    ) as e:
        plan(cfg, Found((), "none"))
    assert "set trainer.n_gpus_per_node=0 to run on CPU" in str(e.value)


def test_shared_single_gpu_smoke_run():
    """allow_shared_gpu: every role on the one GPU, and the weight channel on gloo (NCCL refuses two ranks
    on one GPU); without it the same layout is refused and the channel would be NCCL."""
    layout = ["trainer.n_gpus_per_node=1", "rollout.workers=1", "rollout.n_gpus_per_node=1",
              "teacher.n_gpus_per_node=1", "teacher.workers=1"]  # fmt: skip
    with pytest.raises(PlacementError, match="3 GPUs asked, 1 present"):
        plan(_gpu_cfg(*layout), _gpus(1))
    assert weight_backend(_gpu_cfg(*layout)) == "nccl"
    cfg = _gpu_cfg(*layout, "trainer.allow_shared_gpu=true")
    p = plan(cfg, _gpus(1))
    assert (p.trainer, p.rollout, p.teacher) == (("0",), (("0",),), (("0",),))
    assert p.shared and p.weight_backend == weight_backend(cfg) == "gloo"
    assert "roles share GPUs" in p.table()
    # with more GPUs than asked, the roles still get their own
    p = plan(cfg, _gpus(3))
    assert not p.shared and len(set(_all_devices(p))) == 3


def test_shared_gpus_round_robin_keeps_each_group_distinct():
    cfg = _gpu_cfg("trainer.allow_shared_gpu=true", "trainer.n_gpus_per_node=2")
    p = plan(cfg, _gpus(2))  # trainer 2 + rollout 2 + teacher 2 on 2 GPUs
    assert p.trainer == ("0", "1") and p.rollout == (("0",), ("1",)) and p.teacher == (("0",), ("1",))


def test_detect_gpus(monkeypatch):
    assert detect_gpus({FAKE_GPUS_ENV: "3"}) == Found(("0", "1", "2"), FAKE_GPUS_ENV)
    with pytest.raises(PlacementError, match="GKD_FAKE_GPUS='two': expected a GPU count"):
        detect_gpus({FAKE_GPUS_ENV: "two"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_gpus({}) == Found((), "none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert detect_gpus({}).ids == ("0", "1")
    # a launcher started with CUDA_VISIBLE_DEVICES=5,7 hands out physical ids 5 and 7
    found = detect_gpus({"CUDA_VISIBLE_DEVICES": "5,7"})
    assert found == Found(("5", "7"), "cuda")
    p = plan(_gpu_cfg("trainer.n_gpus_per_node=1", "rollout.launch=false", "teacher.launch=false"), found)
    assert p.trainer == ("5",)


def test_worker_gpus_slices_per_worker():
    assert worker_gpus("4,5", 2, 1, env={}) == [["4"], ["5"]]
    assert worker_gpus("4,5,6,7", 2, 2, env={"CUDA_VISIBLE_DEVICES": "0"}) == [["4", "5"], ["6", "7"]]
    assert worker_gpus(None, 2, 1, env={"CUDA_VISIBLE_DEVICES": "2,3,4"}) == [["2"], ["3"]]  # inherited
    assert (
        worker_gpus(None, 2, 1, env={}) is None
        and worker_gpus("", 1, 1, env={"CUDA_VISIBLE_DEVICES": ""}) is None
    )
    for gpus, workers, tp, env, message in [
        (
            "4,5",
            1,
            1,
            {},
            r"--gpus 4,5: expected 1 distinct GPU ids \(--workers 1 x --tensor-parallel-size 1\)",
        ),
        ("4,4", 2, 1, {}, "expected 2 distinct GPU ids"),
        (None, 2, 2, {"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1 holds 2 GPU"),
    ]:
        with pytest.raises(PlacementError, match=message):
            worker_gpus(gpus, workers, tp, env=env)


def test_vllm_options_round_trip_through_flags():
    parser = argparse.ArgumentParser()
    VLLMOptions.add_args(parser, memory_default=None)
    opts = VLLMOptions(2, 0.7, 4096, 8192, True)
    assert VLLMOptions.from_args(parser.parse_args(opts.to_argv())) == opts
    assert opts.llm_kwargs() == {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.7,
        "max_model_len": 4096,
        "max_num_batched_tokens": 8192,
        "enforce_eager": True,
    }
    assert VLLMOptions().llm_kwargs() == {"tensor_parallel_size": 1}  # unset knobs: vLLM's defaults
    with pytest.raises(PlacementError, match=r"--gpu-memory-utilization 1.5 must lie in \(0, 1\]"):
        VLLMOptions(gpu_memory_utilization=1.5)


# ------------------------------------------------------------------------------------------- CPU threads


def _cpu_cfg(*overrides: str):
    return load_config(["configs/cpu_tiny.yaml"], [*BASE, *overrides])


@pytest.mark.parametrize(
    ("overrides", "cores", "want"),
    [
        # the demo's shape on a 2-core machine: 3 roles, one process each -> one thread each
        (["trainer.nproc_per_node=1"], 2, {"trainer": 1, "rollout": 1, "teacher": 1}),
        # cpu_tiny: 2 trainer ranks + rollout + teacher = 4 processes on 16 cores
        ([], 16, {"trainer": 4, "rollout": 4, "teacher": 4}),
        # more processes than cores: still at least one each
        (["rollout.workers=3"], 2, {"trainer": 1, "rollout": 1, "teacher": 1}),
        # a service started elsewhere takes no share of this node's cores
        (["trainer.nproc_per_node=1", "teacher.launch=false"], 8, {"trainer": 4, "rollout": 4}),
        # explicit values are honoured; auto roles split what they leave (12 - 2 x 3 = 6 for 2 processes)
        (["trainer.threads=3"], 12, {"trainer": 3, "rollout": 3, "teacher": 3}),
        (["trainer.threads=1", "rollout.threads=6"], 12, {"trainer": 1, "rollout": 6, "teacher": 4}),
        # explicit values beyond the cores are still what was asked for; auto keeps its floor of one
        (["trainer.threads=8", "rollout.threads=8", "teacher.threads=8"], 2,
         {"trainer": 8, "rollout": 8, "teacher": 8}),
        (["trainer.threads=8"], 4, {"trainer": 8, "rollout": 1, "teacher": 1}),
    ],
)  # fmt: skip
def test_threads_split_the_cores_between_the_processes_here(overrides, cores, want):
    assert plan_threads(_cpu_cfg(*overrides), 0, cores) == want
    p = plan(_cpu_cfg(*overrides), Found((), "none"), cores=cores)
    assert {role: p.threads_of(role) for role in want} == want and p.cores == cores


def test_threads_count_one_process_per_engine_gpu():
    """The 8-GPU example: 4 trainer ranks, 2 rollout and 2 teacher engines = 8 processes on 64 cores."""
    p = plan(_gpu_cfg(), _gpus(8), cores=64)
    assert dict(p.threads) == {"trainer": 8, "rollout": 8, "teacher": 8}
    assert p.child_env("rollout", ("4", "5")) == {
        "CUDA_VISIBLE_DEVICES": "4,5",
        "OMP_NUM_THREADS": "8",
        "MKL_NUM_THREADS": "8",
    }
    table = p.table()
    assert "trainer  ranks 0-3  4     0,1,2,3               8" in table, table
    assert "64 CPU cores here" in table


def test_cpu_plan_table_and_env_carry_the_threads():
    p = plan(_cpu_cfg(), Found((), "none"), cores=8)
    assert "trainer  ranks 0-1  cpu   -                     2" in p.table(), p.table()
    assert p.child_env("trainer", ()) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def test_the_demo_config_gets_the_demo_split_on_any_machine(tmp_path):
    """``gkd train --config runs/demo/config.yaml`` plans the threads ``gkd demo`` runs with: one each."""
    from gkd.demo.run import DemoSettings, write_config

    path = write_config(DemoSettings(), tmp_path, tmp_path / "t", tmp_path / "s", tmp_path / "p.parquet")
    cfg = load_config([str(path)], check=False)
    for cores in (2, 64):
        assert plan_threads(cfg, 0, cores) == {"trainer": 1, "rollout": 1, "teacher": 1}


@pytest.mark.parametrize("key", ["trainer.threads", "rollout.threads", "teacher.threads"])
def test_a_negative_thread_count_is_one_line_naming_the_key(key):
    with pytest.raises(PlacementError) as e:
        plan(_cpu_cfg(f"{key}=-2"), Found((), "none"), cores=4)
    assert str(e.value).startswith(f"{key}=-2: expected an integer >= 0") and "\n" not in str(e.value)


def test_a_thread_count_that_is_not_a_number_is_one_line_naming_the_key():
    with pytest.raises(
        ConfigError, match=r"^command line override: bad value for config key 'rollout.threads'"
    ):
        _cpu_cfg("rollout.threads=many")


def test_available_cores_is_this_process_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert available_cores() == 3
