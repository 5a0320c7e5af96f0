"""Evaluation that counts every sample exactly once across ranks (no padding bias)."""
from __future__ import annotations

import torch

from . import dist
from .train.loop import to_device


@torch.no_grad()
def evaluate(model, loader, *, device, amp_dtype=None, channels_last=False) -> float:
    """Top-1 accuracy (fraction) over the whole evaluation set: correct and sample counts are
    summed over ranks (each rank evaluates a disjoint shard, no padding)."""
    was = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in loader:
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            out = model(x)
        correct += (out.argmax(1) == y).sum()
        count += y.numel()
    model.train(was)
    stats = torch.stack([correct, count]).double()
    dist.all_reduce_sum(stats)
    c, n = stats.tolist()
    return c / max(n, 1)
