"""Loader and Python side of the optional csrc extension (ops in ``torch.ops.dprune_mc``).

Order of attempts in :func:`load`:

1. ops already registered in this process (nothing to do);
2. the extension built by ``setup.py`` (``distributed_prune._C``);
3. a JIT build with ``torch.utils.cpp_extension.load`` into ``$TORCH_EXTENSIONS_DIR`` - only when
   asked (``load(build=True)`` or ``DPRUNE_NATIVE_JIT=1``), since it takes about a minute.

Everything works without the extension: the dispatcher then uses Triton or the reference.
Autograd (``register_autograd``) and fake tensors (``register_fake``, so the ops trace under
``torch.compile``) are registered here, once, after the library is loaded.
"""
from __future__ import annotations

import importlib.util
import os
import threading

import torch

from . import native_build

__all__ = ["load", "available", "unavailable_reason", "masked_conv2d"]

_lock = threading.Lock()
_state: dict = {"loaded": False, "reason": "not loaded yet", "tried_installed": False,
                "tried_build": False}


def _ops_present() -> bool:
    try:
        torch.ops.dprune_mc.masked_conv2d.default  # noqa: B018  (raises when not registered)
        return True
    except (AttributeError, RuntimeError):
        return False


def _jit_build() -> None:
    from torch.utils.cpp_extension import load as cpp_load
    sources = [str(p) for p in native_build.cpp_sources()]
    cpp_load(name="dprune_native_idx", sources=sources,
             extra_cflags=native_build.compile_args()["cxx"], is_python_module=False,
             verbose=os.environ.get("DPRUNE_NATIVE_VERBOSE") == "1")


def load(build: bool | None = None) -> bool:
    """Make ``torch.ops.dprune`` available; True on success.  ``build=None`` JIT-builds only if
    DPRUNE_NATIVE_JIT=1.  Failures are remembered (see :func:`unavailable_reason`)."""
    if build is None:
        build = os.environ.get("DPRUNE_NATIVE_JIT") == "1"
    with _lock:
        if _state["loaded"]:
            return True
        if not _ops_present() and not _state["tried_installed"]:
            _state["tried_installed"] = True
            try:
                spec = importlib.util.find_spec(native_build.EXT_NAME)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.origin:
                try:
                    torch.ops.load_library(spec.origin)
                except (OSError, RuntimeError) as e:
                    _state["reason"] = f"installed {native_build.EXT_NAME} failed to load: {e}"
            else:
                _state["reason"] = (f"{native_build.EXT_NAME} is not built (no C++ compiler at "
                                    "install time?); set DPRUNE_NATIVE_JIT=1 to JIT-build it")
        if not _ops_present() and build and not _state["tried_build"]:
            _state["tried_build"] = True
            if not native_build.compiler_available():
                _state["reason"] = "no C++ compiler found for the native JIT build"
            else:
                try:
                    _jit_build()
                except Exception as e:  # compiler errors, missing ninja, ...
                    _state["reason"] = f"native JIT build failed: {type(e).__name__}: {e}"[:2000]
        if _ops_present():
            _register_python_side()
            _state["loaded"] = True
            _state["reason"] = ""
        return _state["loaded"]


def available(build: bool | None = None) -> bool:
    """Whether the native ops can be used (loading them if needed; see :func:`load`)."""
    try:
        return load(build)
    except Exception as e:
        _state["reason"] = f"{type(e).__name__}: {e}"
        return False


def unavailable_reason() -> str:
    return _state["reason"] or "available"


# ---------------------------------------------------------------------------------------------
# fake + autograd registrations
# ---------------------------------------------------------------------------------------------

def _fmt(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _fake_masked_conv2d(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups,
                        out_index=None, in_index=None):
    n, _, h, w = x.shape
    oh = _conv_out(h, weight.shape[2], stride[0], padding[0], dilation[0])
    ow = _conv_out(w, weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((n, weight.shape[0], oh, ow)).contiguous(memory_format=_fmt(x))


def _fake_masked_conv2d_backward(grad_y, x, weight, out_mask, in_mask, stride, padding, dilation,
                                 groups, output_mask, out_index=None, in_index=None):
    gx = torch.empty_like(x, memory_format=_fmt(x)) if output_mask[0] else x.new_empty((0,))
    gw = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,))
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, oi, ii = inputs
    ctx.save_for_backward(x, weight, out_mask, in_mask, oi, ii)
    ctx.conf = (list(stride), list(padding), list(dilation), groups, bias is not None)


def _backward(ctx, grad_y):
    x, weight, out_mask, in_mask, oi, ii = ctx.saved_tensors
    stride, padding, dilation, groups, has_bias = ctx.conf
    need = ctx.needs_input_grad
    gx, gw, gb = torch.ops.dprune_mc.masked_conv2d_backward(
        grad_y, x, weight, out_mask, in_mask, stride, padding, dilation, groups,
        [bool(need[0]), bool(need[1]), bool(need[2]) and has_bias], oi, ii)
    return (gx if need[0] else None, gw if need[1] else None,
            gb if (need[2] and has_bias) else None, None, None, None, None, None, None, None, None)


_registered = False


def _register_python_side() -> None:
    global _registered
    if _registered:
        return
    register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract
    register_fake("dprune_mc::masked_conv2d")(_fake_masked_conv2d)
    register_fake("dprune_mc::masked_conv2d_backward")(_fake_masked_conv2d_backward)
    torch.library.register_autograd("dprune_mc::masked_conv2d", _backward,
                                    setup_context=_setup_context)
    _registered = True


# ---------------------------------------------------------------------------------------------
# entry points used by the dispatcher
# ---------------------------------------------------------------------------------------------

def masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask=None,
                  out_index=None, in_index=None):
    """Native backend of :func:`distributed_prune.kernels.masked_conv2d` (4-D input, int pairs).
    ``out_index`` / ``in_index``: cached ``nonzero(mask)`` (no synchronising nonzero per call)."""
    if not load():
        raise RuntimeError(f"dprune native ops unavailable: {unavailable_reason()}")
    return torch.ops.dprune_mc.masked_conv2d(x, weight, bias, out_mask.detach(),
                                          in_mask.detach() if in_mask is not None else None,
                                          list(stride), list(padding), list(dilation), int(groups),
                                          out_index, in_index)
