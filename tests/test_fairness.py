import numpy as np
import pytest
import torch
from fairlearn.metrics import equalized_odds_difference
from PIL import Image

from pupil.audit import run_audit
from pupil.audit.common import make_context
from pupil.audit.fairness import (
    THUMBNAIL,
    bootstrap_gaps,
    brightness_terciles,
    discover_slices,
    equalized_odds,
    gaps,
    group_stats,
    metric_frame,
)
from pupil.config import build
from pupil.data import load
from pupil.errors import PupilError
from pupil.report.plots import decode_png
from pupil.results import load_results, png_data_uri
from pupil.training.loop import fit
from tests.conftest import ROOT


def synthetic_predictions(n=400, k=4, seed=0):
    """Three groups with different error rates: group c is much worse than a and b."""
    rng = np.random.default_rng(seed)
    groups = rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])
    y = rng.integers(0, k, n)
    p_right = np.where(groups == "c", 0.5, 0.85)
    pred = np.where(rng.random(n) < p_right, y, rng.integers(0, k, n))
    conf = rng.uniform(0.3, 1.0, n)
    return y, pred, conf, groups


def hand_group_metrics(y, pred, conf, groups, k):
    out = {}
    for g in sorted(set(groups)):
        m = groups == g
        yy, pp, cc = y[m], pred[m], conf[m]
        f1s = []
        for c in range(k):
            if not ((yy == c).any() or (pp == c).any()):
                continue
            tp = np.sum((yy == c) & (pp == c))
            prec = tp / max(np.sum(pp == c), 1)
            rec = tp / max(np.sum(yy == c), 1)
            f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
        e = 0.0
        for b in range(15):
            lo, hi = b / 15, (b + 1) / 15
            inb = (cc >= lo) & ((cc < hi) if b < 14 else (cc <= hi))
            if inb.any():
                e += abs(np.mean(yy[inb] == pp[inb]) - np.mean(cc[inb])) * inb.sum() / len(yy)
        recall = [np.mean(pp[yy == c] == c) if (yy == c).any() else np.nan for c in range(k)]
        out[g] = {"accuracy": np.mean(yy == pp), "macro_f1": np.mean(f1s), "ece": e, "recall": recall}
    return out


def hand_equalized_odds(y, pred, groups, k):
    """Max over classes and over TPR/FPR of (max - min over groups); a rate with no cases is 0, as in fairlearn."""
    worst = 0.0
    for c in range(k):
        tpr, fpr = [], []
        for g in sorted(set(groups)):
            m = groups == g
            pos, neg = m & (y == c), m & (y != c)
            tpr.append(np.mean(pred[pos] == c) if pos.any() else 0.0)
            fpr.append(np.mean(pred[neg] == c) if neg.any() else 0.0)
        worst = max(worst, max(tpr) - min(tpr), max(fpr) - min(fpr))
    return worst


def test_group_metrics_match_a_hand_computation():
    y, pred, conf, groups = synthetic_predictions()
    hand = hand_group_metrics(y, pred, conf, groups, 4)
    mf = metric_frame(y, pred, conf, list(groups), 4)
    codes = torch.as_tensor(np.searchsorted(["a", "b", "c"], groups))
    stats = group_stats(torch.as_tensor(y), torch.as_tensor(pred), torch.as_tensor(conf), codes, 3, 4)
    for i, g in enumerate(["a", "b", "c"]):
        for m in ("accuracy", "macro_f1", "ece"):
            assert mf.by_group.loc[g, m] == pytest.approx(hand[g][m])
            assert stats[m][0, i].item() == pytest.approx(hand[g][m])
        for c in range(4):
            assert mf.by_group.loc[g, f"recall/{c}"] == pytest.approx(hand[g]["recall"][c], nan_ok=True)
            assert stats["tpr"][0, i, c].item() == pytest.approx(hand[g]["recall"][c])
    accs = [hand[g]["accuracy"] for g in "abc"]
    assert mf.difference()["accuracy"] == pytest.approx(max(accs) - min(accs))
    assert mf.ratio()["accuracy"] == pytest.approx(min(accs) / max(accs))
    assert gaps(stats)["accuracy"].item() == pytest.approx(max(accs) - min(accs))
    assert mf.group_min()["accuracy"] == pytest.approx(hand["c"]["accuracy"])


