"""Batched augmentations on tensors already on the training device.

Working on whole batches (not per-image PIL calls) keeps 2-core CPUs busy with the model instead of
Python loops, and the same code runs on a GPU. Every random draw comes from one ``torch.Generator``
so that a resumed run replays exactly the augmentations an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    crop_pad: int = 2
    """Random crop after zero-padding each side by this many pixels (0 turns it off)."""
    flip: bool = True
    """Random horizontal flip."""
    rotate: float = 0.0
    """Maximum absolute rotation in degrees (0 turns it off)."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength, applied only to colour images."""
    erase_prob: float = 0.0
    """Probability of random erasing (Zhong et al. 2020) per image."""


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Pad by ``pad`` and crop back at a random offset per image. (B, C, H, W) -> same."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_rotate(x: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    angle = (torch.rand(x.shape[0], generator=g) * 2 - 1) * math.radians(degrees)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors drawn from [1 - s, 1 + s] per image (colour only)."""
    b = x.shape[0]

    def factor() -> torch.Tensor:
        return (1 + (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * strength).to(x)

    x = x * factor()
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)
    x = grey.mean((2, 3), keepdim=True) + (x - grey.mean((2, 3), keepdim=True)) * factor()
    x = grey + (x - grey) * factor()
    return x.clamp(0, 1)


def random_erase(x: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    """Erase one rectangle (2-33% of the area, aspect 0.3-3.3) per chosen image with uniform noise."""
    b, _, h, w = x.shape
    area = h * w * (0.02 + 0.31 * torch.rand(b, generator=g))
    log_r = torch.empty(b).uniform_(math.log(0.3), math.log(1 / 0.3), generator=g)
    eh = (area * log_r.exp()).sqrt().round().clamp(1, h).long()
    ew = (area / log_r.exp()).sqrt().round().clamp(1, w).long()
    top = (torch.rand(b, generator=g) * (h - eh + 1)).long()
    left = (torch.rand(b, generator=g) * (w - ew + 1)).long()
    on = torch.rand(b, generator=g) < prob
    noise = torch.rand(x.shape, generator=g).to(x)
    r = torch.arange(h)[None, :, None]
    q = torch.arange(w)[None, None, :]
    box = (r >= top[:, None, None]) & (r < (top + eh)[:, None, None]) & (q >= left[:, None, None])
    box = box & (q < (left + ew)[:, None, None]) & on[:, None, None]  # (B, H, W)
    return torch.where(box[:, None].to(x.device), noise, x)


class BatchAugment:
    """Applies the configured augmentations to a float batch in [0, 1]."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        if cfg.crop_pad:
            x = random_crop(x, cfg.crop_pad, g)
        if cfg.flip:
            x = random_flip(x, g)
        if cfg.rotate:
            x = random_rotate(x, cfg.rotate, g)
        if cfg.color_jitter and x.shape[1] == 3:
            x = color_jitter(x, cfg.color_jitter, g)
        if cfg.erase_prob:
            x = random_erase(x, cfg.erase_prob, g)
        return x
