"""Release gates: rules a model's audit must pass before it ships, read from a YAML file and judged on results.json.

The file is a YAML list; each item is a rule string or ``{rule: ..., why: ...}``::

    - calibration.ece <= 0.03
    - rule: accuracy.top1 >= base - 0.005 (paired)
      why: a release may not cost more than half a point of accuracy
    - adversarial.pgd@0.1 >= 0.3
    - fairness.accuracy_gap < 5%

Grammar: ``<check>.<figure> <op> <bound> [(paired)]``.

- ``check`` is a check's name; ``figure`` a numeric key of its ``summary`` (``pupil.results.SUMMARY_KEYS``),
  ``headline`` (the section's headline value), or for the adversarial check ``<attack>@<eps>``: the robust
  accuracy of that attack (fgsm, pgd, square) at that epsilon, read from the check's ``robust_accuracy`` curve.
- ``op`` is one of <=, <, >=, >.
- ``bound`` is a number, a percentage (``3%`` is 0.03), ``base``, ``base + x`` or ``base - x`` (x a number or a
  percentage): the same figure of the base run, plus or minus a margin.

A point rule compares the figures as they are: ``value op bound``. A ``(paired)`` rule must have a ``base`` bound
and a figure that ``pupil.report.paired`` tests (accuracy.top1, accuracy.macro_f1, calibration.ece,
corruption.mean_corrupted_top1, ood.mean_auroc, or those checks' headline). It is decided on the paired
difference d = NEW - BASE and its 95% paired-bootstrap interval [lo, hi]: the rule ``NEW op base + m`` is read
as ``d op m`` and **fails only when the whole interval lies on the wrong side of m** (``>=``: hi < m; ``>``:
hi <= m; ``<=``: lo > m; ``<``: lo >= m), that is, only on a significant regression beyond the margin (a
one-sided test at the 2.5% level, not adjusted for the other rules). A difference within the noise of the test
set passes even when the point estimate is past the margin; the detail says so.

A rule whose check did not run, or whose figure is missing (null, an attack or epsilon not audited), fails with a
detail that says what to run. A malformed rule or file is refused in one line naming the file and the rule.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pupil.errors import PupilError
from pupil.results import SUMMARY_KEYS

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
NEGATED = {"<=": ">", "<": ">=", ">=": "<", ">": "<="}
ATTACKS = ("fgsm", "pgd", "square")  # the adversarial check's robust_accuracy curve names these
TEXT_KEYS = {"worst_classes", "norm", "score", "best_score", "method", "attribute", "attribute_kind", "randomized"}
# The figures a rule may name: each check's numeric summary keys, and its headline.
FIGURES: dict[str, tuple[str, ...]] = {
    check: ("headline", *(k for k in keys if k not in TEXT_KEYS and not k.endswith("_ci95")))
    for check, keys in SUMMARY_KEYS.items()
}
# The figures a (paired) rule may name: check -> {figure: the name pupil.report.paired gives it}
PAIRED = {
    "accuracy": {"top1": "accuracy.top1", "headline": "accuracy.top1", "macro_f1": "accuracy.macro_f1"},
    "calibration": {"ece": "calibration.ece", "headline": "calibration.ece"},
    "corruption": {
        "mean_corrupted_top1": "corruption.mean_corrupted_top1",
        "headline": "corruption.mean_corrupted_top1",
    },
    "ood": {"mean_auroc": "ood.mean_auroc", "headline": "ood.mean_auroc"},
}
LABELS = {
    "top1": "top-1",
    "top5": "top-5",
    "macro_f1": "macro-F1",
    "ece": "ECE",
    "ece_after_temperature": "ECE after temperature scaling",
    "mean_corrupted_top1": "mean corruption accuracy",
    "mean_auroc": "OOD mean AUROC",
    "robust_top1": "robust accuracy",
}

NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
RULE = re.compile(
    r"^(?P<check>[A-Za-z_]\w*)\.(?P<figure>[A-Za-z_]\w*(?:@" + NUMBER + r")?)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<bound>[^()]*?)\s*(?P<paired>\(paired\))?$"
)
BOUND = re.compile(
    r"^(?:(?P<base>base)(?:\s*(?P<sign>[+-])\s*(?P<margin>" + NUMBER + r"%?))?|(?P<number>-?" + NUMBER + r"%?))$"
)
GRAMMAR = (
    "<check>.<figure> <op> <bound> [(paired)], with op one of <=, <, >=, > and bound a number, a percentage "
    "(3%), base, base + x or base - x"
)


@dataclass(frozen=True)
class Rule:
    """One parsed gate rule: ``check.figure op bound``, the bound relative to the base run's figure when ``base``."""

    text: str
    """The rule as written."""
    check: str
    figure: str
    """A summary key, ``headline``, or ``<attack>@<eps>`` for the adversarial check."""
    op: str
    bound: float
    """The bound itself, or the margin added to the base run's figure when ``base``."""
    base: bool = False
    paired: bool = False
    why: str = ""

    @property
    def attack(self) -> tuple[str, float] | None:
        """(attack, epsilon) of an ``adversarial.<attack>@<eps>`` rule, else None."""
        if "@" not in self.figure:
            return None
        name, eps = self.figure.split("@")
        return name, float(eps)


