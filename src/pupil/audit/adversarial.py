"""Adversarial robustness: robust accuracy against epsilon under FGSM (Goodfellow et al. 2015) and PGD with
restarts (Madry et al. 2018), optionally AutoAttack (Croce & Hein 2020) on a small subset, and sanity checks
against gradient masking (Athalye, Carlini & Wagner 2018; Carlini et al. 2019, "On Evaluating Adversarial
Robustness"):

1. the strongest attack's accuracy must not rise with epsilon (beyond noise);
2. an unbounded attack (L-inf eps = 1, or L2 eps = the image cube's diameter) must reach about 0% accuracy;
3. PGD must be at least as strong as FGSM at every epsilon;
4. with AutoAttack on, PGD must not report clearly more robustness than AutoAttack on the same images.

A model that gives no gradients (an ONNX Runtime session) is attacked instead with torchattacks' Square Attack
(Andriushchenko et al. 2020): a score-based black-box random search that only queries the model's outputs, at
every epsilon of the config. Checks 2 to 4 concern gradient attacks and are skipped then, with a note; check 1
still holds. Its figures bound robust accuracy from above, usually more loosely than PGD's.

Following AutoAttack's convention, only images the model classifies correctly are attacked; the others
count as non-robust at every epsilon. The deployed model is attacked, test-time augmentation included.
"""

from __future__ import annotations

import contextlib
import io
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
ATTACK_LABEL = {"fgsm": "FGSM", "pgd": "PGD", "square": "Square Attack"}
SQUARE_P_INIT = 0.8  # the initial share of pixels a square covers (torchattacks' and AutoAttack's default)
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
    square_queries: int = 1000
    """Square Attack's queries (forward passes) per image and epsilon, used when the model gives no gradients."""
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
            square_queries=once,
            batch_size=once,
        )

    def eps_values(self) -> list[float]:
        """The epsilons, sorted, with 0 (clean accuracy) always first."""
        return sorted(set(self.epsilons) | {0.0})


def square(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    queries: int = 1000,
    seed: int = 0,
) -> torch.Tensor:
    """torchattacks' Square Attack (Andriushchenko et al. 2020), untargeted on the margin loss, one restart.

    It only runs ``model`` forward and never asks for a gradient, so it works on a model that gives none.
    torchattacks reseeds the global generators with ``seed`` on every call; they are forked here, so the result
    depends on ``seed`` and the batch alone and the caller's random stream is untouched.

    Args:
        model: takes (B, C, H, W) images in [0, 1] and returns logits (B, K).
        x: clean images (B, C, H, W) in [0, 1].
        y: true labels (B,).
        eps: the perturbation budget in pixel units.
        norm: ``"linf"`` or ``"l2"``.
        queries: the most model queries per image.
        seed: the random search's seed.

    Returns:
        Images (B, C, H, W) with ``||x_adv - x|| <= eps`` and values in [0, 1]: the adversarial example where the
        search found one, else ``x``.
    """
    import torchattacks

    # torchattacks reads the device from the model's first parameter and prints a line when there is none (an
    # opaque network); the device is set right after.
    with contextlib.redirect_stdout(io.StringIO()):
        attack = torchattacks.Square(
            model, AA_NORM[norm], eps, queries, n_restarts=1, p_init=SQUARE_P_INIT, loss="margin", seed=seed
        )
    attack.set_device(x.device)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        return attack(x, y).detach()


