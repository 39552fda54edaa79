import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr
from torch import nn

from pupil import explain as E
from pupil.audit import run_audit
from pupil.audit.explain import ExplainConfig
from pupil.config import build
from pupil.errors import PupilError
from pupil.models import PixelModel, create, gradcam_module
from pupil.report.plots import decode_png
from pupil.results import load_results
from pupil.run import load_run
from pupil.training.loop import fit
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    return fit(build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(tmp), "name": "a"}), progress=False).dir


@pytest.fixture(scope="module")
def trained(run_dir):
    run = load_run(run_dir)
    x = run.split("test").images[:12].float().div(255)
    with torch.no_grad():
        target = run.model(x).argmax(1)
    return run.model, x, target


class Mask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


class RegionNet(nn.Module):
    """Only the top-left 16x16 pixels reach the logits: a positive 1x1 conv, 4x4 average pooling to 7x7, and a
    mask that keeps the top-left 4x4 cells of the map. Class 0's logit grows with those pixels."""

    gradcam_layer, num_features, num_classes = "mask", 4, 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.pool = nn.AvgPool2d(4)
        keep = torch.zeros(1, 1, 7, 7)
        keep[..., :4, :4] = 1
        self.mask = Mask(keep)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.uniform_(0.5, 1.0)
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
            self.head.bias.zero_()

    def forward_features(self, x):
        return self.mask(self.pool(self.conv(x).relu()))

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("tta", [False, True])
def test_batched_deletion_insertion_equals_the_loop(trained, tta):
    model, x, target = trained
    model.tta = tta
    try:
        sal = E.gradcam(model, x[:5], target[:5])
        for baseline in ("zero", "blur"):
            fast = E.deletion_insertion(model, x[:5], sal, target[:5], steps=7, baseline=baseline, batch_size=20)
            slow = E.deletion_insertion_loop(model, x[:5], sal, target[:5], steps=7, baseline=baseline)
            for key in ("deletion", "insertion", "deletion_auc", "insertion_auc"):
                assert torch.allclose(fast[key], slow[key], atol=1e-5), key
            # The curves run from the image to the baseline (deletion) and back (insertion).
            assert torch.allclose(fast["deletion"][:, 0], fast["insertion"][:, -1], atol=1e-6)
            assert torch.allclose(fast["deletion"][:, -1], fast["insertion"][:, 0], atol=1e-6)
    finally:
        model.tta = False


def test_curve_area_is_the_trapezoid_rule():
    c = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.2, 0.2]])
    assert torch.allclose(E.curve_area(c), torch.tensor([0.5, 0.2]))
    assert E.step_counts(10, 4).tolist() == [0, 2, 5, 7, 10]


@pytest.mark.parametrize("name", list(E.METHODS))
def test_every_method_finds_the_only_region_that_matters(name):
    model = PixelModel(RegionNet(), [0.0], [1.0]).eval()
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1
    target = torch.zeros(2, dtype=torch.long)
    torch.manual_seed(0)
    sal = E.METHODS[name](model, x, target, lime_samples=100, shap_samples=100, ig_steps=8, grid=7)
    assert sal.shape == (2, 28, 28)
    mass = sal.abs()
    inside = mass[:, :16, :16].sum((1, 2)) / mass.sum((1, 2))
    # Bilinear upsampling (Grad-CAM) and half-overlapping squares (occlusion) spill a little past the edge.
    assert (inside > 0.9).all(), inside
    assert (sal[:, :16, :16].sum((1, 2)) > 0).all()  # evidence for class 0, not against it


@pytest.mark.parametrize("tta", [False, True])
def test_gradcam_on_a_known_region_is_zero_outside_it(tta):
    model = PixelModel(RegionNet(), [0.0], [1.0], tta=tta).eval()
    x = torch.rand(2, 1, 28, 28)
    for fn in (E.gradcam, E.gradcam_pp):
        sal = fn(model, x, torch.zeros(2, dtype=torch.long))
        # Cells 0..3 of 7 cover pixels 0..15; bilinear upsampling reaches two pixels into cell 4.
        assert sal[:, 18:, :].abs().max() == 0
        assert sal[:, :14, :14].min() > 0
        if tta:  # the deployed model also reads the top-left of the mirror image: the top-right of this one
            assert sal[:, :14, -14:].min() > 0
        else:
            assert sal[:, :, 18:].abs().max() == 0


