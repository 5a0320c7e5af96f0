"""torchvision weights by name (model.weights / --weights), offline: a state dict is placed under
the cache file name torchvision expects, in a temporary TORCH_HOME."""
import json
import urllib.error

import pytest
import torch
import torchvision.models as tvm

from distributed_prune import checkpoint, config, models
from distributed_prune.cli import main
from distributed_prune.errors import UserError
from distributed_prune.models import pretrained


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME with downloads made impossible (the test machine may be online)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home"


def _cache(model_name, weights, seed=1, **kw):
    """Random weights of ``model_name`` saved under the expected cache name; returns the state dict."""
    w = pretrained.resolve(model_name, weights)
    torch.manual_seed(seed)
    sd = tvm.get_model(model_name, weights=None, num_classes=len(w.meta["categories"]), **kw).state_dict()
    path = pretrained.cache_file(w)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


def test_cache_file_is_torch_hub_layout(torch_home):
    w = pretrained.resolve("resnet18", "DEFAULT")
    assert w is tvm.ResNet18_Weights.IMAGENET1K_V1
    assert pretrained.cache_file(w) == torch_home / "hub" / "checkpoints" / w.url.rsplit("/", 1)[-1]
    assert pretrained.resolve("resnet18", "ResNet18_Weights.IMAGENET1K_V1") is w
    assert "IMAGENET1K_V2" in pretrained.weight_names("resnet50")


def test_cached_weights_load_exactly(torch_home):
    # the file's content does not match the hash prefix in its name: torchvision checks the hash
    # only when it downloads, so a cached file (here random weights) is loaded as it is
    sd = _cache("resnet18", "IMAGENET1K_V1")
    net = models.create("resnet18", weights="IMAGENET1K_V1")
    assert set(net.state_dict()) == set(sd)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    # the base model's identity in summary.json: the hash of these weights
    assert checkpoint.weights_sha256(net) == checkpoint.weights_sha256(sd)


def test_mobilenet_default_resolves_to_its_newest_weights(torch_home):
    sd = _cache("mobilenet_v3_small", "DEFAULT")
    net = models.create("mobilenet_v3_small", weights="DEFAULT")
    torch.testing.assert_close(net.state_dict()["classifier.3.weight"], sd["classifier.3.weight"], rtol=0, atol=0)


def test_num_classes_mismatch_is_an_error_without_new_head(torch_home):
    _cache("resnet18", "IMAGENET1K_V1")
    with pytest.raises(UserError, match=r"model\.num_classes: 10 differs from the 1000 classes.*new_head"):
        models.create("resnet18", num_classes=10, weights="IMAGENET1K_V1")


def test_new_head_replaces_only_the_classifier(torch_home):
    sd = _cache("resnet18", "IMAGENET1K_V1")
    net = models.create("resnet18", num_classes=7, weights="IMAGENET1K_V1", new_head=True)
    assert net.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    own = net.state_dict()
    assert own["fc.weight"].shape == (7, 512)
    for k, v in sd.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(own[k], v, rtol=0, atol=0)


def test_head_modules_found_generically():
    a, b = tvm.mobilenet_v2(num_classes=5), tvm.mobilenet_v2(num_classes=6)
    assert pretrained.head_modules(a, b) == ["classifier.1"]
    a, b = tvm.squeezenet1_1(num_classes=5), tvm.squeezenet1_1(num_classes=6)
    assert pretrained.head_modules(a, b) == ["classifier.1"]  # a 1x1 conv head


def test_offline_and_not_cached_is_one_line_naming_file_and_dir(torch_home):
    with pytest.raises(UserError) as e:
        models.create("resnet18", weights="IMAGENET1K_V1")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(torch_home / "hub" / "checkpoints") in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg and "\n" not in msg
    assert not torch_home.exists(), "no empty cache directories left behind"


