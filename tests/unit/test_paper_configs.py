"""Every configs/paper file validates, builds its model and resolves its ratios."""
from pathlib import Path

import pytest
import torch

from distributed_prune import config, models, prune

PAPER = sorted((Path(__file__).resolve().parents[2] / "configs" / "paper").glob("*.yaml"))
CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "imagefolder": 100, "mnist": 10}


def test_there_are_paper_configs():
    names = {p.stem for p in PAPER}
    for family in ("resnet56_cifar10_", "vgg19_cifar100_", "resnet50_imagenet_", "resnet34_imagenet100_p",
                   "mlp7_linear_mnist_"):
        assert any(n.startswith(family) for n in names), family
    assert {"resnet34_imagenet100_p15f105", "resnet34_imagenet100_p90f30",
            "resnet34_imagenet100_sxa_p30f90_lr0.1", "resnet34_imagenet100_sxb_scratch"} <= names


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_builds(path):
    text = path.read_text()
    assert text.startswith("# docs/science.md section"), "each file names the table it reproduces"
    cfg = config.load(path)
    nc = cfg.model.num_classes or CLASSES[cfg.data.name]
    kw = {"in_features": 1024} if cfg.model.name.startswith("mlp") else {}
    net = models.create(cfg.model.name, num_classes=nc, **kw)
    x = torch.zeros(1, 1024) if kw else torch.zeros(1, 3, 32, 32)
    if cfg.prune.method != "none":
        p = prune.plan(net, cfg.prune.ratios, example_input=x)
        assert p.groups and all(len(g.keep) < g.n for g in p.groups)
