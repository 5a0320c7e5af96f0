"""MACs through torch.utils.flop_counter against docs/science.md section 5 (within 1%)."""
import copy

import pytest
import torch

from distributed_prune import flops, models, prune


def _speedup(name, spec, shape, nc):
    net = models.create(name, num_classes=nc)
    x = torch.zeros(1, *shape)
    dense = flops.count(net, x)
    # the plan does not depend on the resolution: trace at 32 px (fast), count MACs at full size
    small = prune.apply(copy.deepcopy(net), prune.plan(net, spec, example_input=torch.zeros(1, shape[0], 32, 32)))
    pr = flops.count(small, x)
    return dense, pr, dense["macs"] / pr["macs"]


@pytest.mark.parametrize("p,expect", [(0.3, 1.45), (0.5, 1.99), (0.7, 3.59), (0.9, 11.58)])
def test_resnet56(p, expect):
    dense, _, s = _speedup("resnet56", f"[0,{p},{p},{p},0]", (3, 32, 32), 10)
    assert abs(dense["macs"] / 1e6 - 125.49) < 0.1 and abs(dense["params"] / 1e6 - 0.85) < 0.01
    assert abs(s / expect - 1) < 0.01


@pytest.mark.parametrize("spec,expect", [("[0,0.6,0.6,0.6,0.21,0]", 2.31), ("[0,0.74,0.74,0.6,0.21,0]", 2.56),
                                         ("[0,0.68,0.68,0.68,0.5,0]", 3.06), ("[0,0.3,0.3,0.3,0.14,0]", 1.49)])
def test_resnet50(spec, expect):
    dense, _, s = _speedup("resnet50", spec, (3, 224, 224), 1000)
    assert abs(dense["macs"] / 1e9 - 4.09) < 0.01
    assert abs(s / expect - 1) < 0.01


@pytest.mark.parametrize("p,expect", [(0.1, 1.11), (0.3, 1.41), (0.5, 1.93), (0.7, 3.09), (0.9, 7.68), (0.95, 12.06)])
def test_resnet34(p, expect):
    dense, _, s = _speedup("resnet34", f"[0,{p},{p},{p},{p},0]", (3, 224, 224), 1000)
    assert abs(dense["macs"] / 1e9 - 3.66) < 0.01
    assert abs(s / expect - 1) < 0.01


@pytest.mark.parametrize("r,expect,fewer", [(0.1, 1.23, 19.24), (0.3, 1.97, 51.03), (0.5, 3.61, 74.88), (0.7, 8.89, 90.99)])
def test_vgg19(r, expect, fewer):
    net = models.create("vgg19_c", num_classes=100)
    x = torch.zeros(1, 3, 32, 32)
    dense, pr, s = _speedup("vgg19_c", f"[1-15:{r}]", (3, 32, 32), 100)
    assert abs(s / expect - 1) < 0.01
    # "fewer conv+linear weights" counts weight tensors only (no BN, no bias)
    small = prune.apply(copy.deepcopy(net), prune.plan(net, f"[1-15:{r}]", example_input=x))
    w = lambda m: sum(p.numel() for n, p in m.named_parameters() if p.dim() > 1)  # noqa: E731
    assert abs(100 * (1 - w(small) / w(net)) - fewer) < 0.05


def test_count_is_per_sample_and_excludes_bn():
    net = models.create("lenet5")
    a = flops.count(net, torch.zeros(1, 1, 8, 8))
    b = flops.count(net, torch.zeros(7, 1, 8, 8))
    assert a == b
    # conv1: 6 * 1 * 25 * 64 positions; conv2: 16 * 6 * 25 * 16; fc: 256*120 + 120*84 + 84*10
    assert a["macs"] == 6 * 25 * 64 + 16 * 6 * 25 * 16 + 256 * 120 + 120 * 84 + 84 * 10
