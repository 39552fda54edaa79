"""VGG with batch normalisation: Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015 (BatchNorm after each convolution as in Ioffe & Szegedy 2015).

The defining idea is depth from stacks of 3x3 convolutions separated by 2x2 max-pooling. Differences
for small images: a stage is followed by pooling only while the feature map is at least 2 pixels on a
side (28x28 inputs allow four poolings), and the three 4096-unit fully connected layers are replaced by
global average pooling and one linear layer, as in the usual CIFAR variants. ``vgg_small`` is the
three-stage, two-convolutions-per-stage network (widths 16/32/64) that pupil's Fashion-MNIST recipes
use; on a 2-core CPU it reached higher accuracy in the same time than the same layout at 32/64/128
(``vgg_medium``) by taking more epochs (benchmarks/train_fmnist.py).
"""

from __future__ import annotations

import torch
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.layers import conv_bn
from pupil.models.registry import MODELS


class VGG(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        stages: tuple[tuple[int, ...], ...] = ((64,), (128,), (256, 256), (512, 512), (512, 512)),
        drop_rate: float = 0.0,
    ):
        super().__init__()
        layers, cin, side = [], in_chans, img_size
        for widths in stages:
            for w in widths:
                layers += conv_bn(cin, w, 3)  # unpacked into features, whose keys stay features.N
                cin = w
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
        self.features = nn.Sequential(*layers)
        self.num_features, self.num_classes, self.drop_rate = cin, num_classes, drop_rate
        self.head = nn.Linear(cin, num_classes)
        # The last ReLU before the final pooling: (B, C, h, w) with h, w >= 1.
        last_relu = max(i for i, m in enumerate(layers) if isinstance(m, nn.ReLU))
        self.gradcam_layer = f"features.{last_relu}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, C, h, w)


SIZES = {
    "vgg11": dict(stages=((64,), (128,), (256, 256), (512, 512), (512, 512))),
    "vgg16": dict(stages=((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))),
    "vgg_medium": dict(stages=((32, 32), (64, 64), (128, 128))),
    "vgg_small": dict(stages=((16, 16), (32, 32), (64, 64))),
    "vgg_test": dict(stages=((8,), (16,))),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="VGG", paper="Simonyan & Zisserman, ICLR", year=2015, test=_name.endswith("_test"), defaults=_cfg
    )(VGG)
