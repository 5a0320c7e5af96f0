"""Triton kernels, one file per op (private ``@triton.jit`` kernel, launcher, autograd.Function).

Imported only when the dispatcher picks Triton, so that ``TRITON_INTERPRET`` set before the
first kernel call (e.g. in a test conftest) still takes effect. This file imports nothing, so the
dispatcher can ask :func:`interpreter_enabled` without loading Triton.
"""
import os


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
