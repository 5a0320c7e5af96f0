"""Regularization-based pruning: GReg-1 and TPP, as their authors' default code paths run them
(docs/science.md section 3; section 10 lists every option with the authors' names).

Both act on the *dense* model during a pruning phase, after the filters to prune were chosen and
before they are physically removed.  A penalty factor ``reg`` grows in steps of ``reg_granularity``
(Delta) every ``update_reg_interval`` (tau) iterations; once it reached its ceiling the penalty is held
("stabilization") for ``stabilize_interval`` iterations and the phase is done.  The two methods
follow their authors' two code bases, which differ in details (docs/science.md section 10 lists
them with the authors' option names):

GReg-1 (Regularization-Pruning, ``pruner/reg_pruner.py``, ``_greg_1``)
    At every iteration ``it`` with ``it % tau == 0`` (from ``it = 0`` on) each target layer's
    ``reg`` grows by Delta, so ``reg(it) = Delta * (it // tau + 1)``.  A layer stops growing after
    the update at which its ``reg`` exceeds the ceiling (strictly) or at which every layer's
    kept/pruned magnitude ratio (see :meth:`GReg.step`) is at least ``mag_ratio_limit``.  The
    penalty's gradient ``reg * w`` is added to the pruned filters' *weights* only.
TPP (TPP, ``pruner/opp_pruner.py``, ``--opp_scheme v5``)
    ``reg(it) = Delta * it / tau`` evaluated at the update iterations (``it % tau == 0``), i.e.
    ``Delta * (it // tau)``, starting at 0; growth stops at the update where ``reg >= ceiling``.
    The L2 gradient ``reg * p`` goes to the pruned filters' weight and bias and to the following
    BatchNorm's weight and bias; the Gram-matrix loss is weighted by ``lw_opp * reg`` (it ramps up
    with the penalty); during stabilization the pruned filters are zeroed layer by layer.

Stabilization starts at the iteration of the last update (``stabilize_start``) and the phase is
done after the iteration ``stabilize_start + stabilize_interval`` (``done`` is True from then on),
as in both authors' loops.  The schedule is kept in :meth:`state_dict` so a resumed run continues
it exactly.

Training loop::

    reg = TPP(model, targets)           # or GReg(...)
    for it, (x, y) in enumerate(loader):
        reg.step(it, model)              # update reg (before the forward, as the authors do)
        loss = criterion(model(x), y) + reg.loss(model)
        loss.backward()                  # (with AMP: scaler.unscale_(optimizer) first)
        reg.apply_(model)                # adds reg * p to the pruned filters' gradients
        optimizer.step(); optimizer.zero_grad()
        reg.after_step(model)            # TPP: layer-wise zeroing during stabilization
        if reg.done: break

``model`` is always the unwrapped module (not DDP / DeepSpeed); layer names are those of
``model.named_modules()``.

Over 400 lines on purpose: GReg and TPP share the schedule, target and state machinery, and each
follows its authors' code line by line; split apart, the two halves of one comparison would drift.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distributed_prune.errors import UserError

__all__ = ["Target", "GReg", "TPP", "phase_iterations", "check_phase"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EPS = 1e-9  # relative slack for float comparisons against the ceiling (1e-4 * 10000 == 1.0)


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


def _updates_to_ceiling(granularity: float, ceiling: float, strict: bool) -> int:
    """Smallest m >= 1 with ``m * granularity > ceiling`` (strict) or ``>= ceiling``."""
    m = max(1, math.floor(ceiling / granularity) - 1)
    while not (m * granularity > ceiling * (1 + _EPS) if strict else
               m * granularity >= ceiling * (1 - _EPS)):
        m += 1
    return m


def phase_iterations(method: str, *, reg_granularity: float, reg_ceiling: float,
                     update_reg_interval: int, stabilize_interval: int) -> int:
    """Iterations the regularization phase of ``method`` ("greg" or "tpp") runs when the penalty
    grows all the way to its ceiling (GReg's magnitude-ratio criterion can only end it sooner)."""
    if method == "greg":  # updates at it = 0, tau, ...; the m-th (it = (m-1) tau) exceeds the ceiling
        start = (_updates_to_ceiling(reg_granularity, reg_ceiling, True) - 1) * update_reg_interval
    elif method == "tpp":  # reg = Delta * it / tau reaches the ceiling at it = m tau
        start = _updates_to_ceiling(reg_granularity, reg_ceiling, False) * update_reg_interval
    else:
        raise ValueError(f"no regularization phase for method {method!r}")
    return start + stabilize_interval + 1


class _GrowingReg:
    """Target resolution, per-layer penalty state and the stabilization bookkeeping."""

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
        targets = list(targets.values() if isinstance(targets, Mapping) else targets)
        self._validate(model, targets)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        # the authors loop over layers in model order, which matters for GReg's finishing rule
        self.targets = sorted((t for t in targets if t.pruned), key=lambda t: order[t.layer_name])
        self.layer_regs = [0.0] * len(self.targets)
        self.finished: list[bool] = [False] * len(self.targets)
        self.stabilize_start: int | None = None if self.targets else 0
        self.iteration = -1
        # pruned-index tensors per device, built on first use and reused: a host-to-device copy
        # per iteration would make every step wait for the host
        self._index_cache: dict[torch.device, list[torch.Tensor]] = {}

    # ---------------------------------------------------------------- schedule
    @property
    def reg(self) -> float:
        """The current penalty factor (the largest over the layers)."""
        return max(self.layer_regs, default=0.0)

    @property
    def ceiling_iteration(self) -> int:
        """Iteration at which stabilization starts when the penalty grows to its ceiling."""
        return self.phase_iterations - self.stabilize_interval - 1

    @property
    def phase_iterations(self) -> int:
        return phase_iterations(self._method, reg_granularity=self.reg_granularity,
                                reg_ceiling=self.reg_ceiling,
                                update_reg_interval=self.update_reg_interval,
                                stabilize_interval=self.stabilize_interval)

    def reg_at(self, iteration: int) -> float:
        """Penalty factor at ``iteration`` when it grows all the way to the ceiling (GReg's
        magnitude-ratio criterion may stop it earlier; :attr:`reg` is the live value)."""
        start = self.ceiling_iteration
        it = min(max(0, int(iteration)), start)
        return self.reg_granularity * (it // self.update_reg_interval + self._first_update)

    def step(self, iteration: int, model: nn.Module | None = None) -> float:
        """Advance to ``iteration`` (0-based, one call per iteration, in order, before the
        forward): at update iterations the penalty grows.  Returns ``reg``."""
        iteration = int(iteration)
        if iteration != self.iteration + 1:
            raise ValueError(f"step({iteration}) after step({self.iteration}): iterations must be "
                             "consecutive (resume with load_state_dict)")
        self.iteration = iteration
        if self.stabilize_start is None and iteration % self.update_reg_interval == 0:
            self._update(iteration, model)
            if all(self.finished):
                self.stabilize_start = iteration
        return self.reg

    @property
    def stabilizing(self) -> bool:
        return self.stabilize_start is not None

    @property
    def done(self) -> bool:
        """True once the penalty was held for ``stabilize_interval`` iterations."""
        return (self.stabilize_start is not None
                and self.iteration - self.stabilize_start >= self.stabilize_interval)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "layer_regs": list(self.layer_regs),
                "finished": list(self.finished), "stabilize_start": self.stabilize_start}

    def load_state_dict(self, state: Mapping) -> None:
        if len(state["layer_regs"]) != len(self.targets):
            raise ValueError("regularizer state does not match the targets")
        self.iteration = int(state["iteration"])
        self.layer_regs = [float(r) for r in state["layer_regs"]]
        self.finished = [bool(f) for f in state["finished"]]
        s = state["stabilize_start"]
        self.stabilize_start = None if s is None else int(s)

    # ---------------------------------------------------------------- targets
    @staticmethod
    def _validate(model: nn.Module, targets: list[Target]) -> None:
        modules = dict(model.named_modules())
        for t in targets:
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

    def _indices(self, k: int, device: torch.device) -> torch.Tensor:
        """Target ``k``'s pruned output channels as an index tensor on ``device`` (cached)."""
        per_dev = self._index_cache.get(device)
        if per_dev is None:
            per_dev = self._index_cache[device] = [
                torch.as_tensor(sorted(int(i) for i in t.pruned), dtype=torch.long, device=device)
                for t in self.targets]
        return per_dev[k]

    def _resolved(self, model: nn.Module):
        """Yield (target index, layer, bn or None, pruned index tensor on the weight's device)."""
        # get_submodule per target, not a walk of every module: this runs several times a step
        for k, t in enumerate(self.targets):
            layer = model.get_submodule(t.layer_name)
            bn = model.get_submodule(t.bn_name) if t.bn_name is not None else None
            yield k, layer, bn, self._indices(k, layer.weight.device)

    def _l2_params(self, layer: nn.Module, bn: nn.Module | None) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Add ``reg * p[P]`` to ``p.grad[P]`` for the penalised parameters (after ``backward()``,
        before ``optimizer.step()``)."""
        for k, layer, bn, idx in self._resolved(model):
            reg = self.layer_regs[k]
            if reg == 0.0:
                continue
            for p in self._l2_params(layer, bn):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.index_add_(0, idx, p.detach().index_select(0, idx), alpha=reg)

    @torch.no_grad()
    def penalty(self, model: nn.Module) -> float:
        """Current value of the L2 penalty ``sum reg/2 * ||p[P]||^2`` (for logging)."""
        total = 0.0
        for k, layer, bn, idx in self._resolved(model):
            for p in self._l2_params(layer, bn):
                total += 0.5 * self.layer_regs[k] * float(p.index_select(0, idx).double().square().sum())
        return total

    def loss(self, model: nn.Module) -> torch.Tensor:
        """Extra loss term (none for GReg): a 0-dim tensor on the weights' device."""
        return next(model.parameters()).new_zeros(())

    def after_step(self, model: nn.Module) -> None:
        """Hook after ``optimizer.step()`` (nothing for GReg)."""


class GReg(_GrowingReg):
    """GReg-1: growing L2 regularization on the pruned filters (Regularization-Pruning defaults).

    ``bn_reg=True`` also penalises the following BatchNorm's weight and bias (a variant: the
    authors' GReg penalises the filter weights only; the BN term is TPP's).  ``mag_ratio_limit``:
    growth stops once every layer's momentum-averaged ratio mean|kept filter| / mean|pruned filter|
    reached it (authors: 1000); ``None`` disables the criterion (growth to the ceiling only).
    """
    _method = "greg"
    _first_update = 1  # the update at iteration 0 already adds Delta

    def __init__(self, model: nn.Module, targets: Mapping[str, Target] | Iterable[Target], *,
                 reg_granularity: float = 1e-4, reg_ceiling: float = 1.0,
                 update_reg_interval: int = 5, stabilize_interval: int = 40000,
                 mag_ratio_limit: float | None = 1000.0, bn_reg: bool = False):
        super().__init__(model, targets, reg_granularity=reg_granularity, reg_ceiling=reg_ceiling,
                         update_reg_interval=update_reg_interval,
                         stabilize_interval=stabilize_interval)
        if mag_ratio_limit is not None and not mag_ratio_limit > 0:
            raise UserError(f"mag_ratio_limit must be > 0 or null, got {mag_ratio_limit}")
        self.mag_ratio_limit = None if mag_ratio_limit is None else float(mag_ratio_limit)
        self.bn_reg = bool(bn_reg)
        self.increments = [0] * len(self.targets)
        self.hist_mag_ratio: dict[int, float] = {}

    def _l2_params(self, layer, bn):
        ps = [layer.weight] + ([bn.weight, bn.bias] if self.bn_reg and bn is not None else [])
        return [p for p in ps if isinstance(p, torch.Tensor)]

    @torch.no_grad()
    def _update(self, iteration: int, model: nn.Module | None) -> None:
        if self.mag_ratio_limit is not None and model is None:
            raise ValueError("GReg.step needs the model for the magnitude-ratio criterion")
        modules = dict(model.named_modules()) if model is not None else {}
        for k, t in enumerate(self.targets):
            if self.finished[k]:
                continue
            if self.mag_ratio_limit is not None:
                w_abs = modules[t.layer_name].weight.detach().flatten(1).abs().mean(1).double()
                keep = torch.ones_like(w_abs, dtype=torch.bool)
                keep[t.pruned] = False
                pruned_mean = float(w_abs[~keep].mean())
                ratio = float(w_abs[keep].mean()) / pruned_mean if pruned_mean > 0 else math.inf
                h = self.hist_mag_ratio.get(k)
                self.hist_mag_ratio[k] = ratio if h is None else 0.9 * h + 0.1 * ratio
            self.increments[k] += 1
            self.layer_regs[k] = self.increments[k] * self.reg_granularity
            mags_done = (self.mag_ratio_limit is not None
                         and all(h >= self.mag_ratio_limit for h in self.hist_mag_ratio.values()))
            if mags_done or self.layer_regs[k] > self.reg_ceiling * (1 + _EPS):
                self.finished[k] = True

    def state_dict(self) -> dict:
        return {**super().state_dict(), "increments": list(self.increments),
                "hist_mag_ratio": {str(k): v for k, v in self.hist_mag_ratio.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.increments = [int(i) for i in state["increments"]]
        self.hist_mag_ratio = {int(k): float(v) for k, v in state["hist_mag_ratio"].items()}


class TPP(_GrowingReg):
    """Trainability Preserving Pruning regularizer (TPP defaults, ``--opp_scheme v5``).

    Per target with weight ``W`` flattened to ``(out, in * prod(kernel))`` and Gram matrix
    ``G = W W^T``::

        L_opp = mean((G - T)^2),   T = G.detach() with rows P and columns P set to 0,

    i.e. ``sum of G_ij^2 over entries with i or j pruned / out^2`` (``F.mse_loss``): it drives the
    pruned filters to zero (diagonal ``||w_i||^4``) and decorrelates them from the kept ones;
    kept-kept entries carry no gradient.  ``loss = lw_opp * reg * sum_layers L_opp`` with
    ``lw_opp_schedule="reg"`` (the authors' scheme: the weight ramps up with the penalty) or
    ``lw_opp * sum L_opp`` from the first iteration with ``"constant"``.

    :meth:`apply_` adds the L2 gradient ``reg * p[P]`` to the pruned filters' weight and bias
    (``weight_reg``) and to the following BatchNorm's weight and bias (``bn_reg``).
    :meth:`after_step`: during stabilization, ``zero_out_interval * (j + 1)`` iterations after it
    started, the pruned filters of the j-th Conv/Linear layer of the model (0-based, in module
    order) and their BatchNorm weight and bias are set to zero, and kept at zero from then on
    (``zero_out_interval=0`` disables it).
    """
    _method = "tpp"
    _first_update = 0  # reg = Delta * it / tau, 0 at iteration 0

    def __init__(self, model: nn.Module, targets: Mapping[str, Target] | Iterable[Target], *,
                 lw_opp: float = 1000.0, reg_granularity: float = 1e-4, reg_ceiling: float = 1.0,
                 update_reg_interval: int = 5, stabilize_interval: int = 40000,
                 lw_opp_schedule: str = "reg", weight_reg: bool = True, bn_reg: bool = True,
                 zero_out_interval: int = 100):
        super().__init__(model, targets, reg_granularity=reg_granularity, reg_ceiling=reg_ceiling,
                         update_reg_interval=update_reg_interval,
                         stabilize_interval=stabilize_interval)
        if lw_opp < 0:
            raise UserError(f"lw_opp must be >= 0, got {lw_opp}")
        if lw_opp_schedule not in ("reg", "constant"):
            raise UserError(f"lw_opp_schedule must be 'reg' or 'constant', got {lw_opp_schedule!r}")
        if zero_out_interval < 0:
            raise UserError(f"zero_out_interval must be >= 0, got {zero_out_interval}")
        self.lw_opp = float(lw_opp)
        self.lw_opp_schedule = lw_opp_schedule
        self.weight_reg, self.bn_reg = bool(weight_reg), bool(bn_reg)
        self.zero_out_interval = int(zero_out_interval)
        layers = [n for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]
        self.layer_index = {n: i for i, n in enumerate(layers)}
        need = self.zero_out_interval * len(layers)
        if self.targets and self.stabilize_interval < need:
            raise UserError(f"prune.reg.stabilize_interval={self.stabilize_interval} is shorter than "
                            f"zero_out_interval * layers = {self.zero_out_interval} * {len(layers)} = "
                            f"{need} (TPP zeroes one layer per zero_out_interval during stabilization)")

    @property
    def opp_weight(self) -> float:
        """The Gram-loss weight at the current iteration."""
        return self.lw_opp * (self.reg if self.lw_opp_schedule == "reg" else 1.0)

    def _l2_params(self, layer, bn):
        ps = ([layer.weight, layer.bias] if self.weight_reg else []) + (
            [bn.weight, bn.bias] if self.bn_reg and bn is not None else [])
        return [p for p in ps if isinstance(p, torch.Tensor)]

    def _update(self, iteration: int, model: nn.Module | None) -> None:
        reg = self.reg_granularity * iteration / self.update_reg_interval
        for k in range(len(self.targets)):
            self.layer_regs[k] = reg
            self.finished[k] = reg >= self.reg_ceiling * (1 - _EPS)

    def loss(self, model: nn.Module) -> torch.Tensor:
        """``opp_weight * sum L_opp``: differentiable, a 0-dim tensor on the weights' device."""
        w_opp = self.opp_weight
        if not self.targets or w_opp == 0.0:
            return next(model.parameters()).new_zeros(())
        opp = []
        for _, layer, _, idx in self._resolved(model):
            w = layer.weight.flatten(1)  # (out, k)
            gram = w @ w.T
            target = gram.detach().clone()
            target[idx, :] = 0
            target[:, idx] = 0
            opp.append(F.mse_loss(gram, target, reduction="mean"))
        return w_opp * torch.stack(opp).sum()

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if self.stabilize_start is None or self.zero_out_interval == 0:
            return
        since = self.iteration - self.stabilize_start
        for k, layer, bn, idx in self._resolved(model):
            j = self.layer_index[self.targets[k].layer_name]
            if since >= (j + 1) * self.zero_out_interval:
                layer.weight.index_fill_(0, idx, 0.0)
                if bn is not None:
                    bn.weight.index_fill_(0, idx, 0.0)
                    bn.bias.index_fill_(0, idx, 0.0)


def check_phase(method: str, *, epochs: int, iters_per_epoch: int, reg_granularity: float,
                reg_ceiling: float, update_reg_interval: int, stabilize_interval: int) -> int:
    """Refuse (UserError, one line with the numbers) a regularization phase of ``epochs`` epochs
    of ``iters_per_epoch`` iterations too short for the penalty to reach its ceiling and stay
    there ``stabilize_interval`` iterations.  Returns the iterations the phase needs."""
    need = phase_iterations(method, reg_granularity=reg_granularity, reg_ceiling=reg_ceiling,
                            update_reg_interval=update_reg_interval,
                            stabilize_interval=stabilize_interval)
    have = int(epochs) * int(iters_per_epoch)
    if have < need:
        start = need - stabilize_interval - 1
        raise UserError(
            f"prune.epochs={epochs} gives {have} iterations ({iters_per_epoch} per epoch) but "
            f"{method} needs {need}: reg reaches its ceiling {reg_ceiling:g} at iteration {start} "
            f"(granularity {reg_granularity:g} every {update_reg_interval}) and then stabilizes "
            f"{stabilize_interval}; set prune.epochs >= {-(-need // int(iters_per_epoch))}")
    return need

