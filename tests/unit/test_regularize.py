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


def _train(net, reg, steps=1000):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (32,), generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    for it in range(steps):
        reg.step(it, net)
        loss = nn.functional.cross_entropy(net(x), y) + reg.loss(net)
        opt.zero_grad()
        loss.backward()
        reg.apply_(net)
        opt.step()
        reg.after_step(net)
        if reg.done:
            break


@pytest.mark.parametrize("kind", ["greg", "tpp"])
def test_regularizer_zeroes_pruned_filters_only(kind):
    net = _net()
    before = _filter_norms(net)
    if kind == "greg":
        reg = GReg(net, _targets(), reg_granularity=0.05, reg_ceiling=1.0, update_reg_interval=2,
                   stabilize_interval=600, mag_ratio_limit=None)
    else:
        reg = TPP(net, _targets(), lw_opp=1000.0, reg_granularity=0.05, reg_ceiling=1.0,
                  update_reg_interval=2, stabilize_interval=600, zero_out_interval=0)
    _train(net, reg)
    assert reg.done and reg.iteration == reg.phase_iterations - 1
    after = _filter_norms(net)
    for name, idx in PRUNED.items():
        kept = [i for i in range(len(before[name])) if i not in idx]
        assert (after[name][idx] < 0.05 * before[name][idx]).all(), (name, after[name][idx])
        assert (after[name][kept] > 0.5 * before[name][kept]).all(), (name, after[name][kept])
        bn = net[int(name) + 1]
        assert bn.weight[kept].abs().min() > 0.5
        if kind == "tpp":  # TPP's L2 term covers the BN too; GReg's (authors' default) does not
            assert bn.weight[idx].abs().max() < 0.05 and bn.bias[idx].abs().max() < 0.05
        else:
            assert bn.weight[idx].abs().min() > 0.5


def _drive(reg, net, n):
    """reg after ``step`` at iterations 0..n-1 (no training: the weights stay put)."""
    out = []
    for it in range(n):
        reg.step(it, net)
        out.append(reg.reg)
    return out


def test_greg_schedule_by_hand():
    # Regularization-Pruning _greg_1: at it % tau == 0 (it = 0 included) reg += Delta; stop after
    # the update with reg > ceiling; then stabilize_reg_interval more iterations.
    net = _net()
    d, tau, s = 0.3, 2, 3
    greg = GReg(net, _targets(), reg_granularity=d, reg_ceiling=1.0, update_reg_interval=tau,
                stabilize_interval=s, mag_ratio_limit=None)
    expect, reg, start = [], 0.0, None
    for it in range(12):
        if start is None and it % tau == 0:
            reg += d
            if reg > 1.0:
                start = it
        expect.append(reg)
    assert start == 6 and greg.phase_iterations == start + s + 1 == 10
    got = _drive(greg, net, 12)
    assert got == pytest.approx(expect)
    assert [greg.reg_at(i) for i in range(12)] == pytest.approx(expect)
    greg2 = GReg(net, _targets(), reg_granularity=d, update_reg_interval=tau, stabilize_interval=s,
                 mag_ratio_limit=None)
    done = [greg2.step(i, net) is not None and greg2.done for i in range(12)]
    assert done.index(True) == start + s
    # authors' ImageNet defaults: 10001 updates of 1e-4 until reg > 1, stabilize 40000
    big = GReg(net, _targets())
    assert big.ceiling_iteration == 10000 * 5 and big.phase_iterations == 50000 + 40000 + 1


def test_greg_terms_by_hand():
    net = _net()
    for bn_reg in (False, True):
        greg = GReg(net, _targets(), reg_granularity=0.5, update_reg_interval=1,
                    mag_ratio_limit=None, bn_reg=bn_reg)
        greg.step(0, net)
        greg.step(1, net)  # two updates: reg = 1.0
        net.zero_grad()
        net(torch.randn(2, 3, 8, 8)).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        greg.apply_(net)
        for n, p in net.named_parameters():
            layer, kind = n.split(".")
            expected = torch.zeros_like(p)
            if layer in PRUNED and kind == "weight":
                expected[PRUNED[layer]] = 1.0 * p.detach()[PRUNED[layer]]
            if bn_reg and str(int(layer) - 1) in PRUNED:
                idx = PRUNED[str(int(layer) - 1)]
                expected[idx] = 1.0 * p.detach()[idx]
            torch.testing.assert_close(p.grad - grads[n], expected, msg=n)
        terms = sum(net[int(n)].weight.detach()[i].double().square().sum() for n, i in PRUNED.items())
        if bn_reg:
            terms = terms + sum(net[int(n) + 1].weight.detach()[i].double().square().sum()
                                + net[int(n) + 1].bias.detach()[i].double().square().sum()
                                for n, i in PRUNED.items())
        assert greg.penalty(net) == pytest.approx(0.5 * float(terms))


