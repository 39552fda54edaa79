"""Conformal prediction sets: THR, APS and RAPS against MAPIE and the RAPS paper's code, the finite-sample guarantee
over many calibration draws, and the conformal check end to end with ``sets_for_run`` at a level it did not audit."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pupil.audit import CHECKS, run_audit
from pupil.audit.common import make_context
from pupil.audit.conformal import worst_corruption
from pupil.cli import main
from pupil.config import build
from pupil.conformal import (
    SCORES,
    calibrate,
    choose_k_reg,
    class_coverage,
    conformal_quantile,
    conformity_scores,
    coverage_interval,
    expected_set_sizes,
    prediction_sets,
    quantile_rank,
    set_lists,
    set_sizes,
    sets_for_run,
    size_stratified_coverage,
    softmax,
    true_ranks,
    uniforms_for,
)
from pupil.errors import PupilError
from pupil.report.plots import draw
from pupil.results import PER_IMAGE_DIR, SUMMARY_KEYS, load_results, read_per_image
from pupil.training.loop import fit
from tests.conftest import ROOT

K = 8


def softmax_draws(n: int, g: torch.Generator, k: int = K, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """n exchangeable (probabilities, label) pairs from a calibrated model: y ~ Categorical(p)."""
    p = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).softmax(1)
    return p, torch.multinomial(p, 1, generator=g)[:, 0]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return (*softmax_draws(300, g), *softmax_draws(400, g))


def mapie_u(seed: int, n: int) -> torch.Tensor:
    """Our u for MAPIE's draws: MAPIE scores rho + p_y - U p_y and keeps a label when its V <= U, which is our
    E(x, y, u) <= q with u = 1 - U; a fresh RandomState(seed) gives its U for the scores and for the sets."""
    return 1 - torch.from_numpy(np.random.RandomState(seed).uniform(size=n))


# ---------------------------------------------------------------------------------------------------------------
# Against MAPIE 1.6 and the RAPS paper's code


def test_thr_and_randomized_aps_match_mapies_split_conformal_classifier(data):
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Given(ClassifierMixin, BaseEstimator):  # a "model" whose inputs are its softmax outputs
        def fit(self, X, y):
            self.classes_ = np.arange(K)
            return self

        def predict_proba(self, X):
            return np.asarray(X)

        def predict(self, X):
            return np.asarray(X).argmax(1)

    pc, yc, pt, _ = data
    levels = [0.8, 0.9, 0.95]
    for score, mapie_name, params in (("thr", "lac", {}), ("aps", "aps", {"include_last_label": "randomized"})):
        mapie = SplitConformalClassifier(Given().fit(pc.numpy(), yc.numpy()), levels, mapie_name, random_state=7)
        _, theirs = mapie.conformalize(pc.numpy(), yc.numpy()).predict_set(pt.numpy(), conformity_score_params=params)
        u_cal, u_test = (mapie_u(7, len(yc)), mapie_u(7, len(pt))) if score == "aps" else (None, None)
        ours = conformity_scores(pc, yc, score, u_cal)
        assert ours.numpy() == pytest.approx(mapie.conformity_scores.ravel(), abs=1e-12)
        for j, level in enumerate(levels):
            q = conformal_quantile(ours, level)
            assert torch.equal(prediction_sets(pt, q, score, u_test), torch.from_numpy(theirs[:, :, j])), (score, level)


@pytest.mark.parametrize("score", ["aps", "raps"])
def test_non_randomized_aps_and_raps_match_mapies_scores_quantile_and_sets(data, score):
    """MAPIE's include_last_label=True: the labels up to the first whose cumulated score reaches q, as ours.
    (Its high-level APS always calibrates randomized scores, so the non-randomized form is compared through
    its score classes, given the same k_reg and lambda.)"""
    from mapie.conformity_scores import APSConformityScore, RAPSConformityScore
    from mapie.utils import _compute_classification_quantile

    pc, yc, pt, _ = data
    alpha = np.array([0.1])
    for k_reg, lam in ((1, 0.0), (2, 0.1), (3, 0.5)) if score == "raps" else ((1, 0.0),):
        mapie = RAPSConformityScore() if score == "raps" else APSConformityScore()
        mapie.set_external_attributes(classes=np.arange(K), random_state=0)
        mapie.k_star, mapie.lambda_star = np.array([k_reg]), lam
        cum, rank = APSConformityScore.get_true_label_cumsum_proba(yc.numpy(), pc.numpy(), np.arange(K))
        theirs = RAPSConformityScore._regularize_conformity_score(np.array([k_reg]), lam, cum.copy(), rank)
        ours = conformity_scores(pc, yc, score, None, k_reg, lam)
        assert np.array_equal(ours.numpy(), theirs[:, 0, 0])
        mapie.quantiles_ = _compute_classification_quantile(theirs, alpha)
        q = conformal_quantile(ours, 0.9)
        assert q == mapie.quantiles_[0]
        sets = mapie.get_prediction_sets(pt.numpy()[:, :, None], theirs, alpha, "prefit", include_last_label=True)
        mine = prediction_sets(pt, q, score, None, k_reg, lam)
        assert torch.equal(mine, torch.from_numpy(sets[:, :, 0])) and mine.any(1).all()  # never empty


def paper_raps_sizes(p: np.ndarray, tau: float, k_reg: int, lam: float, rand: np.ndarray) -> np.ndarray:
    """Set sizes of the RAPS paper's code (``gcq`` in conformal_classification, randomized, zero sets allowed)."""
    ordered = -np.sort(-p, axis=1)
    cumsum = ordered.cumsum(1)
    penalties = np.zeros((1, p.shape[1]))
    penalties[:, k_reg:] += lam
    pen_cumsum = penalties.cumsum(1)
    base = np.minimum(((cumsum + pen_cumsum) <= tau).sum(1) + 1, p.shape[1])
    rows = np.arange(len(p))
    v = (tau - (cumsum[rows, base - 1] - ordered[rows, base - 1]) - pen_cumsum[0, base - 1]) / ordered[rows, base - 1]
    return base - (rand >= v).astype(int)


