"""The train / val loaders of one run and what the run needs to know about its data."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import dist
from ..errors import UserError
from . import build_datasets, build_loader

__all__ = ["RunData", "build_run_data", "first_samples"]

# data.ffcv_pipeline when unset: by dataset name, ImageNet-style for anything else
_FFCV_PIPELINES = {"digits": "digits", "cifar10": "cifar", "cifar100": "cifar"}


@dataclass
class RunData:
    train: object
    val: object
    info: object
    n_train: int
    example: torch.Tensor  # one normalized sample batch (1, ...) for tracing / JSV inputs


def build_run_data(dcfg, *, flatten: bool, seed: int, micro_batch: int, num_classes=None,
                   device: torch.device, distributed: bool = False, rank: int = 0,
                   world_size: int = 1, channels_last: bool = False, amp: str = "none") -> RunData:
    """Train / val loaders for this rank from the ``data`` section of a config (the val loader
    covers every sample exactly once across ranks)."""
    if dcfg.format == "ffcv":
        from .ffcv import build_ffcv_loaders  # optional dependency

        if not dcfg.train_path or not dcfg.val_path:
            raise UserError("data.format=ffcv needs data.train_path and data.val_path (.beton files)")
        res = None
        if dcfg.res_start:
            res = (dcfg.res_start, dcfg.res_end or dcfg.res_start, dcfg.res_start_epoch, dcfg.res_end_epoch)
        train, val, info = build_ffcv_loaders(
            dcfg.train_path, dcfg.val_path,
            pipeline=dcfg.ffcv_pipeline or _FFCV_PIPELINES.get(dcfg.name, "imagenet"),
            batch_size=micro_batch, val_batch_size=dcfg.val_batch_size,
            num_workers=max(dcfg.num_workers, 1), device=str(device), distributed=distributed,
            seed=seed, os_cache=dcfg.os_cache, res=res, channels_last=channels_last,
            dtype=amp if amp != "none" else "fp32", flatten=flatten,
            **({"image_size": dcfg.input_size} if dcfg.input_size else {}))
        x, _ = next(iter(val))
        n_train = train.num_samples * world_size  # per-rank shard x ranks
        return RunData(train, val, info, n_train, x[:1].detach().clone().float().cpu())
    train_ds, val_ds, info = build_datasets(
        dcfg.name, train_path=dcfg.train_path, val_path=dcfg.val_path, input_size=dcfg.input_size,
        flatten=flatten, seed=seed, synthetic_size=(dcfg.synthetic_train, dcfg.synthetic_val),
        num_classes=num_classes)
    common = dict(num_workers=dcfg.num_workers, seed=seed, distributed=distributed, rank=rank,
                  world_size=world_size, pin_memory=device.type == "cuda")
    train = build_loader(train_ds, batch_size=micro_batch, shuffle=True, **common)
    val = build_loader(val_ds, batch_size=dcfg.val_batch_size, shuffle=False, **common)
    return RunData(train, val, info, len(train_ds), val_ds[0][0].unsqueeze(0).float())


def first_samples(val, n: int) -> torch.Tensor:
    """The first ``n`` validation samples in dataset order: the same on every rank and for any
    world size (each rank's val loader holds only its shard). FFCV loaders have no indexable
    dataset: rank 0's first samples, broadcast."""
    ds = getattr(val, "dataset", None)
    if ds is not None and hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        return torch.stack([ds[i][0] for i in range(min(n, len(ds)))]).float()
    return dist.broadcast_object(torch.cat([x for x, _ in _take(val, n)]))


def _take(loader, n):
    got = 0
    for x, y in loader:
        x = x[: n - got].detach().clone().float().cpu()
        yield x, y
        got += len(x)
        if got >= n:
            break