def test_greg_magnitude_ratio_criterion_by_hand():
    # reg_pruner.py: at each update, per layer in model order: hist = ratio (first) or
    # 0.9 hist + 0.1 ratio with ratio = mean|kept| / mean|pruned| of the per-filter mean |w|;
    # the layer stops when every hist seen so far is >= mag_ratio_limit (or reg > ceiling).
    net = _net()
    with torch.no_grad():
        net[0].weight[PRUNED["0"]] /= 5000  # layer "0": ratio about 5000
    w_abs = {n: net[int(n)].weight.detach().flatten(1).abs().mean(1).double() for n in PRUNED}

    def ratio(n):
        keep = [i for i in range(len(w_abs[n])) if i not in PRUNED[n]]
        return float(w_abs[n][keep].mean() / w_abs[n][PRUNED[n]].mean())

    assert ratio("0") > 1000 > ratio("3")
    greg = GReg(net, _targets(), reg_granularity=0.01, update_reg_interval=3, stabilize_interval=2)
    greg.step(0, net)
    # layer "0" comes first and sees only its own hist: done; layer "3" is not
    assert greg.finished == [True, False] and greg.layer_regs == pytest.approx([0.01, 0.01])
    assert greg.hist_mag_ratio == pytest.approx({0: ratio("0"), 1: ratio("3")})
    greg.step(1, net), greg.step(2, net)
    with torch.no_grad():
        net[3].weight[PRUNED["3"]] = 0  # ratio inf: hist inf
    greg.step(3, net)
    assert greg.finished == [True, True] and greg.layer_regs == pytest.approx([0.01, 0.02])
    assert greg.stabilize_start == 3 and not greg.done
    greg.step(4, net), greg.step(5, net)
    assert greg.done
    resumed = GReg(net, _targets(), reg_granularity=0.01, update_reg_interval=3,
                   stabilize_interval=2)
    resumed.load_state_dict(greg.state_dict())
    assert resumed.state_dict() == greg.state_dict() and resumed.done


def _opp_by_hand(w, pruned):
    w = w.detach().flatten(1).double()
    n = w.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i in pruned or j in pruned:
                total += float(w[i] @ w[j]) ** 2
    return total / n ** 2


def test_tpp_schedule_and_terms_by_hand():
    # opp_pruner.py (opp_scheme v5): at it % tau == 0, reg = Delta * it / tau until reg >= ceiling;
    # loss = lw_opp * reg * sum mse(G, G.detach() with pruned rows/cols zeroed)
    net = _net()
    d, tau, s, lw = 0.3, 2, 3, 7.0
    tpp = TPP(net, _targets(), lw_opp=lw, reg_granularity=d, update_reg_interval=tau,
              stabilize_interval=s, zero_out_interval=1)
    expect, reg, start = [], 0.0, None
    for it in range(14):
        if start is None and it % tau == 0:
            reg = d * it / tau
            if reg >= 1.0:
                start = it
        expect.append(reg)
    assert start == 8 and tpp.phase_iterations == start + s + 1 == 12
    opp = sum(_opp_by_hand(net[int(n)].weight, i) for n, i in PRUNED.items())
    for it in range(5):
        tpp.step(it, net)
        assert tpp.reg == pytest.approx(expect[it])
        torch.testing.assert_close(tpp.loss(net).double(), torch.tensor(lw * expect[it] * opp,
                                   dtype=torch.float64), rtol=1e-5, atol=1e-9)
    const = TPP(net, _targets(), lw_opp=lw, lw_opp_schedule="constant", zero_out_interval=0)
    const.step(0, net)  # reg 0, weight lw from the start
    torch.testing.assert_close(const.loss(net).double(), torch.tensor(lw * opp, dtype=torch.float64),
                               rtol=1e-5, atol=1e-9)
    # L2 gradient: pruned filters' weight and bias and the following BN's weight and bias
    net.zero_grad()
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    tpp.apply_(net)  # reg = 0.6 at iteration 4
    for n, p in net.named_parameters():
        layer = n.split(".")[0]
        idx = PRUNED.get(layer, PRUNED.get(str(int(layer) - 1)))
        expected = torch.zeros_like(p)
        if idx is not None:
            expected[idx] = 0.6 * p.detach()[idx]
        torch.testing.assert_close(p.grad - grads[n], expected, msg=n)
    assert [tpp.reg_at(i) for i in range(14)] == pytest.approx(expect)


