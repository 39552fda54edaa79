"""Training: the loop, tasks, optimizers, schedules and checkpoints."""

from pupil.predict import evaluate, predict_logits
from pupil.training.loop import fit

__all__ = ["evaluate", "fit", "predict_logits"]
