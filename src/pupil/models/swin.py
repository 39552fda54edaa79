"""Swin Transformer for small images: Liu, Lin, Cao, Hu, Wei, Zhang, Lin & Guo, "Swin Transformer: Hierarchical
Vision Transformer using Shifted Windows", ICCV 2021.

Self-attention restricted to non-overlapping windows of MxM tokens, with a learned relative position bias added to
the attention logits; alternate blocks shift the windows by M/2 tokens (a cyclic shift of the map plus an attention
mask, so one batched pass still computes every window), which connects neighbouring windows. Patch merging
(concatenate each 2x2 neighbourhood, LayerNorm, linear 4C -> 2C) halves the grid between stages, giving a
ConvNet-like pyramid of features. Pre-norm blocks, a final LayerNorm, global average pooling and a linear head.

Differences for small images: patch size 2 (the paper's is 4) and three stages (the paper's four); window size 7 as
in the paper. A 28x28 image gives 14x14 tokens (2x2 windows, shifted in alternate blocks), then 7x7 (one window),
then 4x4. As in the official code, a stage whose grid is no larger than the window attends over the whole grid in
one window and does not shift (a shift would only roll that window onto itself). Grids that are not a multiple of
the window (a 32x32 image gives 16x16, then 8x8) are zero-padded on the bottom/right inside each block to the next
multiple (21x21, 14x14) and the padded tokens are masked out of the attention, so no real token attends to padding.
Padding rather than a smaller window keeps the configured window, and with it the relative-bias table, the same for
any image size; the official detection code pads the same way. Patch merging pads an odd grid to even (7 -> 8 -> 4).
Sizes are much smaller than Swin-T; ``swin_test`` is the size the tests use, not the paper's Swin-T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from pupil.models.contract import ClassifierBase, init_trunc_normal
from pupil.models.registry import MODELS


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) row of the bias table for each pair of the N = M*M tokens of a window: one row per offset (dy, dx)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, N, N), offsets moved from [-(M-1), M-1] to >= 0
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, M*M, C), the windows of each image in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """(B * nW, M*M, C) -> (B, H, W, C), the inverse of ``window_partition``."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def attention_mask(H: int, W: int, window: int, shift: int) -> torch.Tensor | None:
    """(nW, N, N) additive mask for HxW real tokens padded to whole windows and shifted; None where none is needed.

    Two tokens may attend to each other only where they carry the same label. Padding is one label. Under the cyclic
    shift, the first ``shift`` rows (and columns) wrap around to the far edge and share a window with tokens that are
    not their neighbours, so they get labels of their own (paper Sec. 3.2, "efficient batch computation"). Tokens of
    one window that did not wrap are always contiguous in the image, so without padding this gives the official mask.
    """
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    if not shift and (Hp, Wp) == (H, W):
        return None
    wraps_row = (torch.arange(Hp) < shift).long()[:, None]  # (Hp, 1)
    wraps_col = (torch.arange(Wp) < shift).long()[None, :]  # (1, Wp)
    labels = 2 * wraps_row + wraps_col  # (Hp, Wp), labels 0..3
    labels[H:] = 4
    labels[:, W:] = 4
    labels = labels.roll((-shift, -shift), (0, 1))  # the same cyclic shift as the tokens get
    win = window_partition(labels[None, :, :, None], window).squeeze(-1)  # (nW, N)
    # -100 rather than -inf, as in the official code: exp(-100) is negligible and no row can become all -inf.
    return (win[:, :, None] != win[:, None, :]).float() * -100.0  # (nW, N, N)


