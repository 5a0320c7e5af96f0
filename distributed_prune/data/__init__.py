"""Datasets and loaders (torchvision-format data, bundled digits, synthetic data).

``build_datasets(name, ...)`` looks ``name`` up in the :data:`DATASETS` registry and returns
``(train_ds, val_ds, DataInfo)``; ``build_loader(ds, ...)`` wraps a dataset in a DataLoader whose
sampler always has ``set_epoch(epoch)`` (call it at the start of every epoch).

Samplers used by :func:`build_loader`:

- not distributed, shuffle: :class:`EpochRandomSampler` (permutation seeded by seed + epoch).
- not distributed, no shuffle: :class:`ShardSampler` with world_size 1 (dataset order).
- distributed, shuffle (TRAINING): ``torch.utils.data.DistributedSampler``; every rank gets the
  same number of samples (padded by repeating indices or, with ``drop_last``, truncated), so DDP
  ranks take the same number of steps; its permutation equals the single-process one when
  world_size is 1.
- distributed, no shuffle (EVALUATION): :class:`ShardSampler`, ``indices[rank::world_size]``
  without padding: every sample is seen exactly once overall. Ranks may differ by one sample, so
  sum correct counts and sample counts across ranks (do not average per-rank accuracies), and
  never use it for DDP training (unequal step counts would hang the all-reduce).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..errors import UserError
# The dataset modules register their builders in DATASETS when imported.
from . import digits, synthetic, torchvision  # noqa: F401
from .base import DATASETS, DataInfo, register_dataset

__all__ = [
    "DATASETS", "DataInfo", "register_dataset", "build_datasets", "build_loader",
    "EpochRandomSampler", "ShardSampler",
]


def build_datasets(name: str, *, train_path: str | None = None, val_path: str | None = None,
                   input_size: "int | Sequence[int] | None" = None, flatten: bool = False,
                   seed: int = 0, synthetic_size: "int | tuple[int, int]" = (1024, 256),
                   num_classes: int | None = None):
    """Build ``(train_ds, val_ds, DataInfo)`` for a registered dataset.

    ``input_size``: an int (square spatial size) or a shape; each dataset documents what it
    accepts. ``flatten`` gives 1-D samples for MLPs. ``seed`` only affects ``synthetic`` (the
    digits split is fixed). ``synthetic_size`` is ``(n_train, n_val)`` or ``n_train`` (then
    ``n_val = max(1, n_train // 4)``). ``num_classes`` must match a real dataset's classes.
    Paths for datasets that need no files must be left unset; nothing is ever downloaded.
    """
    return DATASETS.lookup(name)(train_path=train_path or None, val_path=val_path or None,
                                 input_size=input_size, flatten=bool(flatten), seed=int(seed),
                                 synthetic_size=synthetic_size, num_classes=num_classes)


# ----------------------------------------------------------------------------------- loaders

class EpochRandomSampler(Sampler[int]):
    """Random permutation seeded by ``seed + epoch`` (as DistributedSampler does, one process)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ShardSampler(Sampler[int]):
    """``range(n)[rank::world_size]`` in order, without padding: each index once over all ranks."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = int(n), int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:
        """No-op, for a uniform loader API."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return max(0, math.ceil((self.n - self.rank) / self.world_size))


def build_loader(ds: Dataset, *, batch_size: int, shuffle: bool, num_workers: int = 0,
                 drop_last: bool = False, seed: int = 0, distributed: bool = False, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``ds``; the sampler is chosen as in the module docstring's table.

    The loader's generator (worker seeds, random augmentations in workers) is seeded from
    ``seed`` and ``rank``, so the data order and augmentations are reproducible.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world_size {world_size}")
    n = len(ds)
    if distributed and shuffle:
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=drop_last)
    elif distributed:
        sampler = ShardSampler(n, rank, world_size)
    elif shuffle:
        sampler = EpochRandomSampler(n, seed)
    else:
        sampler = ShardSampler(n)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed + 7919 * rank))

