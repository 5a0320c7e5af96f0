"""Backend selection for the kernels: ``reference`` (pure PyTorch), ``triton``, ``native`` (csrc).

Rules (``auto``, the default):

* Triton when the tensors are on CUDA and ``triton`` imports, or when ``TRITON_INTERPRET=1``
  (the Triton interpreter runs the same kernels on CPU tensors; used by the tests).
* Otherwise the pure-PyTorch reference.  Without a GPU and without the interpreter a Triton launch
  fails ("0 active drivers"), so this fallback is required, not an optimisation.
* For ``masked_conv2d`` a measured table (``tuning.json``, written by
  ``dprune bench kernels --write-tuning``) may pick ``native`` instead, per shape bucket.  With no
  entry the rule above applies: the choice comes from measurements, never from a guess.

Forcing: ``DPRUNE_KERNELS=reference|triton|native|auto`` (read at every call), or
``set_backend(name)``, which also works as a context manager and wins over the variable.
A forced backend that cannot run raises a ``RuntimeError`` rather than silently falling back.
Triton is imported lazily: importing this module has no side effects.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from . import reference
from .triton import interpreter_enabled

__all__ = ["BACKENDS", "set_backend", "get_backend", "select", "triton_usable",
           "filter_norms", "masked_conv2d", "compact_channels", "shape_bucket",
           "tuning_path", "load_tuning"]

BACKENDS = ("auto", "reference", "triton", "native")
ENV_VAR = "DPRUNE_KERNELS"
TUNING_ENV_VAR = "DPRUNE_TUNING_FILE"
# Ops that the csrc extension implements; others use the reference when "native" is forced.
NATIVE_OPS = frozenset({"masked_conv2d", "compact_channels"})

_override: str | None = None
_lock = threading.Lock()


class set_backend:
    """Force a backend process-wide: ``set_backend("triton")`` or ``with set_backend("reference"):``.

    As a plain call the setting stays until the next call (``set_backend(None)`` or ``"auto"``
    clears it); as a context manager the previous setting is restored on exit.
    """

    def __init__(self, name: str | None):
        global _override
        if name is not None and name not in BACKENDS:
            raise UserError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
        with _lock:
            self._previous = _override
            _override = None if name in (None, "auto") else name

    def __enter__(self) -> "set_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _override
        with _lock:
            _override = self._previous


def get_backend() -> str:
    """The requested backend name (``auto`` unless forced by ``set_backend`` or DPRUNE_KERNELS)."""
    if _override is not None:
        return _override
    name = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if name not in BACKENDS:
        raise UserError(f"{ENV_VAR}={name!r}: must be one of {', '.join(BACKENDS)}")
    return name


_triton_import_ok: bool | None = None


def _triton_importable() -> bool:
    global _triton_import_ok
    if _triton_import_ok is None:
        if importlib.util.find_spec("triton") is None:
            _triton_import_ok = False
        else:
            try:
                import triton  # noqa: F401  (lazy: only on first dispatch)
                _triton_import_ok = True
            except Exception:  # a broken install must not break the reference path
                _triton_import_ok = False
    return _triton_import_ok


def triton_usable(device: torch.device) -> bool:
    """True when a Triton kernel can run for tensors on ``device``."""
    if not _triton_importable():
        return False
    if interpreter_enabled():
        return True
    return device.type == "cuda" and torch.cuda.is_available()


def _native_loaded() -> bool:
    from . import native
    return native.available(build=False)


# ---------------------------------------------------------------------------------------------
# Measured tuning table
# ---------------------------------------------------------------------------------------------

def _pow2_bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def shape_bucket(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                 groups: int, active_fraction: float) -> str:
    """Key of the tuning table for one masked convolution.

    Channels and output pixels are bucketed to powers of two, the active fraction to tenths,
    so one measured ResNet-50 layer covers its neighbours.  Example: ``k3x3|s1|g1|ci64|co64|p2^18|a0.5``.
    """
    n, c, h, w = x_shape
    o, _, kh, kw = w_shape
    pixels = n * max(1, h // stride[0]) * max(1, w // stride[1])
    g = "1" if groups == 1 else ("dw" if groups == c else "n")
    p2 = int(math.log2(_pow2_bucket(pixels)))
    return (f"k{kh}x{kw}|s{stride[0]}|g{g}|ci{_pow2_bucket(c)}|co{_pow2_bucket(o)}|p2^{p2}"
            f"|a{round(active_fraction, 1):.1f}")


def tuning_path() -> Path:
    """Where the measured table lives: $DPRUNE_TUNING_FILE or ``kernels/tuning.json``."""
    env = os.environ.get(TUNING_ENV_VAR)
    return Path(env) if env else Path(__file__).with_name("tuning.json")


_tuning_cache: dict[tuple[str, float], dict] = {}


def load_tuning(path: Path | None = None) -> dict:
    """``{"<device>|<op>|<bucket>": backend}`` from the table, or {} when absent or unreadable."""
    path = Path(path) if path is not None else tuning_path()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    key = (str(path), mtime)
    if key not in _tuning_cache:
        try:
            data = json.loads(path.read_text())
            entries = data.get("entries", {}) if isinstance(data, dict) else {}
        except (OSError, ValueError):
            entries = {}
        _tuning_cache.clear()
        _tuning_cache[key] = {k: v for k, v in entries.items() if v in BACKENDS}
    return _tuning_cache[key]


def select(op: str, device: torch.device, bucket=None) -> str:
    """Concrete backend (``reference`` | ``triton`` | ``native``) for ``op`` on ``device``.

    ``bucket`` is a zero-argument callable giving the tuning key (computed only when needed).
    """
    name = get_backend()
    if name == "reference":
        return "reference"
    if name == "triton":
        if not triton_usable(device):
            raise RuntimeError(
                f"{ENV_VAR}/set_backend asks for triton, but it cannot run on {device.type} "
                "(needs a CUDA device with triton installed, or TRITON_INTERPRET=1)")
        return "triton"
    if name == "native":
        if op not in NATIVE_OPS:
            return "reference"
        from . import native
        if not native.available():
            raise RuntimeError(f"{ENV_VAR}/set_backend asks for native, but the dprune native "
                               f"extension is not available: {native.unavailable_reason()}")
        return "native"
    # auto
    if op in NATIVE_OPS and bucket is not None:
        table = load_tuning()
        if table:
            choice = table.get(f"{device.type}|{op}|{bucket()}")
            if choice == "native" and _native_loaded():
                return "native"
            if choice == "triton" and triton_usable(device):
                return "triton"
            if choice == "reference":
                return "reference"
    if op == "compact_channels":
        # Plain index_select already is one kernel per tensor; native batches them in one call.
        return "native" if _native_loaded() else "reference"
    return "triton" if triton_usable(device) else "reference"


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------

def filter_norms(weights: Sequence[torch.Tensor], p: int,
                 grads: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One fp32 importance score per output channel (dim 0), for every tensor, in one pass.

    p=1: mean |W| over each filter (in, kh, kw) - the paper's L1 criterion; p=2: L2 norm;
    ``grads`` given: Taylor |sum(W * G)|.  On Triton all tensors go through ONE kernel launch.
    """
    weights = list(weights)
    grads = list(grads) if grads is not None else None
    reference._check_norm_args(weights, p, grads)
    if not weights:
        return []
    devices = {w.device for w in weights} | ({g.device for g in grads} if grads else set())
    if len(devices) != 1:
        raise ValueError(f"filter_norms: all tensors must be on one device, got {sorted(map(str, devices))}")
    backend = select("filter_norms", weights[0].device)
    if backend == "triton":
        from .triton import filter_norms as tfn
        return tfn.filter_norms(weights, p, grads)
    return reference.filter_norms(weights, p, grads)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"masked_conv2d: {name} must be an int or a pair, got {v!r}")
    return t


