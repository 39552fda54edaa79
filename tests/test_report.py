import json
import re
import shutil

import pytest

from pupil.audit import run_audit
from pupil.cli import main
from pupil.config import build
from pupil.errors import PupilError
from pupil.report.compare import compare
from pupil.report.render import grade, load_thresholds, render_run
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
    assert out["rendered"] == "sections=3 images=4 broken=0", out["rendered"]
    assert not out["console"], out["console"]
    assert shot.stat().st_size > 20_000


def test_thresholds_grade_in_the_right_direction(tmp_path):
    limits = load_thresholds(None)
    assert grade({"value": 0.95, "higher_is_better": True}, limits["accuracy"]) == "good"
    assert grade({"value": 0.85, "higher_is_better": True}, limits["accuracy"]) == "fair"
    assert grade({"value": 0.10, "higher_is_better": False}, limits["calibration"]) == "poor"
    bad = tmp_path / "t.yaml"
    bad.write_text("accuracy: {good: 0.9}\n")
    with pytest.raises(PupilError, match="needs good and fair"):
        load_thresholds(bad)


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
    assert {_unescaped_pipes(row) for row in table} == {5}
