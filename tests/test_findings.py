"""The card's findings: each rule on crafted results (the exact sentence when it fires, silence when its check did
not run, a field is absent or the figure is unremarkable), their ranking, and every check once on a real tiny audit
(every metric labelled, the findings linked to sections that exist)."""

import copy
import html
import re

import pytest

from pupil.report import findings as F
from pupil.report.labels import fallbacks
from pupil.report.render import load_thresholds, render_html


def results(**checks) -> dict:
    """A results dict with the given checks, each ``name={"summary": ..., "metrics": ..., "tables": ...}``."""
    return {
        "run": {"name": "r", "dataset": "d", "classes": [f"c{i}" for i in range(10)], "model": {"name": "m"}},
        "audit": {"device": "cpu"},
        "checks": {name: {"summary": {}, "metrics": {}, **parts} for name, parts in checks.items()},
    }


def table(columns, rows):
    return {"columns": columns, "rows": rows}


ACCURACY = {
    "summary": {"top1": 0.9, "top1_ci95": [0.89, 0.91], "worst_classes": [["Shirt", 0.778], ["Coat", 0.85]]},
    "metrics": {"n": 10000},
    "tables": {
        "most_confused": table(
            ["true", "predicted", "count", "fraction of true class"],
            [["Coat", "Pullover", 90, 0.09], ["Shirt", "T-shirt/top", 120, 0.12], ["Shirt", "Coat", 50, 0.05]],
        )
    },
}
CALIBRATION = {
    "summary": {"ece": 0.088, "ece_after_temperature": 0.0097, "temperature": 0.64},
    "metrics": {"before": {"mean_confidence": 0.84, "accuracy": 0.928}},
}
ADVERSARIAL = {
    "summary": {"robust_top1": 0.0, "eps": 0.1, "norm": "linf", "clean_top1": 0.926},
    "metrics": {
        "attack": "pgd",
        "epsilons": [0.0, 0.02, 0.05, 0.1],
        "pgd_accuracy": [0.926, 0.46, 0.002, 0.0],
        "sanity": {"passed": True, "failures": []},
    },
}
GATE = {
    "file": "release/gates.yaml",
    "base": None,
    "passed": False,
    "rules": [
        {"rule": "accuracy.top1 >= 0.9", "passed": True, "value": 0.93, "bound": 0.9, "detail": "top-1 0.93 >= 0.9"},
        {"rule": "calibration.ece <= 0.03", "passed": False, "value": 0.041, "bound": 0.03, "detail": "ECE 4.1% > 3%"},
        {"rule": "ood.mean_auroc >= 0.9", "passed": True, "value": 0.95, "bound": 0.9, "detail": "AUROC 0.95 >= 0.9"},
    ],
}


def test_gate_names_the_failed_rules_and_says_when_all_hold():
    r = results()
    assert F.gate(r) is None
    r["gate"] = GATE
    f = F.gate(r)
    assert f.text == "Release gate failed: 1 of 3 rules (calibration.ece <= 0.03: ECE 4.1% > 3%)"
    assert (f.anchor, f.level) == ("gate", F.ALERT)
    r["gate"] = {**GATE, "passed": True, "rules": [{**x, "passed": True} for x in GATE["rules"]]}
    assert F.gate(r).text == "Release gate passed: all 3 rules of gates.yaml hold"
    failing = [{**GATE["rules"][1], "rule": f"rule {i}", "detail": f"d{i}"} for i in range(4)]
    r["gate"] = {**GATE, "rules": failing}
    assert F.gate(r).text == "Release gate failed: 4 of 4 rules (rule 0: d0; rule 1: d1; and 2 more)"


