"""Adversarial robustness: robust accuracy against epsilon under FGSM (Goodfellow et al. 2015) and PGD with
restarts (Madry et al. 2018), optionally AutoAttack (Croce & Hein 2020) on a small subset, and sanity checks
against gradient masking (Athalye, Carlini & Wagner 2018; Carlini et al. 2019, "On Evaluating Adversarial
Robustness"):

1. PGD accuracy must not rise with epsilon (beyond noise);
2. an unbounded attack (L-inf eps = 1, or L2 eps = the image cube's diameter) must reach about 0% accuracy;
3. PGD must be at least as strong as FGSM at every epsilon;
4. with AutoAttack on, PGD must not report clearly more robustness than AutoAttack on the same images.

Following AutoAttack's convention, only images the model classifies correctly are attacked; the others
count as non-robust at every epsilon. The deployed model is attacked, test-time augmentation included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from pupil.audit.common import (
    CHECKS,
    AuditContext,
    Check,
    above,
    at_least,
    each,
    figure,
    headline,
    one_of,
    subset_indices,
    table,
    validate_settings,
)
from pupil.results import png_data_uri
from pupil.robust.attacks import NORMS, fgsm, pgd
from pupil.runtime import autocast, to_input

# The headline's epsilon is the largest listed one at or below this (pixel units).
REFERENCE_EPS = {"linf": 0.1, "l2": 1.0}
NORM_LABEL = {"linf": "L∞", "l2": "L2"}
AA_NORM = {"linf": "Linf", "l2": "L2"}  # torchattacks' spelling
UNBOUNDED_MAX_ACCURACY = 0.05
EXAMPLES = 4

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AdversarialConfig:
    norm: str = "linf"
    """Threat model: linf or l2 (for l2 give larger epsilons, e.g. 0,0.25,0.5,1,2)."""
    epsilons: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.02, 0.05, 0.1, 0.2])
    """Perturbation budgets in pixel units of [0, 1] images."""
    steps: int = 20
    """PGD steps."""
    alpha_ratio: float = 2.5
    """PGD step size as a multiple of eps / steps (2.5 is the usual rule of thumb)."""
    restarts: int = 1
    """PGD random restarts; an image counts as broken if any restart breaks it."""
    n: int = 1000
    """Test images attacked (a seeded random subset when the split is larger)."""
    autoattack: bool = False
    """Also run torchattacks' standard AutoAttack (slow) on a small subset."""
    autoattack_n: int = 100
    """Images for AutoAttack (the first ones of the attacked subset)."""
    autoattack_eps: float = 0.1
    """AutoAttack's epsilon."""
    batch_size: int = 250
    """Images per attack batch."""

    def __post_init__(self):
        once = at_least(1)
        validate_settings(
            self,
            "adversarial",
            norm=one_of(*NORMS),
            epsilons=each(at_least(0), "epsilon"),
            steps=once,
            alpha_ratio=above(0),
            restarts=once,
            n=once,
            autoattack_n=once,
            autoattack_eps=above(0),
            batch_size=once,
        )

    def eps_values(self) -> list[float]:
        """The epsilons, sorted, with 0 (clean accuracy) always first."""
        return sorted(set(self.epsilons) | {0.0})


