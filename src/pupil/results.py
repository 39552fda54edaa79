"""The results.json contract: its JSON Schema (``results.schema.json`` beside this file), validation and reading.

The audit writes results.json and the report reads it; both import this module, so neither imports the other.

Version 2.x: one section per check, each with ``title``, ``config``, ``runtime_s``, ``headline``
(label, value, direction, unit, optional 95% interval), ``summary``, ``metrics``, ``tables`` (columns + rows),
``curves`` (the raw data plots are drawn from), ``figures`` (2.1: what to draw from which curve, by kind) and
``notes``. 2.2 adds ``gate``, the verdict of release gates (``pupil.report.gates``), beside ``checks``.
``summary`` is the flat part other code reads:
a handful of the check's figures under stable names (``SUMMARY_KEYS``), copied from its metrics. Code outside
the audit reads figures from ``summary`` only (``CONSUMED`` lists what each reader takes, ``consumed`` gives
it); ``metrics`` may change shape between minor versions. Version 1.x had no summary and is refused on reading.

Example images in ``curves`` (corruption, adversarial, explain, fairness) are PNG data URIs made by
``png_data_uri``: grey (H, W) or RGB (H, W, 3) uint8 once decoded; a saliency map is a grey 0..255 PNG.
"""

from __future__ import annotations

import base64
import io
import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pupil.errors import PupilError
from pupil.io import read_json

if TYPE_CHECKING:
    import torch

SCHEMA_PATH = Path(__file__).with_name("results.schema.json")
SCHEMA_VERSION = "2.2"  # the major part must match the schema's schema_version pattern
PNG_URI_PREFIX = "data:image/png;base64,"
MESSAGE_CHARS = 200  # jsonschema quotes the whole offending value; a long one is cut to keep the error one line

# The keys each check's summary must have (a check not listed needs none). Units are in the name where a figure
# has one; fractions (accuracies, gaps, ECE) are in [0, 1]; ``*_ci95`` is a [low, high] 95% interval.
SUMMARY_KEYS: dict[str, tuple[str, ...]] = {
    "accuracy": ("top1", "top1_ci95", "top5", "macro_f1", "macro_f1_ci95", "worst_classes"),
    "calibration": ("ece", "ece_after_temperature", "temperature"),
    "efficiency": ("params", "flops", "latency_ms_p50", "throughput_img_s"),
    "energy": ("energy_j_per_1000_images", "energy_kwh", "emissions_kg_co2eq", "images"),
    "corruption": ("mean_corrupted_top1", "clean_top1", "mce", "relative_mce"),
    "adversarial": ("robust_top1", "eps", "norm", "clean_top1"),
    "certify": ("certified_top1", "radius", "sigma"),
    "ood": ("mean_auroc", "mean_fpr95", "score", "best_score"),
    "uncertainty": ("deferral_threshold", "target_accuracy", "deferred", "aurc"),
    "conformal": (
        "score",
        "coverage_90",
        "coverage_95",
        "coverage_99",
        "set_size_90",
        "set_size_95",
        "set_size_99",
        "temperature",
        "randomized",
    ),
    "explain": ("insertion_deletion_gap", "method"),
    "fairness": ("accuracy_gap", "accuracy_gap_ci95", "attribute", "attribute_kind"),
    "retrieval": (
        "map_at_r",
        "recall_at_1",
        "recall_at_5",
        "recall_at_10",
        "ann_recall_at_10",
        "qps",
        "latency_ms_p50",
        "latency_ms_p99",
        "corrupted_recall_at_1",
        "embedding",
        "dim",
    ),
}

