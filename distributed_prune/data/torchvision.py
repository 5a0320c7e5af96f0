"""torchvision-format datasets read from local files; nothing is ever downloaded.

- ``cifar10`` / ``cifar100``: ``data.train_path`` is the root holding ``cifar-10-batches-py`` /
  ``cifar-100-python`` (``data.val_path`` defaults to it). Train: RandomCrop(32, padding 4) +
  horizontal flip + normalize; val: normalize.
- ``mnist``: root holding ``MNIST/raw``; resized to ``input_size`` (default 28; 32 for MLP-7) and
  normalized, no augmentation.
- ``imagefolder`` / ``imagenet``: ``ImageFolder`` trees (one folder per class) at ``train_path``
  and ``val_path``; train RandomResizedCrop(S) + flip, val Resize(S*256/224) + CenterCrop(S),
  S = ``input_size`` (default 224), ImageNet mean/std.

``flatten`` appends a flattening transform (MLPs). torchvision is imported on first use only.
"""
from __future__ import annotations

import functools
import math
import os

from ..errors import UserError
from .base import DataInfo, check_num_classes, register_dataset, spatial_size

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Flatten:
    """Transform: tensor -> 1-D (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, x):
        return x.reshape(-1)


def _require_dir(key: str, path, name: str) -> str:
    if not path:
        raise UserError(f"{key} is required for dataset {name!r} (no download is attempted)")
    if not os.path.isdir(path):
        raise UserError(f"{key}={path!r} for dataset {name!r} does not exist or is not a "
                        "directory (no download is attempted)")
    return str(path)


def _finish(steps: list, mean, std, flatten: bool):
    from torchvision import transforms as T

    steps = steps + [T.ToTensor(), T.Normalize(mean, std)]
    if flatten:
        steps.append(Flatten())
    return T.Compose(steps)


def _info(name, classes, size, channels, mean, std, flatten) -> DataInfo:
    shape = (channels * size[0] * size[1],) if flatten else (channels, *size)
    return DataInfo(num_classes=classes, input_shape=shape, mean=tuple(mean), std=tuple(std),
                    name=name)


def _open(cls, key: str, root: str, name: str, expect: str | None = None, **kwargs):
    """Construct a torchvision dataset; its 'not found' errors become a UserError naming root.

    ``expect`` describes the files torchvision looks for (its own message suggests download=True,
    which this project never does); without it torchvision's message is quoted, shortened.
    """
    try:
        return cls(root, **kwargs)
    except (RuntimeError, FileNotFoundError) as e:
        why = expect or " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(f"{key}={root!r}: cannot read dataset {name!r} ({why}); "
                        "no download is attempted") from None


def _cifar(name: str, n_classes: int, mean, std):
    @register_dataset(name)
    def build(*, train_path=None, val_path=None, input_size=None, flatten=False, seed=0,
              synthetic_size=None, num_classes=None):
        from torchvision import datasets
        from torchvision import transforms as T

        check_num_classes(num_classes, n_classes, name)
        size = spatial_size(input_size, name, default=(32, 32))
        resize = [] if size == (32, 32) else [T.Resize(size)]
        train_root = _require_dir("data.train_path", train_path, name)
        val_root = _require_dir("data.val_path", val_path or train_path, name)
        cls = datasets.CIFAR10 if n_classes == 10 else datasets.CIFAR100
        folder = cls.base_folder
        train_tf = _finish(resize + [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()],
                           mean, std, flatten)
        expect = f"expected torchvision's {folder}/ under it"
        train = _open(cls, "data.train_path", train_root, name, expect, train=True, download=False,
                      transform=train_tf)
        val = _open(cls, "data.val_path", val_root, name, expect, train=False, download=False,
                    transform=_finish(resize, mean, std, flatten))
        return train, val, _info(name, n_classes, size, 3, mean, std, flatten)

    build.__doc__ = f"{name} from local files in torchvision's layout (see module docstring)."
    return build


build_cifar10 = _cifar("cifar10", 10, CIFAR10_MEAN, CIFAR10_STD)
build_cifar100 = _cifar("cifar100", 100, CIFAR100_MEAN, CIFAR100_STD)


_MNIST_EXPECT = "expected torchvision's MNIST/raw/ files under it"


@register_dataset("mnist")
def build_mnist(*, train_path=None, val_path=None, input_size=None, flatten=False, seed=0,
                synthetic_size=None, num_classes=None):
    """MNIST from local files, resized to ``input_size`` (default 28) and normalized."""
    from torchvision import datasets
    from torchvision import transforms as T

    check_num_classes(num_classes, 10, "mnist")
    size = spatial_size(input_size, "mnist", default=(28, 28))
    tf = _finish([] if size == (28, 28) else [T.Resize(size)], MNIST_MEAN, MNIST_STD, flatten)
    train_root = _require_dir("data.train_path", train_path, "mnist")
    val_root = _require_dir("data.val_path", val_path or train_path, "mnist")
    train = _open(datasets.MNIST, "data.train_path", train_root, "mnist", _MNIST_EXPECT, train=True,
                  download=False, transform=tf)
    val = _open(datasets.MNIST, "data.val_path", val_root, "mnist", _MNIST_EXPECT, train=False,
                download=False, transform=tf)
    return train, val, _info("mnist", 10, size, 1, MNIST_MEAN, MNIST_STD, flatten)


def _build_folder(name: str, *, train_path=None, val_path=None, input_size=None, flatten=False,
                  num_classes=None, seed=0, synthetic_size=None):
    """``imagefolder``: any ImageFolder tree (e.g. ImageNet100); ``imagenet``: ImageNet with
    train/ and val/ in that layout (val sorted into class folders). The class count is taken
    from the train folders."""
    from torchvision import datasets
    from torchvision import transforms as T

    size = spatial_size(input_size, name, default=(224, 224))
    train_root = _require_dir("data.train_path", train_path, name)
    val_root = _require_dir("data.val_path", val_path, name)
    train_tf = _finish([T.RandomResizedCrop(size), T.RandomHorizontalFlip()],
                       IMAGENET_MEAN, IMAGENET_STD, flatten)
    val_tf = _finish([T.Resize(int(math.floor(min(size) * 256 / 224 + 0.5))), T.CenterCrop(size)],
                     IMAGENET_MEAN, IMAGENET_STD, flatten)
    train = _open(datasets.ImageFolder, "data.train_path", train_root, name, transform=train_tf)
    val = _open(datasets.ImageFolder, "data.val_path", val_root, name, transform=val_tf)
    if val.classes != train.classes:
        raise UserError(f"data.val_path={val_root!r} has class folders that differ from "
                        f"data.train_path={train_root!r} ({len(val.classes)} vs "
                        f"{len(train.classes)}); labels would not match")
    classes = check_num_classes(num_classes, len(train.classes), name)
    return train, val, _info(name, classes, size, 3, IMAGENET_MEAN, IMAGENET_STD, flatten)


for _name in ("imagefolder", "imagenet"):
    register_dataset(_name)(functools.partial(_build_folder, _name))
