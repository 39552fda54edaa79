"""Parameter and FLOP counts (FLOPs from ``torch.utils.flop_counter``: one multiply-add counts as 2)."""

from __future__ import annotations

import torch
from torch import nn


def count_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one input of ``shape`` (batch included) in eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    model.train(was_training)
    return counter.get_total_flops() // shape[0]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
