"""MobileNetV2 for small images: Sandler, Howard, Zhu, Zhmoginov & Chen, "MobileNetV2: Inverted Residuals
and Linear Bottlenecks", CVPR 2018.

The defining idea is the inverted residual with a linear bottleneck. Each block widens a thin tensor with a
1x1 convolution (t times its channels), filters it with a 3x3 depthwise convolution, and projects it back to a
thin tensor with a 1x1 convolution that has no non-linearity, because a ReLU in the low-dimensional
bottleneck destroys information (Section 3.2). The shortcut joins the thin tensors and is used when the stride
is 1 and the channel counts match. The activation is ReLU6. A width multiplier scales every layer and rounds
it to a multiple of 8. As in the paper, the last 1x1 convolution stays at 1280 channels when the multiplier is
below one.

Differences for small images: the paper's stem (3x3, stride 2) and the first block of its 24-channel stage
(stride 2) use stride 1 here. The network therefore downsamples three times instead of five, and a 28x28
or 32x32 input ends as a 4x4 map rather than 1x1. Drop-path (stochastic depth, Huang et al. 2016) on the
residual branches is an addition and is off by default. ``mobilenetv2_test`` uses its own three-stage table.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import DropPath, make_divisible
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.layers import conv_bn
from pupil.models.registry import MODELS

# Sandler et al. 2018, Table 2, as (t, c, n, s): expansion factor, output channels, repeats, stride of the
# stage's first block. The 24-channel stage has stride 1 here (2 in the paper); see the module docstring.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

# min(max(x, 0), 6): the paper chose it for its robustness in low-precision arithmetic.
RELU6 = partial(nn.ReLU6, inplace=True)


class InvertedResidual(nn.Module):
    """1x1 expansion to t*cin, 3x3 depthwise (carries the stride), 1x1 linear projection to cout."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand_ratio: int = 6, drop_path: float = 0.0):
        super().__init__()
        hidden = cin * expand_ratio
        # With t = 1 there is nothing to widen, so the 1x1 expansion is left out (as in the paper's code).
        expand = [conv_bn(cin, hidden, 1, act=RELU6)] if expand_ratio != 1 else []
        self.branch = nn.Sequential(
            *expand,  # (B, t*cin, H, W)
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=RELU6),  # depthwise: (B, t*cin, H/s, W/s)
            conv_bn(hidden, cout, 1, act=None),  # linear bottleneck, no ReLU6: (B, cout, H/s, W/s)
        )
        self.use_shortcut = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path) if drop_path and self.use_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        return x + self.drop_path(out) if self.use_shortcut else out


class MobileNetV2(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        width_mult: float = 1.0,
        stages: tuple[tuple[int, int, int, int], ...] = STAGES,
        stem_width: int = 32,
        head_width: int = 1280,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        # Channels are rounded to multiples of 8 as in the paper's code (timm's make_divisible is the same rule:
        # nearest multiple, never more than 10% below the unrounded width).
        stem_width = make_divisible(stem_width * width_mult, 8)
        # As in the paper, multipliers below one are not applied to the last convolution.
        head_width = make_divisible(head_width * max(1.0, width_mult), 8)
        self.stem = conv_bn(in_chans, stem_width, 3, act=RELU6)  # stride 1 (paper: 2): (B, stem_width, H, W)
        # Stochastic depth grows linearly with block index (Huang et al. 2016); only residual blocks use it.
        rates = torch.linspace(0, drop_path_rate, sum(n for _, _, n, _ in stages)).tolist()
        blocks, cin, i = [], stem_width, 0
        for t, c, n, s in stages:
            cout = make_divisible(c * width_mult, 8)
            stage = []
            for d in range(n):
                stage.append(InvertedResidual(cin, cout, s if d == 0 else 1, t, rates[i]))
                cin, i = cout, i + 1
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)  # (B, cin, H/8, W/8) with the default table (ceil at odd sides)
        self.conv_head = conv_bn(cin, head_width, 1, act=RELU6)  # the final 1x1 convolution: (B, head_width, h, w)
        self.num_features, self.num_classes, self.drop_rate = head_width, num_classes, drop_rate
        self.head = nn.Linear(head_width, num_classes)
        self.gradcam_layer = "conv_head"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))  # (B, head_width, h, w); 4x4 at 28x28 and 32x32


SIZES = {
    "mobilenetv2_100": dict(width_mult=1.0),
    "mobilenetv2_050": dict(width_mult=0.5),
    "mobilenetv2_test": dict(stages=((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 1, 2)), stem_width=8, head_width=64),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name,
        family="MobileNetV2",
        paper="Sandler et al., CVPR",
        year=2018,
        test=_name.endswith("_test"),
        defaults=_cfg,
    )(MobileNetV2)
