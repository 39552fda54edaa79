"""The one inference path over a dataset: logits in dataset order, and the evaluation figures from them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pupil.data import ImageDataset
from pupil.errors import PupilError
from pupil.runtime import autocast, to_input


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    ds: ImageDataset,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Logits (N, K) in float32 on the CPU, in dataset order."""
    device = torch.device(device)
    model.eval()
    out = []
    for chunk in ds.images.split(batch_size):
        with autocast(device, dtype):
            out.append(model(to_input(chunk, device, channels_last)).float().cpu())
    logits = torch.cat(out)
    if not torch.isfinite(logits).all():
        raise PupilError(f"the model produced {(~torch.isfinite(logits)).sum().item()} non-finite logits")
    return logits


def evaluate(model: nn.Module, ds: ImageDataset, **kwargs: Any) -> dict[str, float]:
    """Top-1, top-5 (where there are more than 5 classes) and cross-entropy over ``ds``."""
    logits = predict_logits(model, ds, **kwargs)
    y = ds.targets
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {
        "top1": (top[:, 0] == y).float().mean().item(),
        f"top{k}": (top == y[:, None]).any(1).float().mean().item(),
        "loss": nn.functional.cross_entropy(logits, y).item(),
        "n": len(y),
    }
