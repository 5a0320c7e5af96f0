"""Re-run a model's constructor initialization on an instance, at its current (e.g. pruned) shapes.

Default inits depend on tensor shapes (Kaiming std = gain / sqrt(fan)), so a pruned model trained
from scratch must be initialised as the small dense model it is, not sliced from a dense init.
``init_weights(model)`` calls ``model.init_weights()`` when the model has one (the project's own
models do); torchvision classifiers get the rule their family's constructor applies, looked up
by class (``_tv_rules``); any other model gets only PyTorch's per-layer defaults, with a warning.

The rules only touch the layers their constructor touches; ``reset=True`` first runs
``reset_parameters()`` on every submodule so that the others are fresh too (``prune.reinit``'s
``scratch`` does that).
"""
from __future__ import annotations

import warnings
from typing import Callable

from torch import nn

__all__ = ["init_weights", "DefaultInit"]


class DefaultInit:
    """Mixin for models whose constructor keeps PyTorch's per-layer defaults: ``init_weights``
    redraws them at the current shapes. The constructor does not call it: its layers were just
    drawn by that same rule, and a second draw would only shift the RNG stream of seeded runs."""

    def init_weights(self):
        for m in self.modules():
            if m is not self and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()

_NORMS = (nn.BatchNorm2d, nn.GroupNorm)


def _norm_one_zero(m: nn.Module) -> None:
    if getattr(m, "weight", None) is not None:
        nn.init.ones_(m.weight)
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)


def _zero_bias(m: nn.Module) -> None:
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)


def _resnet(model: nn.Module) -> None:
    """ResNet / ResNeXt / Wide ResNet: Kaiming-normal (fan_out, relu) convs, norms 1/0, fc default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, _NORMS):
            _norm_one_zero(m)


def _zeroed_residual_bns(model: nn.Module) -> list[nn.Module]:
    """The last BN of every torchvision residual block when all their weights are zero, else [].
    ``zero_init_residual=True`` leaves no other trace on the module, and on a freshly built
    model only that constructor option produces this, so it is read off the instance."""
    if not type(model).__module__.startswith("torchvision."):
        return []
    from torchvision.models.resnet import BasicBlock, Bottleneck

    last = [b.bn3 if isinstance(b, Bottleneck) else b.bn2
            for b in model.modules() if isinstance(b, (BasicBlock, Bottleneck))]
    zeroed = bool(last) and all(bn.weight is not None and not bn.weight.any() for bn in last)
    return last if zeroed else []


def _reset_all(model: nn.Module) -> None:
    for m in model.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()


def _vgg_mobilenet(model: nn.Module) -> None:
    """VGG, MobileNetV2/V3: Kaiming-normal fan_out convs (gain sqrt(2)), zero conv bias,
    norms 1/0, linear N(0, 0.01) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            _zero_bias(m)
        elif isinstance(m, _NORMS):
            _norm_one_zero(m)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            _zero_bias(m)


def _densenet(model: nn.Module) -> None:
    """DenseNet: Kaiming-normal fan_in convs (gain sqrt(2)), BN 1/0, linear default weight, zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            _norm_one_zero(m)
        elif isinstance(m, nn.Linear):
            _zero_bias(m)


def _tv_rules() -> list[tuple[type, Callable[[nn.Module], None]]]:
    # imported here: torchvision is heavy and only needed for its own models
    from torchvision.models import VGG, DenseNet, MobileNetV2, MobileNetV3, ResNet

    return [(ResNet, _resnet), (VGG, _vgg_mobilenet), (MobileNetV2, _vgg_mobilenet),
            (MobileNetV3, _vgg_mobilenet), (DenseNet, _densenet)]


def init_weights(model: nn.Module, *, reset: bool = False) -> nn.Module:
    """Apply ``model``'s constructor initialization again, with fans from its current shapes.

    ``reset=True`` first runs ``reset_parameters()`` on every submodule (PyTorch's per-layer
    defaults, also at the current shapes), so that the layers the rule leaves alone are fresh too.
    Then ``model.init_weights()`` when defined; else the torchvision family's rule (ResNet,
    ResNeXt, Wide ResNet, VGG, MobileNetV2/V3, DenseNet; a zero-init residual seen on the
    instance is kept); else only PyTorch's per-layer defaults (``reset_parameters()`` on every
    submodule, whatever ``reset``) and a one-line warning naming the model's class.
    Returns ``model``, changed in place."""
    zero_bns = _zeroed_residual_bns(model)  # before the reset erases the trace
    if reset:
        _reset_all(model)
    own = getattr(model, "init_weights", None)
    if callable(own):
        own()
        return model
    if type(model).__module__.startswith("torchvision."):
        for cls, rule in _tv_rules():
            if isinstance(model, cls):
                rule(model)
                for bn in zero_bns:
                    nn.init.zeros_(bn.weight)
                return model
    # parameters held by a module without reset_parameters (e.g. ViT's class token) are not
    # redrawn: they keep what the instance has, which the warning must say
    kept = [f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules()
            if not callable(getattr(m, "reset_parameters", None))
            for pn, _ in m.named_parameters(recurse=False)]
    also = f"; {len(kept)} parameter(s) without one keep their values (first: {kept[0]})" if kept else ""
    warnings.warn(f"init_weights: no constructor init rule for model family {type(model).__name__}; "
                  f"using PyTorch's per-layer defaults (reset_parameters){also}", stacklevel=2)
    if not reset:
        _reset_all(model)
    return model
