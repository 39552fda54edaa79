import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from pupil.audit import run_audit
from pupil.audit.common import make_context
from pupil.audit.uncertainty import (
    aggregate,
    aurc,
    defer,
    deferral_threshold,
    entropy,
    has_dropout,
    mc_dropout,
    mc_dropout_passes,
    optimal_aurc,
    risk_coverage,
    translate,
    tta_views,
)
from pupil.config import build
from pupil.errors import PupilError
from pupil.models import create
from pupil.results import load_results
from pupil.training.loop import fit
from tests.conftest import ROOT


def naive_aurc(conf: list[float], correct: list[bool]) -> float:
    """Sort by confidence (descending, input order among ties) and average the risk over k = 1..N."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    risks = []
    for k in range(1, len(conf) + 1):
        accepted = order[:k]
        risks.append(sum(not correct[i] for i in accepted) / k)
    return float(np.mean(risks))


def test_aurc_matches_a_naive_loop_without_ties():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(300, generator=g, dtype=torch.float64)
    correct = torch.rand(300, generator=g) < conf  # confident cases tend to be right
    assert aurc(conf, correct) == pytest.approx(naive_aurc(conf.tolist(), correct.tolist()))
    cov, risk = risk_coverage(conf, correct)
    assert cov[-1] == 1 and risk[-1] == pytest.approx(1 - correct.double().mean().item())


def test_aurc_with_ties_is_the_mean_over_tie_orders():
    conf = torch.tensor([0.9, 0.7, 0.7, 0.7, 0.5, 0.5, 0.2])
    correct = torch.tensor([True, False, True, True, False, True, False])
    ties = [[1, 2, 3], [4, 5]]
    values = []
    for p1, p2 in itertools.product(itertools.permutations(ties[0]), itertools.permutations(ties[1])):
        order = [0, *p1, *p2, 6]
        values.append(naive_aurc([-i for i in range(7)], [bool(correct[i]) for i in order]))
    assert aurc(conf, correct) == pytest.approx(np.mean(values))
    # Independent of the input order.
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    assert aurc(conf[perm], correct[perm]) == pytest.approx(aurc(conf, correct))


def test_optimal_aurc_is_the_perfect_ranking():
    correct = torch.tensor([False, True, True, False, True])
    conf = correct.double()  # every correct case above every error, no ties inside a group that mixes them
    assert optimal_aurc(correct) == pytest.approx(naive_aurc([1, 0.9, 0.8, 0.1, 0.0], [1, 1, 1, 0, 0]))
    assert aurc(conf, correct) == pytest.approx(optimal_aurc(correct))
    assert optimal_aurc(torch.ones(4, dtype=torch.bool)) == 0


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_deferral_threshold_matches_brute_force(target):
    g = torch.Generator().manual_seed(3)
    conf = (torch.rand(200, generator=g, dtype=torch.float64) * 20).round() / 20  # many ties
    correct = torch.rand(200, generator=g, dtype=torch.float64) < conf
    best = None
    for t in sorted(set(conf.tolist())):
        accepted = conf >= t
        if correct[accepted].double().mean().item() >= target - 1e-12:
            best = t
            break
    assert deferral_threshold(conf, correct, target) == best
    if best is not None:
        probs = torch.stack([conf, 1 - conf], 1)
        mask = defer(probs, best)
        assert torch.equal(mask, probs.max(1).values < best)


def test_deferral_threshold_unreachable_and_exact():
    conf = torch.tensor([0.9, 0.8, 0.7])
    assert deferral_threshold(conf, torch.tensor([False, True, True]), 0.99) is None
    assert deferral_threshold(conf, torch.tensor([True, True, False]), 0.99) == pytest.approx(0.8)
    assert deferral_threshold(conf, torch.tensor([True, True, True]), 1.0) == pytest.approx(0.7)


def test_entropy_and_mutual_information_by_hand():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    assert entropy(p).tolist() == pytest.approx([np.log(2), 0.0])
    # All passes agree: no epistemic part.
    mean, expected_h, t = aggregate([p, p, p])
    assert t == 3 and torch.allclose(entropy(mean) - expected_h, torch.zeros(2, dtype=torch.float64))
    # Two confident passes that disagree: predictive entropy log 2, expected entropy 0, MI log 2.
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    mean, expected_h, _ = aggregate([a, a.flip(1)])
    assert entropy(mean).item() == pytest.approx(np.log(2))
    assert expected_h.item() == pytest.approx(0) and (entropy(mean) - expected_h).item() == pytest.approx(np.log(2))
    q = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    r = torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64)
    mean, expected_h, _ = aggregate([q, r])
    h = lambda v: -sum(x * np.log(x) for x in v)
    assert expected_h.item() == pytest.approx((h([0.7, 0.2, 0.1]) + h([0.1, 0.3, 0.6])) / 2)
    assert entropy(mean).item() == pytest.approx(h([0.4, 0.25, 0.35]))


def _pixel(net):
    from pupil.models import PixelModel

    return PixelModel(net, [0.5], [0.25]).eval()


def test_mc_dropout_varies_only_with_dropout_and_keeps_batchnorm_in_eval():
    from pupil.data import ImageDataset

    ds = ImageDataset(torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8), torch.zeros(16), ["a", "b", "c"])
    for rate in (0.0, 0.5):
        torch.manual_seed(0)
        model = _pixel(create("resnet_test", num_classes=3, in_chans=1, img_size=16, drop_rate=rate))
        assert has_dropout(model.net) == (rate > 0)
        bn = next(m for m in model.net.modules() if isinstance(m, nn.BatchNorm2d))
        stats = bn.running_mean.clone()
        with mc_dropout(model.net):
            assert not bn.training
            x = torch.rand(4, 1, 16, 16)
            a, b = model(x), model(x)
        assert not model.net.training  # restored
        assert torch.equal(bn.running_mean, stats)
        assert torch.equal(a, b) == (rate == 0)
        mean, expected_h, t = mc_dropout_passes(model, ds, 5, 8, torch.device("cpu"), None, False)
        assert t == 5 and mean.shape == (16, 3)
        mi = entropy(mean) - expected_h
        assert (mi.abs().max() < 1e-12) == (rate == 0)


def test_mc_dropout_resamples_features_when_dropout_is_inside_them():
    class Net(nn.Module):
        num_classes, num_features = 2, 4

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Dropout(0.5))
            self.head = nn.Linear(4, 2)

        def forward_features(self, x):
            return self.body(x)

        def forward_head(self, x, pre_logits=False):
            return x if pre_logits else self.head(x)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    from pupil.data import ImageDataset

    torch.manual_seed(0)
    model = _pixel(Net())
    ds = ImageDataset(torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8), torch.zeros(8), ["a", "b"])
    torch.manual_seed(1)
    mean, expected_h, _ = mc_dropout_passes(model, ds, 6, 8, torch.device("cpu"), None, False)
    # The naive reference: six full passes with the dropout layer sampling.
    torch.manual_seed(1)
    x = model.normalize(ds.images.float() / 255)
    model.net.body[2].train()
    with torch.no_grad():
        draws = [model.net(x).double().softmax(1) for _ in range(6)]
    assert torch.allclose(mean, torch.stack(draws).mean(0))
    assert torch.allclose(expected_h, torch.stack([entropy(d) for d in draws]).mean(0))


def test_tta_views_and_translate():
    views = tta_views(6, flip=True, shift=2, seed=0)
    assert views[:2] == [(False, 0, 0), (True, 0, 0)] and len(views) == 6
    assert views == tta_views(6, flip=True, shift=2, seed=0)
    assert not any(f for f, _, _ in tta_views(6, flip=False, shift=2, seed=0))
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = translate(x, 1, -1)
    assert y[0, 0, 1, 0] == x[0, 0, 0, 1] and y[0, 0, 0].abs().sum() == 0 and y[0, 0, :, 3].abs().sum() == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unc")
    recipe = ROOT / "recipes/smoke/synthetic.yaml"
    a = fit(build(recipe, {"out": str(tmp), "name": "a", "drop_rate": 0.3}), progress=False).dir
    b = fit(build(recipe, {"out": str(tmp), "name": "b", "seed": 1}), progress=False).dir
    return a, b


def test_uncertainty_end_to_end(runs):
    import pupil.audit.uncertainty  # noqa: F401  (registers the check)

    a, b = runs
    settings = {"uncertainty": {"members": [str(b)], "mc_samples": 4, "tta_samples": 3}}
    results = run_audit(a, ["uncertainty"], device="cpu", settings=settings)
    sec = load_results(a)["checks"]["uncertainty"]
    assert sec == json.loads(json.dumps(results["checks"]["uncertainty"]))
    names = [r[0] for r in sec["tables"]["sources"]["rows"]]
    assert names == ["softmax", "mc_dropout", "tta", "ensemble"]
    m = sec["metrics"]["sources"]
    assert m["mc_dropout"]["passes"] == 4 and m["tta"]["passes"] == 3 and m["ensemble"]["passes"] == 2
    assert m["mc_dropout"]["mutual_information"] > 0 and m["ensemble"]["mutual_information"] > 0
    soft = m["softmax"]
    assert soft["mutual_information"] == pytest.approx(0, abs=1e-9) and soft["e_aurc"] >= 0
    assert sec["headline"]["value"] == soft["deferral"]["deferred"]
    assert sec["metrics"]["fit_split"] == "val"
    ctx = make_context(a, "cpu", "quick", 0)
    assert soft["accuracy"] == pytest.approx((ctx.logits().argmax(1) == ctx.test.targets).double().mean().item())
    for curve in sec["curves"]["risk_coverage"].values():
        assert len(curve["coverage"]) <= 200 and curve["coverage"][-1] == 1
    hist = sec["curves"]["entropy_histogram"]["softmax"]
    assert sum(hist["correct"]) + sum(hist["wrong"]) == sec["metrics"]["n"]


def test_uncertainty_skips_missing_dropout_and_refuses_mismatched_members(runs, tmp_path):
    import pupil.audit.uncertainty  # noqa: F401

    a, b = runs
    res = run_audit(b, ["uncertainty"], device="cpu", settings={"uncertainty": {"sources": ["softmax", "mc_dropout"]}})
    sec = res["checks"]["uncertainty"]
    assert [r[0] for r in sec["tables"]["sources"]["rows"]] == ["softmax"]
    assert any("mc_dropout skipped" in n for n in sec["notes"])
    # A member with other classes is refused.
    bad = tmp_path / "k"
    shutil.copytree(b, bad)
    info = json.loads((bad / "run.json").read_text())
    info["data"]["classes"] = ["w", "x", "y", "z"]
    (bad / "run.json").write_text(json.dumps(info))
    with pytest.raises(PupilError, match="has classes"):
        run_audit(a, ["uncertainty"], device="cpu", settings={"uncertainty": {"members": [str(bad)]}})
    with pytest.raises(PupilError, match="unknown uncertainty source"):
        run_audit(a, ["uncertainty"], device="cpu", settings={"uncertainty": {"sources": ["softmax", "bayes"]}})


def test_without_a_validation_split_the_threshold_is_fitted_on_test(runs):
    from pupil.audit.uncertainty import Uncertainty

    a, _ = runs
    ctx = make_context(a, "cpu", "quick", 0)
    ctx.val = None
    check = Uncertainty()
    out = check.run(ctx, check.config("quick", {"sources": ["softmax"], "target_accuracy": 0.9}))
    assert out["metrics"]["fit_split"] == "test"
    assert any("no validation split" in n for n in out["notes"])
    d = out["metrics"]["sources"]["softmax"]["deferral"]
    if d["reachable"]:  # fitted on test, the target holds on test by construction
        assert d["test_accuracy"] >= 0.9 and d["meets_target_on_test"]