def test_corrupt_cached_file_is_user_error(torch_home):
    path = pretrained.cache_file(pretrained.resolve("resnet18", "DEFAULT"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load"):
        models.create("resnet18", weights="DEFAULT")


@pytest.mark.parametrize("overrides,needle", [
    (["model.name=resnet18", "model.weights=IMAGENET1K_V9"], "model.weights: resnet18 has no weights 'IMAGENET1K_V9'"),
    (["model.name=resnet56", "model.weights=DEFAULT"], "model.weights: 'resnet56' is not a torchvision classifier"),
    (["model.name=resnet18", "model.new_head=true"], "model.new_head: needs model.weights"),
    (["model.name=resnet18", "model.weights=DEFAULT", "pretrain.checkpoint=base.pt"],
     "model.weights and pretrain.checkpoint"),
])
def test_config_rejects_bad_weights(overrides, needle):
    with pytest.raises(UserError) as e:
        config.load(None, overrides)
    assert needle in str(e.value)


def test_config_accepts_weights():
    cfg = config.load(None, ["model.name=resnet50", "model.weights=IMAGENET1K_V2", "model.new_head=true"])
    assert cfg.model.weights == "IMAGENET1K_V2" and cfg.model.new_head


def test_plan_cli_uses_the_weights(torch_home, capsys):
    # L1 on the cached weights: the kept filters are the largest-norm ones of those weights
    sd = _cache("resnet18", "IMAGENET1K_V1", seed=3)
    argv = ["plan", "--model", "resnet18", "--ratios", "layer1.0.conv1:0.5", "--input-size", "3,32,32", "--json"]
    assert main(argv + ["--weights", "IMAGENET1K_V1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["layer"], r["kept"]) for r in out["layers"]] == [("layer1.0.conv1", 32)]
    from distributed_prune import prune

    net = models.create("resnet18", weights="IMAGENET1K_V1")
    p = prune.plan(net, "layer1.0.conv1:0.5", example_input=torch.zeros(1, 3, 32, 32))
    norms = sd["layer1.0.conv1.weight"].abs().sum(dim=(1, 2, 3))
    assert p.groups[0].keep == sorted(norms.topk(32).indices.tolist())


@pytest.mark.parametrize("extra,needle", [
    (["--weights", "IMAGENET1K_V1"], "resnet18-f37072fd.pth is not in"),
    (["--weights", "IMAGENET1K_V1", "--num-classes", "10"], "model.num_classes: 10 differs"),
    (["--weights", "NOPE"], "has no weights 'NOPE'"),
    (["--new-head"], "--new-head needs --weights"),
])
def test_plan_cli_weights_errors_exit_2(torch_home, extra, needle, capsys):
    assert main(["plan", "--model", "resnet18", "--ratios", "0.5", "--input-size", "3,32,32"] + extra) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("new_head", [False, True])
def test_architecture_without_the_file_matches_pretrained(torch_home, new_head):
    # GoogLeNet's builder changes its forward pass for pretrained weights (transform_input) and
    # drops the auxiliary heads: a checkpoint of it must be loaded into that same architecture
    _cache("googlenet", "IMAGENET1K_V1", aux_logits=True, init_weights=False)
    nc = 5 if new_head else None
    pre = models.create("googlenet", num_classes=nc, weights="IMAGENET1K_V1", new_head=new_head).eval()
    skeleton = pretrained.create_architecture("googlenet", "IMAGENET1K_V1", num_classes=nc, new_head=new_head)
    assert skeleton.transform_input and pre.transform_input
    skeleton.load_state_dict(pre.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(skeleton.eval()(x), pre(x), rtol=0, atol=0)


def test_paper_resnet50_configs_start_from_torchvision_weights():
    from pathlib import Path

    paper = sorted((Path(__file__).resolve().parents[2] / "configs" / "paper").glob("resnet50_imagenet_*.yaml"))
    assert len(paper) >= 3
    for path in paper:
        cfg = config.load(path)
        assert cfg.model.weights == "IMAGENET1K_V1" and not cfg.model.new_head, path.name
        assert cfg.pretrain.checkpoint is None and cfg.effective_pretrain()[0] == 0, path.name
        w = pretrained.resolve(cfg.model.name, cfg.model.weights)
        assert pretrained.cache_file(w).name == "resnet50-0676ba61.pth"  # torchvision's 76.13 % model
        assert w.meta["_metrics"]["ImageNet-1K"]["acc@1"] == pytest.approx(76.13)


def test_bench_speedup_weights(torch_home, capsys):
    _cache("resnet18", "IMAGENET1K_V1", seed=5)
    argv = ["bench", "speedup", "--model", "resnet18", "--ratios", "[0,0.5,0.5,0.5,0.5,0]", "--batch", "2",
            "--input-size", "3,32,32", "--reps", "1", "--warmup", "0", "--device", "cpu", "--json"]
    assert main(argv + ["--weights", "IMAGENET1K_V1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["weights"] == "ResNet18_Weights.IMAGENET1K_V1" and res["num_classes"] == 1000
    from distributed_prune import prune

    # the plan is the L1 plan of the pretrained weights, not of a random init
    pre = prune.plan(models.create("resnet18", weights="IMAGENET1K_V1"), "[0,0.5,0.5,0.5,0.5,0]",
                     example_input=torch.zeros(1, 3, 32, 32))
    torch.manual_seed(0)
    rnd = prune.plan(models.create("resnet18", num_classes=1000), "[0,0.5,0.5,0.5,0.5,0]",
                     example_input=torch.zeros(1, 3, 32, 32))
    assert res["plan_sha256"] == pre.sha256() != rnd.sha256()
    assert main(argv + ["--weights", "IMAGENET1K_V2"]) == 2
    assert "has no weights 'IMAGENET1K_V2'" in capsys.readouterr().err
