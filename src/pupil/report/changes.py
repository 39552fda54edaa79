"""What changed between two audits of the same test images, figure by figure: "what compression changed" when NEW
is a compressed copy of BASE (``pupil compress`` writes a ``compressed`` section into its run.json), "what changed"
otherwise.

Hooker et al. ("What do compressed deep neural networks forget?", 2019; "Characterising bias in compressed models",
2020) found that compressed models whose top-1 accuracy barely moves lose disproportionately on a few classes, on
under-represented groups and on a small set of atypical images; issue 17 also cites Shen et al. (2024) on compressed
models being less robust under distribution shift. A headline that holds says little, so this view puts every
figure of the report card side by side, always as NEW - BASE:

- top-1 and per-class recall, ECE before and after temperature scaling (each run's own temperature from its
  calibration check, applied to its accuracy check's test logits), mean corruption accuracy and the worst
  corruption's accuracy (the lowest mean over severities), OOD mean AUROC: with a 95% paired percentile bootstrap
  interval from the per-image files. The draws are ``pupil.report.paired``'s (``resamples``): the same seed gives
  the same replicates, so top-1's interval here is the paired tests' interval. A per-class replicate that drew no
  image of the class is left out of that class's interval.
- PGD accuracy at the reference ε, deferral rate, the fairness gap, latency p50, throughput, size on disk (the
  model file: ``model.safetensors`` or the artefact that ``compressed`` names), params and energy per 1,000
  images: from the checks' summaries, without an interval (the audit keeps no per-image data for them).
- The compression-identified exemplars: the test images on which NEW's and BASE's top-1 predictions disagree,
  with their class mix, the commonest (true, BASE, NEW) triples and a gallery. Hooker et al. 2019 define them over
  populations of models (the modal prediction of many compressed models against that of many base models); with
  one model on each side the definition becomes plain disagreement.

A figure whose check did not run on one side (or either) is listed under ``missing`` with the ``pupil audit``
command that produces it, never dropped. Two audits of other images or settings are refused in one line, as the
paired tests refuse them.

Flags judge the point estimates against ``THRESHOLDS`` (the limits of the compression issue, after Hooker et al.).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pupil.errors import PupilError
from pupil.io import read_json, sha256_file
from pupil.report.paired import (
    ALPHA,
    _corruption_figure,
    _ood_figure,
    _open,
    _refuse_mismatch,
    _rerun,
    bootstrap_summary,
    ece,
    paired_bootstrap,
    top1,
)
from pupil.results import CONSUMED, read_per_image

if TYPE_CHECKING:
    from rich.console import Console

# Flags (fractions; judged on the point estimates NEW - BASE). The limits are issue 17's, after Hooker et al. 2019
# (a compressed model's unchanged top-1 can hide losses concentrated on a few classes) and 2020 (those losses fall
# on under-represented groups and atypical images). Meant to move to a ``changes:`` block of thresholds.yaml
# (top1_kept, class_loss, corruption_loss) so that a user can set their own.
TOP1_KEPT = 0.005
"""Top-1 within this of BASE's counts as kept (0.5 pt); a larger drop is flagged as a top-1 loss."""
CLASS_LOSS = 0.02
"""A class whose recall drops by more than this (2 pt) while top-1 is kept is a hidden class loss."""
CORRUPTION_LOSS = 0.03
"""A drop of mean corruption accuracy by more than this (3 pt) is flagged, whatever top-1 did."""
TOLERANCE = 1e-9
"""Rates are ratios of counts: a drop of exactly 0.5 pt must not flip a flag on floating-point rounding."""
THRESHOLDS = {"top1_kept": TOP1_KEPT, "class_loss": CLASS_LOSS, "corruption_loss": CORRUPTION_LOSS}

GALLERY = 48  # exemplar thumbnails on the page at most
THUMB = 64  # pixels on the longer side of a thumbnail
CONFUSIONS = 10  # (true, BASE, NEW) triples listed
PROVENANCE = ("method", "kind", "format", "dtype", "artefact", "artifact", "bytes")  # kept of NEW's ``compressed``

# What this view reads from each check's summary (the ``CONSUMED`` discipline of pupil.results: only these keys).
READS: dict[str, tuple[str, ...]] = CONSUMED["changes"]


@dataclass(frozen=True)
class Figure:
    """One figure of the card: the check it comes from (None: the run directory itself), its label, its unit
    (fraction, ms, img/s, bytes, J, count or score) and its direction."""

    check: str | None
    label: str
    unit: str
    higher_is_better: bool


