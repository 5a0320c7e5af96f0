"""The Triton kernels lower through the real compiler for an H100 (sm_90), no GPU needed.

The CPU tests run the kernels in the interpreter, which accepts code that the compiler rejects;
this compiles the GPU configurations to PTX in a subprocess (TRITON_INTERPRET=0).
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def test_kernels_compile_for_sm90(tmp_path):
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as e:
        pytest.skip(f"triton's NVIDIA backend is unavailable: {e}")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "distributed_prune.kernels.triton.aot_check",
                          "--quick", "--arch", "90"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert len(lines) == 8 and all(ln.startswith("ok") for ln in lines)
    # the non-grouped conv kernels must use tensor cores (tl.dot -> mma / wgmma)
    assert all("tensor_cores=True" in ln for ln in lines if "grouped=False" in ln)
    # ptxas (shipped with Triton) assembled every variant without register spills
    if "no ptxas" not in out.stdout:
        assert all("spill_st=0B spill_ld=0B" in ln for ln in lines), out.stdout
