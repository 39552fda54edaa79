import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pupil.audit import run_audit
from pupil.cli import main
from pupil.config import build
from pupil.errors import PupilError
from pupil.report.compare import compare
from pupil.report.labels import show
from pupil.report.render import grade, load_thresholds, reference, render_run
from pupil.results import SUMMARY_KEYS
from pupil.training.loop import fit
from tests.browser import CHROMIUM, render
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = []
    for name, model in (("tiny-resnet", "resnet_test"), ("tiny-vgg", "vgg_test"), ("tiny-lenet", "lenet5_test")):
        cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": name, "model": model})
        run = fit(cfg, progress=False).dir
        run_audit(run, ["accuracy", "calibration", "efficiency"], device="cpu")
        runs.append(run)
    return runs


def test_report_and_model_card_render_every_section(audited):
    html, card = render_run(audited[0])
    text = html.read_text()
    for section in ("summary", "accuracy", "calibration", "efficiency"):
        assert f'id="{section}"' in text
    assert "http://" not in text and "https://" not in text  # self-contained: no network
    assert text.count("data:image/png;base64,") >= 4
    md = card.read_text()
    for heading in ("Model details", "Intended use", "Training data", "Evaluation data", "Metrics",
                    "Ethical considerations", "Caveats and recommendations"):  # fmt: skip
        assert f"## {heading}" in md
    assert re.search(r"\| Accuracy \| top-1 accuracy \| [\d.]+% \| [\d.]+% – [\d.]+% \|", md)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_report_renders_in_headless_chromium(audited, tmp_path):
    html, _ = render_run(audited[0])
    shot = tmp_path / "report.png"
    out = render(html, shot)
    got = dict(part.split("=") for part in (out["rendered"] or "").split())
    assert {k: got.get(k) for k in ("sections", "images", "broken", "toc")} == {
        "sections": "3",
        "images": "4",
        "broken": "0",
        "toc": "6",  # findings, summary, the three checks, how to read the card
    }, out["rendered"]
    assert int(got["findings"]) >= 3, out["rendered"]
    assert 'class="toc"' in out["dom"] and "position:sticky" in out["dom"]
    assert not out["console"], out["console"]
    assert shot.stat().st_size > 20_000


def test_thresholds_grade_in_the_right_direction(tmp_path):
    limits = load_thresholds(None)
    assert grade({"value": 0.95, "higher_is_better": True}, limits["accuracy"]) == "good"
    assert grade({"value": 0.85, "higher_is_better": True}, limits["accuracy"]) == "fair"
    assert grade({"value": 0.10, "higher_is_better": False}, limits["calibration"]) == "poor"
    assert grade({"value": 0.10, "higher_is_better": False}, None) == "none"
    bad = tmp_path / "t.yaml"
    bad.write_text("accuracy: {good: 0.9}\n")
    with pytest.raises(PupilError, match="needs good and fair"):
        load_thresholds(bad)
    bad.write_text("accuracy: {good: high, fair: 0.8}\n")
    with pytest.raises(PupilError, match="good must be numbers"):
        load_thresholds(bad)


def test_every_check_has_a_grade_with_its_reason():
    limits = load_thresholds(None)
    assert set(SUMMARY_KEYS) <= set(limits), f"give {sorted(set(SUMMARY_KEYS) - set(limits))} limits"
    for check, entry in limits.items():
        assert len(entry["why"].split()) >= 10, check  # a reason, not a word
        assert set(entry) <= {"good", "fair", "why", "of", "higher_is_better"}, check
        if "of" in entry:
            assert entry["of"] in SUMMARY_KEYS[check], check


def test_a_figure_other_than_the_headline_is_graded_when_of_says_so(tmp_path):
    """conformal's headline is a set size; its grade is on the 95% sets' empirical coverage."""
    limits = load_thresholds(None)["conformal"]
    head = {"value": 1.3, "higher_is_better": False}
    assert grade(head, limits, {"coverage_95": 0.951}) == "good"
    assert grade(head, limits, {"coverage_95": 0.93}) == "fair"
    assert grade(head, limits, {"coverage_95": 0.90}) == "poor"
    assert grade(head, limits, {"coverage_95": None}) == grade(head, limits) == "none"  # not measured, or no summary


