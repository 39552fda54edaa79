"""pupil: train image classifiers from every stage of deep learning's history, then audit them."""

from __future__ import annotations

__version__ = "0.1.0"

from pupil import data, models
from pupil.run import Run, load_run


def train(recipe=None, *, resume=None, overwrite: bool = False, progress: bool = True, **overrides) -> Run:
    """Train from a YAML recipe with flat overrides (``epochs=4``, ``lr=0.05``); returns the Run."""
    from pupil.config import build
    from pupil.training.loop import fit

    if resume is not None:
        return fit(resume=resume, progress=progress)
    return fit(build(recipe, overrides), overwrite=overwrite, progress=progress)


__all__ = ["Run", "__version__", "data", "load_run", "models", "train"]
