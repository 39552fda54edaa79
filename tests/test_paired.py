"""Paired tests between two audits (pupil.report.paired) and the per-image figures they read: each statistic
against a library or a naive loop, a planted regression that must be found, a model against itself that must
not be, and every pair that must be refused."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score, roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from pupil.audit import run_audit
from pupil.config import build
from pupil.errors import PupilError
from pupil.metrics import ece as ece_of
from pupil.ood import auroc as ood_auroc
from pupil.report import paired as pt
from pupil.report.compare import compare
from pupil.report.gates import evaluate, parse_rule
from pupil.results import load_results, read_per_image, write_per_image
from pupil.training.loop import fit
from tests.conftest import ROOT

CHECKS = ["accuracy", "calibration", "corruption", "ood"]
TINY = {
    "accuracy": {"n_bootstrap": 20},
    "corruption": {"n": 64, "corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5]},
    "ood": {"sets": ["noise", "uniform"], "n_id": 128, "n_ood": 64, "scores": ["msp", "energy"]},
}
B = 200  # bootstrap replicates in the end-to-end tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """base: the smoke run audited; worse: the same run with class 0's logit raised by 3 (a planted regression);
    reseeded: a copy of base audited with another seed."""
    root = tmp_path_factory.mktemp("paired")
    base = fit(build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "base"}), progress=False).dir
    run_audit(base, CHECKS, device="cpu", settings=TINY)
    worse = root / "worse"
    shutil.copytree(base, worse)
    state = load_file(worse / "model.safetensors")
    state["head.bias"][0] += 3.0
    save_file(state, worse / "model.safetensors")
    run_audit(worse, CHECKS, device="cpu", settings=TINY)
    reseeded = root / "reseeded"
    shutil.copytree(base, reseeded)
    run_audit(reseeded, ["accuracy"], device="cpu", seed=1, settings={"accuracy": {"n_bootstrap": 20}})
    return {"base": base, "worse": worse, "reseeded": reseeded, "root": root}


def _copy(runs, name: str):
    d = runs["root"] / name
    shutil.copytree(runs["base"], d)
    return d


# ---------------------------------------------------------------------------------------------------------------
# Statistics against references


@pytest.mark.parametrize(("b", "c"), [(0, 0), (3, 3), (0, 7), (12, 4), (40, 61), (1, 300)])
def test_mcnemar_matches_statsmodels_exact(b, c):
    both, neither = 50, 20
    base = torch.tensor([True] * both + [True] * b + [False] * c + [False] * neither)
    new = torch.tensor([True] * both + [False] * b + [True] * c + [False] * neither)
    got = pt.mcnemar(base, new)
    ref = sm_mcnemar([[both, b], [c, neither]], exact=True).pvalue
    assert (got["base_only"], got["new_only"]) == (b, c)
    assert got["p"] == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_holm_matches_statsmodels():
    g = np.random.default_rng(0)
    for p in (g.uniform(0, 0.1, 7), np.array([0.01, 0.04, 0.03, 0.005, 0.5]), np.array([0.02, 0.02, 0.02]), [0.3]):
        ref = multipletests(p, method="holm")[1]
        assert pt.holm(list(map(float, p))) == pytest.approx(ref.tolist())


def test_paired_bootstrap_matches_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    n, k, b = 150, 4, 30
    y = torch.randint(0, k, (n,), generator=g)
    logits = [torch.randn(n, k, generator=g) * 2 + 2 * torch.nn.functional.one_hot(y, k) * s for s in (1.0, 0.5)]
    pred = [z.argmax(1) for z in logits]
    conf = [z.double().softmax(1).amax(1) for z in logits]
    correct = [p == y for p in pred]

    def stat(i):
        return torch.stack(
            [
                torch.stack([pt.top1(correct[m], i), pt.macro_f1(y, pred[m], k, i), pt.ece(conf[m], correct[m], i)], 1)
                for m in (0, 1)
            ],
            2,
        )  # (b, 3 figures, 2 models)

    boot = pt.paired_bootstrap(stat, (n,), b, seed=5)
    draws = torch.randint(0, n, (b, n), generator=torch.Generator().manual_seed(5))  # the same draws, one at a time
    for r, i in enumerate(draws):
        for m in (0, 1):
            assert boot[r, 0, m].item() == pytest.approx((pred[m][i] == y[i]).double().mean().item())
            assert boot[r, 1, m].item() == pytest.approx(f1_score(y[i], pred[m][i], average="macro"))
            assert boot[r, 2, m].item() == pytest.approx(ece_of(conf[m][i], correct[m][i]))
    d = (boot[:, 0, 1] - boot[:, 0, 0]).numpy()
    s = pt.bootstrap_summary(boot[:, 0])
    assert s["ci95"] == pytest.approx(np.quantile(d, [0.025, 0.975]).tolist())
    naive_p = min(1.0, 2 * min(1 + (d <= 0).sum(), 1 + (d >= 0).sum()) / (b + 1))
    assert s["p"] == pytest.approx(naive_p)


def test_bootstrap_auroc_matches_the_ood_metric_on_every_draw():
    g = torch.Generator().manual_seed(2)
    pos = torch.randn(40, generator=g).double() + 1
    neg = torch.cat([torch.randn(25, generator=g).double(), pos[:5]])  # ties with positives count one half
    ip, ineg = next(pt.resamples((len(pos), len(neg)), 20, seed=3))
    got = pt.auroc(pos, neg, ip, ineg)
    for r in range(20):
        assert got[r].item() == pytest.approx(ood_auroc(pos[ip[r]], neg[ineg[r]]))
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    whole = pt.auroc(pos, neg, torch.arange(len(pos))[None], torch.arange(len(neg))[None]).item()
    assert whole == pytest.approx(roc_auc_score(labels, torch.cat([pos, neg]).numpy()))


# ---------------------------------------------------------------------------------------------------------------
# The per-image figures of the corruption and ood checks


def test_per_image_figures_reproduce_the_sections(runs):
    results = load_results(runs["base"])
    corr = read_per_image(runs["base"], "corruption", results["audit"])
    m = results["checks"]["corruption"]["metrics"]
    assert corr["correct"].dtype == torch.bool and corr["correct"].shape == (2, 2, 64)
    assert corr["severities"].tolist() == m["severities"] and len(corr["index"]) == m["n"]
    for i, c in enumerate(m["corruptions"]):
        for j in range(len(m["severities"])):
            assert corr["correct"][i, j].double().mean().item() == pytest.approx(m["accuracy"][c][j])
    targets = read_per_image(runs["base"], "accuracy", results["audit"])["targets"]
    logits = read_per_image(runs["base"], "accuracy", results["audit"])["logits"]
    clean = (logits[corr["index"]].argmax(1) == targets[corr["index"]]).double().mean().item()
    assert clean == pytest.approx(m["clean_accuracy"])  # the index points into the test split
    ood = read_per_image(runs["base"], "ood", results["audit"])
    sets = results["checks"]["ood"]["metrics"]["sets"]
    assert set(ood) == {"index", "id", "ood:noise", "ood:uniform"} and len(ood["id"]) == len(ood["index"]) == 128
    for name in ("noise", "uniform"):
        assert ood_auroc(ood["id"], ood[f"ood:{name}"]) == pytest.approx(sets[name]["msp"]["auroc"])


# ---------------------------------------------------------------------------------------------------------------
# End to end: a planted regression, a model against itself, refused pairs


def test_planted_regression_is_found_and_fails_the_paired_gate(runs, tmp_path):
    out = pt.paired(runs["base"], runs["worse"], n_bootstrap=B)
    rows = {r["figure"]: r for r in out["figures"]}
    assert list(rows) == list(pt.FIGURES) and out["not_compared"] == []
    for name, results in (("base", load_results(runs["base"])), ("new", load_results(runs["worse"]))):
        s = {c: results["checks"][c]["summary"] for c in CHECKS}
        assert rows["accuracy.top1"][name] == s["accuracy"]["top1"]
        assert rows["accuracy.macro_f1"][name] == pytest.approx(s["accuracy"]["macro_f1"])
        assert rows["calibration.ece"][name] == pytest.approx(s["calibration"]["ece"])
        assert rows["corruption.mean_corrupted_top1"][name] == pytest.approx(s["corruption"]["mean_corrupted_top1"])
        assert rows["ood.mean_auroc"][name] == pytest.approx(s["ood"]["mean_auroc"])
    top1 = rows["accuracy.top1"]
    assert top1["verdict"] == "worse" and top1["difference"] < -0.05 and top1["ci95"][1] < 0
    assert top1["discordant"]["base_only"] > top1["discordant"]["new_only"]
    assert top1["p"] <= top1["p_holm"] < 0.05
    assert rows["accuracy.macro_f1"]["verdict"] == "worse"

    gate = evaluate(
        [parse_rule("accuracy.top1 >= base - 0.005 (paired)")],
        load_results(runs["worse"]),
        load_results(runs["base"]),
        out,
        "gates.yaml",
    )
    assert not gate["passed"] and "significant regression" in gate["rules"][0]["detail"]

    (tmp_path / "g.yaml").write_text("- accuracy.top1 >= base - 0.005 (paired)\n- calibration.ece <= 1.0\n")
    board = compare([runs["base"], runs["worse"]], tmp_path / "cmp", gate=tmp_path / "g.yaml", n_bootstrap=B)
    assert board["paired"]["figures"][0]["verdict"] == "worse"
    assert not board["gate"]["passed"] and [r["passed"] for r in board["gate"]["rules"]] == [False, True]
    assert set(board["checks"]) == set(CHECKS) and all(set(r["headlines"]) == set(CHECKS) for r in board["runs"])
    saved = json.loads((tmp_path / "cmp" / "leaderboard.json").read_text())
    assert saved["paired"]["figures"][0]["figure"] == "accuracy.top1" and saved["gate"]["passed"] is False
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert 'id="paired"' in html and 'id="gate"' in html and 'id="headlines"' in html
    assert "Out-of-distribution detection" in html and html.count("data:image/png;base64,") == 3


def test_a_model_against_itself_shows_no_difference_and_passes(runs, tmp_path):
    same = _copy(runs, "same")  # another directory holding the same audit
    out = pt.paired(runs["base"], same, n_bootstrap=B)
    assert len(out["figures"]) == len(pt.FIGURES)
    for r in out["figures"]:
        assert r["difference"] == 0 and r["p"] == 1 and r["p_holm"] == 1, r["figure"]
        assert r["verdict"] == "no significant difference"
    rules = [parse_rule("accuracy.top1 >= base - 0.005 (paired)"), parse_rule("calibration.ece <= base (paired)")]
    gate = evaluate(rules, load_results(same), load_results(runs["base"]), out, "gates.yaml")
    assert gate["passed"]


def test_mismatched_pairs_are_refused(runs):
    base, reseeded = runs["base"], runs["reseeded"]
    with pytest.raises(PupilError, match=r"different images or settings \(seed 0 vs 1\).*--seed 0"):
        pt.paired(base, reseeded)
    other = _copy(runs, "other-data")
    data = json.loads((other / "results.json").read_text())
    data["audit"]["data"]["fingerprint"] = {"files": 3, "sha1": "0" * 16}
    (other / "results.json").write_text(json.dumps(data))
    with pytest.raises(PupilError, match="different images or settings \\(data fingerprint\\)"):
        pt.paired(base, other)
    relabelled = _copy(runs, "relabelled")
    data = json.loads((relabelled / "results.json").read_text())
    data["run"]["classes"] = list(reversed(data["run"]["classes"]))
    (relabelled / "results.json").write_text(json.dumps(data))
    with pytest.raises(PupilError, match="different classes"):
        pt.paired(base, relabelled)


def test_missing_or_stale_per_image_files_name_the_audit_that_rewrites_them(runs):
    gone = _copy(runs, "gone")
    (gone / "audit" / "per_image" / "ood.safetensors").unlink()
    with pytest.raises(PupilError, match=f"`pupil audit {gone} --checks ood`"):
        pt.paired(runs["base"], gone)
    stale = _copy(runs, "stale")  # the accuracy file of another audit (seed 1) beside this results.json
    shutil.copy(runs["reseeded"] / "audit" / "per_image" / "accuracy.safetensors", stale / "audit" / "per_image")
    with pytest.raises(PupilError, match=f"`pupil audit {stale} --checks accuracy`"):
        pt.paired(stale, runs["base"])


def test_figures_of_one_audit_only_or_of_other_subsets_are_not_compared(runs):
    lacking = _copy(runs, "lacking")
    data = json.loads((lacking / "results.json").read_text())
    del data["checks"]["ood"]
    (lacking / "results.json").write_text(json.dumps(data))
    out = pt.paired(runs["base"], lacking, n_bootstrap=50)
    assert [r["figure"] for r in out["not_compared"]] == ["ood.mean_auroc"]
    assert f"pupil audit {lacking} --checks ood" in out["not_compared"][0]["reason"]
    assert "ood.mean_auroc" not in {r["figure"] for r in out["figures"]}

    subset = _copy(runs, "subset")
    results = load_results(subset)
    corr = read_per_image(subset, "corruption", results["audit"])
    write_per_image(subset, "corruption", {**corr, "index": corr["index"] + 1}, results["audit"])
    out = pt.paired(runs["base"], subset, n_bootstrap=50)
    assert [r["figure"] for r in out["not_compared"]] == ["corruption.mean_corrupted_top1"]
    assert "different subsets" in out["not_compared"][0]["reason"]
    gate = evaluate(
        [parse_rule("corruption.mean_corrupted_top1 >= base - 1% (paired)")], results, load_results(runs["base"]), out
    )
    assert not gate["passed"] and "different subsets" in gate["rules"][0]["detail"]


def test_compare_of_runs_that_do_not_pair(runs, tmp_path):
    board = compare([runs["base"], runs["reseeded"]], tmp_path / "c1", n_bootstrap=50)
    assert "paired" not in board and "seed 0 vs 1" in board["paired_refused"]
    assert board["mismatched_settings"] == {"seed": ["0", "1"]}
    assert 'id="paired-refused"' in (tmp_path / "c1" / "compare.html").read_text()
    # A headline column for every check that ran on any run: reseeded ran accuracy only.
    assert set(board["checks"]) == set(CHECKS)
    assert [c["text"] for c in _cells(board, "reseeded")][1:] == ["not run"] * 3
    gate = tmp_path / "g.yaml"
    gate.write_text("- accuracy.top1 >= base (paired)\n")
    with pytest.raises(PupilError, match="seed 0 vs 1"):
        compare([runs["base"], runs["reseeded"]], tmp_path / "c2", gate=gate)
    with pytest.raises(PupilError, match="exactly two runs"):
        compare([runs["base"], runs["worse"], runs["reseeded"]], tmp_path / "c3", gate=gate)
    board = compare([runs["base"], runs["worse"], runs["reseeded"]], tmp_path / "c4")
    assert "paired" not in board and "paired_refused" not in board and len(board["runs"]) == 3


def _cells(board, name):
    from pupil.report.compare import headline_table
    from pupil.report.render import fmt

    return next(r["cells"] for r in headline_table(board, fmt)["rows"] if r["name"] == name)


# ---------------------------------------------------------------------------------------------------------------
# From the command line: the exit status is what CI reads


def test_compare_gate_from_the_cli_exits_1_on_the_planted_regression(runs, tmp_path, capsys):
    from pupil.cli import main

    gate = tmp_path / "gates.yaml"
    gate.write_text("- accuracy.top1 >= base - 0.005 (paired)\n- calibration.ece <= 1.0\n")
    args = ["compare", "--out", str(tmp_path / "c1"), "--gate", str(gate), "--bootstrap", str(B)]
    assert main([*args, str(runs["base"]), str(runs["worse"])]) == 1
    out = capsys.readouterr().out
    assert "FAIL accuracy.top1 >= base - 0.005 (paired)" in out and "PASS calibration.ece <= 1.0" in out
    assert "worse" in out and "paired tests, worse against base" in out  # the paired table, its verdict column
    assert json.loads((tmp_path / "c1" / "leaderboard.json").read_text())["gate"]["passed"] is False
    same = _copy(runs, "same_cli")  # the same weights, audited alike: the gate passes
    run_audit(same, CHECKS, device="cpu", settings=TINY)
    args[2] = str(tmp_path / "c2")
    assert main([*args, str(runs["base"]), str(same)]) == 0
    assert "gate " in capsys.readouterr().out


def test_audit_gate_from_the_cli(runs, tmp_path, capsys):
    from pupil.cli import main

    run = _copy(runs, "gated")
    strict, loose, based = (tmp_path / n for n in ("strict.yaml", "loose.yaml", "based.yaml"))
    strict.write_text("- rule: accuracy.top1 >= 0.999\n  why: planted to fail\n- calibration.ece <= 1.0\n")
    loose.write_text("- accuracy.top1 >= 0.0\n")
    based.write_text("- accuracy.top1 >= base - 0.01\n")
    settings = ["--checks", "accuracy,calibration", "--set", "accuracy.n_bootstrap=20", "--device", "cpu"]
    assert main(["audit", str(run), *settings, "--gate", str(strict)]) == 1
    gate = load_results(run)["gate"]
    assert not gate["passed"] and [r["passed"] for r in gate["rules"]] == [False, True]
    assert "FAIL accuracy.top1 >= 0.999" in capsys.readouterr().out
    html = (run / "report.html").read_text()
    assert 'id="gate"' in html and "1 of 2 rules hold" in html and "why: planted to fail" in html
    assert main(["audit", str(run), *settings, "--gate", str(loose)]) == 0
    assert load_results(run)["gate"]["passed"] is True
    assert main(["audit", str(run), *settings]) == 0
    assert "gate" not in load_results(run)  # a new audit without --gate carries no old verdict
    before = (run / "results.json").read_bytes()
    assert main(["audit", str(run), *settings, "--gate", str(based)]) == 2  # base rules belong to compare
    assert "pupil compare BASE NEW --gate" in capsys.readouterr().err
    assert (run / "results.json").read_bytes() == before
