"""The physically cut model of a masked phase's current masks, and the way back.

With hard masks, the masked model computes exactly what the model with the masked channels cut
out computes (outputs, and the gradients of the active weights), so a gradual phase can train
the small model between two mask updates (:mod:`distributed_prune.train.compact`).
:class:`CompactCut` holds, for every tensor of the full model that loses entries, the indices it
keeps along each cut dimension (the same entries :class:`~.mask.ChannelMasks` keeps at zero,
plus the BatchNorm running statistics), read off the members the phase traced once: no new
trace per update.  ``cut`` builds the small model, ``take`` slices any full-shaped tensor of a
parameter (its gradient, its optimizer state) and ``put`` writes a compact tensor back into the
full shape, masked entries zero.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import UserError
from .mask import mask_targets

__all__ = ["CompactCut"]

_NORMS = (nn.modules.batchnorm._BatchNorm,)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class CompactCut:
    """The kept entries of ``full``'s tensors under ``phase``'s current masks
    (a :class:`~.masked.MaskedPhase` over ``full``)."""

    def __init__(self, full: nn.Module, phase):
        self.full = full
        drop: dict[str, dict[int, set]] = {}       # tensor name -> dim -> dropped indices
        for root in phase.pruned:
            for name, dim, idxs in phase.member_channels(root):
                mod = full.get_submodule(name)
                targets = list(mask_targets(mod, dim, idxs, name))
                if isinstance(mod, _NORMS):       # the statistics go with the channel
                    targets += [(b, 0, idxs) for b in ("running_mean", "running_var")]
                for tname, d, ix in targets:
                    if getattr(mod, tname, None) is None:
                        continue
                    key = f"{name}.{tname}" if name else tname
                    drop.setdefault(key, {}).setdefault(d, set()).update(ix)
        tensors = dict(full.named_parameters())
        tensors.update(full.named_buffers())
        self.keep: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.shapes: dict[str, torch.Size] = {}
        for key, dims in drop.items():
            t = tensors[key]
            self.shapes[key] = t.shape
            self.keep[key] = [(d, torch.tensor([i for i in range(t.shape[d]) if i not in ix],
                                                dtype=torch.long, device=t.device))
                              for d, ix in sorted(dims.items())]
        self._depthwise = {n for n, m in full.named_modules()
                           if isinstance(m, _CONVS) and 1 < m.groups == m.in_channels == m.out_channels}

    # ------------------------------------------------------------------ tensors
    def take(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The kept entries of ``t``, a tensor shaped like the full model's ``key``."""
        for d, idx in self.keep.get(key, ()):
            t = t.index_select(d, idx if idx.device == t.device else idx.to(t.device))
        return t

    def put(self, key: str, small: torch.Tensor) -> torch.Tensor:
        """``small`` (shaped like the cut ``key``) in the full shape, zero where masked."""
        out = small
        for d, idx in reversed(self.keep.get(key, ())):
            shape = list(out.shape)
            shape[d] = self.shapes[key][d]
            z = out.new_zeros(shape)
            out = z.index_copy_(d, idx if idx.device == out.device else idx.to(out.device), out)
        return out

    def cuts(self, key: str) -> bool:
        return key in self.keep

    # ------------------------------------------------------------------ models
    @torch.no_grad()
    def cut(self) -> nn.Module:
        """A new model: ``full`` with the masked channels removed (the same Parameters' values
        in new tensors; ``full`` is not changed)."""
        small = copy.deepcopy(self.full)
        touched = set()
        for key in self.keep:
            mname, _, tname = key.rpartition(".")
            mod = small.get_submodule(mname)
            old = getattr(mod, tname)
            new = self.take(key, old.detach())
            if isinstance(old, nn.Parameter):
                setattr(mod, tname, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                mod._buffers[tname] = new
            touched.add(mname)
        for mname in touched:
            _fix_sizes(mname, small.get_submodule(mname), mname in self._depthwise)
        return small

    @torch.no_grad()
    def fold(self, small: nn.Module) -> None:
        """Write ``small``'s parameters and buffers back into ``full`` (masked entries 0)."""
        ours = dict(self.full.named_parameters())
        ours.update(self.full.named_buffers())
        theirs = dict(small.named_parameters())
        theirs.update(small.named_buffers())
        for key, t in ours.items():
            src = theirs.get(key)
            if src is None:
                continue
            t.copy_(self.put(key, src) if key in self.keep else src)


def _fix_sizes(name: str, m: nn.Module, depthwise: bool) -> None:
    """Module attributes that describe the tensors' sizes, after the cut."""
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, _CONVS):
        out = m.weight.shape[0]
        if depthwise:
            m.groups = m.in_channels = m.out_channels = out
            return
        if out % m.groups:
            raise UserError(f"compact execution: grouped conv {name!r} (groups={m.groups}) would "
                            "lose a different number of output channels in different groups; "
                            "use prune.masked.execution=masked")
        m.out_channels, m.in_channels = out, m.weight.shape[1] * m.groups
    elif isinstance(m, _NORMS):
        ref = m.running_mean if m.running_mean is not None else m.weight
        m.num_features = ref.shape[0]