def test_equalized_odds_matches_fairlearn():
    rng = np.random.default_rng(1)
    groups = rng.choice(["x", "y"], 300)
    y = rng.integers(0, 2, 300)
    pred = np.where(rng.random(300) < np.where(groups == "x", 0.9, 0.6), y, 1 - y)
    direct = equalized_odds_difference(y, pred, sensitive_features=groups)
    assert max(equalized_odds(y, pred, list(groups), 2)) == pytest.approx(direct)
    codes = torch.as_tensor((groups == "y").astype(np.int64))
    stats = group_stats(torch.as_tensor(y), torch.as_tensor(pred), torch.rand(300, dtype=torch.float64), codes, 2, 2)
    assert gaps(stats)["equalized_odds"].item() == pytest.approx(direct)
    # Multiclass: the batched one-vs-rest maximum equals the fairlearn loop, even with a class missing in a group.
    y4, pred4, conf4, groups4 = synthetic_predictions(k=4, seed=2)
    y4[(groups4 == "c") & (y4 == 3)] = 2
    codes4 = torch.as_tensor(np.searchsorted(["a", "b", "c"], groups4))
    stats4 = group_stats(torch.as_tensor(y4), torch.as_tensor(pred4), torch.as_tensor(conf4), codes4, 3, 4)
    reference = max(equalized_odds(y4, pred4, list(groups4), 4))
    assert gaps(stats4)["equalized_odds"].item() == pytest.approx(reference)
    assert hand_equalized_odds(y4, pred4, groups4, 4) == pytest.approx(reference)


def test_bootstrap_matches_a_naive_loop():
    y, pred, conf, groups = synthetic_predictions(n=200)
    codes = torch.as_tensor(np.searchsorted(["a", "b", "c"], groups))
    tensors = torch.as_tensor(y), torch.as_tensor(pred), torch.as_tensor(conf)
    ours = bootstrap_gaps(*tensors, codes, 3, 4, n_boot=30, seed=5)
    g = torch.Generator().manual_seed(5)
    index = torch.randint(0, 200, (30, 200), generator=g).numpy()
    diffs = {"accuracy": [], "macro_f1": [], "ece": [], "equalized_odds": []}
    acc_c = []
    for i in index:
        hand = hand_group_metrics(y[i], pred[i], conf[i], groups[i], 4)
        for m in ("accuracy", "macro_f1", "ece"):
            v = [h[m] for h in hand.values()]
            diffs[m].append(max(v) - min(v))
        diffs["equalized_odds"].append(hand_equalized_odds(y[i], pred[i], groups[i], 4))
        acc_c.append(hand["c"]["accuracy"])
    for m, v in diffs.items():
        assert ours[m] == pytest.approx(np.quantile(v, [0.025, 0.975]).tolist()), m
    assert ours["group_accuracy"][2] == pytest.approx(np.quantile(acc_c, [0.025, 0.975]).tolist())


def test_slice_discovery_finds_a_planted_bad_cluster():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 5
    blob = np.repeat(np.arange(5), 80)
    feats = torch.as_tensor(centres[blob] + rng.normal(size=(400, 16)) * 0.3)
    y = torch.as_tensor(blob % 3)
    correct = torch.as_tensor(np.where(blob == 3, False, rng.random(400) < 0.9))
    pred = torch.where(correct, y, (y + 1) % 3)
    labels, dist, rows = discover_slices(feats, y, pred, 5, seed=0)
    worst = rows[0]
    assert worst["accuracy"] == 0 and worst["size"] == 80 and worst["dominant_class"] == 0
    assert worst["confusion"] == [0, 1] and worst["errors"] == 80
    assert set(np.flatnonzero(labels.numpy() == worst["slice"])) == set(np.flatnonzero(blob == 3))
    assert [r["accuracy"] for r in rows] == sorted(r["accuracy"] for r in rows)
    assert dist.shape == (400,) and (dist >= 0).all()