def test_gradcam_matches_captum_layer_gradcam():
    from captum.attr import LayerAttribution, LayerGradCam

    torch.manual_seed(0)
    model = PixelModel(create("resnet_test", 10, 1, 28), [0.3], [0.35]).eval()
    x, target = torch.rand(6, 1, 28, 28), torch.arange(6)
    ours = E.gradcam(model, x, target)
    ref = LayerGradCam(model, gradcam_module(model.net)).attribute(x, target=target, relu_attributions=True)
    ref = LayerAttribution.interpolate(ref, (28, 28), interpolate_mode="bilinear")[:, 0]
    assert ref.abs().sum() > 0
    assert torch.allclose(ours, ref, atol=1e-6 * ref.abs().max().item() + 1e-8)


def test_gradcam_pp_matches_its_formula_on_a_cnn():
    # Chattopadhay et al. 2018, Eq. 19, written out with loops over channels.
    torch.manual_seed(0)
    model = PixelModel(create("lenet5_test", 10, 1, 28), [0.3], [0.35]).eval()
    x, target = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    seen = []
    hook = gradcam_module(model.net).register_forward_hook(lambda m, i, o: seen.append(o))
    score = model(x).gather(1, target[:, None]).sum()
    (g,) = torch.autograd.grad(score, seen[0])
    hook.remove()
    a = seen[0].detach()
    cams = []
    for b in range(2):
        cam = torch.zeros(a.shape[-2:])
        for k in range(a.shape[1]):
            gk, ak = g[b, k], a[b, k]
            denom = 2 * gk**2 + ak.sum() * gk**3
            alpha = torch.where(denom != 0, gk**2 / torch.where(denom != 0, denom, 1.0), 0.0)
            cam += (alpha * gk.relu()).sum() * ak
        cams.append(cam.relu())
    ref = F.interpolate(torch.stack(cams)[:, None], size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(E.gradcam_pp(model, x, target), ref, atol=1e-6)


@pytest.mark.parametrize("name", ["vit_test", "deit_test", "swin_test", "coatnet_test"])
@pytest.mark.parametrize("tta", [False, True])
def test_token_model_gradcam_gives_image_sized_maps(name, tta):
    torch.manual_seed(0)
    model = PixelModel(create(name, 10, 1, 28), [0.3], [0.35], tta=tta).eval()
    x, target = torch.rand(3, 1, 28, 28), torch.tensor([0, 4, 9])
    for fn in (E.gradcam, E.gradcam_pp):
        sal = fn(model, x, target)
        assert sal.shape == (3, 28, 28) and torch.isfinite(sal).all() and (sal >= 0).all()


def test_token_maps_are_reshaped_row_major():
    net = nn.Module()
    net.feature_grid, net.num_prefix_tokens, net.gradcam_layer = (2, 3), 1, "x"
    grid = torch.arange(2 * 6 * 5.0).view(2, 5, 2, 3)  # (B, C, h, w)
    tokens = torch.cat([torch.full((2, 1, 5), -1.0), grid.flatten(2).transpose(1, 2)], 1)  # (B, 1 + 6, C)
    assert torch.equal(E.to_grid(tokens, net), grid)
    assert torch.equal(E.to_grid(grid.permute(0, 2, 3, 1), net), grid)  # channels-last (B, h, w, C)
    assert torch.equal(E.to_grid(grid, net), grid)
    net.feature_grid, net.num_features = (8, 8), 5  # a patch grid that is not the final stage's (timm Swin)
    assert torch.equal(E.to_grid(grid.permute(0, 2, 3, 1), net), grid)
    assert torch.equal(E.to_grid(grid, net), grid)


def edge_detector(model, x, target, **_):
    """A 'saliency' that ignores the model: the gradient magnitude of the image."""
    gx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1)).abs()
    gy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1)).abs()
    return (gx + gy).sum(1)


