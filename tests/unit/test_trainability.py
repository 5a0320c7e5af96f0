"""Jacobian singular values (exact and randomized) and trainability accuracy."""
import pytest
import torch
from torch import nn

from distributed_prune.errors import UserError
from distributed_prune.trainability import jsv, trainability_accuracy


def _linear_mlp(widths, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])


def _small_cnn(num_classes=10, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, num_classes))
    with torch.no_grad():  # non-trivial running statistics
        net.train()(torch.randn(32, 3, 8, 8) * 2 + 0.5)
    return net


def test_exact_equals_product_of_weights_for_linear_net():
    net = _linear_mlp([12, 20, 9, 5])
    x = torch.randn(4, 12)
    stats = jsv(net, x, method="exact")
    prod = net[2].weight @ net[1].weight @ net[0].weight  # (5, 12): J of every sample
    s = torch.linalg.svdvals(prod.double().detach())
    torch.testing.assert_close(stats["mean"], s.mean().item(), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["std"], s.std(unbiased=False).item(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(stats["max"], s.max().item(), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["min"], s.min().item(), rtol=1e-4, atol=0)
    torch.testing.assert_close(stats["cond"], (s.max() / s.min()).item(), rtol=1e-4, atol=0)
    assert jsv(net, x)["mean"] == pytest.approx(stats["mean"])  # "auto" picks exact here


@pytest.mark.parametrize("num_classes, steps", [(10, 20), (24, 8)])
def test_randomized_close_to_exact_on_cnn_with_bn(num_classes, steps):
    # (10, 20): Lanczos spans the whole 10-dim space: only Hutchinson noise remains.
    # (24, 8): fewer steps than singular values: quadrature approximation of sqrt as well.
    net = _small_cnn(num_classes)
    x = torch.randn(6, 3, 8, 8)
    exact = jsv(net, x, method="exact")
    est = jsv(net, x, method="randomized", num_projections=32, lanczos_steps=steps, seed=1)
    assert est["mean"] == pytest.approx(exact["mean"], rel=0.08)
    assert est["max"] == pytest.approx(exact["max"], rel=0.02)
    assert est["std"] == pytest.approx(exact["std"], rel=0.15)
    if steps >= num_classes:  # full Krylov space: extremes are exact
        assert est["min"] == pytest.approx(exact["min"], rel=0.02)
    else:  # Ritz values lie inside the spectrum
        assert est["min"] >= exact["min"] * (1 - 1e-3)


def test_randomized_input_space_branch():
    # D = 6 < C = 16: Lanczos runs on J^T J in input space.
    net = _linear_mlp([6, 16])
    x = torch.randn(3, 6)
    exact = jsv(net, x, method="exact")
    est = jsv(net, x, method="randomized", num_projections=32)
    assert est["mean"] == pytest.approx(exact["mean"], rel=0.08)
    assert est["max"] == pytest.approx(exact["max"], rel=1e-3)


def test_mean_jsv_decreases_when_rows_are_zeroed():
    net = _linear_mlp([16, 32, 32, 32, 10], seed=3)
    x = torch.randn(2, 16)
    means = []
    for ratio in (0.0, 0.3, 0.6, 0.9):
        with torch.no_grad():
            for layer in list(net)[:-1]:
                k = int(ratio * layer.out_features)
                layer.weight[:k] = 0  # prune the first k filters (nested across ratios)
        means.append(jsv(net, x, method="exact")["mean"])
    assert all(a > b for a, b in zip(means, means[1:])), means


def test_flags_restored_params_untouched_no_grad():
    net = _small_cnn()
    net.train()
    net[1].eval()  # a mixed state must survive as it is
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    for method in ("exact", "randomized"):
        jsv(net, x, method=method, num_projections=4, lanczos_steps=4)
    assert net.training and not net[1].training and net[4].training
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_max_samples_and_bad_input():
    net = _linear_mlp([4, 3])
    x = torch.randn(5, 4)
    assert jsv(net, x, max_samples=1)["mean"] == pytest.approx(jsv(net, x[:1])["mean"])
    with pytest.raises(UserError, match="method"):
        jsv(net, x, method="svd")
    with pytest.raises(UserError):
        jsv(net, torch.randn(4))


def test_cond_of_rank_deficient_jacobian_is_finite():
    net = _linear_mlp([8, 2, 8])  # rank 2 Jacobian of size 8 x 8
    stats = jsv(net, torch.randn(2, 8), method="exact")
    assert stats["min"] == pytest.approx(0, abs=1e-6)
    assert 1e5 < stats["cond"] < float("inf")


def test_trainability_accuracy():
    assert trainability_accuracy([0.2, 0.4, 0.6, 0.9], 3) == pytest.approx(0.4)
    with pytest.raises(UserError, match="first 5"):
        trainability_accuracy([0.2, 0.4], 5)
    with pytest.raises(UserError):
        trainability_accuracy([0.2], 0)
