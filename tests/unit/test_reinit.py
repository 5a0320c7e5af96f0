"""Re-initialisation registry: none, OrthP, scratch."""
import math

import pytest
import torch
from torch import nn

from distributed_prune.errors import UserError
from distributed_prune.prune.reinit import REINITS, reinit


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),     # wide: 5 x 27
        nn.Conv2d(5, 40, 1), nn.ReLU(),                       # tall: 40 x 5
        nn.Conv1d(4, 6, 2),                                   # wide 6 x 8 (not in the forward)
        nn.Flatten(), nn.Linear(40, 7), nn.Linear(7, 30))     # wide 7 x 40, tall 30 x 7


def _gram(w):
    w = w.detach().reshape(w.shape[0], -1).double()
    return w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w


@pytest.mark.parametrize("activation, gain", [("relu", math.sqrt(2)), ("linear", 1.0),
                                              ("identity", 1.0)])
def test_orthp_makes_every_weight_orthogonal(activation, gain):
    torch.manual_seed(0)
    net = _net()
    biases = {n: p.clone() for n, p in net.named_parameters() if not n.endswith("weight")}
    bn_weight = net[1].weight.clone()
    assert reinit("orthp", net, activation=activation) is net
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert len(layers) == 5
    for m in layers:
        g = _gram(m.weight)
        torch.testing.assert_close(g, gain ** 2 * torch.eye(g.shape[0], dtype=g.dtype),
                                   atol=1e-5, rtol=0)
    for n, p in net.named_parameters():
        if n in biases:
            assert torch.equal(p, biases[n]), n
    assert torch.equal(net[1].weight, bn_weight)


def test_orthp_keeps_an_orthogonal_matrix():
    lin = nn.Linear(6, 6, bias=False)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    with torch.no_grad():
        lin.weight.copy_(q)
    reinit("orthp", lin, activation="linear")
    torch.testing.assert_close(lin.weight, q.float(), atol=1e-6, rtol=0)


def test_none_is_a_no_op():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    reinit("none", net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_scratch_changes_weights_and_is_deterministic():
    def run(seed):
        torch.manual_seed(123)
        net = _net()
        with torch.no_grad():
            net[1].weight.fill_(3.0)
            net[1].running_mean.fill_(1.0)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        torch.manual_seed(seed)
        reinit("scratch", net)
        return before, net.state_dict()

    before, a = run(0)
    _, b = run(0)
    _, c = run(1)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in ("0.weight", "3.weight", "7.weight"):
        assert not torch.equal(a[k], before[k]) and not torch.equal(a[k], c[k])
    assert torch.equal(a["1.weight"], torch.ones(5)) and torch.equal(a["1.running_mean"], torch.zeros(5))


def test_unknown_names():
    with pytest.raises(UserError, match="none, orthp, scratch"):
        reinit("orthogonal", nn.Linear(2, 2))
    with pytest.raises(UserError, match="activation"):
        reinit("orthp", nn.Linear(2, 2), activation="swish-ish")
    assert {"none", "orthp", "scratch"} <= set(REINITS)


def test_scratch_uses_the_constructors_init_on_the_pruned_architecture():
    from distributed_prune import models, prune

    torch.manual_seed(0)
    dense = models.create("resnet20", num_classes=10)
    example = torch.randn(2, 3, 16, 16)
    plan = prune.plan(dense, "0.5", criterion="l1", example_input=example)
    pruned = prune.apply(dense, plan, mode="physical")
    old = {k: v.clone() for k, v in pruned.state_dict().items()}

    def fresh():
        return prune.replay(models.create("resnet20", num_classes=10), plan)

    torch.manual_seed(7)
    got = reinit("scratch", pruned, fresh=fresh)
    torch.manual_seed(7)
    ref = prune.replay(models.create("resnet20", num_classes=10), plan)
    assert got is not pruned
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, msg=k)
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in old.items())  # input untouched
    # the constructor's Kaiming-normal (fan_out, relu) convs, not PyTorch's default init
    # (kaiming_uniform with a=sqrt(5): std 1/sqrt(3 fan_in)): pooled z-scores over all convs
    z, n = [], 0
    for name, m in got.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.shape[-1] == 3:
            dense_out = dict(models.create("resnet20").named_modules())[name].weight.shape[0]
            std = math.sqrt(2.0 / (dense_out * 9))
            z.append((m.weight.detach().double() / std).flatten())
    z = torch.cat(z)
    assert abs(float(z.std()) - 1.0) < 0.05 and abs(float(z.mean())) < 0.05
    bad = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="does not match"):
        reinit("scratch", bad, fresh=lambda: nn.Sequential(nn.Linear(3, 5)))
