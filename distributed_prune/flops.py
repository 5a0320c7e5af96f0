"""MACs and parameter counts through ``torch.utils.flop_counter`` (no hand formulas).

Convention (docs/science.md section 5): multiply-adds of conv and linear layers (the flop counter's
matmul/conv flops / 2); BN, activations, pooling and residual additions are not counted.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def _forward_flops(model: nn.Module, example_input: torch.Tensor) -> FlopCounterMode:
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(example_input)
    finally:
        model.train(was)
    return counter


def count(model: nn.Module, example_input: torch.Tensor) -> dict:
    """``{"macs": int, "params": int}`` for ONE sample: ``example_input`` is (1, ...) or is
    sliced to its first sample, so the result does not depend on the batch size."""
    counter = _forward_flops(model, example_input[:1])
    return {"macs": int(counter.get_total_flops() // 2),
            "params": int(sum(p.numel() for p in model.parameters()))}

