"""Packaging: the optional extension never breaks an install (one warning, torch fallback), unless
GKD_REQUIRE_EXT=1; the build environment gets the runtime's torch; the module links no CUDA and no
libtorch beyond c10/torch_cpu/torch_python. (scripts/check_wheel.sh, a CI stage, builds the sdist and the
wheel with isolation and runs the wheel in a clean venv.)"""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from gkd.weights import native as _ext

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _copy_tree(dest: Path) -> Path:
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the tree is copied from git ls-files)")
    return _copy_tree(tmp_path_factory.mktemp("src"))


def _build_wheel(source: Path, out: Path, **env) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-v",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        str(out),
        str(source),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def test_a_failed_extension_build_installs_the_torch_fallback_with_one_warning(source, tmp_path):
    done = _build_wheel(source, tmp_path, CMAKE="false", GKD_REQUIRE_EXT="0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    warnings = [l for l in (done.stdout + done.stderr).splitlines() if "gkd: WARNING" in l]
    assert len(warnings) == 1 and "gkd._C was not built (cmake configure" in warnings[0], warnings
    assert "torch fallback" in warnings[0] and "GKD_REQUIRE_EXT=1" in warnings[0]
    (wheel,) = tmp_path.glob("gkd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("gkd/weights/native.py") for n in names), names
    assert not any(re.search(r"gkd/_C\.", n) for n in names), names


def test_require_ext_turns_a_failed_build_into_an_error(source, tmp_path):
    done = _build_wheel(source, tmp_path, CMAKE="false", GKD_REQUIRE_EXT="1")
    assert done.returncode != 0
    assert "GKD_REQUIRE_EXT=1 requires it" in done.stdout + done.stderr
    assert not list(tmp_path.glob("gkd-*.whl"))


def _pin(requirements: list[str], name: str) -> str:
    (req,) = [r for r in requirements if re.split(r"[=<>!~ ]", r, maxsplit=1)[0] == name]
    return req


def test_the_build_environment_gets_the_runtime_torch():
    build, runtime = PYPROJECT["build-system"]["requires"], PYPROJECT["project"]["dependencies"]
    assert _pin(build, "torch") == _pin(runtime, "torch")  # the extension's ABI is torch's
    assert all("==" in r for r in build), build
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()


@pytest.mark.skipif(not _ext.HAS_EXT, reason=str(_ext.EXT_ERROR))
def test_the_extension_links_only_c10_torch_cpu_and_torch_python():
    if shutil.which("readelf") is None:
        pytest.skip("needs readelf (binutils)")
    from gkd import _C

    dynamic = subprocess.run(
        ["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
    torch_libs = {n for n in needed if re.match(r"lib(c10|torch|cuda|cudart|nvrtc)", n)}
    assert torch_libs == {"libc10.so", "libtorch_cpu.so", "libtorch_python.so"}, needed
    assert "RPATH" not in dynamic and "RUNPATH" not in dynamic  # no path into a build-time torch
