"""Model registry.

``create(name, num_classes=...)`` builds any registered model; ``init_weights(model)`` re-runs its
constructor initialization at its current (e.g. pruned) shapes; ``list_models()`` lists the
project's own models (:data:`MODELS`) plus every torchvision classification model;
``create(name, weights="IMAGENET1K_V1")`` loads torchvision's pretrained weights.

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
from .inits import init_weights
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


def check_kwargs(name: str, kwargs: dict) -> None:
    """Raise :class:`UserError` (naming ``model.kwargs``) when model ``name``'s factory does not
    take one of ``kwargs``, or when they set ``num_classes`` (``model.num_classes`` does).

    The project's own factories are checked against their signatures. torchvision builders take
    ``**kwargs`` and hand them to the model class, so those are checked when the model is built
    (:func:`create` turns the TypeError into the same kind of one-line error)."""
    if "num_classes" in kwargs:
        raise UserError("model.kwargs: num_classes is set by model.num_classes (or the dataset), not here")
    fn = MODELS.get(name)
    if fn is None:
        return
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in takes:
            others = ", ".join(t for t in takes if t != "num_classes") or "none"
            raise UserError(f"model.kwargs: model {name!r} takes no argument {key!r} (it takes: {others})")


def create(name: str, num_classes: int | None = None, *, weights: str | None = None,
           new_head: bool = False, **kwargs) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (default 10; with ``weights``, the
    weights' classes).

    ``weights=None``: random init, nothing downloaded. ``weights="IMAGENET1K_V1"`` (any name of
    torchvision's weights enum for that model, or ``"DEFAULT"``): torchvision's pretrained
    weights from the torch.hub cache, downloaded once when missing; a ``num_classes`` that
    differs from the weights' classes needs ``new_head=True`` (see :mod:`.pretrained`).
    """
    if weights is not None:
        from .pretrained import create_pretrained

        return create_pretrained(name, weights, num_classes=num_classes, new_head=new_head, **kwargs)
    num_classes = 10 if num_classes is None else num_classes
    if name in MODELS:
        check_kwargs(name, kwargs)
        return MODELS[name](num_classes=num_classes, **kwargs)
    from .tv import build_torchvision, torchvision_classifiers

    if name in torchvision_classifiers():
        return build_torchvision(name, num_classes=num_classes, **kwargs)
    raise UserError(f"model.name: unknown model {name!r} (see `dprune models` for the list)")


def create_for_input(name: str, num_classes: int | None, input_shape, **kwargs) -> nn.Module:
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
