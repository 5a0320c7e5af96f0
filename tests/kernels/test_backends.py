"""Every masked_conv2d backend (forward and backward) against the reference, the auto rule, and
the one-warning demotion of a failing Triton kernel."""
import warnings

import pytest
import torch
from torch import nn

from distributed_prune import kernels
from distributed_prune.kernels import MaskedConv2d, dispatch, reference

# (N, C, H, W, O, k, stride, padding, dilation, groups)
CASES = {
    "1x1": (2, 5, 6, 7, 9, 1, 1, 0, 1, 1),
    "3x3_s2": (2, 6, 9, 7, 11, 3, 2, 1, 1, 1),
    "3x3_dil2": (1, 5, 9, 9, 6, 3, 1, 2, 2, 1),
    "depthwise": (2, 8, 7, 7, 8, 3, 1, 1, 1, 8),
    "groups2": (1, 6, 7, 7, 8, 3, 1, 1, 1, 2),
}


def _make(case, channels_last, in_mask, seed=0):
    n, c, h, w, o, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(o, c // g, k, k, generator=gen) / (c // g * k * k) ** 0.5
    b = torch.randn(o, generator=gen)
    om = (torch.rand(o, generator=gen) < 0.6).float()
    om[0] = 1.0
    im = None
    if in_mask:
        im = (torch.rand(c, generator=gen) < 0.7).float()
        im[0] = 1.0
    return (x, wt, b), (om, im), dict(stride=s, padding=p, dilation=d, groups=g)


def _run(fn, tensors, masks, conv, go=None):
    x, w, b = (t.detach().clone().requires_grad_() for t in tensors)
    y = fn(x, w, b, masks[0], in_mask=masks[1], **conv)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) if go is None else go
    y.backward(go)
    return y, (x.grad, w.grad, b.grad), go


def _with_indices(x, w, b, om, in_mask=None, **conv):
    """What MaskedConv2d does: pass the cached active-channel indices."""
    oi = torch.nonzero(om).view(-1)
    ii = torch.nonzero(in_mask).view(-1) if in_mask is not None else None
    return dispatch._masked_conv2d(x, w, b, om, in_mask=in_mask, out_index=oi, in_index=ii, **conv)


BACKENDS = ["reference", "gather", "triton", "native"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("in_mask", [False, True], ids=["", "in_mask"])
@pytest.mark.parametrize("indices", [False, True], ids=["", "cached"])
def test_backend_matches_reference(request, backend, case, layout, in_mask, indices):
    if backend == "native":
        request.getfixturevalue("native_ops")      # skips (naming 'native') when unavailable
    if backend == "triton" and (layout == "cl" or in_mask) and case[-1] != 1:
        pytest.skip("interpreter time: grouped Triton paths are covered in test_masked_conv")
    tensors, masks, conv = _make(case, layout == "cl", in_mask)
    fn = _with_indices if indices else kernels.masked_conv2d
    with kernels.set_backend(backend):
        y, grads, go = _run(fn, tensors, masks, conv)
    y_ref, grads_ref, _ = _run(reference.masked_conv2d, tensors, masks, conv, go)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_gather_computes_only_active_channels(monkeypatch):
    """The convolution gather runs has the compact shape (active out x active in)."""
    tensors, masks, conv = _make(CASES["3x3_s2"], False, True)
    shapes = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d",
                        lambda x, w, *a, **k: shapes.append(tuple(w.shape)) or real(x, w, *a, **k))
    with kernels.set_backend("gather"):
        kernels.masked_conv2d(*tensors, masks[0], in_mask=masks[1], **conv)
    assert shapes == [(int(masks[0].sum()), int(masks[1].sum()), 3, 3)]


def test_auto_masked_conv_module_uses_gather_without_table():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    m = MaskedConv2d.from_conv(conv, (torch.arange(10) % 3 != 0).float())
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    calls = []
    from distributed_prune.kernels import gather
    real = gather.masked_conv2d
    gather.masked_conv2d = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        y = m(x)
    finally:
        gather.masked_conv2d = real
    assert calls == [1]
    torch.testing.assert_close(y, reference.masked_conv2d(x, m.weight, m.bias, m.out_mask,
                                                          padding=1), atol=1e-5, rtol=1e-5)


class _Broken:
    """Stands in for a @triton.jit kernel whose compilation or launch fails."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        def launch(*a, **k):
            self.calls.append(1)
            raise RuntimeError("injected: PTX compile failed")
        return launch


def _tuning_says_triton(tmp_path, monkeypatch, x, w, stride, active):
    import json
    key = dispatch.shape_bucket(tuple(x.shape), tuple(w.shape), stride, 1, active)
    table = tmp_path / "tuning.json"
    table.write_text(json.dumps({"version": 1, "entries": {f"cpu|masked_conv2d|{key}": "triton"}}))
    monkeypatch.setenv("DPRUNE_TUNING_FILE", str(table))


@pytest.mark.parametrize("which", ["_fwd_kernel", "_wgrad_kernel"])
def test_failing_triton_kernel_warns_once_and_is_demoted(tmp_path, monkeypatch, which):
    from distributed_prune.kernels.triton import masked_conv as tmc
    dispatch.reset_demotions()
    tensors, masks, conv = _make(CASES["3x3_s2"], False, False)
    x, w, b = tensors
    _tuning_says_triton(tmp_path, monkeypatch, x, w, (2, 2), float(masks[0].mean()))
    assert dispatch.select("masked_conv2d", x.device, lambda: dispatch.shape_bucket(
        tuple(x.shape), tuple(w.shape), (2, 2), 1, float(masks[0].mean()))) == "triton"
    calls = []
    monkeypatch.setattr(tmc, which, _Broken(calls))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                y, grads, go = _run(_with_indices, tensors, masks, conv)
        y_ref, grads_ref, _ = _run(reference.masked_conv2d, tensors, masks, conv, go)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
        msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(msgs) == 1 and "injected" in msgs[0] and "masked_conv2d" in msgs[0]
        assert calls == [1]                       # never tried again after the failure
        assert "triton" in dispatch.demoted("masked_conv2d")
    finally:
        dispatch.reset_demotions()


def test_forced_triton_failure_raises(monkeypatch):
    from distributed_prune.kernels.triton import masked_conv as tmc
    monkeypatch.setattr(tmc, "_fwd_kernel", _Broken([]))
    tensors, masks, conv = _make(CASES["1x1"], False, False)
    with kernels.set_backend("triton"), pytest.raises(RuntimeError, match="injected"):
        kernels.masked_conv2d(*tensors, masks[0], **conv)


def test_failing_triton_filter_norms_is_demoted(monkeypatch):
    from distributed_prune.kernels.triton import filter_norms as tfn
    dispatch.reset_demotions()
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("injected: no libcuda")
    monkeypatch.setattr(tfn, "filter_norms", broken)
    ws = [torch.randn(4, 3, 3, 3), torch.randn(7, 5)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [kernels.filter_norms(ws, 1) for _ in range(3)]
        for out in outs:
            for o, r in zip(out, reference.filter_norms(ws, 1)):
                torch.testing.assert_close(o, r)
        assert calls == [1]
        assert len([c for c in caught if issubclass(c.category, RuntimeWarning)]) == 1
    finally:
        dispatch.reset_demotions()
