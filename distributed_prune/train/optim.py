"""Optimizer construction: weight decay by tensor rank, fused/foreach kernels where available.

Weight decay applies to tensors with ``p.dim() >= 2`` (conv and linear weights) and not to
biases or BatchNorm scales/shifts (``p.dim() < 2``), whatever the parameters are called; this
stays right after channel surgery renames nothing but changes every shape.
"""
from __future__ import annotations

import inspect
from typing import Iterable

import torch
from torch import nn

from distributed_prune.errors import UserError

__all__ = ["OPTIMIZERS", "build_optimizer", "param_groups_by_rank"]

OPTIMIZERS = ("sgd", "adamw")


def param_groups_by_rank(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Two groups: ``decay`` (dim >= 2, ``weight_decay``) then ``no_decay`` (dim < 2, 0.0).

    Parameters with ``requires_grad=False`` and repeated (tied) parameters are left out.  Both
    groups are always present (possibly empty) so group indices are stable across runs.
    """
    decay, no_decay, seen = [], [], set()
    for p in params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def _supports(cls, arg: str) -> bool:
    return arg in inspect.signature(cls.__init__).parameters


def build_optimizer(model: "nn.Module | Iterable[nn.Parameter]", *, name: str = "sgd", lr: float,
                    momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999), foreach: bool | None = None,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """Build ``sgd`` (momentum, optional Nesterov) or ``adamw`` over the model's trainable params.

    Param groups are those of :func:`param_groups_by_rank` (``param_groups[0]`` decays,
    ``param_groups[1]`` does not). ``fused=None`` picks the fused kernel when every parameter is
    a floating CUDA tensor and this torch's optimizer accepts ``fused``; otherwise ``foreach``
    is passed through (``None`` lets torch choose: multi-tensor on CUDA, a loop on CPU).
    ``momentum`` and ``nesterov`` apply to SGD only, ``betas`` to AdamW only.
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if lr < 0 or weight_decay < 0:
        raise UserError(f"optimizer lr ({lr}) and weight_decay ({weight_decay}) must be >= 0")
    params = model.parameters() if isinstance(model, nn.Module) else model
    groups = param_groups_by_rank(params, weight_decay)
    flat = groups[0]["params"] + groups[1]["params"]
    if not flat:
        raise UserError("the model has no trainable parameters to optimize")

    cls = torch.optim.SGD if key == "sgd" else torch.optim.AdamW
    if fused is None:
        fused = (_supports(cls, "fused")
                 and all(p.is_cuda and p.is_floating_point() for p in flat))
    kwargs: dict = {"lr": lr}
    if fused:
        kwargs["fused"] = True  # fused and foreach are mutually exclusive in torch
    else:
        kwargs["foreach"] = foreach
    if key == "sgd":
        if nesterov and momentum <= 0:
            raise UserError(f"optimizer nesterov=True needs momentum > 0, got {momentum}")
        kwargs.update(momentum=momentum, nesterov=nesterov)
    else:
        kwargs.update(betas=tuple(betas))
    return cls(groups, **kwargs)