def _number(text: str) -> float:
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def parse_rule(text: str, why: str = "", where: str = "") -> Rule:
    """Parse one rule string; ``where`` ("gates.yaml: rule 2") starts the one-line PupilError of a bad one."""

    def refuse(problem: str, allowed: str) -> PupilError:
        return PupilError(f"{where}{' ' if where else ''}{text!r}: {problem}; allowed: {allowed}")

    m = RULE.match(text.strip())
    if not m:
        raise refuse("not a rule", GRAMMAR)
    check, figure, op = m["check"], m["figure"], m["op"]
    b = BOUND.match(m["bound"])
    if not b:
        raise refuse(f"bound {m['bound']!r} is not understood", "a number, a percentage (3%), base, base + x, base - x")
    if check not in FIGURES:
        raise refuse(f"unknown check {check!r}", f"checks {', '.join(FIGURES)}")
    allowed = ", ".join(FIGURES[check]) + (f", <attack>@<eps> (attack {', '.join(ATTACKS)})" * (check == "adversarial"))
    if "@" in figure:
        attack = figure.split("@")[0]
        if check != "adversarial" or attack not in ATTACKS:
            raise refuse(f"check {check} has no figure {figure!r}", f"figures of {check}: {allowed}")
    elif figure not in FIGURES[check]:
        what = "is not a number" if figure in SUMMARY_KEYS[check] else "is not a figure of the check"
        raise refuse(f"{check}.{figure} {what}", f"figures of {check}: {allowed}")
    base = b["base"] is not None
    if not base:
        bound = _number(b["number"])
    else:  # the margin added to the base run's figure
        bound = _number(b["margin"]) * (-1 if b["sign"] == "-" else 1) if b["margin"] else 0.0
    paired = m["paired"] is not None
    if paired and figure not in PAIRED.get(check, {}):
        names = ", ".join(f"{c}.{f}" for c, fs in PAIRED.items() for f in fs)
        raise refuse(f"(paired) is not available for {check}.{figure}", f"(paired) figures {names}")
    if paired and not base:
        raise refuse("a (paired) rule compares with the base run", "(paired) bounds base, base + x, base - x")
    return Rule(text.strip(), check, figure, op, bound, base, paired, why)


def load_gates(path: str | Path) -> list[Rule]:
    """Read a gate file (a YAML list of rule strings or ``{rule, why}`` items, read with ``yaml.safe_load``).

    Raises:
        PupilError: one line naming the file (and the rule) for a missing or unreadable file, an item of the wrong
            shape, or a rule that breaks the grammar or names an unknown check or figure.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PupilError(f"gate file {path} does not exist")
    try:
        items = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PupilError(f"gate file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(items, list) or not items:
        raise PupilError(f"gate file {path} must be a YAML list of rules (strings or {{rule, why}} items)")
    rules = []
    for i, item in enumerate(items, 1):
        where = f"{path}: rule {i}"
        if isinstance(item, dict):
            if not isinstance(item.get("rule"), str) or set(item) - {"rule", "why"}:
                raise PupilError(f"{where}: an item must be a rule string or {{rule: ..., why: ...}}, not {item!r}")
            rules.append(parse_rule(item["rule"], str(item.get("why") or ""), where))
        elif isinstance(item, str):
            rules.append(parse_rule(item, "", where))
        else:
            raise PupilError(f"{where}: an item must be a rule string or {{rule: ..., why: ...}}, not {item!r}")
    return rules


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def _label(rule: Rule, section: dict[str, Any] | None) -> str:
    if rule.attack:
        return f"{rule.attack[0].upper() if rule.attack[0] != 'square' else 'Square'} accuracy at ε={rule.attack[1]:g}"
    if rule.figure == "headline":
        return section["headline"]["label"] if section else f"{rule.check} headline"
    return LABELS.get(rule.figure, f"{rule.check}.{rule.figure}")


def figure_value(results: dict[str, Any], rule: Rule) -> tuple[float | None, str]:
    """The rule's figure in ``results``, or None and why it is missing (with what to run)."""
    section = results["checks"].get(rule.check)
    run = results["run"]["dir"]
    if section is None:
        return None, f"the {rule.check} check did not run on {run}: `pupil audit {run} --checks {rule.check}` runs it"
    if rule.attack:
        attack, eps = rule.attack
        curve = section.get("curves", {}).get("robust_accuracy") or {}
        if attack not in curve:
            ran = ", ".join(k for k in curve if k != "epsilon") or "none"
            return None, f"the adversarial check on {run} ran no {attack} attack (its attacks: {ran})"
        epsilons = curve.get("epsilon", [])
        at = [i for i, e in enumerate(epsilons) if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12)]
        if not at:
            return None, (
                f"the adversarial check on {run} ran at ε {', '.join(f'{e:g}' for e in epsilons)}, not {eps:g}: "
                f"`pupil audit {run} --checks adversarial --set adversarial.epsilons=...` with {eps:g} among them"
            )
        return float(curve[attack][at[0]]), ""
    value = section["headline"]["value"] if rule.figure == "headline" else section["summary"].get(rule.figure)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"{rule.check}.{rule.figure} is {'missing' if value is None else 'not a number'} on {run}"
    return float(value), ""


