"""Triton kernels, one file per op (private ``@triton.jit`` kernel, launcher, autograd.Function).

Imported only when the dispatcher picks Triton, so that ``TRITON_INTERPRET`` set before the
first kernel call (e.g. in a test conftest) still takes effect.
"""
