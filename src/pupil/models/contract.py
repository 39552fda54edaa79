"""The model contract every registered classifier keeps, and the pixel-space wrapper.

Contract (DESIGN.md): ``forward_features(x)``, ``forward_head(x, pre_logits=False)``, ``forward(x)``,
``num_features``, ``num_classes``, ``reset_classifier(n)`` and ``gradcam_layer`` (the dotted name of
the module whose activations Grad-CAM uses). Token models also set ``feature_grid`` (h, w) and
``num_prefix_tokens`` so a token map can be reshaped to an image. The audit, search, distillation and
pretraining rely on nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ClassifierBase(nn.Module):
    """Shared pieces of the contract: ``forward`` and ``reset_classifier`` over a ``head`` Linear."""

    num_classes: int
    num_features: int
    gradcam_layer: str
    head: nn.Module
    drop_rate: float = 0.0

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (B, num_features) -> logits (B, num_classes), or the features themselves."""
        x = self.pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) if x.ndim == 4 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


def init_trunc_normal(m: nn.Module) -> None:
    """Transformer initialisation (ViT, DeiT, Swin, CoAtNet): linear weights ~ N(0, 0.02^2) cut at +-2, zero biases.

    Use as ``self.apply(init_trunc_normal)``.
    """
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def gradcam_module(model: nn.Module) -> nn.Module:
    """The module named by the model's ``gradcam_layer``."""
    return model.get_submodule(model.gradcam_layer)


def check_contract(model: nn.Module, in_chans: int, img_size: int, batch: int = 2) -> None:
    """Raise AssertionError where ``model`` breaks the contract (used by the registry-wide test)."""
    for attr in ("forward_features", "forward_head", "reset_classifier", "num_features", "num_classes"):
        assert hasattr(model, attr), f"missing {attr}"
    assert isinstance(getattr(model, "gradcam_layer", None), str), "gradcam_layer must name a module"
    layer = gradcam_module(model)
    seen = []
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    model.eval()
    x = torch.rand(batch, in_chans, img_size, img_size)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        full = model(x)
    hook.remove()
    assert seen, f"gradcam_layer {model.gradcam_layer!r} was not used in the forward pass"
    assert pre.shape == (batch, model.num_features), f"pre_logits shape {tuple(pre.shape)}"
    assert logits.shape == (batch, model.num_classes), f"logits shape {tuple(logits.shape)}"
    assert torch.allclose(full, logits, atol=1e-5), "forward != forward_head(forward_features)"
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (batch, 3), "reset_classifier did not change the head"


class PixelModel(nn.Module):
    """Wraps a classifier so that it takes images in [0, 1]; normalisation lives inside.

    With ``tta=True`` the logits are averaged over the image and its horizontal mirror (the same
    test-time augmentation the recipe was evaluated with). Attacks, corruptions and explanations all
    work in pixel space through this wrapper.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], tta: bool = False):
        super().__init__()
        self.net = net
        self.tta = tta
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if not self.tta:
            return self.net(x)
        # One batched pass over (B originals + B mirrors); logits averaged per image.
        both = self.net(torch.cat([x, x.flip(3)]))
        a, b = both.chunk(2)
        return (a + b) / 2