def _point(rule: Rule, results: dict, base: dict | None) -> dict[str, Any]:
    value, missing = figure_value(results, rule)
    label = _label(rule, results["checks"].get(rule.check))
    if value is None:
        return {"passed": False, "value": None, "bound": None, "detail": missing}
    bound, against = rule.bound, ""
    if rule.base:
        base_value, missing = figure_value(base, rule)
        if base_value is None:
            return {"passed": False, "value": value, "bound": None, "detail": f"the base run lacks it: {missing}"}
        bound = base_value + rule.bound
        margin = f" {'-' if rule.bound < 0 else '+'} {abs(rule.bound):.4g}" if rule.bound else ""
        against = f" (base {base_value:.4g}{margin})"
    passed = OPS[rule.op](value, bound)
    shown = rule.op if passed else NEGATED[rule.op]
    return {
        "passed": passed,
        "value": value,
        "bound": bound,
        "detail": f"{label} {value:.4g} {shown} {bound:.4g}{against}",
    }


def _paired(rule: Rule, results: dict, paired_result: dict) -> dict[str, Any]:
    _, missing = figure_value(results, rule)
    if missing:
        return {"passed": False, "value": None, "bound": None, "detail": missing}
    name = PAIRED[rule.check][rule.figure]
    row = next((r for r in paired_result["figures"] if r["figure"] == name), None)
    if row is None:
        why = next((r["reason"] for r in paired_result["not_compared"] if r["figure"] == name), "not compared")
        return {"passed": False, "value": None, "bound": None, "detail": f"no paired test of {name}: {why}"}
    d, (lo, hi), m = row["difference"], row["ci95"], rule.bound
    fails = {">=": hi < m, ">": hi <= m, "<=": lo > m, "<": lo >= m}[rule.op]
    side = "below" if rule.op in (">=", ">") else "above"
    interval = f"{row['label']} difference {d:+.4g}, 95% interval [{lo:+.4g}, {hi:+.4g}]"
    if fails:
        detail = f"{interval} lies entirely {side} {m:+.4g}: a significant regression"
    else:
        detail = f"{interval} is not entirely {side} {m:+.4g}"
        if not OPS[rule.op](d, m):
            detail += " (the point estimate is past the margin, within the test set's noise)"
    return {
        "passed": not fails,
        "value": row["new"],
        "bound": row["base"] + m,
        "detail": detail,
        "difference": d,
        "ci95": [lo, hi],
        "paired": True,
    }


def evaluate(
    rules: list[Rule],
    results: dict[str, Any],
    base: dict[str, Any] | None = None,
    paired_result: dict[str, Any] | None = None,
    file: str = "",
) -> dict[str, Any]:
    """Judge NEW's ``results`` (a results.json dict) against ``rules``: the results schema's ``gate`` object.

    Args:
        rules: from ``load_gates``.
        results: the audit under judgement.
        base: the base run's results, for ``base`` bounds.
        paired_result: ``pupil.report.paired.paired(BASE, NEW)``, for ``(paired)`` rules.
        file: the gate file's path, recorded in the gate object and named in errors.

    Raises:
        PupilError: a ``base`` rule without ``base``, or a ``(paired)`` rule without ``paired_result``.
    """
    for rule in rules:
        if rule.base and base is None:
            raise PupilError(
                f"{file}: {rule.text!r} compares with the base run, but none was given; "
                "allowed without one: number and percentage bounds (give BASE NEW to pupil compare for base)"
            )
        if rule.paired and paired_result is None:
            raise PupilError(
                f"{file}: {rule.text!r} is (paired) and needs the paired test of the base and new audits "
                "(pupil.report.paired.paired(BASE, NEW))"
            )
    out = []
    for rule in rules:
        got = _paired(rule, results, paired_result) if rule.paired else _point(rule, results, base)
        out.append({"rule": rule.text, **got, **({"why": rule.why} if rule.why else {})})
    return {
        "file": str(file),
        "base": base["run"]["dir"] if base is not None else None,
        "passed": all(r["passed"] for r in out),
        "rules": out,
    }


def gate_lines(gate: dict[str, Any]) -> list[str]:
    """One terminal line per rule: ``PASS rule: detail`` or ``FAIL rule: detail``."""
    return [f"{'PASS' if r['passed'] else 'FAIL'} {r['rule']}: {r['detail']}" for r in gate["rules"]]
