"""Explanations with measured faithfulness: each attribution method's deletion/insertion areas on a seeded
sample of test images, the randomisation sanity check, and example maps of the best method for the report.

The methods and the measures live in ``pupil.explain`` (with their papers); this module is the check. Every map
explains the model's predicted class. A method is flagged when the mean Spearman correlation between its maps for
the trained and the fully randomised model exceeds ``FLAG_SPEARMAN``; the headline is the largest insertion -
deletion gap among the methods not flagged.

Grad-CAM and Grad-CAM++ need gradients and a ``gradcam_layer`` that forward hooks can see, Integrated Gradients
gradients; on a model without them (ONNX, TorchScript) those methods are skipped with a note and the
perturbation methods (occlusion, LIME, KernelSHAP), which only query the model, still run. The randomisation
check needs the model's weights as parameters, so it is skipped too on a model that gives no gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from pupil.audit.common import (
    CHECKS,
    AuditContext,
    Check,
    at_least,
    figure,
    headline,
    names_from,
    one_of,
    table,
    validate_settings,
)
from pupil.errors import PupilError
from pupil.explain import (
    BASELINES,
    FLAG_SPEARMAN,
    METHODS,
    SIGNED,
    deletion_insertion,
    randomized_copy,
    saliency,
    spearman_rows,
    step_counts,
)
from pupil.results import area_downscale, png_data_uri

EXAMPLE_SIDE = 32  # example images and maps are stored at most 32x32 so results.json stays small
# What each method needs beyond forward passes: AuditContext flags.
NEEDS = {
    "gradcam": ("gradients", "gradcam"),
    "gradcam++": ("gradients", "gradcam"),
    "integrated_gradients": ("gradients",),
}
LACKS = {
    "gradients": "the model gives no gradients",
    "gradcam": "the model names no Grad-CAM layer that forward hooks can see",
}


# ---------------------------------------------------------------------------------------------------------------
# The check


@dataclass
class ExplainConfig:
    methods: list[str] = field(
        default_factory=lambda: ["gradcam", "gradcam++", "integrated_gradients", "occlusion", "lime", "kernel_shap"]
    )
    """Attribution methods to compare."""
    n: int = 200
    """Test images (a seeded random subset) explained and scored for faithfulness."""
    steps: int = 20
    """Equal increments of pixels deleted/inserted along the faithfulness curves."""
    baseline: str = "zero"
    """The "absent" image (zero: black; blur: Gaussian blur) for deletion/insertion, IG, occlusion, LIME and SHAP."""
    lime_samples: int = 200
    """Random patch subsets per image for LIME."""
    shap_samples: int = 200
    """Coalitions per image for KernelSHAP."""
    ig_steps: int = 32
    """Points on the Integrated Gradients path."""
    grid: int = 7
    """Patches per side for LIME/KernelSHAP features; occlusion squares are side/grid pixels."""
    examples: int = 4
    """Correct and (as many) wrong predictions whose maps are stored for the report."""
    randomize: bool = True
    """Run the model-parameter randomisation sanity check (doubles the time spent on maps)."""

    def __post_init__(self):
        once = at_least(1)
        validate_settings(
            self,
            "explain",
            methods=names_from(list(METHODS), "explanation method"),
            n=once,
            steps=once,
            baseline=one_of(*BASELINES),
            lime_samples=once,
            shap_samples=once,
            ig_steps=once,
            grid=once,
            examples=at_least(0),
        )

    def options(self, batch_size: int) -> dict:
        """Keyword options for every method (each takes the ones it uses)."""
        keys = ("baseline", "grid", "ig_steps", "lime_samples", "shap_samples")
        return {k: getattr(self, k) for k in keys} | {"batch_size": batch_size}


@CHECKS.register("explain")
class Explain(Check):
    name, title, Config = "explain", "Explanations", ExplainConfig
    requires, extra = ("captum",), "trust"
    # Measured on one (shared) core of the 2-core dev machine: 24 s for resnet_test on the 16x16 synthetic smoke run,
    # 93 s for vgg_small with flip TTA on Fashion-MNIST (runs/fmnist_fast), where occlusion alone takes 1.2 s an image.
    quick = {"n": 16, "steps": 10, "lime_samples": 48, "shap_samples": 48, "ig_steps": 16}

    def run(self, ctx: AuditContext, cfg: ExplainConfig) -> dict:
        model, dev = ctx.model.eval(), ctx.device
        pred = ctx.logits("test").argmax(1)
        g = torch.Generator().manual_seed(ctx.seed)
        idx = torch.randperm(len(ctx.test), generator=g)[: cfg.n].sort().values
        x = ctx.test.images[idx].to(dev).float().div(255)
        target = pred[idx].to(dev)  # the prediction is what is explained
        opts = cfg.options(ctx.batch_size)
        methods, skipped, notes = _runnable(ctx, cfg.methods)
        randomize, why = cfg.randomize, _no_randomization(ctx)
        if randomize and why:
            randomize = False
            skipped.append("randomization")
            notes.append(f"{why}: the randomisation sanity check, which re-initialises them, was skipped.")
        random_model = randomized_copy(model, ctx.seed) if randomize else None
        per, curves = {}, {"fraction": (step_counts(cfg.steps, cfg.steps) / cfg.steps).tolist()}
        curves |= {"deletion": {}, "insertion": {}}
        for name in methods:
            fn = METHODS[name]
            t0 = time.perf_counter()
            maps = saliency(model, x, target, fn, **opts)
            seconds = (time.perf_counter() - t0) / len(x)
            fi = deletion_insertion(model, x, maps, target, cfg.steps, cfg.baseline, ctx.batch_size, ctx.channels_last)
            gap = fi["insertion_auc"] - fi["deletion_auc"]
            row = {
                "deletion_auc": fi["deletion_auc"].mean().item(),
                "insertion_auc": fi["insertion_auc"].mean().item(),
                "gap": gap.mean().item(),
                "gap_se": (gap.std() / math.sqrt(len(gap))).item() if len(gap) > 1 else 0.0,
                "seconds_per_image": seconds,
                "signed": name in SIGNED,
            }
            if random_model is not None:
                rmaps = saliency(random_model, x, target, fn, **opts).reshape(len(x), -1)
                rho = spearman_rows(maps, rmaps).mean().item()
                constant = (rmaps.amax(1) == rmaps.amin(1)).float().mean().item()
                row |= {"randomization_spearman": rho, "flagged": rho > FLAG_SPEARMAN, "randomized_constant": constant}
            per[name] = row
            curves["deletion"][name] = fi["deletion"].mean(0).tolist()
            curves["insertion"][name] = fi["insertion"].mean(0).tolist()
        trusted = [m for m in per if not per[m].get("flagged")] or list(per)
        best = max(trusted, key=lambda m: per[m]["gap"])
        curves["examples"] = self._examples(ctx, cfg, model, best, pred, opts)
        columns = ["deletion_auc", "insertion_auc", "gap", "randomization_spearman", "flagged", "seconds_per_image"]
        rows = [[m] + [r.get(c) for c in columns] for m, r in per.items()]
        metrics = {
            "per_method": per,
            "best_method": best,
            "n": len(x),
            "indices": idx.tolist(),
            "baseline": cfg.baseline,
            "flag_spearman": FLAG_SPEARMAN,
            "tta": bool(model.tta),
            "skipped": skipped,
        }
        return {
            "headline": headline(f"insertion - deletion AUC ({best})", per[best]["gap"], True, "AUC"),
            "summary": {"insertion_deletion_gap": per[best]["gap"], "method": best},
            "metrics": metrics,
            "tables": {"faithfulness": table(["method", *columns], rows)},
            "curves": curves,
            "figures": [
                figure(
                    "Deletion and insertion curves (mean over the explained images)", "drawer", drawer="faithfulness"
                ),
                figure(
                    "Saliency of the most faithful method on correct and wrong predictions",
                    "drawer",
                    "examples",
                    drawer="saliency_examples",
                ),
            ],
            "notes": notes + self._notes(ctx, cfg, per, best, randomize),
        }

    @staticmethod
    def _examples(ctx: AuditContext, cfg: ExplainConfig, model, best: str, pred: torch.Tensor, opts: dict) -> dict:
        """The best method's maps over a seeded sample of ``examples`` correct and ``examples`` wrong predictions."""
        y = ctx.targets("test")
        g = torch.Generator().manual_seed(ctx.seed + 1)
        order = torch.randperm(len(y), generator=g)
        right = order[(pred[order] == y[order])][: cfg.examples]
        wrong = order[(pred[order] != y[order])][: cfg.examples]
        idx = torch.cat([right, wrong])
        items = []
        if len(idx):
            x = ctx.test.images[idx].to(ctx.device).float().div(255)
            maps = saliency(model, x, pred[idx].to(ctx.device), METHODS[best], **opts)
            with torch.no_grad():
                probs = model(x).float().softmax(-1)
            for j, i in enumerate(idx.tolist()):
                image, sal = _example_pngs(x[j].cpu(), maps[j].cpu())
                items.append(
                    {
                        "index": i,
                        "true": ctx.test.classes[int(y[i])],
                        "pred": ctx.test.classes[int(pred[i])],
                        "prob": probs[j, pred[i]].item(),
                        "correct": bool(pred[i] == y[i]),
                        "image": image,
                        "saliency": sal,
                    }
                )
        return {"method": best, "items": items}

    @staticmethod
    def _notes(ctx: AuditContext, cfg: ExplainConfig, per: dict, best: str, randomized: bool) -> list[str]:
        n = min(cfg.n, len(ctx.test))
        notes = [
            f"Faithfulness over a seeded random subset of {n} of {len(ctx.test)} test images (seed {ctx.seed}); "
            f"each map explains the model's predicted class.",
            f"Deletion/insertion (Petsiuk et al. 2018): pixels set to the '{cfg.baseline}' baseline (or restored from "
            f"it) in {cfg.steps} equal steps, most salient first; areas under the predicted class's probability. "
            f"Lower deletion and higher insertion are more faithful.",
        ]
        if ctx.model.tta:
            notes.append("The run predicts with flip TTA; the maps and curves explain that deployed (averaged) model.")
        if randomized:
            flagged = [m for m in per if per[m].get("flagged")]
            notes.append(
                "Sanity check (Adebayo et al. 2018): all weights re-initialised at once; a mean Spearman correlation "
                f"above {FLAG_SPEARMAN} between the maps before and after flags a method whose maps do not depend "
                f"on what the model learned. Flagged: {', '.join(flagged) or 'none'}."
            )
            if constant := [f"{m} ({per[m]['randomized_constant']:.0%})" for m in per if per[m]["randomized_constant"]]:
                notes.append(
                    "Maps of the randomised model were constant (no ranking; Spearman counted as 0) for a share of "
                    f"the images with: {', '.join(constant)}."
                )
            among = "all methods, every one being flagged" if len(flagged) == len(per) else "the methods not flagged"
            notes.append(f"The headline's method ({best}) has the largest insertion - deletion gap among {among}.")
        if cfg.examples:
            k = cfg.examples
            notes.append(f"Examples show {best} maps for up to {k} correct and {k} wrong predictions (seeded sample).")
        return notes


