"""GReg and TPP drive the chosen filters to zero and leave the others alive."""
import pytest
import torch
from torch import nn

from distributed_prune.errors import UserError
from distributed_prune.prune.regularize import TPP, GReg, Target

PRUNED = {"0": [0, 2, 5], "3": [1, 4]}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def _targets():
    return {name: Target(name, idx, str(int(name) + 1)) for name, idx in PRUNED.items()}


def _filter_norms(net):
    return {n: net[int(n)].weight.detach().flatten(1).norm(dim=1).clone() for n in PRUNED}


def _train(net, reg, steps=400):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (32,), generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    for it in range(steps):
        reg.step(it)
        loss = nn.functional.cross_entropy(net(x), y)
        if isinstance(reg, TPP):
            loss = loss + reg.loss(net)
        opt.zero_grad()
        loss.backward()
        if isinstance(reg, GReg):
            reg.apply_(net)
        opt.step()


@pytest.mark.parametrize("kind", ["greg", "tpp"])
def test_regularizer_zeroes_pruned_filters_only(kind):
    net = _net()
    before = _filter_norms(net)
    if kind == "greg":
        reg = GReg(net, _targets(), reg_granularity=0.05, reg_ceiling=1.0, update_reg_interval=2,
                   stabilize_interval=100)
    else:
        reg = TPP(net, _targets(), lw_opp=1000.0, reg_granularity=0.05, reg_ceiling=1.0,
                  update_reg_interval=2, stabilize_interval=100)
    _train(net, reg)
    assert reg.done
    after = _filter_norms(net)
    for name, idx in PRUNED.items():
        kept = [i for i in range(len(before[name])) if i not in idx]
        assert (after[name][idx] < 0.05 * before[name][idx]).all(), (name, after[name][idx])
        assert (after[name][kept] > 0.5 * before[name][kept]).all(), (name, after[name][kept])
        bn = net[int(name) + 1]
        assert bn.weight[idx].abs().max() < 0.05 and bn.bias[idx].abs().max() < 0.05
        assert bn.weight[kept].abs().min() > 0.5


def test_greg_gradient_touches_only_pruned_channels():
    net = _net()
    reg = GReg(net, _targets(), reg_granularity=0.5, update_reg_interval=1)
    reg.step(1)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    reg.apply_(net)
    for n, p in net.named_parameters():
        delta = p.grad - grads[n]
        layer = n.split(".")[0]
        idx = PRUNED.get(layer) or PRUNED.get(str(int(layer) - 1), [])
        if n.startswith("8"):
            idx = []
        expected = torch.zeros_like(p)
        expected[idx] = 0.5 * p.detach()[idx]
        torch.testing.assert_close(delta, expected, msg=n)
    assert reg.penalty(net) > 0


def test_tpp_loss_definition():
    net = _net()
    tpp = TPP(net, {"0": Target("0", [0, 2], None)}, lw_opp=2.0)
    w = net[0].weight.detach().flatten(1)
    gram = w @ w.T
    target = gram.clone()
    target[[0, 2], :] = 0
    target[:, [0, 2]] = 0
    torch.testing.assert_close(tpp.loss(net), 2.0 * (gram - target).square().mean())
    tpp.loss(net).backward()  # kept-kept Gram entries carry no gradient: a lone kept filter
    grad = net[0].weight.grad.flatten(1)  # gets only the pull along the pruned filters' span
    proj = grad[1] - (grad[1] @ w[[0, 2]].T) @ torch.linalg.pinv(w[[0, 2]].T)
    assert proj.abs().max() < 1e-4 * grad[1].abs().max()


def test_schedule_reaches_ceiling_then_stabilizes():
    net = _net()
    greg = GReg(net, _targets(), reg_granularity=1e-4, reg_ceiling=1.0, update_reg_interval=5,
                stabilize_interval=7)
    assert greg.ceiling_iteration == 10000 * 5
    assert greg.step(0) == 0 and greg.step(4) == 0 and greg.step(5) == pytest.approx(1e-4)
    assert greg.step(49999) < 1.0 and greg.step(50000) == 1.0 and greg.step(10 ** 6) == 1.0
    greg.step(50000 + 6)
    assert not greg.done
    greg.step(50000 + 7)
    assert greg.done
    tpp = TPP(net, _targets(), reg_granularity=0.3, reg_ceiling=1.0, update_reg_interval=10,
              stabilize_interval=0)
    assert tpp.ceiling_iteration == 40 and tpp.step(30) == pytest.approx(0.9)
    assert tpp.step(40) == 1.0 and tpp.done


def test_bad_targets():
    net = _net()
    with pytest.raises(UserError, match="'2'"):
        GReg(net, [Target("2", [0])])  # ReLU
    with pytest.raises(UserError, match="indices"):
        GReg(net, [Target("0", [8])])
    with pytest.raises(UserError, match="BatchNorm"):
        TPP(net, [Target("0", [1], "4")])  # BN with 6 features after an 8-filter conv
