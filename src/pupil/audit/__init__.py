"""The audit: checks by name, one module per concern, and the runner that writes results.json."""

from pupil.audit import (  # noqa: F401  (registers the checks)
    accuracy,
    adversarial,
    calibration,
    certify,
    corruption,
    efficiency,
    energy,
    explain,
    fairness,
    ood,
    uncertainty,
)
from pupil.audit.common import CHECKS, AuditContext, Check, run_audit

DEFAULT_CHECKS = [
    "accuracy",
    "calibration",
    "efficiency",
    "energy",
    "corruption",
    "adversarial",
    "certify",
    "ood",
    "uncertainty",
    "explain",
    "fairness",
]

__all__ = ["CHECKS", "DEFAULT_CHECKS", "AuditContext", "Check", "run_audit"]
