"""Soft pruning: zero the pruned channels of every member of each coupled group and keep them
zero through training (a forward pre-hook re-zeroes the weights; a gradient hook zeroes their
gradients). The masked model computes exactly what the physically pruned one does."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from .groups import check_uniform
from .plan import Plan, graph_for
from .surgery import planned_members

_NORMS = (nn.modules.batchnorm._BatchNorm,)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def mask_targets(mod: nn.Module, dim: str, idxs: list[int], name: str):
    """(parameter name, tensor dim, channel indices) to zero for one group member."""
    if isinstance(mod, nn.Linear):
        return [("weight", 0, idxs), ("bias", 0, idxs)] if dim == "out" else [("weight", 1, idxs)]
    if isinstance(mod, _CONVS):
        if mod.groups == 1:
            return [("weight", 0, idxs), ("bias", 0, idxs)] if dim == "out" else [("weight", 1, idxs)]
        if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: in and out move together
            return [("weight", 0, idxs), ("bias", 0, idxs)]
        if dim == "out":  # output channels are rows of the weight, whatever the conv group
            return [("weight", 0, idxs), ("bias", 0, idxs)]
        # an input channel at in-group position p is column p of its group's rows only; a plan
        # removes the same positions from every group, so whole columns are zeroed
        return [("weight", 1, check_uniform(mod, "in", idxs, name))]
    if isinstance(mod, _NORMS):
        return [("weight", 0, idxs), ("bias", 0, idxs)]
    if not any(True for _ in mod.parameters(recurse=False)):
        return []
    raise UserError(f"mask: layer {name!r} ({type(mod).__name__}) cannot be masked exactly; "
                    "use mode='physical'")


class ChannelMasks:
    """The masks of one model: per module, (param name, dim, index tensor) to keep at zero.

    Grouped by module so the forward pre-hook of a module touches only its own parameters
    (it runs on every forward: no scan over the whole model's masks per layer)."""

    def __init__(self):
        self.by_module: dict[nn.Module, list[tuple[str, int, torch.Tensor]]] = {}
        self.handles = []

    def add(self, mod, pname, dim, idxs):
        p = getattr(mod, pname, None)
        if p is None or not idxs:
            return
        self.by_module.setdefault(mod, []).append(
            (pname, dim, torch.tensor(sorted(set(idxs)), device=p.device)))

    @torch.no_grad()
    def zero_(self, module: nn.Module | None = None):
        mods = self.by_module if module is None else {module: self.by_module.get(module, [])}
        for mod, es in mods.items():
            for pname, dim, idx in es:
                p = getattr(mod, pname)
                p.index_fill_(dim, idx if idx.device == p.device else idx.to(p.device), 0)

    @torch.no_grad()
    def zero_grads_(self):
        """Zero the masked entries of gradients already computed (a mask added between
        backward and the optimizer step must not let that step move the channel)."""
        for mod, es in self.by_module.items():
            for pname, dim, idx in es:
                g = getattr(mod, pname).grad
                if g is not None:
                    g.index_fill_(dim, idx.to(g.device), 0)

    def install(self):
        for mod, es in self.by_module.items():
            self.handles.append(mod.register_forward_pre_hook(lambda m, args: self.zero_(m)))
            for pname, dim, idx in es:
                self.handles.append(getattr(mod, pname).register_hook(
                    lambda g, dim=dim, idx=idx: g.index_fill(dim, idx.to(g.device), 0)))
        self.zero_()

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def conv_masks(conv: nn.Conv2d, pruned_out, pruned_in=None):
    """0/1 channel masks of ``conv``: (out_mask, in_mask or None) with the given pruned output
    (and input) channel indices zero."""
    out_mask = torch.ones(conv.out_channels)
    out_mask[sorted(pruned_out)] = 0
    in_mask = None
    if pruned_in is not None:
        in_mask = torch.ones(conv.in_channels)
        in_mask[sorted(pruned_in)] = 0
    return out_mask, in_mask


def use_masked_conv(model: nn.Module, kernel: str) -> bool:
    if kernel not in ("auto", "hooks", "masked_conv"):
        raise UserError(f"mask: unknown kernel {kernel!r} (auto, hooks, masked_conv)")
    if kernel == "auto":
        p = next(model.parameters(), None)
        return p is not None and p.is_cuda
    return kernel == "masked_conv"


def _swap_masked_convs(model: nn.Module, members) -> dict:
    """Replace plain Conv2d members whose output (or input) channels are pruned by
    :class:`~distributed_prune.kernels.MaskedConv2d` (same Parameters, so optimizer state stays
    valid): its kernel skips the pruned filters instead of computing zeros. Returns old -> new."""
    from ..kernels import MaskedConv2d

    outs, ins = {}, {}
    for mb in members:
        m = mb.module
        if type(m) is nn.Conv2d and m.groups == 1:
            (outs if mb.dim == "out" else ins).setdefault(mb.name, set()).update(mb.idxs)
    swapped = {}
    for name in set(outs) | set(ins):
        conv = model.get_submodule(name)
        out_mask, in_mask = conv_masks(conv, outs.get(name, ()), ins.get(name))
        new = MaskedConv2d.from_conv(conv, out_mask, in_mask)
        # masks are derived from the plan: keep the state_dict keys those of nn.Conv2d
        new._non_persistent_buffers_set.update({"out_mask", "in_mask"})
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped[conv] = new
    return swapped


def apply_masks(model: nn.Module, plan: Plan, kernel: str = "auto") -> nn.Module:
    """Zero the plan's pruned channels across their coupled groups; return ``model`` (in place).

    ``kernel``: ``"masked_conv"`` swaps pruned Conv2d layers for MaskedConv2d (Triton / native
    kernels that skip masked filters); ``"hooks"`` keeps the modules; ``"auto"`` swaps on CUDA."""
    use_kernel = use_masked_conv(model, kernel)
    members = planned_members(graph_for(plan, model), plan)
    swapped = _swap_masked_convs(model, members) if use_kernel else {}
    masks = ChannelMasks()
    for mb in members:
        mod = swapped.get(mb.module, mb.module)
        for pname, dim, idxs in mask_targets(mod, mb.dim, mb.idxs, mb.name):
            masks.add(mod, pname, dim, idxs)
    old = getattr(model, "_dprune_masks", None)
    if old is not None:
        old.remove()
    masks.install()
    model._dprune_masks = masks
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    masks = getattr(model, "_dprune_masks", None)
    if masks is not None:
        masks.remove()
        del model._dprune_masks
    return model
