"""Kernels for filter importance and masked convolution, with interchangeable backends.

Public API (stable)::

    from distributed_prune.kernels import filter_norms, masked_conv2d, MaskedConv2d
    scores = filter_norms([conv.weight for conv in convs], p=1)    # one fp32 score per filter
    y = masked_conv2d(x, w, b, out_mask, stride=1, padding=1)      # == conv2d(x, w*mask, b*mask)

Backends: ``reference`` (pure PyTorch, ground truth), ``triton`` (CUDA, or CPU under
``TRITON_INTERPRET=1``), ``native`` (the csrc extension); see :mod:`.dispatch` for how one is
chosen and forced (``DPRUNE_KERNELS``, :func:`set_backend`).  Importing this package imports
neither triton nor the extension: everything below is resolved lazily.
"""
import importlib

_EXPORTS = {
    "filter_norms": "dispatch",
    "masked_conv2d": "dispatch",
    "set_backend": "dispatch",
    "get_backend": "dispatch",
    "BACKENDS": "dispatch",
    "MaskedConv2d": "modules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
