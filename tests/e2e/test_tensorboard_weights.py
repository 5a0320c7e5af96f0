"""`dprune run` with output.tensorboard (read back with tensorboard's reader, equal to
metrics.jsonl, no duplicated steps after a resume that redoes an epoch) and with model.weights
(torchvision weights from a temporary TORCH_HOME, offline)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_prune import checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")


def _run(config, out, *overrides, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "distributed_prune", "run", config, f"output.dir={out}",
                           *overrides], capture_output=True, text=True, timeout=600, env=e, cwd=ROOT)


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    return scalars, text


def _expected(rows):
    out = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("stage", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(f"{r['stage']}/{k}", []).append((r["epoch"], float(np.float32(v))))
    return out


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard not installed (the `tensorboard` extra)")
def test_tensorboard_equals_metrics_after_a_resume_that_redoes_an_epoch(tmp_path):
    out = tmp_path / "run"
    args = ["output.tensorboard=true", "pretrain.epochs=2", "pretrain.lr_schedule=0:0.05",
            "retrain.epochs=3", "retrain.lr_schedule=0:0.01,2:0.001", "trainability.every_epoch=true"]
    r = _run(DEBUG, out, *args, env={"DPRUNE_FAULT": "retrain:1"})
    assert r.returncode != 0  # killed right after retrain epoch 1's checkpoint
    # the newest checkpoint is unreadable: the re-run resumes after retrain epoch 0 and redoes epoch 1
    (out / "checkpoints" / "retrain-0001.pt").write_bytes(b"truncated")
    r = _run(DEBUG, out, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["epoch"]) for x in rows] == [("pretrain", 0), ("pretrain", 1)] + \
        [("retrain", e) for e in range(3)]
    scalars, text = _events(out / "tensorboard")
    assert scalars == _expected(rows)            # every value, every step exactly once
    for tag in ("retrain/train_loss", "retrain/top1", "retrain/lr", "retrain/jsv_mean",
                "retrain/images_per_s", "pretrain/images_per_s"):
        assert tag in scalars, tag
    assert all(v > 0 for _, v in scalars["retrain/images_per_s"])
    assert "    model:\n      name: vgg_tiny" in text and "tensorboard: true" in text


def test_tensorboard_off_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = _run(DEBUG, out, "pretrain.epochs=1", "retrain.epochs=1", "trainability.jsv=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "tensorboard").exists()
    assert all(x["images_per_s"] > 0 for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))


# --------------------------------------------------------------------------- model.weights
WEIGHTS_RUN = ["model.name=resnet18", "model.weights=IMAGENET1K_V1", "data.name=synthetic",
               "data.synthetic_train=64", "data.synthetic_val=32", "data.batch_size=32",
               "data.val_batch_size=32", "pretrain.epochs=0", "prune.ratios=[0,0.5,0.5,0.5,0.5,0]",
               "retrain.epochs=1", "trainability.jsv=false"]


@pytest.fixture
def torch_home(tmp_path):
    """A TORCH_HOME holding random ResNet-18 weights under torchvision's IMAGENET1K_V1 file name
    (torchvision checks the file's hash only when it downloads it)."""
    home = tmp_path / "torch_home"
    ckdir = home / "hub" / "checkpoints"
    ckdir.mkdir(parents=True)
    import torchvision

    torch.manual_seed(11)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, ckdir / "resnet18-f37072fd.pth")
    return home, sd


def test_run_from_torchvision_weights(tmp_path, torch_home):
    home, sd = torch_home
    out = tmp_path / "run"
    r = _run(DEBUG, out, *WEIGHTS_RUN, "model.num_classes=1000", env={"TORCH_HOME": str(home)})
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    # the base model is those weights, untouched (no pretraining): its hash is theirs
    assert s["setup"]["base_model_sha256"] == checkpoint.weights_sha256(sd)
    assert s["setup"]["pretrain_epochs"] == 0 and s["pruned"]["speedup"] > 1.5
    base = torch.load(out / "checkpoints" / "base.pt", weights_only=True)["state_dict"]
    for k, v in sd.items():
        torch.testing.assert_close(base[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("extra,env_home,needle", [
    (["model.num_classes=10"], True, "model.num_classes: 10 differs from the 1000 classes"),
    ([], True, "model.num_classes: 10 differs"),            # synthetic data's default 10 classes
    (["model.num_classes=1000"], False, "resnet18-f37072fd.pth is not in"),
])
def test_weights_bad_input_exit_2_nothing_written(tmp_path, torch_home, extra, env_home, needle):
    home, _ = torch_home
    env = {"TORCH_HOME": str(home if env_home else tmp_path / "empty_home")}
    if not env_home:  # no network in CI either: a proxy that refuses every connection
        env.update(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    out = tmp_path / "run"
    r = _run(DEBUG, out, *WEIGHTS_RUN, *extra, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_new_head_run(tmp_path, torch_home):
    home, sd = torch_home
    out = tmp_path / "run"
    r = _run(DEBUG, out, *WEIGHTS_RUN, "model.num_classes=4", "model.new_head=true",
             env={"TORCH_HOME": str(home)})
    assert r.returncode == 0, r.stderr[-2000:]
    base = torch.load(out / "checkpoints" / "base.pt", weights_only=True)["state_dict"]
    assert base["fc.weight"].shape == (4, 512)
    torch.testing.assert_close(base["layer4.1.conv2.weight"], sd["layer4.1.conv2.weight"], rtol=0, atol=0)