def test_accuracy_rules():
    r = results(accuracy=ACCURACY)
    assert F.accuracy(r).text == "Top-1 accuracy is 90.0% (95% interval 89.0% – 91.0%) on 10,000 test images"
    assert F.weakest_class(r).text == "Shirt is the weakest class: recall 77.8%, most confused with T-shirt/top"
    assert F.chance(r) is None
    good = copy.deepcopy(ACCURACY)
    good["summary"]["worst_classes"] = [["Shirt", 0.88]]  # within 5 points of top-1: not worth naming
    assert F.weakest_class(results(accuracy=good)) is None
    del good["tables"]
    good["summary"]["worst_classes"] = [["Shirt", 0.5]]  # no confusion table: the sentence stops at the recall
    assert F.weakest_class(results(accuracy=good)).text == "Shirt is the weakest class: recall 50.0%"
    low = copy.deepcopy(ACCURACY)
    low["summary"].update(top1=0.1, top1_ci95=[0.09, 0.11])  # chance is 10% for 10 classes
    f = F.chance(results(accuracy=low))
    assert f.level == F.ALERT and f.text.startswith("Top-1 accuracy 10.0% is near chance (10.0% for 10 classes)")
    assert F.accuracy(results(accuracy=low)) is None  # the chance finding says it instead
    for rule in (F.accuracy, F.weakest_class, F.chance):
        assert rule(results()) is None


def test_calibration_says_which_way_and_what_temperature_scaling_does():
    f = F.calibration(results(calibration=CALIBRATION))
    assert f.text == "The model is under-confident: ECE 8.8%, 0.97% after temperature scaling (T = 0.64)"
    over = copy.deepcopy(CALIBRATION)
    over["metrics"] = {}  # no confidence and accuracy: the direction comes from T (> 1 softens an over-confident one)
    over["summary"].update(temperature=1.5, ece_after_temperature=None)
    assert F.calibration(results(calibration=over)).text == "The model is over-confident: ECE 8.8%"
    fine = {"summary": {"ece": 0.012, "ece_after_temperature": 0.01, "temperature": 1.1}}
    f = F.calibration(results(calibration=fine))
    assert f.text == "Confidence matches accuracy: ECE 1.2%" and f.level == F.INFO
    assert F.calibration(results(calibration={"summary": {"ece": None}})) is None


def test_adversarial_finds_the_budget_that_halves_accuracy():
    f = F.adversarial(results(adversarial=ADVERSARIAL))
    assert f.text == "A PGD attack at ε = 0.02 (at most 5/255 per pixel) halves the accuracy: 92.6% → 46.0%"
    robust = copy.deepcopy(ADVERSARIAL)
    robust["metrics"]["pgd_accuracy"] = [0.86, 0.82, 0.79, 0.71]
    robust["summary"].update(robust_top1=0.71, clean_top1=0.86)
    f = F.adversarial(results(adversarial=robust))
    assert f.text == "A PGD attack at ε = 0.1 (at most 26/255 per pixel) lowers accuracy from 86.0% to 71.0%"
    assert f.level == F.INFO
    assert F.attack_sanity(results(adversarial=ADVERSARIAL)) is None
    broken = copy.deepcopy(ADVERSARIAL)
    broken["metrics"]["sanity"] = {"passed": False, "failures": ["PGD (0.5) is weaker than FGSM (0.3) at ε=0.1"]}
    assert F.attack_sanity(results(adversarial=broken)).text == (
        "The attack may be too weak, so robustness is overstated: PGD (0.5) is weaker than FGSM (0.3) at ε=0.1"
    )
    assert F.adversarial(results()) is None


