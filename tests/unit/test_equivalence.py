"""The key test: a physically pruned model computes exactly what the masked model computes."""
import copy

import pytest
import torch
import torch.nn as nn

from distributed_prune import models, prune

CASES = [
    ("mlp_7_linear", "[0-5:0.8,6:0]", (64,), {}),
    ("mlp_7_linear", "0.5", (64,), {}),
    ("mlp_7_relu", "*features.[1-9]:0.3", (64,), {}),
    ("lenet5", "0.5", (1, 8, 8), {}),
    ("resnet20", "[0,0.5,0.5,0.5,0]", (3, 16, 16), {}),
    ("resnet56", "[0,0.9,0.7,0.3,0]", (3, 16, 16), {}),
    ("resnet56", "*layer*.conv1:0.9,*layer3*.conv1:0.2", (3, 16, 16), {}),
    ("vgg19_c", "[1-15:0.5]", (3, 32, 32), {}),
    ("vgg19_c", "[1-3:0.3,7-12:0.7]", (3, 32, 32), {}),
    ("resnet18", "[0,0.5,0.5,0.5,0.5,0]", (3, 32, 32), {}),
    ("resnet18", "layer2.0.conv2:0.5", (3, 32, 32), {}),   # stage output: residual adds + downsample
    ("resnet34", "0.3", (3, 32, 32), {}),
    ("resnet50", "[0,0.6,0.6,0.6,0.21,0]", (3, 32, 32), {}),
    ("resnet50", "layer3.0.conv3:0.25", (3, 32, 32), {}),  # coupled bottleneck outputs
    ("mobilenet_v2", "*features.*.conv.0.0:0.5", (3, 32, 32), {}),  # expansion -> depthwise -> project
    ("densenet121", "*denselayer*.conv1:0.5,*transition*.conv:0.3", (3, 32, 32), {}),  # concatenations
]


def _warm_bn(net, shape):
    """Give BN layers non-trivial running statistics (and random affine parameters)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(8, *shape))


@pytest.mark.parametrize("name,spec,shape,kw", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_physical_equals_masked(name, spec, shape, kw):
    net = models.create(name, num_classes=10, **kw)
    _warm_bn(net, shape)
    x = torch.randn(3, *shape)
    p = prune.plan(net, spec, example_input=x[:1])
    assert p.groups, "spec pruned nothing"
    phys = prune.apply(copy.deepcopy(net), p, mode="physical").eval()
    masked = prune.apply(copy.deepcopy(net), p, mode="mask").eval()

    # the pruned shapes match the plan
    for g in p.groups:
        m = phys.get_submodule(g.root)
        assert (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == len(g.keep)
    assert sum(q.numel() for q in phys.parameters()) < sum(q.numel() for q in net.parameters())

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = phys(xa), masked(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    (ya.square().sum()).backward()
    (yb.square().sum()).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    # and it is not trivially equal to the dense model
    assert not torch.allclose(ya, net.eval()(x), atol=1e-4)


def test_masks_stay_zero_through_training():
    net = models.create("resnet20", num_classes=10)
    p = prune.plan(net, "[0,0.5,0.5,0.5,0]", example_input=torch.zeros(1, 3, 16, 16))
    prune.apply(net, p, mode="mask")
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3, 16, 16)).logsumexp(1).sum().backward()
        opt.step()
    net(torch.randn(1, 3, 16, 16))  # forward re-zeroes
    for g in p.groups:
        pruned = p.pruned(g)
        w = net.get_submodule(g.root).weight
        assert w[pruned].abs().sum() == 0 and w[g.keep].abs().sum() > 0
        assert net.get_submodule(g.root).weight.grad[pruned].abs().sum() == 0


def test_replay_rebuilds_architecture_for_state_dict():
    net = models.create("resnet56", num_classes=10)
    p = prune.plan(net, "[0,0.7,0.7,0.7,0]", example_input=torch.zeros(1, 3, 32, 32))
    small = prune.apply(copy.deepcopy(net), p)
    fresh = prune.replay(models.create("resnet56", num_classes=10), prune.Plan.from_json(p.to_json()))
    fresh.load_state_dict(small.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), small.eval()(x))


@pytest.mark.parametrize("name,spec,shape", [("vgg_tiny", "[1-3:0.5]", (1, 8, 8)),
                                             ("resnet20", "[0,0.5,0.5,0.5,0]", (3, 8, 8))])
def test_masked_conv_kernel_equals_physical(name, spec, shape):
    """mode="mask" with the MaskedConv2d kernels (Triton under TRITON_INTERPRET=1 here, on CUDA in
    production) computes what the physically pruned model computes, and keeps state_dict keys."""
    from distributed_prune.kernels import MaskedConv2d

    net = models.create(name, num_classes=10, in_channels=shape[0])
    _warm_bn(net, shape)
    x = torch.randn(2, *shape)
    p = prune.plan(net, spec, example_input=x[:1])
    phys = prune.apply(copy.deepcopy(net), p, mode="physical").eval()
    masked = prune.apply(copy.deepcopy(net), p, mode="mask", kernel="masked_conv").eval()
    assert any(isinstance(m, MaskedConv2d) for m in masked.modules())
    assert set(masked.state_dict()) == set(net.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = phys(xa), masked(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
