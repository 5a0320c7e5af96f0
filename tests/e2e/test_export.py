"""distributed_prune.load and `dprune export`: the pruned model of a run (the debug run on digits)
or of a checkpoint (pruned ResNet-18 and MobileNetV2), loaded back and exported to ONNX (run in
onnxruntime), torch.export and a state dict, each compared with the PyTorch model."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_prune
from distributed_prune import checkpoint, config, models, prune
from distributed_prune.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")
ONNX_PKGS = ("onnx", "onnxscript", "onnxruntime")


def _need_onnx():
    missing = [p for p in ONNX_PKGS if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (the `export` extra)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "debug"
    r = subprocess.run([sys.executable, "-m", "distributed_prune", "run", DEBUG, f"output.dir={out}",
                        "pretrain.epochs=2", "pretrain.lr_schedule=0:0.05", "retrain.epochs=1",
                        "retrain.lr_schedule=0:0.01", "trainability.jsv=false"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _reference(ckpt_path, name, num_classes, **kw):
    """Independent of export.py: a fresh model, the plan replayed, the state dict loaded."""
    obj = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    net = prune.replay(models.create(name, num_classes=num_classes, **kw), prune.Plan.from_json(obj["plan"]))
    net.load_state_dict(obj["state_dict"])
    return net.eval()


def _x(*shape, n=3):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(7))


def _onnx_out(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


# --------------------------------------------------------------------------- load
def test_load_run_dir_and_checkpoint(run_dir):
    ref = _reference(run_dir / "checkpoints" / "final.pt", "vgg_tiny", 10, in_channels=1)
    x = _x(1, 8, 8)
    for src in (run_dir, run_dir / "checkpoints" / "final.pt", str(run_dir)):
        net = distributed_prune.load(src)
        assert not net.training
        assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters())
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
    # the pruned model is smaller than the dense one the run started from
    dense = models.create("vgg_tiny", num_classes=10, in_channels=1)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in dense.parameters())


def test_load_falls_back_to_newest_pruned_checkpoint(run_dir, tmp_path):
    # a run still retraining: no final.pt; its newest retrain epoch (else pruned.pt) is loaded
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    for name in ("pruned.pt", "base.pt"):
        (part / "checkpoints" / name).write_bytes((run_dir / "checkpoints" / name).read_bytes())
    net = distributed_prune.load(part)
    ref = _reference(part / "checkpoints" / "pruned.pt", "vgg_tiny", 10, in_channels=1)
    x = _x(1, 8, 8)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- export, debug run
def test_export_state_dict_roundtrip(run_dir, tmp_path, capsys):
    out = tmp_path / "sd.pt"
    assert main(["export", str(run_dir), "--format", "state-dict", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    obj = torch.load(out, weights_only=True)
    assert set(obj) >= {"state_dict", "plan", "config"} and "engine" not in obj
    x = _x(1, 8, 8)
    ref = distributed_prune.load(run_dir)
    torch.testing.assert_close(distributed_prune.load(out)(x), ref(x), rtol=0, atol=0)


def test_export_torch_export_debug_run(run_dir):
    assert main(["export", str(run_dir), "--format", "torch-export"]) == 0
    out = run_dir / "export" / "pruned.pt2"   # the default destination
    ref = distributed_prune.load(run_dir)
    prog = torch.export.load(str(out)).module()
    for n in (1, 5):  # the batch axis is dynamic
        x = _x(1, 8, 8, n=n)
        torch.testing.assert_close(prog(x), ref(x), rtol=1e-5, atol=1e-5)


def test_export_onnx_debug_run(run_dir, tmp_path):
    _need_onnx()
    out = tmp_path / "debug.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    ref = distributed_prune.load(run_dir)
    for n in (1, 4):
        x = _x(1, 8, 8, n=n)
        torch.testing.assert_close(_onnx_out(out, x), ref(x).detach(), rtol=0, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name != "debug.onnx"], "one self-contained file"


# --------------------------------------------------------------------------- pruned torchvision models
def _pruned_checkpoint(tmp_path, name, ratios, overrides):
    """A pruned model saved as the pipeline saves it (state_dict + plan + resolved config)."""
    cfg = config.load(None, [f"model.name={name}", *overrides])
    net = models.create(name, num_classes=7)
    for m in net.modules():  # non-trivial BN statistics, so eval-mode BN is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.zeros(1, 3, 64, 64)
    plan = prune.plan(net, ratios, criterion="l1", example_input=x)
    small = prune.apply(net, plan, mode="physical")
    path = checkpoint.save(tmp_path / f"{name}.pt", small, plan=plan, config=config.to_dict(cfg))
    return path, small.eval()


@pytest.mark.parametrize("name,ratios,overrides,torch_export", [
    ("resnet18", "[0,0.5,0.5,0.5,0.5,0]", ["model.num_classes=7"], True),
    # num_classes from the dataset: read from the saved classifier; torch.export is covered by
    # the two other models (its export + load of MobileNetV2 costs ~20 s on 2 cores)
    ("mobilenet_v2", "0.5", [], False),
])
def test_export_pruned_torchvision(tmp_path, name, ratios, overrides, torch_export):
    path, small = _pruned_checkpoint(tmp_path, name, ratios, overrides)
    net = distributed_prune.load(path)
    x = _x(3, 64, 64, n=2)
    with torch.no_grad():
        ref = small(x)
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
    if torch_export:
        assert main(["export", str(path), "--format", "torch-export"]) == 0
        prog = torch.export.load(str(path.with_suffix(".pt2"))).module()
        torch.testing.assert_close(prog(x), ref, rtol=1e-5, atol=1e-5)
    _need_onnx()
    out = tmp_path / "m.onnx"
    assert main(["export", str(path), "--format", "onnx", "--out", str(out), "--input-size", "3,48,48"]) == 0
    x = _x(3, 48, 48, n=2)
    with torch.no_grad():
        torch.testing.assert_close(_onnx_out(out, x), small(x), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- bad input
def _dense_only_run(tmp_path):
    d = tmp_path / "dense"
    cfg = config.load(DEBUG, [f"output.dir={d}"])
    checkpoint.save(d / "checkpoints" / "base.pt", models.create("vgg_tiny", num_classes=10, in_channels=1),
                    config=config.to_dict(cfg))
    return d


@pytest.mark.parametrize("case,needle", [
    ("no_plan_run", "no plan in the run"),
    ("no_plan_ckpt", "no plan in the checkpoint"),
    ("missing", "no such run directory or checkpoint"),
    ("format", "unknown format 'tflite'"),
    ("unwritable", "cannot write there"),
    ("input_size", "cannot run on it"),
])
def test_export_bad_input_one_line_exit_2(run_dir, tmp_path, capsys, case, needle):
    before = sorted(p.name for p in (run_dir / "export").iterdir()) if (run_dir / "export").exists() else []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = {
        "no_plan_run": [str(_dense_only_run(tmp_path)), "--format", "state-dict"],
        "no_plan_ckpt": [str(_dense_only_run(tmp_path) / "checkpoints" / "base.pt"), "--format", "state-dict"],
        "missing": [str(tmp_path / "nothing"), "--format", "state-dict"],
        "format": [str(run_dir), "--format", "tflite"],
        "unwritable": [str(run_dir), "--format", "state-dict", "--out", str(blocker / "sub" / "m.pt")],
        "input_size": [str(run_dir), "--format", "state-dict", "--input-size", "3,2,2"],
    }[case]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    after = sorted(p.name for p in (run_dir / "export").iterdir()) if (run_dir / "export").exists() else []
    assert after == before, "nothing written"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("a_file", "dense")) == []


def test_load_run_from_pretrained_weights_without_the_weights_file(tmp_path, monkeypatch):
    # a run that started from torchvision weights with a new 5-class head (num_classes from the
    # data set, so not in the config): loading needs neither the weights file nor the network
    from distributed_prune.models import pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    w = pretrained.resolve("resnet18", "IMAGENET1K_V1")
    pretrained.cache_file(w).parent.mkdir(parents=True)
    torch.save(models.create("resnet18", num_classes=1000).state_dict(), pretrained.cache_file(w))
    net = models.create("resnet18", num_classes=5, weights="IMAGENET1K_V1", new_head=True)
    plan = prune.plan(net, "[0,0.5,0.5,0.5,0.5,0]", example_input=torch.zeros(1, 3, 32, 32))
    small = prune.apply(net, plan, mode="physical").eval()
    cfg = config.load(None, ["model.name=resnet18", "model.weights=IMAGENET1K_V1", "model.new_head=true"])
    path = checkpoint.save(tmp_path / "run" / "checkpoints" / "final.pt", small, plan=plan,
                           config=config.to_dict(cfg))
    pretrained.cache_file(w).unlink()
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    x = _x(3, 32, 32, n=2)
    with torch.no_grad():
        torch.testing.assert_close(distributed_prune.load(path.parent.parent)(x), small(x), rtol=0, atol=0)
