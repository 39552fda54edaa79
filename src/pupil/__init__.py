"""pupil: train image classifiers from every stage of deep learning's history, then audit them."""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pupil import data, models
    from pupil.run import Run, load_run

# Loaded on first use (PEP 562), so that `import pupil` and `pupil --help` do not import torch and timm.
_LAZY = {
    "data": ("pupil.data", None),
    "models": ("pupil.models", None),
    "Run": ("pupil.run", "Run"),
    "audit": ("pupil.audit", None),  # a callable package: pupil.audit(model, data, ...) is pupil.api.audit
    "load_run": ("pupil.run", "load_run"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pupil' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def train(recipe=None, *, resume=None, overwrite: bool = False, progress: bool = True, **overrides) -> Run:
    """Train from a YAML recipe with flat overrides (``epochs=4``, ``lr=0.05``); returns the Run."""
    from pupil.config import build
    from pupil.training.loop import fit

    if resume is not None:
        return fit(resume=resume, progress=progress)
    return fit(build(recipe, overrides), overwrite=overwrite, progress=progress)


__all__ = ["Run", "__version__", "audit", "data", "load_run", "models", "train"]
