"""Vision Transformer for small images: Dosovitskiy et al., "An Image is Worth 16x16 Words:
Transformers for Image Recognition at Scale", ICLR 2021.

Patch embedding (a strided convolution), a learned class token, learned position embeddings, pre-norm
transformer blocks (timm's ``Block``), and a linear head on the final class token. Differences: patch
size 4 or 7 instead of 16 so that a 28x28 image gives 49 or 16 tokens, and much narrower and shallower
sizes than the paper's so that they train on a CPU.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from pupil.models.contract import ClassifierBase, init_trunc_normal
from pupil.models.registry import MODELS


class ViT(ClassifierBase):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        distilled: bool = False,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        side = img_size // patch_size
        self.distilled = distilled
        self.feature_grid, self.num_prefix_tokens = (side, side), 2 if distilled else 1
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # DeiT's distillation token learns from the teacher's predictions through its own head.
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + side * side, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True, drop_path=r) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.num_features, self.num_classes, self.drop_rate = dim, num_classes, drop_rate
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distilled else None
        # Grad-CAM on the tokens entering the last block's attention; reshaped with feature_grid.
        self.gradcam_layer = f"blocks.{depth - 1}.norm1"
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if distilled:
            trunc_normal_(self.dist_token, std=0.02)
        self.apply(init_trunc_normal)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], 1) + self.pos_embed
        return self.norm(self.blocks(x))  # (B, prefix + tokens, dim)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]  # the class token

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.distilled:
            return super().forward_head(x, pre_logits)
        # DeiT at inference averages the class-token and distillation-token heads (Touvron et al. 2021, Sec. 5).
        if pre_logits:
            return (x[:, 0] + x[:, 1]) / 2
        cls_logits, dist_logits = self.forward_distill_heads(x)
        return (cls_logits + dist_logits) / 2

    def forward_distill_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-token logits, distillation-token logits) from forward_features' output; DeiT only."""
        cls, dist = x[:, 0], x[:, 1]
        if self.drop_rate:
            cls = nn.functional.dropout(cls, self.drop_rate, self.training)
            dist = nn.functional.dropout(dist, self.drop_rate, self.training)
        return self.head(cls), self.head_dist(dist)

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        if self.distilled:
            self.head_dist = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


SIZES = {
    "vit_ti_p4": dict(patch_size=4, dim=192, depth=12, heads=3),
    "vit_mini_p4": dict(patch_size=4, dim=128, depth=6, heads=4),
    "vit_mini_p7": dict(patch_size=7, dim=128, depth=6, heads=4),
    "vit_test": dict(patch_size=4, dim=32, depth=2, heads=2, mlp_ratio=2.0),
}

for _name, _cfg in SIZES.items():
    MODELS.register(
        _name, family="ViT", paper="Dosovitskiy et al., ICLR", year=2021, test=_name.endswith("_test"), defaults=_cfg
    )(ViT)

# DeiT (Touvron, Cord, Douze, Massa, Sablayrolles & Jegou, "Training data-efficient image transformers &
# distillation through attention", ICML 2021): the same ViT with a distillation token and a second head.
DEIT_SIZES = {
    "deit_mini_p4": dict(patch_size=4, dim=128, depth=6, heads=4, distilled=True),
    "deit_mini_p7": dict(patch_size=7, dim=128, depth=6, heads=4, distilled=True),
    "deit_test": dict(patch_size=4, dim=32, depth=2, heads=2, mlp_ratio=2.0, distilled=True),
}

for _name, _cfg in DEIT_SIZES.items():
    MODELS.register(
        _name, family="DeiT", paper="Touvron et al., ICML", year=2021, test=_name.endswith("_test"), defaults=_cfg
    )(ViT)
