"""Corruption robustness: accuracy and calibration under the ImageNet-C corruptions (15 common, 4 extra) at
severities 1-5, and against a baseline run the corruption error CE, mCE and relative mCE of Hendrycks &
Dietterich (2019):

    CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}
    relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)

with mCE and relative mCE their means over the corruptions. The corruptions are the batched ones of
``pupil.data.corruptions``, applied in pixel space to the test images before the wrapped model sees them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
    table,
    validate_settings,
)
from pupil.data import stratified_split
from pupil.data.corruptions import (
    COMMON,
    CORRUPTIONS,
    GROUPS,
    REFERENCE_SIZE,
    SEVERITIES,
    corrupt,
    corruption_seed,
    parse_names,
)
from pupil.errors import PupilError
from pupil.io import read_json
from pupil.metrics import ece
from pupil.results import png_data_uri
from pupil.runtime import autocast

EXAMPLE_SIDE = 64  # example images in results.json are at most this many pixels on a side


@dataclass
class CorruptionConfig:
    corruptions: list[str] = field(default_factory=lambda: ["all"])
    """Corruption names, or the groups all (19), common (the 15 of ImageNet-C) or extra (the 4 held-out ones)."""
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES))
    """Severities, each 1 (mild) to 5 (severe)."""
    n: int = 0
    """Test images to corrupt: 0 = the whole test split, otherwise a class-stratified subset drawn with the seed."""
    baseline: str = ""
    """Run directory whose results.json holds a corruption section audited the same way; enables CE and mCE."""
    batch_size: int = 500
    """Images corrupted and predicted at once."""
    scale: float = 0.0
    """Multiplier for ImageNet-C's pixel lengths (blur radii, shifts); 0 = image side / 224, 1 = as imagecorruptions."""

    def __post_init__(self):
        validate_settings(
            self,
            "corruption",
            corruptions=names_from([*GROUPS, *CORRUPTIONS], "corruption"),
            severities=each(Allowed("{type} from 1 to 5", lambda v: v in SEVERITIES), "severity"),
            n=at_least(0),
            batch_size=at_least(1),
            scale=at_least(0),
        )