def test_randomized_raps_matches_the_papers_code_and_mapie_where_mapie_follows_it(data):
    from mapie.conformity_scores import RAPSConformityScore

    pc, yc, pt, _ = data
    for k_reg, lam in ((1, 0.01), (2, 0.01), (3, 0.1), (3, 0.5)):
        u = mapie_u(0, len(pt))
        q = conformal_quantile(conformity_scores(pc, yc, "raps", mapie_u(0, len(yc)), k_reg, lam), 0.9)
        ours = set_sizes(pt, q, "raps", u, k_reg, lam)
        assert np.array_equal(ours.numpy(), paper_raps_sizes(pt.numpy(), q, k_reg, lam, u.numpy()))
        mapie = RAPSConformityScore()
        mapie.set_external_attributes(classes=np.arange(K), random_state=0)
        mapie.k_star, mapie.lambda_star = np.array([k_reg]), lam
        mapie.quantiles_ = np.array([q])
        sets = mapie.get_prediction_sets(pt.numpy()[:, :, None], None, np.array([0.1]), "prefit", "mean", "randomized")
        # MAPIE's V for RAPS divides by p_L - lambda (L - k_reg)^+ + lambda [L > k_reg] where the paper divides by
        # p_L: the two agree when the last candidate label's rank L is at most k_reg + 1 (MAPIE 1.6,
        # RAPSConformityScore._compute_v_parameter).
        last = set_sizes(pt, q, "raps", None, k_reg, lam)  # L: the deterministic set's size
        agree = last <= k_reg + 1
        assert (last == k_reg + 1).sum() >= 30  # rows where the penalty acts on the label drawn for
        mine = prediction_sets(pt, q, "raps", u, k_reg, lam)
        assert torch.equal(mine[agree], torch.from_numpy(sets[:, :, 0])[agree])


