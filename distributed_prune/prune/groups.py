"""Coupled channel groups, from torch-pruning's DependencyGraph.

We wrap the library rather than trace the graph ourselves; what leaves this module is plain
data (module names, ``"out"``/``"in"``, channel indices) so plans stay JSON and replayable.
A module type the graph cannot prune correctly is reported by name, never silently mis-pruned.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import UserError
from .ratios import PRUNABLE_TYPES


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


@dataclass
class Member:
    """One tensor dimension pruned together with the group's root channels.

    ``idxs[k]`` is the channel of this member that moves with root channel ``root_idxs[k]``.
    """

    name: str
    module: nn.Module
    dim: str  # "out" or "in"
    idxs: list[int]
    root_idxs: list[int]


class Graph:
    """Channel-dependency graph of ``model`` traced on ``example_input``."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model = model
        refused = _refused_types()
        was_training = model.training
        model.eval()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_input,
                    customized_pruners={t: _Refuse() for t in refused}, verbose=False)
        except RuntimeError as e:  # shape mismatch: wrong model for this plan / input size
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"plan: the model cannot run on input shape "
                            f"{tuple(example_input.shape[1:])} ({msg})") from None
        finally:
            model.train(was_training)
        self.refused = refused
        self.names = {m: n for n, m in model.named_modules()}

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
        return self.dg.get_pruning_group(m, self._root_fn(m), idxs=list(idxs))

    def members(self, root: str, idxs: list[int] | None = None) -> list[Member]:
        """Every (module, dim) coupled to the output channels ``idxs`` (default: all) of ``root``."""
        return self.group_and_members(root, idxs)[1]

    def group_and_members(self, root: str, idxs: list[int] | None = None):
        """The torch-pruning group of ``root``'s channels ``idxs`` and its members as data;
        raises UserError, naming the module, when the group reaches a module we cannot prune."""
        m = self.module(root)
        if idxs is None:
            idxs = list(range(_out_channels(m)))
        out = []
        group = self.group(root, idxs)
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
            dim = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
            root_ids = [int(i) for i in getattr(item, "root_idxs", ids)]
            out.append(Member(name, mod, dim, [int(i) for i in ids], root_ids))
        return group, out

    def coupled_outputs(self, root: str) -> set[str]:
        """Names of conv/linear layers whose output channels move with ``root``'s."""
        return {mb.name for mb in self.members(root)
                if mb.dim == "out" and isinstance(mb.module, PRUNABLE_TYPES)}


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def output_layer(model: nn.Module, example_input) -> str:
    """Name of the layer that produces the logits: the last conv/linear layer to run."""
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if not order:
        raise UserError("model has no conv or linear layer to prune")
    return order[-1]
