import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import nn

import pupil.audit.ood  # noqa: F401  (registers the check)
from pupil.audit import run_audit
from pupil.audit.ood import OODConfig, convert_images, forward_pass, load_ood
from pupil.config import build
from pupil.errors import PupilError
from pupil.models import PixelModel, create
from pupil.ood import (
    detection_metrics,
    energy,
    fit_knn,
    fit_mahalanobis,
    fit_vim,
    knn,
    linear_head,
    mahalanobis,
    max_logit,
    msp,
    odin,
    roc,
    score_images,
    vim,
)
from pupil.results import load_results
from pupil.training.loop import fit
from tests.conftest import ROOT


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "continuous": (torch.randn(300, generator=g) + 1, torch.randn(200, generator=g)),
        "ties": (torch.randint(0, 5, (300,), generator=g).float(), torch.randint(0, 4, (120,), generator=g).float()),
        "perfect": (torch.rand(50, generator=g) + 2, torch.rand(70, generator=g)),
        "reversed": (torch.rand(50, generator=g), torch.rand(70, generator=g) + 2),
        "all equal": (torch.ones(40), torch.ones(60)),
        "twenty id": (torch.arange(20.0), torch.arange(10.0) + 5.5),  # 19/20 = 0.95 exactly
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_metrics_match_sklearn(case):
    pos, neg = _cases()[case]
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = torch.cat([pos, neg]).double().numpy()
    ours = detection_metrics(pos, neg)
    assert ours["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ours["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert ours["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ours_fpr, ours_tpr = roc(pos, neg)
    assert np.allclose(ours_fpr.numpy(), fpr) and np.allclose(ours_tpr.numpy(), tpr)
    assert ours["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    if case == "perfect":
        assert ours == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    if case == "all equal":
        assert ours["auroc"] == 0.5 and ours["fpr95"] == 1.0


def test_fpr95_equals_a_naive_threshold_search():
    pos, neg = _cases()["ties"]
    # The highest threshold t with mean(pos >= t) >= 0.95; FPR is then mean(neg >= t).
    t = max(v for v in torch.cat([pos, neg]).unique().tolist() if (pos >= v).double().mean() >= 0.95)
    assert detection_metrics(pos, neg)["fpr95"] == pytest.approx((neg >= t).double().mean().item())


def test_logit_scores():
    z = torch.randn(64, 7) * 5
    p = msp(z)
    assert ((p >= 1 / 7 - 1e-12) & (p <= 1)).all()
    assert torch.allclose(p, z.double().softmax(1).max(1).values)
    assert torch.allclose(msp(torch.zeros(3, 7)), torch.full((3,), 1 / 7, dtype=torch.float64))
    assert torch.equal(max_logit(z), z.double().max(1).values)
    assert torch.allclose(energy(z), torch.logsumexp(z.double(), 1))
    assert torch.allclose(energy(z, 3.0), 3 * torch.logsumexp(z.double() / 3, 1))
    # A confident softmax that rounds to 1.0 in float32 stays distinct in float64.
    assert msp(torch.tensor([[20.0, 0.0], [22.0, 0.0]])).unique().numel() == 2


def _tiny_pixel_model(seed: int = 0) -> PixelModel:
    torch.manual_seed(seed)
    net = create("resnet_test", num_classes=4, in_chans=1, img_size=16)
    return PixelModel(net, [0.4], [0.2]).eval()


def test_odin_matches_the_papers_recipe():
    model = _tiny_pixel_model()
    x = torch.rand(6, 1, 16, 16)
    t, eps = 1000.0, 0.002
    assert torch.allclose(odin(model, x, t, 0.0), msp(model(x).detach() / t))
    scores = odin(model, x, t, eps)
    assert next(model.parameters()).grad is None  # only the input's gradient is taken
    ref = []
    for xi in x:  # Liang et al.'s code: cross-entropy on the predicted label, step against its gradient's sign
        xi = xi[None].clone().requires_grad_(True)
        out = model(xi) / t
        F.cross_entropy(out, out.argmax(1)).backward()
        with torch.no_grad():
            ref.append((model(xi - eps * xi.grad.sign()) / t).double().softmax(1).max().item())
    assert torch.allclose(scores, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-9)


def test_mahalanobis_on_a_known_gaussian():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.0, 0.0, 0.0], [4.0, -2.0, 1.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, -0.3, 0.5]], dtype=torch.float64)
    sigma = a @ a.T
    y = torch.arange(40000) % 2
    f = mu[y] + torch.randn(40000, 3, generator=g, dtype=torch.float64) @ a.T
    means, precision = fit_mahalanobis(f, y, 2)
    assert torch.allclose(means, mu, atol=0.05)
    assert torch.allclose(precision, torch.linalg.inv(sigma), atol=0.05)
    q = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5], [10.0, 3.0, -2.0]], dtype=torch.float64)
    true = -torch.stack([((q - m) @ torch.linalg.inv(sigma) * (q - m)).sum(1) for m in mu]).min(0).values
    assert torch.allclose(mahalanobis(q, means, precision), true, rtol=0.03, atol=0.02)
    # Exactly the squared scipy distance under sklearn's covariance of the class-centred features.
    cov = EmpiricalCovariance().fit((f - means[y]).numpy())
    naive = [-min(scipy_mahalanobis(qi, m, cov.precision_) ** 2 for m in means.numpy()) for qi in q.numpy()]
    assert np.allclose(mahalanobis(q, means, precision).numpy(), naive)


