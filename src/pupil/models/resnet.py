"""Residual networks for small images: He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016.

Two layouts from the paper: the CIFAR networks of its Section 4.2 (ResNet-20/32/56: a 3x3 stem,
three stages of 16/32/64 channels, 3n basic blocks), and the ImageNet ResNet-18 with its 7x7/2 stem
and max-pool replaced by one 3x3/1 convolution so 28x28 inputs are not reduced to almost nothing.
Differences: shortcuts that change shape use a 1x1 projection (the paper's option B) for every
variant; drop-path (stochastic depth, Huang et al. 2016) is available on the residual branch.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.layers import conv_bn
from pupil.models.registry import MODELS


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        cout = width * self.expansion
        self.branch = nn.Sequential(conv_bn(cin, width, 3, stride), conv_bn(width, cout, 3, act=None))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=None)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(x) + self.drop_path(self.branch(x)))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4), as in the deeper ImageNet ResNets."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__(cin, width, stride, drop_path)
        cout = width * self.expansion
        self.branch = nn.Sequential(
            conv_bn(cin, width, 1), conv_bn(width, width, 3, stride), conv_bn(width, cout, 1, act=None)
        )
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=None)


class ResNeXtBottleneck(BasicBlock):
    """Bottleneck whose 3x3 convolution is split into ``cardinality`` groups (Xie et al. 2017, Fig. 3c).

    Inner width = planes * base_width / 64 * cardinality, as in the paper's template.
    """

    expansion = 4

    def __init__(
        self, cin: int, width: int, stride: int = 1, drop_path: float = 0.0, cardinality: int = 8, base_width: int = 64
    ):
        super().__init__(cin, width, stride, drop_path)
        inner = int(width * base_width / 64) * cardinality
        cout = width * self.expansion
        # Built before the 1x1 convolutions around it: construction order fixes the weights a seed gives.
        grouped = conv_bn(inner, inner, 3, stride, groups=cardinality)
        self.branch = nn.Sequential(conv_bn(cin, inner, 1), grouped, conv_bn(inner, cout, 1, act=None))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=None)


class ResNet(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        depths: tuple[int, ...] = (3, 3, 3),
        widths: tuple[int, ...] = (16, 32, 64),
        stem_width: int | None = None,
        block: str = "basic",
        cardinality: int = 1,
        base_width: int = 64,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck, "resnext": ResNeXtBottleneck}[block]
        extra = {"cardinality": cardinality, "base_width": base_width} if block == "resnext" else {}
        stem_width = stem_width or widths[0]
        self.stem = conv_bn(in_chans, stem_width, 3)
        # Stochastic depth grows linearly with block index (Huang et al. 2016).
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, cin, i = [], stem_width, 0
        for s, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for d in range(depth):
                blocks.append(block_cls(cin, width, 2 if (d == 0 and s > 0) else 1, rates[i], **extra))
                cin, i = width * block_cls.expansion, i + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features, self.num_classes, self.drop_rate = cin, num_classes, drop_rate
        self.head = nn.Linear(cin, num_classes)
        self.gradcam_layer = f"stages.{len(stages) - 1}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, C, H/2^(S-1), W/2^(S-1))


SIZES = {
    "resnet20": dict(depths=(3, 3, 3), widths=(16, 32, 64)),
    "resnet32": dict(depths=(5, 5, 5), widths=(16, 32, 64)),
    "resnet56": dict(depths=(9, 9, 9), widths=(16, 32, 64)),
    "resnet18": dict(depths=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
    "resnet50": dict(depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), block="bottleneck"),
    "resnet_test": dict(depths=(1, 1, 1), widths=(8, 16, 32)),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="ResNet", paper="He et al., CVPR", year=2016, test=_name.endswith("_test"), defaults=_cfg
    )(ResNet)

# ResNeXt (Xie, Girshick, Dollar, Tu & He, "Aggregated Residual Transformations for Deep Neural Networks",
# CVPR 2017): the same network with grouped-convolution bottlenecks; "29" is the paper's CIFAR depth
# (3 stages x 3 blocks x 3 layers + 2), "4x32d" is cardinality x bottleneck width. resnext29_4x8d keeps that
# layout at a quarter of the stage widths (8/16/32 planes): 0.28 M parameters and 66 MFLOPs at 28x28, the
# budget of resnet20 (0.27 M, 62 MFLOPs), so the two make the paper's equal-complexity comparison.
RESNEXT_SIZES = {
    "resnext29_4x8d": dict(depths=(3, 3, 3), widths=(8, 16, 32), block="resnext", cardinality=4, base_width=64),
    "resnext29_4x32d": dict(depths=(3, 3, 3), widths=(64, 128, 256), block="resnext", cardinality=4, base_width=32),
    "resnext29_8x16d": dict(depths=(3, 3, 3), widths=(64, 128, 256), block="resnext", cardinality=8, base_width=16),
    "resnext_test": dict(depths=(1, 1, 1), widths=(8, 16, 32), block="resnext", cardinality=4, base_width=16),
}

for _name, _cfg in RESNEXT_SIZES.items():
    MODELS.register(
        _name, family="ResNeXt", paper="Xie et al., CVPR", year=2017, test=_name.endswith("_test"), defaults=_cfg
    )(ResNet)
