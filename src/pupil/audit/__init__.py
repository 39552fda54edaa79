"""The audit: checks by name, one module per concern, and the runner that writes results.json.

A check registers itself when its module is imported; the modules are imported here in the order the report card
lists them, and that registration order is the default check list. A new check is one new module and one line in
CHECK_MODULES.
"""

import importlib
import sys
import types

from pupil.audit.common import CHECKS, AuditContext, Check, run_audit

CHECK_MODULES = (
    "accuracy",
    "calibration",
    "efficiency",
    "energy",
    "corruption",
    "adversarial",
    "certify",
    "ood",
    "uncertainty",
    "conformal",
    "explain",
    "fairness",
    "retrieval",
)
for _module in CHECK_MODULES:
    importlib.import_module(f"pupil.audit.{_module}")

DEFAULT_CHECKS = CHECKS.names()


class _AuditModule(types.ModuleType):
    """``pupil.audit(model, data, ...)`` (``pupil.api.audit``) stays callable although importing this package
    binds the name ``audit`` in ``pupil`` to the package: the package itself is callable."""

    def __call__(self, *args, **kwargs):
        from pupil.api import audit

        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _AuditModule

__all__ = ["CHECKS", "CHECK_MODULES", "DEFAULT_CHECKS", "AuditContext", "Check", "run_audit"]
