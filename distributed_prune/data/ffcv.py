"""FFCV loaders over ``.beton`` files (``data.format: ffcv``), shaped like torch DataLoaders.

(Over 400 lines on purpose: the three pipelines and the loader adapter share the epoch and
resolution state and the reused-buffer rule below.)

``build_ffcv_loaders(train_path, val_path, pipeline=..., ...)`` returns
``(train_loader, val_loader, DataInfo)``; iterating a loader yields ``(images, labels)``: images
a float NCHW tensor (normalized; ``channels_last`` memory format for RGB pipelines by default),
labels int64 of shape (B,). Call ``loader.set_epoch(epoch)`` at the start of every epoch (order
seed, progressive resizing).

**Batches are reused buffers.** FFCV writes each batch into one of a few preallocated slots and
overwrites it a few batches later: use a batch inside the loop, ``clone()`` whatever you keep.

Pipelines (:data:`PIPELINES`; names also accept the ``data.name`` spelling):

========  =====================================================  ============================
name      train                                                  val
========  =====================================================  ============================
imagenet  RandomResizedCrop decode (``image_size`` or ``res``     center crop 224/256 of the
          schedule) + horizontal flip                            short side -> val_image_size
cifar     decode + flip + random translate by <= 4 px            decode
          (= RandomCrop(32, padding=4), black fill)
digits    decode; channel 0 only, mapped back to the exact 0..16 pixel and normalized like
          :mod:`distributed_prune.data.digits` (same values as the torchvision path;
          ``normalize=False`` gives the 0..16 pixels as uint8)
========  =====================================================  ============================

Normalization: on CPU FFCV's JIT-compiled ``NormalizeImage`` (float32) runs in the loader's
threads; on CUDA, uint8 images are copied (non-blocking) and normalized by torch on the GPU in
``dtype`` (fp16/bf16/fp32; no cupy needed, unlike FFCV's GPU ``NormalizeImage``).

Order and sharding: train RANDOM (permutation seeded by ``seed + epoch``; QUASI_RANDOM is not
available when distributed), val SEQUENTIAL with ``drop_last=False``. ``distributed=True``
needs an initialized ``torch.distributed`` group. Train shards use FFCV's ``distributed``
flag, i.e. torch's ``DistributedSampler(drop_last=False)``, which pads by repeating samples so
that every rank gets the same count (fine for training). For evaluation that padding would
count some samples twice (FFCV's SEQUENTIAL order uses the same sampler), so each val loader
reads an explicit contiguous slice ``array_split(range(N), world)[rank]`` instead: every sample
exactly once over all ranks; ranks may differ by one batch, so reduce summed counts after the
loop, never per batch.

``os_cache``: with ``True`` FFCV memory-maps the file and the OS page cache holds it once for
all ranks of a node; with ``False`` each process loads the pages it needs into private memory,
so host RAM grows by about the file size per rank (8 ranks x a 40 GB ImageNet beton does not
fit). Default: ``True`` for files over 1 GiB, else ``False``.

Reproducibility: the sample order follows ``seed`` and the epoch; the random crops, flips and
translations are drawn inside FFCV's numba code from unseeded generators, so they differ
between runs (as with DataLoader workers without a seeded generator).

Side effect of FFCV: importing it and iterating a Loader call ``torch.set_num_threads`` (to 1
and to ``num_workers``); this module restores torch's thread count around those calls.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import dtypes
from ..errors import UserError

__all__ = ["ffcv_available", "require_ffcv", "validate_beton", "build_ffcv_loaders",
           "FFCVLoader", "PIPELINES", "resolution_at", "INSTALL_HINT"]

INSTALL_HINT = ("apt-get install -y --no-install-recommends pkg-config libturbojpeg0-dev "
                "libopencv-dev build-essential && pip install '.[ffcv]' "
                "(or pip install ffcv==1.0.2)")
OS_CACHE_THRESHOLD = 1 << 30  # bytes; see the module docstring
VAL_CROP_RATIO = 224 / 256
EXPECTED_TYPES = {"image": "RGBImageField", "label": "IntField"}


@contextlib.contextmanager
def _keep_torch_threads():
    """Undo FFCV's ``torch.set_num_threads`` calls (import sets 1, loaders set num_workers)."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _import_error() -> str | None:
    try:
        with _keep_torch_threads():
            import ffcv.loader  # noqa: F401  (loads the compiled libffcv and numba too)
    except (ImportError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def ffcv_available() -> bool:
    """True when ``ffcv`` imports (package and its native libraries present)."""
    return _import_error() is None


def require_ffcv() -> None:
    """Raise a UserError with the install command when FFCV cannot be imported."""
    err = _import_error()
    if err is not None:
        raise UserError(f"FFCV is required for data.format=ffcv and .beton files but does not "
                        f"import ({err}); install it with: {INSTALL_HINT}")


# ----------------------------------------------------------------------------- validation

def validate_beton(path, expected_fields: Sequence[str] = ("image", "label")) -> dict:
    """Check that ``path`` is a complete .beton holding ``expected_fields``; return its summary.

    Summary: ``path, num_samples, fields (name -> FFCV field type), num_classes (max label + 1
    when there is a 'label' field), bytes``. A missing file, a truncated or otherwise unreadable
    one, or missing / mistyped fields raise a UserError whose one line names the file.
    """
    require_ffcv()
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType, get_metadata_type

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: FFCV dataset file not found")
    size = p.stat().st_size

    def bad(why: str) -> UserError:
        return UserError(f"{p}: not a usable FFCV .beton file ({why})")

    if size < HeaderType.itemsize:
        raise bad(f"{size} bytes, shorter than the header")
    header = np.fromfile(p, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise bad(f"format version {int(header['version'])}, expected {CURRENT_VERSION}")
    table_at = int(header["alloc_table_ptr"])
    if table_at == 0:
        raise bad("incomplete: the writer did not finish")
    if table_at > size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise bad(f"truncated: {size} bytes, the header expects more than {table_at}")
    try:
        with _keep_torch_threads():
            reader = Reader(str(p))
    except Exception as exc:  # noqa: BLE001 - FFCV raises assorted errors on corrupt files
        raise bad(f"{type(exc).__name__}: {exc}") from None
    n = int(reader.num_samples)
    if len(reader.metadata) != n:
        raise bad(f"truncated: metadata for {len(reader.metadata)} of {n} samples")
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        raise bad("truncated: sample data runs past the allocation table")
    fields = {name: type(h).__name__ for name, h in reader.handlers.items()}
    for name in expected_fields:
        if name not in fields:
            raise bad(f"no field {name!r}; it has {', '.join(fields) or 'no fields'}")
        want = EXPECTED_TYPES.get(name)
        if want and fields[name] != want:
            raise bad(f"field {name!r} is a {fields[name]}, expected {want}")
    if "image" in fields and len(table) < n:
        raise bad(f"truncated: image data for {len(table)} of {n} samples")
    num_classes = None
    if "label" in fields:
        ix = list(fields).index("label")
        labels = reader.metadata[get_metadata_type(list(reader.handlers.values())).names[ix]]
        num_classes = int(labels.max()) + 1 if n else 0
    return {"path": str(p), "num_samples": n, "fields": fields, "num_classes": num_classes,
            "bytes": size}


# ----------------------------------------------------------------------------- pipelines

@dataclass(frozen=True)
class Pipeline:
    """How a pipeline decodes and augments, and its normalization (in [0, 1] units)."""

    decoders: Callable[[bool, int], list]  # (train, size) -> [decoder, uint8 HWC ops...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gray: bool = False          # keep channel 0 only (digits)
    fixed_size: int | None = None  # stored size when the decoder does not resize


def _imagenet_ops(train: bool, size: int) -> list:
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip

    if train:
        return [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip()]
    return [CenterCropRGBImageDecoder((size, size), ratio=VAL_CROP_RATIO)]


def _cifar_ops(train: bool, size: int) -> list:
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate

    if train:
        return [SimpleRGBImageDecoder(), RandomHorizontalFlip(), RandomTranslate(padding=4)]
    return [SimpleRGBImageDecoder()]


def _plain_ops(train: bool, size: int) -> list:
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder

    return [SimpleRGBImageDecoder()]


def _pipelines() -> dict[str, Pipeline]:
    from distributed_prune.data.torchvision import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN,
                                                    CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD)

    imagenet = Pipeline(_imagenet_ops, IMAGENET_MEAN, IMAGENET_STD)
    cifar10 = Pipeline(_cifar_ops, CIFAR10_MEAN, CIFAR10_STD, fixed_size=32)
    return {"imagenet": imagenet, "imagefolder": imagenet, "cifar": cifar10, "cifar10": cifar10,
            "cifar100": Pipeline(_cifar_ops, CIFAR100_MEAN, CIFAR100_STD, fixed_size=32),
            "digits": Pipeline(_plain_ops, (0.0,), (1.0,), gray=True, fixed_size=8)}


#: pipeline name -> Pipeline (the digits mean/std are filled in when a loader is built).
PIPELINES = _pipelines()


def resolution_at(epoch: int, start: int, end: int, start_epoch: int, end_epoch: int) -> int:
    """Progressive resizing: ``start`` until ``start_epoch``, linear to ``end`` at ``end_epoch``,
    rounded to a multiple of 32 (ffcv-imagenet's schedule)."""
    r = float(np.interp(epoch, [start_epoch, end_epoch], [start, end]))
    return max(32, int(round(r / 32)) * 32)


# ----------------------------------------------------------------------------- loader wrapper

class FFCVLoader:
    """An FFCV ``Loader`` that yields ``(images, labels)`` like a torch DataLoader.

    ``images``: float NCHW (``dtype``; uint8 with ``normalize=False``), ``labels``: int64
    (B,); both may be reused buffers of
    FFCV (clone what you keep past the next few batches). ``len()`` is the number of batches
    per epoch on this rank; ``num_samples`` the samples this rank reads per epoch.
    """

    def __init__(self, loader, *, post: Callable, decoder=None, schedule=None,
                 num_samples: int = 0):
        self.loader, self._post = loader, post
        self._decoder, self._schedule = decoder, schedule
        self.num_samples = num_samples
        self.batch_size = loader.batch_size if loader is not None else 0
        self.resolution = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (seed + epoch) and, with a ``res`` schedule, its image size."""
        if self.loader is not None:
            self.loader.next_epoch = int(epoch)
        if self._schedule is not None:
            self.resolution = self._schedule(int(epoch))
            self._decoder.output_size = (self.resolution, self.resolution)

    def __len__(self) -> int:
        return len(self.loader) if self.loader is not None else 0

    def __iter__(self):
        if self.loader is None:  # a rank whose evaluation shard is empty
            return
        with _keep_torch_threads():
            it = iter(self.loader)
        for images, labels in it:
            yield self._post(images), labels.reshape(-1)


def _post_fn(p: Pipeline, *, device: torch.device, normalize: bool, dtype: torch.dtype,
             flatten: bool, mean, std, channels_last: bool) -> Callable:
    """Tensor work after FFCV's pipeline (see the module docstring for who normalizes where)."""
    if p.gray:
        # stored u = round(v * 255 / 16), v in 0..16: recover v exactly, normalize like
        # distributed_prune.data.digits ((v / 16 - mean) / std) through a 256-entry table.
        v = torch.round(torch.arange(256, dtype=torch.float64) * 16 / 255)
        table = ((v / 16 - mean[0]) / std[0]).to(dtype) if normalize else v.to(torch.uint8)
        table = table.to(device)

        def post(x):
            x = table[x[:, :1].long()]
            return x.flatten(1) if flatten else x
        return post
    if device.type != "cpu":
        layout = torch.channels_last if channels_last else torch.contiguous_format
        m = (torch.tensor(mean, dtype=torch.float32) * 255).to(device, dtype).view(1, -1, 1, 1)
        inv = (1 / (torch.tensor(std, dtype=torch.float32) * 255)).to(device, dtype)
        inv = inv.view(1, -1, 1, 1)

        def post(x):  # x: uint8 NCHW (channels_last view) on the device
            x = x.to(dtype).sub_(m).mul_(inv) if normalize else x
            x = x.contiguous(memory_format=layout)
            return x.flatten(1) if flatten else x
        return post
    cast = normalize and dtype != torch.float32

    def post(x):
        x = x.to(dtype) if cast else x
        return x.flatten(1) if flatten else x
    return post


def _image_ops(p: Pipeline, train: bool, size: int, *, device, normalize, channels_last, mean,
               std) -> list:
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    ops = p.decoders(train, size)
    if device.type == "cpu" and normalize and not p.gray:
        ops.append(NormalizeImage(np.array(mean) * 255, np.array(std) * 255, np.float32))
    ops.append(ToTensor())
    if device.type != "cpu":
        # FFCV allocates ToTorchImage's contiguous copy on the CPU: keep its channels_last
        # view on the GPU and let _post_fn change the layout.
        return ops + [ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    ops.append(ToTorchImage(channels_last=channels_last and not p.gray))
    return ops


def _label_ops(device) -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import ToDevice, ToTensor

    ops = [IntDecoder(), ToTensor()]
    if device.type != "cpu":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


def _rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UserError("distributed FFCV loading needs an initialized torch.distributed "
                        "process group (launch with torchrun)")
    return dist.get_rank(), dist.get_world_size()


def build_ffcv_loaders(train_path, val_path, *, pipeline: str = "imagenet", batch_size: int,
                       val_batch_size: int | None = None, num_workers: int | None = None,
                       device="cpu", distributed: bool = False, seed: int = 0,
                       os_cache: bool | None = None, res: Sequence[int] | None = None,
                       image_size: int = 224, val_image_size: int | None = None,
                       channels_last: bool = True, dtype="fp32", drop_last_train: bool = True,
                       normalize: bool = True, flatten: bool = False, mean=None, std=None,
                       batches_ahead: int = 3):
    """Build ``(train_loader, val_loader, DataInfo)`` over two .beton files.

    Either path may be None (that loader is then None). ``pipeline``: see :data:`PIPELINES`.
    ``num_workers``: FFCV decoding threads per process (default: all CPUs; pass cores per rank
    when several ranks share a node). ``res = (start, end, start_epoch, end_epoch)``: progressive
    train resolution (imagenet; applied by ``set_epoch``), else ``image_size``;
    ``val_image_size`` defaults to ``image_size``. ``dtype``: images' float type (fp32/fp16/
    bf16). ``normalize=False`` gives uint8 images. ``mean``/``std`` override the pipeline's.
    ``flatten`` gives (B, C*H*W) images (MLPs). See the module docstring for order, sharding,
    ``os_cache`` and buffer reuse.
    """
    require_ffcv()
    from .base import DataInfo

    with _keep_torch_threads():
        from ffcv.loader import Loader, OrderOption
    if pipeline not in PIPELINES:
        raise UserError(f"unknown FFCV pipeline {pipeline!r}; choose one of "
                        f"{', '.join(sorted(PIPELINES))}")
    if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
        raise UserError(f"batch size must be >= 1, got {batch_size} / {val_batch_size}")
    p = PIPELINES[pipeline]
    if p.gray and mean is None and normalize:  # (loads sklearn: only when needed)
        from .digits import train_pixel_stats

        m, s = train_pixel_stats()
        mean, std = (m,), (s,)
    mean, std = tuple(mean or p.mean), tuple(std or p.std)
    device = torch.device(device)
    dtype = dtypes.parse(dtype)
    import numba

    workers = min(int(num_workers or os.cpu_count() or 1), numba.config.NUMBA_NUM_THREADS)
    rank, world = _rank_world(distributed)
    infos = {k: validate_beton(v) for k, v in (("train", train_path), ("val", val_path)) if v}
    if not infos:
        raise UserError("build_ffcv_loaders needs a train or a val .beton path")
    val_size = val_image_size or image_size
    schedule = None
    if res is not None:
        if len(res) != 4 or min(res[:2]) < 32:
            raise UserError(f"res must be (start, end, start_epoch, end_epoch) with sizes >= 32, "
                            f"got {res!r}")
        schedule = functools.partial(resolution_at, start=int(res[0]), end=int(res[1]),
                                     start_epoch=int(res[2]), end_epoch=int(res[3]))
    common = dict(device=device, normalize=normalize, channels_last=channels_last, mean=mean,
                  std=std)
    post = _post_fn(p, device=device, normalize=normalize, dtype=dtype, flatten=flatten,
                    mean=mean, std=std, channels_last=channels_last)

    def make(path, info, train: bool):
        cache = info["bytes"] > OS_CACHE_THRESHOLD if os_cache is None else bool(os_cache)
        size = (schedule(0) if schedule else image_size) if train else val_size
        image_ops = _image_ops(p, train, size, **common)
        kwargs = dict(batch_size=batch_size if train else (val_batch_size or batch_size),
                      num_workers=workers, os_cache=cache, seed=seed, batches_ahead=batches_ahead,
                      pipelines={"image": image_ops, "label": _label_ops(device)})
        # fields beyond image/label (e.g. an index) are not decoded
        kwargs["pipelines"].update({f: None for f in info["fields"] if f not in ("image", "label")})
        n = info["num_samples"]
        if train:
            kwargs.update(order=OrderOption.RANDOM, distributed=distributed,
                          drop_last=drop_last_train)
            count = math.ceil(n / world)
        else:  # explicit disjoint slices: every sample once over all ranks (no padding)
            shard = np.array_split(np.arange(n, dtype=np.uint64), world)[rank]
            kwargs.update(order=OrderOption.SEQUENTIAL, distributed=False, drop_last=False,
                          indices=shard)
            count = len(shard)
            if count == 0:
                return FFCVLoader(None, post=post)
        decoder = image_ops[0]  # FFCV pops the decoder out of the list it is given
        with _keep_torch_threads():
            loader = Loader(str(path), **kwargs)
        return FFCVLoader(loader, post=post, decoder=decoder if train else None,
                          schedule=schedule if train else None, num_samples=count)

    train = make(train_path, infos["train"], True) if train_path else None
    val = make(val_path, infos["val"], False) if val_path else None
    channels = 1 if p.gray else 3
    side = p.fixed_size or val_size
    shape = (channels * side * side,) if flatten else (channels, side, side)
    num_classes = max(i["num_classes"] for i in infos.values())
    info = DataInfo(num_classes=num_classes, input_shape=shape, mean=mean, std=std,
                    name=pipeline)
    return train, val, info
