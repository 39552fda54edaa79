"""ShuffleNet V2 for small images: Ma, Zhang, Zheng & Sun, "ShuffleNet V2: Practical Guidelines for
Efficient CNN Architecture Design", ECCV 2018.

The defining idea is a unit designed from measured speed rather than FLOPs, following four guidelines: equal
input and output widths minimise memory access, and group convolutions, fragmentation and element-wise
operations all cost time. The basic unit splits the channels in two. One half passes through unchanged; the
other goes through a 1x1 convolution, a 3x3 depthwise convolution and another 1x1 convolution, all at the same
width. The halves are concatenated (no addition), and a channel shuffle mixes them for the next unit.
The downsampling unit has no split: two stride-2 branches (3x3 depthwise + 1x1, and 1x1 + 3x3 depthwise +
1x1) both read the whole input, and their concatenation doubles the channels.

Differences for small images: the paper's stem (a 3x3 stride-2 convolution followed by a 3x3 stride-2
max-pool) is replaced by one 3x3 stride-1 convolution. The three stages then take 28x28 to 14, 7 and 4 pixels
(32x32 to 16, 8, 4) instead of reducing a 28x28 input to 1x1. There is no ``drop_path_rate``, and asking
for one is an error rather than a silent no-op: the units have no additive shortcut, so dropping a branch
would zero half of the channels instead of skipping the unit.
"""

from __future__ import annotations

import torch
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.layers import conv_bn
from pupil.models.registry import MODELS


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W) with channel j*C/g + i moved to i*g + j, so each group feeds every group."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """Basic unit (stride 1, cin == cout, Fig. 3c) or downsampling unit (stride 2, Fig. 3d)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        if stride == 1 and (cin != cout or cin % 2):
            raise ValueError(f"a stride-1 ShuffleNetV2 unit needs cin == cout and even, got {cin} -> {cout}")
        self.stride = stride
        mid = cout // 2  # each branch produces half of the output channels
        # Left branch: the untouched half in the basic unit; over the whole input, strided, when downsampling.
        self.branch1 = (
            nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, cout - mid, 1))
            if stride > 1
            else nn.Identity()
        )
        # Right branch, 1x1 -> 3x3 depthwise -> 1x1. Depthwise convolutions get BN only (the paper's Fig. 3).
        self.branch2 = nn.Sequential(
            conv_bn(cin if stride > 1 else cin // 2, mid, 1),
            conv_bn(mid, mid, 3, stride, groups=mid, act=None),
            conv_bn(mid, mid, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)  # channel split: (B, C/2, H, W) each
            out = torch.cat([x1, self.branch2(x2)], 1)  # (B, C, H, W)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)  # (B, cout, ceil(H/2), ceil(W/2))
        return channel_shuffle(out, 2)


class ShuffleNetV2(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        depths: tuple[int, ...] = (4, 8, 4),
        widths: tuple[int, ...] = (116, 232, 464),
        stem_width: int = 24,
        head_width: int = 1024,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        # 3x3 stride 1 and no max-pool (paper: 3x3/2 conv + 3x3/2 max-pool): (B, stem_width, H, W)
        self.stem = conv_bn(in_chans, stem_width, 3)
        stages, cin = [], stem_width
        for depth, width in zip(depths, widths, strict=True):
            # Table 5: each stage opens with one downsampling unit, then depth - 1 basic units.
            units = [ShuffleUnit(cin, width, 2)] + [ShuffleUnit(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*units))
            cin = width
        self.stages = nn.Sequential(*stages)  # (B, widths[-1], H/8, W/8), sides rounded up
        self.conv_head = conv_bn(cin, head_width, 1)  # the paper's Conv5: (B, head_width, h, w)
        self.num_features, self.num_classes, self.drop_rate = head_width, num_classes, drop_rate
        self.head = nn.Linear(head_width, num_classes)
        self.gradcam_layer = "conv_head"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.stages(self.stem(x)))  # (B, head_width, h, w); 4x4 at 28x28 and 32x32


# Ma et al. 2018, Table 5: output channels of stages 2-4 and Conv5 for each width ("x0.5", "x1.0", ...).
SIZES = {
    "shufflenetv2_x1_0": dict(depths=(4, 8, 4), widths=(116, 232, 464), head_width=1024),
    "shufflenetv2_x0_5": dict(depths=(4, 8, 4), widths=(48, 96, 192), head_width=1024),
    "shufflenetv2_test": dict(depths=(1, 2, 1), widths=(16, 32, 64), stem_width=8, head_width=128),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="ShuffleNetV2", paper="Ma et al., ECCV", year=2018, test=_name.endswith("_test"), defaults=_cfg
    )(ShuffleNetV2)
