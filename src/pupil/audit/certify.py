"""Certified robustness by randomized smoothing (Cohen, Rosenfeld & Kolter 2019): for each image of a subset,
CERTIFY (Alg. 1) gives the smoothed classifier's label and an L2 radius within which that label provably
holds (with probability at least 1 - alpha over the noise); certified accuracy at radius r is the share of
images classified correctly with a radius of at least r.

A certificate is about the *smoothed* classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I). It is
only informative when the base classifier f was trained with Gaussian noise of about the same sigma; a
model trained on clean images mostly abstains or certifies tiny radii.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pupil.audit.common import (
    CHECKS,
    Allowed,
    AuditContext,
    Check,
    above,
    at_least,
    each,
    figure,
    headline,
    subset_indices,
    table,
    validate_settings,
)
from pupil.robust.smoothing import ABSTAIN, certify_batch, max_radius
from pupil.runtime import autocast, to_input

HEADLINE_RADIUS = 0.5
CURVE_POINTS = 101


@dataclass
class CertifyConfig:
    sigma: float = 0.25
    """Noise standard deviation in pixel units of [0, 1] images."""
    n0: int = 100
    """Noise draws per image to choose the class."""
    n: int = 10000
    """Noise draws per image to bound that class's probability."""
    alpha: float = 0.001
    """Failure probability of each certificate."""
    images: int = 500
    """Test images certified (a seeded random subset when the split is larger)."""
    batch_size: int = 1000
    """Noisy images per forward pass."""
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    """L2 radii (pixel units) for the certified-accuracy table."""

    def __post_init__(self):
        once = at_least(1)
        validate_settings(
            self,
            "certify",
            sigma=above(0),
            n0=once,
            n=once,
            alpha=Allowed("{type} in (0, 1)", lambda v: 0 < v < 1),
            images=once,
            batch_size=once,
            radii=each(at_least(0), "radius"),
        )

    def radius_values(self) -> list[float]:
        """The radii, sorted and distinct."""
        return sorted(set(self.radii))


@CHECKS.register("certify")
class Certify(Check):
    name, title, Config = "certify", "Certified robustness (randomized smoothing)", CertifyConfig
    quick = {"images": 50, "n0": 50, "n": 1000}

    def run(self, ctx: AuditContext, cfg: CertifyConfig) -> dict:

        model = ctx.model.eval()
        idx = subset_indices(len(ctx.test), cfg.images, ctx.seed)
        y = ctx.targets("test")[idx]
        gen = torch.Generator(ctx.device).manual_seed(ctx.seed)
        labels, radius = [], []
        t0 = time.perf_counter()
        # Chunks of images bound the memory that gathering noisy copies takes; rows per pass stay batch_size.
        for chunk in idx.split(ctx.batch(min(256, cfg.batch_size))):
            x = to_input(ctx.test.images[chunk], ctx.device, False)
            with autocast(ctx.device, ctx.dtype):
                c, r = certify_batch(model, x, cfg.n0, cfg.n, cfg.alpha, cfg.sigma, ctx.batch(cfg.batch_size), gen)
            labels.append(c)
            radius.append(r)
        seconds = time.perf_counter() - t0
        labels, radius = torch.cat(labels), torch.cat(radius)
        correct = labels == y  # ABSTAIN (-1) is never a class

        def certified_accuracy(r: float) -> float:
            return (correct & (radius >= r)).double().mean().item()

        radii = cfg.radius_values()
        r_head = min(radii, key=lambda r: (abs(r - HEADLINE_RADIUS), r))
        cap = max_radius(cfg.n, cfg.alpha, cfg.sigma)
        grid = torch.linspace(0, max(radii[-1], cap), CURVE_POINTS, dtype=torch.float64).tolist()
        clean = (ctx.logits("test")[idx].argmax(1) == y).double().mean().item()
        metrics = {
            "n_images": len(idx),
            "sigma": cfg.sigma,
            "sigma_normalised": [cfg.sigma / s for s in ctx.model.std.flatten().tolist()],
            "input_shape": list(ctx.test.shape),
            "certified_accuracy": {f"{r:g}": certified_accuracy(r) for r in radii},
            "smoothed_accuracy": certified_accuracy(0.0),
            "base_accuracy": clean,
            "abstention_rate": (labels == ABSTAIN).double().mean().item(),
            "mean_radius_correct": radius[correct].mean().item() if correct.any() else 0.0,
            "max_certifiable_radius": cap,
            "seconds_per_image": seconds / len(idx),
            "trained_task": ctx.run.info["config"]["train"].get("task", "classification"),
        }
        notes = [
            f"{len(idx)} of {len(ctx.test)} test images (seeded random subset, seed {ctx.seed}); "
            f"sigma {cfg.sigma:g}, n0 {cfg.n0}, n {cfg.n}, alpha {cfg.alpha:g} (Cohen et al. 2019, Alg. 1)",
            f"with n = {cfg.n} draws no radius above {cap:.3f} can be certified",
            f"sigma and the radii are in the model's pixel space: [0, 1] pixels of its "
            f"{'x'.join(map(str, ctx.test.shape))} input, after its resize and crop and before its normalisation "
            f"(sigma {cfg.sigma:g} is {', '.join(f'{v:.3g}' for v in metrics['sigma_normalised'])} in normalised "
            "units per channel)",
        ]
        notes += _training_notes(ctx.run.info["config"], cfg.sigma)
        label = f"certified accuracy at L2 radius {r_head:g} (σ={cfg.sigma:g})"
        rows = [[r, certified_accuracy(r)] for r in radii]
        summary = {"certified_top1": metrics["certified_accuracy"][f"{r_head:g}"], "radius": r_head, "sigma": cfg.sigma}
        return {
            "headline": headline(label, certified_accuracy(r_head), True, "fraction"),
            "summary": summary,
            "metrics": metrics,
            "tables": {"certified_accuracy": table(["radius", "certified accuracy"], rows)},
            "curves": {
                "certified_accuracy": {"radius": grid, "accuracy": [certified_accuracy(r) for r in grid]},
            },
            "figures": [
                figure(
                    "Certified accuracy against L2 radius",
                    "line",
                    "certified_accuracy",
                    x="radius",
                    series={"accuracy": "smoothed classifier"},
                    xlabel="L2 radius",
                    ylabel="certified accuracy",
                )
            ],
            "notes": notes,
        }


def _training_notes(config: dict, sigma: float) -> list[str]:
    """Whether the run was trained with Gaussian noise, and with which sigma if the config records one (in the
    ``task`` section since per-method configs; in ``train`` in older run.json files)."""
    train = {**config["train"], **(config.get("task") or {})}
    task = train.get("task", "classification")
    if task == "unknown":  # a model pupil did not train
        return [
            "pupil did not train this model, so whether it saw Gaussian noise of matching sigma is unknown: "
            "randomized smoothing certifies much less for a base classifier trained on clean images"
        ]
    if task != "noise":
        return [
            f"trained without noise (task {task!r}): randomized smoothing is meant for a base classifier trained "
            "with Gaussian noise of matching sigma; a model trained on clean images usually certifies less"
        ]
    trained = [v for k, v in train.items() if "sigma" in k and isinstance(v, int | float)]
    if trained and abs(trained[0] - sigma) > 1e-9:
        return [f"the model was trained with noise sigma {trained[0]:g} but is certified at sigma {sigma:g}"]
    return []
