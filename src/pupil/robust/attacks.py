"""Gradient attacks in pixel space: FGSM (Goodfellow, Shlens & Szegedy 2015) and PGD (Madry et al. 2018),
under L-infinity and L2, untargeted (cross-entropy ascent).

Images are in [0, 1] and the model takes pixels (normalisation lives inside ``PixelModel``), so epsilon is
measured in pixel units. The update rules follow torchattacks' FGSM, PGD and PGDL2 step for step, which the
tests check. Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so the
model's parameters never collect a ``.grad``. The model's mode is left alone: the audit calls these in
eval mode, adversarial training may call them in train mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pupil.errors import PupilError

NORMS = ("linf", "l2")
# Added to L2 gradient norms before dividing, as torchattacks' PGDL2 does (``eps_for_division``).
TINY = 1e-10


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (L-inf), or one normalised-gradient step (L2: the fast
    gradient method), clipped to [0, 1].

    Args:
        model: takes (B, C, H, W) images in [0, 1] and returns logits (B, K).
        x: clean images (B, C, H, W) in [0, 1].
        y: true labels (B,).
        eps: the perturbation budget in pixel units.
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        Adversarial images (B, C, H, W), detached.
    """
    _check(eps, norm)
    x = x.detach()
    return _clip(x + _step(_grad(model, x, y)[0], eps, norm))


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    early_stop: bool = False,
) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy inside the ``norm`` ball of radius ``eps`` around ``x``.

    Each step moves by ``alpha`` along the gradient's sign (L-inf) or its unit direction (L2), projects
    back onto the ball and clips to [0, 1]. The random start is uniform in the L-inf ball, or for L2 a
    Gaussian direction scaled to a radius drawn uniformly from [0, eps] (as torchattacks does).

    Args:
        model: takes (B, C, H, W) images in [0, 1] and returns logits (B, K).
        x: clean images (B, C, H, W) in [0, 1].
        y: true labels (B,).
        eps: the perturbation budget in pixel units.
        alpha: the step size.
        steps: the number of gradient steps.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a random point in the ball instead of ``x``.
        generator: the random start's generator (on ``x``'s device); the global one when None.
        early_stop: freeze an image at the first iterate the model misclassifies and stop computing on it.
            Any misclassified point of the ball is an adversarial example, so this is never weaker and, at
            large eps, much cheaper; used for evaluation (it changes batch composition, so not for training).

    Returns:
        Adversarial images (B, C, H, W) with ``||x_adv - x|| <= eps`` and values in [0, 1], detached.
    """
    _check(eps, norm)
    if steps < 0 or alpha < 0:
        raise PupilError(f"PGD needs steps >= 0 and alpha >= 0, got steps={steps}, alpha={alpha}")
    x = x.detach()
    adv = x.clone()
    if random_start:
        adv = _clip(adv + _random_start(x, eps, norm, generator))
    active = torch.arange(len(x), device=x.device)  # images still being attacked
    for _ in range(steps):
        xa, ya = adv[active], y[active]
        grad, logits = _grad(model, xa, ya)
        if early_stop:
            keep = logits.argmax(1) == ya
            active, xa, grad = active[keep], xa[keep], grad[keep]
            if not len(active):
                break
        adv[active] = _clip(x[active] + _project(xa + _step(grad, alpha, norm) - x[active], eps, norm))
    return adv


def _check(eps: float, norm: str) -> None:
    if norm not in NORMS:
        raise PupilError(f"unknown attack norm {norm!r}; choose {' or '.join(NORMS)}")
    if eps < 0:
        raise PupilError(f"attack epsilon must be >= 0, got {eps}")


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d(cross-entropy)/dx (B, C, H, W) and the logits (B, K) at x.

    The loss is summed, not averaged, so that a large batch does not shrink per-image gradients towards
    float32 underflow; sign and unit direction are unchanged by it.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0], logits.detach()


def _step(grad: torch.Tensor, size: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return size * grad.sign()
    return grad / (_norms(grad) + TINY) * size  # torchattacks' order of operations, so the two agree bit for bit


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The nearest point of the eps-ball (L-inf: clamp each pixel; L2: rescale when outside)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _norms(delta)
    # torchattacks divides eps by the norm without guarding zero; a zero delta would give 0 * inf = nan here.
    return delta * torch.where(n > 0, eps / n.clamp_min(1e-12), 1.0).clamp(max=1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    # The draws and their order match torchattacks, so that with the same global seed the starts coincide.
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    delta = torch.empty_like(x).normal_(generator=generator)
    n = _norms(delta)
    r = torch.zeros_like(n).uniform_(0, 1, generator=generator)
    return delta * (r / n * eps)  # torchattacks' grouping: another one changes the last bit, and PGD grows it


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norms shaped (B, 1, 1, ...) for broadcasting."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *[1] * (t.ndim - 1))


def _clip(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).detach()