def test_the_quantile_is_maps_order_statistic_and_infinite_past_n():
    from mapie.utils import _compute_classification_quantile

    g = torch.Generator().manual_seed(3)
    for n in (9, 19, 45, 99, 200):
        s = torch.rand(n, generator=g, dtype=torch.float64)
        for level in (0.5, 0.8, 0.9, 0.95, 0.99):
            k = math.ceil((n + 1) * level - 1e-9)
            assert quantile_rank(n, level) == k
            if k > n:
                assert conformal_quantile(s, level) == math.inf
                assert prediction_sets(s[:, None].expand(-1, 3).softmax(1), math.inf, "thr").all()
            else:
                expected = _compute_classification_quantile(s.numpy()[:, None], np.array([1 - level]))[0]
                assert conformal_quantile(s, level) == expected == s.sort().values[k - 1].item()
    assert quantile_rank(199, 0.545) == 109  # 200 * 0.545 is 109.00000000000001 in floating point


def test_pick_kreg_and_the_expected_size_follow_their_definitions(data):
    pc, yc, pt, _ = data
    ranks = np.argsort(np.argsort(-pc.numpy(), axis=1, kind="stable"), axis=1)[np.arange(len(yc)), yc.numpy()]
    assert torch.equal(true_ranks(pc, yc), torch.from_numpy(ranks))
    for level in (0.8, 0.9, 0.99):  # RAPS's pick_kreg
        assert choose_k_reg(pc, yc, level) == int(np.quantile(ranks, level, method="higher")) + 1
    g = torch.Generator().manual_seed(5)
    q = conformal_quantile(conformity_scores(pc, yc, "raps", torch.rand(len(yc), generator=g), 2, 0.1), 0.9)
    u = torch.rand(400 * len(pt), generator=g, dtype=torch.float64)
    mc = set_sizes(pt.repeat(400, 1), q, "raps", u, 2, 0.1).double().view(400, -1).mean(0)  # mean over 400 u each
    assert torch.allclose(expected_set_sizes(pt, q, "raps", True, 2, 0.1), mc, atol=0.1)
    assert (expected_set_sizes(pt, q, "raps", True, 2, 0.1) - mc).mean().abs() < 0.01


def test_coverage_summaries_match_naive_loops():
    from statsmodels.stats.proportion import proportion_confint

    for k, n in ((0, 10), (7, 10), (10, 10), (930, 1000)):
        assert coverage_interval(k, n) == pytest.approx(list(proportion_confint(k, n, 0.05, "beta")), abs=1e-9)
    g = torch.Generator().manual_seed(2)
    sizes = torch.randint(0, 14, (500,), generator=g)
    covered = torch.rand(500, generator=g) < 0.9
    y = torch.randint(0, 5, (500,), generator=g)
    bins = size_stratified_coverage(sizes, covered)
    assert [b["sizes"] for b in bins] == ["0-1", "2-3", "4-6", "7-10", "11-100"]
    for b in bins:
        low, high = map(int, b["sizes"].split("-"))
        inside = [c for s, c in zip(sizes.tolist(), covered.tolist()) if low <= s <= high]
        assert b["count"] == len(inside) and b["coverage"] == pytest.approx(sum(inside) / len(inside))
    per_class, support = class_coverage(covered, y, 6)
    for c in range(5):
        assert per_class[c].item() == pytest.approx(covered[y == c].double().mean().item())
    assert support[5] == 0 and math.isnan(per_class[5])
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=torch.float64)
    assert set_lists(p, torch.tensor([2, 0])) == [[1, 2], []]


# ---------------------------------------------------------------------------------------------------------------
# The finite-sample guarantee


