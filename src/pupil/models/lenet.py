"""LeNet-5: LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document
recognition", Proc. IEEE 1998.

Two 5x5 convolution/subsampling stages (6 then 16 maps) and fully connected layers of 120 and 84
units with tanh, as in the paper. Differences: 28x28 inputs are zero-padded by 2 to the paper's 32x32
grid inside the first convolution; subsampling is average pooling without the trainable
coefficient; the output is a plain linear layer instead of Euclidean RBF units; the C3 layer is fully
connected to S2 rather than the paper's hand-picked connection table.
"""

from __future__ import annotations

import torch
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.registry import MODELS


class LeNet5(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        widths=(6, 16, 120, 84),
        drop_rate: float = 0.0,
    ):
        super().__init__()
        c1, c3, f5, f6 = widths
        pad = 2 if img_size == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5, padding=pad),
            nn.Tanh(),
            nn.AvgPool2d(2),  # C1, S2
            nn.Conv2d(c1, c3, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),  # C3, S4
        )
        side = ((img_size + 2 * pad - 4) // 2 - 4) // 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c3 * side * side, f5), nn.Tanh(), nn.Linear(f5, f6), nn.Tanh())
        self.num_features, self.num_classes, self.drop_rate = f6, num_classes, drop_rate
        self.head = nn.Linear(f6, num_classes)
        self.gradcam_layer = "features.4"  # the last convolution's activation (B, 16, 5, 5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))  # (B, 84): LeNet's "features" are the F6 units


SIZES = {
    "lenet5": dict(widths=(6, 16, 120, 84)),
    "lenet5_test": dict(widths=(4, 8, 32, 16)),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="LeNet", paper="LeCun et al., Proc. IEEE", year=1998, test=_name.endswith("_test"), defaults=_cfg
    )(LeNet5)
