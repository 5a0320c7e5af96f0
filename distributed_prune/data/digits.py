"""scikit-learn's bundled digits: 1,797 real 8x8 grey images of 0-9, usable offline.

The train/test split is FIXED (stratified, ``test_size=0.25``, ``random_state=0``: 1,347 train,
450 test) and independent of the run seed, so runs with different seeds see the same data.
Pixels (0..16) are scaled to [0, 1] then normalized with the train set's pixel mean and std.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..errors import UserError
from .base import DataInfo, check_num_classes, reject_paths, register_dataset, \
    spatial_size

TEST_SIZE = 0.25
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _sklearn_split() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    return tuple(train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y))


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw digits of one split (``"train"``; anything else is the test split): pixels
    (N, 8, 8) uint8 in 0..16 and labels (N,) int64. The one definition of the split: the
    datasets here and the .beton writer both read it."""
    x_tr, x_te, y_tr, y_te = _sklearn_split()
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    return x.reshape(-1, 8, 8).astype(np.uint8), y.astype(np.int64)


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: float32 (N, 1, 8, 8) in [0, 1]; int64 labels."""
    out = []
    for split in ("train", "test"):
        pixels, labels = digits_split(split)
        out += [torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0,
                torch.as_tensor(labels)]
    return tuple(out)


def train_pixel_stats() -> tuple[float, float]:
    """Mean and std of the train split's pixels in [0, 1] units: the normalization constants."""
    x = load_digits_split()[0]
    return x.mean().item(), x.std().item()


@register_dataset("digits")
def build_digits(*, train_path=None, val_path=None, input_size=None, flatten=False, seed=0,
                 synthetic_size=None, num_classes=None):
    """TensorDatasets of (1, S, S) images (S = 8, or ``input_size`` by bilinear resizing, e.g. 32
    to mimic 32x32 MNIST), or of S*S features when ``flatten``. ``seed`` is unused: fixed split.
    """
    reject_paths("digits", train_path, val_path)
    check_num_classes(num_classes, 10, "digits")
    if isinstance(input_size, (tuple, list)) and len(input_size) == 3 and input_size[0] != 1:
        raise UserError(f"bad input_size {input_size!r} for dataset 'digits': it has 1 channel")
    size = spatial_size(input_size, "digits", default=(8, 8))
    x_tr, y_tr, x_te, y_te = load_digits_split()
    mean, std = train_pixel_stats()
    out = []
    for x in (x_tr, x_te):
        x = (x - mean) / std  # affine, so it commutes with the bilinear resize below
        if size != (8, 8):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        out.append(x.flatten(1) if flatten else x.contiguous())
    shape = (size[0] * size[1],) if flatten else (1, *size)
    info = DataInfo(num_classes=10, input_shape=shape, mean=(mean,), std=(std,), name="digits")
    return TensorDataset(out[0], y_tr), TensorDataset(out[1], y_te), info

