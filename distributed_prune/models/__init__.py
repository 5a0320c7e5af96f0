"""Model registry.

``create(name, num_classes=...)`` builds any registered model; ``list_models()`` lists the
project's own models (:data:`MODELS`) plus every torchvision classification model.

Register a new model with::

    @register("my_net")
    def my_net(num_classes=10, **kw): ...
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from ..errors import UserError
from ..registry import Registry
from .cifar_resnet import resnet20, resnet32, resnet56, resnet110
from .lenet import lenet5
from .mlp import mlp_7_linear, mlp_7_relu
from .vgg import vgg19_c, vgg_tiny

#: The project's own models: name -> factory ``fn(num_classes=..., **kw) -> nn.Module``.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "model.name")
for _factory in (resnet20, resnet32, resnet56, resnet110, lenet5, mlp_7_linear, mlp_7_relu,
                 vgg19_c, vgg_tiny):
    MODELS.add(_factory.__name__, _factory)
del _factory

register = MODELS.register


def list_models(include_torchvision: bool = True) -> list[str]:
    names = set(MODELS)
    if include_torchvision:
        from .tv import torchvision_classifiers

        names |= set(torchvision_classifiers())
    return sorted(names)


def create(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (random init, never downloaded weights)."""
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, **kwargs)
    from .tv import build_torchvision, torchvision_classifiers

    if name in torchvision_classifiers():
        return build_torchvision(name, num_classes=num_classes, **kwargs)
    raise UserError(f"model.name: unknown model {name!r} (see `dprune models` for the list)")


def create_for_input(name: str, num_classes: int, input_shape, **kwargs) -> nn.Module:
    """:func:`create` for samples of ``input_shape``: a registered factory that takes
    ``in_features`` (1-D samples) or ``in_channels`` (C, H, W samples) gets it from the shape
    unless ``kwargs`` sets it."""
    fn = MODELS.get(name)
    params = set(inspect.signature(fn).parameters) if fn else set()
    kw = dict(kwargs)
    if "in_features" in params and len(input_shape) == 1:
        kw.setdefault("in_features", input_shape[0])
    if "in_channels" in params and len(input_shape) == 3:
        kw.setdefault("in_channels", input_shape[0])
    return create(name, num_classes=num_classes, **kw)
