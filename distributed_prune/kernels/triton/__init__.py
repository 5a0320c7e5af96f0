"""Triton kernels, one file per op (private ``@triton.jit`` kernel, launcher, autograd.Function).

The op modules are imported only when the dispatcher picks Triton, so that ``TRITON_INTERPRET``
set before the first kernel call (e.g. in a test conftest) still takes effect. This file imports
neither triton nor the op modules: the dispatcher and the op modules both ask it
:func:`interpreter_enabled`, without an import cycle.
"""
import os


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
