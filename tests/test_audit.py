import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion
from torchmetrics.classification import MulticlassCalibrationError

from pupil.audit import run_audit
from pupil.audit.accuracy import averages, bootstrap_ci, quadratic_weighted_kappa
from pupil.audit.calibration import fit_temperature
from pupil.config import build
from pupil.errors import PupilError
from pupil.metrics import bin_stats, brier, confusion_matrix, ece, mce, prf
from pupil.results import load_results
from pupil.training.loop import fit
from tests.conftest import ROOT

CASES = {
    "random": (torch.randint(0, 6, (500,)), torch.randint(0, 6, (500,))),
    "class never predicted": (torch.tensor([0, 1, 2, 2, 1, 0, 3]), torch.tensor([0, 1, 1, 1, 1, 0, 0])),
    "single class present": (torch.zeros(20, dtype=torch.long), torch.tensor([0] * 15 + [2] * 5)),
    "all wrong": (torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])),
}


@pytest.mark.parametrize("case", CASES)
def test_prf_and_confusion_match_sklearn(case):
    y, pred = CASES[case]
    k = 6 if case == "random" else 4
    cm = confusion_matrix(y, pred, k)
    assert np.array_equal(cm.numpy(), sk_confusion(y, pred, labels=list(range(k))))
    labels = sorted(set(y.tolist()) | set(pred.tolist()))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        ours = averages(cm)
        assert ours[f"{avg}_precision"] == pytest.approx(p)
        assert ours[f"{avg}_recall"] == pytest.approx(r)
        assert ours[f"{avg}_f1"] == pytest.approx(f)
    per = prf(cm)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    assert np.allclose(per["f1"].numpy(), f) and np.allclose(per["support"].numpy(), s)


def test_bootstrap_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (300,), generator=g)
    pred = torch.where(torch.rand(300, generator=g) < 0.7, y, torch.randint(0, 4, (300,), generator=g))
    ci = bootstrap_ci(y, pred, 4, n_boot=100, seed=7)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 300, (100, 300), generator=g)
    top1 = [(pred[i] == y[i]).double().mean().item() for i in idx]
    f1 = [precision_recall_fscore_support(y[i], pred[i], average="macro", zero_division=0)[2] for i in idx]
    assert ci["top1"] == pytest.approx(np.quantile(top1, [0.025, 0.975]).tolist())
    assert ci["macro_f1"] == pytest.approx(np.quantile(f1, [0.025, 0.975]).tolist())


def test_quadratic_weighted_kappa_matches_sklearn():
    y, pred = CASES["random"]
    assert quadratic_weighted_kappa(confusion_matrix(y, pred, 6)) == pytest.approx(
        cohen_kappa_score(y, pred, weights="quadratic")
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_and_mce_match_torchmetrics(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2000, 10, generator=g) * 3
    y = torch.randint(0, 10, (2000,), generator=g)
    conf, pred = logits.softmax(1).max(1)
    for norm, ours in (("l1", ece(conf, pred == y)), ("max", mce(conf, pred == y))):
        ref = MulticlassCalibrationError(num_classes=10, n_bins=15, norm=norm)(logits.softmax(1), y).item()
        assert ours == pytest.approx(ref, abs=1e-5)


def test_adaptive_ece_and_brier_match_naive_loops():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(300, 5, generator=g).softmax(1)
    y = torch.randint(0, 5, (300,), generator=g)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    order = conf.argsort()
    total = 0.0
    for chunk in np.array_split(order.numpy(), 15):  # 300 / 15: equal-mass bins of 20
        total += abs(correct[chunk].mean() - conf[chunk].double().mean()).item() * len(chunk) / 300
    assert ece(conf, pred == y, adaptive=True) == pytest.approx(total)
    naive = sum(sum((probs[i, c].item() - (c == y[i].item())) ** 2 for c in range(5)) for i in range(300)) / 300
    assert brier(probs, y) == pytest.approx(naive)
    assert bin_stats(conf, pred == y)["count"].sum() == 300


def test_temperature_scaling_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=g) * 2
    y = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    t = fit_temperature(true_logits * 2.5, y)  # over-confident by a factor 2.5
    grid = torch.linspace(1, 4, 301)
    best = grid[torch.stack([F.cross_entropy(true_logits * 2.5 / s, y) for s in grid]).argmin()].item()
    assert t == pytest.approx(best, abs=0.02) and t == pytest.approx(2.5, abs=0.25)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "a"})
    return fit(cfg, progress=False).dir


def test_audit_writes_valid_results_and_shares_predictions(smoke_run, monkeypatch):
    import pupil.audit.common as common

    calls = []
    real = common.predict_logits
    monkeypatch.setattr(common, "predict_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = run_audit(smoke_run, ["accuracy", "calibration"], budget="quick", device="cpu")
    assert len(calls) == 2  # test once for both checks, val once for the temperature
    saved = load_results(smoke_run)
    assert saved["checks"].keys() == {"accuracy", "calibration"}
    acc = results["checks"]["accuracy"]
    assert acc["config"]["n_bootstrap"] == 500 and acc["runtime_s"] >= 0
    assert acc["headline"]["ci95"][0] <= acc["metrics"]["top1"] <= acc["headline"]["ci95"][1]
    assert "temperature" in results["checks"]["calibration"]["metrics"]


def test_audit_efficiency_and_energy(smoke_run):
    results = run_audit(smoke_run, ["efficiency", "energy"], device="cpu")
    e = results["checks"]["efficiency"]["metrics"]
    assert e["params"] > 0 and e["flops_per_image"] > 0 and e["latency_ms"]["p95"] >= e["latency_ms"]["p50"] > 0
    assert e["peak_memory_bytes"] > 0 and e["size_on_disk_bytes"] > 0
    en = results["checks"]["energy"]["metrics"]["inference"]
    assert en["energy_kwh"] > 0 and "codecarbon" in en["method"]
    # Sections from the earlier call with the same settings are kept.
    assert "accuracy" in load_results(smoke_run)["checks"]


def test_audit_bad_input(smoke_run, tmp_path):
    with pytest.raises(PupilError, match="unknown check 'robustness'"):
        run_audit(smoke_run, ["robustness"])
    with pytest.raises(PupilError, match="has no setting"):
        run_audit(smoke_run, ["accuracy"], settings={"accuracy": {"bins": 3}})
    with pytest.raises(PupilError, match="unknown budget"):
        run_audit(smoke_run, ["accuracy"], budget="huge")


def test_nan_logits_are_refused(smoke_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(smoke_run, d)
    state = load_file(d / "model.safetensors")
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    save_file(state, d / "model.safetensors")
    with pytest.raises(PupilError, match="non-finite logits"):
        run_audit(d, ["accuracy"], device="cpu")


def test_results_that_break_the_schema_are_refused(smoke_run, tmp_path):
    path = tmp_path / "results.json"
    data = json.loads((smoke_run / "results.json").read_text())
    del data["checks"]["accuracy"]["headline"]
    path.write_text(json.dumps(data))
    with pytest.raises(PupilError, match="checks/accuracy: 'headline' is a required property"):
        load_results(path)


def test_subset_indices_are_seeded_sorted_and_cover_all_when_asked():
    from pupil.audit.common import subset_indices

    assert subset_indices(10, 0, seed=1).tolist() == list(range(10))
    assert subset_indices(10, 25, seed=1).tolist() == list(range(10))
    a, b = subset_indices(100, 7, seed=3), subset_indices(100, 7, seed=3)
    assert torch.equal(a, b) and a.tolist() == sorted(set(a.tolist())) and len(a) == 7
    assert not torch.equal(a, subset_indices(100, 7, seed=4))
