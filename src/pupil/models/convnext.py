"""ConvNeXt for small images: Liu, Mao, Wu, Feichtenhofer, Darrell & Xie, "A ConvNet for the 2020s", CVPR 2022.

A ResNet modernised step by step towards the design of a vision Transformer, keeping only convolutions: a patchify
stem (a kxk convolution with stride k, then LayerNorm); blocks of depthwise 7x7 convolution -> LayerNorm -> 1x1
expand x4 -> GELU -> 1x1 project (an inverted bottleneck with one norm and one activation), each branch scaled by a
learned per-channel layer scale (initialised to 1e-6) and dropped by drop-path; separate downsampling layers
(LayerNorm, then a 2x2 stride-2 convolution) between stages; global average pooling, LayerNorm and a linear head.

Differences for small images: the stem's patch size is 2 (the paper's is 4) and there are three stages instead of
four, so a 28x28 image is 14x14 in the first stage, 7x7 in the second and 4x4 in the last (32x32: 16, 8, 4); four
stages would leave one pixel. A 2x2 stride-2 convolution on an odd grid would drop its last row and column, so the
downsampling layer zero-pads an odd grid on the bottom/right first (7 -> 8 -> 4). The named sizes are narrower and
shallower than the paper's (ConvNeXt-T: 96..768 channels, 3/3/9/3 blocks); ``convnext_test`` is the small size the
tests use, not the paper's ConvNeXt-T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import nn

from pupil.models.contract import ClassifierBase
from pupil.models.registry import MODELS


class Block(nn.Module):
    """Depthwise 7x7 -> LayerNorm -> 1x1 (x4) -> GELU -> 1x1, times a layer scale, plus the identity."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: int = 4, ls_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # The 1x1 convolutions are Linear layers on channels-last tensors, as in the official code.
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        # Layer scale (Touvron et al. 2021): each block starts close to the identity.
        self.gamma = nn.Parameter(torch.full((dim,), ls_init))
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))) * self.gamma  # (B, H, W, C)
        return x + self.drop_path(y.permute(0, 3, 1, 2))  # (B, C, H, W)


class Downsample(nn.Module):
    """LayerNorm, then a 2x2 stride-2 convolution: (B, C, H, W) -> (B, C', ceil(H/2), ceil(W/2))."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = LayerNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        # An odd grid (7x7 from a 28x28 image) is padded to even so its last row and column are not dropped.
        x = F.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2))  # (B, C, H + H%2, W + W%2)
        return self.conv(x)


class ConvNeXt(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        patch_size: int = 2,
        depths: tuple[int, ...] = (2, 2, 6),
        dims: tuple[int, ...] = (48, 96, 192),
        mlp_ratio: int = 4,
        ls_init: float = 1e-6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        # Patchify stem: non-overlapping patches, (B, in_chans, H, W) -> (B, dims[0], H/p, W/p).
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], patch_size, patch_size), LayerNorm2d(dims[0]))
        # Stochastic depth grows linearly with block index (Huang et al. 2016), as in the paper's training recipe.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, i = [], 0
        for s, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            # Every stage after the first opens with its downsampling layer: 14x14 -> 7x7 -> 4x4 for 28x28 inputs.
            down = [Downsample(dims[s - 1], dim)] if s else []
            blocks = [Block(dim, rates[i + d], mlp_ratio, ls_init) for d in range(depth)]
            stages.append(nn.Sequential(*down, *blocks))
            i += depth
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)  # applied to the pooled features, see ``pool``
        self.num_features, self.num_classes, self.drop_rate = dims[-1], num_classes, drop_rate
        self.head = nn.Linear(dims[-1], num_classes)
        self.gradcam_layer = f"stages.{len(stages) - 1}"  # (B, C, 4, 4) for 28x28 and 32x32 inputs
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # Official code: truncated normal (std 0.02) for every convolution and linear layer, zero biases.
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, C, ceil(H/8), ceil(W/8)) with three stages and patch size 2

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.mean((2, 3)))  # (B, C): global average pooling, then LayerNorm, as in the official head


# "_c": three stages for 28..32-pixel images (widths of timm's femto/nano ConvNeXt sizes without the fourth stage).
SIZES = {
    "convnext_femto_c": dict(depths=(2, 2, 6), dims=(48, 96, 192)),
    "convnext_nano_c": dict(depths=(2, 2, 8), dims=(80, 160, 320)),
    "convnext_test": dict(depths=(1, 1, 1), dims=(8, 16, 32)),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="ConvNeXt", paper="Liu et al., CVPR", year=2022, test=_name.endswith("_test"), defaults=_cfg
    )(ConvNeXt)
