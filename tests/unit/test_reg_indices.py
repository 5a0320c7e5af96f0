"""GReg / TPP steps: index tensors built once on the device, no boolean-mask indexing."""
import pytest
import torch
from torch import nn

from distributed_prune.prune.regularize import GReg, TPP, Target


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                         nn.BatchNorm2d(6))


TARGETS = [Target("0", [1, 4, 6], "1"), Target("3", [0, 5], "4")]


def _tpp_by_boolean_mask(model, lw_opp):
    """The loss as written in the paper: squared Gram entries with a pruned row or column."""
    total = 0.0
    for t in TARGETS:
        w = model.get_submodule(t.layer_name).weight.flatten(1)
        g = w @ w.T
        m = torch.zeros(g.shape[0], dtype=torch.bool)
        m[t.pruned] = True
        total = total + g[m[:, None] | m[None, :]].square().sum() / g.numel()
    return lw_opp * total


def test_index_tensors_are_built_once(monkeypatch):
    model = _net()
    calls = []
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: calls.append(1) or real(*a, **k))
    tpp = TPP(model, TARGETS, update_reg_interval=1, stabilize_interval=0, zero_out_interval=0)
    greg = GReg(model, TARGETS, update_reg_interval=1)
    after = []
    for it in range(5):
        tpp.step(it, model)
        greg.step(it, model)
        model.zero_grad()
        tpp.loss(model).backward()
        tpp.apply_(model)
        greg.apply_(model)
        after.append(len(calls))
    # one index tensor per target and regularizer, built at the first step, never again
    assert after[0] == 2 * len(TARGETS)
    assert after == [after[0]] * 5


def test_tpp_loss_and_gradient_equal_the_boolean_mask_formula():
    model = _net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tpp = TPP(model, TARGETS, lw_opp=1000.0, lw_opp_schedule="constant")
    tpp.step(0, model)                             # constant weight: lw_opp * Gram term
    got = tpp.loss(model)
    g_got = torch.autograd.grad(got, [model[0].weight, model[3].weight])
    want = _tpp_by_boolean_mask(model, 1000.0)
    g_want = torch.autograd.grad(want, [model[0].weight, model[3].weight])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_steps_do_not_synchronise_on_gpu():
    """GReg / TPP steps with ``set_sync_debug_mode("error")``: any host synchronisation raises."""
    model = _net().cuda()
    tpp = TPP(model, TARGETS, update_reg_interval=1, stabilize_interval=0, zero_out_interval=0)
    greg = GReg(model, TARGETS, update_reg_interval=1)
    x = torch.randn(4, 3, 8, 8, device="cuda")
    for reg in (tpp, greg):                  # first call builds the index tensors (host -> device)
        reg.step(1, model)
        model.zero_grad()
        (model(x).square().mean() + tpp.loss(model)).backward()
        greg.apply_(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for it in range(2, 4):
            tpp.step(it, model)
            greg.step(it, model)
            model.zero_grad()
            (model(x).square().mean() + tpp.loss(model)).backward()
            greg.apply_(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