def test_a_user_file_of_only_good_and_fair_still_works(tmp_path):
    """The format of pupil 0.1 files: {good, fair} for some checks. The others keep the defaults; an entry keeps
    the default's graded figure (of) and gets the file's name as its reason."""
    user = tmp_path / "mine.yaml"
    user.write_text("accuracy: {good: 0.99, fair: 0.95}\nconformal: {good: 0.949, fair: 0.94}\n")
    limits = load_thresholds(user)
    assert limits["accuracy"] == {"good": 0.99, "fair": 0.95, "why": "limits from mine.yaml"}
    assert limits["calibration"] == load_thresholds(None)["calibration"]
    assert limits["conformal"]["of"] == "coverage_95" and limits["conformal"]["good"] == 0.949
    assert grade({"value": 0.97, "higher_is_better": True}, limits["accuracy"]) == "fair"
    assert grade({"value": 1.3, "higher_is_better": False}, limits["conformal"], {"coverage_95": 0.945}) == "fair"


def test_units_are_chosen_by_size():
    cases = [
        (0.925, "fraction", "92.5%"),
        (0.008, "fraction", "0.8%"),
        (0.0003, "fraction", "0.03%"),
        (0.99996, "fraction", "99.996%"),  # never rounded up to a perfect score
        (2.468, "ms", "2.47 ms"),
        (0.477, "ms", "477 µs"),
        (1500.0, "ms", "1.5 s"),
        (0.004, "s", "4 ms"),
        (2.707, "J", "2.71 J"),
        (0.5, "J", "500 mJ"),
        (7200.0, "J", "2 Wh"),
        (1.5e-6, "kWh", "5.4 J"),
        (12.5, "kWh", "12.5 kWh"),
        (72666, "si", "72.7 k"),
        (14677760, "si", "14.7 M"),
        (1.2e9, "si", "1.2 G"),
        (10000, "count", "10,000"),
        (0.0976, "points", "9.8 points"),
        ([0.042, 0.156], "interval:points", "4.2 – 15.6 points"),
        ([0.9, 0.95], "interval:fraction", "90.0% – 95.0%"),
        ([1, 28, 28], "shape", "1×28×28"),
        (None, "fraction", "—"),
    ]
    assert [show(value, unit) for value, unit, _ in cases] == [want for *_, want in cases]


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def reference_from_benchmarks(results_dir: Path) -> dict:
    """What src/pupil/report/reference.yaml must hold: the best and worst of pupil's models on each figure, from
    the committed benchmark JSON."""

    def load(name):
        return json.loads((results_dir / name).read_text())

    def point(value, model, source):
        return {"value": round(float(value), 4), "model": model, "source": f"benchmarks/results/{source}"}

    def ends(points, higher_is_better, match=None):
        ranked = sorted(points, key=lambda p: p["value"], reverse=higher_is_better)
        return {**({"match": match} if match else {}), "best": ranked[0], "worst": ranked[-1]}

    journey, train, robust = load("journey.json"), load("train_fmnist.json"), load("robust_fmnist.json")
    core, demos = load("audit_core.json"), load("audit_demos.json")
    zoo = [
        point(r["test_top1"], f"{r['model']} ({r['family']}, 5 min on one core)", "journey.json")
        for r in journey["rows"]
    ]
    recipes = [
        point(v["median_test_top1"], f"{k.removeprefix('pupil ')} recipe", "train_fmnist.json")
        for k, v in train["summary"].items()
        if k.startswith("pupil ")
    ]
    ece = [
        point(core["agreement_ours_vs_reference"]["ece"][0], f"{Path(core['run']).name} recipe", "audit_core.json"),
        point(demos["outside"]["sources"]["py state dict"]["ece"], "CNN trained outside pupil", "audit_demos.json"),
    ]
    latency = [
        point(r["latency_ms_b1"], f"{r['model']} ({r['family']}, one thread)", "journey.json") for r in journey["rows"]
    ]
    runs = robust["runs"].values()
    attacked = [
        point(
            r["pgd_eps0.1"]["pupil"]["robust_accuracy"],
            f"{Path(r['run']).name} ({r['task']} training)",
            "robust_fmnist.json",
        )
        for r in runs
    ]
    certified = [
        point(
            r["certify"]["certified_accuracy"]["0.5"],
            f"{Path(r['run']).name} ({r['task']} training)",
            "robust_fmnist.json",
        )
        for r in runs
        if "certify" in r
    ]
    return {
        "fashion-mnist": {
            "accuracy": ends(zoo + recipes, True),
            "calibration": ends(ece, False),
            "efficiency": ends(latency, False, {"device": "cpu"}),
            "adversarial": ends(attacked, True, {"eps": 0.1, "norm": "linf"}),
            "certify": ends(certified, True, {"sigma": robust["certify"]["sigma"], "radius": 0.5}),
        }
    }


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="the benchmark JSON is not in this checkout")
def test_reference_points_are_the_benchmarks():
    """reference.yaml is a copy of the benchmark JSON; PUPIL_WRITE_REFERENCE=1 prints the body to paste."""
    want = reference_from_benchmarks(BENCHMARKS)
    path = Path(__file__).resolve().parents[1] / "src/pupil/report/reference.yaml"
    if os.environ.get("PUPIL_WRITE_REFERENCE"):
        print(yaml.safe_dump(want, sort_keys=False, allow_unicode=True, width=120, default_flow_style=None))
    assert yaml.safe_load(path.read_text()) == want


