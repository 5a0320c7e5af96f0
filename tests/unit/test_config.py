import re
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


def _float_fields(model=config.Config, prefix=""):
    """Dotted names of every float field of the config, found by walking the pydantic models."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, config.BaseModel):
            out += _float_fields(ann, f"{prefix}{name}.")
        elif ann is float:
            out.append(f"{prefix}{name}")
    return out


def test_every_float_field_refuses_nan_and_inf():
    keys = _float_fields()
    assert {"pretrain.momentum", "retrain.weight_decay", "prune.reg.lw_opp"} <= set(keys)
    for key in keys:
        for bad in (".nan", ".inf", "-.inf"):
            with pytest.raises(UserError, match=rf"{re.escape(key)}: .*finite"):
                config.load(None, [f"{key}={bad}"])
        config.load(None, [f"{key}=0.5"])  # a finite value of the same field passes


@pytest.mark.parametrize("ov,needle", [
    ("retrain.lr_schedule=0:.inf", "retrain.lr_schedule"), ("pxfy.lr_schedule=0:nan", "pxfy.lr_schedule"),
    ("prune.ratios=[0,.inf,0.5]", "prune.ratios.1"), ("model.kwargs={in_features: .nan}", "model.kwargs.in_features"),
])
def test_non_finite_inside_strings_lists_and_kwargs(ov, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        config.load(None, ["model.name=mlp_7_linear", ov])


def test_seed_range():
    assert config.load(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1
    for bad in (2**32, 2**64, 2**70, -1):
        with pytest.raises(UserError, match="seed"):
            config.load(None, [f"seed={bad}"])


def test_duplicate_keys_name_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\nretrain:\n  epochs: 2\n  lr_schedule: '0:0.1'\n  epochs: 3\n")
    with pytest.raises(UserError, match=r"c\.yaml, line 5: duplicate key 'epochs' \(first on line 3\)"):
        config.load(p)
    with pytest.raises(UserError, match="duplicate key 'a'"):
        config.load(None, ["model.kwargs={a: 1, a: 2}"])


def test_aliases_within_the_bound_still_work(tmp_path):
    """Anchors, aliases and merge keys stay usable; a merged key may be overridden explicitly."""
    p = tmp_path / "c.yaml"
    p.write_text("pretrain: &stage\n  weight_decay: 0.0001\n  momentum: 0.8\n"
                 "retrain:\n  <<: *stage\n  momentum: 0.95\n  epochs: 2\n")
    cfg = config.load(p)
    assert (cfg.retrain.weight_decay, cfg.retrain.momentum, cfg.retrain.epochs) == (0.0001, 0.95, 2)
    assert cfg.pretrain.momentum == 0.8


def test_alias_expansion_bound_is_exact():
    """A list of n aliases to a 100-value anchor stands for 1 + 100 * n + ... values: refused
    exactly when the count passes MAX_EXPANDED_NODES (counted as the composer sees nodes)."""
    anchor = "[" + ", ".join(["0"] * 99) + "]"  # a sequence node + 99 scalars = 100 values

    def doc(n):
        return f"a: &a {anchor}\nb: [" + ", ".join(["*a"] * n) + "]\n"

    limit = config.MAX_EXPANDED_NODES
    # root map(1) + key a(1) + anchor(100) + key b(1) + list b(1 + 100 n)
    ok_n = (limit - 104) // 100
    assert len(config.yaml_load(doc(ok_n))["b"]) == ok_n
    with pytest.raises(UserError, match="aliases expand"):
        config.yaml_load(doc(ok_n + 1), source="x")


def test_dump_never_writes_aliases():
    cfg = config.load(None, ["prune.skip=[fc]", "model.kwargs={}"])
    text = config.dump(cfg)
    assert "&" not in text and "*id" not in text
    assert config.from_dict(config.yaml_load(text)) == cfg


def test_config_file_errors_are_one_line(tmp_path):
    cases = {"bin.yaml": (b"\x00\x9f\x92\x96", "not UTF-8"), "ctl.yaml": (b"seed: 1\x07\n", "not a text file"),
             "list.yaml": (b"- 1\n", "mapping"), "syn.yaml": (b"seed: [1\n", "line 2: invalid YAML")}
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=re.escape(needle)) as e:
            config.load(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    big = tmp_path / "big.yaml"
    big.write_text("#" * (config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(UserError, match="larger than"):
        config.load(big)


@pytest.mark.parametrize("ov,needle", [
    ("=3", "override '=3'"), (".x=1", "override '.x=1'"), ("a..b=1", "override 'a..b=1'"),
    ("output.dir=", "output.dir: must not be empty"), ("output.dir=''", "output.dir: must not be empty"),
    ("pxfy.total_epochs=10", "config: pxfy.lr_schedule is required"),
])
def test_override_and_cross_field_messages(ov, needle):
    with pytest.raises(UserError) as e:
        config.load(None, [ov])
    assert needle in str(e.value) and "config: config:" not in str(e.value)
    assert "unknown key 'config'" not in str(e.value)


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
