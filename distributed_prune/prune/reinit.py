"""Re-initialisation of a pruned model before retraining: ``none``, ``orthp``, ``scratch``.

docs/science.md section 3: pruning damages dynamical isometry; OrthP restores it for linear networks by
replacing every weight with the nearest-in-spirit orthogonal matrix.  ``scratch`` re-initialises the
pruned (already small, dense) architecture for Scratch-E / Scratch-B baselines.

Usage::

    from distributed_prune.prune.reinit import reinit
    model = reinit("orthp", pruned_model, activation="relu")

New methods register themselves with ``@register_reinit("name")``; a method is
``fn(model, *, activation, **options) -> model``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .. import models
from ..errors import UserError
from ..registry import Registry

__all__ = ["REINITS", "register_reinit", "reinit", "activation_gain", "orthogonalize_"]

ReinitFn = Callable[..., nn.Module]
REINITS: Registry[ReinitFn] = Registry("reinit method", "prune.reinit")

# Layers whose weight OrthP orthogonalises (subclasses included).
_ORTH_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def register_reinit(name: str) -> Callable[[ReinitFn], ReinitFn]:
    """Decorator adding ``fn(model, *, activation) -> model`` to ``REINITS`` under ``name``."""
    return REINITS.register(name)


def reinit(name: str, model: nn.Module, *, activation: str = "relu", **kwargs) -> nn.Module:
    """Apply the registered re-initialisation ``name`` to ``model`` and return the result
    (``model`` itself, changed in place, except for ``scratch`` with ``fresh=``, which returns
    the freshly built model).  ``kwargs`` go to the method (``scratch``: ``fresh``).

    Raises:
        UserError: unknown ``name`` (the message lists the valid ones) or unknown ``activation``.
    """
    return REINITS.lookup(name)(model, activation=activation, **kwargs)


def activation_gain(activation: str) -> float:
    """Gain of the nonlinearity that follows a layer: 1 for ``linear``/``identity``, sqrt(2) for
    ``relu``; other names as ``torch.nn.init.calculate_gain`` (``tanh``, ``sigmoid``, ...)."""
    if activation in ("linear", "identity"):
        return 1.0
    if activation == "relu":
        return math.sqrt(2.0)
    try:
        return float(nn.init.calculate_gain(activation))
    except ValueError:
        raise UserError(f"unknown activation {activation!r} for reinit; use linear, identity, relu, "
                        "leaky_relu, tanh, sigmoid or selu") from None


@torch.no_grad()
def orthogonalize_(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Replace ``weight`` in place by ``gain * Q * sign(diag(R))`` of the QR of its flattened form.

    ``weight`` of shape ``(out, *rest)`` is viewed as ``W`` of shape ``(out, prod(rest))``; if
    ``out < prod(rest)`` (wide) ``W^T`` is factorised instead, so the result has orthonormal rows
    (``W W^T = gain^2 I``) when wide and orthonormal columns (``W^T W = gain^2 I``) when tall.
    The sign correction makes the factorisation unique (and equal to ``W`` if ``W`` already was
    orthogonal).  Computed in float64, written back in the weight's dtype.
    """
    w = weight.detach().reshape(weight.shape[0], -1).double()
    wide = w.shape[0] < w.shape[1]
    if wide:
        w = w.T
    q, r = torch.linalg.qr(w)  # reduced: q (rows, cols) with rows >= cols
    d = torch.diagonal(r).sign()
    q = q * torch.where(d == 0, torch.ones_like(d), d)  # scale column j by sign(R_jj)
    if wide:
        q = q.T
    weight.copy_((gain * q).reshape(weight.shape).to(weight.dtype))
    return weight


@register_reinit("none")
def _none(model: nn.Module, *, activation: str = "relu") -> nn.Module:
    """Keep the inherited weights."""
    return model


@register_reinit("orthp")
def _orthp(model: nn.Module, *, activation: str = "relu") -> nn.Module:
    """OrthP: orthogonalise every Conv1d/2d/3d and Linear weight (``orthogonalize_``) times the
    activation gain; biases, BatchNorm and all other parameters are left as they are."""
    gain = activation_gain(activation)
    for m in model.modules():
        if isinstance(m, _ORTH_LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor):
            orthogonalize_(m.weight, gain)
    return model


@register_reinit("scratch")
def _scratch(model: nn.Module, *, activation: str = "relu",
             fresh: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Scratch-E / Scratch-B: the pruned architecture initialised as the small dense model it is.

    ``fresh()`` builds the pruned architecture anew (the pipeline passes
    ``prune.replay(models.create(...), plan)``): its parameters must have the shapes of
    ``model``'s; it is returned and ``model`` is left as it is.  Without ``fresh`` ``model`` itself
    is re-initialised in place.  Either way every parameter is drawn again from the global torch
    RNG at the pruned shapes, because default inits depend on them (Kaiming std =
    gain / sqrt(fan)): ``reset_parameters()`` on every submodule (PyTorch's per-layer defaults,
    BN running statistics cleared), then the model's own constructor rule
    (``models.init_weights``: e.g. Kaiming-normal fan_out convolutions for the ResNets).
    A slice of a dense init would carry the dense fans; nothing of that or of ``model`` is kept.
    """
    target = model
    if fresh is not None:
        target = fresh()
        old = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        if old != got:
            bad = next((k for k in old.keys() | got.keys() if old.get(k) != got.get(k)), None)
            raise ValueError(f"scratch: the fresh model does not match the pruned one at {bad!r} "
                             f"({got.get(bad)} vs {old.get(bad)})")
    with torch.no_grad():
        return models.init_weights(target, reset=True)
