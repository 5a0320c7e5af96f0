"""Deciding a plan in a (possibly distributed) run: one rank plans, every rank checks.

Iterative pruning (k steps reaching ratio r) cuts the same fraction 1 - (1 - r)^(1/k) of each
layer's remaining channels per step; :func:`compose_plans` folds the steps into one plan on the
original numbering, so a checkpoint can be replayed from a fresh model.
"""
from __future__ import annotations

import torch.nn as nn

from .. import dist
from .plan import GroupPlan, Plan, make_plan

__all__ = ["decide", "step_ratios", "taylor_grads", "compose_plans"]


def step_ratios(model: nn.Module, ratios: str, steps: int, *, example, skip=()) -> str:
    """The per-step ratio spec of ``steps``-step iterative pruning towards ``ratios``."""
    table = make_plan(model, ratios, criterion="random", example_input=example, skip=skip).layer_ratios
    return ",".join(f"{n}:{1 - (1 - r) ** (1 / steps):.6f}" for n, r in table.items() if r > 0)


def decide(model: nn.Module, ratios: str, *, criterion: str, example, pick="smallest",
           round_to=None, skip=(), seed: int = 0) -> Plan:
    """The plan, computed on rank 0 and broadcast; every rank checks its hash. Gradient criteria
    (taylor) need :func:`taylor_grads` first; the gradients are cleared afterwards."""
    plan_json = None
    if dist.is_primary():
        plan_json = make_plan(model, ratios, criterion=criterion, example_input=example, pick=pick,
                              round_to=round_to, skip=skip, seed=seed).to_json()
    plan_json = dist.broadcast_object(plan_json)
    plan = Plan.from_json(plan_json)
    hashes = dist.all_gather_object(plan.sha256())
    if len(set(hashes)) != 1:
        raise RuntimeError(f"plan hashes differ across ranks: {hashes}")
    model.zero_grad(set_to_none=True)
    return plan


def taylor_grads(model: nn.Module, loader, batches: int, device):
    """Accumulate dL/dw over a few batches (eval-mode BN), all-reduced so every rank agrees."""
    model.zero_grad(set_to_none=True)
    was = model.training
    model.eval()
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.train(was)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce_mean(p.grad)


def compose_plans(first: Plan, second: Plan) -> Plan:
    """A plan equal to applying ``first`` then ``second`` (whose indices refer to the already
    pruned model): kept channels are mapped back to the original numbering."""
    by_root = {g.root: g for g in first.groups}
    groups = []
    for g2 in second.groups:
        g1 = by_root.pop(g2.root, None)
        if g1 is None:
            groups.append(g2)
            continue
        groups.append(GroupPlan(g1.root, g1.n, [g1.keep[i] for i in g2.keep], g2.ratio, g1.members))
    groups += list(by_root.values())
    order = list(first.layer_ratios) or [g.root for g in groups]
    groups.sort(key=lambda g: order.index(g.root) if g.root in order else len(order))
    return Plan(groups, first.input_shape, first.criterion, first.ratios, first.pick,
                first.round_to, first.layer_ratios)
