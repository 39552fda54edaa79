"""Release gates (pupil.report.gates): the rule grammar, every way a gate file is refused, and how each kind of
rule is judged, on hand-made results so that every figure is known."""

import copy

import jsonschema
import pytest

from pupil.errors import PupilError
from pupil.report.gates import Rule, evaluate, gate_lines, load_gates, parse_rule
from pupil.results import schema


def _section(headline: float, higher: bool, **summary) -> dict:
    return {"headline": {"label": "h", "value": headline, "higher_is_better": higher}, "summary": summary}


NEW = {
    "run": {"dir": "runs/new", "name": "new"},
    "checks": {
        "accuracy": _section(0.91, True, top1=0.91, macro_f1=0.9, top5=None),
        "calibration": _section(0.041, False, ece=0.041, ece_after_temperature=None, temperature=1.2),
        "adversarial": {
            **_section(0.35, True, robust_top1=0.35, eps=0.1, norm="linf", clean_top1=0.91),
            "curves": {
                "robust_accuracy": {"epsilon": [0, 0.05, 0.1], "fgsm": [0.91, 0.6, 0.45], "pgd": [0.91, 0.5, 0.35]}
            },
        },
    },
}
BASE = copy.deepcopy(NEW)
BASE["run"]["dir"] = "runs/base"
BASE["checks"]["accuracy"]["summary"]["top1"] = 0.92


def _paired(difference: float, lo: float, hi: float, figure: str = "accuracy.top1") -> dict:
    row = {"figure": figure, "label": "top-1 accuracy", "base": 0.92, "new": 0.92 + difference}
    return {"figures": [{**row, "difference": difference, "ci95": [lo, hi]}], "not_compared": []}


def _judge(text: str, results=NEW, base=BASE, paired=None) -> dict:
    gate = evaluate([parse_rule(text)], results, base, paired, "gates.yaml")
    jsonschema.validate(gate, schema()["properties"]["gate"])  # exactly the results schema's gate object
    return gate["rules"][0]


# ---------------------------------------------------------------------------------------------------------------
# Grammar


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("calibration.ece <= 0.03", Rule("calibration.ece <= 0.03", "calibration", "ece", "<=", 0.03)),
        ("calibration.ece<3%", Rule("calibration.ece<3%", "calibration", "ece", "<", 0.03)),
        ("accuracy.top1 >= base", Rule("accuracy.top1 >= base", "accuracy", "top1", ">=", 0.0, base=True)),
        ("accuracy.top1 > base + 1%", Rule("accuracy.top1 > base + 1%", "accuracy", "top1", ">", 0.01, base=True)),
        (
            "accuracy.top1 >= base - 0.005 (paired)",
            Rule("accuracy.top1 >= base - 0.005 (paired)", "accuracy", "top1", ">=", -0.005, base=True, paired=True),
        ),
        ("ood.headline >= .9", Rule("ood.headline >= .9", "ood", "headline", ">=", 0.9)),
        (
            "fairness.accuracy_gap <= -1e-2",
            Rule("fairness.accuracy_gap <= -1e-2", "fairness", "accuracy_gap", "<=", -0.01),
        ),
    ],
)
def test_rules_parse(text, want):
    assert parse_rule(text) == want


@pytest.mark.parametrize(
    ("text", "attack"), [("adversarial.pgd@0.1 >= 0.3", ("pgd", 0.1)), ("adversarial.fgsm@8e-3 > 50%", ("fgsm", 0.008))]
)
def test_adversarial_attack_at_epsilon_parses(text, attack):
    rule = parse_rule(text)
    assert rule.check == "adversarial" and rule.attack == attack and rule.base is False
    assert parse_rule("adversarial.robust_top1 >= 0.3").attack is None


