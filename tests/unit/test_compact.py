"""Compact execution of the gradual phase: the cut of the current masks equals the physical
surgery, and training the cut model (folded back and re-cut at every update) equals training
the masked model step by step, optimizer state and checkpoint shapes included."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed_prune import models, prune
from distributed_prune.prune.compact import CompactCut
from distributed_prune.prune.masked import MaskedPhase
from distributed_prune.train.compact import CompactEngine
from distributed_prune.train.engine import DDPEngine
from distributed_prune.train.optim import build_optimizer

CASES = [("resnet20", "[0,0.5,0.5,0.5,0]", (3, 16, 16)),                # residual coupling
         ("mobilenet_v2", "*features.*.conv.0.0:0.5", (3, 32, 32))]     # depthwise in the group


def _net(name, seed=0):
    torch.manual_seed(seed)
    net = models.create(name, num_classes=10)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):   # non-trivial BN everywhere
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def _phase(net, spec, shape, execution, **kw):
    plan = prune.plan(net, spec, example_input=torch.zeros(1, *shape))
    args = dict(kind="gradual", update_interval=2, total_iterations=12, ramp_fraction=0.75,
                kernel="hooks", execution=execution)
    args.update(kw)
    return MaskedPhase(net, plan, **args)


@pytest.mark.parametrize("name,spec,shape", CASES)
def test_cut_equals_the_physical_surgery_of_the_masks(name, spec, shape):
    net = _net(name)
    phase = _phase(net, spec, shape, "compact")
    phase.update(net, 0, final=True)
    cut = CompactCut(net, phase)
    small = cut.cut().eval()
    ref = prune.apply(copy.deepcopy(net), phase.final_plan(), mode="physical").eval()
    a, b = small.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    for (n, m), (_, r) in zip(small.named_modules(), ref.named_modules()):
        for attr in ("in_channels", "out_channels", "groups", "in_features", "out_features",
                     "num_features"):
            assert getattr(m, attr, None) == getattr(r, attr, None), (n, attr)
    x = torch.randn(3, *shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = small(xa), ref(xb)
    torch.testing.assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    # folding back: the kept entries come back, every masked entry is zero (as the masked
    # execution's own masks leave them)
    with torch.no_grad():
        for p in small.parameters():
            p.mul_(2.0)
    full = copy.deepcopy(net)
    CompactCut(full, phase).fold(small)
    masked = copy.deepcopy(net)
    phase._build_masks(masked).zero_()
    params = dict(masked.named_parameters())
    got = full.state_dict()
    for k, v in masked.state_dict().items():
        if k in params:
            torch.testing.assert_close(got[k], v * 2.0, msg=k)
        elif k in cut.shapes:               # BN statistics: the kept ones are back
            torch.testing.assert_close(cut.take(k, got[k]), cut.take(k, v), msg=k)
        else:
            torch.testing.assert_close(got[k], v, msg=k)


def _batches(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def _build(m):
    opt = build_optimizer(m, lr=0.01, momentum=0.9, weight_decay=1e-3)
    return DDPEngine(m, opt, device="cpu")


def test_training_the_cut_model_equals_training_the_masked_model(monkeypatch):
    # a smooth activation: with ReLU a rounding-level difference flips the odd activation
    # sitting at 0, and 12 steps amplify that far beyond rounding
    monkeypatch.setattr(F, "relu", F.gelu)
    name, spec, shape = CASES[0]
    batches = _batches(12, shape)
    # masked execution, as the pipeline's loop drives it: update after backward, then the step
    net_m = _net(name)
    ph_m = _phase(net_m, spec, shape, "masked")
    eng_m = _build(net_m)
    for it, (x, y) in enumerate(batches):
        F.cross_entropy(eng_m.model(x), y).backward()
        ph_m.step(net_m, it)
        eng_m.step()
    # compact execution
    net_c = _net(name)
    ph_c = _phase(net_c, spec, shape, "compact")
    eng_c = CompactEngine(net_c, ph_c, _build)
    for it, (x, y) in enumerate(batches):
        F.cross_entropy(eng_c.model(x), y).backward()
        eng_c.unscale()
        eng_c.step_hook(None, it)
        eng_c.step()
    assert ph_c.history == ph_m.history                 # same masks at every update
    counts = [0] + [h["pruned"] for h in ph_c.history]
    assert eng_c.rebuilds == 1 + sum(a != b for a, b in zip(counts, counts[1:])) > 2
    state = eng_c.state_dict()["optimizer"]
    full = eng_c.full_module()
    assert full is net_c
    ph_m.finish(net_m)
    ph_c.finish(net_c)
    for (k, a), (_, b) in zip(net_m.state_dict().items(), net_c.state_dict().items()):
        if "running" in k or "num_batches" in k:
            continue                        # masked channels' statistics differ (and are cut)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    # the optimizer state is full-shaped (the checkpoint contract of masked execution) and
    # equal on the active entries
    ref = eng_m.optimizer.state_dict()
    cut = CompactCut(net_m, ph_m)
    names = [n for n, _ in net_m.named_parameters()]
    by_id = {id(p): n for n, p in net_m.named_parameters()}
    order = [by_id[id(p)] for g in eng_m.optimizer.param_groups for p in g["params"]]
    assert set(names) == set(order)
    for i, st in ref["state"].items():
        a, b = st["momentum_buffer"], state["state"][i]["momentum_buffer"]
        assert a.shape == b.shape
        torch.testing.assert_close(cut.take(order[i], b), cut.take(order[i], a),
                                   rtol=1e-4, atol=1e-5)      # gradient-sized values


def test_compact_is_gradual_only():
    from distributed_prune.errors import UserError
    net = _net("resnet20")
    with pytest.raises(UserError, match="execution"):
        _phase(net, CASES[0][1], CASES[0][2], "compact", kind="soft")


def test_no_host_sync_between_updates(request):
    """Between updates a compact step reads nothing from the device (on CPU we spy on the calls
    that would sync a GPU); the update itself may."""
    name, spec, shape = CASES[0]
    net = _net(name)
    phase = _phase(net, spec, shape, "compact", update_interval=4)
    eng = CompactEngine(net, phase, _build)
    batches = _batches(8, shape)

    def steps(first, last):
        for it in range(first, last):
            x, y = batches[it]
            F.cross_entropy(eng.model(x), y).backward()
            eng.unscale()
            eng.step_hook(None, it)
            eng.step()
    steps(0, 5)                                   # past the update at iteration 4
    assert phase.n_pruned() > 0 and eng.rebuilds == 2
    calls = request.getfixturevalue("host_reads")
    steps(5, 8)                                   # iterations 5-7: no update due
    assert calls == [] and eng.rebuilds == 2