def test_reference_points_show_only_for_the_same_dataset_and_settings():
    def results(dataset, **summary):
        section = {"headline": {"label": "x", "value": 0.5, "higher_is_better": True, "unit": "fraction"}}
        return {
            "run": {"dataset": dataset},
            "audit": {"device": "cpu"},
            "checks": {"adversarial": {**section, "summary": summary}},
        }

    got = reference(results("fashion-mnist", eps=0.1, norm="linf"), "adversarial")
    assert got == {
        "best": "72.0% (fmnist_adversarial (adversarial training))",
        "worst": "0% (fmnist_fast (classification training))",
        "source": "benchmarks/results/robust_fmnist.json",
    }
    assert reference(results("fashion-mnist", eps=0.05, norm="linf"), "adversarial") is None  # another epsilon
    assert reference(results("mnist", eps=0.1, norm="linf"), "adversarial") is None
    assert reference(results("fashion-mnist", eps=0.1, norm="linf"), "ood") is None  # no such reference


def test_compare_ranks_runs_and_flags_mismatched_settings(audited, tmp_path):
    board = compare(audited, tmp_path / "cmp")
    assert [r["top1"] for r in board["runs"]] == sorted((r["top1"] for r in board["runs"]), reverse=True)
    assert board["mismatched_settings"] == {}
    assert any(r["pareto_latency_ms"] for r in board["runs"])
    # Re-audit one run with the full budget: compare must flag it instead of mixing silently.
    run_audit(audited[2], ["accuracy", "calibration", "efficiency"], budget="full", device="cpu")
    board = compare(audited, tmp_path / "cmp2")
    assert board["mismatched_settings"] == {"budget": ["full", "quick"]}
    html = (tmp_path / "cmp2" / "compare.html").read_text()
    assert 'id="mismatch"' in html and html.count("data:image/png;base64,") == 3
    with pytest.raises(PupilError, match="at least two"):
        compare(audited[:1], tmp_path / "x")