def test_brightness_terciles_and_thumbnails():
    images = torch.arange(9, dtype=torch.uint8).mul(20).view(9, 1, 1, 1).expand(9, 1, 4, 4).flip(0)
    assert brightness_terciles(images) == ["bright"] * 3 + ["medium"] * 3 + ["dark"] * 3
    thumb = decode_png(png_data_uri(torch.zeros(3, 64, 32, dtype=torch.uint8), THUMBNAIL))
    assert thumb.shape == (28, 14, 3)
    small = decode_png(png_data_uri(torch.full((1, 12, 12), 7, dtype=torch.uint8), THUMBNAIL))
    assert small.shape == (12, 12) and (small == 7).all()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fair")
    recipe = ROOT / "recipes/smoke/synthetic.yaml"
    plain = fit(build(recipe, {"out": str(tmp), "name": "plain"}), progress=False).dir
    # A manifest of PNGs with a site column; site C's test images are darkened so the model does worse there.
    ds = load("synthetic", "train")
    folder = tmp / "png"
    folder.mkdir()
    lines = ["path,label,site,split"]
    for i in range(320):
        site, split = "ABC"[i % 3], "test" if i >= 200 else "train"
        img = ds.images[i, 0].numpy()
        if site == "C" and split == "test":
            img = img // 4
        Image.fromarray(img).save(folder / f"{i}.png")
        lines.append(f"png/{i}.png,{ds.classes[int(ds.targets[i])]},{site},{split}")
    (tmp / "m.csv").write_text("\n".join(lines) + "\n")
    manifest = fit(
        build(recipe, {"out": str(tmp), "name": "manifest", "dataset": str(tmp / "m.csv"), "val_size": 40}),
        progress=False,
    ).dir
    return plain, manifest


def test_fairness_end_to_end_with_the_brightness_proxy(runs):
    import pupil.audit.fairness  # noqa: F401  (registers the check)

    plain, _ = runs
    run_audit(plain, ["fairness"], device="cpu", settings={"fairness": {"slices": 4, "slice_examples": 3}})
    sec = load_results(plain)["checks"]["fairness"]
    assert sec["metrics"]["attribute_kind"] == "proxy"
    assert any(n.startswith("PROXY") and "not a demographic attribute" in n for n in sec["notes"])
    assert sec["curves"]["groups"]["groups"] == ["dark", "medium", "bright"]
    accs = sec["curves"]["groups"]["accuracy"]
    assert sec["headline"]["value"] == pytest.approx(max(accs) - min(accs))
    lo, hi = sec["headline"]["ci95"]
    assert lo <= hi
    assert len(sec["tables"]["slices"]["rows"]) == 4
    ex = sec["curves"]["slice_examples"][0]
    assert len(ex["images"]) == 3 and decode_png(ex["images"][0]).shape == (16, 16)  # grey 16x16
    # proxy none: the slices are the groups.
    res = run_audit(plain, ["fairness"], device="cpu", settings={"fairness": {"proxy": "none", "slices": 3}})
    assert res["checks"]["fairness"]["curves"]["groups"]["groups"] == ["slice 0", "slice 1", "slice 2"]


def test_fairness_end_to_end_with_a_manifest_column(runs):
    import pupil.audit.fairness  # noqa: F401

    _, manifest = runs
    res = run_audit(manifest, ["fairness"], device="cpu", settings={"fairness": {"groups": "site", "min_group": 45}})
    sec = res["checks"]["fairness"]
    assert sec["metrics"]["attribute_kind"] == "column" and not any("PROXY" in n for n in sec["notes"])
    ctx = make_context(manifest, "cpu", "quick", 0)
    site = np.array(ctx.test.columns["site"])
    correct = (ctx.logits().argmax(1) == ctx.test.targets).numpy()
    for g in "ABC":
        v = sec["metrics"]["groups"][g]
        assert v["n"] == (site == g).sum() and v["small"] == (v["n"] < 45)
        assert v["accuracy"] == pytest.approx(correct[site == g].mean())
    gap = sec["metrics"]["gaps"]["accuracy"]
    accs = [correct[site == g].mean() for g in "ABC"]
    assert gap["difference"] == pytest.approx(max(accs) - min(accs))
    assert gap["worst_group"] == "ABC"[int(np.argmin(accs))]
    with pytest.raises(PupilError, match=r"no column 'sex'; available columns: path, site, split"):
        run_audit(manifest, ["fairness"], device="cpu", settings={"fairness": {"groups": "sex"}})
