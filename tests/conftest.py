"""Test-wide settings.

TRITON_INTERPRET=1 must be set before any @triton.jit kernel is defined (ENV.md), so it is set
here, at import time of the root conftest, before test modules import the kernels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer end-to-end test")
    config.addinivalue_line("markers", "zoo: every torchvision classifier (hours on CPU); "
                            "runs only when selected: pytest -m zoo tests/zoo")


def pytest_collection_modifyitems(config, items):
    # the whole zoo runs only when the marker expression asks for it
    if "zoo" not in (config.getoption("markexpr") or ""):
        skip_zoo = pytest.mark.skip(reason="zoo: run with -m zoo")
        for item in items:
            if item.get_closest_marker("zoo") is not None:
                item.add_marker(skip_zoo)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