def test_cli_audit_report_compare(audited, tmp_path, capsys):
    run = audited[1]
    assert main(["audit", str(run), "--checks", "accuracy,calibration", "--device", "cpu", "--set",
                 "accuracy.n_bootstrap=200"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "report card" in out and "report.html" in out
    assert json.loads((run / "results.json").read_text())["checks"]["accuracy"]["config"]["n_bootstrap"] == 200
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.html").exists()
    assert main(["compare", *map(str, audited), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "leaderboard.json").exists()
    assert main(["audit", str(run), "--checks", "nope"]) == 2
    assert "unknown check 'nope'" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2


def _unescaped_pipes(row: str) -> int:
    """Pipes that separate Markdown table cells: those not escaped by a backslash (itself not escaped)."""
    count, i = 0, 0
    while i < len(row):
        if row[i] == "\\":
            i += 1  # the escaped character is skipped, whatever it is
        elif row[i] == "|":
            count += 1
        i += 1
    return count


def test_model_card_escapes_user_strings(audited, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(audited[0], run)
    hostile = ["<img src=x onerror=alert(1)>", "a|b", "line1\nline2", "[x](javascript:alert(1)) *_`"]
    results = json.loads((run / "results.json").read_text())
    info = json.loads((run / "run.json").read_text())
    classes = results["run"]["classes"]
    rename = dict(zip(classes, (hostile * len(classes))[: len(classes)], strict=True))
    results["run"]["classes"] = [rename[c] for c in classes]
    for row in results["checks"]["accuracy"]["tables"]["per_class"]["rows"]:
        row[0] = rename[row[0]]
    for pair in results["checks"]["accuracy"]["summary"]["worst_classes"]:  # the card's lowest-recall line
        pair[0] = rename[pair[0]]
    results["run"]["name"] = "run|<b>x</b>\nname"
    results["run"]["dataset"] = info["data"]["dataset"] = "data|set\r\n<script>"
    results["checks"]["accuracy"]["headline"]["label"] = "top-1 | <img src=x onerror=alert(1)> |\nnext"
    (run / "results.json").write_text(json.dumps(results))
    (run / "run.json").write_text(json.dumps(info))

    md = render_run(run)[1].read_text()
    assert "<img" not in md and "<b>" not in md and "<script>" not in md
    assert "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "line1 line2" in md and "a\\|b" in md and "\\[x\\](javascript:alert(1)) \\*\\_\\`" in md
    assert not any(line.startswith(("line2", "name", "next", "<")) for line in md.splitlines())
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(results["checks"])  # header, rule, one row per check: no row was split
    assert {_unescaped_pipes(row) for row in table} == {6}


def test_the_gate_verdict_is_near_the_top_of_the_card_and_in_the_model_card(audited, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(audited[0], run)
    results = json.loads((run / "results.json").read_text())
    results["gate"] = {
        "file": "gates.yaml",
        "base": None,
        "passed": False,
        "rules": [
            {"rule": "accuracy.top1 >= 0.2", "passed": True, "value": 0.6, "bound": 0.2, "detail": "top-1 0.6 >= 0.2"},
            {
                "rule": "calibration.ece <= 0.001",
                "passed": False,
                "value": 0.04,
                "bound": 0.001,
                "detail": "ECE 0.04 > 0.001",
            },
        ],
    }
    (run / "results.json").write_text(json.dumps(results))
    html, card = render_run(run)
    page = html.read_text()
    assert page.index('id="findings"') < page.index('id="gate"') < page.index('id="summary"')
    assert "Release gate: <span" in page and ">failed</span>" in page and "ECE 0.04 &gt; 0.001" in page
    assert "Release gate failed: 1 of 2 rules (calibration.ece &lt;= 0.001: ECE 0.04 &gt; 0.001)" in page
    md = card.read_text()
    assert "## Release gate" in md and "Failed: 1 of 2 rules hold" in md
    assert "- FAIL calibration.ece <= 0.001: ECE 0.04 > 0.001" in md.replace("&lt;", "<").replace("&gt;", ">")
    assert md.index("## Summary") < md.index("## Release gate") < md.index("## Model details")
