"""build_optimizer: weight decay by tensor rank, trainable params only."""
import pytest
import torch
from torch import nn

from distributed_prune.errors import UserError
from distributed_prune.train.optim import build_optimizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))


def test_groups_split_by_rank():
    model = _model()
    opt = build_optimizer(model, lr=0.1, weight_decay=5e-4)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert all(p.dim() < 2 for p in no_decay["params"]) and len(no_decay["params"]) == 4
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert decay["momentum"] == 0.9 and not decay["nesterov"]


def test_zero_grad_step_decays_only_matrices():
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, momentum=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in model.parameters():
        expected = 1.0 - 0.1 * 0.5 if p.dim() >= 2 else 1.0
        torch.testing.assert_close(p.detach(), torch.full_like(p, expected))


def test_frozen_params_ignored_and_adamw():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(p is not model[0].weight for p in params) and len(params) == 5


def test_unknown_optimizer_is_user_error():
    with pytest.raises(UserError, match="'lamb'"):
        build_optimizer(_model(), name="lamb", lr=0.1)
