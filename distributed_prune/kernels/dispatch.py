"""Backend selection for the kernels: ``reference``, ``gather``, ``triton``, ``native``.

Backends of ``masked_conv2d``:

* ``reference``: dense convolution with masked weights (ground truth; cost of the dense layer).
* ``gather``: pure PyTorch: select the active input/output channels with (cached) index tensors,
  run the ordinary convolution (cuDNN / oneDNN) on the compact tensors, scatter the result
  back; autograd gives the backward.  Cost falls with sparsity.
* ``native``: the same gather/compact/scatter plan in the csrc extension (one op, its own
  backward), taking the cached indices as arguments.
* ``triton``: implicit-GEMM kernels over the active channels (CUDA, or CPU under
  ``TRITON_INTERPRET=1``).

``auto`` (the default) for ``masked_conv2d``:

1. a measured table (``tuning.json``, written by ``dprune bench kernels --write-tuning``) picks
   the backend per shape bucket when it has an entry for this device and bucket;
2. otherwise the rule: ``gather`` when some channel is masked and the layer is a plain or
   depthwise convolution, else ``reference`` (nothing to skip, or a grouped layout gather does
   not cover).  An unmeasured Triton kernel is never the default: it is chosen only from a
   measurement.

``filter_norms`` in ``auto`` uses Triton (one launch for all layers) when it can run on the
tensors' device (CUDA, or the interpreter), else the reference.

Failures: in ``auto`` mode a Triton (or native) error at compile or launch time prints ONE
warning, demotes that op to the next backend (masked_conv2d: triton -> native -> gather ->
reference; filter_norms: triton -> reference) for the rest of the process, and the call returns
the result of that next backend.  A forced backend that fails raises.

Forcing: ``DPRUNE_KERNELS=reference|gather|triton|native|auto`` (read at every call), or
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
           "filter_norms", "masked_conv2d", "shape_bucket", "tuning_path", "load_tuning",
           "demoted", "reset_demotions"]

BACKENDS = ("auto", "reference", "gather", "triton", "native")
ENV_VAR = "DPRUNE_KERNELS"
TUNING_ENV_VAR = "DPRUNE_TUNING_FILE"
# Ops that the csrc extension / the gather path implement; others use the reference when forced.
NATIVE_OPS = frozenset({"masked_conv2d"})
GATHER_OPS = frozenset({"masked_conv2d"})
# Demotion order in auto mode after a failure (see module docstring).
_NEXT = {"triton": "native", "native": "gather", "gather": "reference"}

_override: str | None = None
_lock = threading.Lock()
# op -> backends that failed in auto mode in this process (never tried again)
_demoted: dict[str, set[str]] = {}


def demoted(op: str) -> frozenset[str]:
    """Backends of ``op`` demoted after a failure in this process."""
    return frozenset(_demoted.get(op, ()))


def reset_demotions() -> None:
    """Forget demotions (tests)."""
    with _lock:
        _demoted.clear()


def _demote(op: str, backend: str, err: BaseException) -> None:
    import warnings
    with _lock:
        first = backend not in _demoted.setdefault(op, set())
        _demoted[op].add(backend)
    if first:
        warnings.warn(f"dprune kernels: {backend} {op} failed ({type(err).__name__}: "
                      f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}); "
                      f"using the next backend for {op} for the rest of this process",
                      RuntimeWarning, stacklevel=3)


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


def select(op: str, device: torch.device, bucket=None, *, masked: bool = True,
           gatherable: bool = True) -> str:
    """Concrete backend (``reference`` | ``gather`` | ``triton`` | ``native``) for ``op``.

    ``bucket`` is a zero-argument callable giving the tuning key (computed only when needed);
    ``masked``: some channel is masked (else a plain convolution is already optimal);
    ``gatherable``: the layer is one the gather path handles (groups 1 or depthwise).
    """
    name = get_backend()
    if name == "reference":
        return "reference"
    if name == "gather":
        return "gather" if op in GATHER_OPS else "reference"
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
    bad = _demoted.get(op, ())
    if op == "masked_conv2d":
        if bucket is not None:
            table = load_tuning()
            choice = table.get(f"{device.type}|{op}|{bucket()}") if table else None
            if choice == "native" and "native" not in bad and _native_loaded():
                return "native"
            if choice == "triton" and "triton" not in bad and triton_usable(device):
                return "triton"
            if choice in ("reference", "gather") and choice not in bad:
                return choice
        return "gather" if masked and gatherable and "gather" not in bad else "reference"
    return "triton" if "triton" not in bad and triton_usable(device) else "reference"


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
        if get_backend() != "auto":
            return tfn.filter_norms(weights, p, grads)
        try:
            return tfn.filter_norms(weights, p, grads)
        except Exception as e:  # compile / launch failure: demote, answer with the reference
            _demote("filter_norms", "triton", e)
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

    from . import gather
    # "some channel is masked" without a device sync: known from the cached indices' sizes
    if out_index is not None:
        masked = (out_index.numel() < out_mask.numel()
                  or (in_mask is not None and in_index is not None
                      and in_index.numel() < in_mask.numel()))
    else:
        masked = True
    backend = select("masked_conv2d", x.device, bucket, masked=masked,
                     gatherable=gather.supports(x, weight, groups))
    if backend == "reference":
        return reference.masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation,
                                       groups, in_mask)
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise RuntimeError(f"masked_conv2d: input dtype {x.dtype} and weight dtype {weight.dtype} "
                           "(and bias) should be the same")
    xp, padding_t = _resolve_padding(x, weight, padding, stride_t, dilation_t)
    args = (xp, weight, bias, out_mask, stride_t, padding_t, dilation_t, groups, in_mask)
    idx = dict(out_index=out_index, in_index=in_index)
    auto = get_backend() == "auto"
    while True:
        try:
            if backend == "gather":
                return gather.masked_conv2d(*args, **idx)
            if backend == "native":
                from . import native
                return native.masked_conv2d(*args, **idx)
            if backend == "triton":
                from .triton import masked_conv as tmc
                on_error = ((lambda e: _demote("masked_conv2d", "triton", e)) if auto
                            else None)
                return tmc.masked_conv2d(*args, **idx, on_error=on_error)
            return reference.masked_conv2d(x, weight, bias, out_mask, stride, padding,
                                           dilation, groups, in_mask)
        except Exception as e:
            if not auto or backend in ("gather", "reference") or _is_user_error(e):
                raise
            _demote("masked_conv2d", backend, e)
            backend = _next_usable(backend, x.device)


def _is_user_error(e: BaseException) -> bool:
    # bad arguments (shapes, dtypes) are the caller's, not a backend failure: never demote
    return isinstance(e, (ValueError, TypeError, UserError))


def _next_usable(backend: str, device: torch.device) -> str:
    nxt = _NEXT[backend]
    if nxt == "native" and not _native_loaded():
        nxt = _NEXT[nxt]
    return nxt


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out_mask: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                  in_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Equal to ``F.conv2d(x, weight * out_mask[:, None, None, None], bias * out_mask, ...)``.

    Autograd-capable (x, weight, bias; masks are constants).  ``in_mask`` (optional, one value per
    input channel) marks input channels known to be zero: they are skipped (treated as zero, and
    get zero gradient).  NCHW and channels_last, fp32/bf16/fp16.  The gather, Triton and native
    backends compute only the active channels, so their cost falls with sparsity.
    """
    return _masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask)
