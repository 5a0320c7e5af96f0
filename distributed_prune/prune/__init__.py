"""Pruning engine: ratios -> plan (data) -> masks or physical removal.

    from distributed_prune import models, prune
    net = models.create("resnet56", num_classes=10)
    p = prune.plan(net, "[0,0.7,0.7,0.7,0]", criterion="l1", example_input=torch.randn(1, 3, 32, 32))
    small = prune.apply(copy.deepcopy(net), p, mode="physical")
    again = prune.replay(models.create("resnet56", num_classes=10), p)   # same architecture
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError
from .mask import apply_masks, remove_masks
from .plan import GroupPlan, Plan, make_plan
from .ratios import n_pruned, parse as parse_ratios, prunable_layers, resolve as resolve_ratios
from .surgery import apply_physical

plan = make_plan

__all__ = ["plan", "apply", "replay", "Plan", "GroupPlan", "parse_ratios", "resolve_ratios",
           "n_pruned", "prunable_layers", "remove_masks"]


def apply(model: nn.Module, plan: Plan, mode: str = "physical", kernel: str = "auto") -> nn.Module:
    """Apply ``plan`` to ``model`` in place: ``"physical"`` cuts channels, ``"mask"`` zeroes them
    (``kernel``: ``auto`` uses MaskedConv2d kernels on CUDA, ``hooks`` / ``masked_conv`` force)."""
    if mode == "physical":
        return apply_physical(model, plan)
    if mode == "mask":
        return apply_masks(model, plan, kernel=kernel)
    raise UserError(f"prune.apply: unknown mode {mode!r} (physical or mask)")


def replay(fresh_model: nn.Module, plan: Plan) -> nn.Module:
    """Rebuild the pruned architecture from a freshly created model, ready for load_state_dict."""
    return apply_physical(fresh_model, plan)