@pytest.mark.parametrize("score,randomized", [("thr", False), ("aps", True), ("raps", True), ("aps", False)])
def test_coverage_over_many_calibration_draws_is_exactly_the_corrected_order_statistics(score, randomized):
    """Over 400 draws of 50 calibration and 200 test images, mean coverage must be >= 1 - alpha and, for a
    continuous (THR) or randomized score, equal ceil((n + 1)(1 - alpha)) / (n + 1) within Monte-Carlo error, so at
    most 1 - alpha + 1/(n + 1). The same draws put the uncorrected quantile (the ceil(n (1 - alpha))-th score) and
    the next order statistic outside these bounds: the test would catch either mistake."""
    draws, n, m, level = 400, 50, 200, 0.9
    g = torch.Generator().manual_seed(11)
    k_reg, lam = 2, 0.1
    k = quantile_rank(n, level)
    assert math.ceil(n * level) == k - 1  # the uncorrected rank is one lower here
    p, y = softmax_draws(draws * (n + m), g)  # draw d's calibration images, then its test images
    u = torch.rand(draws * (n + m), generator=g, dtype=torch.float64) if randomized else None
    cal = (torch.arange(draws * (n + m)) % (n + m)) < n
    s = conformity_scores(p[cal], y[cal], score, None if u is None else u[cal], k_reg, lam).view(draws, n).sort(1)
    ranks = true_ranks(p[~cal], y[~cal])
    assert s.values[0, k - 1].item() == conformal_quantile(s.values[0], level)
    cover = {}  # order statistic -> coverage of each draw's test images (draws,)
    for j in (k - 1, k, k + 1):
        q = s.values[:, j - 1].repeat_interleave(m)  # draw d's threshold for each of its test images
        sizes = set_sizes(p[~cal], q, score, None if u is None else u[~cal], k_reg, lam)
        cover[j] = (ranks < sizes).double().view(draws, m).mean(1)
    mean = {j: c.mean().item() for j, c in cover.items()}
    se = {j: c.std().item() / math.sqrt(draws) for j, c in cover.items()}
    assert mean[k] >= level - 3 * se[k]
    if score == "thr" or randomized:
        assert mean[k] <= level + 1 / (n + 1) + 3 * se[k]
        assert abs(mean[k] - k / (n + 1)) <= 4 * se[k]  # exact: E[coverage] = k / (n + 1)
        assert mean[k - 1] < level - 3 * se[k - 1]  # the uncorrected quantile fails the lower bound
        assert abs(mean[k + 1] - k / (n + 1)) > 4 * se[k + 1]  # one order statistic too many is caught as well
    else:
        assert mean[k] > k / (n + 1) + 4 * se[k]  # deterministic APS keeps the crossing label: conservative


# ---------------------------------------------------------------------------------------------------------------
# The check end to end

SMALL = {"n": 128, "corruptions": ["gaussian_noise", "contrast"]}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformal")
    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "c", "val_size": 200})
    run = fit(cfg, progress=False).dir
    results = run_audit(run, ["conformal"], budget="quick", device="cpu", settings={"conformal": SMALL})
    return run, results


def test_the_check_calibrates_on_the_validation_split_and_measures_on_the_test_split(audited):
    run, results = audited
    c = results["checks"]["conformal"]
    m, s = c["metrics"], c["summary"]
    assert list(s) == list(SUMMARY_KEYS["conformal"])
    assert s["score"] in SCORES and s["randomized"] == 1 and s["temperature"] > 0
    assert c["headline"]["value"] == s["set_size_95"] == m["scores"][s["score"]]["0.95"]["mean_set_size"]
    assert s["set_size_95"] == min(m["scores"][x]["0.95"]["mean_set_size"] for x in SCORES)
    assert m["n_tuning"] + m["n_calibration"] == m["n_validation"] == 200 and m["n_test"] == 512
    for score in SCORES:
        for level in ("0.9", "0.95"):
            r = m["scores"][score][level]
            assert 0.75 <= r["coverage"] <= 1 and r["coverage_ci95"][0] <= r["coverage"] <= r["coverage_ci95"][1]
            assert 0.5 <= r["mean_set_size"] <= 4 and r["threshold"] is not None
            assert sum(b["count"] for b in r["by_set_size"]) == 512
        assert m["scores"][score]["0.9"]["mean_set_size"] <= m["scores"][score]["0.99"]["mean_set_size"]
    shift = m["corruption"]
    assert shift["corruptions"] == ["gaussian_noise", "contrast"] and shift["n"] == 128
    worst, ref = worst_corruption(shift, s["score"], m["reference_level"]), f"{m['reference_level']:g}"
    assert worst["coverage"] == min(shift["corrupted"][c][s["score"]][ref]["coverage"] for c in shift["corruptions"])
    assert worst["drop"] == pytest.approx(shift["clean"][s["score"]][ref]["coverage"] - worst["coverage"])
    assert [f["kind"] for f in c["figures"]] == ["line", "bars", "histogram", "bars"]
    for f in c["figures"]:
        assert draw(f, c).startswith("data:image/png;base64,")
    assert {"by_score", "by_set_size", "by_class", "under_corruption"} <= set(c["tables"])
    # What it calibrated on: the stored validation logits are the validation split's, and the audit's thresholds
    # come back from them alone (the test split never enters).
    ctx = make_context(run, "cpu", "quick", 0)
    stored = read_per_image(run, "conformal", results["audit"])
    assert torch.equal(stored["val_logits"], ctx.logits("val")) and stored["calibration_mask"].sum() == 140
    for score in SCORES:
        again = calibrate(
            stored["val_logits"],
            stored["val_targets"],
            stored["calibration_mask"],
            s["temperature"],
            0.95,
            score,
            stored["val_u"],
        )
        assert again.threshold == pytest.approx(m["scores"][score]["0.95"]["threshold"], abs=1e-12)


