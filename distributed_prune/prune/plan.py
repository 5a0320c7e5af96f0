"""Plans: which output channels each coupled group keeps. A plan is data (JSON), computed once
(on rank 0 when distributed), then applied as masks or as physical removal, or replayed on a
fresh model to rebuild the pruned architecture before ``load_state_dict``."""
from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..errors import UserError
from . import importance as imp
from .groups import Graph, _out_channels, position_classes
from .ratios import PRUNABLE_TYPES, n_pruned, prunable_layers, resolve
from .ratios import parse as parse_ratios

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
    # layers the default rule (a bare number) left unpruned because they cannot be pruned: reason
    skipped: dict[str, str] = field(default_factory=dict)

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
                 "coupled": len([m for m in g.members if m.endswith(":out")]),
                 # kept channels the ratio asked for; differs when a grouped conv forced rounding
                 "asked_kept": g.n - n_pruned(g.ratio, g.n, self.round_to)} for g in self.groups]


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

    Under the default rule (a bare number) a layer that cannot be pruned (coupled to a bare
    parameter or to a module that cannot be cut exactly, not reached by the forward pass, ...)
    is skipped and listed in ``Plan.skipped``; an explicit spec naming it is an error.
    A group reaching a grouped conv keeps the same positions in every conv group; its count is
    rounded to the nearest feasible one (``Plan.table()`` shows the count asked for).
    """
    if example_input is None:
        raise UserError("plan: example_input is required to trace the model")
    imp.CRITERIA.lookup(criterion)  # an unknown name fails here, before tracing
    graph = Graph(model, example_input)
    out_layer = graph.output_layer()
    names = [n for n, _ in prunable_layers(model)]
    default_rule = parse_ratios(ratios).kind == "uniform"
    refused: dict[str, str] = {}

    class _Uncoupled:
        """Block-inner convs, decided only for the layers the ratio rule asks about, from the
        operations their channels reach (the channel-level groups are computed only for the
        layers that get a ratio > 0)."""

        def __contains__(self, n):
            if n == out_layer:
                return False
            try:
                return graph.coupled_out_layers(n) == {n}
            except UserError as e:  # e.g. reaches a refused module: not a default pruning target
                refused[n] = str(e)
                return False

    table = resolve(model, ratios, uncoupled=_Uncoupled(), output_layer=out_layer, skip=tuple(skip))
    skipped = {n: _reason(msg) for n, msg in refused.items()} if default_rule else {}
    todo, claimed = [], {}
    for name in names:
        r = table[name]
        if r <= 0 or name in claimed:
            continue
        try:
            members, n, classes = _group(graph, model, name, out_layer)
        except UserError as e:
            if not default_rule:
                raise
            skipped[name] = _reason(str(e))
            continue
        for m in members:
            if m.dim == "out":
                claimed[m.name] = name
        todo.append((name, members, n, r, classes))
    # every group scored at once: one filter_norms call and one host transfer for the model
    all_scores = imp.score_groups(criterion, [(nm, ms, n) for nm, ms, n, _, _ in todo], seed)
    groups = [_select(name, members, n, r, classes, scores, pick=pick, round_to=round_to, seed=seed)
              for (name, members, n, r, classes), scores in zip(todo, all_scores)]
    for n in skipped:
        table[n] = 0.0
    p = Plan(groups, list(example_input.shape[1:]), criterion, _spec_text(ratios), pick,
             round_to, {k: v for k, v in table.items()}, dict(sorted(skipped.items())))
    remember_graph(p, model, graph)
    return p


def _group(graph: Graph, model, name, out_layer):
    """(members, channels, position classes or None) of the group rooted at ``name``; a
    UserError when it cannot be pruned (it reaches the output layer, grouped convs of
    different widths, or something the graph refuses)."""
    members = graph.members(name)
    outs = {m.name for m in members if m.dim == "out"}
    if out_layer in outs:
        raise UserError(f"prune.ratios: pruning {name!r} would prune the output layer "
                        f"{out_layer!r} (coupled channels)")
    n = _out_channels(model.get_submodule(name))
    classes = position_classes(name, members, n)
    if classes is not None and any(len(c) != len(classes[0]) for c in classes):
        raise UserError(f"plan: layer {name!r} reaches grouped convs of different group widths; "
                        "it cannot be pruned uniformly")
    return members, n, classes


def _select(name, members, n, r, classes, scores, *, pick, round_to, seed) -> GroupPlan:
    """The group's kept channels: the ``k`` to prune by ``scores``; with grouped convs, whole
    positions across the conv groups (the nearest feasible count, one position kept)."""
    k = n_pruned(r, n, round_to)
    if classes is None:
        pruned = imp.select_pruned(scores, k, pick, seed=seed, root=name)
    else:
        size = len(classes[0])
        m = min(int(k / size + 0.5), len(classes) - 1)
        cls_scores = torch.stack([scores[c].sum() for c in classes])
        chosen = imp.select_pruned(cls_scores, m, pick, seed=seed, root=name)
        pruned = sorted(i for ci in chosen for i in classes[ci])
    drop = set(pruned)
    keep = [i for i in range(n) if i not in drop]
    return GroupPlan(name, n, keep, r, [f"{m.name}:{m.dim}" for m in members])


def _reason(msg: str) -> str:
    return msg[len("plan: "):] if msg.startswith("plan: ") else msg


def remember_graph(plan: Plan, model: nn.Module, graph: Graph) -> None:
    """Keep the traced graph with the plan, so applying it to the same (unchanged) model object
    does not trace again. Not part of the plan's data (never serialised or compared)."""
    plan.__dict__["_graph"] = (weakref.ref(model), graph, _shapes(model))


def graph_for(plan: Plan, model: nn.Module) -> Graph:
    """The plan's graph when ``model`` is the very object it was traced on and is unchanged,
    else a new trace of ``model``."""
    cached = plan.__dict__.get("_graph")
    if cached is not None and cached[0]() is model and cached[2] == _shapes(model):
        return cached[1]
    return Graph(model, example_for(plan, model))


def forget_graph(plan: Plan) -> None:
    plan.__dict__.pop("_graph", None)


def _shapes(model: nn.Module) -> tuple:
    """The model's structure: module objects (a swapped module makes the graph stale) and
    parameter shapes (a cut one too)."""
    return (tuple(id(m) for m in model.modules()),
            tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))


def _spec_text(ratios) -> str:
    if isinstance(ratios, (list, tuple)):
        return "[" + ",".join(str(r) for r in ratios) + "]"
    return str(ratios)
