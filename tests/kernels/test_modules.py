"""MaskedConv2d: a drop-in nn.Conv2d whose forward is masked_conv2d."""
import pytest
import torch
from torch import nn

from distributed_prune import kernels
from distributed_prune.kernels import MaskedConv2d, reference


def _ref(m: MaskedConv2d, x):
    return reference.masked_conv2d(x, m.weight, m.bias, m.out_mask, m.stride, m.padding,
                                   m.dilation, m.groups, m.in_mask)


@pytest.mark.parametrize("groups", [1, 2])
def test_from_conv_matches_reference_and_shares_parameters(device, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, groups=groups).to(device)
    mask = (torch.arange(10) % 3 != 0).float()
    m = MaskedConv2d.from_conv(conv, mask)
    assert m.weight is conv.weight and m.bias is conv.bias
    x = torch.randn(2, 6, 9, 9, device=device, requires_grad=True)
    with kernels.set_backend("triton"):
        y = m(x)
    torch.testing.assert_close(y, _ref(m, x), atol=1e-4, rtol=1e-4)
    y.sum().backward()
    assert torch.all(conv.weight.grad[mask == 0] == 0)
    assert torch.all(conv.weight.grad[mask != 0].abs().sum((1, 2, 3)) > 0)


def test_mask_edits_invalidate_cached_indices(device):
    torch.manual_seed(0)
    m = MaskedConv2d(4, 8, 3, padding=1).to(device)
    x = torch.randn(1, 4, 6, 6, device=device)
    with kernels.set_backend("triton"), torch.no_grad():
        m(x)
        m.out_mask[[1, 5]] = 0                      # in place, then announced
        m.refresh_masks()
        torch.testing.assert_close(m(x), _ref(m, x), atol=1e-4, rtol=1e-4)
        m.set_masks(in_mask=torch.tensor([1.0, 0.0, 1.0, 1.0]))
        torch.testing.assert_close(m(x), _ref(m, x), atol=1e-4, rtol=1e-4)
        assert torch.all(m(x)[:, [1, 5]] == 0)


def test_state_dict_padding_mode_and_repr():
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect", bias=False)
    m = MaskedConv2d.from_conv(conv, torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]))
    assert "out_mask" in m.state_dict() and "in_mask" not in m.state_dict()
    x = torch.randn(1, 3, 6, 6)
    want = nn.functional.conv2d(nn.functional.pad(x, [1, 1, 1, 1], mode="reflect"),
                                conv.weight * m.out_mask.view(-1, 1, 1, 1))
    torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)
    assert "active_out=3/5" in repr(m)
    fresh = MaskedConv2d(3, 5, 3, padding=1, padding_mode="reflect", bias=False)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), m(x))


def test_buffer_broadcast_keeps_cached_indices(monkeypatch):
    """DDP copies the (identical) mask buffers into place before each forward: that bumps the
    tensor version but must not recompute the indices (a device sync per layer per step)."""
    torch.manual_seed(0)
    m = MaskedConv2d(4, 8, 3, padding=1)
    m.set_masks(out_mask=(torch.arange(8) % 2).float(), in_mask=torch.tensor([1.0, 0, 1, 1]))
    x = torch.randn(1, 4, 6, 6)
    calls = []
    real = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), kernels.set_backend("gather"):
        m(x)
        assert len(calls) == 2                          # out and in indices, once
        for _ in range(3):
            with torch.no_grad():                       # what DDP's _sync_buffers does
                m.out_mask.copy_(m.out_mask.clone())
                m.in_mask.copy_(m.in_mask.clone())
            torch.testing.assert_close(m(x), _ref(m, x), atol=1e-5, rtol=1e-5)
        assert len(calls) == 2
        m.set_masks(out_mask=torch.ones(8))
        torch.testing.assert_close(m(x), _ref(m, x), atol=1e-5, rtol=1e-5)
        assert len(calls) == 4
