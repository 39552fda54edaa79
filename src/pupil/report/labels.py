"""What each figure on the report card is called, in which unit it is shown, and what it means.

results.json keeps figures under short machine keys (``before.ece``, ``latency_ms.p50``, ``sets.mnist-5k.msp.auroc``);
the card shows them to people who did not write the audit. Every metric of every check has a row in ``METRICS``:
a pattern of its key path (``*`` stands for one name the audit chose, such as an OOD set or an explanation method;
``{0}``, ``{1}`` put those names into the label), a label, a unit and one line on what it means and which
direction is good. A key that matches no pattern gets a humanised fallback (``fallbacks`` lists them; a test
keeps the list empty for the checks pupil ships).

``show(value, unit)`` picks the scale by size: energy in mJ, J, Wh or kWh; time in µs, ms or s; percentages with
the digits that matter (92.5%, 0.8%, 0.03%); counts with thousands separators; parameters and FLOPs with k, M, G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DASH = "—"  # a figure that was not measured (None in results.json)


# --- units ----------------------------------------------------------------------------------------------------------


def _sig(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, never in scientific notation for the ranges the card shows."""
    if x == 0:
        return "0"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    s = f"{x:.{decimals}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def _ladder(x: float, steps: tuple[tuple[float, str], ...], digits: int = 3) -> str:
    """``x`` in the largest unit of ``steps`` ((size of the unit, name), ascending) that it reaches."""
    factor, name = steps[0]
    for f, n in steps:
        if abs(x) >= f:
            factor, name = f, n
    return f"{_sig(x / factor, digits)} {name}".rstrip()


def percent(v: float) -> str:
    """A fraction as a percentage with the digits that matter: 92.5%, 8.8%, 0.8%, 0.03%, 100%."""
    p = v * 100
    if p == 0 or p == 100:
        return f"{p:.0f}%"
    if abs(p) >= 1:
        decimals = 1
        while abs(float(f"{p:.{decimals}f}")) == 100 and decimals < 6:  # 99.96% must not read as 100%
            decimals += 1
        return f"{p:.{decimals}f}%"
    s = f"{p:.2g}"
    return "<0.001%" if "e" in s else s + "%"


def level(v: float) -> str:
    """A target level such as 0.95 as 95% (as many digits as it has)."""
    return f"{v * 100:.6g}%"


