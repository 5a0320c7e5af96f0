"""Kernel tests: Triton runs through its CPU interpreter unless a GPU run asks otherwise.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is defined; the kernel modules
are imported lazily by the dispatcher, so setting it here (at conftest import) is early enough.
GPU runs: ``TRITON_INTERPRET=0 python -m pytest tests/kernels -m gpu``.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import getpass  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    """Every test starts from the automatic backend choice and no tuning table."""
    from distributed_prune.kernels import dispatch
    monkeypatch.delenv("DPRUNE_KERNELS", raising=False)
    monkeypatch.setenv("DPRUNE_TUNING_FILE", os.devnull)
    with dispatch.set_backend(None):
        yield


@pytest.fixture(params=[pytest.param("cpu", id="interp"),
                        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def device(request):
    """'cpu' runs Triton kernels in the interpreter; 'cuda' compiles them for the GPU."""
    if request.param == "cpu":
        if not INTERPRETER:
            pytest.skip("Triton CPU tests need TRITON_INTERPRET=1")
    else:
        if not HAS_CUDA:
            pytest.skip("needs a CUDA device")
        if INTERPRETER:
            pytest.skip("GPU kernel tests need TRITON_INTERPRET=0")
        # Compare exact fp32 against exact fp32 (the reference would otherwise use TF32).
        old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        request.addfinalizer(lambda: (setattr(torch.backends.cudnn, "allow_tf32", old[0]),
                                      setattr(torch.backends.cuda.matmul, "allow_tf32", old[1])))
    return torch.device(request.param)


def _extensions_dir() -> Path:
    # Outside the working tree; stable across sessions so ninja rebuilds only changed sources
    # (a fresh build costs 20-35 s on 2 cores).  TORCH_EXTENSIONS_DIR wins when set.
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"dprune-torch-extensions-{getpass.getuser()}"


@pytest.fixture(scope="session")
def native_ops(tmp_path_factory):
    """The dprune native ops: installed, else JIT-built; skips (reason names 'native') if not."""
    from distributed_prune.kernels import native
    if os.environ.get("DPRUNE_TEST_FRESH_BUILD") == "1":
        build_dir = tmp_path_factory.mktemp("torch_extensions")
    else:
        build_dir = _extensions_dir()
    old = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(build_dir)
    try:
        ok = native.load(build=True)
    finally:
        if old is None:
            os.environ.pop("TORCH_EXTENSIONS_DIR", None)
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = old
    if not ok:
        pytest.skip(f"native extension unavailable: {native.unavailable_reason()}")
    return native


TOLERANCES = {
    # Results are rounded to the dtype after fp32 accumulation: allow about one unit in the last
    # place (bf16: 2^-8 relative, fp16: 2^-11) plus accumulation-order noise.
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}


@pytest.fixture
def tol():
    """``tol(dtype) -> dict(atol=..., rtol=...)`` for torch.testing.assert_close."""
    return TOLERANCES.__getitem__