def test_mahalanobis_ignores_absent_classes():
    f = torch.randn(50, 4)
    y = torch.tensor([0, 2] * 25)
    means, _ = fit_mahalanobis(f, y, 3)
    assert means.shape == (2, 4) and torch.isfinite(means).all()


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(300, 8, generator=g), torch.randn(40, 8, generator=g) * 3
    k = 7
    dist = torch.cdist(F.normalize(test, dim=1), F.normalize(train, dim=1))  # (40, 300)
    expected = -dist.sort(1).values[:, k - 1].double()
    assert torch.allclose(knn(test, fit_knn(train), k), expected, atol=1e-5)


def test_vim_matches_the_papers_numpy_recipe():
    g = torch.Generator().manual_seed(2)
    d, k = 12, 4
    train = torch.randn(500, d, generator=g) @ torch.diag(torch.linspace(0.2, 3, d)) + 1
    test = torch.randn(30, d, generator=g) * 2
    w, b = torch.randn(k, d, generator=g), torch.randn(k, generator=g)
    fit = fit_vim(train, w, b)
    assert torch.allclose(w.double() @ fit.origin + b.double(), torch.zeros(k, dtype=torch.float64), atol=1e-9)
    # Wang et al.'s reference code, transcribed with numpy and sklearn.
    wn, bn, xtr, xte = w.double().numpy(), b.double().numpy(), train.double().numpy(), test.double().numpy()
    u = -np.linalg.pinv(wn) @ bn
    ec = EmpiricalCovariance(assume_centered=True).fit(xtr - u)
    vals, vecs = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray(vecs.T[np.argsort(vals * -1)[d // 2 :]].T)
    vlogit_train = np.linalg.norm((xtr - u) @ ns, axis=-1)
    alpha = (xtr @ wn.T + bn).max(axis=-1).mean() / vlogit_train.mean()
    logits = xte @ wn.T + bn
    expected = -alpha * np.linalg.norm((xte - u) @ ns, axis=-1) + np.log(np.exp(logits).sum(-1))
    assert fit.alpha == pytest.approx(alpha)
    assert np.allclose(vim(test, fit).numpy(), expected)


def test_linear_head_found_or_refused():
    model = _tiny_pixel_model()
    x = torch.rand(4, 1, 16, 16)
    w, b = linear_head(model, x)
    assert w.shape == (4, model.net.num_features) and b.shape == (4,)
    model.net.head = nn.Sequential(nn.Linear(model.net.num_features, 4), nn.ReLU())
    assert "not one Linear" in linear_head(model, x)


def test_forward_pass_keeps_the_wrappers_tta_logits():
    from types import SimpleNamespace

    model = _tiny_pixel_model()
    model.tta = True
    images = torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8)
    from pupil.audit.common import AuditContext

    run = SimpleNamespace(model=model)
    ctx = AuditContext(run, None, None, torch.device("cpu"), None, channels_last=False, seed=0, budget="quick")
    logits, feats = forward_pass(model, images, ctx, 4, features=True)
    x = images.float() / 255
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-5)
        net = model.net
        assert torch.allclose(feats, net.forward_head(net.forward_features(model.normalize(x)), pre_logits=True))


def test_score_images():
    model = _tiny_pixel_model()
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        z = model(x)
    assert torch.allclose(score_images(model, x), torch.logsumexp(z.double(), 1))
    assert torch.allclose(score_images(model, x, "msp"), msp(z))
    assert score_images(model, x, "odin").shape == (5,)
    with pytest.raises(PupilError, match="training statistics"):
        score_images(model, x, "knn")


def test_convert_images():
    grey = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    rgb, done = convert_images(grey, (3, 8, 8))
    assert done == ["grey repeated to RGB"] and torch.equal(rgb, grey.expand(-1, 3, -1, -1))
    colour = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    back, _ = convert_images(colour, (1, 8, 8))
    luma = (colour.double() * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)).sum(1)
    assert (back[:, 0].double() - luma).abs().max() <= 0.5 + 1e-6
    flat = torch.full((2, 1, 8, 8), 77, dtype=torch.uint8)
    big, done = convert_images(flat, (1, 28, 28))
    assert big.shape == (2, 1, 28, 28) and (big == 77).all()
    assert done == ["resized 8x8 -> 28x28 (bilinear, antialiased)"]
    same, done = convert_images(flat, (1, 8, 8))
    assert same is flat and not done
    with pytest.raises(PupilError, match="channels"):
        convert_images(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), (3, 8, 8))


