"""The run directory: resume points, the metrics log, completeness, checkpoint lookup, atomic files."""
import json
import os

import pytest
import torch
from torch import nn

from distributed_prune import checkpoint, fileio, rundir
from distributed_prune.errors import UserError
from distributed_prune.rundir import Point, RunDir, Stage


def test_points_order_as_the_run_proceeds():
    # the order a run passes through, written out independently of the enum's values
    walk = [Point(Stage.START), Point(Stage.PRETRAIN, 0), Point(Stage.PRETRAIN, 7), Point(Stage.BASE),
            Point(Stage.PRUNE, 0), Point(Stage.PRUNE, 3), Point(Stage.PRUNED), Point(Stage.RETRAIN, 0),
            Point(Stage.RETRAIN, 12)]
    assert sorted(reversed(walk)) == walk
    assert Point(Stage.RETRAIN, 4).start_epoch(Stage.RETRAIN) == 5
    assert Point(Stage.PRUNED).start_epoch(Stage.RETRAIN) == 0
    assert Point(Stage.START).start_epoch(Stage.PRETRAIN) == 0


@pytest.mark.parametrize("name, point", [
    ("base.pt", Point(Stage.BASE)), ("pruned.pt", Point(Stage.PRUNED)),
    ("pretrain-0003.pt", Point(Stage.PRETRAIN, 3)), ("prune-0000.pt", Point(Stage.PRUNE, 0)),
    ("retrain-0012.pt", Point(Stage.RETRAIN, 12)), ("final.pt", None), ("retrain-x.pt", None),
    ("base-0001.pt", None), ("start-0001.pt", None)])
def test_checkpoint_names(name, point, tmp_path):
    assert Point.of_checkpoint(tmp_path / name) == point


def _rows(*pairs):
    return [{"stage": s, "epoch": e, "top1": 0.5} for s, e in pairs]


def test_metrics_log_truncate_and_torn_line(tmp_path):
    rd = RunDir(tmp_path)
    rows = _rows(("pretrain", 0), ("pretrain", 1), ("prune", 0), ("retrain", 0), ("retrain", 1))
    for r in rows:
        rd.log(r)
    assert rundir.read_metrics(tmp_path) == rows
    rd.truncate_metrics(Point(Stage.BASE))
    assert rd.metrics() == rows[:2]
    rd.truncate_metrics(Point(Stage.START))
    assert rd.metrics() == []
    # a torn last line is dropped; a damaged middle line stops the lenient reader, fails the strict one
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"stage": "pre')
    assert rundir.read_metrics(tmp_path, strict=True) == rows[:1]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\nnot json\n" + json.dumps(rows[1]) + "\n")
    assert rundir.read_metrics(tmp_path) == rows[:1]
    with pytest.raises(UserError, match="line 2"):
        rundir.read_metrics(tmp_path / "metrics.jsonl", strict=True)


@pytest.mark.parametrize("text, complete", [
    ('{"status": "complete"}', True), ('{"status": "running"}', False), ("{}", False),
    ('["complete"]', False), ('{"status": "compl', False), (None, False)])
def test_is_complete(text, complete, tmp_path):
    if text is not None:
        (tmp_path / "summary.json").write_text(text)
    assert rundir.is_complete(tmp_path) is complete


def test_latest_checkpoint_skips_unreadable_and_resume_restores(tmp_path, capsys):
    rd = RunDir(tmp_path)
    torch.manual_seed(0)
    nets = {}
    for name in ("base.pt", "retrain-0000.pt", "retrain-0001.pt"):
        nets[name] = nn.Linear(3, 2)
        rd.save(name, nets[name], record=json.dumps({"name": name}), epoch=-1)
    rd.save("final.pt", nn.Linear(3, 2))  # never a resume point
    for r in _rows(("pretrain", 0), ("retrain", 0), ("retrain", 1), ("retrain", 2)):
        rd.log(r)
    path, _, point = rd.latest_checkpoint()
    assert (path.name, point) == ("retrain-0001.pt", Point(Stage.RETRAIN, 1))
    (tmp_path / "checkpoints" / "retrain-0001.pt").write_bytes(b"truncated")
    model, got = rd.resume(nn.Linear(3, 2))
    assert got.point == Point(Stage.RETRAIN, 0) and got.record == {"name": "retrain-0000.pt"}
    torch.testing.assert_close(model.weight, nets["retrain-0000.pt"].weight)
    assert [(r["stage"], r["epoch"]) for r in rd.metrics()] == [("pretrain", 0), ("retrain", 0)]
    assert "using the previous checkpoint" in capsys.readouterr().out
    _, fresh = rd.resume(nn.Linear(3, 2), enabled=False)
    assert fresh.point == rundir.START and rd.metrics() == []


def test_save_epoch_keeps_the_newest(tmp_path):
    rd = RunDir(tmp_path)
    for ep in range(5):
        rd.save_epoch(Stage.PRETRAIN, ep, nn.Linear(2, 2), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["pretrain-0003.pt", "pretrain-0004.pt"]
    assert checkpoint.load(tmp_path / "checkpoints" / "pretrain-0004.pt")["stage"] == "pretrain"


def test_atomic_writes_leave_old_file_on_error(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    fileio.write_text(p, "old")
    with pytest.raises(RuntimeError):
        def boom(f):
            f.write(b"partial")
            raise RuntimeError("disk full")
        fileio.write_with(p, boom)
    assert p.read_text() == "old" and sorted(os.listdir(p.parent)) == ["f.txt"]
    fileio.write_text(p, "#!/bin/sh\n", executable=True)
    assert p.read_text() == "#!/bin/sh\n" and os.access(p, os.X_OK)
    with fileio.atomic_path(tmp_path / "g.bin") as tmp:
        tmp.write_bytes(b"\x00\x01")
        assert not (tmp_path / "g.bin").exists()
    assert (tmp_path / "g.bin").read_bytes() == b"\x00\x01"


def test_open_run_dir_refuses_a_different_config(tmp_path):
    cfg = {"seed": 0, "model": {"name": "a"}, "resume": "auto"}
    rd = rundir.open_run_dir(tmp_path / "r", config=cfg, config_text=json.dumps(cfg),
                             saved_config=json.loads, resume="auto")
    assert not rd.complete and json.loads((tmp_path / "r" / "config.yaml").read_text()) == cfg
    rd.close()   # the run's lock: a second open while it is held is refused (test_rundir_lock.py)
    with pytest.raises(UserError, match=r"model\.name: 'a' -> 'b'"):
        rundir.open_run_dir(tmp_path / "r", config={**cfg, "model": {"name": "b"}}, config_text="",
                            saved_config=json.loads, resume="auto")
    with pytest.raises(UserError, match="resume=true"):
        rundir.open_run_dir(tmp_path / "r", config=cfg, config_text="", saved_config=json.loads, resume=False)
    (tmp_path / "r" / "summary.json").write_text('{"status": "complete"}')
    assert rundir.open_run_dir(tmp_path / "r", config={**cfg, "resume": True}, config_text="",
                               saved_config=json.loads, resume=True).complete
