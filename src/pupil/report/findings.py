"""Findings in plain words: the few sentences at the top of the report card that say what the audit found.

Each rule is a small function of results.json that reads what it needs (a check's ``summary``, ``metrics`` or
``tables``) and returns one ``Finding``, a sentence with its figures and the card section that holds the evidence,
or None when it has nothing to say: the check did not run, a field is absent, or the figure is unremarkable.
Nothing here knows a model or a dataset; the limits that make a figure remarkable are named constants with the
reason beside them.

The card shows at most ``LIMIT`` findings: the most severe first (a failed gate, a model at chance, then figures
that call for action, then plain information), and within a level in the order of ``RULES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pupil.report.labels import level, percent, show, term

LIMIT = 6
ALERT, NOTABLE, INFO = 2, 1, 0  # levels: act before use, worth a look, what the figure is
LEVEL_NAMES = {ALERT: "alert", NOTABLE: "notable", INFO: "info"}

WEAK_CLASS_GAP = 0.05  # a class whose recall is 5 points below top-1 is worth naming
CALIBRATED_ECE = 0.02  # Guo et al. 2017: temperature-scaled networks reach 1-2% ECE
CORRUPTION_DROP = 0.10  # losing 10 points of accuracy to ordinary corruptions is worth a look
WEAK_OOD_AUROC = 0.80  # at 80% AUROC one unfamiliar image in five outranks a real one
HIGH_DEFERRAL = 0.40  # answering fewer than 60% of cases leaves most of the work to people
FAIR_GAP = 0.02  # a gap whose whole interval lies above 2 points is not sampling noise
COVERAGE_SLACK = 0.01  # empirical coverage scatters by well under a point with a few thousand calibration images
SHIFT_COVERAGE_DROP = 0.05  # a 5-point coverage drop under corruption means the guarantee is gone


@dataclass(frozen=True)
class Finding:
    """One sentence of the card's findings: its ``text``, the ``anchor`` of the section with the evidence, its
    ``level`` (ALERT, NOTABLE or INFO) and the ``rule`` that wrote it."""

    text: str
    anchor: str
    level: int
    rule: str

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]


def _section(results: dict[str, Any], check: str) -> dict[str, Any]:
    return results.get("checks", {}).get(check) or {}


def _summary(results: dict[str, Any], check: str) -> dict[str, Any]:
    return _section(results, check).get("summary") or {}


def _metrics(results: dict[str, Any], check: str) -> dict[str, Any]:
    return _section(results, check).get("metrics") or {}


def _rows(results: dict[str, Any], check: str, table: str) -> list[dict[str, Any]]:
    """A table of a check as dicts keyed by column ([] when the check or table is absent)."""
    t = _section(results, check).get("tables", {}).get(table) or {}
    return [dict(zip(t.get("columns", []), row, strict=False)) for row in t.get("rows", [])]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# --- the rules ------------------------------------------------------------------------------------------------------


def gate(results: dict[str, Any]) -> Finding | None:
    """The release gate's verdict, naming the failed rules."""
    g = results.get("gate")
    if not g or not isinstance(g.get("rules"), list):
        return None
    rules = g["rules"]
    failed = [r for r in rules if not r.get("passed")]
    if not failed:
        name = Path(g.get("file") or "").name or "the gate file"
        return Finding(f"Release gate passed: all {len(rules)} rules of {name} hold", "gate", INFO, "gate")
    shown = "; ".join(f"{r['rule']}: {r['detail']}" for r in failed[:2])
    more = f"; and {len(failed) - 2} more" if len(failed) > 2 else ""
    text = f"Release gate failed: {len(failed)} of {len(rules)} rules ({shown}{more})"
    return Finding(text, "gate", ALERT, "gate")


