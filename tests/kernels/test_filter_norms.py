"""filter_norms: Triton (one launch for all tensors) vs the pure-PyTorch reference."""
import pytest
import torch

from distributed_prune import kernels
from distributed_prune.kernels import reference

# Odd shapes: channel counts not multiples of any block, 1x1 / 3x3 / 7x7 convs, a Linear, a 1-D
# tensor, a single filter; one row longer than the interpreter's 1024-wide tile (72*5*5 = 1800).
SHAPES = [(5, 3, 3, 3), (17, 5, 1, 1), (7, 4), (3,), (1, 1, 7, 7), (33, 72, 5, 5), (130, 6, 3, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Scores reduce up to 1800 elements in fp32 from (rounded) low-precision inputs: the inputs are
# identical in both paths, so only the fp32 summation order differs.
NORM_TOL = dict(atol=1e-5, rtol=1e-5)


def _weights(dtype, device, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g).to(dtype=dtype, device=device) for s in SHAPES]
    if channels_last:
        ws = [w.to(memory_format=torch.channels_last) if w.dim() == 4 else w for w in ws]
    return ws


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_norms_match_reference(device, dtype, p, channels_last):
    ws = _weights(dtype, device, channels_last)
    with kernels.set_backend("triton"):
        got = kernels.filter_norms(ws, p)
    want = reference.filter_norms(ws, p)
    assert len(got) == len(ws)
    for g, w, src in zip(got, want, ws):
        assert g.dtype == torch.float32 and g.shape == (src.shape[0],)
        torch.testing.assert_close(g, w, **NORM_TOL)


def test_l1_is_mean_abs_and_l2_is_norm(device):
    w = torch.tensor([[1.0, -3.0], [0.0, 2.0]], device=device)
    with kernels.set_backend("triton"):
        l1, = kernels.filter_norms([w], 1)
        l2, = kernels.filter_norms([w], 2)
    torch.testing.assert_close(l1, torch.tensor([2.0, 1.0], device=device))
    torch.testing.assert_close(l2, torch.tensor([10 ** 0.5, 2.0], device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_taylor_matches_reference(device, dtype):
    ws = _weights(dtype, device)
    gs = _weights(dtype, device, seed=1)
    with kernels.set_backend("triton"):
        got = kernels.filter_norms(ws, 1, grads=gs)
    for g, w in zip(got, reference.filter_norms(ws, 1, grads=gs)):
        torch.testing.assert_close(g, w, **NORM_TOL)


def test_mixed_dtypes_and_auto_backend(device):
    ws = _weights(torch.float32, device)
    ws[1] = ws[1].to(torch.bfloat16)
    got = kernels.filter_norms(ws, 2)        # auto: Triton (interpreter or GPU)
    for g, w in zip(got, reference.filter_norms(ws, 2)):
        torch.testing.assert_close(g, w, **NORM_TOL)


def test_one_launch_for_many_tensors(device, monkeypatch):
    from distributed_prune.kernels.triton import filter_norms as tfn

    real = tfn._filter_norms_kernel
    grids = []

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(tfn, "_filter_norms_kernel", Counting())
    ws = [torch.randn(3 + i, 2 + i % 4, 3, 3, device=device) for i in range(20)]
    with kernels.set_backend("triton"):
        kernels.filter_norms(ws, 1)
        assert len(grids) == 1
        kernels.filter_norms(ws, 1, grads=ws)
        assert len(grids) == 2


def test_empty_and_bad_input():
    assert kernels.filter_norms([], 1) == []
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        kernels.filter_norms([torch.ones(2, 2)], 3)
    with pytest.raises(ValueError, match="shape"):
        kernels.filter_norms([torch.ones(2, 2)], 1, grads=[torch.ones(2, 3)])


def test_non_dense_and_offset_views(device):
    base = torch.randn(10, 8, 3, 3, device=device)
    ws = [base[:, ::2], base[3:7], base.permute(0, 1, 3, 2)]   # strided, offset, permuted
    with kernels.set_backend("triton"):
        got = kernels.filter_norms(ws, 2)
    for g, w in zip(got, reference.filter_norms(ws, 2)):
        torch.testing.assert_close(g, w, **NORM_TOL)
