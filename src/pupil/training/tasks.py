"""Training methods as objects: each maps a batch to ``{"loss", "logits"}``; the loop never branches
on the method (timm's ``task/``). Later issues add distillation, adversarial and noise tasks here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pupil.registry import Registry

TASKS = Registry("task")


@TASKS.register("classification")
class ClassificationTask:
    """Cross-entropy with label smoothing; soft targets (from mixup/cutmix) are handled too."""

    def __init__(self, label_smoothing: float = 0.0, **_):
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(x)
        if y.ndim == 2:  # soft targets: label smoothing is already mixed in by timm's Mixup
            loss = torch.sum(-y * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}
