"""Filter importance criteria (a registry) and how channels are picked.

A criterion maps a coupled group to one score per root output channel: it scores every
conv/linear (or BN, for ``bn_scale``) member whose *output* channels move with the root, and sums
the member scores channel-wise (for an uncoupled block-inner conv that is the conv's own score).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn as nn

from ..errors import UserError
from .groups import Member
from .ratios import PRUNABLE_TYPES

CRITERIA: dict[str, Callable] = {}


def register_criterion(name: str):
    def deco(fn):
        CRITERIA[name] = fn
        return fn

    return deco


def _weight_members(members: list[Member]):
    return [m for m in members if m.dim == "out" and isinstance(m.module, PRUNABLE_TYPES)]


def _accumulate(members, per_member_scores, n):
    """Sum member scores into root-channel order: score[root_idx[k]] += s[idx[k]]."""
    total = torch.zeros(n, dtype=torch.float32)
    ident = list(range(n))
    for m, s in zip(members, per_member_scores):
        s = s.detach().float().cpu()
        if len(s) == n and m.idxs == ident and m.root_idxs == ident:  # channel for channel
            total += s
        else:
            total[torch.tensor(m.root_idxs)] += s[torch.tensor(m.idxs)]
    return total


def _norm_criterion(p: int):
    def crit(members, n, **_):
        ws = _weight_members(members)
        from ..kernels import filter_norms

        return _accumulate(ws, filter_norms([m.module.weight.detach() for m in ws], p), n)

    return crit


register_criterion("l1")(_norm_criterion(1))
register_criterion("l2")(_norm_criterion(2))


@register_criterion("taylor")
def _taylor(members, n, **_):
    """First-order Taylor |sum_{filter} w * dL/dw|; gradients must already be in ``.grad``
    (accumulated over a few batches by the caller, and all-reduced when distributed)."""
    ws = _weight_members(members)
    if any(m.module.weight.grad is None for m in ws):
        missing = next(m.name for m in ws if m.module.weight.grad is None)
        raise UserError(f"prune.method=taylor: layer {missing!r} has no gradient; "
                        "Taylor importance needs a few batches of data")
    from ..kernels import filter_norms

    return _accumulate(ws, filter_norms([m.module.weight.detach() for m in ws], 1,
                                        grads=[m.module.weight.grad.detach() for m in ws]), n)


@register_criterion("bn_scale")
def _bn_scale(members, n, root="", **_):
    bns = [m for m in members if m.dim == "out" and isinstance(m.module, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise UserError(f"prune.method=bn_scale: layer {root!r} is not followed by a BatchNorm")
    return _accumulate(bns, [m.module.weight.detach().abs() for m in bns], n)


@register_criterion("random")
def _random(members, n, root="", seed=0, **_):
    # Seeded by (seed, layer name) so every rank and every re-run draws the same scores.
    h = int(hashlib.sha256(f"{seed}:{root}".encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(h)
    return torch.rand(n, generator=g)


def select_pruned(scores: torch.Tensor, k: int, pick: str = "smallest", seed: int = 0,
                  root: str = "") -> list[int]:
    """Indices of the ``k`` channels to prune (sorted). Ties break by channel index (stable)."""
    if k == 0:
        return []
    if pick == "smallest":
        order = torch.argsort(scores, stable=True)
    elif pick == "largest":
        order = torch.argsort(-scores, stable=True)
    elif pick == "random":
        h = int(hashlib.sha256(f"pick:{seed}:{root}".encode()).hexdigest()[:8], 16)
        order = torch.randperm(len(scores), generator=torch.Generator().manual_seed(h))
    else:
        raise UserError(f"prune.pick: unknown pick {pick!r} (smallest, largest, random)")
    return sorted(order[:k].tolist())
