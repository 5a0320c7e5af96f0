"""Write FFCV ``.beton`` files: ``dprune data write-beton --dataset NAME --out FILE``.

Every file has two fields, in this order: ``image`` (:class:`ffcv.fields.RGBImageField`, 3-channel
uint8) and ``label`` (:class:`ffcv.fields.IntField`). Sources (:data:`SOURCES`):

==============  ==========================================================================
name            samples
==============  ==========================================================================
digits          scikit-learn's bundled 8x8 digits, the project's fixed split (stratified,
                ``test_size=0.25``, ``random_state=0``: 1,347 train / 450 val). Pixels 0..16
                are stored as ``round(p * 255 / 16)`` replicated to 3 channels (an
                RGBImageField needs 3); the ``digits`` loader pipeline reads channel 0 and
                maps the value back to ``p`` exactly. ``smart`` mode stores them raw.
synthetic       deterministic smooth RGB images (:class:`SyntheticImages`), ImageNet-like
                JPEG sizes; ``num_samples`` / ``image_size`` configurable, labels ``i % 10``.
cifar10/100     torchvision CIFAR at ``root`` (``download=False``).
imagefolder     torchvision ``ImageFolder`` at ``root/split`` if it exists, else ``root``;
imagenet        ``imagenet`` is the same with the ImageNet recipe's ``max_resolution=500``.
==============  ==========================================================================

Write modes are FFCV's: ``raw`` (uint8 pixels, lossless), ``jpg`` (all JPEG), ``proportion``
(each image JPEG with probability ``compress_probability``) and ``smart``, here: JPEG when the
raw image is larger than ``smart_threshold`` bytes (default 64*64*3, so digits and CIFAR stay
raw and ImageNet-sized images become JPEG). ffcv-imagenet's recipe for ResNet-50 is
``--mode proportion --max-resolution 500 --jpeg-quality 90`` (compress probability 0.5) for both
splits (ResNet-18: 400 px, probability 0.1).

The file is written to a temporary name next to ``out``, checked, then renamed: ``out`` is never
half-written. FFCV writes with ``num_workers`` processes; an exception inside one would leave
FFCV's writer waiting forever, so unreadable samples are recorded, replaced by a placeholder,
and reported after the workers finish as a :class:`~distributed_prune.errors.UserError` (and
nothing is written at ``out``).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import time
from unittest import mock
from pathlib import Path

import numpy as np

from .. import fileio
from ..cmdline import parse_image_size
from ..errors import UserError

MODES = ("smart", "jpg", "raw", "proportion")
SOURCES = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder", "imagenet")
SPLITS = ("train", "val")
DEFAULT_SMART_THRESHOLD = 64 * 64 * 3
IMAGENET_MAX_RESOLUTION = 500  # ffcv-imagenet's ResNet-50 setting
SMALL_PAGE, LARGE_PAGE = 1 << 21, 1 << 23  # FFCV's minimum page and its default page


# ----------------------------------------------------------------------------- sources

def digits_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(N, 8, 8) values 0..16 -> (N, 8, 8, 3) uint8 ``round(p * 255 / 16)``."""
    u8 = np.rint(pixels.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(u8[..., None], 3, axis=-1)


class ArrayImages:
    """(image, label) pairs from a uint8 (N, H, W, 3) array and an int label array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class SyntheticImages:
    """Deterministic smooth RGB uint8 images, generated on access (the same in every process).

    Image ``i`` has label ``i % num_classes``; its content is a cubic-upsampled coarse random
    grid (photo-like low frequencies) tinted by its class, plus mild pixel noise, drawn from a
    generator seeded by ``(seed, split, i)``. ``size`` is ``(width, height)``; with
    ``size_jitter=j`` each image's sides are scaled by a factor in ``[1 - j, 1 + j]``.
    """

    def __init__(self, num_samples: int, size=(400, 350), *, num_classes: int = 10,
                 seed: int = 0, split: int = 0, size_jitter: float = 0.0):
        self.n, self.size, self.num_classes = int(num_samples), tuple(size), int(num_classes)
        self.seed, self.split, self.size_jitter = int(seed), int(split), float(size_jitter)
        tints = np.random.default_rng([self.seed, 12345]).uniform(-60, 60, (self.num_classes, 3))
        self.tints = tints.astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import cv2

        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.split, int(i)])
        w, h = self.size
        if self.size_jitter:
            w, h = (max(8, int(round(s * rng.uniform(1 - self.size_jitter, 1 + self.size_jitter))))
                    for s in (w, h))
        coarse = rng.uniform(0, 255, (h // 48 + 2, w // 48 + 2, 3)).astype(np.float32)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        label = int(i) % self.num_classes
        img += self.tints[label] + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.uint8), label


def _require_root(root, name: str) -> Path:
    if not root:
        raise UserError(f"--root is required for dataset {name!r} (nothing is downloaded)")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root for {name!r} does not exist or is not a directory")
    return root


def _torchvision(cls_name: str, root, split: str, name: str):
    import torchvision.datasets as tvd

    root = _require_root(root, name)
    try:
        return getattr(tvd, cls_name)(str(root), train=split == "train", download=False)
    except (RuntimeError, OSError) as exc:  # torchvision: "Dataset not found or corrupted."
        raise UserError(f"{root}: cannot read {name} ({exc})") from None


def _imagefolder(root, split: str, name: str):
    from torchvision.datasets import ImageFolder

    root = _require_root(root, name)
    path = root / split if (root / split).is_dir() else root
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"{path}: not an image folder tree for {name!r} ({exc})") from None


def open_source(name: str, split: str = "train", root=None, *, num_samples=None,
                image_size=None, seed: int = 0):
    """The indexable (image, label) source named ``name`` (see the module docstring).

    Returns ``(dataset, max_raw_bytes)``; the second is the largest raw image size in bytes
    when known up front (used to pick FFCV's page size), else None.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "digits":
        from .digits import digits_split

        pixels, labels = digits_split(split)
        return ArrayImages(digits_to_rgb(pixels), labels), 8 * 8 * 3
    if name == "synthetic":
        n = num_samples or (1000 if split == "train" else 200)
        w, h = image_size or (400, 350)
        return SyntheticImages(n, (w, h), seed=seed, split=SPLITS.index(split)), w * h * 3
    if name in ("cifar10", "cifar100"):
        return _torchvision(name.upper(), root, split, name), 32 * 32 * 3
    if name in ("imagefolder", "imagenet"):
        return _imagefolder(root, split, name), None
    raise UserError(f"unknown dataset {name!r} for write-beton; choose one of {', '.join(SOURCES)}")


# ----------------------------------------------------------------------------- writing

def to_hwc_uint8(image) -> np.ndarray:
    """PIL image, uint8/float numpy (HxW, HxWxC) or tensor (CxHxW) -> contiguous HxWx3 uint8.

    Floats are taken to be in [0, 1] (what ``ToTensor`` gives); 1 channel is replicated, an
    alpha channel dropped.
    """
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch tensor, CxHxW
        image = image.detach().cpu()
        image = image.permute(1, 2, 0).numpy() if image.ndim == 3 else image.numpy()
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image, got an array of shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"unsupported image dtype {a.dtype}")
        a = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def _stored_raw_bytes(h: int, w: int, max_resolution) -> int:
    """Raw size after FFCV's resizer (longest side scaled down to max_resolution)."""
    if max_resolution and max(h, w) > max_resolution:
        r = max_resolution / max(h, w)
        h, w = int(r * h), int(r * w)
    return h * w * 3


class _GuardedSamples:
    """Wraps a source for FFCV's writer workers: converts images, never raises.

    FFCV's writer polls a counter until every sample is done; a worker that dies on an
    exception would make it wait forever. Failures are appended to ``error_file`` instead and
    a 1x1 placeholder is written; :func:`write_dataset` turns them into a UserError.
    """

    def __init__(self, dataset, error_file: str, max_bytes: int, max_resolution):
        self.dataset, self.error_file = dataset, error_file
        self.max_bytes, self.max_resolution = max_bytes, max_resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def _where(self, i: int) -> str:
        samples = getattr(self.dataset, "samples", None)  # ImageFolder keeps (path, class)
        return str(samples[i][0]) if samples is not None else f"sample {i}"

    def __getitem__(self, i):
        try:
            image, label = self.dataset[i]
            image = to_hwc_uint8(image)
            size = _stored_raw_bytes(image.shape[0], image.shape[1], self.max_resolution)
            if size > self.max_bytes:
                raise ValueError(f"{image.shape[1]}x{image.shape[0]} image does not fit an FFCV "
                                 "page; pass --max-resolution")
            return image, int(label)
        except Exception as exc:  # noqa: BLE001 - reported after the workers finish
            with open(self.error_file, "a") as f:
                f.write(f"{self._where(i)}: {type(exc).__name__}: {exc}".replace("\n", " ") + "\n")
            return np.zeros((1, 1, 3), np.uint8), 0


def _fields(mode, max_resolution, jpeg_quality, compress_probability, smart_threshold):
    from ffcv.fields import IntField, RGBImageField

    image = RGBImageField(write_mode=mode, max_resolution=max_resolution,
                          smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                          compress_probability=compress_probability)
    return {"image": image, "label": IntField()}


def write_dataset(dataset, out, *, mode: str = "smart", max_resolution=None,
                  jpeg_quality: int = 90, compress_probability: float = 0.5,
                  smart_threshold: int = DEFAULT_SMART_THRESHOLD, num_workers=None,
                  progress: bool = True, page_size: int = LARGE_PAGE) -> dict:
    """Write any indexable ``dataset`` of (image, label) to the .beton ``out``, atomically.

    Images may be PIL images, uint8 HxWxC arrays or float CxHxW tensors in [0, 1]. Returns a
    summary: ``path, num_samples, num_classes, bytes, seconds, mode, max_resolution,
    jpeg_quality, compress_probability``.
    """
    from .ffcv import require_ffcv, validate_beton

    require_ffcv()
    import ffcv.writer
    from ffcv.writer import DatasetWriter

    if mode not in MODES:
        raise UserError(f"unknown beton write mode {mode!r}; choose one of {', '.join(MODES)}")
    if not 0 < int(jpeg_quality) <= 100:
        raise UserError(f"jpeg quality must be in 1..100, got {jpeg_quality}")
    n = len(dataset)
    if n == 0:
        raise UserError("the dataset to write is empty")
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: output directory does not exist")
    workers = int(num_workers or min(os.cpu_count() or 1, 8))
    workers = max(1, min(workers, (n + 99) // 100))  # FFCV hands out chunks of 100 samples

    # FFCV's writer opens the file by name: write it under a temp name, renamed when complete
    start = time.perf_counter()
    with fileio.atomic_path(out) as tmp_path:
        tmp = str(tmp_path)
        errors = tmp + ".errors"
        # FFCV's writer always shows a tqdm bar: hide it by swapping the name it calls.
        quiet = contextlib.nullcontext() if progress else mock.patch.object(
            ffcv.writer, "tqdm", functools.partial(ffcv.writer.tqdm, disable=True))
        try:
            guarded = _GuardedSamples(dataset, errors, page_size, max_resolution)
            writer = DatasetWriter(tmp, _fields(mode, max_resolution, jpeg_quality,
                                                compress_probability, smart_threshold),
                                   page_size=page_size, num_workers=workers)
            with quiet:
                writer.from_indexed_dataset(guarded)
            if os.path.exists(errors):
                with open(errors) as f:
                    bad = f.read().splitlines()
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise UserError(f"cannot write {out}: {bad[0]}{more}")
            info = validate_beton(tmp)
            if info["num_samples"] != n:
                raise RuntimeError(f"FFCV wrote {info['num_samples']} samples, expected {n}")
        finally:
            if os.path.exists(errors):
                os.remove(errors)
    return {"path": str(out), "num_samples": n, "num_classes": info["num_classes"],
            "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - start, 3),
            "mode": mode, "max_resolution": max_resolution, "jpeg_quality": int(jpeg_quality),
            "compress_probability": compress_probability}


def write_beton(dataset_name: str, *, split: str = "train", root=None, out, mode: str = "smart",
                max_resolution=None, jpeg_quality: int = 90, compress_probability: float = 0.5,
                num_workers=None, progress: bool = True, num_samples=None, image_size=None,
                seed: int = 0) -> dict:
    """Write split ``split`` of source ``dataset_name`` to the .beton ``out``; return a summary.

    ``max_resolution`` defaults to 500 for ``imagenet`` and to no resizing otherwise;
    ``num_samples`` / ``image_size`` ((width, height)) / ``seed`` only apply to ``synthetic``.
    Bad input (unknown name, missing or unreadable source) raises UserError naming it.
    """
    dataset, max_raw = open_source(dataset_name, split, root, num_samples=num_samples,
                                   image_size=image_size, seed=seed)
    if max_resolution is None and dataset_name == "imagenet":
        max_resolution = IMAGENET_MAX_RESOLUTION
    # Small images waste less of FFCV's per-worker last page with its smallest page size.
    page = SMALL_PAGE if max_raw is not None and max_raw <= SMALL_PAGE // 8 else LARGE_PAGE
    summary = write_dataset(dataset, out, mode=mode, max_resolution=max_resolution,
                            jpeg_quality=jpeg_quality, compress_probability=compress_probability,
                            num_workers=num_workers, progress=progress, page_size=page)
    return {"dataset": dataset_name, "split": split, **summary}


# ----------------------------------------------------------------------------- CLI

def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad option values before any source is opened or file written (one UserError each)."""
    out = str(args.out)
    if not out.strip() or "\0" in out:
        raise UserError(f"--out {args.out!r}: expected a .beton file name")
    if Path(out).is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name like {Path(out) / 'train.beton'}")
    if not Path(out).parent.is_dir():
        raise UserError(f"--out {out}: directory {Path(out).parent} does not exist")
    for opt, value in (("--num-samples", args.num_samples), ("--max-resolution", args.max_resolution),
                       ("--num-workers", args.num_workers)):
        if value is not None and value < 1:
            raise UserError(f"{opt}: must be >= 1, got {value}")
    if not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality: must lie in 1..100, got {args.jpeg_quality}")
    if not 0.0 <= args.compress_probability <= 1.0:  # also refuses nan
        raise UserError(f"--compress-probability: must lie in [0, 1], got {args.compress_probability}")
    if not 0 <= args.seed <= 2**32 - 1:
        raise UserError(f"--seed: must lie in 0..{2**32 - 1}, got {args.seed}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dprune data write-beton``."""
    parser.add_argument("--dataset", required=True, choices=SOURCES)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--root", help="dataset root (cifar*, imagefolder, imagenet)")
    parser.add_argument("--out", required=True, help="output .beton file")
    parser.add_argument("--mode", default="smart", choices=MODES)
    parser.add_argument("--max-resolution", type=int, default=None,
                        help="longest stored side (default: 500 for imagenet, else unchanged)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--compress-probability", type=float, default=0.5,
                        help="JPEG fraction in --mode proportion")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=None, help="synthetic only")
    parser.add_argument("--image-size", type=parse_image_size, default=None,
                        help="synthetic only: WIDTHxHEIGHT (default 400x350)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic only")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    """Run ``dprune data write-beton``; prints the summary. UserError propagates (exit 2)."""
    import json

    check_arguments(args)
    summary = write_beton(args.dataset, split=args.split, root=args.root, out=args.out,
                          mode=args.mode, max_resolution=args.max_resolution,
                          jpeg_quality=args.jpeg_quality,
                          compress_probability=args.compress_probability,
                          num_workers=args.num_workers, progress=not args.no_progress,
                          num_samples=args.num_samples, image_size=args.image_size,
                          seed=args.seed)
    print(json.dumps(summary))
    return 0