@CHECKS.register("corruption")
class Corruption(Check):
    name, title, Config = "corruption", "Corruption robustness", CorruptionConfig
    shortcuts = {"baseline": "baseline"}
    quick = {"n": 500}

    def run(self, ctx: AuditContext, cfg: CorruptionConfig) -> dict:
        names, sevs = parse_names(cfg.corruptions), sorted(set(cfg.severities))  # groups expanded
        notes: list[str] = []
        images = ctx.test.images
        if images.shape[1] == 1 and "saturate" in names and "saturate" not in cfg.corruptions:
            names.remove("saturate")
            notes.append("saturate was left out: it is the identity on grey images (a grey pixel has no saturation)")
        if not names:
            raise PupilError("no corruption left to run on grey images (saturate is the identity there)")
        scale = cfg.scale or min(images.shape[-2:]) / REFERENCE_SIZE
        idx = subset(ctx.test.targets, cfg.n, ctx.seed)
        chosen, y = images[idx], ctx.targets("test")[idx]
        notes.append(
            f"scored {len(idx)} of {len(images)} test images"
            + (f" (a class-stratified subset drawn with seed {ctx.seed})" if len(idx) < len(images) else "")
            + "; clean accuracy is on the same images"
        )
        notes.append(
            f"ImageNet-C pixel lengths scaled by {scale:.3g}"
            + (" (image side / 224)" if not cfg.scale else "")
            + "; frost uses procedural textures in place of the reference's photographs"
        )
        example_sev = 3 if 3 in sevs else sevs[len(sevs) // 2]
        acc: dict[str, list[float]] = {c: [] for c in names}
        cal: dict[str, list[float]] = {c: [] for c in names}
        examples: dict[str, str] = {}
        correct = torch.empty(len(names), len(sevs), len(idx), dtype=torch.bool)  # (C, S, n), for per_image
        for i, c in enumerate(names):
            for j, s in enumerate(sevs):
                logits, first = predict_corrupted(ctx, chosen, c, s, scale, ctx.batch(cfg.batch_size))
                correct[i, j] = logits.argmax(1) == y
                a, e = accuracy_ece(logits, y)
                acc[c].append(a)
                cal[c].append(e)
                if s == example_sev:
                    examples[c] = png_data_uri(first, EXAMPLE_SIDE)
        clean_acc, clean_ece = accuracy_ece(ctx.logits("test")[idx], y)
        cells = [a for c in names for a in acc[c]]
        metrics: dict[str, Any] = {
            "n": len(idx),
            "of": len(images),
            "subset_sha1": hashlib.sha1(idx.numpy().tobytes()).hexdigest()[:16],
            "dataset": ctx.run.info["data"]["dataset"],
            "corruptions": names,
            "severities": sevs,
            "scale": scale,
            "clean_accuracy": clean_acc,
            "clean_ece": clean_ece,
            "mean_accuracy": sum(cells) / len(cells),
            "mean_error": 1 - sum(cells) / len(cells),
            "mean_ece": sum(e for c in names for e in cal[c]) / len(cells),
            "accuracy": acc,
            "ece": cal,
            "mean_error_by_corruption": {c: 1 - sum(acc[c]) / len(sevs) for c in names},
        }
        if cfg.baseline:
            metrics.update(baseline_errors(metrics, cfg.baseline, notes))
        examples_curve = {
            "severity": example_sev,
            "label": ctx.test.classes[int(y[0])],
            "clean": png_data_uri(chosen[0], EXAMPLE_SIDE),
            "corrupted": examples,
        }
        return {
            "headline": headline("mean corruption accuracy", metrics["mean_accuracy"], True, "fraction"),
            "summary": {
                "mean_corrupted_top1": metrics["mean_accuracy"],
                "clean_top1": clean_acc,  # on the same images
                "mce": metrics.get("mce"),  # None without a baseline run
                "relative_mce": metrics.get("relative_mce"),
            },
            "metrics": metrics,
            # For paired comparisons (pupil.report.paired): which test images were scored and, per corruption (in
            # the order of metrics["corruptions"]) and severity (in the order of ``severities``), which of them the
            # model classified correctly.
            "per_image": {"index": idx.long(), "correct": correct, "severities": torch.tensor(sevs)},
            "tables": tables(metrics),
            "figures": [
                figure(
                    "Accuracy against severity, one line per corruption (clean accuracy dashed)",
                    "drawer",
                    "accuracy_by_severity",
                    drawer="corruption_lines",
                ),
                figure("One test image under every corruption", "drawer", "examples", drawer="corruption_examples"),
            ],
            "curves": {
                "accuracy_by_severity": {"severities": sevs, "clean": clean_acc, "series": acc},
                "examples": examples_curve,
            },
            "notes": notes,
        }


def tables(m: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, error and ECE per corruption and severity; per corruption its mean, with CE where a baseline is."""
    names, sevs = m["corruptions"], m["severities"]
    rows = [
        [c, s, m["accuracy"][c][i], 1 - m["accuracy"][c][i], m["ece"][c][i]] for c in names for i, s in enumerate(sevs)
    ]
    cols = ["corruption", "mean accuracy", "mean error"]
    summary = [[c, 1 - m["mean_error_by_corruption"][c], m["mean_error_by_corruption"][c]] for c in names]
    if "ce" in m:
        cols += ["CE", "relative CE"]
        summary = [[*r, m["ce"][r[0]], m["relative_ce"][r[0]]] for r in summary]
    return {
        "by_severity": table(["corruption", "severity", "accuracy", "error", "ECE"], rows),
        "by_corruption": table(cols, summary),
    }


def subset(targets: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of the images to score, sorted: all of them, or a class-stratified subset of ``n``."""
    if not n or n >= len(targets):
        return torch.arange(len(targets))
    return stratified_split(targets, n, seed)[1]


@torch.inference_mode()
def predict_corrupted(
    ctx: AuditContext, images: torch.Tensor, name: str, severity: int, scale: float, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) of the model on the corrupted images, and the first corrupted image as uint8 (C, H, W).

    One generator per (corruption, severity), seeded from the audit seed, so each cell repeats on its own."""

    g = torch.Generator(device=ctx.device).manual_seed(corruption_seed(ctx.seed, name, severity))
    model = ctx.model.eval()
    out, first = [], None
    for chunk in images.split(batch_size):
        x = corrupt(chunk.to(ctx.device).float().div_(255), name, severity, g, scale)
        if first is None:
            first = x[0].mul(255).round().to(torch.uint8).cpu()
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(ctx.device, ctx.dtype):
            out.append(model(x).float().cpu())
    logits = torch.cat(out)
    if not torch.isfinite(logits).all():
        raise PupilError(f"the model produced non-finite logits on {name} severity {severity}")
    return logits, first


def accuracy_ece(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy and 15-bin ECE."""
    conf, pred = logits.double().softmax(1).max(1)
    correct = pred == y
    return correct.double().mean().item(), ece(conf, correct)


def baseline_errors(metrics: dict[str, Any], run_dir: str, notes: list[str]) -> dict[str, Any]:
    """CE, relative CE, their means, and the baseline's identity, from the baseline run's results.json."""
    path = Path(run_dir) / "results.json"
    results = read_json(path, f"baseline {run_dir} has no results.json: audit it with the corruption check first")
    section = results.get("checks", {}).get("corruption")
    if not section:
        raise PupilError(f"baseline {run_dir} has no corruption section: audit it with the corruption check first")
    base = section["metrics"]
    for key in ("dataset", "corruptions", "severities", "n", "of", "subset_sha1", "scale"):
        if base.get(key) != metrics[key]:
            raise PupilError(
                f"baseline {run_dir} was audited with {key}={base.get(key)!r}, this audit uses {metrics[key]!r}; "
                "CE needs the same corruptions, severities, subset and scale"
            )
    ce: dict[str, float | None] = {}
    rel: dict[str, float | None] = {}
    for c in metrics["corruptions"]:
        err = [1 - a for a in metrics["accuracy"][c]]
        base_err = [1 - a for a in base["accuracy"][c]]
        denom = sum(base_err)
        ce[c] = sum(err) / denom if denom > 0 else None
        rel_denom = sum(e - (1 - base["clean_accuracy"]) for e in base_err)
        rel_num = sum(e - (1 - metrics["clean_accuracy"]) for e in err)
        rel[c] = rel_num / rel_denom if rel_denom > 0 else None
    undefined = sorted({c for c in ce if ce[c] is None} | {c for c in rel if rel[c] is None})
    if undefined:
        notes.append(
            f"CE or relative CE undefined for {', '.join(undefined)}: the baseline's error there does not exceed "
            "zero (CE) or its clean error (relative CE); left out of the means"
        )
    out: dict[str, Any] = {
        "baseline": {
            "dir": str(run_dir),
            "name": results.get("run", {}).get("name"),
            "model": results.get("run", {}).get("model", {}).get("name"),
            "clean_accuracy": base["clean_accuracy"],
            "mean_accuracy": base["mean_accuracy"],
        },
        "ce": ce,
        "relative_ce": rel,
        "mce": _mean(ce.values()),
        "relative_mce": _mean(rel.values()),
    }
    if set(COMMON) <= set(ce):
        out["mce_common"] = _mean(ce[c] for c in COMMON)
        out["relative_mce_common"] = _mean(rel[c] for c in COMMON)
    notes.append(
        f"CE and mCE are relative to baseline run {out['baseline']['name']} ({out['baseline']['model']}, {run_dir}), "
        "audited on the same images, corruptions and severities"
        + ("; mce_common averages the 15 ImageNet-C corruptions as the paper does" if "mce_common" in out else "")
    )
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
