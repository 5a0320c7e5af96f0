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


# train-set sizes and how the loaders batch them (FFCV drops the last partial batch)
_TRAIN = {"imagenet": (1281167, True), "cifar10": (50000, False), "cifar100": (50000, False)}
# the authors' settings: (update_reg_interval, stabilize_reg_interval) per dataset family
_AUTHORS = {"imagenet": (5, 40000), "cifar10": (10, 10000), "cifar100": (10, 10000)}
REG = [p for p in PAPER if config.load(p).prune.method in ("greg", "tpp")]


@pytest.mark.parametrize("path", REG, ids=[p.stem for p in REG])
def test_regularization_configs_use_the_authors_settings_and_fit(path):
    from distributed_prune.prune.regularize import check_phase

    cfg = config.load(path)
    r = cfg.prune.reg
    assert (r.update_interval, r.stabilize_interval) == _AUTHORS[cfg.data.name]
    assert (r.granularity, r.ceiling, cfg.prune.lr_schedule) == (1e-4, 1.0, "0:0.001")
    assert (r.lw_opp, r.lw_opp_schedule, r.zero_out_interval, r.mag_ratio_limit) == (1000, "reg", 100, 1000)
    n, drop = _TRAIN[cfg.data.name]
    iters = n // cfg.data.batch_size if drop else -(-n // cfg.data.batch_size)
    need = check_phase(cfg.prune.method, epochs=cfg.prune.epochs, iters_per_epoch=iters,
                       reg_granularity=r.granularity, reg_ceiling=r.ceiling,
                       update_reg_interval=r.update_interval, stabilize_interval=r.stabilize_interval)
    assert cfg.prune.epochs == -(-need // iters)  # the shortest phase that fits, no idle epochs
