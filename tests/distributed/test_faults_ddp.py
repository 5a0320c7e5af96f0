"""Fault injection with 2 processes under ``torchrun --max-restarts``: a worker SIGKILLed at stage
boundaries and inside stages is restarted by torchrun with its peer, and the run completes with
the result of the uninterrupted 2-process run (single-process version: tests/e2e/test_faults.py)."""
import pytest

from dist_launch import DEBUG, SMALL, metrics, ok, summary, torchrun

#: in run order; inside-report only exists on rank 0 (the only writer)
ALL_POINTS = ["pretrain:0:logged", "pretrain:1", "after-base", "inside-prune", "after-pruned",
              "retrain:0:logged", "retrain:1", "before-summary", "inside-report"]


def same_result(ref, out):
    a, b = summary(ref), summary(out)
    assert b["status"] == "complete" and b["world_size"] == 2
    assert b["final"]["top1"] == a["final"]["top1"]
    assert b["plan_sha256"] == a["plan_sha256"] and b["plan_sha256"]
    assert b["setup"]["base_model_sha256"] == a["setup"]["base_model_sha256"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in rs]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(ref))
    assert (out / "report.md").is_file() and (out / "top1.png").is_file()


def _faulted(tmp_path, points, rank):
    out = tmp_path / "run"
    r = ok(torchrun([DEBUG, f"output.dir={out}", *SMALL], cwd=tmp_path,
                    torchrun_args=["--max-restarts", str(len(points))],
                    DPRUNE_FAULT=",".join(points), DPRUNE_FAULT_RANK=rank))
    assert (out / ".fault-injected").read_text().split() == points
    return out, r


def test_rank0_killed_after_base_and_inside_prune_resumes(tmp_path, ddp_run):
    out, r = _faulted(tmp_path, ["after-base", "inside-prune"], 0)
    assert r.stdout.count("resuming") == 2 and "after base.pt" in r.stdout
    same_result(ddp_run["out"], out)


@pytest.mark.slow
def test_rank0_killed_at_every_point_resumes(tmp_path, ddp_run):
    out, _ = _faulted(tmp_path, ALL_POINTS, 0)
    same_result(ddp_run["out"], out)


@pytest.mark.slow
def test_rank1_killed_at_every_point_resumes(tmp_path, ddp_run):
    out, _ = _faulted(tmp_path, [p for p in ALL_POINTS if p != "inside-report"], 1)
    same_result(ddp_run["out"], out)
