"""Training: the loop, tasks, optimizers, schedules and checkpoints."""

from pupil.training.loop import evaluate, fit, predict_logits

__all__ = ["evaluate", "fit", "predict_logits"]