def test_corruption_ood_deferral_fairness():
    corruption = {
        "summary": {"clean_top1": 0.928, "mean_corrupted_top1": 0.713},
        "tables": {
            "by_corruption": table(
                ["corruption", "mean accuracy", "mean error"], [["gaussian_noise", 0.412, 0.588], ["fog", 0.8, 0.2]]
            )
        },
    }
    f = F.corruption(results(corruption=corruption))
    assert (
        f.text
        == "Common corruptions lower accuracy from 92.8% to 71.3% on average; Gaussian noise is the worst (41.2%)"
    )
    assert f.level == F.NOTABLE
    ood = {
        "summary": {"score": "msp", "best_score": "knn", "mean_auroc": 0.9},
        "metrics": {
            "sets": {"mnist": {"msp": {"auroc": 0.863}}, "noise": {"msp": {"auroc": 0.97}}},
            "mean": {"knn": {"auroc": 0.979}},
        },
    }
    assert F.ood(results(ood=ood)).text == (
        "Images from mnist are the hardest to flag as unfamiliar: AUROC 86.3% with the MSP score (50% is chance); "
        "the kNN score does better (97.9% on average)"
    )
    uncertainty = {
        "summary": {"deferral_threshold": 0.652, "target_accuracy": 0.99, "deferred": 0.562},
        "metrics": {"sources": {"softmax": {"deferral": {"meets_target_on_test": True, "test_accuracy": 0.991}}}},
    }
    f = F.deferral(results(uncertainty=uncertainty))
    assert f.text == (
        "To reach 99% accuracy the model must hand 56.2% of cases to a person (those with confidence below 65.2%)"
    )
    unreachable = {"summary": {"deferral_threshold": None, "target_accuracy": 0.999, "deferred": 1.0}}
    assert F.deferral(results(uncertainty=unreachable)).text == (
        "No confidence threshold reaches 99.9% accuracy: every case would go to a person"
    )
    fairness = {
        "summary": {"accuracy_gap": 0.0976, "accuracy_gap_ci95": [0.042, 0.156], "attribute": "site"},
        "metrics": {"gaps": {"accuracy": {"worst_group": "B", "worst_value": 0.591}}},
    }
    fairness["summary"]["attribute_kind"] = "column"
    f = F.fairness(results(fairness=fairness))
    assert f.text == (
        "Accuracy differs by 9.8 points between site groups (95% interval 4.2 – 15.6 points); lowest for B (59.1%)"
    )
    assert f.level == F.NOTABLE  # the whole interval lies above 2 points
    fairness["summary"].update(attribute_kind="proxy", accuracy_gap_ci95=[0.0, 0.03])
    f = F.fairness(results(fairness=fairness))
    assert "(a proxy property, not people; 95% interval 0 – 3.0 points)" in f.text and f.level == F.INFO
    for rule in (F.corruption, F.ood, F.deferral, F.fairness):
        assert rule(results()) is None


def test_conformal_certify_explain_cost():
    conformal = {
        "summary": {"score": "raps", "coverage_95": 0.951, "set_size_95": 1.31, "coverage_90": 0.9, "set_size_90": 1.0}
    }
    f = F.conformal(results(conformal=conformal))
    assert f.text == "At 95% coverage the model needs 1.3 labels per image on average (RAPS)" and f.level == F.INFO
    conformal["summary"]["coverage_95"] = 0.91
    f = F.conformal(results(conformal=conformal))
    assert f.level == F.ALERT and f.text.startswith("Prediction sets meant to cover 95% of images cover only 91.0%")
    shift = {
        "summary": {"score": "aps"},
        "metrics": {
            "reference_level": 0.95,
            "corruption": {
                "corruptions": ["fog", "contrast"],
                "clean": {"aps": {"0.95": {"coverage": 0.95}}},
                "corrupted": {
                    "fog": {"aps": {"0.95": {"coverage": 0.93}}},
                    "contrast": {"aps": {"0.95": {"coverage": 0.8}}},
                },
            },
        },
    }
    assert F.conformal_shift(results(conformal=shift)).text == (
        "Under contrast the 95% prediction sets cover only 80.0% of images (95.0% clean): the guarantee does not hold "
        "on corrupted data"
    )
    certify = {"summary": {"certified_top1": 0.69, "radius": 0.5, "sigma": 0.5}, "metrics": {"trained_task": "noise"}}
    assert F.certify(results(certify=certify)).text == (
        "Randomized smoothing (σ = 0.5) certifies 69.0% of test images against any change of L2 size 0.5"
    )
    explain = {
        "summary": {"insertion_deletion_gap": 0.196, "method": "integrated_gradients"},
        "metrics": {"per_method": {"gradcam": {"flagged": True}, "gradcam++": {"flagged": True}, "lime": {}}},
    }
    assert F.explain(results(explain=explain)).text == (
        "Grad-CAM and Grad-CAM++ maps barely change when the model's weights are randomised: they fail the sanity "
        "check of Adebayo et al. (2018)"
    )
    explain["metrics"]["per_method"] = {}
    assert F.explain(results(explain=explain)).text == (
        "Integrated Gradients gives the most faithful explanations: insertion − deletion AUC 0.20"
    )
    cost = results(
        efficiency={"summary": {"latency_ms_p50": 2.468}, "metrics": {"device": "cpu"}},
        energy={"summary": {"energy_j_per_1000_images": 2.7, "emissions_kg_co2eq": 5.5e-6, "images": 10000}},
    )
    assert (
        F.cost(cost).text
        == "One image takes 2.47 ms on cpu (batch of 1); 1,000 images use 2.7 J of energy (550 µg CO₂-eq)"
    )
    for rule in (F.conformal, F.conformal_shift, F.certify, F.explain, F.cost):
        assert rule(results()) is None


