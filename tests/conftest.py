"""Test-wide settings.

TRITON_INTERPRET=1 must be set before any @triton.jit kernel is defined (Triton reads it when a
kernel is decorated), so it is set here, at import time of the root conftest, before test modules
import the kernels.

Every test runs in an empty temporary working directory, and so does every subprocess it starts
(``python -m distributed_prune``, torchrun): a relative path written by mistake lands there, never
in the repository. PYTHONPATH names this checkout so that those subprocesses import the package
under test from any directory, never another installed copy.
"""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long fault-injection matrices; runs only when selected: "
                            "pytest -m slow")
    config.addinivalue_line("markers", "zoo: every torchvision classifier (hours on CPU); "
                            "runs only when selected: pytest -m zoo tests/zoo")


def pytest_collection_modifyitems(config, items):
    # the whole zoo and the long fault matrices run only when the marker expression names them
    # (bash launch/test.sh -m zoo | -m slow); CI runs their representative unmarked subsets
    markexpr = config.getoption("markexpr") or ""
    for marker in ("zoo", "slow"):
        if marker not in markexpr:
            skip_long = pytest.mark.skip(reason=f"{marker}: run with -m {marker}")
            for item in items:
                if item.get_closest_marker(marker) is not None:
                    item.add_marker(skip_long)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device")
    for item in items:
        # the marker, not item.keywords: keywords also hold the names of the directories above
        # the test, so a checkout in a folder named "gpu" would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _temporary_cwd(tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def host_reads(monkeypatch):
    """Spy on the calls that read device memory from the host (``item``, ``tolist``, ``cpu``,
    ``nonzero``): returns the list of their names, called from now on. On CPU nothing syncs, so
    these calls stand for the host synchronisations they would be on a GPU."""
    calls = []
    for name in ("item", "tolist", "cpu", "nonzero"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _r=real, _n=name, **k: calls.append(_n) or _r(self, *a, **k))
    real_nz = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append("nonzero") or real_nz(*a, **k))
    return calls