FIGURES: dict[str, Figure] = {
    "accuracy.top1": Figure("accuracy", "top-1 accuracy", "fraction", True),
    "calibration.ece": Figure("calibration", "ECE", "fraction", False),
    "calibration.ece_after_temperature": Figure("calibration", "ECE after temperature scaling", "fraction", False),
    "corruption.mean_corrupted_top1": Figure("corruption", "mean corruption accuracy", "fraction", True),
    "corruption.worst": Figure("corruption", "worst corruption accuracy", "fraction", True),
    "adversarial.robust_top1": Figure("adversarial", "PGD accuracy at the reference ε", "fraction", True),
    "ood.mean_auroc": Figure("ood", "OOD mean AUROC", "score", True),
    "uncertainty.deferred": Figure("uncertainty", "deferral rate", "fraction", False),
    "fairness.accuracy_gap": Figure("fairness", "fairness gap (accuracy)", "fraction", False),
    "efficiency.latency_ms_p50": Figure("efficiency", "latency p50, batch 1", "ms", False),
    "efficiency.throughput_img_s": Figure("efficiency", "throughput", "img/s", True),
    "model.size_on_disk": Figure(None, "size on disk", "bytes", False),
    "efficiency.params": Figure("efficiency", "params", "count", False),
    "energy.energy_j_per_1000_images": Figure("energy", "energy per 1,000 images", "J", False),
}
# What else can be missing, beside the figures: the per-image parts of the accuracy check.
PARTS = {"accuracy.per_class_recall": "per-class recall", "accuracy.exemplars": "compression-identified exemplars"}
ORDER = [*FIGURES, *PARTS]


@dataclass
class Audit:
    """One side of the comparison: its results.json, directory, run.json (empty when there is none beside it) and,
    once read, its per-image files."""

    results: dict[str, Any]
    dir: Path
    info: dict[str, Any]
    per_image: dict[str, dict[str, torch.Tensor] | None] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> Audit:
        results, run_dir = _open(path)
        return cls(results, run_dir, _info(run_dir))

    @property
    def name(self) -> str:
        return self.results["run"]["name"]

    @property
    def compressed(self) -> dict[str, Any] | None:
        return self.info.get("compressed") or self.results["run"].get("compressed")

    def ran(self, check: str) -> bool:
        return check in self.results["checks"]

    def summary(self, check: str) -> dict[str, Any]:
        """The ``READS`` keys of ``check``'s summary (the check ran)."""
        return {k: self.results["checks"][check]["summary"].get(k) for k in READS[check]}

    def tensors(self, check: str) -> dict[str, torch.Tensor] | None:
        """``check``'s per-image tensors of this audit, or None (no file, or one of another audit)."""
        if check not in self.per_image:
            self.per_image[check] = read_per_image(self.dir, check, self.results["audit"])
        return self.per_image[check]

    def rerun(self, check: str) -> str:
        return _rerun(self.dir, self.results["audit"], check)

    def model_file(self) -> Path:
        """The deployed model: the artefact that ``compressed`` names, else ``model.safetensors``."""
        c = self.compressed or {}
        return self.dir / str(c.get("artefact") or c.get("artifact") or "model.safetensors")


def _info(run_dir: Path) -> dict[str, Any]:
    """The run.json beside an audit, or {} when there is none (an audit of a model pupil did not train) or it is
    unreadable: it only names a compressed run's base and artefact, and leads to the test images."""
    try:
        info = read_json(run_dir / "run.json", "")
    except (PupilError, OSError):
        return {}
    return info if isinstance(info, dict) else {}


def is_compressed(path: str | Path) -> bool:
    """Whether the run at ``path`` (a run directory or its results.json) records a ``compressed`` section."""
    path = Path(path)
    return bool(_info(path if path.is_dir() else path.parent).get("compressed"))


# ---------------------------------------------------------------------------------------------------------------
# Statistics: per-class recall of each resample, the interval of a figure, the disagreements


def recall(y: torch.Tensor, correct: torch.Tensor, k: int, idx: torch.Tensor) -> torch.Tensor:
    """Per-class recall (b, K) of each resample (b, N) of the labels ``y`` and a (N,) bool vector ``correct``;
    NaN for a class the resample holds no image of. Counted with one bincount over offset labels, as
    ``pupil.report.paired.macro_f1``."""
    b = idx.shape[0]
    cell = (y[idx] + torch.arange(b)[:, None] * k).flatten()
    support = torch.bincount(cell, minlength=b * k).reshape(b, k).double()
    hits = torch.bincount(cell, correct[idx].flatten().double(), minlength=b * k).reshape(b, k)
    return hits / support  # 0 / 0 is NaN


