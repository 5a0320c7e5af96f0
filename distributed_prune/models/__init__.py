"""Model registry.

``create(name, num_classes=...)`` builds any registered model; ``list_models()`` lists the
project's own models plus every torchvision classification model (registered on demand).

Register a new model with::

    @register("my_net")
    def my_net(num_classes=10, **kw): ...
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from ..errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator adding a model factory ``fn(num_classes=..., **kw) -> nn.Module`` to the registry."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_builtin():
    # Importing the modules runs their @register decorators (once).
    from . import cifar_resnet, lenet, mlp, tv, vgg  # noqa: F401


def list_models(include_torchvision: bool = True) -> list[str]:
    _load_builtin()
    names = set(_REGISTRY)
    if include_torchvision:
        from .tv import torchvision_classifiers

        names |= set(torchvision_classifiers())
    return sorted(names)


def create(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (random init, never downloaded weights)."""
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, **kwargs)
    from .tv import build_torchvision, torchvision_classifiers

    if name in torchvision_classifiers():
        return build_torchvision(name, num_classes=num_classes, **kwargs)
    raise UserError(f"model.name: unknown model {name!r} (see `dprune models` for the list)")


def create_for_input(name: str, num_classes: int, input_shape, **kwargs) -> nn.Module:
    """:func:`create` for samples of ``input_shape``: a registered factory that takes
    ``in_features`` (1-D samples) or ``in_channels`` (C, H, W samples) gets it from the shape
    unless ``kwargs`` sets it."""
    _load_builtin()
    fn = _REGISTRY.get(name)
    params = set(inspect.signature(fn).parameters) if fn else set()
    kw = dict(kwargs)
    if "in_features" in params and len(input_shape) == 1:
        kw.setdefault("in_features", input_shape[0])
    if "in_channels" in params and len(input_shape) == 3:
        kw.setdefault("in_channels", input_shape[0])
    return create(name, num_classes=num_classes, **kw)
