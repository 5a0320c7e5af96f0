"""Checkpoints: the unwrapped model's state_dict + plan JSON + resolved config (+ training state),
written atomically (temp file, fsync, rename) and loadable with ``torch.load(weights_only=True)``.
Never a pickled module."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn

from . import fileio
from .errors import UserError


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``), torch.compile (``_orig_mod``) and DeepSpeed engine wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`distributed_prune.fileio.write_with` (temp file, fsync,
    rename): a reader sees the old file or the complete new one, never a partial write."""
    return fileio.write_with(path, lambda f: torch.save(obj, f))


def save(path, model: nn.Module, *, plan=None, config: dict | None = None, **extra) -> Path:
    """Write a checkpoint of ``model`` (unwrapped first). ``extra`` holds training state
    (optimizer, scheduler, epoch, rng) as weights-only-loadable values."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    obj = {"format": "distributed_prune/1", "state_dict": state,
           "plan": plan.to_json() if plan is not None and not isinstance(plan, str) else plan,
           "config": config or {}, **extra}
    return atomic_save(obj, path)


def load(path) -> dict:
    """Read a checkpoint (weights only). Missing, truncated or foreign files raise UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong format, unpickling refused
        raise UserError(f"checkpoint {path}: unreadable or corrupt ({type(e).__name__})") from None
    if isinstance(obj, dict) and obj and "state_dict" not in obj and \
            all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = {"state_dict": obj, "plan": None, "config": {}}  # a plain state_dict (e.g. torchvision .pth)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise UserError(f"checkpoint {path}: not a distributed_prune checkpoint")
    return obj


def load_state(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> nn.Module:
    """``load_state_dict`` that names the first mismatched key instead of dumping a list."""
    own = unwrap(model).state_dict()
    for k, v in state_dict.items():
        if k not in own:
            raise UserError(f"{source}: key {k!r} does not exist in the model (wrong architecture or plan?)")
        if tuple(own[k].shape) != tuple(v.shape):
            raise UserError(f"{source}: key {k!r} has shape {tuple(v.shape)} in the file but "
                            f"{tuple(own[k].shape)} in the model (wrong architecture or plan?)")
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise UserError(f"{source}: key {missing[0]!r} of the model is missing from the file")
    unwrap(model).load_state_dict(state_dict)
    return model


def weights_sha256(model_or_state) -> str:
    """sha256 over the state_dict's names, dtypes, shapes and bytes, in key order: identifies a
    base model independently of file layout (bit-identical weights <=> same hash)."""
    sd = model_or_state if isinstance(model_or_state, dict) else unwrap(model_or_state).state_dict()
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