def data_mismatch(results: dict[str, Any]) -> Finding | None:
    """The audited images are not the ones the run was trained with (their fingerprints differ)."""
    d = results.get("audit", {}).get("data") or {}
    if d.get("matches_training") is not False:
        return None
    text = f"The audited data ({d.get('dataset')}) is not the data the run was trained on: its fingerprint differs"
    return Finding(text, "data", ALERT, "data_mismatch")


def _near_chance(results: dict[str, Any]) -> tuple[float, int] | None:
    """(chance, classes) when top-1's interval tops out within 10% of chance (the accuracy check's own test)."""
    s, k = _summary(results, "accuracy"), len(results.get("run", {}).get("classes", []))
    ci = s.get("top1_ci95")
    if k < 2 or not isinstance(ci, list) or len(ci) != 2:
        return None
    chance = 1 / k
    return (chance, k) if ci[1] < chance + 0.1 * (1 - chance) else None


def chance(results: dict[str, Any]) -> Finding | None:
    """Top-1 accuracy near chance: the preprocessing or the class order is likely wrong."""
    near, top1 = _near_chance(results), _summary(results, "accuracy").get("top1")
    if near is None or not _number(top1):
        return None
    text = (
        f"Top-1 accuracy {percent(top1)} is near chance ({percent(near[0])} for {near[1]:,} classes): check the "
        "preprocessing (mean and std, input range, channel order) and the class order"
    )
    return Finding(text, "accuracy", ALERT, "chance")


def accuracy(results: dict[str, Any]) -> Finding | None:
    """Top-1 accuracy with its interval and the number of test images."""
    s = _summary(results, "accuracy")
    top1, ci, n = s.get("top1"), s.get("top1_ci95"), _metrics(results, "accuracy").get("n")
    if not _number(top1) or _near_chance(results):
        return None
    text = f"Top-1 accuracy is {percent(top1)}"
    if isinstance(ci, list) and len(ci) == 2:
        text += f" (95% interval {show(ci, 'interval:fraction')})"
    if _number(n):
        text += f" on {n:,} test images"
    return Finding(text, "accuracy", INFO, "accuracy")


def weakest_class(results: dict[str, Any]) -> Finding | None:
    """The class of lowest recall, when it is clearly below top-1, and what it is most confused with."""
    s = _summary(results, "accuracy")
    worst, top1 = s.get("worst_classes"), s.get("top1")
    if not worst or not _number(top1) or len(results.get("run", {}).get("classes", [])) < 3:
        return None
    name, recall = worst[0]
    if recall > top1 - WEAK_CLASS_GAP:
        return None
    text = f"{name} is the weakest class: recall {percent(recall)}"
    confused = next((r for r in _rows(results, "accuracy", "most_confused") if r.get("true") == name), None)
    if confused:
        text += f", most confused with {confused['predicted']}"
    return Finding(text, "accuracy", NOTABLE, "weakest_class")


def calibration(results: dict[str, Any]) -> Finding | None:
    """Over- or under-confidence (ECE), and what temperature scaling does to it."""
    s, m = _summary(results, "calibration"), _metrics(results, "calibration")
    ece, after, t = s.get("ece"), s.get("ece_after_temperature"), s.get("temperature")
    if not _number(ece):
        return None
    if ece < CALIBRATED_ECE:
        return Finding(f"Confidence matches accuracy: ECE {percent(ece)}", "calibration", INFO, "calibration")
    before = m.get("before") or {}
    conf, acc = before.get("mean_confidence"), before.get("accuracy")
    if _number(conf) and _number(acc) and conf != acc:
        direction = "over-confident" if conf > acc else "under-confident"
    elif _number(t) and t != 1:
        direction = "over-confident" if t > 1 else "under-confident"  # T > 1 softens the probabilities
    else:
        direction = "miscalibrated"
    text = f"The model is {direction}: ECE {percent(ece)}"
    if _number(after) and _number(t):
        text += f", {percent(after)} after temperature scaling (T = {show(t)})"
    return Finding(text, "calibration", NOTABLE, "calibration")