def test_randomization_flags_a_map_that_ignores_the_weights(trained):
    model, x, target = trained
    edge = E.randomization_spearman(model, x, target, edge_detector, seed=0)
    cam = E.randomization_spearman(model, x, target, E.gradcam, seed=0)
    assert edge.mean() > E.FLAG_SPEARMAN and torch.allclose(edge, torch.ones_like(edge))
    assert cam.mean() < E.FLAG_SPEARMAN


def test_randomized_copy_changes_every_weight_and_leaves_the_model(trained):
    model = trained[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rand = E.randomized_copy(model, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for (k, p), q in zip(model.named_parameters(), rand.parameters(), strict=True):
        assert not torch.equal(p, q), k
    vit = PixelModel(create("vit_test", 10, 1, 28), [0.0], [1.0])
    rv = E.randomized_copy(vit, 0)
    assert not torch.equal(vit.net.pos_embed, rv.net.pos_embed)


def test_spearman_rows_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 30), generator=g).float()
    b = a + torch.randint(0, 3, (4, 30), generator=g).float()
    ours = E.spearman_rows(a, b)
    for i in range(4):
        assert ours[i].item() == pytest.approx(spearmanr(a[i], b[i]).statistic)
    assert E.spearman_rows(torch.ones(1, 9), torch.rand(1, 9)).item() == 0


def test_explain_image_and_overlay(trained, tmp_path):
    model, x, _ = trained
    sal, pred, prob = E.explain_image(model, (x[0] * 255).to(torch.uint8), "gradcam")
    assert sal.shape == x.shape[-2:] and 0 <= pred < 4 and 0 < prob <= 1
    sal2, _, _ = E.explain_image(model, x[0], "occlusion", target=1)
    assert sal2.shape == x.shape[-2:]
    out = E.overlay_png(x[0], sal, tmp_path / "o.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size[0] >= 256
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]
    with pytest.raises(PupilError, match="unknown explanation method"):
        E.explain_image(model, x[0], "saliency_magic")
    with pytest.raises(PupilError, match="out of range"):
        E.explain_image(model, x[0], "gradcam", target=99)


def test_config_rejects_bad_settings():
    with pytest.raises(PupilError, match="unknown explanation method"):
        ExplainConfig(methods=["gradcam", "nope"])
    with pytest.raises(PupilError, match="baseline"):
        ExplainConfig(baseline="grey")
    with pytest.raises(PupilError, match="steps"):
        ExplainConfig(steps=0)


def test_explain_check_end_to_end(run_dir):
    tiny = {"n": 6, "steps": 5, "lime_samples": 16, "shap_samples": 16, "ig_steps": 4, "examples": 2}
    results = run_audit(run_dir, ["explain"], budget="quick", device="cpu", settings={"explain": tiny})
    assert load_results(run_dir) == results
    sec = results["checks"]["explain"]
    rows = sec["tables"]["faithfulness"]["rows"]
    assert [r[0] for r in rows] == list(E.METHODS)
    per = sec["metrics"]["per_method"]
    assert sec["metrics"]["best_method"] in sec["headline"]["label"]
    best = per[sec["metrics"]["best_method"]]
    assert sec["headline"]["value"] == pytest.approx(best["gap"]) and not best["flagged"]
    for r in per.values():
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1
        assert -1 <= r["randomization_spearman"] <= 1
    curves = sec["curves"]
    assert len(curves["fraction"]) == 6 and set(curves["deletion"]) == set(E.METHODS)
    items = curves["examples"]["items"]
    assert 1 <= len(items) <= 4
    image, heat = decode_png(items[0]["image"]), decode_png(items[0]["saliency"])
    assert image.shape == heat.shape == (16, 16)  # the synthetic images are grey 16x16
    assert heat.dtype == np.uint8 and heat.max() in (0, 255)  # grey 0..255, its largest value at 255
    assert sec["metrics"]["n"] == 6 and len(sec["metrics"]["indices"]) == 6
