"""masked_conv2d (Triton): forward and backward vs the reference, over odd shapes and dtypes.

On CPU the kernels run in the Triton interpreter.  The interpreter has no bf16 ``tl.dot``
(numpy has no bfloat16: it returns garbage), so under the interpreter bf16 tiles are upcast to
fp32 before the dot (constexpr DOT_FP32); fp16 and fp32 run the same ``tl.dot`` code as the GPU.
The native-precision bf16 dot is only exercised by the ``gpu`` tests.
"""
import pytest
import torch

from distributed_prune import kernels
from distributed_prune.kernels import reference

# name: (N, C, H, W, O, k, stride, padding, dilation, groups); channels are not multiples of
# any block size.  "tiles" spans several programs in every grid dimension and several K steps.
CASES = {
    "1x1": (2, 5, 6, 7, 9, 1, 1, 0, 1, 1),
    "3x3_pad": (2, 7, 8, 8, 10, 3, 1, 1, 1, 1),
    "3x3_s2": (2, 6, 9, 7, 11, 3, 2, 1, 1, 1),
    "3x3_dil2": (1, 5, 9, 9, 6, 3, 1, 2, 2, 1),
    "5x5_s2_nopad": (1, 3, 11, 10, 7, 5, 2, 0, 1, 1),
    "groups3": (2, 6, 7, 7, 9, 3, 1, 1, 1, 3),
    "depthwise": (2, 8, 7, 7, 8, 3, 1, 1, 1, 8),
    "depthwise_x2_s2": (2, 8, 8, 8, 16, 3, 2, 1, 1, 8),
    "tiles": (2, 37, 9, 9, 150, 3, 1, 1, 1, 1),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _make(case, dtype, device, channels_last, in_mask, bias=True, seed=0, keep=0.6):
    n, c, h, w, o, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    wt = torch.randn(o, c // g, k, k, generator=gen) / (c // g * k * k) ** 0.5
    b = torch.randn(o, generator=gen) if bias else None
    om = (torch.rand(o, generator=gen) < keep).float()
    om[0] = 1.0                                  # never all-zero here (covered separately)
    im = (torch.rand(c, generator=gen) < 0.7).float() if in_mask else None
    move = dict(device=device, dtype=dtype)
    x = x.to(**move)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    tensors = [x, wt.to(**move), b.to(**move) if b is not None else None]
    masks = [om.to(device), im.to(device) if im is not None else None]
    return tensors, masks, dict(stride=s, padding=p, dilation=d, groups=g)


def _run(fn, tensors, masks, conv, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    x, w, b = leaves
    y = fn(x, w, b, masks[0], in_mask=masks[1], **conv)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(grad_out)
    return y, [t.grad if t is not None else None for t in leaves], grad_out


def _compare(tensors, masks, conv, tol):
    with kernels.set_backend("triton"):
        y, grads, go = _run(kernels.masked_conv2d, tensors, masks, conv)
    y_ref, grads_ref, _ = _run(reference.masked_conv2d, tensors, masks, conv, go)
    torch.testing.assert_close(y, y_ref, **tol)
    for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref):
        if g_ref is not None:
            torch.testing.assert_close(g, g_ref, **tol, msg=lambda m: f"grad {name}: {m}")
    return y, grads


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("in_mask", [False, True], ids=["", "in_mask"])
def test_fp32_forward_backward(device, case, channels_last, in_mask, tol):
    tensors, masks, conv = _make(case, torch.float32, device, channels_last, in_mask)
    y, grads = _compare(tensors, masks, conv, tol(torch.float32))
    # output keeps the input's memory format; pruned filters get exactly zero gradient
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)
    dead = masks[0] == 0
    assert torch.all(grads[1][dead] == 0) and torch.all(grads[2][dead] == 0)
    assert torch.all(y[:, dead] == 0)


# Low precision: the kernels take bf16/fp16 tensors, accumulate in fp32 and round each result
# once to the dtype.  So the reference is computed in fp32 from the SAME rounded inputs (every
# bf16/fp16 value is exact in fp32), and the error allowed per element follows from the
# arithmetic, not from one machine's observed error:
#   |kernel - ref| <= u_dtype * |ref|                       (one rounding of the result)
#                   + 2 * gamma_K * (|a| . |b|)             (fp32 accumulation, kernel and ref)
# with u the relative error of one rounding to the dtype (fp16 2^-11, half an ulp; bf16 2^-7, a
# whole ulp, because the Triton interpreter converts fp32 -> bf16 by truncation since numpy has no
# bf16: on a GPU it rounds to nearest, 2^-8), gamma_K = K u32 / (1 - K u32) for a
# reduction of length K (forward: C/g*kh*kw + 1 with the bias; input grad: O/g*kh*kw; weight and
# bias grads: N*OH*OW), and |a|.|b| the same convolution run on absolute values (the classic
# elementwise bound for a dot product).  fp16 adds its subnormal spacing 2^-24 as an absolute term.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -11}
SUBNORMAL = {torch.bfloat16: 0.0, torch.float16: 2.0 ** -24}
U32 = 2.0 ** -24


def _gamma(k):
    return k * U32 / (1 - k * U32)


def _reduction_lengths(case, x_shape, y_shape):
    _, c, _, _, o, k, _, _, _, g = case
    n, _, oh, ow = y_shape
    return {"y": c // g * k * k + 1, "x": o // g * k * k, "weight": n * oh * ow, "bias": n * oh * ow}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["1x1", "3x3_s2", "groups3", "depthwise", "tiles"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_low_precision_forward_backward(device, dtype, case, channels_last):
    tensors, masks, conv = _make(CASES[case], dtype, device, channels_last, in_mask=case == "tiles")
    with kernels.set_backend("triton"):
        y, grads, go = _run(kernels.masked_conv2d, tensors, masks, conv)
    assert y.dtype == dtype and grads[1].dtype == dtype
    up = [t.float() if t is not None else None for t in tensors]          # exact upcast
    y_ref, grads_ref, _ = _run(reference.masked_conv2d, up, masks, conv, go.float())
    absolute = [t.abs() if t is not None else None for t in up]
    y_abs, grads_abs, _ = _run(reference.masked_conv2d, absolute, [m.abs() if m is not None else None
                                                                     for m in masks], conv, go.float().abs())
    lengths = _reduction_lengths(CASES[case], up[0].shape, y.shape)
    u = UNIT_ROUNDOFF[dtype]
    for name, got, ref, bound in zip(("y", "x", "weight", "bias"), [y, *grads],
                                     [y_ref, *grads_ref], [y_abs, *grads_abs]):
        if ref is None:
            continue
        atol = 2 * _gamma(lengths[name]) * float(bound.detach().max()) + SUBNORMAL[dtype]
        torch.testing.assert_close(got.float(), ref, rtol=u, atol=atol,
                                   msg=lambda m, n=name: f"{n} ({dtype}): {m}")


@pytest.mark.parametrize("keep", [0.0, 1.0], ids=["none_active", "all_active"])
def test_extreme_masks(device, keep, tol):
    tensors, masks, conv = _make(CASES["3x3_pad"], torch.float32, device, False, True, keep=keep)
    masks[0].fill_(keep)
    _compare(tensors, masks, conv, tol(torch.float32))


def test_soft_mask_bool_mask_and_no_bias(device, tol):
    tensors, masks, conv = _make(CASES["3x3_s2"], torch.float32, device, False, False, bias=False)
    masks[0] = masks[0] * torch.linspace(0.25, 1.0, masks[0].numel(), device=device)
    _compare(tensors, masks, conv, tol(torch.float32))
    masks[0] = masks[0] != 0
    _compare(tensors, masks, conv, tol(torch.float32))


@pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning")
@pytest.mark.parametrize("k,padding", [(3, "same"), (4, "same"), (3, "valid"), (2, (1, 0))])
def test_padding_forms(device, k, padding, tol):
    case = (1, 4, 7, 6, 5, k, 1, 0, 1, 1)
    tensors, masks, conv = _make(case, torch.float32, device, False, False)
    conv["padding"] = padding
    _compare(tensors, masks, conv, tol(torch.float32))


def test_work_scales_with_active_channels(device, monkeypatch):
    """The forward grid covers only the active filters: fewer programs at higher sparsity."""
    from distributed_prune.kernels.triton import masked_conv as tmc

    real = tmc._fwd_kernel
    grids = []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(tmc, "_fwd_kernel", Spy())
    x = torch.randn(1, 8, 5, 5, device=device)
    w = torch.randn(256, 8, 3, 3, device=device)
    with kernels.set_backend("triton"), torch.no_grad():
        for active in (256, 64, 16):
            mask = torch.zeros(256, device=device)
            mask[torch.randperm(256)[:active]] = 1
            y = kernels.masked_conv2d(x, w, None, mask, padding=1)
            torch.testing.assert_close(y, reference.masked_conv2d(x, w, None, mask, padding=1),
                                       atol=1e-4, rtol=1e-4)
    programs = [g[0] * g[1] for g in grids]
    assert programs == sorted(programs, reverse=True) and programs[0] > programs[-1]


def test_unbatched_input_and_autocast(device):
    x = torch.randn(3, 6, 6, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    m = torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)
    with kernels.set_backend("triton"):
        y = kernels.masked_conv2d(x, w, None, m, padding=1)
    torch.testing.assert_close(y, reference.masked_conv2d(x, w, None, m, padding=1))
    dt = torch.bfloat16
    with torch.autocast(device.type, dtype=dt), kernels.set_backend("triton"):
        y = kernels.masked_conv2d(x[None], w, None, m, padding=1)
    assert y.dtype == dt
