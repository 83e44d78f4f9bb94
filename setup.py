"""Builds gkd's optional C++ extension through CMake (CMakeLists.txt is the one source of truth).

The extension is optional: with ``GKD_SKIP_EXT=1``, or when ``csrc/`` holds no sources, the package
installs as pure Python and ``gkd._ext`` falls back to torch code.
"""

import os
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


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import torch  # the build needs the torch it will run against (pip --no-build-isolation)

        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(["cmake", str(ext.sourcedir), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


def _ext_modules():
    if os.environ.get("GKD_SKIP_EXT", "0") == "1":
        return []
    csrc = ROOT / "csrc"
    if not csrc.is_dir() or not any(csrc.glob("*.cpp")):
        return []
    return [CMakeExtension("gkd._C", ROOT)]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": CMakeBuild})
