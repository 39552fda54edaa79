"""EfficientNet for small images: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019.

The defining idea is compound scaling. A baseline found by architecture search (B0: MBConv blocks, i.e.
MobileNetV2 inverted residuals with squeeze-and-excitation and SiLU/swish) is enlarged along depth, width and
input resolution together, with one coefficient phi: depth x alpha^phi, width x beta^phi and resolution
x gamma^phi. The bases are alpha = 1.2, beta = 1.1 and gamma = 1.15, found by a grid search at phi = 1 under
alpha * beta^2 * gamma^2 ~ 2, so each step of phi roughly doubles the FLOPs (Eq. 3). Repeats are rounded up
and widths to multiples of 8, as in the paper's code. Stochastic depth (Huang et al. 2016) drops the residual
MBConv branches, at a rate that grows linearly with block index.

Differences for small images: the stem (3x3, stride 2 in the paper) and the first block of the 24-channel
stage use stride 1. A 28x28 or 32x32 input therefore ends as a 4x4 map (three downsamplings, not five). The
base resolution is Fashion-MNIST's 28, so a variant's ``preferred_img_size`` is round(28 * 1.15^phi):
28, 32 and 37 for phi = 0, 1, 2. It is recorded, not enforced: global pooling accepts any size. The variants
follow the paper's phi rule rather than the released checkpoints' hand-set coefficients, so
``efficientnet_b1`` (phi = 1: depth 1.2, width 1.1) has the depth and width of the released B2. Dropout
before the classifier (0.2 for B0 in the paper) and drop-path are off by default (``drop_rate``,
``drop_path_rate``). ``efficientnet_test`` uses its own three-stage table at phi = 0.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import DropPath, make_divisible
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.layers import conv_bn
from pupil.models.registry import MODELS

# Compound-scaling bases for depth, width and resolution (Tan & Le 2019, Eq. 3 and the grid search of Section 4).
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_IMG_SIZE = 28  # Fashion-MNIST's side plays the role of the paper's 224

# Tan & Le 2019, Table 1 (EfficientNet-B0), as (t, c, n, s, k): expansion ratio, output channels, repeats,
# stride of the stage's first block, depthwise kernel. The 24-channel stage has stride 1 here (2 in the paper).
STAGES = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 1, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)


def compound_scale(
    stages: tuple[tuple[int, int, int, int, int], ...], phi: float, stem_width: int = 32, head_width: int = 1280
) -> tuple[tuple[tuple[int, int, int, int, int], ...], int, int]:
    """Apply the compound coefficient to a stage table.

    Args:
        stages: rows (t, c, n, s, k) as in ``STAGES``.
        phi: the compound coefficient; 0 returns the table with widths rounded to multiples of 8.
        stem_width: channels of the stem convolution, scaled like the stages.
        head_width: channels of the final 1x1 convolution, scaled like the stages.

    Returns:
        The scaled rows (repeats x alpha^phi rounded up, channels x beta^phi rounded to a multiple of 8 and never
        more than 10% below), the scaled stem width and the scaled head width.
    """
    depth, width = ALPHA**phi, BETA**phi
    rows = tuple((t, make_divisible(c * width, 8), math.ceil(n * depth), s, k) for t, c, n, s, k in stages)
    return rows, make_divisible(stem_width * width, 8), make_divisible(head_width * width, 8)


def preferred_img_size(phi: float, base: int = BASE_IMG_SIZE) -> int:
    """The input side a variant is scaled for: base x gamma^phi, rounded (28, 32, 37 for phi = 0, 1, 2)."""
    return round(base * GAMMA**phi)


SILU = partial(nn.SiLU, inplace=True)  # swish, x * sigmoid(x): after every convolution but the linear projections


class SqueezeExcite(nn.Module):
    """Hu et al. 2018: a per-channel gate from the globally pooled features, 1x1 reduce -> SiLU -> 1x1 -> sigmoid."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1)
        self.act = nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.conv_expand(self.act(self.conv_reduce(s))))  # (B, C, H, W)


class MBConv(nn.Module):
    """1x1 expansion, kxk depthwise (carries the stride), squeeze-and-excitation, 1x1 linear projection."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int = 1,
        expand_ratio: int = 6,
        kernel: int = 3,
        se_ratio: float = 0.25,
        drop_path: float = 0.0,
    ):
        super().__init__()
        hidden = cin * expand_ratio
        # With t = 1 there is nothing to widen, so the 1x1 expansion is left out (as in the paper's code).
        expand = [conv_bn(cin, hidden, 1, act=SILU)] if expand_ratio != 1 else []
        self.branch = nn.Sequential(
            *expand,  # (B, t*cin, H, W)
            conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=SILU),  # (B, t*cin, ceil(H/s), ceil(W/s))
            # The SE bottleneck is a fraction of the block's input width, not of the expanded width (paper's code).
            SqueezeExcite(hidden, max(1, int(cin * se_ratio))),
            conv_bn(hidden, cout, 1, act=None),  # linear bottleneck, no activation: (B, cout, ceil(H/s), ceil(W/s))
        )
        self.use_shortcut = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path) if drop_path and self.use_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        return x + self.drop_path(out) if self.use_shortcut else out


class EfficientNet(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        phi: float = 0.0,
        stages: tuple[tuple[int, int, int, int, int], ...] = STAGES,
        stem_width: int = 32,
        head_width: int = 1280,
        se_ratio: float = 0.25,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        # img_size is not needed to build the network (global pooling); preferred_img_size is advice to recipes.
        self.phi, self.preferred_img_size = phi, preferred_img_size(phi)
        stages, stem_width, head_width = compound_scale(stages, phi, stem_width, head_width)
        self.stem = conv_bn(in_chans, stem_width, 3, act=SILU)  # stride 1 (paper: 2): (B, stem_width, H, W)
        rates = torch.linspace(0, drop_path_rate, sum(n for _, _, n, _, _ in stages)).tolist()
        blocks, cin, i = [], stem_width, 0
        for t, c, n, s, k in stages:
            stage = []
            for d in range(n):
                stage.append(MBConv(cin, c, s if d == 0 else 1, t, k, se_ratio, rates[i]))
                cin, i = c, i + 1
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)  # (B, cin, H/8, W/8) with the default table (ceil at odd sides)
        self.conv_head = conv_bn(cin, head_width, 1, act=SILU)  # final 1x1 convolution: (B, head_width, h, w)
        self.num_features, self.num_classes, self.drop_rate = head_width, num_classes, drop_rate
        self.head = nn.Linear(head_width, num_classes)
        self.gradcam_layer = "conv_head"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))  # (B, head_width, h, w); 4x4 at 28x28 and 32x32


SIZES = {
    "efficientnet_b0": dict(phi=0),
    "efficientnet_b1": dict(phi=1),
    "efficientnet_b2": dict(phi=2),
    "efficientnet_test": dict(
        phi=0, stages=((1, 8, 1, 1, 3), (4, 16, 1, 2, 3), (4, 24, 2, 2, 5)), stem_width=8, head_width=64
    ),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name,
        family="EfficientNet",
        paper="Tan & Le, ICML",
        year=2019,
        test=_name.endswith("_test"),
        defaults=_cfg,
        preferred_img_size=preferred_img_size(_cfg["phi"]),
    )(EfficientNet)
