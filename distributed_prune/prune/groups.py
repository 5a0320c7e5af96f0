"""Coupled channel groups, from torch-pruning's DependencyGraph.

We wrap the library rather than trace the graph ourselves; what leaves this module is plain
data (module names, ``"out"``/``"in"``, channel indices) so plans stay JSON and replayable.
A module type the graph cannot prune correctly is reported by name, never silently mis-pruned,
and no exception raised inside the library leaks out untranslated: it becomes a
:class:`UserError` naming the layer.

Cost: the graph is traced once (one forward pass, which also records the output layer), the
library's index mappings (concat / split / reshape offsets) are computed once per graph instead of
once per group query, and a group is only computed for a layer that is asked about.

Over 400 lines on purpose: everything that touches the library's internals (its graph, index
mappings, the modules it refuses) stays in this one file, so a new torch-pruning release is
checked in one place.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning._helpers import _HybridIndex
from torch_pruning.dependency import index_mapping as _tp_index_mapping
from torch_pruning.dependency.index_mapping import _ConcatIndexMapping
from torch_pruning.dependency.dependency import Dependency as _Dependency

from ..errors import UserError
from .ratios import PRUNABLE_TYPES


_NORMS = (nn.modules.batchnorm._BatchNorm,)
_MAX_WALK = 20000  # distinct (node, operation, channels) states of one group walk


class _Refuse(tp.pruner.function.BasePruningFunc):
    """Pruner for modules whose channels must not be pruned: it lets the graph be built,
    and :func:`members` refuses any group that reaches such a module."""

    def prune_out_channels(self, layer, idxs):  # pragma: no cover - never called
        raise UserError(f"cannot prune channels of {type(layer).__name__}")

    def prune_in_channels(self, layer, idxs):  # pragma: no cover - never called
        raise UserError(f"cannot prune channels of {type(layer).__name__}")

    def get_out_channels(self, layer):
        return getattr(layer, "out_c", None)

    def get_in_channels(self, layer):
        return getattr(layer, "in_c", None)


def _refused_types():
    from ..models.cifar_resnet import PadShortcut

    return {PadShortcut: "option-A zero-pad shortcut"}


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


def _no_index_mapping_update():
    """The library re-derives every concat / split / reshape channel map of the whole graph on
    each build and group query; :class:`Graph` does it once, node by node."""
    return mock.patch.object(_tp_index_mapping, "update_index_mapping", lambda graph: None)


@dataclass
class Member:
    """One tensor dimension pruned together with the group's root channels.

    ``idxs[k]`` is the channel of this member that moves with root channel ``root_idxs[k]``.
    ``dep`` is the library's pruning operation for this member (valid for the traced model only).
    """

    name: str
    module: nn.Module
    dim: str  # "out" or "in"
    idxs: list[int]
    root_idxs: list[int]
    dep: object = field(default=None, repr=False, compare=False)


def is_grouped_conv(m: nn.Module) -> bool:
    """A conv with 1 < groups that is not depthwise (depthwise convs move in and out together)."""
    return (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups > 1
            and not (m.groups == m.in_channels == m.out_channels))


def group_width(m: nn.Module, dim: str) -> tuple[int, int]:
    """(channels, channels per conv group) of a grouped conv's ``dim``."""
    c = m.out_channels if dim == "out" else m.in_channels
    return c, c // m.groups


def check_uniform(m: nn.Module, dim: str, idxs, name: str) -> list[int]:
    """The in-group positions of ``idxs`` when they are the same positions in every conv group
    (what keeps a cut grouped conv equal to the masked one); otherwise a UserError naming ``name``."""
    c, width = group_width(m, dim)
    s = set(int(i) for i in idxs)
    pos = sorted({i % width for i in s})
    if len(s) != len(pos) * m.groups or any(g * width + p not in s for g in range(m.groups) for p in pos):
        raise UserError(f"prune: grouped conv {name!r} (groups={m.groups}) would lose different "
                        f"{dim}put channels in different groups; a plan must remove the same "
                        "positions from every group")
    return pos