def _budget(eps: float, norm: str) -> str:
    """ε in words: for L∞ also as the largest change of a pixel in 8-bit steps."""
    if norm == "linf":
        return f"ε = {eps:g} (at most {round(eps * 255)}/255 per pixel)"
    return f"ε = {eps:g} ({term(norm)})"


def adversarial(results: dict[str, Any]) -> Finding | None:
    """The smallest ε at which the strongest attack halves the accuracy, or what it does at the headline ε."""
    s, m = _summary(results, "adversarial"), _metrics(results, "adversarial")
    attack = m.get("attack") or "pgd"
    clean, norm = s.get("clean_top1"), s.get("norm") or m.get("norm") or "linf"
    if not _number(clean) or clean <= 0:
        return None
    name = term(attack)
    epsilons, accs = m.get("epsilons") or [], m.get(f"{attack}_accuracy") or []
    half = next(((e, a) for e, a in zip(epsilons, accs, strict=False) if e > 0 and a <= clean / 2), None)
    if half:
        head = s.get("eps")
        lvl = NOTABLE if not _number(head) or half[0] <= head else INFO
        text = f"A {name} attack at {_budget(half[0], norm)} halves the accuracy: {percent(clean)} → {percent(half[1])}"
        return Finding(text, "adversarial", lvl, "adversarial")
    eps, robust = s.get("eps"), s.get("robust_top1")
    if not _number(eps) or not _number(robust) or eps <= 0:
        return None
    text = f"A {name} attack at {_budget(eps, norm)} lowers accuracy from {percent(clean)} to {percent(robust)}"
    return Finding(text, "adversarial", INFO, "adversarial")


def attack_sanity(results: dict[str, Any]) -> Finding | None:
    """The attack's sanity checks failed: the robust accuracy may be overstated."""
    sanity = _metrics(results, "adversarial").get("sanity") or {}
    if sanity.get("passed") is not False or not sanity.get("failures"):
        return None
    text = f"The attack may be too weak, so robustness is overstated: {sanity['failures'][0]}"
    return Finding(text, "adversarial", ALERT, "attack_sanity")


def corruption(results: dict[str, Any]) -> Finding | None:
    """Mean accuracy under corruption against clean, and the worst corruption."""
    s = _summary(results, "corruption")
    clean, mean = s.get("clean_top1"), s.get("mean_corrupted_top1")
    if not _number(clean) or not _number(mean):
        return None
    text = f"Common corruptions lower accuracy from {percent(clean)} to {percent(mean)} on average"
    rows = [r for r in _rows(results, "corruption", "by_corruption") if _number(r.get("mean accuracy"))]
    if len(rows) > 1:
        worst = min(rows, key=lambda r: r["mean accuracy"])
        text += f"; {term(worst['corruption'])} is the worst ({percent(worst['mean accuracy'])})"
    lvl = NOTABLE if clean - mean >= CORRUPTION_DROP else INFO
    return Finding(text, "corruption", lvl, "corruption")


def ood(results: dict[str, Any]) -> Finding | None:
    """The unfamiliar set hardest to flag with the headline score, and the best score's mean."""
    s, m = _summary(results, "ood"), _metrics(results, "ood")
    score, sets = s.get("score"), m.get("sets") or {}
    aurocs = {name: v[score]["auroc"] for name, v in sets.items() if _number((v.get(score) or {}).get("auroc"))}
    if not aurocs:
        return None
    hardest = min(aurocs, key=aurocs.get)
    text = (
        f"Images from {hardest} are the hardest to flag as unfamiliar: AUROC {percent(aurocs[hardest])} with the "
        f"{term(score)} score (50% is chance)"
    )
    best = s.get("best_score")
    best_mean = ((m.get("mean") or {}).get(best) or {}).get("auroc")
    if best and best != score and _number(best_mean):
        text += f"; the {term(best)} score does better ({percent(best_mean)} on average)"
    lvl = NOTABLE if aurocs[hardest] < WEAK_OOD_AUROC else INFO
    return Finding(text, "ood", lvl, "ood")


