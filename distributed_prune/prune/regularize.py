"""Regularization-based pruning: GReg-1 and TPP (docs/science.md section 3).

Both act on the *dense* model during a pruning phase, after the filters to prune were chosen and
before they are physically removed.  A growing penalty factor ``reg`` follows the schedule

    reg(it) = min(reg_granularity * (it // update_reg_interval), reg_ceiling)

which reaches the ceiling at ``ceiling_iteration = ceil(reg_ceiling / reg_granularity) *
update_reg_interval`` and is then held for ``stabilize_interval`` iterations; ``done`` is True from
``ceiling_iteration + stabilize_interval`` on.  The schedule is a pure function of the iteration
number, so a resumed run continues it exactly.

Training loop (GReg)::

    greg = GReg(model, targets)
    for it, (x, y) in enumerate(loader):
        greg.step(it)
        loss = criterion(model(x), y)
        loss.backward()                 # (with AMP: scaler.unscale_(optimizer) first)
        greg.apply_(model)              # adds reg * w to the pruned filters' gradients
        optimizer.step(); optimizer.zero_grad()
        if greg.done: break

TPP instead adds a loss term: ``loss = criterion(model(x), y) + tpp.loss(model)``.

``model`` is always the unwrapped module (not DDP / DeepSpeed); layer names are those of
``model.named_modules()``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from distributed_prune.errors import UserError

__all__ = ["Target", "GReg", "TPP"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Target:
    """Filters of one layer chosen for pruning.

    layer_name: a Conv or Linear module in ``model.named_modules()``.
    pruned: output-channel (filter / row) indices to drive to zero.
    bn_name: the BatchNorm that normalises this layer's output, or None.
    """
    layer_name: str
    pruned: list[int] = field(default_factory=list)
    bn_name: str | None = None


class _GrowingReg:
    """Shared target resolution and the growing-penalty schedule (see module docstring)."""

    def __init__(self, model: nn.Module, targets: Mapping[str, Target] | Iterable[Target], *,
                 reg_granularity: float, reg_ceiling: float, update_reg_interval: int,
                 stabilize_interval: int):
        if not reg_granularity > 0 or not reg_ceiling > 0:
            raise UserError(f"reg_granularity and reg_ceiling must be > 0, got {reg_granularity}, "
                            f"{reg_ceiling}")
        if update_reg_interval < 1 or stabilize_interval < 0:
            raise UserError("update_reg_interval must be >= 1 and stabilize_interval >= 0, got "
                            f"{update_reg_interval}, {stabilize_interval}")
        self.reg_granularity = float(reg_granularity)
        self.reg_ceiling = float(reg_ceiling)
        self.update_reg_interval = int(update_reg_interval)
        self.stabilize_interval = int(stabilize_interval)
        # Number of increments to reach the ceiling, robust to 1.0 / 1e-4 = 9999.999...
        n = round(self.reg_ceiling / self.reg_granularity)
        if abs(n * self.reg_granularity - self.reg_ceiling) > 1e-9 * self.reg_ceiling:
            n = math.ceil(self.reg_ceiling / self.reg_granularity)
        self._n_increments = max(1, n)
        self.targets = list(targets.values() if isinstance(targets, Mapping) else targets)
        self._validate(model)
        self.reg = 0.0
        self.iteration = -1

    @property
    def ceiling_iteration(self) -> int:
        """First iteration at which ``reg == reg_ceiling``."""
        return self._n_increments * self.update_reg_interval

    def reg_at(self, iteration: int) -> float:
        """Penalty factor at ``iteration`` (0-based count of training iterations in this phase)."""
        k = max(0, iteration) // self.update_reg_interval
        return self.reg_ceiling if k >= self._n_increments else k * self.reg_granularity

    def step(self, iteration: int) -> float:
        """Set ``reg`` for ``iteration`` (call once per iteration, before the forward); returns it."""
        self.iteration = int(iteration)
        self.reg = self.reg_at(self.iteration)
        return self.reg

    @property
    def done(self) -> bool:
        """True once the ceiling was held for ``stabilize_interval`` iterations."""
        return self.iteration >= self.ceiling_iteration + self.stabilize_interval

    def _validate(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for t in self.targets:
            layer = modules.get(t.layer_name)
            if not isinstance(layer, _PRUNABLE):
                raise UserError(f"regularization target {t.layer_name!r} is not a Conv or Linear "
                                "module of the model")
            n_out = layer.weight.shape[0]
            bad = [i for i in t.pruned if not 0 <= int(i) < n_out]
            if bad or len(set(t.pruned)) != len(t.pruned):
                raise UserError(f"regularization target {t.layer_name!r}: pruned indices must be "
                                f"unique and in [0, {n_out}), got {sorted(t.pruned)}")
            if t.bn_name is not None:
                bn = modules.get(t.bn_name)
                if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != n_out:
                    raise UserError(f"regularization target {t.layer_name!r}: {t.bn_name!r} is not a "
                                    f"BatchNorm with {n_out} features")

    def _resolved(self, model: nn.Module):
        """Yield (layer, bn or None, pruned index tensor on the weight's device) per target."""
        modules = dict(model.named_modules())
        for t in self.targets:
            if not t.pruned:
                continue
            layer = modules[t.layer_name]
            bn = modules[t.bn_name] if t.bn_name is not None else None
            yield layer, bn, torch.as_tensor(t.pruned, dtype=torch.long, device=layer.weight.device)

    @staticmethod
    def _params(layer: nn.Module, bn: nn.Module | None, with_weight: bool = True):
        """Parameters indexed by output channel along dim 0: weight, bias, BN gamma and beta."""
        cands = ([layer.weight] if with_weight else []) + [layer.bias]
        if bn is not None:
            cands += [bn.weight, bn.bias]
        return [p for p in cands if isinstance(p, torch.Tensor)]


class GReg(_GrowingReg):
    """GReg-1 (growing L2 regularization on the filters chosen for pruning).

    The penalty is ``reg / 2 * sum_{i in P} (||w_i||^2 + b_i^2 + gamma_i^2 + beta_i^2)`` over the
    pruned output channels ``P`` of each target (``w_i`` the filter ``weight[i]`` of shape
    ``(in, *kernel)``, ``b`` the layer bias, ``gamma``/``beta`` the BatchNorm affine parameters where
    present).  ``apply_`` adds its gradient ``reg * p[P]`` to ``p.grad[P]``; no other channel and no
    other layer is touched.
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, Target] | Iterable[Target], *,
                 reg_granularity: float = 1e-4, reg_ceiling: float = 1.0,
                 update_reg_interval: int = 5, stabilize_interval: int = 10000):
        super().__init__(model, targets, reg_granularity=reg_granularity, reg_ceiling=reg_ceiling,
                         update_reg_interval=update_reg_interval,
                         stabilize_interval=stabilize_interval)

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Add ``reg * p[P]`` to ``p.grad[P]``; call after ``backward()``, before ``optimizer.step()``."""
        if self.reg == 0.0:
            return
        for layer, bn, idx in self._resolved(model):
            for p in self._params(layer, bn):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.index_add_(0, idx, p.detach().index_select(0, idx), alpha=self.reg)

    @torch.no_grad()
    def penalty(self, model: nn.Module) -> float:
        """Current value of the penalty (for logging)."""
        total = 0.0
        for layer, bn, idx in self._resolved(model):
            for p in self._params(layer, bn):
                total += float(p.index_select(0, idx).double().square().sum())
        return 0.5 * self.reg * total


class TPP(_GrowingReg):
    """Trainability Preserving Pruning regularizer.

    Per target with weight ``W`` flattened to ``(out, in * prod(kernel))`` and Gram matrix
    ``G = W W^T`` of shape ``(out, out)``::

        L_opp = || G - T ||_F^2 / out^2,   T = G.detach() with rows P and columns P set to 0,

    (the mean squared entry, as in the TPP authors' implementation; ``lw_opp = 1000`` is calibrated
    for this normalisation, a plain sum diverges at usual learning rates),
    i.e. the sum of ``G_ij^2`` over entries with ``i`` or ``j`` pruned: it drives the pruned filters
    to zero (diagonal ``||w_i||^4``) and decorrelates them from the kept ones (off-diagonal).  The
    kept filters receive gradient only through those cross terms (a pull along pruned directions that
    vanishes with them); kept-kept entries carry no gradient.  Plus the growing L2 term
    ``reg / 2 * sum_{i in P} (gamma_i^2 + beta_i^2 + b_i^2)`` on the following BatchNorm (and the
    layer bias, if any).  ``loss = lw_opp * sum L_opp + L2``; add it to the task loss.
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, Target] | Iterable[Target], *,
                 lw_opp: float = 1000.0, reg_granularity: float = 1e-4, reg_ceiling: float = 1.0,
                 update_reg_interval: int = 10, stabilize_interval: int = 10000):
        super().__init__(model, targets, reg_granularity=reg_granularity, reg_ceiling=reg_ceiling,
                         update_reg_interval=update_reg_interval,
                         stabilize_interval=stabilize_interval)
        if lw_opp < 0:
            raise UserError(f"lw_opp must be >= 0, got {lw_opp}")
        self.lw_opp = float(lw_opp)

    def loss(self, model: nn.Module) -> torch.Tensor:
        """Differentiable regularization loss (a 0-dim tensor on the weights' device)."""
        opp, l2 = [], []
        for layer, bn, idx in self._resolved(model):
            w = layer.weight.flatten(1)  # (out, k)
            gram = w @ w.T                # (out, out)
            mask = torch.zeros(gram.shape[0], dtype=torch.bool, device=gram.device)
            mask[idx] = True
            cross = mask[:, None] | mask[None, :]  # entries with a pruned row or column
            # G - T is G on those entries and exactly 0 elsewhere (T = G.detach() there).
            opp.append(gram[cross].square().sum() / gram.numel())
            for p in self._params(layer, bn, with_weight=False):
                l2.append(p.index_select(0, idx).square().sum())
        if not opp:
            p = next(model.parameters())
            return p.new_zeros(())
        total = self.lw_opp * torch.stack(opp).sum()
        if l2 and self.reg:
            total = total + 0.5 * self.reg * torch.stack(l2).sum()
        return total