class WindowAttention(nn.Module):
    """Multi-head self-attention within each window: softmax(q k^T / sqrt(d) + B) v (paper Eq. 4)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # One learned bias per head and relative offset (dy, dx) in [-(M-1), M-1]^2: (2M-1)^2 rows.
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        Bw, N, C = x.shape  # Bw = B * nW windows of N = M*M tokens
        qkv = self.qkv(x).view(Bw, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (Bw, heads, N, C / heads)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (Bw, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index]  # (N, N, heads)
        attn = attn + bias.permute(2, 0, 1)
        if mask is not None:
            # Windows are ordered image by image, so Bw splits into (B, nW); the mask is the same for every image.
            nW = mask.shape[0]
            attn = (attn.view(-1, nW, self.heads, N, N) + mask[None, :, None]).view(Bw, self.heads, N, N)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, C)  # (Bw, N, C)
        return self.proj(x)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP on a fixed HxW token grid: (B, H*W, C) -> (B, H*W, C)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        resolution: tuple[int, int],
        window: int = 7,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        H, W = resolution
        if min(H, W) <= window:
            # As in the official code: one window covers the grid, and shifting it would only roll it onto itself.
            window, shift = min(H, W), 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.pad = (-H % window, -W % window)  # rows and columns of zero tokens that make whole windows
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.register_buffer("attn_mask", attention_mask(H, W, window, shift), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape  # L = H * W
        y = self.norm1(x).view(B, H, W, C)
        y = F.pad(y, (0, 0, 0, self.pad[1], 0, self.pad[0]))  # (B, Hp, Wp, C), zeros on the bottom/right
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))  # windows move down-right by `shift` tokens
        Hp, Wp = y.shape[1], y.shape[2]
        y = self.attn(window_partition(y, self.window), self.attn_mask)  # (B * nW, M*M, C)
        y = window_reverse(y, self.window, Hp, Wp)  # (B, Hp, Wp, C)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + self.drop_path(y[:, :H, :W].reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood, LayerNorm, linear 4C -> 2C: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""

    def __init__(self, dim: int, resolution: tuple[int, int]):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, _, C = x.shape
        x = x.view(B, H, W, C)
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # an odd grid (7x7) gets a zero row and column: 7 -> 8 -> 4
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)  # (B, h, w, 4C)
        return self.reduction(self.norm(x.flatten(1, 2)))  # (B, h*w, 2C)


class Swin(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        patch_size: int = 2,
        embed_dim: int = 64,
        depths: tuple[int, ...] = (2, 2, 6),
        heads: tuple[int, ...] = (2, 4, 8),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        side = img_size // patch_size
        # Patch embedding: (B, in_chans, H, W) -> (B, C, H/p, W/p), then LayerNorm over C on the tokens.
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        # Stochastic depth grows linearly with block index (Huang et al. 2016), as in the paper's training recipe.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, dim, res, i = [], embed_dim, (side, side), 0
        for s, (depth, h) in enumerate(zip(depths, heads, strict=True)):
            layers: list[nn.Module] = []
            if s:  # every stage after the first opens with patch merging: 14x14 -> 7x7 -> 4x4 for 28x28 inputs
                layers.append(PatchMerging(dim, res))
                dim, res = 2 * dim, (-(-res[0] // 2), -(-res[1] // 2))
            for d in range(depth):
                shift = window_size // 2 if d % 2 else 0  # regular and shifted windows alternate
                layers.append(SwinBlock(dim, h, res, window_size, shift, mlp_ratio, rates[i]))
                i += 1
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.feature_grid, self.num_prefix_tokens = res, 0
        self.num_features, self.num_classes, self.drop_rate = dim, num_classes, drop_rate
        self.head = nn.Linear(dim, num_classes)
        # Grad-CAM on the final normalised tokens (B, h*w, C), reshaped with feature_grid as for ViT.
        self.gradcam_layer = "norm"
        self.apply(init_trunc_normal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Every block's grid, padding and mask are fixed by img_size, as the official code fixes input_resolution.
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"Swin built for {self.img_size}x{self.img_size} images got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, H/p * W/p, C)
        x = self.norm(self.stages(self.patch_norm(x)))  # (B, h*w, num_features)
        h, w = self.feature_grid
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, num_features, h, w) for average pooling


# Head width 32 as in the paper for swin_micro and swin_nano; swin_test is the test size.
SIZES = {
    "swin_micro": dict(embed_dim=64, depths=(2, 2, 6), heads=(2, 4, 8)),
    "swin_nano": dict(embed_dim=32, depths=(2, 2, 4), heads=(1, 2, 4)),
    "swin_test": dict(embed_dim=12, depths=(2, 2, 1), heads=(1, 2, 4), mlp_ratio=2.0),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="Swin", paper="Liu et al., ICCV", year=2021, test=_name.endswith("_test"), defaults=_cfg
    )(Swin)
