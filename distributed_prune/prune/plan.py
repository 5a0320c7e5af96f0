"""Plans: which output channels each coupled group keeps. A plan is data (JSON), computed once
(on rank 0 when distributed), then applied as masks or as physical removal, or replayed on a
fresh model to rebuild the pruned architecture before ``load_state_dict``."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..errors import UserError
from . import importance as imp
from .groups import Graph, _out_channels, output_layer
from .ratios import PRUNABLE_TYPES, n_pruned, prunable_layers, resolve

PLAN_VERSION = 1


@dataclass
class GroupPlan:
    root: str          # conv/linear whose output channels define the group
    n: int             # channels before pruning
    keep: list[int]    # kept root channels, sorted
    ratio: float       # requested ratio (count = min(ceil(ratio*n), n-1), then round_to)
    members: list[str] = field(default_factory=list)  # "name:out" / "name:in", informative


@dataclass
class Plan:
    groups: list[GroupPlan]
    input_shape: list[int]          # one sample, e.g. [3, 32, 32]; used to trace on apply
    criterion: str = "l1"
    ratios: str = ""
    pick: str = "smallest"
    round_to: int | None = None
    layer_ratios: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["version"] = PLAN_VERSION
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
            if d.pop("version", PLAN_VERSION) != PLAN_VERSION:
                raise ValueError("unsupported plan version")
            d["groups"] = [GroupPlan(**g) for g in d["groups"]]
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"plan: cannot read plan JSON ({e})") from None

    def sha256(self) -> str:
        """Hash of the decisions (roots and kept channels): equal on every rank or a bug."""
        key = json.dumps([[g.root, g.n, g.keep] for g in self.groups])
        return hashlib.sha256(key.encode()).hexdigest()

    def pruned(self, g: GroupPlan) -> list[int]:
        keep = set(g.keep)
        return [i for i in range(g.n) if i not in keep]

    def table(self) -> list[dict]:
        """Per root layer: channels before/after and the ratio asked for."""
        return [{"layer": g.root, "ratio": g.ratio, "channels": g.n, "kept": len(g.keep),
                 "coupled": len([m for m in g.members if m.endswith(":out")])} for g in self.groups]


def example_for(plan_or_shape, model: nn.Module) -> torch.Tensor:
    shape = plan_or_shape.input_shape if isinstance(plan_or_shape, Plan) else plan_or_shape
    p = next(model.parameters(), None)
    dev = p.device if p is not None else "cpu"
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros(1, *shape, device=dev, dtype=dtype)


def make_plan(model: nn.Module, ratios, criterion: str = "l1", example_input: torch.Tensor | None = None,
              *, pick: str = "smallest", round_to: int | None = None, skip=(), seed: int = 0) -> Plan:
    """Decide which channels to prune.

    ``ratios``: any ratio format (see :mod:`.ratios`); ``criterion``: a name in
    ``importance.CRITERIA``; ``example_input``: one batch (N, ...) used to trace the graph.
    Deterministic: the same weights (and seed, for ``random``) give the same plan.
    """
    if example_input is None:
        raise UserError("plan: example_input is required to trace the model")
    imp.CRITERIA.lookup(criterion)  # an unknown name fails here, before tracing
    graph = Graph(model, example_input)
    out_layer = output_layer(model, example_input)
    names = [n for n, _ in prunable_layers(model)]
    members_of = {n: _safe_members(graph, n) for n in names if n != out_layer}
    uncoupled = {n for n, ms in members_of.items()
                 if ms is not None and {m.name for m in ms if m.dim == "out"
                                        and isinstance(m.module, PRUNABLE_TYPES)} == {n}}
    table = resolve(model, ratios, uncoupled=uncoupled, output_layer=out_layer, skip=tuple(skip))
    todo, claimed = [], {}
    for name in names:
        r = table[name]
        if r <= 0 or name in claimed:
            continue
        members = members_of.get(name) or graph.members(name)
        outs = {m.name for m in members if m.dim == "out"}
        if out_layer in outs:
            raise UserError(f"prune.ratios: pruning {name!r} would prune the output layer "
                            f"{out_layer!r} (coupled channels)")
        for o in outs:
            claimed[o] = name
        todo.append((name, members, _out_channels(model.get_submodule(name)), r))
    # every group scored at once: one filter_norms call and one host transfer for the model
    all_scores = imp.score_groups(criterion, [(nm, ms, n) for nm, ms, n, _ in todo], seed)
    groups = []
    for (name, members, n, r), scores in zip(todo, all_scores):
        k = n_pruned(r, n, round_to)
        pruned = imp.select_pruned(scores, k, pick, seed=seed, root=name)
        keep = [i for i in range(n) if i not in set(pruned)]
        groups.append(GroupPlan(name, n, keep, r, [f"{m.name}:{m.dim}" for m in members]))
    return Plan(groups, list(example_input.shape[1:]), criterion, _spec_text(ratios), pick,
                round_to, {k: v for k, v in table.items()})


def _safe_members(graph: Graph, name: str):
    try:
        return graph.members(name)
    except UserError:  # e.g. reaches a refused module: not a default pruning target
        return None


def _spec_text(ratios) -> str:
    if isinstance(ratios, (list, tuple)):
        return "[" + ",".join(str(r) for r in ratios) + "]"
    return str(ratios)