class Attacker:
    """Runs the attacks over the images that are still classified correctly, in batches: FGSM and PGD (with
    restarts) on a model that gives gradients, Square Attack on one that does not (``ctx.gradients``)."""

    def __init__(self, model: torch.nn.Module, cfg: AdversarialConfig, ctx: AuditContext):

        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.autocast = lambda: autocast(ctx.device, ctx.dtype)
        self.gen = torch.Generator(ctx.device).manual_seed(ctx.seed)
        self.attacks = {"fgsm": self.fgsm, "pgd": self.pgd} if ctx.gradients else {"square": self.square}
        self.strongest = "pgd" if ctx.gradients else "square"
        """The attack the headline, the examples and sanity check 1 use."""

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

    def square(self, eps: float, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """(N,) bool: which ``alive`` images Square Attack at ``eps`` fails to flip (seeded by the audit's seed)."""
        attack = partial(square, self.model, eps=eps, norm=self.cfg.norm, queries=self.cfg.square_queries)
        return self.survivors(partial(attack, seed=self.ctx.seed), x, y, alive)

    def adversarial(self, eps: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Examples of the strongest attack for a few images (PGD: one restart)."""
        cfg = self.cfg
        with self.autocast():
            if self.strongest == "square":
                return square(self.model, x, y, eps, cfg.norm, cfg.square_queries, self.ctx.seed)
            alpha = cfg.alpha_ratio * eps / cfg.steps
            return pgd(self.model, x, y, eps, alpha, cfg.steps, cfg.norm, True, self.gen, early_stop=True)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.model(x).argmax(1)

    def survivors(self, attack: Attack, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """(N,) bool: ``alive`` images that ``attack(x, y) -> x_adv`` fails to flip; the others are not attacked."""
        out = alive.clone()
        for chunk in alive.nonzero()[:, 0].split(self.ctx.batch(self.cfg.batch_size)):
            with self.autocast():
                adv = attack(x[chunk], y[chunk])
            out[chunk] = self.predict(adv) == y[chunk]
        return out


@CHECKS.register("adversarial")
class Adversarial(Check):
    name, title, Config = "adversarial", "Adversarial robustness", AdversarialConfig
    requires, extra = ("torchattacks",), "robust"
    quick = {"n": 500, "steps": 10, "square_queries": 200}

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

        alive = {a: [fn(e, x, y, correct) if e else correct for e in eps_list] for a, fn in att.attacks.items()}
        acc = {a: [accuracy(v) for v in alive[a]] for a in alive}
        success = {a: [success_rate(v) for v in alive[a]] for a in alive}
        unb = _unbounded(att, x, y, correct, accuracy) if ctx.gradients else None

        strongest, ref = att.strongest, _reference_eps(eps_list, cfg.norm)
        ref_acc = acc[strongest][eps_list.index(ref)]
        tol = max(0.01, 3 / n)  # a rise of more than 1% (or 3 images) is not noise
        failures = _sanity(eps_list, acc, strongest, unb["accuracy"] if unb else None, tol)
        metrics = {
            "norm": cfg.norm,
            "n": n,
            "n_correct": n_correct,
            "clean_accuracy": n_correct / n,
            "epsilons": eps_list,
            "attack": strongest,
            **{f"{a}_accuracy": acc[a] for a in acc},
            **{f"{a}_success_rate": success[a] for a in acc},
            "reference_eps": ref,
            "reference_accuracy": ref_acc,
            "unbounded": unb,
            "tta": bool(getattr(model, "tta", False)),
            "skipped": [] if ctx.gradients else ["fgsm", "pgd", "unbounded", "pgd_vs_fgsm"],
        }
        if not ctx.gradients:
            queries, seed = cfg.square_queries, ctx.seed
            metrics["square"] = {"queries": queries, "p_init": SQUARE_P_INIT, "restarts": 1, "seed": seed}
        notes = _notes(ctx, cfg, n, n_correct, bool(metrics["tta"]))
        if cfg.autoattack and not ctx.gradients:
            metrics["skipped"].append("autoattack")
            notes.append("AutoAttack was skipped: its APGD and FAB attacks need gradients, which the model lacks")
        elif cfg.autoattack:
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
        rows = [[e, *(acc[a][i] for a in acc), *(success[a][i] for a in acc)] for i, e in enumerate(eps_list)]
        columns = [f"{ATTACK_LABEL[a]} {what}" for what in ("accuracy", "success rate") for a in acc]
        label = f"{ATTACK_LABEL[strongest]} robust accuracy at ε={ref:g} ({NORM_LABEL[cfg.norm]})"
        return {
            "headline": headline(label, ref_acc, True, "fraction"),
            "summary": {"robust_top1": ref_acc, "eps": ref, "norm": cfg.norm, "clean_top1": metrics["clean_accuracy"]},
            "metrics": metrics,
            "tables": {"robust_accuracy": table(["epsilon", *columns], rows)},
            "curves": {
                "robust_accuracy": {"epsilon": eps_list, **acc},
                "examples": _examples(att, x, y, correct, ref, ctx.run.classes),
            },
            "figures": [
                figure(
                    "Robust accuracy against ε (images wrong when clean count as not robust)",
                    "line",
                    "robust_accuracy",
                    x="epsilon",
                    series={a: ATTACK_LABEL[a] for a in acc},
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


def _notes(ctx: AuditContext, cfg: AdversarialConfig, n: int, n_correct: int, tta: bool) -> list[str]:
    """What was attacked, and how."""
    notes = [
        f"{n} of {len(ctx.test)} test images (seeded random subset, seed {ctx.seed}); the {n - n_correct} "
        "misclassified when clean are not attacked and count as non-robust at every epsilon",
    ]
    where = f"ε in pixel units of [0, 1] images, {NORM_LABEL[cfg.norm]} norm"
    if ctx.gradients:
        notes.append(
            f"PGD: {cfg.steps} steps of {cfg.alpha_ratio:g}·ε/{cfg.steps} from a random start, {cfg.restarts} "
            f"restart(s), stopping on an image at its first misclassified iterate; {where}"
        )
    else:
        notes += [
            "the model gives no gradients: the white-box FGSM and PGD attacks were "
            "replaced by Square Attack, a black-box attack that only queries the model's outputs, at every ε; the "
            "sanity checks for masked gradients (an unbounded attack reaches 0%, PGD at least as strong as FGSM) "
            "were skipped",
            f"Square Attack (Andriushchenko et al. 2020; torchattacks): random search over square-shaped updates on "
            f"the margin loss, {cfg.square_queries} queries per image and ε, p_init {SQUARE_P_INIT:g}, one restart, "
            f"seed {ctx.seed}; {where}. A black-box attack with a query budget bounds robust accuracy from above, "
            "usually more loosely than PGD, so these figures are not comparable with a PGD audit's",
        ]
    if tta:
        notes.append("the deployed model was attacked, test-time augmentation (flip averaging) included")
    return notes


def _unbounded(att: Attacker, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor, accuracy) -> dict:
    """PGD with every image of the box reachable: a working attack on an unmasked model leaves ~0% accuracy."""
    cfg = att.cfg
    unb = {
        "eps": 1.0 if cfg.norm == "linf" else math.sqrt(math.prod(x.shape[1:])),
        "steps": max(cfg.steps, 20),
        "n": min(len(x), 200),
    }
    m = unb["n"]
    unb["accuracy"] = accuracy(att.pgd(unb["eps"], x[:m], y[:m], correct[:m], unb["steps"]))
    return unb


def _reference_eps(eps_list: list[float], norm: str) -> float:
    """The largest epsilon at or below REFERENCE_EPS[norm]; else the smallest positive one; else 0."""
    below = [e for e in eps_list if 0 < e <= REFERENCE_EPS[norm]]
    above = [e for e in eps_list if e > 0]
    return max(below) if below else min(above) if above else 0.0


def _sanity(
    eps: list[float], acc: dict[str, list[float]], strongest: str, unbounded: float | None, tol: float
) -> list[str]:
    """Failures of checks 1-3 (module docstring), as sentences. ``acc`` maps each attack run to its accuracy per
    epsilon; check 2 needs ``unbounded`` and check 3 FGSM and PGD, and are left out without them."""
    failures = []
    strong, name = acc[strongest], ATTACK_LABEL[strongest]
    for i in range(1, len(eps)):
        if strong[i] > strong[i - 1] + tol:
            failures.append(
                f"{name} accuracy rises from {strong[i - 1]:.3f} at ε={eps[i - 1]:g} to {strong[i]:.3f} at ε={eps[i]:g}"
            )
    if unbounded is not None and unbounded > UNBOUNDED_MAX_ACCURACY:
        failures.append(
            f"an unbounded attack leaves {unbounded:.3f} accuracy (expected ≤ {UNBOUNDED_MAX_ACCURACY:g}): "
            "gradients may be masked or the attack broken"
        )
    if "fgsm" in acc and "pgd" in acc:
        for e, f, p in zip(eps, acc["fgsm"], acc["pgd"], strict=True):
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
    """Up to four correctly classified images with their version under the strongest attack (PGD, or Square
    Attack without gradients) at ``eps`` and the perturbation, as PNG data URIs; the perturbation is scaled so
    that its largest pixel spans half the grey range."""
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
