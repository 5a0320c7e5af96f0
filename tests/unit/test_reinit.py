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
        with pytest.warns(UserWarning, match="model family Sequential"):
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


# --- scratch: initialised as the small dense model, at the PRUNED shapes -------------------------
# A sample std s of N iid draws with std sigma and kurtosis k has standard error
# sigma * sqrt((k - 1) / (4 N)) (delta method on s^2): k = 3 for a normal, 9/5 for a uniform.
# The checks pool z = w / sigma_expected over the pruned layers and allow 4 standard errors.


def _zstd(layers, sigma_of):
    z = torch.cat([(m.weight.detach().double() / sigma_of(m)).flatten() for m in layers])
    return float(z.std()), z.numel()


def _fan_out_std(m):  # kaiming_normal_(mode="fan_out", nonlinearity="relu"), current shape
    w = m.weight
    return math.sqrt(2.0 / (w.shape[0] * w[0, 0].numel()))


def _prune(name, spec, example, **kw):
    from distributed_prune import models, prune

    torch.manual_seed(0)
    dense = models.create(name, **kw)
    with torch.no_grad():  # stand-in for training: no parameter keeps a constructor value
        for p in dense.parameters():
            p.add_(0.1 * torch.randn_like(p))
    plan = prune.plan(dense, spec, criterion="l1", example_input=example)
    pruned = prune.apply(dense, plan, mode="physical")
    fresh = lambda: prune.replay(models.create(name, **kw), plan)  # noqa: E731
    return pruned, fresh


def _scratch_and_old(pruned, fresh, seed=7):
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    torch.manual_seed(seed)
    got = reinit("scratch", pruned, fresh=fresh)
    torch.manual_seed(seed)
    old = fresh()  # the previous behaviour: a dense init sliced to the plan
    assert got is not pruned
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())  # input untouched
    return got, old


def _nothing_survives(got, pruned, old):
    """No element of any parameter equals the pruned model's (the dense model's slice), and no
    random-init weight equals the dense init sliced to the same shapes under the same seed."""
    ref = dict(pruned.named_parameters())
    for n, p in got.named_parameters():
        assert p.shape == ref[n].shape and not (p == ref[n]).any(), n
    old_w = {n: m.weight for n, m in old.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for n, m in got.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert not (m.weight == old_w[n]).any(), n


def _check_fan_out(got, old, pruned_convs):
    new_layers = [dict(got.named_modules())[n] for n in pruned_convs]
    old_layers = [dict(old.named_modules())[n] for n in pruned_convs]
    s_new, n = _zstd(new_layers, _fan_out_std)
    tol = 4 * math.sqrt((3 - 1) / (4 * n))
    assert abs(s_new - 1.0) < tol, (s_new, tol)
    # the old behaviour (dense-fan std on the pruned shapes) fails the same check
    s_old, _ = _zstd(old_layers, _fan_out_std)
    assert abs(s_old - 1.0) > tol, (s_old, tol)
    return s_new, s_old, tol


def test_scratch_resnet56_uses_the_pruned_fan_out():
    pruned, fresh = _prune("resnet56", "[0,0.9,0.9,0.9,0]", torch.randn(2, 3, 32, 32))
    got, old = _scratch_and_old(pruned, fresh)
    # block conv1s lost 90 % of their output channels: fan_out = kept * 9, not dense * 9
    convs = [n for n, m in got.named_modules() if n.endswith(".conv1") and isinstance(m, nn.Conv2d)]
    assert len(convs) == 27 and all(dict(got.named_modules())[n].weight.shape[0] <= 7 for n in convs)
    _check_fan_out(got, old, convs)
    _nothing_survives(got, pruned, old)
    # the rest at their constructor / PyTorch defaults, BN statistics cleared
    for n, m in got.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any(), n
            assert not m.running_mean.any() and torch.equal(m.running_var, torch.ones_like(m.running_var))
    bound = 1 / math.sqrt(got.fc.weight.shape[1])  # nn.Linear default: U(-1/sqrt(fan_in), ...)
    assert float(got.fc.weight.detach().abs().max()) <= bound


def test_scratch_torchvision_resnet18_uses_the_pruned_fan_out():
    pruned, fresh = _prune("resnet18", "[0,0.9,0.9,0.9,0.9,0]", torch.randn(1, 3, 64, 64),
                           num_classes=10)
    got, old = _scratch_and_old(pruned, fresh)
    convs = [n for n, m in got.named_modules() if n.endswith(".conv1") and n.startswith("layer")]
    assert len(convs) == 8 and all(dict(got.named_modules())[n].weight.shape[0] <= 52 for n in convs)
    _check_fan_out(got, old, convs)
    _nothing_survives(got, pruned, old)


def test_scratch_mlp7_uses_the_pruned_fan_in():
    """MLP-7's constructor keeps nn.Linear's default: weight U(-b, b), b = 1/sqrt(fan_in)."""
    pruned, fresh = _prune("mlp_7_relu", "0.5", torch.randn(2, 64))
    got, old = _scratch_and_old(pruned, fresh)
    lins = [m for m in got.modules() if isinstance(m, nn.Linear)]
    olds = [m for m in old.modules() if isinstance(m, nn.Linear)]
    # the paper's chain rule spares the first layer's outputs: layers 3..7 take the pruned width
    assert [m.in_features for m in lins] == [64, 100] + [50] * 5
    later, old_later = lins[2:], olds[2:]
    for m in later:
        b = 1 / math.sqrt(m.in_features)
        assert float(m.weight.detach().abs().max()) <= b and float(m.bias.detach().abs().max()) <= b
    # the largest of 2,500 uniform draws lies within 1 % of the bound unless p < 0.99^2500 ~ 1e-11
    assert all(float(m.weight.detach().abs().max()) * math.sqrt(m.in_features) > 0.99 for m in later[:-1])
    s_new, n = _zstd(later, lambda m: 1 / math.sqrt(3 * m.in_features))
    tol = 4 * math.sqrt((9 / 5 - 1) / (4 * n))
    assert abs(s_new - 1.0) < tol, (s_new, tol)
    s_old, _ = _zstd(old_later, lambda m: 1 / math.sqrt(3 * m.in_features))
    assert abs(s_old - 1.0) > tol, (s_old, tol)
    _nothing_survives(got, pruned, old)


def test_scratch_without_fresh_reinitialises_in_place():
    pruned, _ = _prune("resnet20", "[0,0.5,0.5,0.5,0]", torch.randn(2, 3, 16, 16))
    before = {n: p.clone() for n, p in pruned.named_parameters()}
    torch.manual_seed(3)
    assert reinit("scratch", pruned) is pruned
    for n, p in pruned.named_parameters():
        assert not (p == before[n]).any(), n


def test_scratch_checks_the_fresh_shapes():
    bad = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="does not match"):
        reinit("scratch", bad, fresh=lambda: nn.Sequential(nn.Linear(3, 5)))
