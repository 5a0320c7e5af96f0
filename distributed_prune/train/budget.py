"""What a run's training cost and how trainable the pruned model was, for summary.json."""
from __future__ import annotations

from typing import Optional, Sequence

from ..trainability import trainability_accuracy
from .schedules import parse_schedule

__all__ = ["retrain_trainability_accuracy", "total_train_macs"]


def retrain_trainability_accuracy(top1_by_epoch: Sequence[float], schedule: str,
                                  epochs: int) -> Optional[float]:
    """Trainability accuracy of a retraining stage: mean top-1 over its first LR stage (or over
    the epochs logged so far, if fewer). None when nothing was retrained."""
    if not top1_by_epoch:
        return None
    n = parse_schedule(schedule).first_stage_epochs(epochs)
    return trainability_accuracy(list(top1_by_epoch), min(n, len(top1_by_epoch)))


def total_train_macs(n_train: int, *, dense_macs: int, pruned_macs: int, dense_epochs: int,
                     pruned_epochs: int) -> int:
    """Forward + backward (3x the forward MACs) over every training sample of every epoch:
    the dense model while pretraining and in the pruning phase, the pruned one while retraining."""
    return 3 * n_train * (dense_macs * dense_epochs + pruned_macs * pruned_epochs)
