"""Fixtures of the distributed tests (launch helpers live in dist_launch.py)."""
import pytest

from dist_launch import DEBUG, SMALL, ok, torchrun


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """One DDP run of the debug config with 2 processes; every rank dumps its final state."""
    base = tmp_path_factory.mktemp("ddp")
    out, dump = base / "run", base / "ranks"
    r = ok(torchrun([DEBUG, f"output.dir={out}", *SMALL], cwd=base, DPRUNE_DUMP_RANK_STATE=dump))
    return {"out": out, "dump": dump, "stdout": r.stdout, "stderr": r.stderr}