# What each reader of results.json takes from which check's summary. The readers get their figures through
# ``consumed``, which hands over these keys only, so a reader cannot use a key that is not listed here; the
# contract test runs every check and looks for every key listed.
CONSUMED: dict[str, dict[str, tuple[str, ...]]] = {
    "compare": {
        "accuracy": ("top1", "top1_ci95", "macro_f1"),
        "calibration": ("ece",),
        "efficiency": ("params", "flops", "latency_ms_p50", "throughput_img_s"),
        "energy": ("energy_j_per_1000_images",),
    },
    "model_card": {
        "accuracy": ("macro_f1", "macro_f1_ci95", "worst_classes"),
        "calibration": ("ece", "ece_after_temperature", "temperature"),
        "fairness": ("accuracy_gap", "attribute", "attribute_kind"),
    },
    "predict": {
        "uncertainty": ("deferral_threshold", "target_accuracy"),
        "conformal": ("score", "temperature", "randomized"),
    },
    "changes": {
        "accuracy": ("top1",),
        "calibration": ("ece", "ece_after_temperature", "temperature"),
        "corruption": ("mean_corrupted_top1",),
        "adversarial": ("robust_top1", "eps", "norm"),
        "ood": ("mean_auroc", "score"),
        "uncertainty": ("deferred", "target_accuracy"),
        "fairness": ("accuracy_gap", "attribute"),
        "efficiency": ("params", "latency_ms_p50", "throughput_img_s"),
        "energy": ("energy_j_per_1000_images",),
    },
    "serve": {
        "calibration": ("temperature",),
        "uncertainty": ("deferral_threshold", "target_accuracy"),
        "ood": ("score", "mean_fpr95"),
        "conformal": ("score", "temperature", "randomized"),
    },
}


@cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(results: dict[str, Any], source: str = "results") -> None:
    """Raise PupilError naming the first place where ``results`` breaks the schema or a summary lacks a key."""
    problem = _problem(results, schema())
    if problem is None:  # the schema holds, so every section has a summary object
        problem = next((f"checks/{n}/{p}" for n, s in results["checks"].items() if (p := _missing_keys(n, s))), None)
    if problem:
        raise PupilError(f"{source} does not follow the results schema at {problem}")


def section_problem(section: Any, name: str | None = None) -> str | None:
    """Where and how one check's section breaks the schema ("headline: 'value' is a required property"), or None.
    With the check's ``name``, its summary must also have the keys ``SUMMARY_KEYS`` lists."""
    full = schema()
    problem = _problem(section, {"$schema": full["$schema"], **full["$defs"]["check"], "$defs": full["$defs"]})
    return problem or (_missing_keys(name, section) if name else None)


def consumed(results: dict[str, Any], reader: str, check: str) -> dict[str, Any] | None:
    """The summary figures of ``check`` that ``reader`` (a key of ``CONSUMED``) uses, or None when the check did
    not run. Only the keys ``CONSUMED[reader][check]`` lists are handed over."""
    section = results["checks"].get(check)
    if section is None:
        return None
    return {k: section["summary"][k] for k in CONSUMED[reader][check]}


def _missing_keys(name: str, section: dict[str, Any]) -> str | None:
    if missing := [k for k in SUMMARY_KEYS.get(name, ()) if k not in section["summary"]]:
        return f"summary: {', '.join(map(repr, missing))} {'is a' if len(missing) == 1 else 'are'} required"
    return None


def _problem(instance: Any, against: dict[str, Any]) -> str | None:
    import jsonschema

    try:
        jsonschema.validate(instance, against)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        message = e.message if len(e.message) <= MESSAGE_CHARS else e.message[: MESSAGE_CHARS - 1] + "…"
        return f"{where}: {message}"
    return None


def other_version(results: Any) -> str | None:
    """The words "an older" or "a newer" when ``results`` was written under another major schema version than
    ``SCHEMA_VERSION``, else None (also when it names none: validation reports that)."""
    version = results.get("schema_version") if isinstance(results, dict) else None
    major, ours = str(version).split(".")[0], int(SCHEMA_VERSION.split(".")[0])
    if not isinstance(version, str) or not major.isdigit() or int(major) == ours:
        return None
    return "an older" if int(major) < ours else "a newer"


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results.json (or the one inside a run directory); one written under another major
    schema version is refused in one line that says what to do."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    results = read_json(path, f"{path} does not exist: run `pupil audit` on the run first")
    if age := other_version(results):
        todo = f"run pupil audit {path.parent} again" if age == "an older" else "upgrade pupil to read it"
        raise PupilError(f"{path} was written by {age} pupil (schema {results['schema_version']}); {todo}")
    validate(results, str(path))
    return results


