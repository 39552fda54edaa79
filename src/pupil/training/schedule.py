"""Learning-rate schedules as pure functions of the step (nanoGPT's ``get_lr``)."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``.

    All schedules warm up linearly from ~0 over ``warmup`` steps. Then ``cosine`` follows a half
    cosine down to ``min_ratio``; ``onecycle`` decays linearly to ``min_ratio`` (the triangular
    one-cycle of Smith & Topin 2019, as airbench uses it); ``constant`` stays at 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "onecycle":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule {kind!r}")