def test_tpp_layerwise_zero_out():
    net = _net()
    tpp = TPP(net, _targets(), reg_granularity=0.5, update_reg_interval=1, stabilize_interval=6,
              zero_out_interval=2)  # 3 Conv/Linear layers * 2 = 6 <= 6
    for it in range(3):  # updates 0, 0.5, 1.0: stabilization starts at iteration 2
        tpp.step(it, net)
        tpp.after_step(net)
    assert tpp.stabilize_start == 2
    seen = []
    for it in range(3, 7):
        tpp.step(it, net)
        tpp.after_step(net)
        seen.append([bool((net[int(n)].weight[i] == 0).all() and (net[int(n) + 1].weight[i] == 0).all()
                          and (net[int(n) + 1].bias[i] == 0).all()) for n, i in PRUNED.items()])
    # layer 0 ("0") from 2 iterations into stabilization, layer 1 ("3") from 4
    assert seen == [[False, False], [True, False], [True, False], [True, True]]
    kept = [i for i in range(8) if i not in PRUNED["0"]]
    assert (net[0].weight[kept] != 0).all()
    with pytest.raises(UserError, match="stabilize_interval=5 .* 2 \\* 3 = 6"):
        TPP(net, _targets(), stabilize_interval=5, zero_out_interval=2)


def test_bad_targets():
    net = _net()
    with pytest.raises(UserError, match="'2'"):
        GReg(net, [Target("2", [0])])  # ReLU
    with pytest.raises(UserError, match="indices"):
        GReg(net, [Target("0", [8])])
    with pytest.raises(UserError, match="BatchNorm"):
        TPP(net, [Target("0", [1], "4")])  # BN with 6 features after an 8-filter conv


def test_check_phase_refuses_a_phase_too_short():
    from distributed_prune.prune.regularize import check_phase

    kw = dict(reg_granularity=1e-4, reg_ceiling=1.0, update_reg_interval=5, stabilize_interval=40000)
    # GReg: 10001 updates at 0, 5, ..., 50000; then 40000 more: 90001 iterations
    assert check_phase("greg", epochs=18, iters_per_epoch=5005, **kw) == 90001
    with pytest.raises(UserError, match=r"prune.epochs=17 gives 85085 iterations \(5005 per epoch\) "
                                        r"but greg needs 90001: .* iteration 50000 .*prune.epochs >= 18"):
        check_phase("greg", epochs=17, iters_per_epoch=5005, **kw)
    # TPP: reg = 1e-4 * it / 10 reaches 1 at 100000; + 10000 stabilize (CIFAR-10, batch 128)
    assert check_phase("tpp", epochs=282, iters_per_epoch=391, reg_granularity=1e-4,
                       reg_ceiling=1.0, update_reg_interval=10, stabilize_interval=10000) == 110001
    with pytest.raises(UserError, match="needs 110001"):
        check_phase("tpp", epochs=281, iters_per_epoch=391, reg_granularity=1e-4,
                    reg_ceiling=1.0, update_reg_interval=10, stabilize_interval=10000)



def test_method_table_defaults_are_the_authors():
    from distributed_prune import config
    from distributed_prune.prune.methods import method

    r = config.Config().prune.reg
    kw = dict(granularity=r.granularity, ceiling=r.ceiling, update_interval=r.update_interval,
              stabilize_interval=r.stabilize_interval, lw_opp=r.lw_opp)
    greg = method("greg").regularizer(_net(), _targets(), **kw)
    tpp = method("tpp").regularizer(_net(), _targets(), **kw)
    assert (greg.update_reg_interval, greg.stabilize_interval, greg.mag_ratio_limit, greg.bn_reg) == \
        (5, 40000, 1000.0, False)
    assert (tpp.lw_opp, tpp.lw_opp_schedule, tpp.weight_reg, tpp.bn_reg, tpp.zero_out_interval) == \
        (1000.0, "reg", True, True, 100)
    opts = dict(bn_reg=True, mag_ratio_limit=None, lw_opp_schedule="constant")
    g2 = method("greg").regularizer(_net(), _targets(), **kw, **opts)
    assert g2.bn_reg and g2.mag_ratio_limit is None
    assert method("tpp").regularizer(_net(), _targets(), **kw, **opts).lw_opp_schedule == "constant"
