"""DenseNet-BC for small images: Huang, Liu, van der Maaten & Weinberger, "Densely Connected Convolutional
Networks", CVPR 2017.

The defining idea is dense connectivity. Inside a dense block every layer receives the concatenation of
the feature maps of all the layers before it and adds k new maps (the growth rate k), so features are
reused rather than relearned and the layers can stay narrow. "BC" means both of the paper's efficiency
measures: every layer has a bottleneck (BN-ReLU-1x1 conv to 4k maps, then BN-ReLU-3x3 conv to k maps),
and the transition layers between blocks compress (a 1x1 conv keeps a fraction theta = 0.5 of the
channels, then 2x2 average pooling halves the map). The layout is the paper's CIFAR one (Sec. 3,
Implementation Details): a 3x3 convolution with 2k output channels and no pooling, three dense blocks of
equal depth at 32x32, 16x16 and 8x8 (28, 14 and 7 for 28x28 inputs), then BN-ReLU and global average
pooling. A DenseNet-BC of depth L has (L - 4) / 6 bottleneck layers per block. ``densenet_bc100_k12`` is
the paper's 0.8M-parameter network (Table 2), and ``densenet_bc40_k12`` is a 0.2M one with the same growth
rate.

Differences: transitions are BN-ReLU-1x1 conv-avg-pool as in the authors' code (the text leaves out the
ReLU), and a transition pools only while the map is at least 2 pixels on a side. There is no dropout
after each convolution: the paper used 0.2 there only when it trained without data augmentation.
``drop_rate`` is pupil's usual dropout before the head. Each layer concatenates its input and its new maps
directly, without the memory-efficient checkpointing of Pleiss et al. 2017.
"""

from __future__ import annotations

import torch
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.registry import MODELS


class DenseLayer(nn.Module):
    """BN-ReLU-Conv(1x1, bottleneck * k)-BN-ReLU-Conv(3x3, k), appended to its input (Huang et al. 2017, Sec. 3)."""

    def __init__(self, cin: int, growth_rate: int, bottleneck: int = 4):
        super().__init__()
        width = bottleneck * growth_rate
        self.branch = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, width, 1, bias=False),  # (B, 4k, h, w): the 3x3 sees 4k maps however wide cin grows
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, growth_rate, 3, padding=1, bias=False),  # (B, k, h, w)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, cin, h, w) -> (B, cin + k, h, w): the new maps join all the earlier ones.
        return torch.cat([x, self.branch(x)], 1)


def transition(cin: int, cout: int, pool: bool) -> nn.Sequential:
    """BN-ReLU-Conv(1x1) compression, then 2x2 average pooling: (B, cin, h, w) -> (B, cout, h // 2, w // 2)."""
    layers = [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False)]
    return nn.Sequential(*layers, nn.AvgPool2d(2)) if pool else nn.Sequential(*layers)


class DenseNet(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        depths: tuple[int, ...] = (16, 16, 16),
        growth_rate: int = 12,
        compression: float = 0.5,
        bottleneck: int = 4,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        cin, side = 2 * growth_rate, img_size
        self.stem = nn.Conv2d(in_chans, cin, 3, padding=1, bias=False)  # (B, 2k, H, W): no stride, no pool
        stages = []
        for i, depth in enumerate(depths):
            layers: list[nn.Module] = []
            if i:
                # Compression: floor(theta * m) channels, as in the paper's Sec. 3; the map halves (28 -> 14 -> 7).
                cout, pooled = max(1, int(compression * cin)), side >= 2
                layers.append(transition(cin, cout, pooled))
                cin, side = cout, (side // 2 if pooled else side)
            # Layer j of the block reads cin + j * k maps; the block ends with cin + depth * k.
            layers += [DenseLayer(cin + j * growth_rate, growth_rate, bottleneck) for j in range(depth)]
            cin += depth * growth_rate  # (B, cin, side, side)
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        # Every layer is pre-activation, so the last block's output still needs its BN-ReLU before pooling.
        self.norm = nn.BatchNorm2d(cin)
        self.act = nn.ReLU(inplace=True)
        self.num_features, self.num_classes, self.drop_rate = cin, num_classes, drop_rate
        self.head = nn.Linear(cin, num_classes)
        self.gradcam_layer = "act"  # (B, C, h, w): the normalised last-block maps that the head pools

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.stages(self.stem(x))))  # (B, C, H / 4, W / 4) with three blocks


SIZES = {
    "densenet_bc100_k12": dict(depths=(16, 16, 16), growth_rate=12),
    "densenet_bc40_k12": dict(depths=(6, 6, 6), growth_rate=12),
    "densenet_test": dict(depths=(2, 2, 2), growth_rate=6),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="DenseNet", paper="Huang et al., CVPR", year=2017, test=_name.endswith("_test"), defaults=_cfg
    )(DenseNet)