class Graph:
    """Channel-dependency graph of ``model`` traced on ``example_input`` (one forward pass)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model = model
        refused = _refused_types()
        self.names = {m: n for n, m in model.named_modules()}
        order: list[str] = []
        # the trace's own forward also tells which conv/linear layer runs last (the output layer)
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
                 for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
        was_training = model.training
        model.eval()
        try:
            # the index mappings are updated below, node by node (see _update_index_mappings)
            with contextlib.redirect_stdout(io.StringIO()), _no_index_mapping_update():
                # a tuple: given a bare tensor, the library first tries model(*tensor), which runs
                # most of a conv net on the unbatched sample before failing (a wasted forward)
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=(example_input,),
                    customized_pruners={t: _Refuse() for t in refused}, verbose=False)
        except UserError:
            raise
        except RuntimeError as e:  # shape mismatch: wrong model for this plan / input size
            raise UserError(f"plan: the model cannot run on input shape "
                            f"{tuple(example_input.shape[1:])} ({first_line(e)})") from None
        except Exception as e:  # noqa: BLE001 - anything from inside the library, translated
            raise UserError(f"plan: cannot trace the model's channel dependencies "
                            f"({first_line(e)})") from None
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        self.refused = refused
        self.order = order
        self.unmapped = self._update_index_mappings()
        self._full: dict[str, list[Member]] = {}
        self._ident: dict[str, list[bool]] = {}
        self._fine: set = set()  # nodes no group is refused for

    def _update_index_mappings(self) -> dict:
        """The library's channel maps through concat / split / reshape nodes, once per graph (not
        once per group query as ``get_pruning_group`` would: densenet201, 0.1 s each). A node the
        library cannot map (e.g. a channel shuffle's 5-D view) is recorded, and a group reaching
        it is refused instead of the whole model failing."""
        m = _tp_index_mapping
        updates = {tp.ops.OPTYPE.CONCAT: m.update_concat_index_mapping,
                   tp.ops.OPTYPE.SPLIT: m.update_split_index_mapping,
                   tp.ops.OPTYPE.RESHAPE: m.update_reshape_index_mapping,
                   tp.ops.OPTYPE.UNBIND: m.update_unbind_index_mapping,
                   tp.ops.OPTYPE.EXPAND: m.update_expand_index_mapping,
                   tp.ops.OPTYPE.SLICE: m.update_slice_index_mapping}
        failed = {}
        for node in list(self.dg.module2node.values()):
            fn = updates.get(node.type)
            if fn is None:
                continue
            try:
                fn(self.dg, node)
            except Exception as e:  # noqa: BLE001 - recorded, refused per group
                failed[node] = first_line(e)
        return failed

    def output_layer(self) -> str:
        """Name of the layer that produces the logits: the last conv/linear layer to run."""
        if not self.order:
            raise UserError("model has no conv or linear layer to prune")
        return self.order[-1]

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise UserError(f"plan: layer {name!r} does not exist in this model") from None

    def _root_fn(self, m: nn.Module):
        if isinstance(m, nn.Linear):
            return tp.prune_linear_out_channels
        if isinstance(m, PRUNABLE_TYPES):
            return tp.prune_conv_out_channels
        raise UserError(f"plan: root layer {self.names.get(m, m)!r} is not a conv or linear layer")

    def walk(self, root: str, idxs: list[int]) -> list[tuple]:
        """(library dependency, [(member channel, root channel), ...]) for every tensor
        dimension coupled to output channels ``idxs`` of ``root``, merged per (module, operation).

        The same walk as the library's ``get_pruning_group`` over the same graph, with two
        differences: it stops, naming the layer, at a node whose channel map could not be
        derived (the library would walk on with a wrong map, for minutes on shufflenet), and it
        remembers visited (node, operation, channels) in a set instead of rescanning the group."""
        m = self.module(root)
        if m not in self.dg.module2node:
            raise UserError(f"plan: layer {root!r} is not reached by the forward pass")
        fn = self._root_fn(m)
        if isinstance(m, tp.ops.TORCH_CONV) and m.groups == m.out_channels > 1:
            fn = tp.pruner.function.prune_depthwise_conv_out_channels
        node = self.dg.module2node[m]
        reached, mapped = self._prescan(root, node, fn)
        root_dep = _Dependency(fn, fn, source=node, target=node)
        if not mapped:
            # no concat / split / reshape on the way: every member moves channel for channel
            # with the root (the channel-level walk would find exactly this, more slowly)
            pairs = [(int(i), int(i)) for i in idxs]
            return [(root_dep, pairs)] + [(dep, pairs) for k, dep in reached.items()
                                          if dep is not None and k != (node, fn)]
        start = (root_dep, [_HybridIndex(idx=i, root_idx=i) for i in idxs])
        items, stack = [start], [start]
        bounds: dict = {}  # id(channel list) -> (min, max) channel, for _map
        seen = {(node, fn, tuple(start[1]))}
        try:
            while stack:
                dep, ids = stack.pop()
                for nd in dep.target.dependencies:
                    if not nd.is_triggered_by(dep.handler):
                        continue
                    new = ids
                    for mapping in nd.index_mapping:
                        if mapping is not None:
                            new = _map(mapping, new, bounds)
                    if not new:
                        continue
                    key = (nd.target, nd.handler, tuple(new))
                    if key in seen:
                        continue
                    seen.add(key)
                    if len(seen) > _MAX_WALK:
                        raise UserError(f"plan: layer {root!r}: its coupled channels do not "
                                        f"settle (over {_MAX_WALK} channel maps followed)")
                    items.append((nd, new))
                    stack.append((nd, new))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the library's failure, named by layer
            raise UserError(f"plan: layer {root!r}: torch-pruning cannot follow its coupled "
                            f"channels ({first_line(e)})") from None
        merged: dict = {}
        for dep, ids in items:
            k = (dep.target, dep.handler)
            if k not in merged:
                merged[k] = (dep, {})
            for h in ids:
                merged[k][1].setdefault(int(h.idx), h.root_idx)
        return [(dep, list(pairs.items())) for dep, pairs in merged.values()]

    def _refusal(self, root: str, node) -> str | None:
        """Why a group reaching ``node`` cannot be pruned (a message naming it), or None."""
        if node in self._fine:
            return None
        why = self._why(root, node)
        if why is None:
            self._fine.add(node)
        return why

    def _why(self, root: str, node) -> str | None:
        mod = node.module
        if node in self.unmapped:
            return (f"plan: layer {root!r} reaches a {node.type.name.lower()} the channel "
                    f"dependencies cannot be followed through ({self.unmapped[node]})")
        if not isinstance(mod, nn.Module) or node.type == tp.ops.OPTYPE.PARAMETER:
            return (f"plan: layer {root!r} is coupled to a bare parameter; "
                    "this model's channels cannot be pruned there")
        name = self.names.get(mod)
        if type(mod) in self.refused:
            return (f"plan: pruning {root!r} reaches {name!r} ({self.refused[type(mod)]}), whose "
                    "channels cannot be pruned; prune block-inner convs instead (e.g. '*layer*.conv1')")
        if (name is not None and any(True for _ in mod.parameters(recurse=False))
                and not isinstance(mod, PRUNABLE_TYPES + _NORMS)):
            # e.g. LayerNorm over the channels: cutting it renormalises over fewer channels,
            # which no masked (zeroed) model computes, so the cut could not be checked
            return (f"plan: pruning {root!r} reaches {name!r} ({type(mod).__name__}), "
                    "whose channels cannot be pruned exactly")
        return None

    def coupled_out_layers(self, root: str) -> set[str]:
        """Conv/linear layers whose output channels move with ``root``'s, found by following
        operations only (no channel indices: cheap; exact where no concat or split sits on the
        way, an over-approximation where one does). Raises UserError like :meth:`members`."""
        m = self.module(root)
        if m not in self.dg.module2node:
            raise UserError(f"plan: layer {root!r} is not reached by the forward pass")
        fn = self._root_fn(m)
        node = self.dg.module2node[m]
        out = {root}
        for target, handler in self._prescan(root, node, fn)[0]:
            mod = target.module
            if isinstance(mod, PRUNABLE_TYPES) and self.dg.is_out_channel_pruning_fn(handler):
                out.add(self.names[mod])
        return out

    def _prescan(self, root: str, node, fn) -> tuple[dict, bool]:
        """Refuse before the channel-level walk when the group can reach a node we refuse,
        following operations only (no channel indices). Cheap, and it keeps the walk from
        exploding on graphs the library maps badly (channel shuffle; swin's window reshapes).
        It may over-approximate: a map that would leave no channel is not evaluated here.
        Returns {(node, operation): dependency} reached and whether any channel map
        (concat, split, reshape, ...) lies on the way."""
        seen = {(node, fn): None}
        stack = [(node, fn)]
        mapped = False
        while stack:
            n, f = stack.pop()
            for nd in n.dependencies:
                if not nd.is_triggered_by(f):
                    continue
                why = self._refusal(root, nd.target)
                if why is not None:
                    raise UserError(why)
                k = (nd.target, nd.handler)
                if k not in seen:
                    mapped = mapped or any(mp is not None for mp in nd.index_mapping)  # short-circuits
                    seen[k] = nd
                    stack.append(k)
        return seen, mapped

    def members(self, root: str, idxs: list[int] | None = None) -> list[Member]:
        """Every (module, dim) coupled to the output channels ``idxs`` (default: all) of ``root``;
        raises UserError, naming the module, when the group reaches a module we cannot prune.
        The full group is computed once per layer; a subset is read off it by root channel."""
        full = self._full.get(root)
        if full is None:
            full = self._full[root] = self._compute(root)
            # per member: does channel k move with root channel k (the usual case)?
            self._ident[root] = [mb.idxs == mb.root_idxs == list(range(len(mb.idxs))) for mb in full]
        if idxs is None:
            return full
        want = set(int(i) for i in idxs)
        chosen = sorted(want)
        out = []
        for mb, identity in zip(full, self._ident[root]):
            if identity:
                if chosen:
                    out.append(Member(mb.name, mb.module, mb.dim, list(chosen), list(chosen), mb.dep))
                continue
            pairs = [(i, r) for i, r in zip(mb.idxs, mb.root_idxs) if r in want]
            if pairs:
                out.append(Member(mb.name, mb.module, mb.dim, [i for i, _ in pairs],
                                  [r for _, r in pairs], mb.dep))
        return out

    def _compute(self, root: str) -> list[Member]:
        m = self.module(root)
        out = []
        walked = self.walk(root, list(range(_out_channels(m))))
        mapped = any(p is not walked[0][1] for _, p in walked)  # channel maps changed a list
        for dep, pairs in walked:
            why = self._refusal(root, dep.target)
            if why is not None:
                raise UserError(why)
            mod = dep.target.module
            name = self.names.get(mod)
            if name is None:  # a functional op (add, relu, cat, view): carries no parameters
                continue
            dim = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
            if mapped and any(r is None for _, r in pairs):
                raise UserError(f"plan: layer {root!r}: the channels of {name!r} cannot be traced "
                                "back to it one to one")
            out.append(Member(name, mod, dim, [i for i, _ in pairs], [int(r) for _, r in pairs], dep))
        return out

    def coupled_outputs(self, root: str) -> set[str]:
        """Names of conv/linear layers whose output channels move with ``root``'s."""
        return {mb.name for mb in self.members(root)
                if mb.dim == "out" and isinstance(mb.module, PRUNABLE_TYPES)}


def _map(mapping, ids: list, bounds: dict) -> list:
    """``mapping(ids)``, except that a concat's reverse map (from the concatenation back to one
    of its inputs) is skipped when no channel falls in that input's range: on densenet most of
    them, and building the empty answer index by index was most of the planning time."""
    if isinstance(mapping, _ConcatIndexMapping) and mapping.reverse:
        b = bounds.get(id(ids))
        if b is None:
            vals = [h.idx for h in ids]
            b = bounds[id(ids)] = (min(vals), max(vals), ids)  # keeps ids alive: ids stay unique
        if b[1] < mapping.offset[0] or b[0] >= mapping.offset[1]:
            return []
    return mapping(ids)


def position_classes(root: str, members: list[Member], n: int) -> list[list[int]] | None:
    """Root channels that must be pruned together because they reach a grouped conv: the same
    in-group position in every conv group (so the cut conv keeps equal, aligned groups).
    ``None`` when no member is a grouped conv (every channel is free)."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    grouped = False
    for mb in members:
        if not is_grouped_conv(mb.module):
            continue
        grouped = True
        c, width = group_width(mb.module, mb.dim)
        root_of = dict(zip(mb.idxs, mb.root_idxs))
        for i, r in root_of.items():
            j = (i + width) % c
            if j not in root_of:
                raise UserError(f"plan: layer {root!r} feeds grouped conv {mb.name!r} "
                                f"(groups={mb.module.groups}) together with other layers' channels; "
                                "it cannot be pruned uniformly across the conv groups")
            a, b = find(r), find(root_of[j])
            if a != b:
                parent[max(a, b)] = min(a, b)
    if not grouped:
        return None
    classes: dict[int, list[int]] = {}
    for r in range(n):
        classes.setdefault(find(r), []).append(r)
    return sorted(classes.values())


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def output_layer(model: nn.Module, example_input) -> str:
    """Name of the layer that produces the logits (kept for callers without a Graph)."""
    return Graph(model, example_input).output_layer()
