"""End to end on real data (scikit-learn's digits): run, resume after a kill, report, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_prune import checkpoint, config, models, prune
from distributed_prune.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")
SMALL = ["pretrain.epochs=3", "pretrain.lr_schedule=0:0.05,2:0.005", "retrain.epochs=3",
         "retrain.lr_schedule=0:0.01,2:0.001"]


def _run(out, *extra, env=None):
    """``dprune run`` in a subprocess whose working directory is the run's (temporary) parent."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "distributed_prune", "run", DEBUG, f"output.dir={out}", *SMALL,
                           *extra], capture_output=True, text=True, timeout=600, env=e, cwd=Path(out).parent)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    r = _run(out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_run_directory_contract(finished):
    for f in ("config.yaml", "metrics.jsonl", "plan.json", "summary.json", "report.md"):
        assert (finished / f).is_file(), f
    s = json.loads((finished / "summary.json").read_text())
    for k in ("model", "dataset", "seed", "world_size", "dense", "pruned", "final", "trainability_accuracy", "setup"):
        assert k in s
    assert set(s["dense"]) >= {"top1", "params", "macs"}
    assert set(s["pruned"]) >= {"top1", "params", "macs", "speedup", "jsv_mean"}
    assert set(s["setup"]) >= {"base_model_sha256", "prune_method", "ratios", "pretrain_epochs", "prune_epochs",
                               "retrain_epochs", "retrain_lr_schedule", "total_epochs"}
    assert s["world_size"] == 1 and s["pruned"]["speedup"] > 1.5 and s["pruned"]["params"] < s["dense"]["params"]
    assert s["final"]["top1"] > 0.8, "a pruned CNN retrained on digits should exceed 80%"
    rows = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("pretrain", e) for e in range(3)] + [("retrain", e) for e in range(3)]
    for r in rows:
        assert {"stage", "epoch", "lr", "train_loss", "top1"} <= set(r)
    assert [r["lr"] for r in rows if r["stage"] == "retrain"] == [0.01, 0.01, 0.001]
    # TA = mean top-1 over the first LR stage (2 epochs of 0:0.01,2:0.001)
    ta = sum(r["top1"] for r in rows if r["stage"] == "retrain" and r["epoch"] < 2) / 2
    assert s["trainability_accuracy"] == pytest.approx(ta)
    saved = config.yaml_load((finished / "config.yaml").read_text())
    assert saved["retrain"]["lr_schedule"] == "0:0.01,2:0.001" and saved["output"]["dir"] == str(finished)


def test_checkpoint_reloads_into_replayed_architecture(finished):
    obj = torch.load(finished / "checkpoints" / "final.pt", weights_only=True)
    plan = prune.Plan.from_json(obj["plan"])
    assert plan.to_json() == (finished / "plan.json").read_text()
    net = prune.replay(models.create("vgg_tiny", num_classes=10, in_channels=1), plan)
    checkpoint.load_state(net, obj["state_dict"])
    assert sum(p.numel() for p in net.parameters()) == json.loads((finished / "summary.json").read_text())["pruned"]["params"]


def test_resume_after_kill_matches_uninterrupted(finished, tmp_path):
    out = tmp_path / "b"
    r = _run(out, env={"DPRUNE_FAULT": "retrain:1"})
    assert r.returncode != 0  # killed after the checkpoint of retrain epoch 1
    assert not (out / "summary.json").exists()
    r = _run(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout
    a = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timing = ("time_s", "images_per_s")  # wall-clock measurements differ between runs
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)  # every epoch once, identical numbers
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (finished, out))
    assert sa["final"] == sb["final"] and sa["setup"]["base_model_sha256"] == sb["setup"]["base_model_sha256"]


def test_rerun_complete_is_noop_and_corrupt_checkpoint_falls_back(finished, tmp_path):
    r = _run(finished)
    assert r.returncode == 0 and "already complete" in r.stdout
    # a truncated newest checkpoint is skipped, the previous one is used
    out = tmp_path / "c"
    assert _run(out, env={"DPRUNE_FAULT": "retrain:1"}).returncode != 0
    newest = out / "checkpoints" / "retrain-0001.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    r = _run(out)
    assert r.returncode == 0 and "after retrain-0000.pt" in r.stdout, r.stdout[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["epoch"]) for x in rows].count(("retrain", 1)) == 1


def test_report_on_real_runs(finished, capsys):
    assert main(["report", str(finished), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"setup", "extra", "reason", "rows"} <= set(out) and len(out["rows"]) == 1


@pytest.mark.parametrize("override,needle", [
    ("prune.ratioz=0.5", "prune.ratioz"),
    ("retrain.epochs=abc", "retrain.epochs"),
    ("prune.ratios=[0-3:1.5]", "prune.ratios"),
    ("retrain.lr_schedule=60:0.1", "retrain.lr_schedule"),
    ("model.name=resnet9000", "model.name"),
    ("data.name=mnist", "data.train_path"),  # torchvision data absent: clear error, no download
    ("pretrain.checkpoint=/nonexistent/base.pt", "pretrain.checkpoint"),
    ("prune.ratios=*nomatch*:0.5", "*nomatch*"),       # valid syntax, but not for this model
    ("prune.ratios=[1-9:0.5]", "out of range"),
])
def test_bad_input_exit_2_and_no_run_dir(override, needle, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["run", DEBUG, f"output.dir={out}", override]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_missing_config_file(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_config_show_resolves_overrides(capsys):
    assert main(["config", "show", DEBUG, "retrain.epochs=7", "prune.ratios=[1-2:0.25]"]) == 0
    shown = config.yaml_load(capsys.readouterr().out)
    assert shown["retrain"]["epochs"] == 7 and shown["prune"]["ratios"] == "[1-2:0.25]"
    for key in ("seed", "output", "model", "data", "prune", "pretrain", "retrain", "dist"):
        assert key in shown
    assert {"format", "train_path", "val_path"} <= set(shown["data"])
    assert shown["dist"]["engine"] == "ddp" and shown["prune"]["reinit"] == "none"


def test_quickstart_yaml_equals_embedded_default():
    from distributed_prune.quickstart import DEFAULT

    assert config.load(ROOT / "configs" / "quickstart.yaml") == config.from_dict(DEFAULT)