def deferral(results: dict[str, Any]) -> Finding | None:
    """How much must go to a person for the target accuracy on the rest."""
    s = _summary(results, "uncertainty")
    target, deferred, threshold = s.get("target_accuracy"), s.get("deferred"), s.get("deferral_threshold")
    if not _number(target):
        return None
    if threshold is None:
        text = f"No confidence threshold reaches {level(target)} accuracy: every case would go to a person"
        return Finding(text, "uncertainty", NOTABLE, "deferral")
    if not _number(deferred):
        return None
    text = (
        f"To reach {level(target)} accuracy the model must hand {percent(deferred)} of cases to a person "
        f"(those with confidence below {percent(threshold)})"
    )
    soft = ((_metrics(results, "uncertainty").get("sources") or {}).get("softmax") or {}).get("deferral") or {}
    if soft.get("meets_target_on_test") is False and _number(soft.get("test_accuracy")):
        text += f"; on the test images the answered cases reach {percent(soft['test_accuracy'])}"
    return Finding(text, "uncertainty", NOTABLE if deferred > HIGH_DEFERRAL else INFO, "deferral")


def fairness(results: dict[str, Any]) -> Finding | None:
    """The accuracy gap between groups, its interval, and the worst-served group."""
    s, m = _summary(results, "fairness"), _metrics(results, "fairness")
    gap, ci, attribute = s.get("accuracy_gap"), s.get("accuracy_gap_ci95"), s.get("attribute")
    if not _number(gap) or not attribute:
        return None
    asides = ["a proxy property, not people"] if s.get("attribute_kind") == "proxy" else []
    if isinstance(ci, list) and len(ci) == 2:
        asides.append(f"95% interval {show(ci, 'interval:points')}")
    text = f"Accuracy differs by {show(gap, 'points')} between {attribute} groups"
    text += f" ({'; '.join(asides)})" if asides else ""
    worst = (m.get("gaps") or {}).get("accuracy") or {}
    if worst.get("worst_group") is not None and _number(worst.get("worst_value")):
        text += f"; lowest for {worst['worst_group']} ({percent(worst['worst_value'])})"
    significant = isinstance(ci, list) and len(ci) == 2 and _number(ci[0]) and ci[0] > FAIR_GAP
    return Finding(text, "fairness", NOTABLE if significant else INFO, "fairness")


def conformal(results: dict[str, Any]) -> Finding | None:
    """Prediction-set size at a target coverage, or a coverage short of its target."""
    s = _summary(results, "conformal")
    for pct in (95, 90, 99):
        coverage, size = s.get(f"coverage_{pct}"), s.get(f"set_size_{pct}")
        if _number(coverage) and _number(size):
            break
    else:
        return None
    if coverage < pct / 100 - COVERAGE_SLACK:
        text = (
            f"Prediction sets meant to cover {pct}% of images cover only {percent(coverage)}: the test data may "
            "differ from the calibration data"
        )
        return Finding(text, "conformal", ALERT, "conformal")
    score = s.get("score")
    text = f"At {pct}% coverage the model needs {size:.1f} labels per image on average" + (
        f" ({term(score)})" if score else ""
    )
    return Finding(text, "conformal", INFO, "conformal")


def conformal_shift(results: dict[str, Any]) -> Finding | None:
    """The corruption under which the prediction sets lose the most coverage."""
    s, shift = _summary(results, "conformal"), _metrics(results, "conformal").get("corruption") or {}
    score, ref = s.get("score"), _metrics(results, "conformal").get("reference_level")
    if not score or not _number(ref) or not shift.get("corruptions"):
        return None
    key = f"{ref:g}"
    try:
        clean = shift["clean"][score][key]["coverage"]
        cov = {c: shift["corrupted"][c][score][key]["coverage"] for c in shift["corruptions"]}
    except (KeyError, TypeError):
        return None
    worst = min(cov, key=cov.get)
    if clean - cov[worst] < SHIFT_COVERAGE_DROP:
        return None
    text = (
        f"Under {term(worst)} the {level(ref)} prediction sets cover only {percent(cov[worst])} of images "
        f"({percent(clean)} clean): the guarantee does not hold on corrupted data"
    )
    return Finding(text, "conformal", NOTABLE, "conformal_shift")


