"""Training methods as objects: each maps a batch to ``{"loss", "logits"}``; the loop never branches
on the method (timm's ``task/``). A task is built from the resolved config with ``from_config``; a method
with settings names their dataclass as ``Config`` (``pupil.config.TASK_CONFIGS``), and reads them from ``cfg.task``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pupil.config import AdversarialConfig, DistillConfig, NoiseConfig
from pupil.errors import PupilError
from pupil.registry import Registry

TASKS = Registry("task")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy for hard labels (with smoothing) or soft targets (mixup/cutmix, smoothing already mixed in)."""
    if y.ndim == 2:
        return torch.sum(-y * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


@TASKS.register("classification")
class ClassificationTask:
    """Cross-entropy with label smoothing; soft targets (from mixup/cutmix) are handled too."""

    Config = None

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, **_: Any) -> ClassificationTask:
        return cls(cfg.optim.label_smoothing)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(x)
        return {"loss": cross_entropy(logits, y, self.label_smoothing), "logits": logits}


@TASKS.register("distill")
class DistillationTask:
    """Knowledge distillation from a trained teacher run.

    ``soft``: KL divergence between temperature-softened teacher and student distributions, scaled by tau^2
    (Hinton, Vinyals & Dean 2015). ``hard``: cross-entropy against the teacher's argmax (Touvron et al. 2021).
    The loss is (1 - alpha) * label loss + alpha * distillation loss. A student with a distillation token
    (DeiT) trains its class head on the labels and its distillation head on the teacher, as in DeiT.
    """

    Config = DistillConfig

    def __init__(
        self, teacher: nn.Module, kind: str = "soft", alpha: float = 0.5, tau: float = 3.0, label_smoothing: float = 0.0
    ):
        if kind not in ("soft", "hard"):
            raise PupilError(f"unknown distillation kind {kind!r}; choose soft or hard")
        self.teacher, self.kind, self.alpha, self.tau = teacher.eval(), kind, alpha, tau
        self.label_smoothing = label_smoothing
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, classes: list[str], shape: tuple, **_: Any):
        from pupil.run import load_run

        t: DistillConfig = cfg.task
        if not t.teacher:
            raise PupilError("--task distill needs --teacher RUN_DIR (a trained run with the same classes)")
        run = load_run(t.teacher, device=device)
        if run.classes != classes:
            raise PupilError(f"teacher {t.teacher} was trained on classes {run.classes}, the student on {classes}")
        if list(run.info["data"]["input_shape"]) != list(shape):
            raise PupilError(f"teacher {t.teacher} takes {run.info['data']['input_shape']} images, not {list(shape)}")
        return cls(run.model, t.distill_kind, t.distill_alpha, t.distill_tau, cfg.optim.label_smoothing)

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.kind == "hard":
            return F.cross_entropy(student.float(), teacher.argmax(1))
        log_p = F.log_softmax(student.float() / self.tau, dim=1)
        log_q = F.log_softmax(teacher.float() / self.tau, dim=1)
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * self.tau**2

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        net = model.net
        if getattr(net, "distilled", False):  # DeiT: separate heads for labels and teacher
            cls_logits, dist_logits = net.forward_distill_heads(net.forward_features(model.normalize(x)))
            logits = (cls_logits + dist_logits) / 2
        else:
            logits = cls_logits = dist_logits = model(x)
        label_loss = cross_entropy(cls_logits, y, self.label_smoothing)
        loss = (1 - self.alpha) * label_loss + self.alpha * self.distill_loss(dist_logits, teacher_logits)
        return {"loss": loss, "logits": logits}


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices from hard labels or from mixup/cutmix soft targets (their argmax)."""
    return y.argmax(1) if y.ndim == 2 else y


@TASKS.register("adversarial")
class AdversarialTask:
    """Adversarial training: the loss on L-inf adversarial examples found for the current weights.

    ``pgd``: PGD with a random start (Madry et al. 2018). ``fgsm``: one step of size 1.25 epsilon from a
    uniform random start ("fast is better than free", Wong, Rice & Kolter 2020). The attack runs with the
    model in training mode, as both papers do, so batch-norm statistics also see adversarial batches.
    """

    Config = AdversarialConfig

    def __init__(self, epsilon: float, steps: int, alpha: float, label_smoothing: float = 0.0):
        self.epsilon, self.steps, self.alpha = epsilon, steps, alpha
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, **_: Any) -> AdversarialTask:
        t: AdversarialConfig = cfg.task
        steps = 1 if t.adv_attack == "fgsm" else t.adv_steps
        alpha = t.adv_alpha or (1.25 * t.epsilon if t.adv_attack == "fgsm" else 2.5 * t.epsilon / steps)
        return cls(t.epsilon, steps, alpha, cfg.optim.label_smoothing)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        from pupil.robust.attacks import pgd

        if self.epsilon > 0:
            x = pgd(model, x, hard_labels(y), self.epsilon, self.alpha, self.steps, norm="linf", random_start=True)
        logits = model(x)
        return {"loss": cross_entropy(logits, y, self.label_smoothing), "logits": logits}


@TASKS.register("noise")
class NoiseTask:
    """Gaussian noise augmentation, N(0, sigma^2) added to the pixels and not clipped, so that the base
    classifier is accurate under the noise that randomized smoothing certifies with (Cohen et al. 2019)."""

    Config = NoiseConfig

    def __init__(self, sigma: float, label_smoothing: float = 0.0):
        self.sigma, self.label_smoothing = sigma, label_smoothing

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, **_: Any) -> NoiseTask:
        return cls(cfg.task.sigma, cfg.optim.label_smoothing)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(x + self.sigma * torch.randn_like(x))
        return {"loss": cross_entropy(logits, y, self.label_smoothing), "logits": logits}
