"""csrc native ops (torch.ops.dprune): vs the reference; autograd, fake tensors, torch.compile.

Skipped, with a reason naming 'native', where the extension is neither installed nor buildable.
"""
import pytest
import torch

from distributed_prune import kernels
from distributed_prune.kernels import reference

# (N, C, H, W, O, k, stride, padding, dilation, groups)
CASES = {
    "1x1": (2, 5, 6, 7, 9, 1, 1, 0, 1, 1),
    "3x3_s2": (2, 6, 9, 7, 11, 3, 2, 1, 1, 1),
    "3x3_dil2": (1, 5, 9, 9, 6, 3, 1, 2, 2, 1),
    "groups3": (2, 6, 7, 7, 9, 3, 1, 1, 1, 3),
    "depthwise": (2, 8, 7, 7, 8, 3, 1, 1, 1, 8),
}


def _make(case, dtype, channels_last, in_mask, seed=0):
    n, c, h, w, o, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = (torch.randn(o, c // g, k, k, generator=gen) / (c // g * k * k) ** 0.5).to(dtype)
    b = torch.randn(o, generator=gen).to(dtype)
    om = (torch.rand(o, generator=gen) < 0.6).float()
    im = (torch.rand(c, generator=gen) < 0.7).float() if in_mask else None
    return (x, wt, b), (om, im), dict(stride=s, padding=p, dilation=d, groups=g)


def _run(fn, tensors, masks, conv, go=None):
    x, w, b = (t.detach().clone().requires_grad_() for t in tensors)
    y = fn(x, w, b, masks[0], in_mask=masks[1], **conv)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y) if go is None else go
    y.backward(go)
    return y, (x.grad, w.grad, b.grad), go


def _native_matches_reference(tensors, masks, conv, tolerance):
    """The native op's output and gradients equal the reference's; returns the output."""
    with kernels.set_backend("native"):
        y, grads, go = _run(kernels.masked_conv2d, tensors, masks, conv)
    y_ref, grads_ref, _ = _run(reference.masked_conv2d, tensors, masks, conv, go)
    torch.testing.assert_close(y, y_ref, **tolerance)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **tolerance)
    return y


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("in_mask", [False, True], ids=["", "in_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_conv_matches_reference(native_ops, case, channels_last, in_mask, dtype, tol):
    tensors, masks, conv = _make(case, dtype, channels_last, in_mask)
    y = _native_matches_reference(tensors, masks, conv, tol(dtype))
    if channels_last and conv["groups"] == 1:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_opcheck_and_compile(native_ops):
    """Schema, fake (meta) and autograd registrations are consistent; traces under compile."""
    tensors, masks, conv = _make(CASES["3x3_s2"], torch.float32, True, True)
    x, w, b = (t.detach().clone().requires_grad_() for t in tensors)
    args = (x, w, b, masks[0], masks[1], [2, 2], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.dprune_mc.masked_conv2d.default, args)

    def f(x, w, b):
        return torch.ops.dprune_mc.masked_conv2d(x, w, b, *args[3:]).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(x, w, b)
    gx, gw = torch.autograd.grad(loss, (x, w))
    ref = reference.masked_conv2d(x, w, b, masks[0], 2, 1, 1, 1, masks[1]).square().sum()
    rx, rw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-4)


def test_cached_indices_are_used_and_no_nonzero_runs(native_ops, monkeypatch):
    """Given the active-channel indices, the op computes with them (no nonzero of its own):
    indices that disagree with the masks change the result accordingly."""
    tensors, masks, conv = _make(CASES["3x3_s2"], torch.float32, False, True)
    om, im = masks
    oi, ii = torch.nonzero(om).view(-1), torch.nonzero(im).view(-1)
    with kernels.set_backend("native"):
        y, grads, go = _run(lambda *a, **k: kernels.dispatch._masked_conv2d(
            *a, **k, out_index=oi, in_index=ii), tensors, masks, conv)
    y_ref, grads_ref, _ = _run(reference.masked_conv2d, tensors, masks, conv, go)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    # a subset of the active filters as index: only those are computed
    sub = oi[:1]
    x, w, b = tensors
    with kernels.set_backend("native"):
        y_sub = kernels.dispatch._masked_conv2d(x, w, b, om, in_mask=im, out_index=sub,
                                                in_index=ii, **conv)
    keep = torch.zeros_like(om)
    keep[sub] = 1
    torch.testing.assert_close(y_sub, reference.masked_conv2d(x, w, b, keep, in_mask=im, **conv),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_masked_conv(native_ops, dtype, tol):
    """cuDNN behind the gather/scatter."""
    torch.backends.cudnn.allow_tf32 = False
    try:
        tensors, masks, conv = _make(CASES["3x3_s2"], dtype, True, True)
        tensors = tuple(t.cuda() for t in tensors)
        masks = tuple(m.cuda() for m in masks)
        _native_matches_reference(tensors, masks, conv, tol(dtype))
    finally:
        torch.backends.cudnn.allow_tf32 = True
