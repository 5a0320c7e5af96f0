"""Compact execution of a gradual masked phase: train the physically cut model of the current
masks, and fold it back into the full model at each mask update.

With hard masks, between two updates the masked model computes what the cut model computes
(outputs, and the gradients of the active weights), and SGD / momentum / weight decay move the
active entries the same way, so the phase can run at the pruned model's speed: no full-width
activations, no hooks re-zeroing weights, no per-step scatter.  :class:`CompactEngine` has the
engine API of :class:`~.engine.DDPEngine` (it wraps one, built on the cut model) and:

* its ``step_hook`` takes the place of the phase's own: when an update is due (after backward,
  before the optimizer step, as in masked execution) it folds the cut model's weights, buffers,
  gradients and optimizer state into the full shape, lets the phase rescore ALL layers on the
  full model (one ``filter_norms`` call, masks hash-checked across ranks), and when the masks
  changed cuts the new model and builds a new engine and optimizer on it, with the gradients and
  the optimizer state sliced from the full-shaped ones; the optimizer step then runs on it;
* ``state_dict`` is the full-shaped optimizer state and ``full_module()`` the full model with
  the current weights (masked entries zero): checkpoints and resume keep the contract of masked
  execution (a checkpoint of either resumes in either).

Nothing here reads device memory from the host between updates.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..prune.compact import CompactCut

__all__ = ["CompactEngine"]


class CompactEngine:
    """Engine over the cut model of ``phase``'s masks; ``full`` is the model the phase scores.
    ``build(model) -> engine`` builds a DDP-style engine (with its optimizer) on a cut model."""

    def __init__(self, full: nn.Module, phase, build: Callable[[nn.Module], object]):
        self.full, self.phase, self._build = full, phase, build
        self.inner = None
        self.rebuilds = 0
        self._recut(None, None, None)

    # ------------------------------------------------------------------ the wrapped engine
    @property
    def model(self):
        return self.inner.model

    @property
    def module(self) -> nn.Module:
        """The cut model being trained (evaluated at epoch ends: it computes what the masked
        model computes)."""
        return self.inner.module

    @property
    def device(self):
        return self.inner.device

    @property
    def optimizer(self):
        return self.inner.optimizer

    @property
    def param_groups(self):
        return self.inner.param_groups

    def autocast(self):
        return self.inner.autocast()

    def no_sync(self, skip: bool):
        return self.inner.no_sync(skip)

    def backward(self, loss):
        self.inner.backward(loss)

    def unscale(self):
        self.inner.unscale()

    def step(self):
        self.inner.step()

    def sync_buffers(self):
        self.inner.sync_buffers()

    # ------------------------------------------------------------------ full shape
    def full_module(self) -> nn.Module:
        """The full model holding the current weights and buffers (masked entries zero)."""
        self.cut.fold(self.inner.module)
        return self.full

    def finish(self) -> nn.Module:
        small = self.inner.finish()
        self.cut.fold(small)
        self.inner = None
        return self.full

    def state_dict(self) -> dict:
        return {"optimizer": self._full_optimizer_state(), "scaler": self.inner.scaler.state_dict()}

    def load_state_dict(self, state: dict):
        self.inner.load_state_dict({"optimizer": self._cut_optimizer_state(state["optimizer"]),
                                    "scaler": state.get("scaler")})

    # ------------------------------------------------------------------ mask updates
    def step_hook(self, _module, iteration: int) -> None:
        """The phase's update at ``iteration`` (after backward, before the optimizer step)."""
        phase = self.phase
        if not phase.pending(iteration):
            phase.iteration = int(iteration)
            return
        small = self.inner.module
        self.cut.fold(small)                    # the phase scores the current weights
        before = {r: list(v) for r, v in phase.pruned.items()}
        phase.step(self.full, iteration)
        if phase.pruned == before:
            return                              # same masks: the same cut model goes on
        # the old cut model and optimizer are untouched by the update: their gradients and state,
        # in the full shape, seed the new ones
        grads = {n: self.cut.put(n, p.grad) for n, p in small.named_parameters()
                 if p.grad is not None}
        self._recut(self._full_optimizer_state(), grads, self.inner.scaler)

    def _recut(self, opt_state, grads, scaler) -> None:
        training = self.inner.module.training if self.inner is not None else self.full.training
        self.inner = None                       # the old engine's wrapper and reducer go
        self.cut = CompactCut(self.full, self.phase)
        small = self.cut.cut().train(training)
        self.inner = self._build(small)
        self.rebuilds += 1
        if scaler is not None:
            self.inner.scaler = scaler          # its scale and growth tracker go on
        if opt_state is not None:
            self.inner.optimizer.load_state_dict(self._cut_optimizer_state(opt_state))
        if grads:
            # the gradients were unscaled for the old optimizer; the new one's step unscales
            # them again (fp16 only: the scale is a power of two, so this is exact)
            scale = self.inner.scaler.get_scale() if self.inner.scaler.is_enabled() else None
            with torch.no_grad():
                for n, p in self.inner.module.named_parameters():
                    g = grads.get(n)
                    if g is not None:
                        g = self.cut.take(n, g)
                        p.grad = g * scale if scale is not None else g

    def _names(self) -> list[str]:
        """Parameter names in the optimizer's order (the indices of its state_dict): the same
        for the cut and the full model, whose parameters differ only in size."""
        names = {id(p): n for n, p in self.inner.module.named_parameters()}
        return [names[id(p)] for g in self.inner.optimizer.param_groups for p in g["params"]]

    def _full_optimizer_state(self) -> dict:
        sd = self.inner.optimizer.state_dict()
        names = self._names()
        shapes = {n: p.shape for n, p in self.inner.module.named_parameters()}
        return {**sd, "state": {i: {k: self.cut.put(names[i], v)
                                    if _per_entry(v, shapes[names[i]]) and self.cut.cuts(names[i])
                                    else v for k, v in st.items()}
                                for i, st in sd["state"].items()}}

    def _cut_optimizer_state(self, sd: dict) -> dict:
        names = self._names()
        shapes = self.cut.shapes
        return {**sd, "state": {i: {k: self.cut.take(names[int(i)], v)
                                    if names[int(i)] in shapes
                                    and _per_entry(v, shapes[names[int(i)]]) else v
                                    for k, v in st.items()}
                                for i, st in sd["state"].items()}}


def _per_entry(v, shape) -> bool:
    """A state tensor with one entry per parameter entry (momentum, Adam moments)."""
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == shape
