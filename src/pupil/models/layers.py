"""Layers that several families share: ``conv_bn``, the convolution -> BatchNorm -> activation unit.

Ioffe & Szegedy 2015 put BatchNorm between a bias-free convolution and its non-linearity; ResNet, GoogLeNet, VGG-BN,
MobileNetV2, ShuffleNetV2, EfficientNet and CoAtNet's convolutional stages all stack that unit. Pre-activation
layers (DenseNet's BN -> ReLU -> conv) and convolutions without BatchNorm (LeNet, AlexNet) are built where they
are used.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

# The default activation of ``conv_bn``, computed in place as every family built it.
RELU = partial(nn.ReLU, inplace=True)


def conv_bn(
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act: Callable[[], nn.Module] | None = RELU,
    padding: int | None = None,
) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> activation.

    Args:
        cin: input channels.
        cout: output channels.
        kernel: side of the square kernel.
        stride: stride of the convolution.
        groups: convolution groups; ``cin`` for a depthwise convolution.
        act: builds the activation module (``nn.GELU``, ``partial(nn.SiLU, inplace=True)``); None leaves the unit
            linear, as for a projection shortcut or the last convolution of a residual branch.
        padding: zero padding on each side; None means ``kernel // 2``, which keeps the map size at stride 1.

    Returns:
        ``Sequential(conv, bn[, act])``, so its state_dict keys are ``0.weight``, ``1.weight``, ``1.running_mean``...
        With the default padding and an odd kernel: (B, cin, H, W) -> (B, cout, ceil(H / stride), ceil(W / stride)).
    """
    padding = kernel // 2 if padding is None else padding
    layers = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)
