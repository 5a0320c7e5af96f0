"""Physical channel removal: the plan's pruned channels are cut out of every coupled member
(conv/linear weights and biases, BN parameters and running statistics, depthwise convs,
concatenation offsets), through torch-pruning, giving a smaller dense model."""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError
from .groups import Graph
from .plan import Plan, example_for


def apply_physical(model: nn.Module, plan: Plan) -> nn.Module:
    """Remove the plan's pruned channels from ``model`` in place and return it."""
    graph = Graph(model, example_for(plan, model))
    for g in plan.groups:
        m = graph.module(g.root)
        n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if n != g.n:
            raise UserError(f"plan: layer {g.root!r} has {n} output channels, the plan expects {g.n}")
        pruned = plan.pruned(g)
        if not pruned:
            continue
        group, _ = graph.group_and_members(g.root, pruned)  # raises for modules we cannot cut
        group.prune()
    model._dprune_plan_sha = plan.sha256()
    return model
