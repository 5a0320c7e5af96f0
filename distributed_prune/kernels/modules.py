"""``MaskedConv2d``: an ``nn.Conv2d`` whose forward is :func:`masked_conv2d` with stored masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import _masked_conv2d

__all__ = ["MaskedConv2d"]


class MaskedConv2d(nn.Conv2d):
    """Conv2d with an ``out_mask`` buffer (one value per filter; 0 = pruned) and an optional
    ``in_mask`` buffer (one value per input channel known to be zero, e.g. produced by a masked
    previous layer).  ``forward(x) == conv2d(x * in_mask, weight * out_mask, bias * out_mask)``.

    Parameters are those of ``nn.Conv2d``; masks start all-ones.  Change them with
    :meth:`set_masks`, or edit them in place (``m.out_mask[idx] = 0``) and then call
    :meth:`refresh_masks`.  The active-channel indices are cached so that forwards do not
    synchronise on ``nonzero``; the cache is keyed by a generation counter that only those two
    calls (and ``load_state_dict``) advance, plus the mask's storage and device.  It is NOT keyed
    by the tensor's version counter: DDP re-broadcasts buffers into place before every forward,
    which bumps that counter without changing the (rank-identical) values.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("out_mask", torch.ones(self.out_channels, device=self.weight.device,
                                                    dtype=self.weight.dtype))
        self.register_buffer("in_mask", None)
        self._index_cache: dict[str, tuple] = {}
        self._mask_generation = 0

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, out_mask: torch.Tensor | None = None,
                  in_mask: torch.Tensor | None = None) -> "MaskedConv2d":
        """Wrap ``conv`` (sharing its weight and bias Parameters, so optimizer state stays valid)."""
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device="meta")      # no throwaway allocation: parameters are replaced below
        m.weight = conv.weight
        m.bias = conv.bias
        dev, dt = conv.weight.device, conv.weight.dtype
        m.out_mask = (out_mask.detach().to(dev, dt).clone() if out_mask is not None
                      else torch.ones(conv.out_channels, device=dev, dtype=dt))
        m.in_mask = in_mask.detach().to(dev, dt).clone() if in_mask is not None else None
        m.refresh_masks()
        m.train(conv.training)
        return m

    def set_masks(self, out_mask: torch.Tensor | None = None,
                  in_mask: torch.Tensor | None = None) -> None:
        """Set the masks (values copied into this module's device and dtype).  An existing mask
        buffer is updated in place, so references to it (e.g. DDP's buffer list) stay valid."""
        dev, dt = self.weight.device, self.weight.dtype
        for name, new in (("out_mask", out_mask), ("in_mask", in_mask)):
            if new is None:
                continue
            new = new.detach().to(dev, dt)
            cur = getattr(self, name)
            if cur is not None and cur.shape == new.shape and cur.device == new.device:
                with torch.no_grad():
                    cur.copy_(new)
            else:
                setattr(self, name, new.clone())
        self.refresh_masks()

    def refresh_masks(self) -> None:
        """Recompute the cached active-channel indices at the next forward (call after editing
        a mask in place)."""
        self._mask_generation += 1
        self._index_cache.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_masks()

    def _active_index(self, name: str, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        key = (self._mask_generation, mask.data_ptr(), mask.device, mask.numel())
        cached = self._index_cache.get(name)
        if cached is None or cached[0] != key:
            cached = (key, torch.nonzero(mask != 0).view(-1))
            self._index_cache[name] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        out_index = in_index = None
        if x.dim() == 4:
            out_index = self._active_index("out", self.out_mask)
            in_index = self._active_index("in", self.in_mask)
        return _masked_conv2d(x, self.weight, self.bias, self.out_mask, self.stride, padding,
                              self.dilation, self.groups, self.in_mask,
                              out_index=out_index, in_index=in_index)

    def extra_repr(self) -> str:
        active = int((self.out_mask != 0).sum())
        return f"{super().extra_repr()}, active_out={active}/{self.out_channels}"
