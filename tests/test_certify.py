"""Randomized smoothing against closed forms, and the adversarial and certify checks end to end.

A linear binary classifier f(x) = [w.x + b > 0] has smoothed probability pA = Phi(|w.x + b| / (sigma ||w||))
exactly, so its certified radius must approach the distance to the decision boundary from below.
"""

import itertools
import math

import pytest
import torch
from scipy.stats import binomtest, norm
from torch import nn

import pupil.audit.adversarial
import pupil.audit.certify  # noqa: F401  (registers the checks)
from pupil.audit import run_audit
from pupil.errors import PupilError
from pupil.results import load_results
from pupil.robust import ABSTAIN, certify, certify_batch, clopper_pearson_lower, max_radius, predict, sample_counts
from pupil.robust.smoothing import binomial_p_value


class Linear(nn.Module):
    """Logits (0, w.x + b): class 1 where w.x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1).double() @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


class Constant(nn.Module):
    def forward(self, x):
        return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), -1)


@pytest.fixture
def linear():
    w = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return Linear(w, 0.1)


def at_distance(model: Linear, d: float) -> torch.Tensor:
    """A (1, 4, 4) image whose signed distance to the boundary is d."""
    w = model.w
    x0 = -model.b * w / w.dot(w)  # on the boundary
    return (x0 + d * w / w.norm()).view(1, 4, 4).float()


def naive_upper_tail(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


@pytest.mark.parametrize("k, n", [(1, 1), (7, 10), (50, 100), (99, 100), (3, 40)])
def test_clopper_pearson_solves_its_defining_equation(k, n):
    alpha = 0.01
    p = clopper_pearson_lower(k, n, alpha).item()
    assert naive_upper_tail(k, n, p) == pytest.approx(alpha, rel=1e-6)


def test_clopper_pearson_closed_forms():
    alpha = 0.001
    assert clopper_pearson_lower(0, 10, alpha).item() == 0.0
    assert clopper_pearson_lower(1, 1, alpha).item() == pytest.approx(alpha)
    for n in (1, 10, 1000):  # k = n: p^n = alpha
        assert clopper_pearson_lower(n, n, alpha).item() == pytest.approx(alpha ** (1 / n), rel=1e-10)
    counts = torch.tensor([0, 5, 10])
    assert clopper_pearson_lower(counts, 10, alpha).tolist() == pytest.approx(
        [clopper_pearson_lower(int(c), 10, alpha).item() for c in counts]
    )


def test_binomial_p_value_matches_scipy():
    k = torch.tensor([0, 3, 5, 10, 60, 40, 51, 0])
    n = torch.tensor([10, 10, 10, 10, 100, 100, 101, 0])
    ours = binomial_p_value(k, n)
    for i in range(len(k) - 1):
        assert ours[i].item() == pytest.approx(binomtest(int(k[i]), int(n[i]), 0.5).pvalue, rel=1e-9)
    assert ours[-1] == 1.0


def test_sample_counts_batches_images_and_draws(linear):
    x = torch.cat([at_distance(linear, d)[None] for d in (-0.5, 0.0, 0.5)])
    counts = sample_counts(linear, x, 1000, 0.25, batch=777, generator=torch.Generator().manual_seed(0))
    assert counts.shape == (3, 2) and (counts.sum(1) == 1000).all()
    pa = norm.cdf(0.5 / 0.25)
    assert counts[0, 0] / 1000 == pytest.approx(pa, abs=0.04) and counts[2, 1] / 1000 == pytest.approx(pa, abs=0.04)
    again = sample_counts(linear, x, 1000, 0.25, batch=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(counts, again)  # the same noise draws whatever the chunking


def test_certified_radius_approaches_the_distance_from_below(linear):
    sigma, n, alpha = 0.25, 100_000, 0.001
    dists = [-0.45, 0.1, 0.3, 0.6]
    x = torch.cat([at_distance(linear, d)[None] for d in dists])
    labels, radii = certify_batch(linear, x, 100, n, alpha, sigma, 4096, torch.Generator().manual_seed(1))
    for d, label, r in zip(dists, labels.tolist(), radii.tolist(), strict=True):
        pa = norm.cdf(abs(d) / sigma)
        # pA_lower sits about z_(1-alpha) standard errors below pA; allow 4 more for sampling noise.
        slack = (norm.ppf(1 - alpha) + 4) * math.sqrt(pa * (1 - pa) / n)
        assert label == int(d > 0)
        assert sigma * norm.ppf(pa - slack) <= r <= abs(d)
    one = certify(linear, x[2], 100, n, alpha, sigma, 4096, torch.Generator().manual_seed(1))
    assert one[0] == 1 and one[1] == pytest.approx(radii[2].item(), abs=0.01)


def test_abstains_on_the_boundary_and_predicts_off_it(linear):
    g = torch.Generator().manual_seed(2)
    on = at_distance(linear, 0.0)
    assert certify(linear, on, 100, 10_000, 0.001, 0.25, 2048, g) == (ABSTAIN, 0.0)
    assert predict(linear, on, 10_000, 0.001, 0.25, 2048, g) == ABSTAIN
    assert predict(linear, at_distance(linear, 0.2), 10_000, 0.001, 0.25, 2048, g) == 1
    assert predict(linear, at_distance(linear, -0.2), 10_000, 0.001, 0.25, 2048, g) == 0


def test_a_unanimous_classifier_certifies_the_largest_radius():
    label, r = certify(Constant(), torch.zeros(1, 2, 2), 10, 500, 0.01, 0.5)
    assert label == 0 and r == pytest.approx(max_radius(500, 0.01, 0.5))
    assert max_radius(500, 0.01, 0.5) == pytest.approx(0.5 * norm.ppf(0.01 ** (1 / 500)))


def test_bad_arguments(linear):
    x = at_distance(linear, 0.2)
    with pytest.raises(PupilError, match="sigma"):
        certify(linear, x, 10, 100, 0.001, 0.0)
    with pytest.raises(PupilError, match="alpha"):
        predict(linear, x, 100, 1.5, 0.25)


# ---------------------------------------------------------------------------------------------------------------
# The checks end to end on a tiny trained run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from pupil.config import build
    from pupil.training.loop import fit
    from tests.conftest import ROOT

    tmp = tmp_path_factory.mktemp("runs")
    return fit(build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(tmp), "name": "a"}), progress=False).dir


def test_adversarial_and_certify_checks_end_to_end(run_dir):
    settings = {
        "adversarial": {
            "n": 64,
            "steps": 5,
            "epsilons": [0, 0.02, 0.1],
            "autoattack": True,
            "autoattack_n": 8,
            "autoattack_eps": 0.3,
        },
        "certify": {"images": 16, "n0": 20, "n": 200, "batch_size": 512},
    }
    results = run_audit(run_dir, ["adversarial", "certify"], budget="quick", device="cpu", settings=settings)
    assert load_results(run_dir)["checks"].keys() == {"adversarial", "certify"}  # written and valid

    adv = results["checks"]["adversarial"]
    m = adv["metrics"]
    assert m["epsilons"] == [0.0, 0.02, 0.1] and m["n"] == 64
    assert m["pgd_accuracy"][0] == m["clean_accuracy"] > 0.5
    assert m["pgd_accuracy"][-1] < m["clean_accuracy"]
    assert all(p <= f + 0.05 for p, f in zip(m["pgd_accuracy"], m["fgsm_accuracy"], strict=True))
    assert m["unbounded"]["accuracy"] <= 0.05 and m["sanity"]["passed"], m["sanity"]
    assert m["autoattack"]["n"] == 8 and m["autoattack"]["accuracy"] <= m["autoattack"]["pgd_accuracy"] + 0.25
    assert adv["headline"]["label"] == "PGD robust accuracy at ε=0.1 (L∞)"
    assert len(adv["tables"]["robust_accuracy"]["rows"]) == 3
    ex = adv["curves"]["examples"]
    assert len(ex) == 4 and ex[0]["clean"].startswith("data:image/png;base64,")
    assert ex[0]["adv_pred"] in results["run"]["classes"]

    cert = results["checks"]["certify"]
    c = cert["metrics"]
    assert c["n_images"] == 16 and 0 <= c["abstention_rate"] <= 1
    acc = cert["curves"]["certified_accuracy"]["accuracy"]
    assert all(a >= b for a, b in itertools.pairwise(acc))  # certified accuracy falls with the radius
    assert acc[0] == c["smoothed_accuracy"]
    assert cert["headline"]["label"].startswith("certified accuracy at L2 radius 0.5")
    assert any("trained without noise" in note for note in cert["notes"])


class Masked(nn.Module):
    """The run's model behind input quantisation: rounding has zero gradient, the textbook masked gradient."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.tta, self.num_classes = inner, inner.tta, inner.num_classes

    def forward(self, x):
        return self.inner((x * 4).round() / 4)


