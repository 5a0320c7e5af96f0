"""The method table: every configurable prune.method has a row, and each row's parts work."""
import typing

import pytest
import torch
from torch import nn

from distributed_prune import config, prune
from distributed_prune.errors import UserError
from distributed_prune.prune import importance
from distributed_prune.prune.methods import METHODS, Phase, method, targets
from distributed_prune.prune.regularize import TPP, GReg

REG = dict(granularity=1e-4, ceiling=1.0, update_interval=5, stabilize_interval=400, lw_opp=1000.0)


def test_table_covers_exactly_the_configurable_methods():
    choices = typing.get_args(config.PruneCfg.model_fields["method"].annotation)
    assert set(choices) == set(METHODS)
    with pytest.raises(UserError, match="unknown method 'nope'"):
        method("nope")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_row(name):
    m = METHODS[name]
    net, x = _net(), torch.randn(2, 3, 8, 8)
    if m.criterion is None:
        assert m.phase is Phase.NONE and m.make_regularizer is None
        return
    assert m.criterion in importance.CRITERIA
    if m.needs_grads:
        nn.functional.cross_entropy(net(x), torch.tensor([0, 1])).backward()
    plan = prune.plan(net, "[0:0.5]", criterion=m.criterion, example_input=x)
    reg = m.regularizer(net, targets(plan, net), **REG)
    if m.phase is Phase.REGULARIZATION:
        assert m.trains_before_cut and isinstance(reg, {"greg": GReg, "tpp": TPP}[name])
        # the targets are the plan's pruned filters of the first conv, with its BatchNorm
        tg = reg.targets
        assert [(t.layer_name, t.pruned, t.bn_name) for t in tg] == [("0", plan.pruned(plan.groups[0]), "1")]
    elif m.phase is Phase.MASKED:
        # the masked phases (prune/masked.py) train with masks before the cut; no regularizer
        assert name in ("gradual", "soft") and reg is None and m.trains_before_cut
    else:
        assert m.phase is Phase.ONE_SHOT and reg is None and not m.trains_before_cut
