"""One training loop for pretraining, the regularization (pruning) phase, retraining and
scratch training (evaluation is in :mod:`distributed_prune.eval`).

No host synchronisation per step: loss and accuracy are accumulated on the device and read
once per epoch (after an all-reduce). Divergence is watched without one too
(:class:`DivergenceWatch`): every step marks, on the device, the index of the first optimizer
step whose loss was not finite; that mark is combined over ranks by a one-element all-reduce
queued on the device (no host wait) and copied to pinned host memory behind a CUDA event. The
host reads the copy of step k when it is about to start step k + ``lag`` (``lag`` = 2 on CUDA:
by then the event has normally fired, so the read does not drain the GPU's queue; 0 on CPU,
where there is no queue), and every rank reads the same all-reduced value at the same step, so
all ranks stop together, with no rank left waiting in a collective. The caller stops the run
there, naming the bad step (the epoch is neither logged nor checkpointed, so the newest
checkpoint is the last good one); at most ``lag`` steps ran after the bad one.
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


class DivergenceWatch:
    """The first optimizer step (1-based) whose loss was not finite, read by the host ``lag``
    steps late without a host synchronisation per step (see the module's docstring).
    ``mark(total, step)`` records a micro-step's loss; ``poll(step)`` is called after each
    optimizer step and returns the bad step once it is known (the same on every rank)."""

    NONE = torch.iinfo(torch.int64).max

    def __init__(self, device: torch.device, lag: Optional[int] = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.lag = (2 if self.cuda else 0) if lag is None else lag
        self.first_bad = torch.full((), self.NONE, device=device, dtype=torch.int64)
        self.pending = []          # (optimizer step, host tensor, event or None), oldest first
        # one pinned host slot (and event) per step in flight; slot k is reused at step k + lag + 1,
        # after step k's read has waited for its event
        self.slots = [(torch.empty((), dtype=torch.int64, pin_memory=self.cuda),
                       torch.cuda.Event() if self.cuda else None) for _ in range(self.lag + 1)]

    def mark(self, total: torch.Tensor, step: int):
        bad = ~torch.isfinite(total.detach()) & (self.first_bad == self.NONE)
        self.first_bad.masked_fill_(bad, step)

    def poll(self, step: int) -> Optional[int]:
        """After optimizer step ``step``: queue its mark, read the one ``lag`` steps older."""
        # in place, on the device: the ranks' earliest bad step is every rank's mark from now on
        dist.all_reduce_min(self.first_bad)
        host, event = self.slots[step % len(self.slots)]
        host.copy_(self.first_bad, non_blocking=self.cuda)
        if event is not None:
            event.record()
        self.pending.append((step, host, event))
        while self.pending and self.pending[0][0] <= step - self.lag:
            _, host, event = self.pending.pop(0)
            if event is not None:
                event.synchronize()   # normally already fired: the GPU is <= lag steps behind
            if int(host) != self.NONE:
                return int(host)
        return None

    def final(self) -> Optional[int]:
        """At the end of the epoch (after its statistics' all-reduce): the bad step, if any."""
        v = int(dist.all_reduce_min(self.first_bad).item())
        return None if v == self.NONE else v


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
    stopped (True when ``after_step`` ended the epoch) and nonfinite_step (the first optimizer
    step whose loss was not finite, or None; the epoch ends at most ``DivergenceWatch.lag`` steps
    after it)."""
    device = engine.device
    engine.model.train()
    n_batches = len(loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    watch = DivergenceWatch(device)
    bad_step = None
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
                out = engine.model(x)   # read each step: compact execution swaps it
                loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
            total = loss if extra_loss is None else loss + extra_loss()
            engine.backward(total / grad_accum)
        loss_sum += loss.detach().double() * y.numel()
        watch.mark(total, it + 1)
        correct += (out.detach().argmax(1) == y).sum()
        count += y.numel()
        if last_micro:
            if grad_hook is not None:
                engine.unscale()
                grad_hook(iteration0 + it)
            engine.step()
            it += 1
            bad_step = watch.poll(it)
            if bad_step is None and after_step is not None and after_step(iteration0 + it - 1):
                stopped = True
        if bar is not None:
            bar.update(1)
        if stopped or bad_step is not None:
            break
    if bar is not None:
        bar.close()
    stats = torch.stack([loss_sum, correct.double(), count.double()])
    dist.all_reduce_sum(stats)
    loss_v, correct_v, count_v = stats.tolist()
    if bad_step is None:
        bad_step = watch.final()
    return {"train_loss": loss_v / max(count_v, 1), "train_top1": correct_v / max(count_v, 1),
            "samples": int(count_v), "iterations": it, "stopped": stopped,
            "nonfinite_step": bad_step}
