"""AlexNet for small images: Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks", NeurIPS 2012.

Five convolutions and three fully connected layers. The defining ideas are ReLU units instead of
saturating ones (Sec. 3.1), local response normalisation after the first two convolutions (Sec. 3.3),
overlapping max-pooling, with 3x3 windows at stride 2, after the first, second and fifth convolutions
(Sec. 3.4), and dropout in the fully connected classifier (Sec. 4.2).

Differences for small images: the first convolution is 5x5 with stride 1 instead of 11x11 with stride 4
(at stride 4 a 28x28 image would be 6x6 after one layer). Every convolution is padded so that it keeps
the map size, and a pool is added only while the map is at least 3 pixels on a side. The first fully
connected layer reads the flattened map at the size that is left (256 x 2 x 2 for 28x28 inputs,
256 x 3 x 3 for 32x32) instead of the paper's 256 x 6 x 6. The network is one tower: the paper split
it over two GPUs, so its second, fourth and fifth convolutions saw only half of the channels. Dropout
(``fc_drop_rate``, 0.5 as in the paper) acts on the inputs of the two hidden fully connected layers, as
in torchvision, rather than on their outputs. pupil's usual ``drop_rate`` adds another dropout before the
head and is 0 by default. Weights use He initialisation instead of the paper's N(0, 0.01) with unit
biases, because the network has no BatchNorm and the paper's initialisation is slow to start. ``alexnet``
keeps the paper's widths; ``alexnet_small`` is the same layout at a width a CPU can train.
"""

from __future__ import annotations

import torch
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.registry import MODELS

# Per convolution conv1..conv5: (kernel, followed by response normalisation, followed by max-pooling).
# Krizhevsky et al. 2012, Sec. 3.5 and Fig. 2; conv1's 11x11/4 becomes 5x5/1 (module docstring).
LAYOUT = ((5, True, True), (5, True, True), (3, False, False), (3, False, False), (3, False, True))


class AlexNet(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        widths: tuple[int, ...] = (96, 256, 384, 384, 256),
        fc_widths: tuple[int, int] = (4096, 4096),
        lrn: bool = True,
        fc_drop_rate: float = 0.5,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        layers, cin, side = [], in_chans, img_size
        for cout, (k, norm, pooled) in zip(widths, LAYOUT, strict=True):
            # Stride 1 and "same" padding: (B, cin, side, side) -> (B, cout, side, side); only pools shrink the map.
            layers += [nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=True)]
            if norm and lrn:
                # Paper: k=2, n=5, alpha=1e-4, beta=0.75. PyTorch divides alpha by n, so 5 * 1e-4 here.
                layers.append(nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0))
            if pooled and side >= 3:
                layers.append(nn.MaxPool2d(3, 2))  # overlapping windows: side -> (side - 3) // 2 + 1
                side = (side - 3) // 2 + 1
            cin = cout
        # side after the pools: 28 -> 13 -> 6 -> 2; 32 -> 15 -> 7 -> 3; 64 -> 31 -> 15 -> 7.
        self.features = nn.Sequential(*layers)
        f6, f7 = fc_widths
        self.fc = nn.Sequential(
            nn.Flatten(),  # (B, widths[-1] * side * side)
            nn.Dropout(fc_drop_rate),
            nn.Linear(cin * side * side, f6),
            nn.ReLU(inplace=True),
            nn.Dropout(fc_drop_rate),
            nn.Linear(f6, f7),
            nn.ReLU(inplace=True),
        )
        # He et al. 2015 initialisation: with no BatchNorm, PyTorch's default (variance 1/(3 fan_in)) shrinks the
        # signal about sixfold in variance at every ReLU layer. Done before the head exists, which keeps the default
        # (as reset_classifier would give it).
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.num_features, self.num_classes, self.drop_rate = f7, num_classes, drop_rate
        self.head = nn.Linear(f7, num_classes)
        # conv5's ReLU, before the last pool: (B, widths[-1], 6, 6) for 28x28 inputs, (B, ., 7, 7) for 32x32.
        last_relu = max(i for i, m in enumerate(layers) if isinstance(m, nn.ReLU))
        self.gradcam_layer = f"features.{last_relu}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))  # (B, fc_widths[-1]): like LeNet, the features are the fc7 units


SIZES = {
    "alexnet": dict(widths=(96, 256, 384, 384, 256), fc_widths=(4096, 4096)),
    "alexnet_small": dict(widths=(32, 64, 128, 128, 64), fc_widths=(512, 512)),
    "alexnet_test": dict(widths=(8, 16, 16, 16, 16), fc_widths=(32, 32)),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name,
        family="AlexNet",
        paper="Krizhevsky, Sutskever & Hinton, NeurIPS",
        year=2012,
        test=_name.endswith("_test"),
        defaults=_cfg,
    )(AlexNet)
