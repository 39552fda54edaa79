"""Learning-rate schedules as pure functions of the step (nanoGPT's ``get_lr``), and their fit to a time budget."""

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


BUDGET_PROBE_STEPS = 20
BUDGET_REFIT_STEPS = 100  # after the probe, the budget is checked again every this many steps (refit_budget)
# A forward pass without gradients costs about a third of a training step (fp32, measured on CPU); fit_budget
# reserves this fraction of a step for each batch of the precise-BN pass.
PRECISE_BN_STEP_COST = 0.35


def fit_budget(
    total_steps: int, warmup_steps: int, probe_s: float, max_minutes: float, bn_batches: int = 0
) -> tuple[int, int]:
    """The (total, warm-up) steps that fit ``max_minutes`` at the speed of the first ``BUDGET_PROBE_STEPS`` steps
    (``probe_s`` seconds), with time kept for ``bn_batches`` of precise BN, so that the learning-rate schedule
    still ends at its minimum when the time is up (used to compare models under one wall-clock budget). The
    first steps include warm-up costs, so the estimate errs on the short side."""
    per_step = probe_s / BUDGET_PROBE_STEPS
    reserve = PRECISE_BN_STEP_COST * bn_batches * per_step  # the precise-BN pass is inside the budget
    total = max(BUDGET_PROBE_STEPS + 1, min(total_steps, int((max_minutes * 60 - reserve) / per_step)))
    return total, min(warmup_steps, total // 5)


def refit_budget(
    step: int, total_steps: int, warmup_steps: int, elapsed_s: float, max_minutes: float, bn_batches: int = 0
) -> tuple[int, int]:
    """``fit_budget`` again at ``step``, from the average speed so far (``elapsed_s`` seconds of training): the
    steps that still fit are fewer when the machine became slower than the first steps promised (another job
    took the cores), so the run ends near ``max_minutes`` instead of overrunning it. The total only shrinks (a
    faster machine does not lengthen a schedule already under way), never below ``step + 1``; warm-up is kept
    once it has begun."""
    per_step = elapsed_s / max(step, 1)
    reserve = PRECISE_BN_STEP_COST * bn_batches * per_step
    left = int((max_minutes * 60 - reserve - elapsed_s) / per_step)
    total = max(step + 1, min(total_steps, step + max(left, 0)))
    return total, warmup_steps if step >= warmup_steps else min(warmup_steps, total // 5)