def test_findings_rank_by_level_keep_at_most_six_and_survive_odd_results():
    r = results(accuracy=ACCURACY, calibration=CALIBRATION, adversarial=ADVERSARIAL)
    r["gate"] = GATE
    got = F.findings(r)
    assert [f.rule for f in got] == ["gate", "weakest_class", "calibration", "adversarial", "accuracy"]
    assert len(F.findings(r, limit=2)) == 2
    many = results(**{f"x{i}": {} for i in range(3)}, accuracy=ACCURACY, calibration=CALIBRATION)
    many["checks"] |= results(
        adversarial=ADVERSARIAL,
        certify={"summary": {"certified_top1": 0.5, "radius": 0.5, "sigma": 0.25}},
        efficiency={"summary": {"latency_ms_p50": 3.0}},
    )["checks"]
    many["gate"] = GATE
    assert len(F.findings(many)) == F.LIMIT
    odd = results(accuracy={"summary": {"top1": "high", "worst_classes": "none"}}, calibration={"summary": []})
    odd["gate"] = {"rules": "all"}
    assert F.findings(odd) == []


# --- a real tiny audit of every check --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from pupil.audit import CHECKS, run_audit
    from pupil.config import build
    from pupil.training.loop import fit
    from tests.conftest import ROOT
    from tests.test_results_contract import TINY

    tiny = {**TINY, "conformal": {"corruptions": ["contrast"], "n": 64}}
    root = tmp_path_factory.mktemp("findings")
    run = fit(build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "smoke"}), progress=False).dir
    names = CHECKS.names()
    return run_audit(run, names, budget="quick", device="cpu", settings={n: tiny[n] for n in names if n in tiny})


def test_every_metric_of_every_check_has_a_label(real):
    with_training = copy.deepcopy(real)  # the smoke recipe does not track training energy; a real run does
    energy = with_training["checks"]["energy"]["metrics"]
    energy["training"] = {**energy["inference"], "sessions": 2}
    missing = fallbacks(with_training)
    assert not missing, "add these to pupil.report.labels.METRICS:\n" + "\n".join(missing)


def test_a_real_audit_gets_findings_that_link_to_its_sections(real):
    got = F.findings(real)
    assert 3 <= len(got) <= F.LIMIT
    page = render_html(real, load_thresholds(None))
    ids = set(re.findall(r'id="([^"]+)"', page))
    for f in got:
        assert re.search(r"\d", f.text), f.text  # every finding carries its figure
        assert f.anchor in ids and f'href="#{f.anchor}"' in page
        assert html.escape(f.text, quote=False) in page
    # No raw dotted keys on the card: every figure is labelled.
    for raw in ("after.ece", "latency_ms.p50", "inference.energy_kwh", "sets.noise", "per_method.", "gaps.accuracy"):
        assert raw not in page, raw