def interval(boot: torch.Tensor) -> list[float] | None:
    """The 95% percentile interval of NEW - BASE from (B, 2) replicates, leaving out replicates where the figure
    is undefined (NaN); None when fewer than half of them remain."""
    keep = ~boot.isnan().any(1)
    if int(keep.sum()) < max(2, len(boot) // 2):
        return None
    return bootstrap_summary(boot[keep])["ci95"]


def corruption_accuracy(acc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Accuracy (b, C) of each corruption over each resample (b, n), from (C, n) per-image accuracies (each image's
    share of corrupted copies classified correctly, over the severities): each draw's multiplicities times ``acc``,
    so no (C, b, n) tensor is built."""
    b, n = idx.shape
    counts = torch.zeros(b, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(b, n, dtype=torch.float64))
    return counts @ acc.double().T / n


def disagreements(
    y: torch.Tensor, logits_base: torch.Tensor, logits_new: torch.Tensor, classes: list[str]
) -> dict[str, Any]:
    """The compression-identified exemplars: test images whose top-1 predictions differ between BASE and NEW.

    Returns the count and rate, per true class the images and how many BASE got right and NEW wrong
    (``lost``), the reverse (``gained``) or both wrong (``both_wrong``), the commonest (true, BASE, NEW) triples,
    and ``order``: the disagreeing indices, the images NEW lost first, then those it gained, then the rest, each
    by BASE's confidence in its own prediction (highest first), then by index.
    """
    p0, p1 = logits_base.argmax(1), logits_new.argmax(1)
    c0, c1 = p0 == y, p1 == y
    differ = p0 != p1
    k = len(classes)
    idx = differ.nonzero().flatten()
    kind = torch.where(c0 & ~c1, 0, torch.where(~c0 & c1, 1, 2))  # lost, gained, both wrong

    def per_class(mask: torch.Tensor) -> list[int]:
        return torch.bincount(y[mask], minlength=k).tolist()

    support, n_differ = per_class(torch.ones_like(differ)), per_class(differ)
    lost, gained = per_class(differ & (kind == 0)), per_class(differ & (kind == 1))
    both = per_class(differ & (kind == 2))
    by_class = [
        {
            "class": c,
            "support": support[i],
            "differ": n_differ[i],
            "lost": lost[i],
            "gained": gained[i],
            "both_wrong": both[i],
        }
        for i, c in enumerate(classes)
    ]
    triples = Counter(zip(y[idx].tolist(), p0[idx].tolist(), p1[idx].tolist()))
    top = sorted(triples.items(), key=lambda t: (-t[1], t[0]))[:CONFUSIONS]
    confidence = logits_base.double().softmax(1).amax(1)
    order = sorted(idx.tolist(), key=lambda i: (int(kind[i]), -confidence[i].item(), i))
    return {
        "count": len(idx),
        "n": len(y),
        "rate": len(idx) / max(len(y), 1),
        "lost": sum(lost),
        "gained": sum(gained),
        "both_wrong": sum(both),
        "by_class": by_class,
        "top_confusions": [
            {"true": classes[t], "base": classes[b], "new": classes[n], "count": c} for (t, b, n), c in top
        ],
        "order": order,
        "base_confidence": {i: confidence[i].item() for i in order[:GALLERY]},
        "predictions": {i: (int(y[i]), int(p0[i]), int(p1[i])) for i in order[:GALLERY]},
    }


# ---------------------------------------------------------------------------------------------------------------
# One NEW against BASE


def _row(key: str, base: Any, new: Any, ci95: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    f = FIGURES[key]
    both = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (base, new))
    return {
        "figure": key,
        "label": f.label,
        "unit": f.unit,
        "higher_is_better": f.higher_is_better,
        "base": base,
        "new": new,
        "difference": new - base if both else None,
        "ci95": ci95,
        "flag": None,
        **extra,
    }


class _Pair:
    """Collects the rows, missing figures and notes of one NEW against BASE."""

    def __init__(self, base: Audit, new: Audit, n_bootstrap: int, seed: int):
        self.base, self.new, self.n_bootstrap, self.seed = base, new, n_bootstrap, seed
        self.rows: dict[str, dict[str, Any]] = {}
        self.per_class: list[dict[str, Any]] = []
        self.missing: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def lack(self, keys: list[str], reason: str, commands: list[str]) -> None:
        for key in keys:
            label = FIGURES[key].label if key in FIGURES else PARTS[key]
            self.missing.append({"figure": key, "label": label, "reason": reason, "commands": commands})

    def both_ran(self, keys: list[str]) -> bool:
        """Whether the check of ``keys`` ran on both sides; if not, each key is listed as missing, with the commands
        that run the check where it did not."""
        check = keys[0].split(".")[0]
        lacking = [a for a in (self.base, self.new) if not a.ran(check)]
        if lacking:
            said = f"did not run on {lacking[0].dir}" if len(lacking) == 1 else "ran on neither run"
            self.lack(keys, f"the {check} check {said}", [a.rerun(check) for a in lacking])
        return not lacking

    def no_per_image(self, check: str, what: str) -> None:
        """Note that ``what`` has no interval because a side lacks ``check``'s per-image file."""
        for a in (self.base, self.new):
            if a.tensors(check) is None:
                self.notes.append(
                    f"{what} without an interval: {a.dir} has no per-image figures of its {check} check that belong "
                    f"to its results.json ({a.rerun(check)} rewrites them)"
                )


def _accuracy(pair: _Pair, exemplars: dict[str, Any]) -> None:
    """Top-1, per-class recall and ECE before and after temperature scaling, on one set of bootstrap draws; and the
    exemplars."""
    base, new = pair.base, pair.new
    calibration = pair.both_ran(["calibration.ece", "calibration.ece_after_temperature"])
    if not pair.both_ran(["accuracy.top1", *PARTS]):
        if calibration:
            _calibration_rows(pair, None)
        return
    t0, t1 = base.tensors("accuracy"), new.tensors("accuracy")
    s0, s1 = base.summary("accuracy"), new.summary("accuracy")
    if t0 is None or t1 is None:
        pair.no_per_image("accuracy", "top-1 and ECE")
        pair.rows["accuracy.top1"] = _row("accuracy.top1", s0["top1"], s1["top1"])
        lacking = [a for a in (base, new) if a.tensors("accuracy") is None]
        reason = (
            f"no per-image figures of the accuracy check that belong to {' nor '.join(str(a.dir) for a in lacking)}"
        )
        pair.lack(list(PARTS), reason, [a.rerun("accuracy") for a in lacking])
        if calibration:
            _calibration_rows(pair, None)
        return
    y = t0["targets"].long()
    if not torch.equal(y, t1["targets"].long()):
        raise PupilError(
            f"{base.dir} and {new.dir} have different test labels: a paired comparison needs the same ones"
        )
    classes = base.results["run"]["classes"]
    k, n = len(classes), len(y)
    z0, z1 = t0["logits"].double(), t1["logits"].double()
    c0, c1 = z0.argmax(1) == y, z1.argmax(1) == y
    confs: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (figure, BASE's confidence, NEW's)
    if calibration:
        cal0, cal1 = base.summary("calibration"), new.summary("calibration")
        confs.append(("calibration.ece", z0.softmax(1).amax(1), z1.softmax(1).amax(1)))
        if cal0["temperature"] and cal1["temperature"]:
            confs.append(
                (
                    "calibration.ece_after_temperature",
                    (z0 / cal0["temperature"]).softmax(1).amax(1),
                    (z1 / cal1["temperature"]).softmax(1).amax(1),
                )
            )
    n_bins = int(base.results["checks"].get("calibration", {}).get("config", {}).get("n_bins", 15))

    def stat(i: torch.Tensor) -> torch.Tensor:  # (b, 1 + K + len(confs), 2): each figure of BASE and NEW
        cols = [torch.stack([top1(c0, i), top1(c1, i)], 1)[:, None]]
        cols.append(torch.stack([recall(y, c0, k, i), recall(y, c1, k, i)], 2))
        cols += [torch.stack([ece(a, c0, i, n_bins), ece(b, c1, i, n_bins)], 1)[:, None] for _, a, b in confs]
        return torch.cat(cols, 1)

    boot = paired_bootstrap(stat, (n,), pair.n_bootstrap, pair.seed)
    pair.rows["accuracy.top1"] = _row("accuracy.top1", s0["top1"], s1["top1"], interval(boot[:, 0]), n=n)
    observed = stat(torch.arange(n)[None])[0]  # (1 + K + len(confs), 2)
    support = torch.bincount(y, minlength=k).tolist()
    per_class = []
    for j, c in enumerate(classes):
        r0, r1 = (None if support[j] == 0 else observed[1 + j, m].item() for m in (0, 1))
        row = {"class": c, "support": support[j], "base": r0, "new": r1}
        row |= {"difference": None if r0 is None else r1 - r0, "ci95": interval(boot[:, 1 + j]), "flag": None}
        per_class.append(row)
    pair.per_class = per_class
    if calibration:
        _calibration_rows(pair, {key: interval(boot[:, 1 + k + m]) for m, (key, _, _) in enumerate(confs)})
    exemplars.update(disagreements(y, z0, z1, classes))


def _calibration_rows(pair: _Pair, cis: dict[str, list[float] | None] | None) -> None:
    cal0, cal1 = pair.base.summary("calibration"), pair.new.summary("calibration")
    cis = cis or {}
    pair.rows["calibration.ece"] = _row("calibration.ece", cal0["ece"], cal1["ece"], cis.get("calibration.ece"))
    key = "calibration.ece_after_temperature"
    if cal0["temperature"] is None or cal1["temperature"] is None:
        lacking = [a for a, c in ((pair.base, cal0), (pair.new, cal1)) if c["temperature"] is None]
        reason = (
            f"no temperature was fitted on {' nor '.join(str(a.dir) for a in lacking)} (it has no validation split)"
        )
        pair.lack([key], reason, [])
        return
    t = {"temperature": [cal0["temperature"], cal1["temperature"]]}
    pair.rows[key] = _row(key, cal0["ece_after_temperature"], cal1["ece_after_temperature"], cis.get(key), **t)


def _corruption(pair: _Pair) -> None:
    keys = ["corruption.mean_corrupted_top1", "corruption.worst"]
    if not pair.both_ran(keys):
        return
    base, new = pair.base, pair.new
    metrics = [a.results["checks"]["corruption"]["metrics"] for a in (base, new)]
    names = [m["corruptions"] for m in metrics]
    # The worst corruption's accuracy: the lowest mean over severities, as the corruption section's table has it.
    means = [{c: sum(m["accuracy"][c]) / len(m["accuracy"][c]) for c in m["corruptions"]} for m in metrics]
    worst = [min(m, key=m.get) for m in means]
    drops = [{"corruption": c, "base": means[0][c], "new": means[1][c]} for c in names[0] if c in means[1]]
    for d in drops:
        d["difference"] = d["new"] - d["base"]
    largest = min(drops, key=lambda d: d["difference"], default=None)
    t0, t1 = base.tensors("corruption"), new.tensors("corruption")
    mean_ci, worst_ci = None, None
    if t0 is None or t1 is None:
        pair.no_per_image("corruption", "corruption accuracy")
    else:
        got = _corruption_figure(t0, t1, (names[0], names[1]), pair.n_bootstrap, pair.seed)
        if isinstance(got, str):
            pair.notes.append(f"corruption accuracy without an interval: {got}")
        else:
            mean_ci = got["ci95"]
            a0, a1 = t0["correct"].double().mean(1), t1["correct"].double().mean(1)  # (C, n) per image, over severities
            stat = lambda i: torch.stack([corruption_accuracy(a0, i).amin(1), corruption_accuracy(a1, i).amin(1)], 1)
            worst_ci = interval(paired_bootstrap(stat, (a0.shape[1],), pair.n_bootstrap, pair.seed))
    s0, s1 = base.summary("corruption"), new.summary("corruption")
    key = "corruption.mean_corrupted_top1"
    pair.rows[key] = _row(key, s0["mean_corrupted_top1"], s1["mean_corrupted_top1"], mean_ci)
    detail = f"BASE: {worst[0]}; NEW: {worst[1]}"
    if largest is not None and largest["difference"] < 0:
        detail += f"; largest drop: {largest['corruption']} ({largest['difference'] * 100:+.2f} pt)"
    extra = {"detail": detail, "corruptions": worst, "per_corruption": drops}
    pair.rows["corruption.worst"] = _row("corruption.worst", means[0][worst[0]], means[1][worst[1]], worst_ci, **extra)


def _ood(pair: _Pair) -> None:
    key = "ood.mean_auroc"
    if not pair.both_ran([key]):
        return
    s0, s1 = pair.base.summary("ood"), pair.new.summary("ood")
    t0, t1 = pair.base.tensors("ood"), pair.new.tensors("ood")
    ci = None
    if t0 is None or t1 is None:
        pair.no_per_image("ood", "OOD AUROC")
    else:
        got = _ood_figure(t0, t1, (s0["score"], s1["score"]), pair.n_bootstrap, pair.seed)
        if isinstance(got, str):
            pair.notes.append(f"OOD AUROC without an interval: {got}")
        else:
            ci = got["ci95"]
    pair.rows[key] = _row(key, s0["mean_auroc"], s1["mean_auroc"], ci, detail=f"score: {s0['score']}")


def _summaries(pair: _Pair) -> None:
    """The figures read from summaries only: PGD accuracy, deferral, fairness gap, efficiency, energy."""
    base, new = pair.base, pair.new
    setting = {  # figure -> the summary key that must agree for the figures to be compared
        "adversarial.robust_top1": ("eps", "norm"),
        "uncertainty.deferred": ("target_accuracy",),
        "fairness.accuracy_gap": ("attribute",),
    }
    for key, f in FIGURES.items():
        if f.check in (None, "accuracy", "calibration", "corruption", "ood") or not pair.both_ran([key]):
            continue
        s0, s1 = base.summary(f.check), new.summary(f.check)
        name = key.split(".", 1)[1]
        row = _row(key, s0[name], s1[name])
        if key == "adversarial.robust_top1":
            row["label"] = base.results["checks"]["adversarial"]["headline"]["label"]
        differ = [s for s in setting.get(key, ()) if s0[s] != s1[s]]
        attacks = [a.results["checks"]["adversarial"]["headline"]["label"].split(" robust")[0] for a in (base, new)]
        if key == "adversarial.robust_top1" and attacks[0] != attacks[1]:
            # a model without gradients (an ONNX Runtime session) is attacked by Square Attack, not PGD: the two
            # accuracies measure different attackers, so their difference would say nothing about compression
            row["label"] = "robust accuracy at the reference ε"
            row["difference"] = None
            row["detail"] = f"not comparable: attacked by {attacks[0]} vs {attacks[1]}"
        elif differ:
            said = "; ".join(f"{s} {s0[s]} vs {s1[s]}" for s in differ)
            row["difference"] = None
            row["detail"] = f"not comparable: the audits differ in {said}"
        elif key in setting:
            row["detail"] = ", ".join(f"{s.replace('_', ' ')} {s0[s]}" for s in setting[key])
        pair.rows[key] = row
    sizes = []
    for a in (base, new):
        path = a.model_file()
        sizes.append(path.stat().st_size if path.is_file() else None)
    key = "model.size_on_disk"
    if None in sizes:
        lacking = [str(a.model_file()) for a, s in zip((base, new), sizes) if s is None]
        pair.lack([key], f"no model file at {' nor '.join(lacking)}", [])
    else:
        pair.rows[key] = _row(key, sizes[0], sizes[1], files=[base.model_file().name, new.model_file().name])


def _flags(pair: _Pair) -> list[dict[str, str]]:
    """The flags of ``THRESHOLDS`` on the point estimates; each also marks its row."""
    flags = []
    top = pair.rows.get("accuracy.top1")
    d_top1 = top["difference"] if top else None
    if d_top1 is not None and d_top1 < -TOP1_KEPT - TOLERANCE:
        top["flag"] = f"top-1 lost more than {TOP1_KEPT * 100:g} pt"
        flags.append({"flag": "top1_loss", "figure": "accuracy.top1", "detail": f"top-1 {d_top1 * 100:+.2f} pt"})
    lost = []
    for row in pair.per_class:
        if row["difference"] is not None and row["difference"] < -CLASS_LOSS - TOLERANCE:
            row["flag"] = f"recall lost more than {CLASS_LOSS * 100:g} pt"
            lost.append(row)
    if lost and d_top1 is not None and d_top1 >= -TOP1_KEPT - TOLERANCE:
        said = ", ".join(f"{r['class']} {r['difference'] * 100:+.2f} pt" for r in lost)
        detail = f"top-1 within {TOP1_KEPT * 100:g} pt ({d_top1 * 100:+.2f} pt) but recall fell on {said}"
        flags.append({"flag": "hidden_class_loss", "figure": "accuracy.per_class_recall", "detail": detail})
    corr = pair.rows.get("corruption.mean_corrupted_top1")
    if corr and corr["difference"] is not None and corr["difference"] < -CORRUPTION_LOSS - TOLERANCE:
        corr["flag"] = f"lost more than {CORRUPTION_LOSS * 100:g} pt"
        detail = f"mean corruption accuracy {corr['difference'] * 100:+.2f} pt"
        flags.append({"flag": "corruption_loss", "figure": "corruption.mean_corrupted_top1", "detail": detail})
    return flags


def _provenance(base: Audit, new: Audit) -> tuple[dict[str, Any] | None, list[str]]:
    """What NEW's ``compressed`` section says of it (``PROVENANCE``, the base as ``{name, path, weights_sha256}``),
    and a note when it was not compressed from BASE's weights (by sha256; by path when no hash is recorded)."""
    comp = new.compressed
    if not comp:
        return None, []
    # pupil compress records base: {name, path, weights_sha256}; a plain path and base_weights_sha256 are read too
    given = comp.get("base")
    origin = dict(given) if isinstance(given, dict) else {"path": given}
    origin.setdefault("weights_sha256", comp.get("base_weights_sha256"))
    said = {k: comp[k] for k in PROVENANCE if k in comp} | {"base": origin}
    recorded, path = origin.get("weights_sha256"), base.dir / "model.safetensors"
    if recorded and path.is_file():
        if sha256_file(path) != recorded:
            return said, [
                f"{new.dir} was compressed from {origin.get('path')} (weights sha256 {recorded[:12]}…), not from "
                f"the weights in {path}: BASE is not its base, or was retrained since"
            ]
    elif origin.get("path") and Path(origin["path"]).resolve() != base.dir.resolve():
        return said, [f"{new.dir} was compressed from {origin['path']}, not from {base.dir}"]
    return said, []


def _change(base: Audit, new: Audit, n_bootstrap: int, seed: int, images: _Images) -> dict[str, Any]:
    _refuse_mismatch(base.results, new.results, (base.dir, new.dir))
    pair = _Pair(base, new, n_bootstrap, seed)
    compressed, pair.notes = _provenance(base, new)
    exemplars: dict[str, Any] = {}
    _accuracy(pair, exemplars)
    _corruption(pair)
    _ood(pair)
    _summaries(pair)
    flags = _flags(pair)
    if "order" in exemplars:
        exemplars = _with_gallery(exemplars, images, base.results["run"]["classes"])
    title = "what compression changed" if compressed else "what changed"
    return {
        "title": title,
        "new": {"dir": str(new.dir), "name": new.name},
        "compressed": compressed,
        "figures": [pair.rows[k] for k in FIGURES if k in pair.rows],
        "per_class": pair.per_class,
        "missing": sorted(pair.missing, key=lambda m: ORDER.index(m["figure"])),
        "flags": flags,
        "exemplars": exemplars,
        "notes": pair.notes,
    }


# ---------------------------------------------------------------------------------------------------------------
# The gallery: thumbnails of BASE's test images, read once for every NEW


class _Images:
    """BASE's test split, loaded on first use (None, with the reason, when it cannot be)."""

    def __init__(self, base: Audit):
        self.base = base
        self.loaded = False
        self.images: Any = None
        self.reason = ""

    def get(self, n: int, targets: list[tuple[int, int]]) -> Any:
        """The split's images (N, C, H, W) when it has ``n`` images and each (index, label) of ``targets`` holds."""
        if not self.loaded:
            self.loaded = True
            self.images, self.reason = self._load()
        if self.images is None:
            return None
        data, split_targets = self.images
        if len(split_targets) != n:
            self.reason = f"the test split found now has {len(split_targets)} images, the audit scored {n}"
            return None
        if any(split_targets[i] != t for i, t in targets):
            self.reason = "the test split found now has other labels than the audited one"
            return None
        return data

    def _load(self) -> tuple[Any, str]:
        from pupil.run import load_run

        data_dir = (self.base.results["audit"].get("data") or {}).get("data_dir")
        try:
            split = load_run(self.base.dir, load_model=False).split("test", data_dir)
        except (PupilError, OSError) as e:
            return None, f"BASE's test images are not reachable ({e})"
        return (split.images, split.targets.tolist()), ""


def _with_gallery(exemplars: dict[str, Any], images: _Images, classes: list[str]) -> dict[str, Any]:
    from pupil.results import png_data_uri

    order = exemplars.pop("order")
    confidence = exemplars.pop("base_confidence")
    predictions = exemplars.pop("predictions")
    picks = order[:GALLERY]
    exemplars["gallery"] = []
    exemplars["gallery_note"] = None
    if not picks:
        return exemplars
    data = images.get(exemplars["n"], [(i, predictions[i][0]) for i in picks])
    if data is None:
        exemplars["gallery_note"] = f"no gallery: {images.reason}"
        return exemplars
    thumbs = data[torch.tensor(picks)]  # (G, C, H, W) uint8
    for i, img in zip(picks, thumbs):
        t, b, n = predictions[i]
        kind = "lost" if b == t else "gained" if n == t else "both_wrong"
        item = {"index": i, "true": classes[t], "base": classes[b], "new": classes[n], "kind": kind}
        exemplars["gallery"].append(item | {"base_confidence": confidence[i], "uri": png_data_uri(img, THUMB)})
    shown = f"the first {len(picks)} of {len(order)}" if len(order) > len(picks) else f"all {len(order)}"
    exemplars["gallery_note"] = (
        f"{shown}: images NEW lost first, then those it gained, then those both got wrong; each by BASE's confidence"
    )
    return exemplars


# ---------------------------------------------------------------------------------------------------------------
# The view


def changes(
    base_dir: str | Path,
    new_dirs: list[str | Path],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    skip_mismatched: bool = False,
) -> dict[str, Any]:
    """Every figure of the card, NEW - BASE, for each NEW against BASE (see the module docstring).

    Args:
        base_dir: the reference run directory (or its results.json).
        new_dirs: the runs compared with it (a compressed copy, or any run audited on the same images).
        n_bootstrap: bootstrap replicates of each interval.
        seed: seeds the bootstrap draws (as ``pupil.report.paired``: the same draws for the same seed).
        skip_mismatched: list a NEW that cannot be paired with BASE under ``refused`` with the reason, instead of
            raising.

    Returns:
        ``{"base", "n_bootstrap", "seed", "alpha", "thresholds", "comparisons": [...], "refused": [...]}``; each
        comparison has its title ("what compression changed" or "what changed"), new, compressed (method, kind,
        format, dtype, artefact, bytes and base of NEW's run.json section, or None), figures (figure, label, unit,
        higher_is_better, base, new, difference, ci95, flag, and detail where there is one), per_class (class,
        support, base, new, difference, ci95, flag), missing (figure, label, reason, commands), flags (flag,
        figure, detail), exemplars (count, n, rate, lost, gained, both_wrong, by_class, top_confusions, gallery of
        {index, true, base, new, kind, base_confidence, uri} and gallery_note) and notes.

    Raises:
        PupilError: a NEW audited on other images or settings, with other classes or labels (unless
            ``skip_mismatched``), or a corrupt per-image file.
    """
    base = Audit.open(base_dir)
    images = _Images(base)
    comparisons, refused = [], []
    for d in new_dirs:
        try:
            comparisons.append(_change(base, Audit.open(d), n_bootstrap, seed, images))
        except PupilError as e:
            if not skip_mismatched:
                raise
            refused.append({"new": str(d), "reason": str(e)})
    return {
        "base": {"dir": str(base.dir), "name": base.name},
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "alpha": ALPHA,
        "thresholds": THRESHOLDS,
        "comparisons": comparisons,
        "refused": refused,
    }


# ---------------------------------------------------------------------------------------------------------------
# Text: shared by compare.html and the terminal


def _amount(value: float, unit: str) -> str:
    if unit == "fraction":
        return f"{value * 100:.2f}%"
    if unit == "bytes":
        for size, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:.2f} {suffix}"
        return f"{value:,.0f} B"
    if unit == "count":
        return f"{value:,.0f}"
    if unit == "score":
        return f"{value:.4f}"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{text} {unit}"


def _delta(value: float, unit: str) -> str:
    """A signed difference; one that rounds to zero reads +0 (a float's -1e-12 is no drop)."""
    if unit == "fraction":
        return f"{value * 100 if abs(value) >= 5e-5 else 0.0:+.2f} pt"
    if unit == "score":
        return f"{value if abs(value) >= 5e-5 else 0.0:+.4f}"
    return ("+" if value >= 0 else "-") + _amount(abs(value), unit)


COSTS = ("ms", "img/s", "bytes", "J", "count")  # units whose change reads best as a ratio too
EXACT = ("bytes", "count")  # figures measured without noise: any change is real


def text_row(row: dict[str, Any]) -> dict[str, str]:
    """One figure's cells as text: base, new, difference (with NEW / BASE for costs), interval, flag, detail, and
    ``direction``: "better" or "worse" when the interval excludes 0 (without one: for sizes and counts, any
    change; timings and energy are noisy and stay unmarked)."""
    unit = row["unit"]
    show = lambda v: "—" if v is None else _amount(v, unit)
    diff, ci = row["difference"], row.get("ci95")
    delta = "—" if diff is None else _delta(diff, unit)
    if diff is not None and unit in COSTS and row["base"]:
        delta += f" (×{row['new'] / row['base']:.3g})"
    direction = ""
    clear = (ci[0] > 0 or ci[1] < 0) if ci else unit in EXACT
    if diff is not None and diff != 0 and clear:
        direction = "better" if (diff > 0) == row["higher_is_better"] else "worse"
    return {
        "label": row["label"],
        "base": show(row["base"]),
        "new": show(row["new"]),
        "difference": delta,
        "ci95": "" if not ci else f"[{_delta(ci[0], unit)}, {_delta(ci[1], unit)}]",
        "flag": row.get("flag") or "",
        "detail": row.get("detail") or "",
        "direction": direction,
    }


def per_class_rows(comparison: dict[str, Any], limit: int) -> tuple[list[dict[str, str]], str]:
    """Per-class recall rows as text: every class when there are at most ``limit``, else the ``limit`` with the
    largest drops (flagged classes among them); and a note saying which were left out."""
    rows = comparison["per_class"]
    shown = rows
    note = ""
    if len(rows) > limit:
        shown = sorted(rows, key=lambda r: (r["difference"] is None, r["difference"] or 0.0))[:limit]
        note = f"the {limit} classes whose recall fell most, of {len(rows)}"
    out = []
    for r in shown:
        text = text_row({**r, "label": r["class"], "unit": "fraction", "higher_is_better": True})
        out.append({**text, "support": f"{r['support']:,}"})
    return out, note


def print_changes(view: dict[str, Any], console: Console) -> None:
    """The view in the terminal: per NEW, the figures table, the flags, the classes that lost most, the
    exemplar counts, what is missing and why."""
    from rich.markup import escape
    from rich.table import Table

    base = view["base"]["name"]
    for c in view["comparisons"]:
        method = f" ({c['compressed'].get('method')})" if c["compressed"] and c["compressed"].get("method") else ""
        table = Table(title=f"{c['title']}: {c['new']['name']}{method} against {base} (NEW − BASE)")
        for col in ("figure", "BASE", "NEW", "Δ", "95% CI", "flag"):
            table.add_column(col)
        for row in c["figures"]:
            t = text_row(row)
            style = {"better": "green", "worse": "red"}.get(t["direction"], "")
            delta = f"[{style}]{escape(t['difference'])}[/]" if style else escape(t["difference"])
            table.add_row(escape(t["label"]), t["base"], t["new"], delta, t["ci95"], f"[bold red]{t['flag']}[/]")
        console.print(table)
        classes, note = per_class_rows(c, 10)
        if classes:
            sub = Table(title=f"per-class recall{f' ({note})' if note else ''}")
            for col in ("class", "images", "BASE", "NEW", "Δ", "95% CI", "flag"):
                sub.add_column(col)
            for t in classes:
                sub.add_row(
                    escape(t["label"]), t["support"], t["base"], t["new"], t["difference"], t["ci95"], t["flag"]
                )
            console.print(sub)
        for f in c["flags"]:
            console.print(f"[bold red]flag[/] {f['flag']}: {escape(f['detail'])}")
        ex = c["exemplars"]
        if "count" in ex:
            console.print(
                f"compression-identified exemplars: {ex['count']:,} of {ex['n']:,} test images ({ex['rate']:.2%}) "
                f"change prediction: {ex['lost']:,} BASE got right and NEW wrong, {ex['gained']:,} the reverse, "
                f"{ex['both_wrong']:,} wrong both times",
                markup=False,
            )
        for m in c["missing"]:
            todo = f" ({' and '.join(m['commands'])})" if m["commands"] else ""
            console.print(f"missing: {m['label']}: {m['reason']}{todo}", markup=False)
        for n in c["notes"]:
            console.print(f"note: {n}", markup=False)
    for r in view["refused"]:
        console.print(f"no comparison of {r['new']} with {view['base']['dir']}: {r['reason']}", markup=False)
