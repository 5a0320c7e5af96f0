from pathlib import Path

import pytest

from distributed_prune import config
from distributed_prune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_base_yaml_is_every_default():
    assert config.load(ROOT / "configs" / "base.yaml") == config.Config()


def test_schedules_stay_strings_not_sexagesimal():
    cfg = config.load(None, ["retrain.lr_schedule=0:0.1", "seed=3"])
    assert cfg.retrain.lr_schedule == "0:0.1" and cfg.seed == 3
    assert config.yaml_load("a: 0:0.1\nb: 1:20\nc: 0.5\nd: 3") == {"a": "0:0.1", "b": "1:20", "c": 0.5, "d": 3}


def test_ratio_list_from_yaml_becomes_canonical_text():
    cfg = config.load(None, ["prune.ratios=[0,0.7,0.7,0.7,0]"])
    assert cfg.prune.ratios == "[0,0.7,0.7,0.7,0]"


@pytest.mark.parametrize("ov,needle", [
    ("prune.reg.lw_opx=1", "prune.reg.lw_opx"), ("dist.engine=horovod", "dist.engine"),
    ("pxfy.total_epochs=10", "pxfy.lr_schedule"), ("seed.x=1", "seed"), ("data.batch_size=0", "data.batch_size"),
])
def test_errors_name_the_key(ov, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        config.load(None, [ov])


def test_pxfy_effective_schedules():
    cfg = config.load(None, ["pxfy.total_epochs=120", "pxfy.prune_at=30",
                             "pxfy.lr_schedule=0:0.1,30:0.01,60:0.001,90:0.0001,105:0.00001"])
    assert cfg.effective_pretrain() == (30, "0:0.1,30:0.01,60:0.001,90:0.0001,105:1e-05")
    assert cfg.effective_retrain() == (90, "0:0.01,30:0.001,60:0.0001,75:1e-05")


def _fake_cuda(monkeypatch, capability):
    """A CUDA device of ``capability`` as far as the config resolver can tell (no GPU here)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.version, "hip", None)


def test_fast_path_auto_on_cpu_is_fp32_nchw():
    cfg = config.load(None, ["train.device=cpu"])
    assert (cfg.train.amp, cfg.train.channels_last) == ("none", False)


@pytest.mark.parametrize("capability,device,want", [
    ((9, 0), "auto", ("bf16", True)),     # H100 / H200
    ((8, 0), "cuda", ("bf16", True)),     # A100
    ((7, 0), "auto", ("none", False)),    # V100: no native bf16
    ((9, 0), "cpu", ("none", False)),     # a GPU present but the run asks for the CPU
])
def test_fast_path_auto_resolves_for_the_device(monkeypatch, capability, device, want):
    _fake_cuda(monkeypatch, capability)
    cfg = config.load(None, [f"train.device={device}"])
    assert (cfg.train.amp, cfg.train.channels_last) == want
    # the resolved values are what the run directory's config.yaml records
    saved = config.yaml_load(config.dump(cfg))["train"]
    assert (saved["amp"], saved["channels_last"]) == want


def test_explicit_amp_and_layout_are_kept(monkeypatch):
    _fake_cuda(monkeypatch, (9, 0))
    cfg = config.load(None, ["train.amp=none", "train.channels_last=false"])
    assert (cfg.train.amp, cfg.train.channels_last) == ("none", False)
    cfg = config.load(None, ["train.amp=fp16"])          # layout still auto
    assert (cfg.train.amp, cfg.train.channels_last) == ("fp16", True)
    cfg = config.load(ROOT / "configs" / "paper" / "resnet50_imagenet_l1.yaml", ["train.device=cpu"])
    assert cfg.train.amp == "bf16"                          # set in the file: never overridden


def test_auto_amp_follows_a_deepspeed_json(monkeypatch):
    _fake_cuda(monkeypatch, (9, 0))
    ds = ROOT / "configs" / "deepspeed"
    cfg = config.load(None, ["dist.engine=deepspeed", f"dist.deepspeed_config={ds / 'zero0_fp32.json'}"])
    assert cfg.train.amp == "none"
    cfg = config.load(None, ["dist.engine=deepspeed", f"dist.deepspeed_config={ds / 'zero2_fp16.json'}"])
    assert cfg.train.amp == "fp16"


def test_static_graph_auto_unless_compiled_or_accumulating():
    from distributed_prune.train.engine import resolve_static_graph

    assert config.Config().dist.static_graph == "auto"
    assert resolve_static_graph("auto", compile=False) is True
    assert resolve_static_graph("auto", compile=True) is False
    assert resolve_static_graph("auto", compile=False, grad_accum=2) is False
    assert resolve_static_graph(False, compile=False) is False
    with pytest.raises(UserError, match="grad_accum"):
        resolve_static_graph(True, compile=False, grad_accum=2)
    with pytest.raises(UserError, match="dist.static_graph"):
        config.load(None, ["dist.static_graph=sometimes"])
