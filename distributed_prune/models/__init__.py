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


def check_kwargs(name: str, kwargs: dict) -> None:
    """Raise :class:`UserError` (naming ``model.kwargs``) when model ``name``'s factory does not
    take one of ``kwargs``, or when they set ``num_classes`` (``model.num_classes`` does).

    The project's own factories are checked against their signatures. torchvision builders take
    ``**kwargs`` and hand them to the model class, so those are checked when the model is built
    (:func:`create` turns the TypeError into the same kind of one-line error)."""
    if "num_classes" in kwargs:
        raise UserError("model.kwargs: num_classes is set by model.num_classes (or the dataset), not here")
    _load_builtin()
    fn = _REGISTRY.get(name)
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


def create(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (random init, never downloaded weights)."""
    _load_builtin()
    if name in _REGISTRY:
        check_kwargs(name, kwargs)
        return _REGISTRY[name](num_classes=num_classes, **kwargs)
    from .tv import build_torchvision, torchvision_classifiers

    if name in torchvision_classifiers():
        return build_torchvision(name, num_classes=num_classes, **kwargs)
    raise UserError(f"model.name: unknown model {name!r} (see `dprune models` for the list)")