# Per-image figures: what a paired comparison between two audits needs (each image's logits, whether each
# corrupted copy was classified correctly, each image's OOD score...). They are too large for results.json, so a
# check returns them under ``per_image`` and the runner writes them, one safetensors file per check, beside it.
PER_IMAGE_DIR = Path("audit") / "per_image"
PER_IMAGE_IDENTITY = ("split", "n", "budget", "seed", "precision", "tta")  # with audit.data.fingerprint


def per_image_identity(audit: dict[str, Any]) -> dict[str, Any]:
    """The settings two audits' per-image figures must share to be paired: the images (fingerprint, split, n)
    and what drew the subsets (budget, seed), and how the model computed (precision, TTA)."""
    fingerprint = (audit.get("data") or {}).get("fingerprint")
    return {**{k: audit.get(k) for k in PER_IMAGE_IDENTITY}, "fingerprint": fingerprint}


def write_per_image(run_dir: str | Path, check: str, tensors: dict[str, torch.Tensor], audit: dict[str, Any]) -> Path:
    """Write ``check``'s per-image tensors to ``<run>/audit/per_image/<check>.safetensors`` (atomically), with the
    audit's identity in the file's metadata so that a stale file is never paired with a newer results.json."""
    from safetensors.torch import save_file

    from pupil.io import atomic_write

    meta = {"check": check, "identity": json.dumps(per_image_identity(audit), sort_keys=True)}
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(Path(run_dir) / PER_IMAGE_DIR / f"{check}.safetensors", lambda t: save_file(data, t, meta))


def read_per_image(run_dir: str | Path, check: str, audit: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """``check``'s per-image tensors written by the audit that ``audit`` (results.json's ``audit`` object)
    describes; None when there is no such file or it belongs to another audit (other images, seed or budget)."""
    from safetensors import SafetensorError, safe_open

    path = Path(run_dir) / PER_IMAGE_DIR / f"{check}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("identity") != json.dumps(per_image_identity(audit), sort_keys=True):
                return None
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise PupilError(f"corrupt {path}: {e}; `pupil audit {Path(run_dir)} --checks {check}` rewrites it") from None


def area_downscale(img: torch.Tensor, max_side: int) -> torch.Tensor:
    """A (..., H, W) tensor as float32, area-averaged so that neither side exceeds ``max_side`` (aspect kept, each
    side rounded, at least 1); unchanged but for the dtype when it already fits."""
    import torch.nn.functional as F

    h, w = img.shape[-2:]
    x = img.float()
    if max(h, w) <= max_side:
        return x
    size = (max(1, round(h * max_side / max(h, w))), max(1, round(w * max_side / max(h, w))))
    return F.interpolate(x.reshape(1, -1, h, w), size=size, mode="area").reshape(*x.shape[:-2], *size)


def png_data_uri(img: torch.Tensor, max_side: int | None = None) -> str:
    """A (C, H, W) or (H, W) image, uint8 or float in [0, 1], as "data:image/png;base64,..." (grey for one
    channel, RGB for three), area-downscaled first so that neither side exceeds ``max_side`` when given.

    uint8 is averaged in 0..255 and rounded; float is averaged, then clamped to [0, 1] and rounded to 0..255.
    """
    import numpy as np
    import torch
    from PIL import Image

    img = img.detach().cpu()
    if max_side is not None:
        small = area_downscale(img, max_side)
        img = small.round().to(torch.uint8) if img.dtype == torch.uint8 else small
    if img.dtype != torch.uint8:
        img = img.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    a = img.numpy()
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)  # (C, H, W) -> (H, W) or (H, W, C)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, "PNG", optimize=True)
    return PNG_URI_PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")
