"""The pruned model out of a run: load it back in one call, or export it for deployment.

    import distributed_prune
    net = distributed_prune.load("runs/debug_cpu")                  # or a checkpoint file
    dprune export runs/debug_cpu --format onnx                       # -> runs/debug_cpu/export/pruned.onnx
    dprune export runs/debug_cpu --format torch-export --out pruned.pt2 --input-size 1,8,8
    dprune export runs/debug_cpu --format state-dict --out pruned.pt

:func:`load` rebuilds the architecture from the checkpoint's own resolved config and plan
(``models.create`` then ``prune.replay``), loads the weights with ``torch.load(weights_only=True)``
and returns the model in eval mode. A run directory gives its final checkpoint (or, for a run
still retraining, its newest pruned one).

Formats: ``onnx`` (one self-contained file, dynamic batch axis, input ``input``, output
``logits``; needs the ``export`` extra), ``torch-export`` (``torch.export.save`` of the
``ExportedProgram``, dynamic batch axis; ``torch.export.load(f).module()(x)``) and ``state-dict``
(the project's checkpoint format without training state: state_dict + plan + config, which
:func:`load` reads back). Files are written to a temporary name and renamed: nothing half-written.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import models, prune
from .errors import UserError

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2", "state-dict": ".pt"}


# --------------------------------------------------------------------------- load
def checkpoint_of(path) -> Path:
    """The checkpoint a run directory's pruned model is in: ``final.pt``, else the newest
    retraining epoch, else ``pruned.pt``. A file is returned as it is."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory or checkpoint")
    d = path / "checkpoints"
    if (d / "final.pt").is_file():
        return d / "final.pt"
    epochs = sorted((p for p in d.glob("retrain-*.pt") if p.stem.rsplit("-", 1)[-1].isdigit()),
                    key=lambda p: int(p.stem.rsplit("-", 1)[-1]))
    if epochs:
        return epochs[-1]
    if (d / "pruned.pt").is_file():
        return d / "pruned.pt"
    raise UserError(f"{path}: no plan in the run (no pruned checkpoint in {d}: the run has not "
                    "reached its pruning step)")


def _build(mcfg, input_shape, num_classes):
    if mcfg.weights:
        from .models.pretrained import create_architecture

        return create_architecture(mcfg.name, mcfg.weights, num_classes=num_classes,
                                   new_head=mcfg.new_head, **mcfg.kwargs)
    return models.create_for_input(mcfg.name, num_classes, input_shape, **mcfg.kwargs)


def _num_classes(mcfg, input_shape, state_dict, source):
    """``model.num_classes`` or, when it came from the dataset, the width of the classifier in
    the saved weights (found as the layers whose shape follows the class count)."""
    if mcfg.num_classes:
        return mcfg.num_classes
    if mcfg.weights and not mcfg.new_head:
        return None  # the pretrained weights' own classes
    from .models.pretrained import head_modules

    heads = head_modules(_build(mcfg, input_shape, 2), _build(mcfg, input_shape, 3))
    for h in heads:
        w = state_dict.get(f"{h}.weight")
        if w is not None:
            return int(w.shape[0])
    raise UserError(f"{source}: cannot tell the number of classes (set model.num_classes)")


def load_checkpoint(path, device="cpu") -> tuple[nn.Module, prune.Plan, dict]:
    """(pruned model in eval mode, its plan, the checkpoint's resolved config as a dict)."""
    src = checkpoint_of(path)
    obj = ckpt.load(src)
    if not obj.get("plan"):
        raise UserError(f"{src}: no plan in the checkpoint (a dense model: only checkpoints after "
                        "the pruning step hold the pruned architecture)")
    if not obj.get("config"):
        raise UserError(f"{src}: no config in the checkpoint (cannot tell which model it is)")
    plan = prune.Plan.from_json(obj["plan"])
    cfg = config_mod.from_dict({k: v for k, v in obj["config"].items()})
    state = obj["state_dict"]
    with torch.enable_grad():  # the replay traces with autograd: works inside a caller's no_grad()
        net = _build(cfg.model, plan.input_shape, _num_classes(cfg.model, plan.input_shape, state, src))
        net = prune.replay(net, plan)
    ckpt.load_state(net, state, source=f"checkpoint {src}")
    return net.to(device).eval(), plan, obj["config"]


def load(path, device="cpu") -> nn.Module:
    """The pruned model of a run directory or checkpoint: architecture replayed from the plan,
    weights loaded (weights only), eval mode."""
    return load_checkpoint(path, device)[0]


# --------------------------------------------------------------------------- export
def default_out(path, fmt: str) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / "export" / f"pruned{FORMATS[fmt]}"
    return path.with_name(f"{path.stem}{FORMATS[fmt]}")


def _needs(fmt, *packages):
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"--format {fmt} needs {', '.join(missing)}: pip install 'distributed_prune[export]'")


def _temp_in(out: Path) -> Path:
    """A temporary file next to ``out`` (same file system, so the final rename is atomic);
    an unwritable destination is a UserError before anything is exported."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix or ".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None
    return Path(tmp)


def export(path, fmt: str, out=None, input_size=None) -> Path:
    """Write the pruned model of run directory / checkpoint ``path`` as ``fmt``; returns the file.
    ``input_size``: one sample's shape (default: the shape the plan was traced with)."""
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "onnx":
        _needs(fmt, "onnx", "onnxscript")
    net, plan, cfg = load_checkpoint(path)
    shape = tuple(input_size or plan.input_shape)
    # batch 2, not 1: the exporters would specialise a batch of 1 to a constant
    x = torch.randn(2, *shape)
    try:
        with torch.no_grad():
            net(x)
    except RuntimeError as e:
        raise UserError(f"--input-size {','.join(map(str, shape))}: the model cannot run on it "
                        f"({str(e).splitlines()[0]})") from None
    out = Path(out) if out else default_out(path, fmt)
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory (give a file name)")
    tmp = _temp_in(out)
    try:
        _WRITERS[fmt](net, x, tmp, plan, cfg)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it private; give it a normal file's mode
        os.replace(tmp, out)
    except UserError:
        raise
    except Exception as e:  # an operator the exporter cannot handle: say which, no traceback
        raise UserError(f"--format {fmt}: exporting {path} failed ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=1 << 16)


def _write_onnx(net, x, tmp, plan, cfg):
    torch.onnx.export(net, (x,), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: _batch_dim()},), external_data=False, dynamo=True,
                      verbose=False)


def _write_torch_export(net, x, tmp, plan, cfg):
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(ep, str(tmp))


def _write_state_dict(net, x, tmp, plan, cfg):
    # the checkpoint format without training state: load() reads it back
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with open(tmp, "wb") as f:
        torch.save({"format": "distributed_prune/1", "state_dict": state, "plan": plan.to_json(),
                    "config": cfg}, f)
        f.flush()
        os.fsync(f.fileno())


_WRITERS = {"onnx": _write_onnx, "torch-export": _write_torch_export, "state-dict": _write_state_dict}
