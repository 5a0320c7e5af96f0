"""One torchvision classifier through plan -> cut, checked against two references.

- the masked model (the project's mask mode);
- an independent reference written here: forward hooks on the DENSE model that zero the pruned
  channels at the output of every module whose output channels the plan removes. It does not use
  the project's mask code, so a bug shared by the cut and the masks still shows.

Each check returns one record (a dict) so the zoo run can write a table as it goes.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from distributed_prune import flops, models, prune
from distributed_prune.errors import UserError

# inputs / constructor arguments a model needs at small input sizes (its own constraints)
SIZE = {"maxvit_t": 224, "inception_v3": 80}
KWARGS = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 64},
          "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 56}}


def input_size(name: str, px: int) -> int:
    return SIZE.get(name, KWARGS.get(name, {}).get("image_size", px))


def randomize(net: nn.Module) -> None:
    """Non-trivial BN statistics, affine parameters and biases: a channel that should have been
    zeroed (or cut) but was not then changes the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)


def _n_out(m: nn.Module):
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features
    return None


def hook_reference(dense: nn.Module, plan) -> list | None:
    """Forward hooks on ``dense`` (returned, for removal) making every module with pruned output
    channels output zeros there (conv / BN outputs on dim 1, linear outputs on the last dim).
    None (no hook left) when a member's channels are not the root's one to one (concatenations):
    then only the masked comparison applies."""
    handles = []
    for g in plan.groups:
        pruned = plan.pruned(g)
        if not pruned:
            continue
        for member in g.members:
            name, dim = member.rsplit(":", 1)
            if dim != "out":
                continue
            mod = dense.get_submodule(name)
            if _n_out(mod) != g.n:
                for h in handles:
                    h.remove()
                return None
            idx = torch.tensor(pruned)
            axis = -1 if isinstance(mod, nn.Linear) else 1

            def zero(m, args, out, idx=idx, axis=axis):
                return out.index_fill(axis, idx, 0.0)

            handles.append(mod.register_forward_hook(zero))
    return handles


def _outputs(net, x, w):
    """Logits and input gradient of ``net`` in float64 (converted in place): in float32 a
    pre-activation near 0 can flip sign between two equal models summed in a different order,
    and the input gradient then changes by a lot (the logits do not)."""
    net.double()
    x = x.double().requires_grad_(True)
    y = net(x)
    (g,) = torch.autograd.grad((y * w.double()).sum(), x)   # no weight gradients kept
    return y.detach(), g


def _close(a, b, what):
    ya, ga = a
    yb, gb = b
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6 * float(yb.abs().max()) + 1e-12,
                               msg=lambda m: f"{what}: logits differ. {m}")
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6 * float(gb.abs().max()) + 1e-14,
                               msg=lambda m: f"{what}: input gradients differ. {m}")


def check(name: str, spec: str = "0.5", px: int = 64, num_classes: int = 10) -> dict:
    """Plan ``spec`` on model ``name``, cut it, compare with the masked model and the hook
    reference. Returns a record; ``status`` is ``ok`` or ``refused`` (a UserError, its one-line
    message in ``message``). Any other exception, or a mismatch, propagates to the caller.

    One copy of the model at a time (the zoo's largest models have 600M parameters): the hook
    reference runs first on the dense model, then the masks are applied to it in place (zeroing
    exactly the weights the cut removes), then they are removed and the same object is cut."""
    torch.manual_seed(0)
    s = input_size(name, px)
    net = models.create(name, num_classes=num_classes, **KWARGS.get(name, {})).eval()
    randomize(net)
    x1 = torch.zeros(1, 3, s, s)
    rec = {"model": name, "spec": spec, "px": s, "params": sum(p.numel() for p in net.parameters())}
    try:
        t = time.perf_counter()
        plan = prune.plan(net, spec, criterion="l1", example_input=x1)
        rec["plan_s"] = time.perf_counter() - t
    except UserError as e:
        return {**rec, "status": "refused", "message": str(e)}
    rec["dense_macs"] = flops.count(net, x1)["macs"]
    rec["groups"] = sum(1 for g in plan.groups if len(g.keep) < g.n)
    rec["skipped"] = len(plan.skipped)
    rec["rounded"] = sum(1 for r in plan.table() if r["kept"] != r["asked_kept"])
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, num_classes, generator=torch.Generator().manual_seed(2))
    handles = hook_reference(net, plan)
    rec["hook_reference"] = handles is not None
    ref = None
    if handles is not None:
        ref = _outputs(net, x, w)
        for h in handles:
            h.remove()
    try:
        masked = _outputs(prune.apply(net, plan, mode="mask", kernel="hooks"), x, w)
        prune.remove_masks(net)
        net.float()
        t = time.perf_counter()
        small = prune.apply(net, plan, mode="physical")   # same object: the plan's graph is reused
        rec["cut_s"] = time.perf_counter() - t
    except UserError as e:
        return {**rec, "status": "refused", "message": str(e)}
    rec["pruned_macs"] = flops.count(small, x1)["macs"]
    got = _outputs(small, x, w)
    _close(got, masked, f"{name} {spec}: physical vs masked")
    if ref is not None:
        _close(got, ref, f"{name} {spec}: physical vs hook reference")
    rec["status"] = "ok"
    return rec
