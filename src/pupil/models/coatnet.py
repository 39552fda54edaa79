"""CoAtNet for small images: Dai, Liu, Le & Tan, "CoAtNet: Marrying Convolution and Attention for All Data Sizes",
NeurIPS 2021.

Convolution first, attention last: a convolutional stem (S0), two stages of MBConv blocks (S1, S2: pre-norm inverted
bottlenecks with a depthwise 3x3 convolution and squeeze-excitation) and two Transformer stages (S3, S4) whose
self-attention adds a learned bias w[i - j], one scalar per head and relative offset, to the logits before the
softmax ("pre-softmax relative attention", softmax(q k^T / sqrt(d) + w) v), which gives attention the translation
equivariance of a convolution. The first block of a stage downsamples: a pooled and projected shortcut plus a
strided branch, x <- Proj(Pool(x)) + Attention(Pool(Norm(x))) in the Transformer stages and a stride-2 depthwise
convolution in the MBConv stages. Global average pooling and a linear head.

Differences for small images: the stem has stride 1 (the paper's 2) and S1 keeps the resolution, so the total
downsampling is 8 rather than 32: a 28x28 image stays 28x28 in S0 and S1, then 14x14 in S2, 7x7 (49 tokens) in S3
and 4x4 (16 tokens) in S4 (32x32: 32, 32, 16, 8, 4). Every stride-2 layer has a 3x3 kernel and padding 1, so an odd
grid is rounded up (7 -> 4). The downsampling pools are 3x3 max pools with stride 2. The relative bias table covers
the whole grid of a stage ((2h-1)(2w-1) offsets per head, as in the paper), so a model is built for one image size.
A final LayerNorm before pooling, which pre-norm Transformer stages need (as in ViT). Sizes are far smaller than
CoAtNet-0; ``coatnet_test`` is the size the tests use, not a size from the paper.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, LayerNorm2d, Mlp, SEModule, trunc_normal_
from torch import nn

from pupil.models.contract import ClassifierBase, init_trunc_normal
from pupil.models.layers import conv_bn
from pupil.models.registry import MODELS


def relative_position_index(h: int, w: int) -> torch.Tensor:
    """(N, N) row of the bias table for each pair of the N = h*w positions: one row per offset (dy, dx)."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): dy in [-(h-1), h-1], dx in [-(w-1), w-1]
    return (rel[0] + h - 1) * (2 * w - 1) + rel[1] + w - 1  # values in [0, (2h-1)(2w-1))


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or Proj(Pool(x)): a 3x3 stride-2 max pool where the block downsamples, a 1x1 convolution where the
    width changes. (B, cin, H, W) -> (B, cout, ceil(H/stride), ceil(W/stride))."""
    layers: list[nn.Module] = []
    if stride > 1:
        layers.append(nn.MaxPool2d(3, stride, 1))
    if cin != cout:
        layers.append(nn.Conv2d(cin, cout, 1))
    return nn.Sequential(*layers) if layers else nn.Identity()


class MBConv(nn.Module):
    """Pre-norm MBConv: BN -> 1x1 expand (x4 the output width) -> BN, GELU -> depthwise 3x3 (stride s) -> BN, GELU ->
    squeeze-excitation -> 1x1 project, plus the shortcut. (B, cin, H, W) -> (B, cout, ceil(H/s), ceil(W/s))."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4, drop_path: float = 0.0):
        super().__init__()
        mid = cout * expand
        self.shortcut = shortcut(cin, cout, stride)
        self.branch = nn.Sequential(
            nn.BatchNorm2d(cin),
            *conv_bn(cin, mid, 1, act=nn.GELU),  # unpacked: one flat Sequential, keys branch.0 .. branch.8
            *conv_bn(mid, mid, 3, stride, groups=mid, act=nn.GELU),
            # Squeeze to a quarter of the output width (timm's CoAtNet; EfficientNet uses a quarter of the input).
            SEModule(mid, rd_channels=max(1, cout // 4), act_layer=nn.SiLU),
            nn.Conv2d(mid, cout, 1),
        )
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.drop_path(self.branch(x))


class RelativeAttention(nn.Module):
    """Multi-head self-attention over all h*w positions with a learned relative bias added before the softmax.

    (B, cin, h, w) -> (B, cout, h, w); the grid is fixed at construction because the bias table is sized by it.
    """

    def __init__(self, cin: int, cout: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.heads, self.scale = heads, (cout // heads) ** -0.5
        self.qkv = nn.Linear(cin, 3 * cout)
        self.proj = nn.Linear(cout, cout)
        h, w = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), heads))
        self.register_buffer("relative_position_index", relative_position_index(h, w), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, cin), N = H*W
        qkv = self.qkv(x).view(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, cout / heads)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (heads, N, N)
        x = ((attn + bias).softmax(-1) @ v).transpose(1, 2).reshape(B, H * W, -1)  # (B, N, cout)
        return self.proj(x).transpose(1, 2).reshape(B, -1, H, W)  # (B, cout, H, W)


class TransformerBlock(nn.Module):
    """Pre-norm relative attention and MLP on (B, C, H, W) maps; with stride 2 it downsamples both paths."""

    def __init__(
        self,
        cin: int,
        cout: int,
        head_dim: int,
        grid: tuple[int, int],
        stride: int = 1,
        mlp_ratio: int = 4,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.shortcut = shortcut(cin, cout, stride)
        self.norm1 = LayerNorm2d(cin)
        self.pool = nn.MaxPool2d(3, stride, 1) if stride > 1 else nn.Identity()
        self.attn = RelativeAttention(cin, cout, cout // head_dim, grid)  # grid: the output grid, after the pool
        self.norm2 = LayerNorm2d(cout)
        self.mlp = Mlp(cout, cout * mlp_ratio, use_conv=True)  # 1x1 convolutions act on (B, C, H, W) directly
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shortcut(x) + self.drop_path(self.attn(self.pool(self.norm1(x))))  # (B, cout, h, w)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CoAtNet(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        stem_width: int = 32,
        depths: tuple[int, ...] = (2, 3, 5, 2),
        dims: tuple[int, ...] = (32, 64, 128, 256),
        layout: str = "CCTT",
        strides: tuple[int, ...] = (1, 2, 2, 2),
        head_dim: int = 32,
        mlp_ratio: int = 4,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        for dim, kind in zip(dims, layout, strict=True):
            if kind == "T" and dim % head_dim:
                raise ValueError(f"Transformer width {dim} is not a multiple of head_dim {head_dim}")
        self.img_size = img_size
        # S0: two 3x3 convolutions at full resolution (the paper's first one has stride 2).
        self.stem = nn.Sequential(
            *conv_bn(in_chans, stem_width, 3, act=nn.GELU), nn.Conv2d(stem_width, stem_width, 3, 1, 1)
        )
        # Stochastic depth grows linearly with block index (Huang et al. 2016).
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, cin, side, i = [], stem_width, img_size, 0
        for depth, dim, kind, stride in zip(depths, dims, layout, strides, strict=True):
            blocks: list[nn.Module] = []
            for d in range(depth):
                s = stride if d == 0 else 1  # only a stage's first block downsamples
                side = -(-side // s)  # ceil: 3x3 stride-2 layers with padding 1 round odd grids up (7 -> 4)
                if kind == "C":
                    blocks.append(MBConv(cin, dim, s, drop_path=rates[i]))
                else:
                    blocks.append(TransformerBlock(cin, dim, head_dim, (side, side), s, mlp_ratio, rates[i]))
                cin, i = dim, i + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)  # 28x28 input: (B, dims[k], 28 | 14 | 7 | 4, ...) after stage k
        self.norm = LayerNorm2d(cin)
        self.num_features, self.num_classes, self.drop_rate = cin, num_classes, drop_rate
        self.head = nn.Linear(cin, num_classes)
        self.gradcam_layer = "norm"  # the final map (B, C, 4, 4) for 28x28 and 32x32 inputs
        self.apply(init_trunc_normal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # The attention stages' bias tables are sized by the grids that img_size gives.
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"CoAtNet built for {self.img_size}x{self.img_size} images got {tuple(x.shape[-2:])}")
        return self.norm(self.stages(self.stem(x)))  # (B, C, ceil(H/8), ceil(W/8)) with strides (1, 2, 2, 2)


# CoAtNet-0 has depths (2, 3, 5, 2) after a 2-layer stem and widths 64 | 96, 192, 384, 768; these keep its depths
# with a third (micro) or half (nano) of its stage widths. Head width 32 as in the paper.
SIZES = {
    "coatnet_micro": dict(stem_width=32, depths=(2, 3, 5, 2), dims=(32, 64, 128, 256)),
    "coatnet_nano": dict(stem_width=48, depths=(2, 3, 5, 2), dims=(48, 96, 192, 384)),
    "coatnet_test": dict(stem_width=8, depths=(1, 1, 1, 1), dims=(8, 16, 32, 32), head_dim=16),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="CoAtNet", paper="Dai et al., NeurIPS", year=2021, test=_name.endswith("_test"), defaults=_cfg
    )(CoAtNet)
