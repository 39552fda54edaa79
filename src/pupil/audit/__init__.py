"""The audit: checks by name, one module per concern, and the runner that writes results.json."""

from pupil.audit import accuracy, calibration, efficiency, energy  # noqa: F401  (registers the checks)
from pupil.audit.common import CHECKS, AuditContext, Check, run_audit

DEFAULT_CHECKS = ["accuracy", "calibration", "efficiency", "energy"]

__all__ = ["CHECKS", "DEFAULT_CHECKS", "AuditContext", "Check", "run_audit"]
