"""Embedding networks for metric learning and visual search: any registered trunk, a linear neck to ``embed_dim``
dimensions, L2 normalisation, and a cosine classifier over one learned proxy per class.

``create(name, ..., embed_dim=128)`` wraps the trunk ``name`` (any registered model or ``timm:<name>``) in an
``EmbeddingNet``; ``embed_dim`` is an ordinary model argument, so run.json records it with the others and
``pupil.run.load_run`` rebuilds the same network by name, with no special case.

The contract (``pupil.models.contract``) holds with the embedding in the role of the pooled features:
``forward_head(feats, pre_logits=True)`` is the unit-length embedding (B, D), ``num_features == D``, and
``forward`` gives class logits (B, num_classes), so that every classification check of the audit (accuracy,
calibration, conformal sets...) runs on a metric run unchanged, while search indexes the embedding.

Why a cosine classifier over proxies, and not a linear head. The logits are ``s * cos(e, p_c)``: the class
whose proxy ``p_c`` is nearest to the embedding ``e`` on the sphere wins, in the same geometry the search index
uses, so the accuracy the audit reports is the accuracy of the embedding itself (NormFace, Wang et al. 2017).
The proxies are the head's ``weight`` (C, D): the proxy losses (ArcFace, Deng et al. 2019; Proxy Anchor, Kim et
al. 2020) train them as their class centres, which puts them in the optimizer (built from the network's
parameters) and in model.safetensors with the rest, with nothing of pytorch-metric-learning needed to load a
run. A pair loss (Multi-Similarity) has no proxies; the metric task then fits the head alone, by cross-entropy
on detached embeddings, so the classifier reads the embedding without shaping it. The scale ``s`` is learned
(stored as its logarithm) by cross-entropy on detached cosines: a fixed ArcFace scale of 64 would make the
logits absurdly over-confident, and a learned one is a temperature fitted on the training data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pupil.errors import PupilError

INITIAL_SCALE = 16.0  # the cosine logits' starting scale; NormFace and CLIP start near this (1/0.07 = 14.3)


class CosineHead(nn.Module):
    """Logits ``s * cos(e, p_c)`` for embeddings (B, D): one proxy per class (``weight``, (C, D)) and a learned
    scale ``s = exp(log_scale)``."""

    def __init__(self, embed_dim: int, num_classes: int, scale: float = INITIAL_SCALE):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        # Unit-length random proxies: nearly orthogonal for C << D, the start every proxy loss assumes.
        nn.init.normal_(self.weight, std=1 / math.sqrt(embed_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    @property
    def proxies(self) -> torch.Tensor:
        """The class proxies, L2-normalised (C, D)."""
        return F.normalize(self.weight, dim=-1)

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, C) of each embedding with each class proxy."""
        return F.normalize(embedding, dim=-1) @ self.proxies.t()

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * self.cosine(embedding)


class EmbeddingNet(nn.Module):
    """A trunk's pooled features -> ``neck`` (Linear to D) -> L2 normalisation -> ``head`` (``CosineHead``).

    ``forward_features`` is the trunk's, so Grad-CAM and token maps work as on the trunk (``gradcam_layer``,
    ``feature_grid`` and ``num_prefix_tokens`` point into it); the trunk's own classifier is removed.
    """

    def __init__(self, trunk: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        check_embed_dim(embed_dim)
        # timm models whose head has a hidden layer pool to head_hidden_size features, not num_features.
        pooled = getattr(trunk, "head_hidden_size", None) or trunk.num_features
        trunk.reset_classifier(0)
        self.trunk = trunk
        self.neck = nn.Linear(pooled, embed_dim)
        self.head = CosineHead(embed_dim, num_classes)
        self.num_features = self.embedding_dim = embed_dim
        self.num_classes = num_classes
        self.gradcam_layer = f"trunk.{trunk.gradcam_layer}"
        for attr in ("feature_grid", "num_prefix_tokens"):
            if hasattr(trunk, attr):
                setattr(self, attr, getattr(trunk, attr))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """The unit-length embedding (B, D) of the trunk's pooled features (B, F)."""
        return F.normalize(self.neck(pooled), dim=-1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' output -> the embedding (B, D) with ``pre_logits``, else the cosine logits (B, C)."""
        embedding = self.embed(self.trunk.forward_head(x, pre_logits=True))
        return embedding if pre_logits else self.head(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """New proxies for ``num_classes`` classes; the embedding stays (0 leaves the embedding as the output)."""
        self.num_classes = num_classes
        self.head = CosineHead(self.embedding_dim, num_classes) if num_classes else nn.Identity()


class PixelEmbedder(nn.Module):
    """A ``PixelModel`` over an embedding network, giving the embedding (B, D) of [0, 1] pixels instead of logits
    (so that ``pupil.predict.predict_logits`` batches it like any model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model.net, "embedding_dim"):
            raise PupilError("the model has no embedding head (train it with --task metric)")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.model.net
        return net.forward_head(net.forward_features(self.model.normalize(x)), pre_logits=True)


def check_embed_dim(embed_dim: object) -> None:
    """Raise PupilError unless ``embed_dim`` is a positive integer."""
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise PupilError(f"embed_dim must be a positive integer, not {embed_dim!r}")