def test_load_ood_sets():
    a, notes = load_ood("noise", (1, 16, 16), 10, 3, "synthetic")
    b, _ = load_ood("noise", (1, 16, 16), 10, 3, "synthetic")
    assert a.shape == (10, 1, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b) and "N(0.5" in notes[0]
    u, _ = load_ood("uniform", (3, 4, 4), 2000, 0, "synthetic")
    assert abs(u.double().mean().item() / 255 - 0.5) < 0.02
    d, notes = load_ood("digits", (3, 16, 16), 100, 0, "synthetic")
    assert d.shape == (100, 3, 16, 16) and any("resized 8x8 -> 16x16" in n for n in notes)
    with pytest.raises(PupilError, match="in-distribution dataset itself"):
        load_ood("synthetic", (1, 16, 16), 10, 0, "synthetic")


def test_config_is_checked():
    with pytest.raises(PupilError, match="unknown OOD score"):
        OODConfig(scores=["msp", "entropy"])
    with pytest.raises(PupilError, match="at least one OOD set"):
        OODConfig(sets=[], extra=[])
    with pytest.raises(PupilError, match="knn_k"):
        OODConfig(knn_k=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ood")
    return fit(build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(tmp), "name": "a"}), progress=False).dir


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


TINY = {"n_id": 128, "n_ood": 64, "n_fit": 128, "knn_k": 5, "batch_size": 128}


def test_ood_check_end_to_end(run_dir, rgb_folder):
    settings = {"ood": {**TINY, "sets": ["mnist-5k", "noise"], "extra": [str(rgb_folder)]}}
    res = run_audit(run_dir, ["ood"], budget="quick", device="cpu", settings=settings)
    out = res["checks"]["ood"]
    assert out["title"] == "Out-of-distribution detection"
    sets = ["mnist-5k", "noise", str(rgb_folder)]
    scores = ["msp", "max_logit", "energy", "odin", "mahalanobis", "knn", "vim"]
    m = out["metrics"]
    assert list(m["sets"]) == sets and all(list(m["sets"][s]) == scores for s in sets)
    assert m["n"] == {"id": 128, "ood": {"mnist-5k": 64, "noise": 64, str(rgb_folder): 12}, "fit": 128}
    for s in sets:
        for v in m["sets"][s].values():
            assert 0 <= v["auroc"] <= 1 and 0 <= v["fpr95"] <= 1
    assert out["headline"]["value"] == pytest.approx(m["mean"]["msp"]["auroc"])
    assert "msp" in out["headline"]["label"] and m["best_score"] in scores
    assert len(out["tables"]["ood"]["rows"]) == (len(sets) + 1) * len(scores)
    hist = out["curves"]["histograms"]
    assert {"msp", "energy", "knn", m["best_score"]} == set(hist)
    for h in hist.values():
        assert len(h["edges"]) == 31 and sum(h["counts"]["id"]) == 128 and sum(h["counts"]["noise"]) == 64
    notes = " ".join(out["notes"])
    assert "resized 28x28 -> 16x16" in notes and "RGB to grey" in notes and "resized 20x20" in notes
    assert "subset of 64 of its" in notes and "penultimate layer only" in notes and "epsilon = 0.0014" in notes
    assert load_results(run_dir)["checks"]["ood"]["config"]["extra"] == [str(rgb_folder)]
    json.dumps(out)


def test_ood_check_refuses_the_id_data_and_unknown_sets(run_dir):
    with pytest.raises(PupilError, match="in-distribution dataset itself"):  # before the default sets are loaded
        run_audit(run_dir, ["ood"], budget="quick", device="cpu", settings={"ood": {**TINY, "extra": ["synthetic"]}})
    with pytest.raises(PupilError, match="unknown dataset"):
        run_audit(run_dir, ["ood"], budget="quick", device="cpu", settings={"ood": {**TINY, "sets": ["nope"]}})


def test_ood_check_refuses_a_copy_of_the_test_split(run_dir, tmp_path):
    from PIL import Image

    from pupil.run import load_run

    test = load_run(run_dir, load_model=False).split("test")
    for i, im in enumerate(test.images[:20]):
        (tmp_path / test.classes[test.targets[i]]).mkdir(exist_ok=True)
        Image.fromarray(im[0].numpy()).save(tmp_path / test.classes[test.targets[i]] / f"{i}.png")
    settings = {"ood": {**TINY, "sets": [str(tmp_path)]}}
    with pytest.raises(PupilError, match="20 of its 20 images are test images"):
        run_audit(run_dir, ["ood"], budget="quick", device="cpu", settings=settings)


def test_ood_check_logit_scores_only_need_no_training_data(run_dir):
    settings = {"ood": {**TINY, "sets": ["uniform"], "scores": ["energy", "max_logit"]}}
    out = run_audit(run_dir, ["ood"], budget="quick", device="cpu", settings=settings)["checks"]["ood"]
    assert list(out["metrics"]["mean"]) == ["energy", "max_logit"]
    assert "energy" in out["headline"]["label"]
    assert not any("fitted on" in n for n in out["notes"])
