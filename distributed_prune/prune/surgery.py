"""Physical channel removal: the plan's pruned channels are cut out of every coupled member
(conv/linear weights and biases, BN parameters and running statistics, depthwise and grouped
convs, concatenation offsets), through torch-pruning's per-module pruning functions, giving a
smaller dense model.

Every group's members are read off one graph of the unpruned model (the plan's own graph when the
model is the object it was planned on), so all indices are in the original numbering: each
(module, dimension) is cut once, by the union of the channels its groups remove, instead of
re-tracing the index mappings after every group as a group-by-group cut would."""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError
from .groups import first_line, check_uniform, group_width, is_grouped_conv
from .plan import Plan, forget_graph, graph_for


def planned_members(graph, plan: Plan):
    """Every member of every group with channels pruned, checked against the model's sizes."""
    members = []
    for g in plan.groups:
        m = graph.module(g.root)
        n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if n != g.n:
            raise UserError(f"plan: layer {g.root!r} has {n} output channels, the plan expects {g.n}")
        pruned = plan.pruned(g)
        if pruned:
            members += graph.members(g.root, pruned)  # raises for modules we cannot cut
    return members


def apply_physical(model: nn.Module, plan: Plan) -> nn.Module:
    """Remove the plan's pruned channels from ``model`` in place and return it."""
    graph = graph_for(plan, model)
    cuts: dict = {}
    for mb in planned_members(graph, plan):
        key = (mb.module, mb.dep.handler)  # the library merges a group's ops the same way
        if key not in cuts:
            cuts[key] = (mb, set())
        cuts[key][1].update(mb.idxs)
    for mb, idxs in cuts.values():
        if is_grouped_conv(mb.module):
            _check_grouped(mb, idxs)
    forget_graph(plan)  # the graph describes the unpruned model only
    for mb, idxs in cuts.values():
        try:
            mb.dep(sorted(idxs))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the library's failure, named by layer
            raise UserError(f"prune: cannot cut {mb.dim}put channels of {mb.name!r} "
                            f"({first_line(e)})") from None
    model._dprune_plan_sha = plan.sha256()
    return model


def _check_grouped(mb, idxs) -> None:
    """A grouped conv stays the same function when cut only if each conv group loses the same
    number of output channels and the same positions of its input channels."""
    m = mb.module
    if mb.dim == "in":
        check_uniform(m, "in", idxs, mb.name)
        return
    c, width = group_width(m, "out")
    counts = {sum(1 for i in idxs if i // width == g) for g in range(m.groups)}
    if len(counts) > 1:
        raise UserError(f"prune: grouped conv {mb.name!r} (groups={m.groups}) would lose a different "
                        "number of output channels in different groups")
