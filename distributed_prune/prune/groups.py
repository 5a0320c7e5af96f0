"""Coupled channel groups, from torch-pruning's DependencyGraph.

We wrap the library rather than trace the graph ourselves; what leaves this module is plain
data (module names, ``"out"``/``"in"``, channel indices) so plans stay JSON and replayable.
A module type the graph cannot prune correctly is reported by name, never silently mis-pruned,
and no exception raised inside the library leaks out untranslated: it becomes a
:class:`UserError` naming the layer.

Cost: the graph is traced once (one forward pass, which also records the output layer), the
library's index mappings (concat / split / reshape offsets) are computed once per graph instead of
once per group query, and a group is only computed for a layer that is asked about.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.dependency import index_mapping as _tp_index_mapping

from ..errors import UserError
from .ratios import PRUNABLE_TYPES


_NORMS = (nn.modules.batchnorm._BatchNorm,)


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


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
            with contextlib.redirect_stdout(io.StringIO()):
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_input,
                    customized_pruners={t: _Refuse() for t in refused}, verbose=False)
                # offsets of concat / split / reshape depend on the architecture only: once here,
                # not once per group query as get_pruning_group would (densenet: 0.1 s each)
                _tp_index_mapping.update_index_mapping(self.dg)
        except UserError:
            raise
        except RuntimeError as e:  # shape mismatch: wrong model for this plan / input size
            raise UserError(f"plan: the model cannot run on input shape "
                            f"{tuple(example_input.shape[1:])} ({_first_line(e)})") from None
        except Exception as e:  # noqa: BLE001 - anything from inside the library, translated
            raise UserError(f"plan: cannot trace the model's channel dependencies "
                            f"({_first_line(e)})") from None
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        self.refused = refused
        self.order = order
        self._full: dict[str, list[Member]] = {}

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

    def group(self, root: str, idxs: list[int]):
        m = self.module(root)
        if m not in self.dg.module2node:
            raise UserError(f"plan: layer {root!r} is not reached by the forward pass")
        fn = self._root_fn(m)
        try:
            with mock.patch.object(_tp_index_mapping, "update_index_mapping", lambda graph: None):
                return self.dg.get_pruning_group(m, fn, idxs=list(idxs))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the library's failure, named by layer
            raise UserError(f"plan: layer {root!r}: torch-pruning cannot follow its coupled "
                            f"channels ({_first_line(e)})") from None

    def members(self, root: str, idxs: list[int] | None = None) -> list[Member]:
        """Every (module, dim) coupled to the output channels ``idxs`` (default: all) of ``root``;
        raises UserError, naming the module, when the group reaches a module we cannot prune.
        The full group is computed once per layer; a subset is read off it by root channel."""
        full = self._full.get(root)
        if full is None:
            full = self._full[root] = self._compute(root)
        if idxs is None:
            return full
        want = set(int(i) for i in idxs)
        out = []
        for mb in full:
            pairs = [(i, r) for i, r in zip(mb.idxs, mb.root_idxs) if r in want]
            if pairs:
                out.append(Member(mb.name, mb.module, mb.dim, [i for i, _ in pairs],
                                  [r for _, r in pairs], mb.dep))
        return out

    def _compute(self, root: str) -> list[Member]:
        m = self.module(root)
        group = self.group(root, list(range(_out_channels(m))))
        out = []
        for item in group:
            dep, ids = item.dep, item.idxs
            mod = dep.target.module
            if not isinstance(mod, nn.Module) or dep.target.type == tp.ops.OPTYPE.PARAMETER:
                raise UserError(f"plan: layer {root!r} is coupled to a bare parameter; "
                                "this model's channels cannot be pruned there")
            name = self.names.get(mod)
            if type(mod) in self.refused:
                raise UserError(f"plan: pruning {root!r} reaches {name!r} "
                                f"({self.refused[type(mod)]}), whose channels cannot be pruned; "
                                "prune block-inner convs instead (e.g. '*layer*.conv1')")
            if name is None:  # a functional op (add, relu, cat, view): carries no parameters
                continue
            if (any(True for _ in mod.parameters(recurse=False))
                    and not isinstance(mod, PRUNABLE_TYPES + _NORMS)):
                # e.g. LayerNorm over the channels: cutting it renormalises over fewer channels,
                # which no masked (zeroed) model computes, so the cut could not be checked
                raise UserError(f"plan: pruning {root!r} reaches {name!r} ({type(mod).__name__}), "
                                "whose channels cannot be pruned exactly")
            dim = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
            root_ids = [int(i) for i in getattr(item, "root_idxs", ids)]
            out.append(Member(name, mod, dim, [int(i) for i in ids], root_ids, dep))
        return out

    def coupled_outputs(self, root: str) -> set[str]:
        """Names of conv/linear layers whose output channels move with ``root``'s."""
        return {mb.name for mb in self.members(root)
                if mb.dim == "out" and isinstance(mb.module, PRUNABLE_TYPES)}


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