TIME_MS = ((1e-3, "µs"), (1.0, "ms"), (1e3, "s"))
ENERGY_J = ((1e-3, "mJ"), (1.0, "J"), (3600.0, "Wh"), (3.6e6, "kWh"))
MASS_KG = ((1e-9, "µg"), (1e-6, "mg"), (1e-3, "g"), (1.0, "kg"), (1e3, "t"))
BYTES = ((1.0, "B"), (1e3, "kB"), (1e6, "MB"), (1e9, "GB"), (1e12, "TB"))
SI = ((1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T"))


def _scalar(v: Any, unit: str) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not isinstance(v, int | float):
        return term(v) if unit == "name" else str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    match unit:
        case "fraction":
            return percent(v)
        case "points":  # a difference of two fractions
            return f"{_sig(v * 100, 2) if abs(v) < 0.01 else f'{v * 100:.1f}'} points"
        case "ms":
            return _ladder(v, TIME_MS) if v else "0 ms"
        case "s":
            return _ladder(v * 1e3, TIME_MS) if v else "0 s"
        case "J":
            return _ladder(v, ENERGY_J) if v else "0 J"
        case "kWh":
            return _ladder(v * 3.6e6, ENERGY_J) if v else "0 J"
        case "kg":
            return _ladder(v, MASS_KG) if v else "0 g"
        case "W":
            return f"{_sig(v)} W"
        case "bytes":
            return _ladder(v, BYTES)
        case "si":
            return _ladder(v, SI) if abs(v) >= 1e3 else f"{v:,.0f}"
        case "count":
            return f"{round(v):,}"
        case "img/s":
            return f"{_sig(v) if v < 100 else f'{v:,.0f}'} images/s"
        case "nats":
            return f"{_sig(v)} nats"
        case "eps":
            return f"{v:g}"
        case "radius":
            return _sig(v)
        case "level":
            return level(v)
        case "labels" | "classes":
            return f"{v:.2f}" if v < 10 else f"{v:.1f}"
        case _:
            if isinstance(v, int):
                return f"{v:,}"
            return _sig(v)


def show(value: Any, unit: str = "") -> str:
    """``value`` as the card shows it in ``unit``: one of ``fraction``, ``points``, ``ms``, ``s``, ``J``, ``kWh``,
    ``kg``, ``W``, ``bytes``, ``si``, ``count``, ``img/s``, ``nats``, ``eps``, ``radius``, ``labels``, ``shape``,
    ``text`` or a plain number (any other unit, "AUC" for instance). A list shows each item; ``interval`` shows
    a [low, high] pair in the unit after the colon (``interval:fraction``)."""
    if unit.startswith("interval:") and isinstance(value, list | tuple) and len(value) == 2:
        low, high = (show(v, unit.split(":", 1)[1]) for v in value)
        if " " in low and low.split(" ", 1)[1] == high.split(" ", 1)[1]:  # "4.0 – 15.0 points"
            low = low.split(" ", 1)[0]
        return f"{low} – {high}"
    if unit.startswith("pair:") and isinstance(value, list | tuple) and len(value) == 2:  # [name, figure]
        return f"{value[0]} ({show(value[1], unit.split(':', 1)[1])})"
    if unit == "shape" and isinstance(value, list | tuple):
        return "×".join(str(v) for v in value)
    if isinstance(value, list | tuple):
        return ", ".join(show(v, unit.removeprefix("interval:")) for v in value) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {show(v, unit)}" for k, v in value.items())
    return _scalar(value, unit)


# --- names the audit chose ------------------------------------------------------------------------------------------

# Method, score and corruption names as a reader knows them. Class, group and data-set names are the user's and
# are shown as they are.
NAMES = {
    "msp": "MSP",
    "max_logit": "max logit",
    "energy": "energy",
    "odin": "ODIN",
    "mahalanobis": "Mahalanobis",
    "knn": "kNN",
    "vim": "ViM",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "integrated_gradients": "Integrated Gradients",
    "occlusion": "Occlusion",
    "lime": "LIME",
    "kernel_shap": "KernelSHAP",
    "softmax": "softmax",
    "mc_dropout": "MC dropout",
    "tta": "test-time augmentation",
    "ensemble": "ensemble",
    "fgsm": "FGSM",
    "pgd": "PGD",
    "square": "Square Attack",
    "linf": "L∞",
    "l2": "L2",
    "aps": "APS",
    "raps": "RAPS",
    "lac": "LAC",
    "thr": "THR",
    "inference": "inference",
    "training": "training",
    "macro_f1": "macro-F1",
    "ece": "ECE",
    "accuracy": "accuracy",
    "equalized_odds": "equalised odds",
    "jpeg_compression": "JPEG compression",
    "gaussian_noise": "Gaussian noise",
    "gaussian_blur": "Gaussian blur",
}


def term(name: Any) -> str:
    """A method, score or corruption name as a reader knows it (``integrated_gradients`` -> Integrated
    Gradients, ``motion_blur`` -> motion blur); ``recall/<class>`` -> recall of <class>; anything else as it is."""
    s = str(name)
    if s in NAMES:
        return NAMES[s]
    if s.startswith("recall/"):
        return f"recall of {s.split('/', 1)[1]}"
    return s


class _Name(str):
    """A name matched by a pattern's ``*``: ``{0}`` shows it as a reader knows it (``term``), ``{0:pct}`` shows a
    level key such as "0.95" as 95%."""

    def __format__(self, spec: str) -> str:
        return level(float(self)) if spec == "pct" else term(str(self))


CORRUPTION_NAMES = ("shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow")
CORRUPTION_NAMES += ("frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "speckle_noise")
CORRUPTION_NAMES += ("spatter", "saturate")
NAMES |= {c: c.replace("_", " ") for c in CORRUPTION_NAMES}


# --- figures --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    """How the card shows one figure: its ``label`` (``{0}``, ``{1}`` are the names matched by the pattern's
    ``*``), its ``unit`` (see ``show``), one line on what it ``means`` and which direction is good, and whether it
    is one of the section's ``main`` figures (the others are listed under "all figures")."""

    label: str
    unit: str
    means: str
    main: bool = True


def _rows(table: dict[str, tuple]) -> dict[tuple[str, ...], Label]:
    """Patterns as key paths; a row is (label, unit, meaning) or (label, unit, meaning, main). A pattern with a
    ``*`` is not a main figure unless its row says so."""
    out = {}
    for pattern, row in table.items():
        path = tuple(pattern.split("."))
        out[path] = Label(*row[:3], row[3] if len(row) > 3 else "*" not in path)
    return out


HIGHER, LOWER = "higher is better", "lower is better"

_CALIBRATION = {
    "ece": ("ECE{when}", "fraction", f"expected calibration error: mean gap between confidence and accuracy; {LOWER}"),
    "adaptive_ece": ("adaptive ECE{when}", "fraction", f"ECE with equal-count bins; {LOWER}"),
    "mce": ("worst-bin calibration gap{when}", "fraction", f"maximum calibration error over the bins; {LOWER}"),
    "brier": ("Brier score{when}", "", f"squared error of the predicted probabilities; {LOWER}"),
    "nll": ("log loss{when}", "nats", f"negative log-likelihood of the true class; {LOWER}"),
    "mean_confidence": (
        "mean confidence{when}",
        "fraction",
        "average top-class probability; above the accuracy means over-confident, below under-confident",
    ),
    "accuracy": ("accuracy{when}", "fraction", f"top-1 accuracy (temperature scaling does not change it); {HIGHER}"),
}

_ENERGY = {
    "seconds": ("{0} time tracked", "s", "wall time the energy tracker ran"),
    "energy_kwh": ("{0} energy", "kWh", f"estimated electrical energy used; {LOWER}"),
    "emissions_kg_co2eq": ("{0} emissions", "kg", f"CO₂-equivalent of that energy on the chosen grid; {LOWER}"),
    "cpu_power_w": ("{0} CPU power", "W", "mean power the tracker attributed to the CPU"),
    "gpu_power_w": ("{0} GPU power", "W", "mean power the tracker attributed to the GPU"),
    "ram_power_w": ("{0} memory power", "W", "mean power the tracker attributed to memory"),
    "method": ("{0} measurement method", "text", "how the energy was measured or modelled"),
    "images": ("{0} images", "count", "images processed while tracking"),
    "energy_j_per_1000_images": ("{0} energy per 1,000 images", "J", f"energy for 1,000 images; {LOWER}"),
    "sessions": ("{0} sessions", "count", "sessions tracked (a resumed run has several)"),
}

_OOD = {
    "auroc": (
        "AUROC",
        "fraction",
        f"chance that an unfamiliar image scores lower than a test image; 50% is chance, {HIGHER}",
    ),
    "aupr_in": (
        "AUPR (in-distribution positive)",
        "fraction",
        f"precision–recall area, test images positive; {HIGHER}",
    ),
    "aupr_out": (
        "AUPR (unfamiliar positive)",
        "fraction",
        f"precision–recall area, unfamiliar images positive; {HIGHER}",
    ),
    "fpr95": (
        "false alarms at 95% recall",
        "fraction",
        f"unfamiliar images accepted when 95% of test images are accepted; {LOWER}",
    ),
}

_UNCERTAINTY = {
    "accuracy": ("accuracy", "fraction", HIGHER),
    "nll": ("log loss", "nats", f"negative log-likelihood of the true class; {LOWER}"),
    "ece": ("ECE", "fraction", f"expected calibration error; {LOWER}"),
    "predictive_entropy": ("mean predictive entropy", "nats", "uncertainty of the averaged prediction"),
    "expected_entropy": ("mean expected entropy", "nats", "average uncertainty of the single passes (aleatoric part)"),
    "mutual_information": ("mean mutual information", "nats", "disagreement between passes (epistemic part)"),
    "aurc": ("AURC", "", f"area under the risk–coverage curve; {LOWER}"),
    "optimal_aurc": ("best possible AURC", "", "AURC if every error were ranked below every correct answer"),
    "e_aurc": ("excess AURC", "", f"AURC above the best possible; {LOWER}"),
    "passes": ("forward passes", "count", "passes averaged per image"),
    "deferral.threshold": ("deferral threshold", "", "cases with top-class probability below it go to a human"),
    "deferral.reachable": ("target reachable", "", "whether any threshold reached the target accuracy when fitted"),
    "deferral.fit_coverage": (
        "answered when fitted",
        "fraction",
        "share answered on the split the threshold was fitted on",
    ),
    "deferral.test_coverage": ("answered on test", "fraction", f"share of test cases the model answers; {HIGHER}"),
    "deferral.test_accuracy": ("accuracy when answering", "fraction", "accuracy on the test cases it answers"),
    "deferral.deferred": ("deferred", "fraction", f"share of test cases sent to a human; {LOWER}"),
    "deferral.meets_target_on_test": ("meets target on test", "", "whether the answered test cases reach the target"),
}

_EXPLAIN = {
    "deletion_auc": ("deletion AUC", "", f"probability left as salient pixels are removed; {LOWER}"),
    "insertion_auc": ("insertion AUC", "", f"probability regained as salient pixels are restored; {HIGHER}"),
    "gap": ("insertion − deletion", "", f"faithfulness of the maps; 0 is no better than random, {HIGHER}"),
    "gap_se": ("standard error of the gap", "", "uncertainty of the gap over the explained images"),
    "seconds_per_image": ("time per image", "s", "wall time to explain one image"),
    "signed": ("signed maps", "", "whether the maps tell evidence for from evidence against"),
    "randomization_spearman": (
        "similarity after weight randomisation",
        "",
        f"Spearman correlation of maps before and after re-initialising the model; {LOWER}",
    ),
    "flagged": (
        "fails the sanity check",
        "",
        "maps barely change when the weights are randomised (Adebayo et al. 2018)",
    ),
    "randomized_constant": ("constant maps after randomisation", "fraction", "share of images whose map went flat"),
}

_GAP = {
    "difference": ("{0} gap", "points", f"best group minus worst group; {LOWER}"),
    "ratio": ("{0} ratio", "", f"worst group over best group; 1 is parity, {HIGHER}"),
    "worst_group": ("{0}: worst group", "text", "the group where the figure is worst"),
    "worst_value": ("{0}: worst group's value", "", "the figure in that group"),
    "worst_n": ("{0}: worst group's size", "count", "test images in that group"),
    "ci95": ("{0} gap, 95% interval", "interval:points", "bootstrap interval of the gap"),
}

METRICS: dict[str, dict[tuple[str, ...], Label]] = {
    "accuracy": _rows(
        {
            "top1": ("top-1 accuracy", "fraction", f"share of images whose top class is right; {HIGHER}"),
            **{
                f"top{k}": (f"top-{k} accuracy", "fraction", f"share with the right class among the top {k}; {HIGHER}")
                for k in range(2, 6)
            },
            "macro_precision": (
                "precision (class mean)",
                "fraction",
                f"of the images called X, share that are X; {HIGHER}",
            ),
            "weighted_precision": ("precision (weighted by class size)", "fraction", HIGHER),
            "macro_recall": ("recall (class mean)", "fraction", f"of the images of X, share called X; {HIGHER}"),
            "weighted_recall": ("recall (weighted by class size)", "fraction", HIGHER),
            "macro_f1": (
                "macro-F1",
                "fraction",
                f"mean over classes of the harmonic mean of precision and recall; {HIGHER}",
            ),
            "weighted_f1": ("F1 (weighted by class size)", "fraction", HIGHER),
            "n": ("test images", "count", "images scored"),
            "ci95.top1": ("top-1, 95% interval", "interval:fraction", "bootstrap interval over test images"),
            "ci95.macro_f1": ("macro-F1, 95% interval", "interval:fraction", "bootstrap interval over test images"),
            "protocol": ("classes scored", "text", "which of the model's outputs were compared with the labels"),
            "top1_all_classes": (
                "top-1 over all model classes",
                "fraction",
                "accuracy when every output of the model counts",
            ),
            "quadratic_weighted_kappa": (
                "quadratic weighted kappa",
                "",
                f"agreement for ordered grades, far misses weigh more; 1 is perfect, {HIGHER}",
            ),
            "sensitivity": ("sensitivity", "fraction", f"positive cases found; {HIGHER}"),
            "specificity": ("specificity", "fraction", f"negative cases cleared; {HIGHER}"),
        }
    ),
    "calibration": _rows(
        {
            **{f"before.{k}": (lab.format(when=""), u, m) for k, (lab, u, m) in _CALIBRATION.items()},
            "temperature": (
                "temperature T",
                "",
                "logits are divided by T; T > 1 softens over-confidence, T < 1 sharpens",
            ),
            **{
                f"after.{k}": (lab.format(when=" after temperature scaling"), u, m, k in ("ece", "nll"))
                for k, (lab, u, m) in _CALIBRATION.items()
            },
        }
    ),
    "efficiency": _rows(
        {
            "params": ("parameters", "si", "learned weights; fewer is smaller"),
            "flops_network": ("FLOPs per forward pass", "si", f"floating-point operations of one pass; {LOWER}"),
            "flops_per_image": (
                "FLOPs per image as deployed",
                "si",
                f"doubled under flip test-time augmentation; {LOWER}",
            ),
            "size_on_disk_bytes": ("size on disk", "bytes", f"weights file size; {LOWER}"),
            "weights_file": ("weights file", "text", "the file measured", False),
            "latency_ms.p50": ("latency, median", "ms", f"time for one image (batch of 1); {LOWER}"),
            "latency_ms.p95": ("latency, 95th percentile", "ms", f"1 in 20 single-image calls is slower; {LOWER}"),
            "latency_ms.mean": ("latency, mean", "ms", f"mean single-image time; {LOWER}"),
            "latency_ms.min": ("latency, fastest", "ms", "fastest single-image call"),
            "throughput_img_s": ("throughput", "img/s", f"images per second in batches; {HIGHER}"),
            "throughput_batch": ("throughput batch size", "count", "batch size of the throughput measurement", False),
            "peak_memory_bytes": ("peak memory", "bytes", f"largest working memory during a batch; {LOWER}"),
            "peak_memory_method": ("peak memory method", "text", "how peak memory was measured", False),
            "threads": ("CPU threads", "count", "threads the measurement used", False),
            "input_shape": ("input size", "shape", "channels × height × width", False),
            "device": ("device", "text", "where the model ran", False),
            "precision": ("numeric precision", "text", "number format of the computation", False),
            "tta": ("flip test-time augmentation", "", "each image also run mirrored and averaged", False),
        }
    ),
    "energy": _rows(
        {
            f"{phase}.{k}": (
                lab.format(phase),
                u,
                m,
                k in ("energy_kwh", "emissions_kg_co2eq", "energy_j_per_1000_images"),
            )
            for phase in ("inference", "training")
            for k, (lab, u, m) in _ENERGY.items()
        }
    ),
    "corruption": _rows(
        {
            "n": ("images corrupted", "count", "test images in the seeded subset", False),
            "of": ("test images in all", "count", "size of the test split", False),
            "subset_sha1": ("subset fingerprint", "text", "identifies the subset, for comparing audits", False),
            "dataset": ("dataset", "text", "data the corruptions were applied to", False),
            "corruptions": ("corruptions", "text", "the corruption types applied", False),
            "severities": ("severities", "", "corruption strengths, 1 (mild) to 5 (severe)", False),
            "scale": ("size scale", "", "ImageNet-C pixel lengths scaled to this image size", False),
            "clean_accuracy": ("clean accuracy", "fraction", "accuracy on the same images uncorrupted"),
            "clean_ece": ("clean ECE", "fraction", f"calibration error uncorrupted; {LOWER}"),
            "mean_accuracy": ("mean corrupted accuracy", "fraction", f"over all corruptions and severities; {HIGHER}"),
            "mean_error": ("mean corrupted error", "fraction", f"1 − mean corrupted accuracy; {LOWER}"),
            "mean_ece": ("mean corrupted ECE", "fraction", f"calibration error under corruption; {LOWER}"),
            "accuracy.*": ("{0}: accuracy by severity", "fraction", HIGHER),
            "ece.*": ("{0}: ECE by severity", "fraction", LOWER),
            "mean_error_by_corruption.*": ("{0}: mean error", "fraction", LOWER),
            "baseline.dir": ("baseline run", "text", "the run corruption errors are compared with", False),
            "baseline.name": ("baseline name", "text", "", False),
            "baseline.model": ("baseline model", "text", "", False),
            "baseline.clean_accuracy": ("baseline clean accuracy", "fraction", "the baseline's accuracy uncorrupted"),
            "baseline.mean_accuracy": ("baseline mean corrupted accuracy", "fraction", "the baseline under corruption"),
            "ce.*": ("{0}: corruption error vs baseline", "fraction", f"error relative to the baseline's; {LOWER}"),
            "relative_ce.*": (
                "{0}: relative corruption error",
                "fraction",
                f"error increase relative to baseline's; {LOWER}",
            ),
            "mce": ("mCE", "fraction", f"mean corruption error relative to the baseline (Hendrycks 2019); {LOWER}"),
            "relative_mce": (
                "relative mCE",
                "fraction",
                f"mean increase of error over clean, relative to baseline; {LOWER}",
            ),
            "mce_common": ("mCE, 15 common corruptions", "fraction", f"as in the ImageNet-C paper; {LOWER}"),
            "relative_mce_common": ("relative mCE, 15 common corruptions", "fraction", LOWER),
        }
    ),
    "adversarial": _rows(
        {
            "norm": ("norm", "name", "how perturbation size is measured", False),
            "n": ("images attacked", "count", "seeded subset of the test split", False),
            "n_correct": ("correct before the attack", "count", "only these are attacked"),
            "clean_accuracy": ("clean accuracy", "fraction", "accuracy on the subset before any attack"),
            "epsilons": (
                "perturbation budgets ε",
                "eps",
                "largest change allowed per image, in [0, 1] pixel units",
                False,
            ),
            "attack": ("strongest attack", "name", "the attack the headline uses", False),
            "fgsm_accuracy": ("FGSM accuracy at each ε", "fraction", HIGHER),
            "pgd_accuracy": ("PGD accuracy at each ε", "fraction", HIGHER),
            "square_accuracy": ("Square Attack accuracy at each ε", "fraction", HIGHER),
            "fgsm_success_rate": (
                "FGSM success rate at each ε",
                "fraction",
                f"share of correct images flipped; {LOWER}",
            ),
            "pgd_success_rate": ("PGD success rate at each ε", "fraction", f"share of correct images flipped; {LOWER}"),
            "square_success_rate": ("Square Attack success rate at each ε", "fraction", LOWER),
            "reference_eps": ("headline ε", "eps", "the budget the headline is read at"),
            "reference_accuracy": ("robust accuracy at headline ε", "fraction", HIGHER),
            "unbounded.eps": ("unbounded attack ε", "eps", "a budget that reaches any image", False),
            "unbounded.steps": ("unbounded attack steps", "count", "", False),
            "unbounded.n": ("unbounded attack images", "count", "", False),
            "unbounded.accuracy": (
                "accuracy under an unbounded attack",
                "fraction",
                "should be near 0%; more means masked gradients or a broken attack",
            ),
            "tta": ("attacked with flip test-time augmentation", "", "", False),
            "skipped": ("skipped", "name", "attacks or checks left out", False),
            "square.queries": ("Square Attack queries", "count", "model queries per image and ε", False),
            "square.p_init": ("Square Attack p_init", "", "initial square size", False),
            "square.restarts": ("Square Attack restarts", "count", "", False),
            "square.seed": ("Square Attack seed", "count", "", False),
            "autoattack.eps": ("AutoAttack ε", "eps", "", False),
            "autoattack.n": ("AutoAttack images", "count", "", False),
            "autoattack.accuracy": ("AutoAttack accuracy", "fraction", f"the standard robustness benchmark; {HIGHER}"),
            "autoattack.pgd_accuracy": ("PGD accuracy on AutoAttack's images", "fraction", "for comparison with it"),
            "sanity.passed": ("attack sanity checks passed", "", "no sign of masked gradients or a weak attack"),
            "sanity.failures": ("attack sanity failures", "text", "what the sanity checks found"),
        }
    ),
    "certify": _rows(
        {
            "n_images": ("images certified", "count", "seeded subset of the test split", False),
            "sigma": ("noise σ", "", "standard deviation of the Gaussian noise, in [0, 1] pixel units"),
            "sigma_normalised": (
                "noise σ after normalisation",
                "",
                "σ per channel in the model's normalised units",
                False,
            ),
            "input_shape": ("input size", "shape", "channels × height × width", False),
            "certified_accuracy.*": (
                "certified accuracy at L2 radius {0}",
                "fraction",
                f"correct and provably stable; {HIGHER}",
            ),
            "smoothed_accuracy": ("smoothed accuracy", "fraction", "accuracy of the noise-averaged classifier"),
            "base_accuracy": ("base accuracy", "fraction", "accuracy of the plain model on the same images"),
            "abstention_rate": ("abstentions", "fraction", f"images where the smoothed classifier declined; {LOWER}"),
            "mean_radius_correct": (
                "mean certified radius (correct)",
                "radius",
                f"over correctly classified images; {HIGHER}",
            ),
            "max_certifiable_radius": ("largest certifiable radius", "radius", "the most the sample count allows"),
            "seconds_per_image": ("time per image", "s", "wall time to certify one image"),
            "trained_task": ("training task", "text", "how the model was trained (noise training helps)", False),
        }
    ),
    "ood": _rows(
        {
            **{f"sets.*.*.{k}": (f"{lab}: {{0}}, {{1}} score", u, m) for k, (lab, u, m) in _OOD.items()},
            **{
                f"mean.*.{k}": (f"mean {lab}, {{0}} score", u, m, k in ("auroc", "fpr95"))
                for k, (lab, u, m) in _OOD.items()
            },
            "n.id": ("test images", "count", "in-distribution images scored"),
            "n.ood.*": ("{0} images", "count", "unfamiliar images scored from this set"),
            "n.fit": ("images for feature statistics", "count", "fitting the Mahalanobis, kNN and ViM scores"),
            "best_score": ("best score", "name", "the score with the highest mean AUROC"),
            "skipped": ("skipped scores", "name", "scores the model could not give", False),
        }
    ),
    "uncertainty": _rows(
        {
            "target_accuracy": ("target accuracy", "level", "accuracy the answered cases should reach"),
            "fit_split": ("threshold fitted on", "text", "never the test split", False),
            "n": ("test images", "count", "images scored", False),
            **{f"sources.*.{k}": (f"{{0}}: {lab}", u, m) for k, (lab, u, m) in _UNCERTAINTY.items()},
            "skipped": ("skipped sources", "name", "sources the model could not give", False),
            "deferred": ("deferred (softmax)", "fraction", f"share of test cases sent to a human; {LOWER}"),
        }
    )
    | {
        ("sources", "softmax", "aurc"): Label("softmax: AURC", "", _UNCERTAINTY["aurc"][2]),
        ("sources", "softmax", "deferral", "test_accuracy"): Label(
            "softmax: accuracy when answering", "fraction", _UNCERTAINTY["deferral.test_accuracy"][2]
        ),
    },
    "explain": _rows(
        {
            **{f"per_method.*.{k}": (f"{{0}}: {lab}", u, m) for k, (lab, u, m) in _EXPLAIN.items()},
            "best_method": (
                "most faithful method",
                "name",
                "largest insertion − deletion gap among methods not flagged",
            ),
            "n": ("images explained", "count", "seeded subset of the test split"),
            "indices": ("image indices", "", "which test images were explained", False),
            "baseline": ("deletion baseline", "text", "what removed pixels are set to", False),
            "flag_spearman": ("sanity flag above", "", "a correlation above this flags a method", False),
            "tta": ("flip test-time augmentation", "", "", False),
            "skipped": ("skipped methods", "name", "methods the model could not support", False),
        }
    ),
    "fairness": _rows(
        {
            "attribute": ("grouped by", "text", "the column or property that defines the groups"),
            "attribute_kind": ("kind of attribute", "text", "column: given in the data; proxy: an image property"),
            "n": ("test images", "count", "images scored", False),
            "groups.*.n": ("{0}: images", "count", "group size"),
            "groups.*.small": ("{0}: too small", "", "fewer images than the minimum group size"),
            "groups.*.accuracy": ("{0}: accuracy", "fraction", HIGHER),
            "groups.*.accuracy_ci95": ("{0}: accuracy, 95% interval", "interval:fraction", "bootstrap interval"),
            "groups.*.macro_f1": ("{0}: macro-F1", "fraction", HIGHER),
            "groups.*.ece": ("{0}: ECE", "fraction", LOWER),
            "groups.*.recall.*": ("{0}: recall of {1}", "fraction", HIGHER),
            "groups.*.support.*": ("{0}: images of {1}", "count", "images of that class in the group"),
            "small_groups": ("small groups", "text", "groups below the minimum size", False),
            **{f"gaps.*.{k}": row for k, row in _GAP.items()},
            "gaps.*.per_class.*": ("{0}: gap for {1}", "points", LOWER),
            "gaps.accuracy.difference": (
                "accuracy gap",
                "points",
                f"best group's accuracy minus worst group's; {LOWER}",
            ),
            "gaps.accuracy.worst_group": ("lowest-accuracy group", "text", "the group the model serves worst"),
            "gaps.accuracy.ci95": ("accuracy gap, 95% interval", "interval:points", "bootstrap interval of the gap"),
            "gaps.equalized_odds.difference": (
                "equalised-odds gap",
                "points",
                f"largest difference in true- or false-positive rate between groups; {LOWER}",
            ),
            "slice_embedding": ("slices found in", "text", "features used to discover error slices", False),
        }
    ),
    # The conformal check (split conformal prediction sets; Angelopoulos & Bates 2021). Levels are keys such as
    # "0.95": ``{1:pct}`` shows one as 95%.
    "conformal": _rows(
        {
            **{
                f"coverage_{a}": (
                    f"coverage at {a}% target",
                    "fraction",
                    f"share of test sets holding the true class; {HIGHER}",
                )
                for a in (90, 95, 99)
            },
            "n_validation": ("validation images", "count", "the split the sets are fitted on (never the test split)"),
            "n_tuning": ("tuning images", "count", "part of it that fits the temperature and RAPS's settings"),
            "n_calibration": ("calibration images", "count", "part of it that sets the threshold; more is steadier"),
            "n_test": ("test images", "count", "images the coverage is measured on"),
            "temperature": ("temperature T", "", "temperature applied to the logits before the sets are built"),
            "randomized": (
                "randomised sets",
                "",
                "ties at the threshold broken at random: exact coverage, sets may be empty",
            ),
            "levels": ("target coverages", "level", "the probabilities the sets should hold the true class with"),
            "reference_level": ("headline target", "level", "the level the headline and best score are read at"),
            "score": ("best score", "name", "the score with the smallest sets at the headline target"),
            "scores.*.*.coverage": (
                "{0} at {1:pct}: coverage",
                "fraction",
                "share of test sets holding the true class; should reach the target",
            ),
            "scores.*.*.coverage_ci95": (
                "{0} at {1:pct}: coverage, 95% interval",
                "interval:fraction",
                "Clopper–Pearson interval",
            ),
            "scores.*.*.mean_set_size": ("{0} at {1:pct}: mean set size", "labels", LOWER),
            "scores.*.*.median_set_size": ("{0} at {1:pct}: median set size", "labels", LOWER),
            "scores.*.*.empty_sets": ("{0} at {1:pct}: empty sets", "fraction", "sets with no label at all"),
            "scores.*.*.threshold": ("{0} at {1:pct}: threshold", "", "score cut-off fitted on the calibration part"),
            "scores.*.*.infinite": (
                "{0} at {1:pct}: every class in every set",
                "",
                "the calibration part was too small",
            ),
            "scores.*.*.k_reg": ("{0} at {1:pct}: k_reg", "count", "RAPS: set sizes past this are penalised"),
            "scores.*.*.lambda": ("{0} at {1:pct}: lambda", "", "RAPS: the size of that penalty"),
            "scores.*.*.worst_class": (
                "{0} at {1:pct}: worst-covered class",
                "pair:fraction",
                "the class whose sets miss most",
            ),
            "scores.*.*.classes_below_target": ("{0} at {1:pct}: classes below target", "fraction", LOWER),
            "corruption.severity": ("corruption severity", "count", "1 (mild) to 5 (severe)"),
            "corruption.n": ("images corrupted", "count", "class-stratified test subset"),
            "corruption.of": ("test images in all", "count", "", False),
            "corruption.corruptions": ("corruptions", "name", "", False),
            "corruption.left_out": ("corruptions left out", "name", "those that leave these images unchanged", False),
            "corruption.worst.corruption": ("worst corruption", "name", "the corruption that costs the most coverage"),
            "corruption.worst.score": ("worst corruption: score", "name", "", False),
            "corruption.worst.level": ("worst corruption: target", "level", "", False),
            "corruption.worst.coverage": (
                "coverage under the worst corruption",
                "fraction",
                "corrupted images break the guarantee; this is how far",
            ),
            "corruption.worst.drop": ("coverage drop under the worst corruption", "points", LOWER),
            "corruption.clean.*.*.coverage": (
                "clean, {0} at {1:pct}: coverage",
                "fraction",
                "on the uncorrupted subset",
            ),
            "corruption.clean.*.*.mean_set_size": ("clean, {0} at {1:pct}: mean set size", "labels", LOWER),
            "corruption.corrupted.*.*.*.coverage": (
                "{0}, {1} at {2:pct}: coverage",
                "fraction",
                "corrupted images break the guarantee; a drop shows how much",
            ),
            "corruption.corrupted.*.*.*.mean_set_size": ("{0}, {1} at {2:pct}: mean set size", "labels", LOWER),
        }
    ),
    # The retrieval check (visual search: test queries against the training split; MAP@R of Musgrave et al. 2020).
    "retrieval": _rows(
        {
            "embedding": ("embedding", "text", "penultimate: the classifier's pooled features; metric: a learned head"),
            "dim": ("embedding size", "count", "dimensions of each L2-normalised vector"),
            "n_queries": ("queries", "count", "test images searched for"),
            "of_queries": ("test images in all", "count", "", False),
            "n_gallery": ("gallery images", "count", "training images searched among"),
            "of_gallery": ("training images in all", "count", "", False),
            "recall.*": (
                "Recall@{0}",
                "fraction",
                f"queries with at least one image of their label among their K nearest; {HIGHER}",
                True,
            ),
            "map_at_r": (
                "MAP@R",
                "fraction",
                f"mean average precision over each query's R nearest, R = its label's gallery images; {HIGHER}",
            ),
            "mean_r": ("mean R", "", "gallery images of a query's label, on average", False),
            "ann.kind": ("approximate index", "name", "the faiss index measured against exact search"),
            "ann.hnsw_m": ("HNSW M", "count", "links per node", False),
            "ann.ef_construction": ("HNSW efConstruction", "count", "candidates kept while building", False),
            "ann.ef_search": ("HNSW efSearch", "count", "candidates kept per query"),
            "ann.recall_at_10": (
                "approximate recall@10",
                "fraction",
                f"share of the exact 10 nearest that the index returns; {HIGHER}",
            ),
            "ann.qps": ("queries per second", "count", f"all queries at once, one thread; {HIGHER}"),
            "ann.latency_ms_p50": ("latency per query, median", "ms", f"one query at a time, one thread; {LOWER}"),
            "ann.latency_ms_p99": ("latency per query, p99", "ms", f"one query at a time, one thread; {LOWER}"),
            "ann.latency_queries": ("queries timed one by one", "count", "", False),
            "ann.exact_qps": ("exact search, queries per second", "count", "faiss IndexFlatL2, one thread, for scale"),
            "ann.build_s": ("index build time", "s", "all threads", False),
            "ann.threads": ("search threads", "count", "", False),
            "corruption.severity": ("corruption severity", "count", "1 (mild) to 5 (severe)"),
            "corruption.n": ("queries corrupted", "count", "class-stratified subset of the queries"),
            "corruption.clean_recall_at_1": ("Recall@1 of those queries, clean", "fraction", "before corruption"),
            "corruption.mean_recall_at_1": (
                "Recall@1 under corruption",
                "fraction",
                f"mean over the corruptions; {HIGHER}",
            ),
            "corruption.worst": ("worst corruption", "name", "the corruption that costs the most Recall@1"),
            "corruption.recall_at_1.*": ("{0}: Recall@1", "fraction", HIGHER),
        }
    ),
}

# What each check's headline figure means, beside the label results.json gives it.
HEADLINES = {
    "accuracy": f"Share of test images whose top class is the true one; {HIGHER}.",
    "calibration": f"How far the model's confidence is from its accuracy (15 bins); {LOWER}.",
    "efficiency": f"Time to classify one image on the audit's device, median of many calls; {LOWER}.",
    "energy": f"Estimated electricity to classify 1,000 test images (codecarbon); {LOWER}.",
    "corruption": (
        f"Accuracy under common corruptions (noise, blur, weather, digital), mean over types and severities; {HIGHER}."
    ),
    "adversarial": f"Accuracy when an attacker may change each pixel by up to ε; {HIGHER}.",
    "certify": f"Share of test images provably classified right against any change of this L2 size; {HIGHER}.",
    "ood": f"How well the model's score tells unfamiliar images from test images; 50% is chance, {HIGHER}.",
    "uncertainty": f"Share of cases the model must hand to a human to reach the target accuracy on the rest; {LOWER}.",
    "explain": f"How much the model's prediction depends on the pixels its explanations highlight; {HIGHER}.",
    "fairness": f"Difference in accuracy between the best- and worst-served group; {LOWER}.",
    "conformal": "How many labels a prediction set needs to contain the true class with the stated probability.",
    "retrieval": f"How much of each test image's class its nearest training images hold (MAP@R); {HIGHER}.",
}

# Table columns: the label shown, the unit of its cells, and what it means. A table's unlisted numeric columns use
# TABLE_UNITS (the recall table's columns are class names, its cells recalls).
COLUMNS: dict[str, tuple[str, str, str]] = {
    "support": ("images", "count", "test images of the class"),
    "precision": ("precision", "fraction", "of the images called this class, share that are"),
    "recall": ("recall", "fraction", "of the images of this class, share found"),
    "f1": ("F1", "fraction", "harmonic mean of precision and recall"),
    "count": ("images", "count", ""),
    "fraction of true class": ("share of the true class", "fraction", ""),
    "accuracy": ("accuracy", "fraction", ""),
    "error": ("error", "fraction", ""),
    "ECE": ("ECE", "fraction", "expected calibration error"),
    "mean accuracy": ("mean accuracy", "fraction", ""),
    "mean error": ("mean error", "fraction", ""),
    "epsilon": ("ε", "eps", "largest change allowed per pixel ([0, 1] units)"),
    "FGSM accuracy": ("FGSM accuracy", "fraction", ""),
    "PGD accuracy": ("PGD accuracy", "fraction", ""),
    "Square Attack accuracy": ("Square Attack accuracy", "fraction", ""),
    "FGSM success rate": ("FGSM success rate", "fraction", "share of correct images flipped"),
    "PGD success rate": ("PGD success rate", "fraction", "share of correct images flipped"),
    "Square Attack success rate": ("Square Attack success rate", "fraction", "share of correct images flipped"),
    "radius": ("L2 radius", "radius", ""),
    "certified accuracy": ("certified accuracy", "fraction", "correct and provably stable at this radius"),
    "score": ("score", "name", ""),
    "method": ("method", "name", ""),
    "source": ("source", "name", ""),
    "corruption": ("corruption", "name", ""),
    "AUROC": ("AUROC", "fraction", "50% is chance"),
    "AUPR-In": ("AUPR-In", "fraction", ""),
    "AUPR-Out": ("AUPR-Out", "fraction", ""),
    "FPR@95TPR": ("false alarms at 95% recall", "fraction", ""),
    "passes": ("passes", "count", ""),
    "NLL": ("log loss", "nats", ""),
    "mean entropy": ("mean entropy", "nats", ""),
    "mean MI": ("mean mutual information", "nats", ""),
    "threshold": ("threshold", "", ""),
    "coverage": ("coverage", "fraction", "share of test images whose set holds the true class"),
    "accepted accuracy": ("accuracy when answering", "fraction", ""),
    "deferred": ("deferred", "fraction", ""),
    "deletion_auc": ("deletion AUC", "", "lower is better"),
    "insertion_auc": ("insertion AUC", "", "higher is better"),
    "gap": ("insertion − deletion", "", "higher is better"),
    "randomization_spearman": ("similarity after randomisation", "", "lower is better"),
    "flagged": ("fails sanity check", "", ""),
    "seconds_per_image": ("time per image", "s", ""),
    "n": ("images", "count", ""),
    "small": ("too small", "", ""),
    "ci95 low": ("95% interval, low", "fraction", ""),
    "ci95 high": ("95% interval, high", "fraction", ""),
    "macro-F1": ("macro-F1", "fraction", ""),
    "worst value": ("worst value", "", ""),
    "worst n": ("worst group's images", "count", ""),
    "difference": ("gap", "", ""),
    "ratio": ("ratio", "", "worst over best; 1 is parity"),
    "size": ("images", "count", ""),
    "errors": ("errors", "count", ""),
    "dominant share": ("dominant class share", "fraction", ""),
    "target": ("target", "level", "the coverage the sets should reach"),
    "coverage low": ("coverage, 95% low", "fraction", ""),
    "coverage high": ("coverage, 95% high", "fraction", ""),
    "mean size": ("mean set size", "labels", ""),
    "median size": ("median set size", "labels", ""),
    "empty sets": ("empty sets", "fraction", ""),
    "worst class coverage": ("worst class coverage", "fraction", ""),
    "set sizes": ("set sizes", "text", ""),
    "label": ("label", "text", ""),
    "queries": ("queries", "count", "test images of the label"),
    "R": ("R", "count", "gallery images of the label"),
    "recall@1": ("Recall@1", "fraction", ""),
    "recall@5": ("Recall@5", "fraction", ""),
    "recall@10": ("Recall@10", "fraction", ""),
    "MAP@R": ("MAP@R", "fraction", ""),
    "drop": ("drop", "points", "clean Recall@1 minus corrupted"),
}
# Columns named after a level or a class: (prefix, label prefix, unit).
COLUMN_PREFIXES = (
    ("coverage at ", "coverage at ", "fraction"),
    ("drop at ", "coverage drop at ", "points"),
    ("mean size at ", "mean set size at ", "labels"),
)
COLUMNS_OF = {("uncertainty", "coverage"): ("answered", "fraction", "share of test cases the model answers")}
TABLE_UNITS = {("fairness", "recall"): "fraction", ("conformal", "by_class"): "fraction"}
TABLE_TITLES = {
    "per_class": "Each class",
    "most_confused": "Most confused pairs",
    "by_severity": "Each corruption and severity",
    "by_corruption": "Each corruption",
    "robust_accuracy": "Accuracy under attack",
    "certified_accuracy": "Certified accuracy by radius",
    "ood": "Each unfamiliar set and score",
    "sources": "Each source of uncertainty",
    "faithfulness": "Each explanation method",
    "groups": "Each group",
    "recall": "Recall per group and class",
    "gaps": "Gaps between groups",
    "slices": "Error slices found in the model's features",
    "by_score": "Each score and target",
    "by_label": "Each label",
    "by_set_size": "Coverage by set size",
    "by_class": "Coverage per class",
    "under_corruption": "Coverage under corruption",
}


@dataclass(frozen=True)
class Figure:
    """One metric as the card shows it."""

    path: tuple[str, ...]
    label: str
    value: str
    means: str
    main: bool
    fallback: bool  # no pattern in METRICS matched: the label is the humanised key


def leaves(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """The (key path, value) of each figure in a nested metrics dict. Keys keep their own dots (a radius "0.25"
    is one key); lists of scalars are one figure; lists of dicts or lists (tables kept in metrics) are left out."""
    out: list[tuple[tuple[str, ...], Any]] = []
    for k, v in d.items():
        path = (*prefix, str(k))
        if isinstance(v, dict):
            out += leaves(v, path)
        elif isinstance(v, list) and any(isinstance(x, dict | list) for x in v):
            continue
        else:
            out.append((path, v))
    return out


def _match(pattern: tuple[str, ...], path: tuple[str, ...]) -> list[str] | None:
    if len(pattern) != len(path):
        return None
    names = []
    for p, k in zip(pattern, path, strict=True):
        if p == "*":
            names.append(k)
        elif p != k:
            return None
    return names


def lookup(check: str, path: tuple[str, ...]) -> tuple[Label, list[str]] | None:
    """The label of a metric at ``path`` and the names its ``*`` matched; an exact pattern wins over one with
    wildcards, and of two with wildcards the one with fewer."""
    best = None
    for pattern, label in METRICS.get(check, {}).items():
        names = _match(pattern, path)
        if names is not None and (best is None or len(names) < len(best[1])):
            best = (label, names)
    return best


def humanise(path: tuple[str, ...]) -> str:
    """The fallback label of a key no pattern knows: its parts, underscores as spaces, joined by " · "."""
    return " · ".join(term(p) if p in NAMES else p.replace("_", " ") for p in path)


def figures(check: str, metrics: dict[str, Any]) -> list[Figure]:
    """Every figure of a check's metrics, labelled, formatted and explained, in the order results.json has them."""
    out = []
    for path, value in leaves(metrics):
        found = lookup(check, path)
        if found is None:
            unit = "fraction" if isinstance(value, float) and 0 <= value <= 1 and "ci95" not in path else ""
            out.append(Figure(path, humanise(path), show(value, unit), "", False, True))
            continue
        label, names = found
        text = label.label.format(*map(_Name, names))
        out.append(Figure(path, text, show(value, label.unit), label.means, label.main, False))
    return out


def fallbacks(results: dict[str, Any]) -> list[str]:
    """``check: dotted.key`` of every metric in ``results`` that no pattern labels (the card humanises them)."""
    return [
        f"{name}: {'.'.join(f.path)}"
        for name, s in results["checks"].items()
        for f in figures(name, s.get("metrics", {}))
        if f.fallback
    ]


def column(check: str, table: str, name: str) -> tuple[str, str, str]:
    """(label, unit, meaning) of a table column; an unknown one keeps its name, underscores as spaces."""
    if (check, name) in COLUMNS_OF:
        return COLUMNS_OF[check, name]
    if name in COLUMNS:
        return COLUMNS[name]
    for prefix, shown, unit in COLUMN_PREFIXES:
        if name.startswith(prefix) and _is_number(rest := name[len(prefix) :]):
            return f"{shown}{level(float(rest))}", unit, ""
    return name.replace("_", " ") if name.isidentifier() else name, TABLE_UNITS.get((check, table), ""), ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cell(value: Any, unit: str) -> str:
    """A table cell: numbers in the column's unit, None as a dash, text as it is."""
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        if unit in ("", "text") and isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return show(value, unit if unit != "text" else "")
    return show(value, "name" if unit == "name" else "text")