def certify(results: dict[str, Any]) -> Finding | None:
    """The share certified at the headline radius."""
    s = _summary(results, "certify")
    cert, radius, sigma = s.get("certified_top1"), s.get("radius"), s.get("sigma")
    if not (_number(cert) and _number(radius) and _number(sigma)):
        return None
    text = (
        f"Randomized smoothing (σ = {sigma:g}) certifies {percent(cert)} of test images against any change of L2 "
        f"size {radius:g}"
    )
    if _metrics(results, "certify").get("trained_task") == "classification":
        text += "; the model was not trained with noise, which would certify more"
    return Finding(text, "certify", INFO, "certify")


def explain(results: dict[str, Any]) -> Finding | None:
    """Explanation methods that fail the randomisation sanity check, else the most faithful one."""
    s, per = _summary(results, "explain"), _metrics(results, "explain").get("per_method") or {}
    flagged = [term(name) for name, v in per.items() if v.get("flagged")]
    if flagged:
        names = ", ".join(flagged[:-1]) + (" and " if len(flagged) > 1 else "") + flagged[-1]
        text = (
            f"{names} maps barely change when the model's weights are randomised: they fail the sanity check of "
            "Adebayo et al. (2018)"
        )
        return Finding(text, "explain", NOTABLE, "explain")
    method, gap = s.get("method"), s.get("insertion_deletion_gap")
    if not method or not _number(gap):
        return None
    text = f"{term(method)} gives the most faithful explanations: insertion − deletion AUC {gap:.2f}"
    return Finding(text, "explain", INFO, "explain")


def cost(results: dict[str, Any]) -> Finding | None:
    """Time per image and energy per 1,000 images."""
    eff, energy = _summary(results, "efficiency"), _summary(results, "energy")
    latency, joules = eff.get("latency_ms_p50"), energy.get("energy_j_per_1000_images")
    parts = []
    if _number(latency):
        device = _metrics(results, "efficiency").get("device") or results.get("audit", {}).get("device")
        parts.append(f"One image takes {show(latency, 'ms')}" + (f" on {device}" if device else "") + " (batch of 1)")
    if _number(joules):
        co2 = energy.get("emissions_kg_co2eq")
        images = energy.get("images")
        per = f" ({show(co2 / images * 1000, 'kg')} CO₂-eq)" if _number(co2) and _number(images) and images > 0 else ""
        parts.append(f"1,000 images use {show(joules, 'J')} of energy{per}")
    if not parts:
        return None
    return Finding("; ".join(parts), "efficiency" if _number(latency) else "energy", INFO, "cost")


# The rules in the order the card lists findings of one level.
RULES: list[Callable[[dict[str, Any]], Finding | None]] = [
    gate,
    data_mismatch,
    chance,
    attack_sanity,
    accuracy,
    weakest_class,
    calibration,
    adversarial,
    corruption,
    ood,
    conformal_shift,
    deferral,
    conformal,
    fairness,
    explain,
    certify,
    cost,
]


def findings(results: dict[str, Any], limit: int = LIMIT) -> list[Finding]:
    """The card's findings: every rule that fires, most severe first, at most ``limit``."""
    found = []
    for rule in RULES:
        try:
            f = rule(results)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError):
            f = None  # a results.json of an unexpected shape costs that finding, not the card
        if f is not None:
            found.append(f)
    return sorted(found, key=lambda f: -f.level)[:limit]  # sorted is stable: RULES order within a level