class Attacker:
    """Runs FGSM and PGD (with restarts) over the images that are still classified correctly, in batches."""

    def __init__(self, model: torch.nn.Module, cfg: AdversarialConfig, ctx: AuditContext):

        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.autocast = lambda: autocast(ctx.device, ctx.dtype)
        self.gen = torch.Generator(ctx.device).manual_seed(ctx.seed)

    def fgsm(self, eps: float, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """(N,) bool: which ``alive`` images FGSM at ``eps`` fails to flip."""
        return self.survivors(partial(fgsm, self.model, eps=eps, norm=self.cfg.norm), x, y, alive)

    def pgd(
        self, eps: float, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor, steps: int | None = None
    ) -> torch.Tensor:
        """(N,) bool: which ``alive`` images survive every PGD restart at ``eps``."""
        steps = steps or self.cfg.steps
        alpha = self.cfg.alpha_ratio * eps / steps
        attack = partial(
            pgd, self.model, eps=eps, alpha=alpha, steps=steps, norm=self.cfg.norm, generator=self.gen, early_stop=True
        )
        for _ in range(self.cfg.restarts):  # a restart only attacks the survivors of the previous one
            alive = self.survivors(attack, x, y, alive)
        return alive

    def adversarial(self, eps: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD examples for a few images (one restart)."""
        alpha = self.cfg.alpha_ratio * eps / self.cfg.steps
        with self.autocast():
            return pgd(self.model, x, y, eps, alpha, self.cfg.steps, self.cfg.norm, True, self.gen, early_stop=True)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.model(x).argmax(1)

    def survivors(self, attack: Attack, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """(N,) bool: ``alive`` images that ``attack(x, y) -> x_adv`` fails to flip; the others are not attacked."""
        out = alive.clone()
        for chunk in alive.nonzero()[:, 0].split(self.cfg.batch_size):
            with self.autocast():
                adv = attack(x[chunk], y[chunk])
            out[chunk] = self.predict(adv) == y[chunk]
        return out


@CHECKS.register("adversarial")
class Adversarial(Check):
    name, title, Config = "adversarial", "Adversarial robustness", AdversarialConfig
    requires, extra = ("torchattacks",), "robust"
    quick = {"n": 500, "steps": 10}

    def run(self, ctx: AuditContext, cfg: AdversarialConfig) -> dict:

        model = ctx.model.eval()
        idx = subset_indices(len(ctx.test), cfg.n, ctx.seed)
        x = to_input(ctx.test.images[idx], ctx.device, False)  # (n, C, H, W) in [0, 1]
        y = ctx.targets("test")[idx].to(ctx.device)
        correct = ctx.logits("test")[idx].argmax(1).to(ctx.device) == y
        n, n_correct = len(idx), int(correct.sum())
        att = Attacker(model, cfg, ctx)
        eps_list = cfg.eps_values()

        def accuracy(alive: torch.Tensor) -> float:
            return alive.double().mean().item()

        def success_rate(alive: torch.Tensor) -> float:
            return 1 - int(alive.sum()) / n_correct if n_correct else 0.0

        alive_fgsm = [att.fgsm(e, x, y, correct) if e else correct for e in eps_list]
        alive_pgd = [att.pgd(e, x, y, correct) if e else correct for e in eps_list]
        acc_fgsm, acc_pgd = [accuracy(a) for a in alive_fgsm], [accuracy(a) for a in alive_pgd]
        success = {"fgsm": [success_rate(a) for a in alive_fgsm], "pgd": [success_rate(a) for a in alive_pgd]}
        # Unbounded attack: every image of the box is reachable, so a working attack leaves ~0% accuracy.
        unb = {
            "eps": 1.0 if cfg.norm == "linf" else math.sqrt(math.prod(x.shape[1:])),
            "steps": max(cfg.steps, 20),
            "n": min(n, 200),
        }
        m = unb["n"]
        unb["accuracy"] = accuracy(att.pgd(unb["eps"], x[:m], y[:m], correct[:m], unb["steps"]))

        ref = _reference_eps(eps_list, cfg.norm)
        ref_acc = acc_pgd[eps_list.index(ref)]
        tol = max(0.01, 3 / n)  # a rise of more than 1% (or 3 images) is not noise
        failures = _sanity(eps_list, acc_fgsm, acc_pgd, unb["accuracy"], tol)
        metrics = {
            "norm": cfg.norm,
            "n": n,
            "n_correct": n_correct,
            "clean_accuracy": n_correct / n,
            "epsilons": eps_list,
            "fgsm_accuracy": acc_fgsm,
            "pgd_accuracy": acc_pgd,
            "fgsm_success_rate": success["fgsm"],
            "pgd_success_rate": success["pgd"],
            "reference_eps": ref,
            "reference_accuracy": ref_acc,
            "unbounded": unb,
            "tta": bool(getattr(model, "tta", False)),
        }
        notes = [
            f"{n} of {len(ctx.test)} test images (seeded random subset, seed {ctx.seed}); the {n - n_correct} "
            "misclassified when clean are not attacked and count as non-robust at every epsilon",
            f"PGD: {cfg.steps} steps of {cfg.alpha_ratio:g}·ε/{cfg.steps} from a random start, {cfg.restarts} "
            f"restart(s), stopping on an image at its first misclassified iterate; ε in pixel units of [0, 1] images, "
            f"{NORM_LABEL[cfg.norm]} norm",
        ]
        if metrics["tta"]:
            notes.append("the deployed model was attacked, test-time augmentation (flip averaging) included")
        if cfg.autoattack:
            aa = _autoattack(att, x, y, correct)
            metrics["autoattack"] = aa
            notes.append(f"AutoAttack (standard, torchattacks) on the first {aa['n']} images at ε={aa['eps']:g}")
            # APGD is somewhat stronger than plain PGD on any model; a gap of 5 points (or 3 images) is not that.
            if aa["accuracy"] < aa["pgd_accuracy"] - max(0.05, 3 / aa["n"]):
                failures.append(
                    f"AutoAttack leaves {aa['accuracy']:.3f} accuracy where PGD leaves {aa['pgd_accuracy']:.3f} "
                    f"(ε={aa['eps']:g}): PGD overestimates robustness (too weak, or gradients are masked)"
                )
        metrics["sanity"] = {"passed": not failures, "failures": failures}
        notes += [f"sanity check failed: {f}" for f in failures]
        rows = [[e, acc_fgsm[i], acc_pgd[i], success["fgsm"][i], success["pgd"][i]] for i, e in enumerate(eps_list)]
        label = f"PGD robust accuracy at ε={ref:g} ({NORM_LABEL[cfg.norm]})"
        return {
            "headline": headline(label, ref_acc, True, "fraction"),
            "summary": {"robust_top1": ref_acc, "eps": ref, "norm": cfg.norm, "clean_top1": metrics["clean_accuracy"]},
            "metrics": metrics,
            "tables": {
                "robust_accuracy": table(
                    ["epsilon", "FGSM accuracy", "PGD accuracy", "FGSM success rate", "PGD success rate"], rows
                )
            },
            "curves": {
                "robust_accuracy": {"epsilon": eps_list, "fgsm": acc_fgsm, "pgd": acc_pgd},
                "examples": _examples(att, x, y, correct, ref, ctx.run.classes),
            },
            "figures": [
                figure(
                    "Robust accuracy against ε (images wrong when clean count as not robust)",
                    "line",
                    "robust_accuracy",
                    x="epsilon",
                    series={"fgsm": "FGSM", "pgd": "PGD"},
                    xlabel=f"ε ({cfg.norm})",
                    ylabel="accuracy",
                ),
                figure(
                    "Clean and adversarial examples with the amplified perturbation",
                    "drawer",
                    "examples",
                    drawer="adversarial_examples",
                ),
            ],
            "notes": notes,
        }


def _reference_eps(eps_list: list[float], norm: str) -> float:
    """The largest epsilon at or below REFERENCE_EPS[norm]; else the smallest positive one; else 0."""
    below = [e for e in eps_list if 0 < e <= REFERENCE_EPS[norm]]
    above = [e for e in eps_list if e > 0]
    return max(below) if below else min(above) if above else 0.0


def _sanity(eps: list[float], acc_fgsm: list[float], acc_pgd: list[float], unbounded: float, tol: float) -> list[str]:
    """Failures of the gradient-masking checks 1-3 (module docstring), as sentences."""
    failures = []
    for i in range(1, len(eps)):
        if acc_pgd[i] > acc_pgd[i - 1] + tol:
            failures.append(
                f"PGD accuracy rises from {acc_pgd[i - 1]:.3f} at ε={eps[i - 1]:g} to {acc_pgd[i]:.3f} at ε={eps[i]:g}"
            )
    if unbounded > UNBOUNDED_MAX_ACCURACY:
        failures.append(
            f"an unbounded attack leaves {unbounded:.3f} accuracy (expected ≤ {UNBOUNDED_MAX_ACCURACY:g}): "
            "gradients may be masked or the attack broken"
        )
    for e, f, p in zip(eps, acc_fgsm, acc_pgd, strict=True):
        if p > f + tol:
            failures.append(f"PGD ({p:.3f}) is weaker than FGSM ({f:.3f}) at ε={e:g}")
    return failures


def _autoattack(att: Attacker, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor) -> dict:
    """torchattacks' standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) and our PGD on the same images."""
    import torchattacks

    cfg = att.cfg
    m = min(cfg.autoattack_n, len(x))
    xs, ys, ok = x[:m], y[:m], correct[:m]
    aa = torchattacks.AutoAttack(
        att.model, AA_NORM[cfg.norm], cfg.autoattack_eps, "standard", att.model.num_classes, att.ctx.seed
    )
    return {
        "eps": cfg.autoattack_eps,
        "n": m,
        "accuracy": att.survivors(aa, xs, ys, ok).double().mean().item(),
        "pgd_accuracy": att.pgd(cfg.autoattack_eps, xs, ys, ok).double().mean().item(),
    }


def _examples(
    att: Attacker, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor, eps: float, classes: list[str]
) -> list[dict]:
    """Up to four correctly classified images with their PGD version at ``eps`` and the perturbation,
    as PNG data URIs; the perturbation is scaled so that its largest pixel spans half the grey range."""
    pos = correct.nonzero()[:EXAMPLES, 0]
    if eps == 0 or not len(pos):
        return []
    xs, ys = x[pos], y[pos]
    adv = att.adversarial(eps, xs, ys)
    pred = att.predict(adv)
    out = []
    for i in range(len(pos)):
        delta = adv[i] - xs[i]
        scale = 0.5 / max(delta.abs().max().item(), 1e-12)
        out.append(
            {
                "index": int(pos[i]),
                "label": classes[int(ys[i])],
                "clean_pred": classes[int(ys[i])],
                "adv_pred": classes[int(pred[i])],
                "eps": eps,
                "clean": png_data_uri(xs[i]),
                "adversarial": png_data_uri(adv[i]),
                "perturbation": png_data_uri(0.5 + scale * delta),
                "perturbation_scale": scale,
            }
        )
    return out
