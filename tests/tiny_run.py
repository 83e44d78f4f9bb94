"""``gkd train`` on the CPU tiny models, as the end-to-end tests start it: the student, teacher and prompts
of ``scripts/make_cpu_tiny.py`` (nothing downloaded) and ``configs/cpu_tiny.yaml`` with every port given."""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BUILT: dict[int, tuple[Path, dict[str, str]]] = {}  # num_prompts -> (folder built once here, its paths)


def load_script(name: str):
    """The module ``scripts/<name>.py`` (scripts/ is not a package), registered in ``sys.modules`` (its
    dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_cpu_tiny():
    return load_script("make_cpu_tiny")


def build_tiny(folder: Path, num_prompts: int) -> dict[str, str]:
    """``scripts/make_cpu_tiny.py``'s ``build`` into ``folder``: paths of ``student``, ``teacher``,
    ``prompts``... Built once per process and ``num_prompts`` (the builder is deterministic: a tokenizer
    trained on a fixed corpus, seeded weights), copied for every later call (a test may change its copy)."""
    if num_prompts not in _BUILT:
        cache = Path(tempfile.mkdtemp(prefix="gkd-tiny-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        _BUILT[num_prompts] = (cache, make_cpu_tiny().build(cache, num_prompts=num_prompts))
    cache, paths = _BUILT[num_prompts]
    shutil.copytree(cache, folder, dirs_exist_ok=True)
    return {name: str(Path(folder) / Path(path).relative_to(cache)) for name, path in paths.items()}


def train_argv(tiny: dict[str, str], out: Path, ports: Sequence[int], *overrides: str) -> list[str]:
    """``python -m gkd.cli train`` (run it from ROOT) writing to ``out``; ``ports``: the teacher's
    frontend and backend, the rollout's frontend and backend, the weight channel's."""
    teacher, teacher_backend, rollout, rollout_backend, weights = ports
    return [
        *(sys.executable, "-m", "gkd.cli", "train", "--config", "configs/cpu_tiny.yaml"),
        f"model.student_path={tiny['student']}",
        f"teacher.model_path={tiny['teacher']}",
        f"data.train_files={tiny['prompts']}",
        f"trainer.output_dir={out}",
        f"teacher.server_port={teacher}",
        f"teacher.backend_port={teacher_backend}",
        f"rollout.server_port={rollout}",
        f"rollout.backend_port={rollout_backend}",
        f"rollout.weight_port={weights}",
        *overrides,
    ]


def tiny_fixture(num_prompts: int = 24):
    """A module-scoped ``tiny`` fixture: the CPU tiny models and prompts (:func:`build_tiny`), built once per
    test module that assigns it (``tiny = tiny_fixture()``)."""
    import pytest

    @pytest.fixture(scope="module", name="tiny")
    def _tiny(tmp_path_factory) -> dict[str, str]:
        return build_tiny(tmp_path_factory.mktemp("tiny"), num_prompts=num_prompts)

    return _tiny