def test_sanity_checks_flag_masked_gradients(run_dir):
    from pupil.audit.adversarial import Adversarial
    from pupil.audit.common import make_context

    ctx = make_context(run_dir, "cpu", "quick", 0)
    ctx.run.model = Masked(ctx.run.model)
    check = Adversarial()
    out = check.run(ctx, check.config("quick", {"n": 32, "steps": 3, "epsilons": [0, 0.1]}))
    assert not out["metrics"]["sanity"]["passed"]
    assert any("unbounded" in f for f in out["metrics"]["sanity"]["failures"])


def test_l2_threat_model(run_dir):
    from pupil.audit.adversarial import Adversarial
    from pupil.audit.common import make_context

    ctx = make_context(run_dir, "cpu", "quick", 0)
    check = Adversarial()
    out = check.run(ctx, check.config("quick", {"norm": "l2", "n": 32, "steps": 5, "epsilons": [0, 0.5, 2]}))
    m = out["metrics"]
    assert out["headline"]["label"] == "PGD robust accuracy at ε=0.5 (L2)"
    assert m["unbounded"]["eps"] == pytest.approx(16.0)  # the diagonal of the 1x16x16 cube
    assert m["pgd_accuracy"][-1] <= m["pgd_accuracy"][1] <= m["pgd_accuracy"][0]


def test_bad_settings_raise():
    from pupil.audit.adversarial import Adversarial
    from pupil.audit.certify import Certify

    with pytest.raises(PupilError, match="norm"):
        Adversarial().config("quick", {"norm": "l1"})
    with pytest.raises(PupilError, match="epsilons"):
        Adversarial().config("quick", {"epsilons": "0,a"})
    with pytest.raises(PupilError, match="radii"):
        Certify().config("quick", {"radii": "x"})


def test_training_notes_find_the_noise_sigma_in_either_config_shape():
    from pupil.audit.certify import _training_notes

    new = {"train": {"task": "noise"}, "task": {"sigma": 0.5}}
    old = {"train": {"task": "noise", "sigma": 0.5}}
    for config in (new, old):
        mismatch = "the model was trained with noise sigma 0.5 but is certified at sigma 0.25"
        assert _training_notes(config, 0.25) == [mismatch]
        assert _training_notes(config, 0.5) == []
    assert "trained without noise" in _training_notes({"train": {"task": "classification"}, "task": None}, 0.25)[0]
