"""How the optional csrc extension (``distributed_prune._C``) is built.

Used by ``setup.py`` (``extension_modules()`` and ``build_ext_cmdclass()``, both inside a
try/except) and by :mod:`.native` for a development JIT build.  Imports nothing from the rest of
the package and imports torch only inside functions, so setup.py can load it without torch.

Environment:
    DPRUNE_NO_NATIVE=1    build nothing (pure-Python install; every op still works).
    DPRUNE_REQUIRE_NATIVE=1  make a failed compile fail the install (default: the extension is
                          ``optional``: setuptools skips it with a warning).
    DPRUNE_BUILD_CUDA=1/0 force / forbid the CUDA kernels (default: only when torch is a CUDA
                          build, nvcc is found AND a GPU is visible - so a CPU machine with a CUDA
                          torch wheel builds the CPU-only CppExtension).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

EXT_NAME = "distributed_prune._C"
ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


def cpp_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def cuda_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def compiler_available() -> bool:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) is not None or shutil.which("g++") is not None


def want_cuda() -> bool:
    """Whether to compile csrc/*.cu (see module docstring)."""
    env = os.environ.get("DPRUNE_BUILD_CUDA")
    if env is not None:
        return env == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        return False
    return bool(torch.version.cuda) and CUDA_HOME is not None and torch.cuda.is_available()


def compile_args(cuda: bool) -> dict:
    args = {"cxx": ["-O3"]}
    if cuda:
        args["cxx"].append("-DDPRUNE_WITH_CUDA")
        args["nvcc"] = ["-O3"]
    return args


def _rel(p: Path) -> str:
    # setuptools wants sources relative to the directory setup.py runs in.
    try:
        return os.path.relpath(p, os.getcwd())
    except ValueError:
        return str(p)


def extension_modules() -> list:
    """``[CppExtension | CUDAExtension]`` for setup.py's ``ext_modules``; ``[]`` when torch, a
    C++ compiler or the sources are missing, or DPRUNE_NO_NATIVE=1."""
    if os.environ.get("DPRUNE_NO_NATIVE") == "1" or not cpp_sources() or not compiler_available():
        return []
    try:
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except Exception:
        return []
    cuda = want_cuda() and bool(cuda_sources())
    sources = [_rel(p) for p in cpp_sources() + (cuda_sources() if cuda else [])]
    cls = CUDAExtension if cuda else CppExtension
    optional = os.environ.get("DPRUNE_REQUIRE_NATIVE") != "1"
    return [cls(EXT_NAME, sources=sources, extra_compile_args=compile_args(cuda),
                optional=optional)]


def build_ext_cmdclass() -> dict:
    """``{"build_ext": BuildExtension}`` when extensions will be built, else ``{}``."""
    if not extension_modules():
        return {}
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