def _resolve_padding(x, weight, padding, stride, dilation):
    """(x, (ph, pw)) with string padding turned into explicit (possibly pre-applied) padding."""
    if not isinstance(padding, str):
        return x, _pair(padding, "padding")
    if padding == "valid":
        return x, (0, 0)
    if padding != "same":
        raise ValueError(f"masked_conv2d: padding must be 'same', 'valid' or ints, got {padding!r}")
    if stride != (1, 1):
        raise ValueError("masked_conv2d: padding='same' is not supported for strided convolutions")
    pads = []
    extra = []
    for d, k in zip(dilation, weight.shape[2:]):
        total = d * (k - 1)
        pads.append(total // 2)
        extra.append(total - total // 2 * 2)   # odd total: one more on the right/bottom
    if any(extra):
        x = F.pad(x, [0, extra[1], 0, extra[0]])
    return x, tuple(pads)


def _masked_conv2d(x, weight, bias, out_mask, stride=1, padding=0, dilation=1, groups=1,
                   in_mask=None, out_index=None, in_index=None):
    """``masked_conv2d`` plus optional precomputed active-channel indices (used by MaskedConv2d
    to avoid a device sync per call; they must equal ``nonzero(mask)``)."""
    if out_mask.dim() != 1 or out_mask.numel() != weight.shape[0]:
        raise ValueError(f"masked_conv2d: out_mask must have shape ({weight.shape[0]},), "
                         f"got {tuple(out_mask.shape)}")
    cin = x.shape[-3] if x.dim() in (3, 4) else None
    if in_mask is not None and (in_mask.dim() != 1 or in_mask.numel() != cin):
        raise ValueError(f"masked_conv2d: in_mask must have shape ({cin},), got {tuple(in_mask.shape)}")
    # Masks that require grad (learned soft masks) need the mask gradient, which only the
    # reference provides; the fast paths treat masks as constants.
    mask_grad = torch.is_grad_enabled() and (out_mask.requires_grad or
                                             (in_mask is not None and in_mask.requires_grad))
    if mask_grad or x.dim() != 4 or weight.dim() != 4:
        return reference.masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation,
                                       groups, in_mask)
    if torch.is_autocast_enabled(x.device.type):
        # One AMP path: cast like F.conv2d does under autocast.
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    stride_t, dilation_t = _pair(stride, "stride"), _pair(dilation, "dilation")

    def bucket():
        n_active = out_index.numel() if out_index is not None else int((out_mask != 0).sum())
        active = n_active / max(1, out_mask.numel())
        return shape_bucket(tuple(x.shape), tuple(weight.shape), stride_t, groups, active)

    backend = select("masked_conv2d", x.device, bucket)
    if backend == "reference":
        return reference.masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation,
                                       groups, in_mask)
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise RuntimeError(f"masked_conv2d: input dtype {x.dtype} and weight dtype {weight.dtype} "
                           "(and bias) should be the same")
    x, padding_t = _resolve_padding(x, weight, padding, stride_t, dilation_t)
    if backend == "native":
        from . import native
        return native.masked_conv2d(x, weight, bias, out_mask, stride_t, padding_t, dilation_t,
                                    groups, in_mask)
    from .triton import masked_conv as tmc
    return tmc.masked_conv2d(x, weight, bias, out_mask, stride_t, padding_t, dilation_t, groups,
                             in_mask, out_index=out_index, in_index=in_index)


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out_mask: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                  in_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Equal to ``F.conv2d(x, weight * out_mask[:, None, None, None], bias * out_mask, ...)``.

    Autograd-capable (x, weight, bias; masks are constants).  ``in_mask`` (optional, one value per
    input channel) marks input channels known to be zero: they are skipped (treated as zero, and
    get zero gradient).  NCHW and channels_last, fp32/bf16/fp16.  The Triton and native backends
    compute only the active output channels, so their cost falls with sparsity.
    """
    return _masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask)


def compact_channels(tensors: Sequence[torch.Tensor], dims: Sequence[int],
                     index: torch.Tensor) -> list[torch.Tensor]:
    """``[t.index_select(d, index) ...]`` for many tensors in one call (weights, BN, optimizer state).

    Not differentiable; meant for physical channel removal under ``torch.no_grad()``.
    """
    tensors = list(tensors)
    dims = [int(d) for d in dims]
    if len(tensors) != len(dims):
        raise ValueError(f"compact_channels: {len(tensors)} tensors but {len(dims)} dims")
    if not tensors:
        return []
    index = index.to(dtype=torch.long)
    backend = select("compact_channels", tensors[0].device)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if backend == "native" and not needs_grad:
        from . import native
        return native.compact_channels(tensors, dims, index)
    return reference.compact_channels(tensors, dims, index)
