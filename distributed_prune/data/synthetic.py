"""Deterministic, learnable synthetic data of any shape and class count (tests, benchmarks).

Sample ``i`` of a split has label ``i % num_classes`` and value
``(signal * pattern[label] + noise_i) / sqrt(1 + signal**2)`` (unit variance, zero mean), where
``pattern`` is a per-class Gaussian pattern drawn from ``seed`` (at most 8x8 spatially, upsampled
by nearest neighbour so memory stays small for 224x224 inputs and 1000 classes) and ``noise_i``
a Gaussian drawn from a generator seeded by (seed, split, i). Samples are generated on access:
the same seed gives the same data in every process and worker, at any dataset size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import UserError
from .base import DataInfo, reject_paths, register_dataset

DEFAULT_SHAPE = (3, 32, 32)


class SyntheticDataset(Dataset):
    """``n`` samples of ``shape`` ((C, H, W) or (D,)); ``flatten`` returns 1-D samples."""

    def __init__(self, n: int, shape: tuple[int, ...], num_classes: int, *, seed: int = 0,
                 split: int = 0, signal: float = 0.5, flatten: bool = False):
        self.n, self.shape, self.num_classes = int(n), tuple(shape), int(num_classes)
        self.signal, self.flatten = float(signal), bool(flatten)
        # (seed, split) -> disjoint streams of per-item seeds (collide only past 1e9 items)
        self._base = (int(seed) * 4_000_000_007 + int(split) * 1_000_000_007) % (2 ** 62)
        g = torch.Generator().manual_seed(int(seed))
        if len(self.shape) == 3:
            c, h, w = self.shape
            low = (self.num_classes, c, min(h, 8), min(w, 8))
        else:
            low = (self.num_classes, *self.shape)
        self.patterns = torch.randn(low, generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int):
        if not -self.n <= idx < self.n:
            raise IndexError(idx)
        idx %= self.n
        label = idx % self.num_classes
        pattern = self.patterns[label]
        if len(self.shape) == 3 and pattern.shape[1:] != self.shape[1:]:
            pattern = F.interpolate(pattern[None], size=self.shape[1:], mode="nearest")[0]
        g = torch.Generator().manual_seed(self._base + idx)
        noise = torch.randn(self.shape, generator=g)
        x = (self.signal * pattern + noise) / math.sqrt(1.0 + self.signal ** 2)
        return (x.reshape(-1) if self.flatten else x), torch.tensor(label, dtype=torch.int64)


def _shape(input_size) -> tuple[int, ...]:
    if input_size is None:
        return DEFAULT_SHAPE
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        shape = (3, input_size, input_size)
    elif isinstance(input_size, (tuple, list)) and len(input_size) in (1, 2, 3):
        shape = tuple(int(s) for s in input_size)
        if len(shape) == 2:
            shape = (3, *shape)
    else:
        raise UserError(f"bad input_size {input_size!r} for dataset 'synthetic': expected an int, "
                        "(D,), (H, W) or (C, H, W)")
    if min(shape) < 1:
        raise UserError(f"bad input_size {input_size!r} for dataset 'synthetic': "
                        "sizes must be >= 1")
    return shape


@register_dataset("synthetic")
def build_synthetic(*, train_path=None, val_path=None, input_size=None, flatten=False, seed=0,
                    synthetic_size=(1024, 256), num_classes=None):
    """Synthetic train/val sets; ``input_size`` int S -> (3, S, S), default (3, 32, 32);
    ``num_classes`` default 10; ``synthetic_size`` = (n_train, n_val) or n_train."""
    reject_paths("synthetic", train_path, val_path)
    shape = _shape(input_size)
    classes = 10 if num_classes is None else int(num_classes)
    if classes < 2:
        raise UserError(f"num_classes={num_classes} for dataset 'synthetic': must be >= 2")
    if isinstance(synthetic_size, (tuple, list)):
        n_train, n_val = (int(s) for s in synthetic_size)
    else:
        n_train = int(synthetic_size)
        n_val = max(1, n_train // 4)
    if n_train < 1 or n_val < 1:
        raise UserError(f"bad synthetic_size {synthetic_size!r}: sizes must be >= 1")
    train = SyntheticDataset(n_train, shape, classes, seed=seed, split=0, flatten=flatten)
    val = SyntheticDataset(n_val, shape, classes, seed=seed, split=1, flatten=flatten)
    out_shape = (math.prod(shape),) if flatten else shape
    channels = shape[0] if len(shape) == 3 and not flatten else 1
    info = DataInfo(num_classes=classes, input_shape=out_shape, mean=(0.0,) * channels,
                    std=(1.0,) * channels, name="synthetic")
    return train, val, info
