"""The masked phase component: schedules, update rules, physical == masked at the end, state."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed_prune import models, prune
from distributed_prune.errors import UserError
from distributed_prune.kernels import MaskedConv2d
from distributed_prune.prune.masked import MaskedPhase, ramp

SHAPE = (3, 16, 16)
SPEC = "[0,0.5,0.5,0.5,0]"


def _net(seed=0):
    torch.manual_seed(seed)
    net = models.create("resnet20", num_classes=10)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net


def _phase(net, kind="gradual", **kw):
    x = torch.zeros(1, *SHAPE)
    p = prune.plan(net, SPEC, example_input=x)
    args = dict(kind=kind, update_interval=2, total_iterations=12, ramp_fraction=0.75,
                kernel="masked_conv")
    args.update(kw)
    return MaskedPhase(net, p, **args)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def _train(net, phase, batches, opt, start=0):
    for it, (x, y) in enumerate(batches, start):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        phase.step(net, it)
        opt.step()


def test_ramps():
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert ramp(t, "cubic") == pytest.approx(1 - (1 - t) ** 3)
        assert ramp(t, "linear") == pytest.approx(t)
    assert ramp(2.0, "cubic") == 1.0 and ramp(-1, "linear") == 0.0
    with pytest.raises(UserError, match="schedule"):
        ramp(0.5, "exp")


def test_gradual_ramp_masks_only_grow_and_reach_the_target():
    net = _net()
    phase = _phase(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    seen = []
    for it, (x, y) in enumerate(_batches(12)):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        phase.step(net, it)
        opt.step()
        seen.append({r: set(v) for r, v in phase.pruned.items()})
        # the count follows the schedule at the last update
        last = it - it % phase.update_interval
        assert {r: len(v) for r, v in phase.pruned.items()} == phase.target_at(last)
    for a, b in zip(seen, seen[1:]):
        assert all(a[r] <= b[r] for r in a)          # a masked channel stays masked
    assert {r: len(v) for r, v in seen[-1].items()} == phase.targets   # ramp ends at 75 %
    # masked channels are zero in the forward: the plain convs were swapped for MaskedConv2d
    assert any(isinstance(m, MaskedConv2d) for m in net.modules())
    for root, pruned in phase.pruned.items():
        m = net.get_submodule(root)
        y = m(torch.randn(2, m.in_channels, 8, 8))
        assert torch.all(y[:, pruned] == 0)


def _check_cut_equals_masked(net, plan):
    masked = copy.deepcopy(net).eval()
    phys = prune.apply(copy.deepcopy(net), plan, mode="physical").eval()
    for g in plan.groups:
        assert phys.get_submodule(g.root).out_channels == len(g.keep)
    x = torch.randn(4, *SHAPE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = phys(xa), masked(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    go = torch.randn_like(ya)
    ya.backward(go)
    yb.backward(go)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gradual", "soft"])
def test_physical_cut_equals_masked_model_at_the_end(kind):
    net = _net()
    phase = _phase(net, kind=kind, update_interval=4 if kind == "soft" else 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    _train(net, phase, _batches(10), opt)
    plan = phase.finish(net)
    assert not any(isinstance(m, MaskedConv2d) for m in net.modules())
    assert {g.root: g.n - len(g.keep) for g in plan.groups} == phase.targets
    _check_cut_equals_masked(net, plan)


def test_soft_pruned_filters_keep_training_and_can_come_back():
    net = _net()
    phase = _phase(net, kind="soft", update_interval=100, total_iterations=200)
    phase.update(net, 0)
    root = next(r for r, k in phase.targets.items() if k)
    conv = net.get_submodule(root)
    first = list(phase.pruned[root])
    assert torch.all(conv.weight[first] == 0)
    # no hook holds them at zero: a training step moves them
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = _batches(1)[0]
    F.cross_entropy(net(x), y).backward()
    assert conv.weight.grad[first].abs().sum() > 0
    opt.step()
    assert conv.weight[first].abs().sum() > 0
    # a zeroed filter that grew back is no longer among the lowest: it comes back
    kept = [i for i in range(conv.out_channels) if i not in first]
    with torch.no_grad():
        conv.weight[first[0]] = 5.0
        conv.weight[kept[0]] = 0.0
    phase.update(net, 100)
    assert first[0] not in phase.pruned[root] and kept[0] in phase.pruned[root]


@pytest.mark.parametrize("kind", ["gradual", "soft"])
def test_state_is_json_and_resume_gives_the_same_result(kind):
    batches = _batches(10)

    def fresh():
        net = _net()
        return (net, _phase(net, kind=kind, update_interval=2 if kind == "gradual" else 3),
                torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))

    net_a, ph_a, opt_a = fresh()
    _train(net_a, ph_a, batches, opt_a)
    plan_a = ph_a.finish(net_a)

    net_b, ph_b, opt_b = fresh()
    _train(net_b, ph_b, batches[:5], opt_b)
    saved = json.dumps(ph_b.state_dict())
    weights = copy.deepcopy(net_b.state_dict())
    opt_state = copy.deepcopy(opt_b.state_dict())
    assert not any(k.endswith(("out_mask", "in_mask")) for k in weights)   # keys of a dense model
    # a new process: fresh model and phase, restored from the checkpoint
    net_c, ph_c, opt_c = fresh()
    net_c.load_state_dict(weights)
    ph_c.load_state_dict(json.loads(saved), net_c)
    opt_c = torch.optim.SGD(net_c.parameters(), lr=0.05, momentum=0.9)
    opt_c.load_state_dict(opt_state)
    assert ph_c.mask_sha256() == ph_b.mask_sha256()
    _train(net_c, ph_c, batches[5:], opt_c, start=5)
    plan_c = ph_c.finish(net_c)
    assert plan_c.sha256() == plan_a.sha256()
    for (k, a), (_, c) in zip(net_a.state_dict().items(), net_c.state_dict().items()):
        torch.testing.assert_close(a, c, rtol=0, atol=0, msg=k)


def test_bad_state_and_options_are_user_errors():
    net = _net()
    phase = _phase(net)
    with pytest.raises(UserError, match="mask state"):
        phase.load_state_dict({"version": 1, "kind": "gradual", "pruned": {"nope": []},
                               "iteration": 0, "updates": 0})
    with pytest.raises(UserError, match="kind"):
        _phase(net, kind="magic")
    with pytest.raises(UserError, match="criterion"):
        _phase(net, criterion="taylor")


def test_no_host_sync_between_updates(request):
    """Between updates a training step reads nothing from the device: no nonzero, item,
    tolist or copies to the host (on CPU we spy on the calls that would sync a GPU)."""
    net = _net()
    phase = _phase(net, update_interval=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    batches = _batches(8)
    # past the update at iteration 4 and the forward after it (which recomputes the cached
    # active-channel indices of the layers whose masks changed: part of the update's cost)
    _train(net, phase, batches[:6], opt)
    calls = request.getfixturevalue("host_reads")
    _train(net, phase, batches[6:8], opt, start=6)       # iterations 6-7: no update due
    assert calls == []
