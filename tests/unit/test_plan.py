import copy

import pytest
import torch
import torch.nn as nn

from distributed_prune import models, prune
from distributed_prune.errors import UserError


def test_l1_keeps_exactly_the_largest_filters():
    net = nn.Sequential(nn.Conv2d(2, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([3.0, 0.1, 2.0, 0.5, 5.0, 0.2]).view(6, 1, 1, 1).repeat(1, 2, 1, 1))
        net[0].weight[1, 0] = -0.1  # sign must not matter: mean |W|
    p = prune.plan(net, "[0:0.5]", criterion="l1", example_input=torch.zeros(1, 2, 1, 1))
    assert p.groups[0].keep == [0, 2, 4]
    p = prune.plan(net, "[0:0.5]", criterion="l2", example_input=torch.zeros(1, 2, 1, 1))
    assert p.groups[0].keep == [0, 2, 4]
    p = prune.plan(net, "[0:0.5]", criterion="l1", example_input=torch.zeros(1, 2, 1, 1), pick="largest")
    assert p.groups[0].keep == [1, 3, 5]


def test_plan_json_roundtrip_and_determinism():
    net = models.create("resnet20", num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    p1 = prune.plan(net, "[0,0.3,0.5,0.7,0]", example_input=x)
    p2 = prune.plan(copy.deepcopy(net), "[0,0.3,0.5,0.7,0]", example_input=x)
    assert p1.to_json() == p2.to_json() and p1.sha256() == p2.sha256()
    q = prune.Plan.from_json(p1.to_json())
    assert q == p1
    with pytest.raises(UserError):
        prune.Plan.from_json("{not json")


def test_random_criterion_is_seeded():
    net = models.create("resnet20", num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    a = prune.plan(net, "0.5", criterion="random", example_input=x, seed=1)
    b = prune.plan(net, "0.5", criterion="random", example_input=x, seed=1)
    c = prune.plan(net, "0.5", criterion="random", example_input=x, seed=2)
    assert a.sha256() == b.sha256() != c.sha256()


def test_bn_scale_and_taylor():
    net = models.create("vgg_tiny", num_classes=10)
    bn = net.features[1]
    with torch.no_grad():
        bn.weight.copy_(torch.arange(16, dtype=torch.float32) - 7.5)  # |gamma| smallest at 7, 8
    p = prune.plan(net, "[0:0.125]", criterion="bn_scale", example_input=torch.zeros(1, 1, 8, 8))
    assert sorted(set(range(16)) - set(p.groups[0].keep)) == [7, 8]
    with pytest.raises(UserError, match="gradient"):
        prune.plan(net, "[1:0.5]", criterion="taylor", example_input=torch.zeros(1, 1, 8, 8))
    net(torch.randn(4, 1, 8, 8)).sum().backward()
    w, g = net.features[3].weight, net.features[3].weight.grad
    score = (w * g).flatten(1).sum(1).abs()
    p = prune.plan(net, "[1:0.5]", criterion="taylor", example_input=torch.zeros(1, 1, 8, 8))
    assert p.groups[0].keep == sorted(torch.argsort(score, descending=True)[:8].tolist())


def test_unknown_criterion_and_apply_mode():
    net = models.create("lenet5")
    with pytest.raises(UserError, match="criterion"):
        prune.plan(net, "0.5", criterion="nope", example_input=torch.zeros(1, 1, 8, 8))
    p = prune.plan(net, "0.5", example_input=torch.zeros(1, 1, 8, 8))
    with pytest.raises(UserError, match="mode"):
        prune.apply(net, p, mode="bogus")


def test_plan_on_wrong_model_is_user_error():
    p = prune.plan(models.create("resnet20"), "[0,0.5,0.5,0.5,0]", example_input=torch.zeros(1, 3, 32, 32))
    with pytest.raises(UserError):
        prune.apply(models.create("lenet5"), p)
