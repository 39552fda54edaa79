"""GoogLeNet (Inception v1) for small images: Szegedy, Liu, Jia, Sermanet, Reed, Anguelov, Erhan,
Vanhoucke & Rabinovich, "Going Deeper with Convolutions", CVPR 2015.

The defining idea is the Inception module (Fig. 2b). Four parallel branches see the same input: a 1x1
convolution, a 1x1 reduction followed by a 3x3, a 1x1 reduction followed by a 5x5, and a 3x3 max-pool
followed by a 1x1 projection. Their outputs are concatenated along channels. The 1x1 reductions keep the
wide 3x3 and 5x5 filters affordable: the network is 22 layers deep with 12x fewer parameters than
AlexNet. The nine modules (3a-3b, 4a-4e, 5a-5b in Table 1) form three stages separated by 3x3/2
max-pools, and global average pooling replaces fully connected layers before the classifier.

Differences for small images: the paper's stem (7x7/2 convolution, max-pool, 1x1 and 3x3 convolutions,
max-pool, with response normalisation) brings a 224x224 image down to 28x28 before module 3a. Here it is a
3x3, a 1x1 and a 3x3 convolution at stride 1 with the paper's widths (64, 64, 192), so a 28x28 image
reaches 3a at 28x28 and the modules run at the paper's resolutions (28, 14, 7). BatchNorm follows every
convolution, as in torchvision's GoogLeNet and Inception v2 (Ioffe & Szegedy 2015), and there is no
response normalisation. The two auxiliary classifiers on 4a and 4d are omitted. The paper used them
only during training (loss weight 0.3) to help gradients reach the lower layers, and BatchNorm deals with
that problem here. The "5x5" branch is a true 5x5 (torchvision's uses a 3x3). The paper's 40%
dropout before the linear layer is pupil's ``drop_rate``: set it to 0.4 to match. ``width`` scales
every channel count. ``googlenet_small`` is the same 9-module network at a quarter of the width.
"""

from __future__ import annotations

import torch
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.layers import conv_bn
from pupil.models.registry import MODELS

# Szegedy et al. 2015, Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) per module, grouped
# into the stages that a 3x3/2 max-pool separates: 3a-3b (out 256, 480), 4a-4e (512, 512, 512, 528, 832),
# 5a-5b (832, 1024).
INCEPTION_V1 = (
    ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64)),
    (
        (192, 96, 208, 16, 48, 64),
        (160, 112, 224, 24, 64, 64),
        (128, 128, 256, 24, 64, 64),
        (112, 144, 288, 32, 64, 64),
        (256, 160, 320, 32, 128, 128),
    ),
    ((256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)),
)


class Inception(nn.Module):
    """Four parallel branches over the same input, concatenated along channels (Szegedy et al. 2015, Fig. 2b)."""

    def __init__(self, cin: int, c1: int, c3_reduce: int, c3: int, c5_reduce: int, c5: int, pool_proj: int):
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c3_reduce, 1), conv_bn(c3_reduce, c3, 3))
        self.b5 = nn.Sequential(conv_bn(cin, c5_reduce, 1), conv_bn(c5_reduce, c5, 5))
        # A 3x3/1 max-pool keeps the size; the 1x1 projection bounds the channels it would otherwise pass on.
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, padding=1), conv_bn(cin, pool_proj, 1))
        self.out_chans = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, cin, h, w) -> (B, c1 + c3 + c5 + pool_proj, h, w): every branch keeps the map size.
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], 1)


class GoogLeNet(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        stem: tuple[int, int, int] = (64, 64, 192),
        stages: tuple[tuple[tuple[int, ...], ...], ...] = INCEPTION_V1,
        width: float = 1.0,
        drop_rate: float = 0.0,
    ):
        super().__init__()

        def scaled(c: int) -> int:
            return max(1, round(c * width))

        s1, s2, s3 = (scaled(c) for c in stem)
        # (B, in_chans, H, W) -> (B, s3, H, W): 3x3 for the paper's 7x7/2, then its 1x1 and 3x3; no stride, no pool.
        self.stem = nn.Sequential(conv_bn(in_chans, s1, 3), conv_bn(s1, s2, 1), conv_bn(s2, s3, 3))
        built, cin = [], s3
        for i, rows in enumerate(stages):
            # The 3x3/2 max-pool between stages: side -> (side - 1) // 2 + 1, so 28 -> 14 -> 7 and 32 -> 16 -> 8.
            modules: list[nn.Module] = [nn.MaxPool2d(3, 2, padding=1)] if i else []
            for row in rows:
                inception = Inception(cin, *(scaled(c) for c in row))
                modules.append(inception)
                cin = inception.out_chans
            built.append(nn.Sequential(*modules))
        self.stages = nn.Sequential(*built)
        self.num_features, self.num_classes, self.drop_rate = cin, num_classes, drop_rate
        self.head = nn.Linear(cin, num_classes)
        # The last Inception module's concatenated output, (B, cin, h, w) with h = 7 for 28x28 inputs.
        self.gradcam_layer = f"stages.{len(built) - 1}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, C, H / 2^(S-1), W / 2^(S-1)), rounded up


SIZES = {
    "googlenet": dict(stem=(64, 64, 192), stages=INCEPTION_V1),
    "googlenet_small": dict(stem=(64, 64, 192), stages=INCEPTION_V1, width=0.25),
    "googlenet_test": dict(stem=(8, 8, 16), stages=(((8, 8, 8, 2, 4, 4),), ((8, 8, 12, 2, 4, 4),))),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="GoogLeNet", paper="Szegedy et al., CVPR", year=2015, test=_name.endswith("_test"), defaults=_cfg
    )(GoogLeNet)
