"""How the optional csrc extension (``distributed_prune._C``) is built.

Used by ``setup.py`` (``extension_modules()`` and ``build_ext_cmdclass()``, both inside a
try/except) and by :mod:`.native` for a development JIT build.  Imports nothing from the rest of
the package and imports torch only inside functions, so setup.py can load it without torch.

Environment:
    DPRUNE_NO_NATIVE=1    build nothing (pure-Python install; every op still works).
    DPRUNE_REQUIRE_NATIVE=1  make a failed compile fail the install (default: the extension is
                          ``optional``: setuptools skips it with a warning).

The ops are written against ATen only (cuDNN does the GPU work), so one C++ extension serves CPU
and CUDA tensors and no nvcc is needed.
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


def compiler_available() -> bool:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) is not None or shutil.which("g++") is not None


def compile_args() -> dict:
    return {"cxx": ["-O3"]}


def _rel(p: Path) -> str:
    # setuptools wants sources relative to the directory setup.py runs in.
    try:
        return os.path.relpath(p, os.getcwd())
    except ValueError:
        return str(p)


def extension_modules() -> list:
    """``[CppExtension]`` for setup.py's ``ext_modules``; ``[]`` when torch, a
    C++ compiler or the sources are missing, or DPRUNE_NO_NATIVE=1."""
    if os.environ.get("DPRUNE_NO_NATIVE") == "1" or not cpp_sources() or not compiler_available():
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except Exception:
        return []
    sources = [_rel(p) for p in cpp_sources()]
    optional = os.environ.get("DPRUNE_REQUIRE_NATIVE") != "1"
    return [CppExtension(EXT_NAME, sources=sources, extra_compile_args=compile_args(),
                optional=optional)]


def build_ext_cmdclass() -> dict:
    """``{"build_ext": BuildExtension}`` when extensions will be built, else ``{}``."""
    if not extension_modules():
        return {}
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
