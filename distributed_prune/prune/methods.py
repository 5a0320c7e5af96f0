"""The method table: what each ``prune.method`` does.

For every method: the criterion that chooses the filters, the kind of phase that runs between
choosing them and cutting them, and the regularizer of that phase. Every place that depends on
the method reads this table (the pipeline, config checks, the summary), so a new method is one
row here (plus its criterion or regularizer class).

    from distributed_prune.prune.methods import method
    m = method("greg")      # Method(criterion="l1", phase=Phase.REGULARIZATION, ...)
    reg = m.regularizer(model, targets, granularity=1e-4, ceiling=1.0, update_interval=5,
                        stabilize_interval=10000, lw_opp=1000.0)
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

from ..errors import UserError
from .plan import Plan
from .regularize import GReg, TPP, Target

__all__ = ["Phase", "Method", "METHODS", "method", "targets"]


class Phase(enum.Enum):
    """What happens to the dense model between choosing the filters and cutting them."""
    NONE = "none"                       # nothing is pruned at all (prune.method=none)
    ONE_SHOT = "one-shot"               # cut right away
    REGULARIZATION = "regularization"   # train with a penalty on the chosen filters, then cut
    MASKED = "masked"                   # train with masks that the phase updates, then cut


@dataclass(frozen=True)
class Method:
    name: str
    criterion: Optional[str]            # prune.plan's criterion; None: no plan (nothing pruned)
    phase: Phase
    # (model, targets, **prune.reg settings) -> a GReg/TPP-like object, for REGULARIZATION phases
    make_regularizer: Optional[Callable] = None

    @property
    def needs_grads(self) -> bool:
        """The criterion scores filters from gradients (accumulated before planning)."""
        return self.criterion == "taylor"

    @property
    def trains_before_cut(self) -> bool:
        """A phase that trains the dense model for ``prune.epochs`` before surgery."""
        return self.phase in (Phase.REGULARIZATION, Phase.MASKED)

    def regularizer(self, model: nn.Module, plan_targets: list[Target], *, granularity: float,
                    ceiling: float, update_interval: int, stabilize_interval: int, lw_opp: float,
                    **options):
        """The phase's regularizer; ``options``: the method's own ``prune.reg`` settings
        (GReg: mag_ratio_limit, bn_reg; TPP: lw_opp_schedule, weight_reg, bn_reg,
        zero_out_interval), the authors' defaults when left out (docs/science.md section 10)."""
        if self.make_regularizer is None:
            return None
        return self.make_regularizer(model, plan_targets, granularity=granularity, ceiling=ceiling,
                                     update_interval=update_interval,
                                     stabilize_interval=stabilize_interval, lw_opp=lw_opp, **options)


def _greg(model, tg, *, granularity, ceiling, update_interval, stabilize_interval, lw_opp,
          mag_ratio_limit=1000.0, bn_reg=None, **_tpp_only):
    return GReg(model, tg, reg_granularity=granularity, reg_ceiling=ceiling,
                update_reg_interval=update_interval, stabilize_interval=stabilize_interval,
                mag_ratio_limit=mag_ratio_limit, bn_reg=bool(bn_reg))


def _tpp(model, tg, *, granularity, ceiling, update_interval, stabilize_interval, lw_opp,
         lw_opp_schedule="reg", weight_reg=True, bn_reg=None, zero_out_interval=100, **_greg_only):
    return TPP(model, tg, lw_opp=lw_opp, reg_granularity=granularity, reg_ceiling=ceiling,
               update_reg_interval=update_interval, stabilize_interval=stabilize_interval,
               lw_opp_schedule=lw_opp_schedule, weight_reg=weight_reg,
               bn_reg=True if bn_reg is None else bn_reg, zero_out_interval=zero_out_interval)


# The regularization methods choose their filters by L1 norm (as the papers do), then drive them
# to zero before the cut.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("l1", "l1", Phase.ONE_SHOT),
    Method("l2", "l2", Phase.ONE_SHOT),
    Method("random", "random", Phase.ONE_SHOT),
    Method("bn_scale", "bn_scale", Phase.ONE_SHOT),
    Method("taylor", "taylor", Phase.ONE_SHOT),
    Method("greg", "l1", Phase.REGULARIZATION, _greg),
    Method("tpp", "l1", Phase.REGULARIZATION, _tpp),
    # masked phases (prune/masked.py): the plan fixes the groups and their target counts; the
    # channels are chosen by the phase (prune.masked.criterion), the cut follows its final masks
    Method("gradual", "l1", Phase.MASKED),
    Method("soft", "l1", Phase.MASKED),
    Method("none", None, Phase.NONE),
)}


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"prune.method: unknown method {name!r} (one of {', '.join(METHODS)})") from None


_BN = nn.modules.batchnorm._BatchNorm


def targets(plan: Plan, model: nn.Module) -> list[Target]:
    """Regularization targets (root layer, pruned filters, its BatchNorm) from a plan."""
    out = []
    for g in plan.groups:
        pruned = plan.pruned(g)
        if not pruned:
            continue
        bn = next((m.split(":")[0] for m in g.members if m.endswith(":out")
                   and isinstance(model.get_submodule(m.split(":")[0]), _BN)), None)
        out.append(Target(g.root, pruned, bn))
    return out
