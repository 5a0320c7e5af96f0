"""One training loop for pretraining, the regularization (pruning) phase, retraining and
scratch training (evaluation is in :mod:`distributed_prune.eval`).

No host synchronisation per step: loss and accuracy are accumulated on the device and read
once per epoch (after an all-reduce). So is divergence: every step marks, on the device, the
index of the first optimizer step whose loss was not finite; the host reads that mark with the
epoch's statistics, and the caller stops the run there (the epoch is neither logged nor
checkpointed, so the newest checkpoint is the last good one). The steps after the bad one in the
same epoch still run on NaN weights: a per-step check would cost a host sync per step, which
the loop avoids (it is the price of an asynchronous GPU pipeline).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import dist


def to_device(x, device, channels_last):
    """Input batch ``x`` on ``device``, channels-last when asked (4-D only), without a host sync."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_epoch(engine, loader, *, epoch: int, lr_driver, grad_accum: int = 1,
                label_smoothing: float = 0.0, channels_last: bool = False,
                extra_loss: Optional[Callable[[], torch.Tensor]] = None,
                grad_hook: Optional[Callable[[int], None]] = None,
                iteration0: int = 0, progress: bool = False, desc: str = "",
                step_hook: Optional[Callable[[int], None]] = None,
                after_step: Optional[Callable[[int], bool]] = None,
                max_iterations: Optional[int] = None) -> dict:
    """One epoch. ``extra_loss()`` is added to the task loss (TPP); ``step_hook(iteration)``
    runs before the forward of each optimizer step (the regularizers' schedule);
    ``grad_hook(iteration)`` runs after backward and before the optimizer step (the L2 penalty's
    gradient); ``after_step(iteration)`` runs after the optimizer step and ends the epoch early
    when it returns True (the regularization phase is done); ``max_iterations`` ends it after
    that many optimizer steps (a fractional last epoch).  ``iteration0`` is the global
    optimizer-step count at the start of the epoch. Returns train_loss, train_top1, iterations,
    stopped (True when ``after_step`` ended the epoch)."""
    model, device = engine.model, engine.device
    model.train()
    n_batches = len(loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    no_bad = torch.iinfo(torch.int64).max
    first_bad = torch.full((), no_bad, device=device, dtype=torch.int64)  # 1-based step, on device
    it = 0
    stopped = False
    bar = None
    if progress and dist.is_primary():
        from tqdm import tqdm

        bar = tqdm(total=n_batches, desc=desc, leave=False, dynamic_ncols=True)
    for i, (x, y) in enumerate(loader):
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        last_micro = (i + 1) % grad_accum == 0 or i + 1 == n_batches
        if max_iterations is not None and it >= max_iterations:
            break
        if i % grad_accum == 0:
            lr_driver.step(epoch, it)
            if step_hook is not None:
                step_hook(iteration0 + it)
        with engine.no_sync(not last_micro):
            with engine.autocast():
                out = model(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
            total = loss if extra_loss is None else loss + extra_loss()
            engine.backward(total / grad_accum)
        loss_sum += loss.detach().double() * y.numel()
        bad = ~torch.isfinite(total.detach()) & (first_bad == no_bad)
        first_bad.masked_fill_(bad, it + 1)
        correct += (out.detach().argmax(1) == y).sum()
        count += y.numel()
        if last_micro:
            if grad_hook is not None:
                engine.unscale()
                grad_hook(iteration0 + it)
            engine.step()
            it += 1
            if after_step is not None and after_step(iteration0 + it - 1):
                stopped = True
        if bar is not None:
            bar.update(1)
        if stopped:
            break
    if bar is not None:
        bar.close()
    stats = torch.stack([loss_sum, correct.double(), count.double()])
    dist.all_reduce_sum(stats)
    dist.all_reduce_min(first_bad)
    loss_v, correct_v, count_v = stats.tolist()
    bad_step = int(first_bad.item())
    return {"train_loss": loss_v / max(count_v, 1), "train_top1": correct_v / max(count_v, 1),
            "samples": int(count_v), "iterations": it, "stopped": stopped,
            "nonfinite_step": None if bad_step == no_bad else bad_step}
