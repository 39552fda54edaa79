"""Conformal prediction sets: sets of labels that hold the true one with a chosen probability (split conformal).

The scores THR (Sadinle et al. 2019), APS (Romano et al. 2020) and RAPS (Angelopoulos et al. 2021), their
finite-sample threshold and the sets live in ``pupil.conformal``, shared with ``pupil predict --conformal``. This
check follows the RAPS paper's protocol on the validation split, never the test split: a seeded random tuning part
fits the temperature (NLL; Guo et al. 2017) and RAPS's k_reg and lambda, and the rest, the calibration part, gives
the threshold, so the coverage guarantee holds exactly. The test split then measures coverage (with a
Clopper-Pearson interval), set sizes, coverage by set size and by class, and coverage under the ImageNet-C
corruptions at one severity, which break the exchangeability the guarantee rests on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pupil.audit.calibration import fit_temperature
from pupil.audit.common import (
    CHECKS,
    Allowed,
    AuditContext,
    Check,
    at_least,
    each,
    figure,
    headline,
    names_from,
    subset_indices,
    table,
    validate_settings,
)
from pupil.audit.corruption import predict_corrupted, subset
from pupil.conformal import (
    SCORES,
    Calibration,
    calibrate,
    class_coverage,
    coverage_interval,
    logit_ranks,
    size_stratified_coverage,
    uniforms,
)
from pupil.data.corruptions import CORRUPTIONS, GROUPS, REFERENCE_SIZE, SEVERITIES, parse_names
from pupil.errors import PupilError

REFERENCE_LEVEL = 0.95  # the level the best score is picked at and the headline reports
SUMMARY_LEVELS = (0.9, 0.95, 0.99)  # the levels the summary names (coverage_90, set_size_95, ...)
HISTOGRAM_SIZES = 5000  # set sizes kept for the histogram (a seeded subset of the test split)
NAMES = {"thr": "THR", "aps": "APS", "raps": "RAPS"}


@dataclass
class ConformalConfig:
    levels: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.99])
    """Target coverages 1 - alpha, each between 0 and 1."""
    tune_fraction: float = 0.3
    """Share of the validation split that tunes the temperature and RAPS's k_reg and lambda (RAPS: 0.3); the rest
    calibrates the threshold."""
    randomized: bool = True
    """Randomized APS and RAPS sets (exact coverage, as in the papers; a set may be empty) or the deterministic
    ones (never empty, coverage at least the target)."""
    n: int = 0
    """Test images for coverage under corruption: 0 = the whole test split, otherwise a class-stratified subset."""
    corruptions: list[str] = field(default_factory=lambda: ["all"])
    """Corruption names or groups (all, common, extra) to measure coverage under; none to skip."""
    severity: int = 3
    """Severity of the corruptions, 1 (mild) to 5 (severe)."""
    batch_size: int = 500
    """Images corrupted and predicted at once."""

    def __post_init__(self):
        validate_settings(
            self,
            "conformal",
            levels=each(Allowed("{type} between 0 and 1 (exclusive)", lambda v: 0 < v < 1), "level"),
            tune_fraction=Allowed("{type} between 0 and 1 (exclusive)", lambda v: 0 < v < 1),
            n=at_least(0),
            corruptions=names_from([*GROUPS, *CORRUPTIONS], "corruption", empty=True),
            severity=Allowed("{type} from 1 to 5", lambda v: v in SEVERITIES),
            batch_size=at_least(1),
        )
        self.levels = sorted(set(self.levels))


@CHECKS.register("conformal")
class Conformal(Check):
    name, title, Config = "conformal", "Conformal prediction sets", ConformalConfig
    quick = {"n": 1000}
    needs_val = True

    def run(self, ctx: AuditContext, cfg: ConformalConfig) -> dict:
        if ctx.val is None:
            raise PupilError(
                "the conformal check calibrates on a validation split; this run has none "
                "(train with --val-size > 0, or give pupil audit --val-size for a model pupil did not train)"
            )
        val_logits, val_y = ctx.logits("val"), ctx.targets("val")
        mask = calibration_mask(len(val_y), cfg.tune_fraction, ctx.seed)
        t = fit_temperature(val_logits[~mask], val_y[~mask])
        u_val = uniforms(len(val_y), ctx.seed, "val")
        cals = {
            (s, level): calibrate(val_logits, val_y, mask, t, level, s, u_val if cfg.randomized else None)
            for s in SCORES
            for level in cfg.levels
        }
        logits, y = ctx.logits("test"), ctx.targets("test")
        u_test = uniforms(len(y), ctx.seed, "test")
        ranks = logit_ranks(logits, y, t)
        classes = ctx.run.classes
        results, sizes, per_class = {}, {}, {}
        for key, cal in cals.items():
            results[key], sizes[key], per_class[key] = measure(cal, logits, y, u_test, ranks, classes)
        ref = min(cfg.levels, key=lambda v: (abs(v - REFERENCE_LEVEL), v))
        best = min(SCORES, key=lambda s: results[s, ref]["mean_set_size"])  # the first of equals
        shift, left_out = corruption_coverage(ctx, cfg, cals, u_test) if cfg.corruptions else (None, [])
        metrics: dict[str, Any] = {
            "n_validation": len(val_y),
            "n_tuning": int((~mask).sum()),
            "n_calibration": int(mask.sum()),
            "n_test": len(y),
            "temperature": t,
            "randomized": cfg.randomized,
            "levels": cfg.levels,
            "reference_level": ref,
            "score": best,
            "scores": {s: {f"{lv:g}": results[s, lv] for lv in cfg.levels} for s in SCORES},
        }
        if shift is not None:
            metrics["corruption"] = shift
        at = {lv: next((results[best, v] for v in cfg.levels if math.isclose(v, lv)), None) for lv in SUMMARY_LEVELS}
        summary: dict[str, Any] = {"score": best}  # None for a level not audited
        summary |= {f"coverage_{round(lv * 100)}": r["coverage"] if r else None for lv, r in at.items()}
        summary |= {f"set_size_{round(lv * 100)}": r["mean_set_size"] if r else None for lv, r in at.items()}
        summary["temperature"] = t
        summary["randomized"] = int(cfg.randomized)  # 1 or 0: a summary holds numbers, strings and null, no booleans
        label = f"mean set size at {ref:.0%} coverage ({NAMES[best]})"
        return {
            "headline": headline(label, results[best, ref]["mean_set_size"], False, "classes"),
            "summary": summary,
            "metrics": metrics,
            "per_image": {  # what pupil predict --conformal recomputes any level from
                "val_logits": val_logits,
                "val_targets": val_y,
                "calibration_mask": mask,
                "val_u": u_val,
            },
            "tables": tables(cfg, results, per_class, best, ref, classes, y, shift),
            "curves": curves(ctx, cfg, results, sizes, best, ref, shift),
            "figures": figures(best, ref, shift),
            "notes": notes(cfg, metrics, results, best, ref, shift, left_out),
        }


def calibration_mask(n: int, tune_fraction: float, seed: int) -> torch.Tensor:
    """Bool (n,): True for the calibration part, False for the tuning part (a seeded random share of
    ``tune_fraction``, at least one image on each side)."""
    if n < 2:
        raise PupilError(f"the conformal check needs 2 validation images or more (to tune and to calibrate), not {n}")
    n_tune = min(max(round(tune_fraction * n), 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, dtype=torch.bool)
    mask[order[:n_tune]] = False
    return mask


def measure(
    cal: Calibration, logits: torch.Tensor, y: torch.Tensor, u: torch.Tensor, ranks: torch.Tensor, classes: list[str]
) -> tuple[dict[str, Any], torch.Tensor, list[float | None]]:
    """Coverage, its interval, set sizes, coverage by set size and the worst class of one calibrated score on the
    test split; the set sizes (N,); and the coverage of each class (None for a class without test images)."""
    sizes = cal.sizes(logits, u)
    covered = ranks < sizes
    hits, n = int(covered.sum()), len(y)
    per_class, support = class_coverage(covered, y, len(classes))
    present = support > 0
    worst = int(torch.where(present, per_class, math.inf).argmin())
    return (
        {
            "coverage": hits / n,
            "coverage_ci95": coverage_interval(hits, n),
            "mean_set_size": sizes.double().mean().item(),
            "median_set_size": sizes.double().median().item(),
            "empty_sets": (sizes == 0).double().mean().item(),
            "threshold": cal.threshold if math.isfinite(cal.threshold) else None,
            "infinite": not math.isfinite(cal.threshold),
            "k_reg": cal.k_reg,
            "lambda": cal.lam,
            "by_set_size": size_stratified_coverage(sizes, covered),
            "worst_class": [classes[worst], per_class[worst].item()],
            "classes_below_target": (per_class[present] < cal.level).double().mean().item(),
        },
        sizes,
        [v if present[i] else None for i, v in enumerate(per_class.tolist())],
    )


def corruption_coverage(
    ctx: AuditContext, cfg: ConformalConfig, cals: dict[tuple[str, float], Calibration], u_test: torch.Tensor
) -> tuple[dict[str, Any], list[str]]:
    """Coverage and mean set size of every score and level on a class-stratified test subset, clean and under
    each corruption at ``cfg.severity`` (the images keep their test draws of u, so a drop is the shift's alone);
    and the corruptions left out (saturate on grey images)."""
    names = parse_names(cfg.corruptions)
    images = ctx.test.images
    left_out = ["saturate"] if images.shape[1] == 1 and "saturate" in names else []  # the identity on grey images
    names = [c for c in names if c not in left_out]
    idx = subset(ctx.test.targets, cfg.n, ctx.seed)
    chosen, y, u = images[idx], ctx.targets("test")[idx], u_test[idx]
    scale = min(images.shape[-2:]) / REFERENCE_SIZE  # as the corruption check: lengths of a 224-px image, scaled

    def cells(logits: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
        ranks = logit_ranks(logits, y, next(iter(cals.values())).temperature)
        out: dict[str, dict[str, dict[str, float]]] = {s: {} for s in SCORES}
        for (s, level), cal in cals.items():
            sizes = cal.sizes(logits, u)
            out[s][f"{level:g}"] = {
                "coverage": (ranks < sizes).double().mean().item(),
                "mean_set_size": sizes.double().mean().item(),
            }
        return out

    corrupted = {}
    for c in names:
        logits, _ = predict_corrupted(ctx, chosen, c, cfg.severity, scale, ctx.batch(cfg.batch_size))
        corrupted[c] = cells(logits)
    return {
        "severity": cfg.severity,
        "n": len(idx),
        "of": len(images),
        "corruptions": names,
        "clean": cells(ctx.logits("test")[idx]),
        "corrupted": corrupted,
    }, left_out


def worst_corruption(shift: dict[str, Any], score: str, level: float) -> dict[str, Any] | None:
    """The corruption with the largest coverage drop of ``score`` at ``level``: its name, coverage and drop."""
    if not shift["corruptions"]:
        return None
    clean = shift["clean"][score][f"{level:g}"]["coverage"]
    coverage = {c: shift["corrupted"][c][score][f"{level:g}"]["coverage"] for c in shift["corruptions"]}
    worst = min(coverage, key=lambda c: coverage[c])  # the first of equals
    return {
        "corruption": worst,
        "score": score,
        "level": level,
        "coverage": coverage[worst],
        "drop": clean - coverage[worst],
    }


def tables(
    cfg: ConformalConfig,
    results: dict,
    per_class: dict,
    best: str,
    ref: float,
    classes: list[str],
    y: torch.Tensor,
    shift: dict[str, Any] | None,
) -> dict[str, Any]:
    """Every score and level; coverage by set size; coverage by class (the chosen score); and, with corruptions,
    the chosen score's coverage under each."""
    rows, strata = [], []
    for s in SCORES:
        for lv in cfg.levels:
            r = results[s, lv]
            low, high = r["coverage_ci95"]
            cells = [r["coverage"], low, high, r["mean_set_size"], r["median_set_size"], r["empty_sets"]]
            rows.append([NAMES[s], lv, *cells, *r["worst_class"], r["threshold"], r["k_reg"], r["lambda"]])
            strata += [[NAMES[s], lv, b["sizes"], b["count"], b["coverage"]] for b in r["by_set_size"]]
    columns = ["score", "target", "coverage", "coverage low", "coverage high", "mean size", "median size"]
    columns += ["empty sets", "worst class", "worst class coverage", "threshold", "k_reg", "lambda"]
    support = torch.bincount(y, minlength=len(classes)).tolist()
    by_class = [[c, support[i], *(per_class[best, lv][i] for lv in cfg.levels)] for i, c in enumerate(classes)]
    out = {
        "by_score": table(columns, rows),
        "by_set_size": table(["score", "target", "set sizes", "count", "coverage"], strata),
        "by_class": table(["class", "support", *(f"coverage at {lv:g}" for lv in cfg.levels)], by_class),
    }
    if shift is not None:
        clean = shift["clean"][best]

        def row(name: str, cell: dict) -> list:
            drop = clean[f"{ref:g}"]["coverage"] - cell[f"{ref:g}"]["coverage"]
            return [name, *(cell[f"{lv:g}"]["coverage"] for lv in cfg.levels), drop, cell[f"{ref:g}"]["mean_set_size"]]

        cols = ["corruption", *(f"coverage at {lv:g}" for lv in cfg.levels), f"drop at {ref:g}"]
        cols.append(f"mean size at {ref:g}")
        corrupted = [row(c, shift["corrupted"][c][best]) for c in shift["corruptions"]]
        out["under_corruption"] = table(cols, [row("clean (same images)", clean), *corrupted])
    return out


def curves(
    ctx: AuditContext,
    cfg: ConformalConfig,
    results: dict,
    sizes: dict,
    best: str,
    ref: float,
    shift: dict[str, Any] | None,
) -> dict[str, Any]:
    keep = subset_indices(len(sizes[best, ref]), HISTOGRAM_SIZES, ctx.seed)
    out: dict[str, Any] = {
        "coverage_vs_target": {
            "target": cfg.levels,
            **{s: [results[s, lv]["coverage"] for lv in cfg.levels] for s in SCORES},
        },
        "set_size": {"score": [NAMES[s] for s in SCORES], "mean": [results[s, ref]["mean_set_size"] for s in SCORES]},
        "set_sizes": sizes[best, ref][keep].tolist(),
    }
    if shift is not None and shift["corruptions"]:
        clean = shift["clean"][best][f"{ref:g}"]["coverage"]
        cov = [shift["corrupted"][c][best][f"{ref:g}"]["coverage"] for c in shift["corruptions"]]
        out["corruption_coverage"] = {"corruption": ["clean", *shift["corruptions"]], "coverage": [clean, *cov]}
    return out


def figures(best: str, ref: float, shift: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = [
        figure(
            "Test coverage against the target coverage per score (on the target line the guarantee is exact)",
            "line",
            "coverage_vs_target",
            x="target",
            series={"target": "target", **NAMES},
            xlabel="target coverage",
            ylabel="test coverage",
        ),
        figure(
            f"Mean prediction-set size at {ref:.0%} coverage per score",
            "bars",
            "set_size",
            labels="score",
            values="mean",
            xlabel="mean set size (classes)",
        ),
        figure(
            f"Prediction-set sizes at {ref:.0%} coverage ({NAMES[best]})",
            "histogram",
            "set_sizes",
            bins=30,
            xlabel="set size (classes)",
            ylabel="test images",
        ),
    ]
    if shift is not None and shift["corruptions"]:
        out.append(
            figure(
                f"Coverage at {ref:.0%} ({NAMES[best]}) on clean images and under each corruption at severity "
                f"{shift['severity']} (the target is {ref:.0%})",
                "bars",
                "corruption_coverage",
                labels="corruption",
                values="coverage",
                xlabel="test coverage",
                xlim=[0, 1],
            )
        )
    return out


def notes(
    cfg: ConformalConfig,
    m: dict[str, Any],
    results: dict,
    best: str,
    ref: float,
    shift: dict[str, Any] | None,
    left_out: list[str],
) -> list[str]:
    out = [
        f"split conformal on the validation split only: its {m['n_validation']} images were split at random (audit "
        f"seed) into a tuning part of {m['n_tuning']} and a calibration part of {m['n_calibration']}; the tuning part "
        f"fitted the temperature by NLL (T = {m['temperature']:.3g}) and, per level, RAPS's k_reg (the higher "
        "(1 - alpha) quantile of the true labels' ranks) and lambda (of 0.001, 0.01, 0.1, 0.2, 0.5, the smallest mean "
        "set, or its expectation over u, when calibrated and measured on the tuning part), as Angelopoulos et al. 2021 "
        "do; the threshold is the "
        "ceil((n + 1)(1 - alpha))-th smallest score of the calibration part, so the coverage guarantee holds exactly "
        f"over images exchangeable with the validation split; the {m['n_test']} test images only measure",
        (
            "randomized APS and RAPS sets (u ~ U(0, 1) per image, seeded by the audit seed): expected coverage lies "
            "between the target and the target + 1/(n + 1), and a set may be empty; THR is deterministic"
            if cfg.randomized
            else "deterministic sets: APS and RAPS keep the label that crosses the threshold, so a set is never "
            "empty and coverage may exceed the target"
        ),
        f"{NAMES[best]} gives the smallest mean set at {ref:.0%} ({results[best, ref]['mean_set_size']:.3g} "
        f"classes); pupil predict --conformal uses it unless told otherwise",
    ]
    if infinite := sorted({lv for (s, lv), r in results.items() if r["infinite"]}):
        levels = ", ".join(f"{lv:g}" for lv in infinite)
        out.append(
            f"at level(s) {levels} the calibration part ({m['n_calibration']} images) is too small: "
            f"ceil((n + 1)(1 - alpha)) exceeds n, so every set holds every class (hold out more validation images)"
        )
    if left_out:
        out.append("saturate was left out of the corruptions: it is the identity on grey images")
    if shift is not None and (worst := worst_corruption(shift, best, ref)):
        out.append(
            f"coverage under corruption (severity {shift['severity']}, {shift['n']} class-stratified test images, "
            f"the same draws of u): corrupted images are not exchangeable with the validation split, so the "
            f"guarantee no longer holds; the largest drop at {ref:.0%} ({NAMES[best]}) is {worst['corruption']}'s "
            f"(down {100 * worst['drop']:.1f} points, to {worst['coverage']:.1%})"
        )
    return out
