"""Pure-PyTorch reference implementations: the ground truth every other backend is tested against.

They are deliberately simple (a Python loop over layers, a dense convolution with masked weights);
the Triton and native backends must agree with them to within per-dtype tolerances.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["filter_norms", "masked_conv2d"]


def _check_norm_args(weights: Sequence[torch.Tensor], p: int,
                     grads: Sequence[torch.Tensor] | None) -> None:
    if grads is None and p not in (1, 2):
        raise ValueError(f"filter_norms: p must be 1 or 2, got {p!r}")
    for i, w in enumerate(weights):
        if w.dim() < 1:
            raise ValueError(f"filter_norms: weights[{i}] is a scalar; need at least one dim")
    if grads is not None:
        if len(grads) != len(weights):
            raise ValueError(f"filter_norms: {len(grads)} grads for {len(weights)} weights")
        for i, (w, g) in enumerate(zip(weights, grads)):
            if g.shape != w.shape:
                raise ValueError(f"filter_norms: grads[{i}] shape {tuple(g.shape)} != "
                                 f"weights[{i}] shape {tuple(w.shape)}")


def filter_norms(weights: Sequence[torch.Tensor], p: int,
                 grads: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One fp32 score per output channel (dim 0) of each tensor.

    p=1: mean |W| over the filter (the paper's L1 criterion); p=2: sqrt(sum W^2);
    with ``grads``: first-order Taylor |sum(W * dL/dW)| (``p`` is then ignored).
    """
    _check_norm_args(weights, p, grads)
    out = []
    for i, w in enumerate(weights):
        rows = w.detach().reshape(w.shape[0], -1).float()          # (out, in*kh*kw)
        if grads is not None:
            g = grads[i].detach().reshape(w.shape[0], -1).float()
            out.append((rows * g).sum(1).abs())
        elif p == 1:   # one reduction, no |W| temporary (planning scores every weight of a model)
            out.append(torch.linalg.vector_norm(rows, 1, dim=1).div_(rows.shape[1]))
        else:
            out.append(torch.linalg.vector_norm(rows, 2, dim=1))
    return out


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out_mask: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                  in_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x * in_mask, weight * out_mask[:, None, None, None], bias * out_mask)``.

    Masks are constants (cast to the weight's dtype, never differentiated here unless they
    require grad themselves); ``in_mask`` (one value per input channel) zeroes input channels.
    """
    m = out_mask.to(weight.dtype)
    w = weight * m.view(-1, 1, 1, 1)
    b = bias * m if bias is not None else None
    if in_mask is not None:
        shape = (1, -1, 1, 1) if x.dim() == 4 else (-1, 1, 1)
        x = x * in_mask.to(x.dtype).view(shape)
    return F.conv2d(x, w, b, stride, padding, dilation, groups)