BAD_RULES = {
    "accuracy top1 >= 0.9": "not a rule; allowed: <check>.<figure> <op> <bound>",
    "accuracy.top1 = 0.9": "not a rule",
    "accuracy.top1 >= ninety": "bound 'ninety' is not understood; allowed: a number, a percentage",
    "accuracy.top1 >= base * 2": "bound 'base \\* 2' is not understood",
    "accuracy.top1 >= 0.9 (pared)": "not a rule",
    "robustness.top1 >= 0.9": "unknown check 'robustness'; allowed: checks accuracy, calibration",
    "calibration.brier <= 0.1": "calibration.brier is not a figure of the check; allowed: figures of calibration: "
    "headline, ece, ece_after_temperature, temperature",
    "accuracy.worst_classes >= 0.5": "accuracy.worst_classes is not a number",
    "accuracy.top1_ci95 >= 0.5": "accuracy.top1_ci95 is not a number",
    "accuracy.pgd@0.1 >= 0.5": "check accuracy has no figure 'pgd@0.1'",
    "adversarial.cw@0.1 >= 0.5": "check adversarial has no figure 'cw@0.1'.*<attack>@<eps> "
    "\\(attack fgsm, pgd, square\\)",
    "efficiency.params <= base (paired)": "\\(paired\\) is not available for efficiency.params; allowed: \\(paired\\) "
    "figures accuracy.top1",
    "adversarial.pgd@0.1 >= base (paired)": "\\(paired\\) is not available",
    "accuracy.top1 >= 0.9 (paired)": "a \\(paired\\) rule compares with the base run",
}


