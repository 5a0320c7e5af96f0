"""torchvision's pretrained weights by name (``model.weights: IMAGENET1K_V1``, ``--weights DEFAULT``).

Resolution goes through torchvision's own weights API (``get_model_weights(name)[WEIGHTS]``) and
torch.hub's cache: ``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``. A machine with
network access downloads the file once; an offline machine loads the cached file. A file that is
neither cached nor downloadable is a :class:`UserError` naming the file, the directory to put it
in and the URL to get it from.

    net = create_pretrained("resnet50", "IMAGENET1K_V1")                 # 1000 ImageNet classes
    net = create_pretrained("resnet18", "DEFAULT", num_classes=10, new_head=True)

``new_head``: the layers whose shape depends on the number of classes (``fc``, ``classifier.6``,
``heads.head``, an Inception auxiliary head, ...) are replaced by freshly initialised ones with
``num_classes`` outputs (torchvision's own init, drawn from the current torch RNG); every other
weight is the pretrained one. Without it, a ``num_classes`` different from the weights' classes is
an error.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from ..errors import UserError


def _enum(model_name: str):
    import torchvision.models as tvm

    from .tv import torchvision_classifiers

    if model_name not in torchvision_classifiers():
        raise UserError(f"model.weights: {model_name!r} is not a torchvision classifier "
                        "(pretrained weights by name exist for torchvision models only)")
    return tvm.get_model_weights(model_name)


def weight_names(model_name: str) -> list[str]:
    """The names ``model.weights`` accepts for ``model_name`` (``DEFAULT`` included)."""
    return list(_enum(model_name).__members__)


def resolve(model_name: str, weights: str):
    """The torchvision ``WeightsEnum`` member for ``weights`` (``IMAGENET1K_V1``, ``DEFAULT``, or
    the full ``ResNet50_Weights.IMAGENET1K_V1``)."""
    enum = _enum(model_name)
    key = str(weights)
    if "." in key:
        prefix, key = key.split(".", 1)
        if prefix != enum.__name__:
            raise UserError(f"model.weights: {weights!r} are not weights of {model_name} ({enum.__name__})")
    try:
        return enum[key]
    except KeyError:
        raise UserError(f"model.weights: {model_name} has no weights {weights!r} "
                        f"(choose from {', '.join(enum.__members__)})") from None


def num_classes_of(weights) -> int:
    return len(weights.meta["categories"])


def cache_file(weights) -> Path:
    """Where torch.hub keeps (and looks for) the weights file: $TORCH_HOME/hub/checkpoints/NAME."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _fetch(weights, model_name: str, progress: bool) -> Path:
    """The cached weights file, downloaded first when missing (torch.hub checks the hash prefix of
    the file name on download)."""
    path = cache_file(weights)
    if path.is_file():
        return path
    created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=_hash_prefix(path.name),
                                       progress=progress)
    except Exception as e:  # offline (URLError), proxy refusal, hash mismatch, read-only cache
        for d in created:  # leave no empty cache directories behind
            try:
                d.rmdir()
            except OSError:
                break
        raise UserError(f"model.weights {model_name} {weights.name}: {path.name} is not in {path.parent} "
                        f"and could not be downloaded ({type(e).__name__}); download {weights.url} "
                        f"and put it there (or set TORCH_HOME)") from None
    return path


def _hash_prefix(file_name: str) -> str | None:
    # torchvision file names end in -<first hex digits of the sha256>.pth (torch.hub's convention)
    stem = file_name.rsplit(".", 1)[0]
    tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    return tail if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail) else None


def create_pretrained(model_name: str, weights: str, num_classes: int | None = None,
                      new_head: bool = False, progress: bool = False, **kwargs) -> nn.Module:
    """torchvision model ``model_name`` with the pretrained ``weights`` loaded (weights only).

    ``num_classes``: None keeps the weights' classes; a different count needs ``new_head=True``.
    """
    import torchvision.models as tvm

    w = resolve(model_name, weights)
    classes = num_classes_of(w)
    if num_classes is not None and num_classes != classes and not new_head:
        raise UserError(f"model.num_classes: {num_classes} differs from the {classes} classes of "
                        f"{model_name} weights {w.name}; ask for a new classifier head "
                        "(model.new_head: true, or --new-head)")
    path = _fetch(w, model_name, progress)
    try:
        # the builder applies the weights' own constructor settings (e.g. GoogLeNet's
        # transform_input) and loads the now-cached file through torch.hub (weights_only)
        net = tvm.get_model(model_name, weights=w, **kwargs)
    except UserError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:  # truncated, foreign
        raise UserError(f"model.weights {model_name} {w.name}: cannot load {path} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                        "delete it to download it again") from None
    if num_classes is not None and num_classes != classes:
        net = _replace_head(net, model_name, num_classes, kwargs)
    return net


def architecture_kwargs(model_name: str, weights) -> dict:
    """Constructor settings torchvision's builders force when they load ``weights`` (torchvision
    0.19-0.29: GoogLeNet / Inception-v3 normalise their input themselves, GoogLeNet has no
    auxiliary heads, ViT and MaxViT take
    the weights' image size), so a model can be rebuilt with the same architecture and forward
    pass without reading the weights file (loading a pruned checkpoint of it)."""
    kw = {}
    if model_name in ("googlenet", "inception_v3"):
        kw.update(transform_input=True, init_weights=False)
    if model_name == "googlenet":  # its builder drops the (untrained) auxiliary heads
        kw["aux_logits"] = False
    size = weights.meta.get("min_size")
    if model_name.startswith("vit_") and size:
        kw["image_size"] = size[0]
    if model_name.startswith("maxvit") and size:
        kw["input_size"] = size
    return kw


def create_architecture(model_name: str, weights: str, num_classes: int | None = None,
                        new_head: bool = False, **kwargs) -> nn.Module:
    """The model :func:`create_pretrained` builds, with random weights and nothing read or
    downloaded: the skeleton a checkpoint of a run that started from ``weights`` is loaded into."""
    import torchvision.models as tvm

    w = resolve(model_name, weights)
    classes = num_classes_of(w) if num_classes is None or not new_head else num_classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tvm.get_model(model_name, weights=None, num_classes=classes,
                             **{**architecture_kwargs(model_name, w), **kwargs})


def head_modules(net: nn.Module, other: nn.Module) -> list[str]:
    """Names of the modules owning a parameter whose shape differs between two instances of the
    same architecture built with different class counts: the classifier head(s)."""
    theirs = dict(other.named_parameters())
    names = []
    for k, p in net.named_parameters():
        if k in theirs and theirs[k].shape != p.shape:
            mod = k.rsplit(".", 1)[0]
            if mod not in names:
                names.append(mod)
    return names


def _replace_head(net, model_name, num_classes, kwargs):
    import torchvision.models as tvm

    with warnings.catch_warnings():  # GoogLeNet/Inception warn about their default init
        warnings.simplefilter("ignore")
        fresh = tvm.get_model(model_name, weights=None, num_classes=num_classes, **kwargs)
    heads = head_modules(net, fresh)
    if not heads:
        raise UserError(f"model.new_head: found no classifier layer of {model_name} to replace")
    for name in heads:
        net.set_submodule(name, fresh.get_submodule(name))
    return net