def test_sets_for_run_works_at_a_level_the_audit_did_not_use(audited):
    run, results = audited
    m = results["checks"]["conformal"]["metrics"]
    ctx = make_context(run, "cpu", "quick", 0)
    logits, y = ctx.logits("test"), ctx.targets("test")
    sets, used = sets_for_run(run, logits, 0.8)
    assert used["level"] == 0.8 and used["score"] == m["score"] and used["n_calibration"] == 140
    assert used["randomized"] == (m["score"] != "thr") and used["temperature"] == m["temperature"]
    assert used["threshold"] <= m["scores"][m["score"]]["0.9"]["threshold"]
    assert len(sets) == len(y) and all(len(set(s)) == len(s) for s in sets)
    coverage = np.mean([int(t) in s for s, t in zip(sets, y.tolist())])
    assert 0.65 <= coverage <= 0.95
    probs = softmax(logits, used["temperature"])
    assert all(probs[i, s].tolist() == sorted(probs[i, s].tolist(), reverse=True) for i, s in enumerate(sets[:50]))
    _, raps = sets_for_run(run, logits, 0.95, "raps")  # an audited level: the audit's own RAPS
    for key in ("threshold", "k_reg", "lambda"):
        assert raps[key] == pytest.approx(m["scores"]["raps"]["0.95"][key])


def test_sets_for_run_refuses_in_one_line(audited, tmp_path):
    run, _ = audited
    logits = torch.zeros(2, 4)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    cases = [
        (run, 1.0, None, "between 0 and 1"),
        (run, 0.9, "lac", "unknown conformal score 'lac'"),
        (tmp_path, 0.9, None, "has not been audited: run `pupil audit"),
    ]
    for where, level, score, message in cases:
        with pytest.raises(PupilError, match=message) as e:
            sets_for_run(where, logits, level, score)
        assert "\n" not in str(e.value)
    results = load_results(copy)
    stale = {**results, "audit": {**results["audit"], "seed": 1}}  # a later audit with another seed
    (copy / "results.json").write_text(json.dumps(stale))
    with pytest.raises(PupilError, match="per-image file .* is missing or from another audit: run `pupil audit"):
        sets_for_run(copy, logits, 0.9)
    (copy / "results.json").write_text(json.dumps(results))
    assert sets_for_run(copy, logits, 0.9)[1]["level"] == 0.9
    (copy / PER_IMAGE_DIR / "conformal.safetensors").unlink()
    with pytest.raises(PupilError, match="per-image file .* is missing or from another audit: run `pupil audit"):
        sets_for_run(copy, logits, 0.9)
    del results["checks"]["conformal"]
    (copy / "results.json").write_text(json.dumps(results))
    with pytest.raises(PupilError, match="has no conformal section: run `pupil audit .* --checks conformal`"):
        sets_for_run(copy, logits, 0.9)


