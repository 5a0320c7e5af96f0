"""What every dataset module shares: the :data:`DATASETS` registry, :class:`DataInfo` and the
argument checks. The dataset modules import this, never the package, so that the package can
import them (to fill the registry) without an import cycle."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..registry import Registry

#: name -> builder(**kwargs) -> (train_ds, val_ds, DataInfo); filled by :func:`register_dataset`.
DATASETS: Registry = Registry("dataset", "data.name")

@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a dataset.

    ``input_shape`` is ``(C, H, W)`` for images or ``(D,)`` when flattened; ``mean``/``std`` are
    the per-channel normalization constants applied to the data (scalar ones as 1-tuples for
    flattened or single-channel data), in the units of images scaled to [0, 1].
    """

    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""


def register_dataset(name: str):
    """Decorator adding a builder to :data:`DATASETS` under ``name``."""
    return DATASETS.register(name)


# --------------------------------------------------------------------------- argument checks

def spatial_size(input_size, name: str, default=None) -> "tuple[int, int] | None":
    """``input_size`` (int, (H, W) or (C, H, W)) -> (H, W); UserError naming the dataset if bad."""
    if input_size is None:
        return default
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        size = (input_size, input_size)
    elif isinstance(input_size, (tuple, list)) and len(input_size) in (2, 3):
        size = tuple(int(s) for s in input_size[-2:])
    else:
        raise UserError(f"bad input_size {input_size!r} for dataset {name!r}: "
                        "expected an int, (H, W) or (C, H, W)")
    if min(size) < 1:
        raise UserError(f"bad input_size {input_size!r} for dataset {name!r}: sizes must be >= 1")
    return size


def check_num_classes(num_classes, actual: int, name: str) -> int:
    """``num_classes`` must be unset or equal to the dataset's class count."""
    if num_classes is not None and int(num_classes) != actual:
        raise UserError(f"num_classes={num_classes} does not match dataset {name!r}, "
                        f"which has {actual} classes")
    return actual


def reject_paths(name: str, train_path, val_path) -> None:
    """Datasets generated in memory take no paths; a set path would otherwise be ignored."""
    for key, value in (("data.train_path", train_path), ("data.val_path", val_path)):
        if value:
            raise UserError(f"{key}={value!r} is not used by dataset {name!r}; leave it unset")
