"""Adversarial attacks and randomized-smoothing certification in pixel space.

This package sits below training (adversarial and noise training use it) and imports only torch, scipy
and ``pupil.errors``.
"""

from pupil.robust.attacks import NORMS, fgsm, pgd
from pupil.robust.smoothing import (
    ABSTAIN,
    certify,
    certify_batch,
    clopper_pearson_lower,
    max_radius,
    predict,
    predict_batch,
    sample_counts,
)

__all__ = [
    "ABSTAIN",
    "NORMS",
    "certify",
    "certify_batch",
    "clopper_pearson_lower",
    "fgsm",
    "max_radius",
    "pgd",
    "predict",
    "predict_batch",
    "sample_counts",
]