def _runnable(ctx: AuditContext, methods: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The requested methods the model allows, those skipped, and one note per missing capability.

    Raises PupilError when none is left, naming the methods to request instead."""
    lacking = [flag for flag in LACKS if not getattr(ctx, flag)]
    run = [m for m in methods if not set(NEEDS.get(m, ())) & set(lacking)]
    skipped = [m for m in methods if m not in run]
    if not run:
        instead = [m for m in METHODS if not set(NEEDS.get(m, ())) & set(lacking)]
        raise PupilError(
            f"explain: {'; '.join(LACKS[f] for f in lacking)}, so none of the methods {', '.join(methods)} can run; "
            f"request {', '.join(instead)} instead (--set explain.methods={','.join(instead)})"
        )
    notes, seen = [], set()
    for flag in lacking:
        if gone := [m for m in skipped if flag in NEEDS[m] and m not in seen]:
            seen.update(gone)
            notes.append(f"{LACKS[flag]}: {_names(gone)} {'was' if len(gone) == 1 else 'were'} skipped")
    notes = [f"{n}." for n in notes[:-1]] + [f"{n}; {_names(run)} ran." for n in notes[-1:]]
    return run, skipped, notes


def _no_randomization(ctx: AuditContext) -> str:
    """Why the randomisation check cannot re-initialise the model's weights, or "" when it can."""
    if not ctx.gradients:
        return "the model gives no gradients (its weights are not PyTorch parameters)"
    if next(ctx.model.net.parameters(), None) is None:
        return "the model's network has no PyTorch parameters"
    return ""


def _names(items: list[str]) -> str:
    """The names joined as in a sentence: a; a and b; a, b and c."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _example_pngs(image: torch.Tensor, sal: torch.Tensor) -> tuple[str, str]:
    """Image (C, H, W) in [0, 1] and map (H, W) as PNG data URIs at most ``EXAMPLE_SIDE`` px a side: the image
    as it is, the map's positive part as grey 0..255 (its largest value at 255)."""
    pos = area_downscale(sal, EXAMPLE_SIDE).relu()  # (h, w)
    heat = pos.div(pos.max().clamp_min(1e-12)).mul(255).round().to(torch.uint8)
    return png_data_uri(image, EXAMPLE_SIDE), png_data_uri(heat)
