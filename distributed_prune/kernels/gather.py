"""``gather`` backend of masked_conv2d: pure PyTorch over the active channels only.

Select the active output filters (and, with ``in_mask``, the active input channels) with index
tensors, run the ordinary convolution on the compact tensors (cuDNN on GPU, oneDNN on CPU) and
scatter the result into a zero output.  Autograd differentiates the index ops, so the backward
also runs on the compact problem.  With cached indices (MaskedConv2d passes them) nothing here
synchronises the host with the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference

__all__ = ["masked_conv2d", "supports"]


def supports(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Plain (groups=1) and depthwise (multiplier 1) convolutions; other grouped layouts have
    per-group active counts that do not form one compact convolution."""
    if groups == 1:
        return True
    return groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1


def _is_cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last)


def _select_channels(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if _is_cl(t):
        # channels_last: gather along the innermost dim of the NHWC view (index_select(1) would
        # first copy the tensor to NCHW)
        return t.permute(0, 2, 3, 1).index_select(3, idx).permute(0, 3, 1, 2)
    return t.index_select(1, idx)


def _active(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask != 0).view(-1)


def masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask=None,
                  out_index=None, in_index=None):
    """Equal to :func:`reference.masked_conv2d`; ``out_index``/``in_index`` are the cached
    ``nonzero(mask)`` (computed here, with a device sync, when not given)."""
    if not supports(x, weight, groups):
        return reference.masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation,
                                       groups, in_mask)
    out_idx = out_index if out_index is not None else _active(out_mask)
    out_idx = out_idx.to(device=x.device, dtype=torch.long)
    scale = out_mask.detach().index_select(0, out_idx).to(weight.dtype)
    wc = weight.index_select(0, out_idx) * scale.view(-1, 1, 1, 1)
    bc = bias.index_select(0, out_idx) * scale if bias is not None else None
    if groups == 1:
        xc = x
        if in_mask is not None:
            in_idx = in_index if in_index is not None else _active(in_mask)
            in_idx = in_idx.to(device=x.device, dtype=torch.long)
            in_scale = in_mask.detach().index_select(0, in_idx).to(weight.dtype)
            xc = _select_channels(x, in_idx)
            wc = wc.index_select(1, in_idx) * in_scale.view(1, -1, 1, 1)
        g = 1
    else:  # depthwise: filter c reads channel c only
        xc = _select_channels(x, out_idx)
        if in_mask is not None:
            wc = wc * in_mask.detach().index_select(0, out_idx).to(weight.dtype).view(-1, 1, 1, 1)
        g = out_idx.numel()
    if _is_cl(x):
        xc = xc.contiguous(memory_format=torch.channels_last)
        wc = wc.contiguous(memory_format=torch.channels_last)
    if out_idx.numel() == 0 or xc.shape[1] == 0:
        # nothing to convolve: a zero (or bias-only) result of the right shape, still in the graph
        y_full = F.conv2d(x, weight * 0, None if bias is None else bias * 0, stride, padding,
                          dilation, groups)
        if bc is not None and out_idx.numel():
            y_full = y_full.index_add(1, out_idx, bc.view(1, -1, 1, 1).expand(
                y_full.shape[0], -1, *y_full.shape[2:]).to(y_full.dtype))
        return y_full
    yc = F.conv2d(xc, wc, bc, stride, padding, dilation, g)
    n, _, oh, ow = yc.shape
    fmt = torch.channels_last if _is_cl(x) else torch.contiguous_format
    y = torch.zeros((n, weight.shape[0], oh, ow), dtype=yc.dtype, device=yc.device
                    ).contiguous(memory_format=fmt)
    return y.index_copy(1, out_idx, yc)
