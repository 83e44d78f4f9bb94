"""Builds gkd's optional C++ extension through CMake (CMakeLists.txt is the one source of truth).

The extension is optional: with ``GKD_SKIP_EXT=1``, or when ``csrc/`` holds no sources, the package
installs as pure Python and ``gkd.weights.native`` falls back to torch code. A failed configure or compile prints
one warning and installs without it, unless ``GKD_REQUIRE_EXT=1`` (CI) makes that an error.
``CMAKE`` names the cmake executable (default: ``cmake`` on PATH).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = sourcedir


class ExtBuildError(Exception):
    """One step of the extension build failed; the message says which."""


def _run(step: str, cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True)
    except FileNotFoundError as exc:
        raise ExtBuildError(f"{step}: {cmd[0]} not found ({exc.strerror})") from exc
    except subprocess.CalledProcessError as exc:
        raise ExtBuildError(f"{step}: `{' '.join(cmd[:2])} ...` exited with {exc.returncode}") from exc


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        # Each extension that fails is dropped from the list, so nothing later (in-place copy, wheel
        # contents, editable mapping) looks for its output.
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
            except ExtBuildError as exc:
                # An output left by an earlier build in this build folder must not ship as this one.
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
                if os.environ.get("GKD_REQUIRE_EXT", "0") == "1":
                    raise SystemExit(
                        f"gkd: the C++ extension {ext.name} failed to build ({exc}) and "
                        "GKD_REQUIRE_EXT=1 requires it; see the output above"
                    ) from exc
                print(
                    f"gkd: WARNING: the optional C++ extension {ext.name} was not built ({exc}; output "
                    "above); gkd will use its torch fallback (no page-locked host buffers on CPU-only "
                    "torch, single-threaded checksums). Set GKD_REQUIRE_EXT=1 to make this an error.",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                built.append(ext)
        self.extensions[:] = built

    def build_extension(self, ext: CMakeExtension) -> None:
        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        cfg = "Debug" if self.debug else "Release"
        # Ninja when there is one (build-system.requires brings it into pip's isolated build); a build
        # folder per generator, since CMake refuses to switch generators in an existing one.
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        build_dir = Path(self.build_temp).resolve() / f"{ext.name}-{'ninja' if generator else 'make'}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = os.environ.get("CMAKE", "cmake")
        args = [
            *generator,
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        jobs = str(max(1, os.cpu_count() or 1))
        _run("cmake configure", [cmake, str(ext.sourcedir), *args], build_dir)
        _run("cmake build", [cmake, "--build", ".", "--config", cfg, "-j", jobs], build_dir)


def _ext_modules():
    if os.environ.get("GKD_SKIP_EXT", "0") == "1":
        return []
    csrc = ROOT / "csrc"
    if not csrc.is_dir() or not any(csrc.glob("*.cpp")):
        return []
    return [CMakeExtension("gkd._C", ROOT)]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": CMakeBuild})
