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
from ..registry import Registry
from .groups import Member
from .ratios import PRUNABLE_TYPES

#: name -> ``fn(members, n, *, root, seed) -> scores (n,)``.
CRITERIA: Registry[Callable] = Registry("criterion", "prune.criterion")
register_criterion = CRITERIA.register


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


def _to_host(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every score vector on the host with ONE device-to-host transfer (concatenated on the
    device first), instead of one synchronising copy per layer."""
    if not scores:
        return []
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores]).cpu()
    return list(flat.split([s.numel() for s in scores]))


# criterion -> (p, uses gradients): criteria computed by filter_norms over every layer at once
NORM_CRITERIA = {"l1": (1, False), "l2": (2, False), "taylor": (1, True)}


def score_groups(criterion: str, groups, seed: int = 0) -> list[torch.Tensor]:
    """One fp32 CPU score vector per group (``groups``: ``(root, members, n)`` triples).

    Norm criteria (l1, l2, taylor) score the weights of EVERY group with ONE
    :func:`~distributed_prune.kernels.filter_norms` call (one kernel launch on GPU) and ONE
    transfer to the host; the others run per group."""
    if criterion not in NORM_CRITERIA:
        return [CRITERIA[criterion](members, n, root=root, seed=seed)
                for root, members, n in groups]
    p, with_grads = NORM_CRITERIA[criterion]
    per_group = [_weight_members(members) for _, members, _ in groups]
    flat = [m for ws in per_group for m in ws]
    grads = None
    if with_grads:
        missing = next((m.name for m in flat if m.module.weight.grad is None), None)
        if missing is not None:
            raise UserError(f"prune.method=taylor: layer {missing!r} has no gradient; "
                            "Taylor importance needs a few batches of data")
        grads = [m.module.weight.grad.detach() for m in flat]
    from ..kernels import filter_norms

    host = _to_host(filter_norms([m.module.weight.detach() for m in flat], p, grads=grads)
                    if flat else [])
    out, k = [], 0
    for (_, _, n), ws in zip(groups, per_group):
        out.append(_accumulate(ws, host[k:k + len(ws)], n))
        k += len(ws)
    return out


def _norm_criterion(name: str):
    def crit(members, n, root="", seed=0, **_):
        return score_groups(name, [(root, members, n)], seed)[0]

    return crit


register_criterion("l1")(_norm_criterion("l1"))
register_criterion("l2")(_norm_criterion("l2"))
# First-order Taylor |sum_{filter} w * dL/dw|; gradients must already be in ``.grad``
# (accumulated over a few batches by the caller, and all-reduced when distributed).
register_criterion("taylor")(_norm_criterion("taylor"))


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