@pytest.mark.parametrize("text", BAD_RULES)
def test_bad_rules_are_refused_in_one_line_naming_the_file_and_rule(text, tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text(f"- calibration.ece <= 0.03\n- {text!r}\n".replace("'", '"'))
    with pytest.raises(PupilError, match=BAD_RULES[text]) as e:
        load_gates(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: rule 2 {text!r}") and "allowed:" in msg


BAD_FILES = {
    "calibration.ece <= 0.03\n": "must be a YAML list of rules",
    "[]\n": "must be a YAML list of rules",
    "- [calibration.ece, 0.03]\n": "rule 1: an item must be a rule string or \\{rule: ..., why: ...\\}",
    "- 0.03\n": "rule 1: an item must be a rule string",
    "- {rule: calibration.ece <= 0.03, because: x}\n": "rule 1: an item must be",
    "- {why: no rule}\n": "rule 1: an item must be",
    "- calibration.ece <= 0.03\n- [unclosed\n": "is not valid YAML",
    '- !!python/object/apply:os.system ["echo unsafe"]\n': "is not valid YAML",  # safe_load only
}


@pytest.mark.parametrize("text", BAD_FILES)
def test_bad_gate_files_are_refused(text, tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text(text)
    with pytest.raises(PupilError, match=BAD_FILES[text]) as e:
        load_gates(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_gate_file_is_refused(tmp_path):
    with pytest.raises(PupilError, match="gate file .*nope.yaml does not exist"):
        load_gates(tmp_path / "nope.yaml")


def test_gate_file_with_reasons(tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text("- calibration.ece <= 0.03\n- rule: adversarial.pgd@0.1 >= 0.3\n  why: the security review\n")
    rules = load_gates(path)
    assert [r.text for r in rules] == ["calibration.ece <= 0.03", "adversarial.pgd@0.1 >= 0.3"]
    assert rules[1].why == "the security review" and rules[0].why == ""
    gate = evaluate(rules, NEW, file=str(path))
    assert gate["file"] == str(path) and gate["base"] is None and gate["passed"] is False
    assert gate["rules"][1]["why"] == "the security review" and "why" not in gate["rules"][0]
    assert gate_lines(gate) == [
        "FAIL calibration.ece <= 0.03: ECE 0.041 > 0.03",
        "PASS adversarial.pgd@0.1 >= 0.3: PGD accuracy at ε=0.1 0.35 >= 0.3",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Judging


def test_point_rules():
    r = _judge("calibration.ece <= 0.03")
    assert (r["passed"], r["value"], r["bound"], r["detail"]) == (False, 0.041, 0.03, "ECE 0.041 > 0.03")
    assert _judge("calibration.ece <= 5%")["passed"]
    assert _judge("calibration.headline < 0.05")["passed"]  # the headline value
    r = _judge("accuracy.top1 >= base - 0.005")
    assert (
        not r["passed"]
        and r["bound"] == pytest.approx(0.915)
        and r["detail"] == "top-1 0.91 < 0.915 (base 0.92 - 0.005)"
    )
    assert _judge("accuracy.top1 >= base - 1%")["passed"]
    assert not _judge("accuracy.top1 > base")["passed"] and _judge("calibration.ece <= base")["passed"]


def test_adversarial_attack_rules_read_the_robust_accuracy_curve():
    assert _judge("adversarial.pgd@0.05 >= 0.5")["value"] == 0.5
    assert _judge("adversarial.fgsm@0.1 > 0.4")["passed"] and not _judge("adversarial.pgd@0.1 > 0.4")["passed"]
    r = _judge("adversarial.pgd@0.2 >= 0.1")
    assert not r["passed"] and r["value"] is None and "ran at ε 0, 0.05, 0.1, not 0.2" in r["detail"]
    assert "--set adversarial.epsilons=" in r["detail"]
    r = _judge("adversarial.square@0.1 >= 0.1")
    assert not r["passed"] and "ran no square attack (its attacks: fgsm, pgd)" in r["detail"]


def test_rules_that_cannot_be_judged_fail_and_say_what_to_run():
    r = _judge("ood.mean_auroc >= 0.9")
    assert (
        not r["passed"]
        and r["detail"] == "the ood check did not run on runs/new: `pupil audit runs/new --checks ood` runs it"
    )
    r = _judge("calibration.ece_after_temperature <= 0.05")
    assert not r["passed"] and "is missing on runs/new" in r["detail"]
    base = copy.deepcopy(BASE)
    del base["checks"]["calibration"]
    r = _judge("calibration.ece <= base", base=base)
    assert not r["passed"] and "the base run lacks it: the calibration check did not run on runs/base" in r["detail"]


def test_base_and_paired_rules_need_their_inputs():
    with pytest.raises(PupilError, match="gates.yaml: 'accuracy.top1 >= base' compares with the base run, but none"):
        evaluate([parse_rule("accuracy.top1 >= base")], NEW, None, None, "gates.yaml")
    with pytest.raises(PupilError, match="is \\(paired\\) and needs the paired test"):
        evaluate([parse_rule("accuracy.top1 >= base (paired)")], NEW, BASE, None, "gates.yaml")


@pytest.mark.parametrize(
    ("rule", "difference", "ci", "passed", "past"),
    [
        ("accuracy.top1 >= base - 0.005 (paired)", -0.02, (-0.03, -0.01), False, True),  # wholly below the margin
        ("accuracy.top1 >= base - 0.005 (paired)", -0.02, (-0.04, 0.001), True, True),  # past it, within the noise
        ("accuracy.top1 >= base - 0.005 (paired)", 0.0, (-0.005, 0.005), True, False),
        ("accuracy.top1 > base - 0.005 (paired)", -0.01, (-0.02, -0.005), False, True),  # strict: hi on the margin
        ("accuracy.top1 >= base - 0.005 (paired)", -0.01, (-0.02, -0.005), True, True),
        ("calibration.ece <= base + 0.01 (paired)", 0.03, (0.02, 0.04), False, True),  # lower is better
        ("calibration.ece <= base + 0.01 (paired)", 0.03, (0.005, 0.05), True, True),
        ("calibration.ece < base + 0.01 (paired)", 0.02, (0.01, 0.03), False, True),
    ],
)
def test_paired_rules_fail_only_on_a_significant_regression(rule, difference, ci, passed, past):
    figure = "accuracy.top1" if rule.startswith("accuracy") else "calibration.ece"
    r = _judge(rule, paired=_paired(difference, *ci, figure=figure))
    assert r["passed"] is passed and r["paired"] is True and r["difference"] == difference and r["ci95"] == list(ci)
    assert r["value"] == pytest.approx(0.92 + difference) and r["bound"] == pytest.approx(0.92 + parse_rule(rule).bound)
    assert ("a significant regression" in r["detail"]) is (not passed)
    assert ("past the margin" in r["detail"]) is (passed and past)


def test_paired_rule_on_a_figure_the_paired_test_left_out_fails_with_the_reason():
    paired = {"figures": [], "not_compared": [{"figure": "accuracy.top1", "reason": "the two audits differ"}]}
    r = _judge("accuracy.headline >= base (paired)", paired=paired)
    assert not r["passed"] and r["detail"] == "no paired test of accuracy.top1: the two audits differ"


def test_the_example_gate_file_in_the_readme_parses():
    from tests.conftest import ROOT

    rules = load_gates(ROOT / "examples" / "release_gates.yaml")
    assert len(rules) == 7 and all(r.why for r in rules)
    assert [r.text for r in rules if r.paired] == [
        "accuracy.top1 >= base - 0.005 (paired)",
        "calibration.ece <= base + 0.01 (paired)",
        "corruption.mean_corrupted_top1 >= base - 0.02 (paired)",
    ]
    assert next(r for r in rules if r.attack).attack == ("pgd", 0.02)
