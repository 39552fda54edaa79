"""A small CNN for Fashion-MNIST, written as plain PyTorch with no pupil imports: the stand-in for a model
trained outside pupil (``examples/train_outside.py`` trains it; pupil can load it as
``py:examples.outside_cnn:build``).

Input: 1x28x28 grey images with pixels scaled to [0, 1] and then normalised as ``(x - 0.2860) / 0.3530``
(the Fashion-MNIST training-set mean and std); the network does not normalise inside.
Output: 10 logits, in Fashion-MNIST's class order (T-shirt/top, Trouser, ..., Ankle boot).
"""

from torch import nn

MEAN, STD = 0.2860, 0.3530


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class OutsideCNN(nn.Module):
    """Three 3x3 conv blocks (32, 64, 128 channels), two max-pools, global average pool, one linear layer."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(1, 32),  # (B, 32, 28, 28)
            nn.MaxPool2d(2),
            conv_block(32, 64),  # (B, 64, 14, 14)
            nn.MaxPool2d(2),
            conv_block(64, 128),  # (B, 128, 7, 7)
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def build(num_classes: int = 10) -> OutsideCNN:
    """The untrained network; load ``model.pth`` into it with ``load_state_dict``."""
    return OutsideCNN(num_classes)