def test_a_run_without_a_validation_split_is_refused(audited):
    run, _ = audited
    ctx = make_context(run, "cpu", "quick", 0)
    ctx.val = None
    check = CHECKS.get("conformal")()
    with pytest.raises(PupilError, match=r"calibrates on a validation split; this run has none \(train with") as e:
        check.run(ctx, check.config("quick", SMALL))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"levels": [0.9, 1.0]}, "conformal.levels must be a list of finite numbers between 0 and 1 (exclusive), not"),
        ({"tune_fraction": 0}, "conformal.tune_fraction must be a finite number between 0 and 1 (exclusive), not 0"),
        ({"severity": 7}, "conformal.severity must be an integer from 1 to 5, not 7"),
        ({"corruptions": ["fog2"]}, "(unknown corruption 'fog2')"),
        ({"randomized": "maybe"}, "conformal.randomized must be true or false"),
    ],
)
def test_bad_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(PupilError) as e:
        CHECKS.get("conformal")().config("quick", settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_setting_on_the_command_line_exits_2(audited, capsys):
    run, _ = audited
    assert main(["audit", str(run), "--checks", "conformal", "--device", "cpu", "--set", "conformal.levels=0.9,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "conformal.levels must be a list of finite numbers between 0 and 1" in err and len(err.splitlines()) == 1


def test_the_default_check_list_leaves_conformal_out_of_a_run_without_a_validation_split(tmp_path, monkeypatch):
    import pupil.audit

    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(tmp_path), "name": "noval", "val_size": 0})
    run = fit(cfg, progress=False).dir
    monkeypatch.setattr(pupil.audit, "DEFAULT_CHECKS", ["accuracy", "conformal"])  # the default list, made short
    results = run_audit(run, None, device="cpu", settings={"accuracy": {"n_bootstrap": 20}})
    assert list(results["checks"]) == ["accuracy"]
    assert (
        "skipped the conformal check: it calibrates on a validation split, and this run has none"
        in (results["audit"]["notes"])
    )
    with pytest.raises(PupilError, match="calibrates on a validation split; this run has none"):
        run_audit(run, ["conformal"], device="cpu")  # asked for by name: refused


def test_an_image_gets_the_same_randomized_set_wherever_it_stands(audited):
    run, _ = audited
    ctx = make_context(run, "cpu", "quick", 0)
    images, logits = ctx.test.images[:40], ctx.logits("test")[:40]
    keys = [img.numpy().tobytes() for img in images]
    sets, used = sets_for_run(run, logits, 0.9, "aps", keys)
    assert used["randomized"]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled, _ = sets_for_run(run, logits[order], 0.9, "aps", [keys[i] for i in order])
    assert [shuffled[j] for j in range(40)] == [sets[i] for i in order]
    u = uniforms_for(keys, 0)
    assert len(set(u.tolist())) == 40 and u.min() >= 0 and u.max() < 1
    assert not torch.equal(u, uniforms_for(keys, 1))  # the audit's seed enters the draw


def test_predict_prints_the_prediction_set(audited, tmp_path, capsys):
    from PIL import Image

    from pupil.cli import main

    run, _ = audited
    ctx = make_context(run, "cpu", "quick", 0)
    paths = []
    for i in range(3):
        img = ctx.test.images[i].numpy()
        path = tmp_path / f"img{i}.png"
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(path)
        paths.append(str(path))
    assert main(["predict", str(run), *paths, "--conformal", "0.9", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("90% prediction set (") == 3 and "calibrated on 140 validation images" in out
    logits = ctx.logits("test")[:3]
    keys = [ctx.test.images[i].numpy().tobytes() for i in range(3)]
    expected, _ = sets_for_run(run, logits, 0.9, None, keys)
    for s in expected:
        assert f"({len(s)}): {', '.join(ctx.run.classes[i] for i in s)}" in out
    assert main(["predict", str(run), paths[0], "--conformal", "1.5"]) == 2
    assert "--conformal takes a coverage between 0 and 1" in capsys.readouterr().err
