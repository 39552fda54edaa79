"""Checks on models pupil did not train: an ONNX-like network gives no gradients, no feature contract and no
Grad-CAM layer (``ctx.gradients``, ``ctx.features``, ``ctx.gradcam``). Each check then switches to a method that
needs forward passes only, or skips the part, and says so in its notes and metrics. The stand-in runs the smoke
run's real network under ``torch.no_grad`` and hands back detached logits, as onnxruntime does."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from pupil.audit import CHECKS
from pupil.audit.adversarial import square
from pupil.audit.common import make_context, subset_indices
from pupil.audit.uncertainty import has_dropout
from pupil.config import build
from pupil.errors import PupilError
from pupil.results import section_problem
from pupil.robust import pgd
from pupil.run import load_run
from pupil.training.loop import fit
from tests.conftest import ROOT
from tests.test_results_contract import TINY

ADV = {"n": 32, "epsilons": [0, 0.05, 0.3], "square_queries": 20, "autoattack": True}


class Opaque(nn.Module):
    """An ONNX session's stand-in: logits computed outside autograd, no parameters, no submodules, no contract."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.hidden = [net]  # a list keeps the network out of .parameters() and .modules()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.hidden[0](x).detach().clone()


class NumpyNet(nn.Module):
    """Logits of a fixed linear map computed in numpy: operators outside PyTorch."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = weight  # (C * H * W, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.detach().cpu().numpy().reshape(len(x), -1) @ self.weight)


class NoGrad(nn.Module):
    """A network that keeps the feature contract but gives no gradients: every entry point under no_grad."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.hidden = [net]
        self.head, self.num_features, self.num_classes = net.head, net.num_features, net.num_classes

    def forward(self, x):
        with torch.no_grad():
            return self.hidden[0](x)

    def forward_features(self, x):
        with torch.no_grad():
            return self.hidden[0].forward_features(x)

    def forward_head(self, x, pre_logits=False):
        with torch.no_grad():
            return self.hidden[0].forward_head(x, pre_logits=pre_logits)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradient_free")
    return fit(build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "smoke"}), progress=False).dir


def context(run_dir, wrap=Opaque, gradients=False, features=False, gradcam=False):
    ctx = make_context(run_dir, "cpu", "quick", 0)
    ctx.model.net = wrap(ctx.model.net)
    ctx.gradients, ctx.features, ctx.gradcam = gradients, features, gradcam
    return ctx


def run_check(name: str, ctx, **settings) -> dict:
    check = CHECKS.get(name)()
    cfg = check.config("quick", {**TINY.get(name, {}), **settings})
    torch.manual_seed(ctx.seed)  # as run_audit does before each check
    out = check.run(ctx, cfg)
    section = {"title": check.title, "config": dataclasses.asdict(cfg), "runtime_s": 0, **out}
    assert section_problem(section, name) is None  # what run_audit validates before writing results.json
    return out


def notes_with(out: dict, *words: str) -> list[str]:
    return [n for n in out["notes"] if all(w in n for w in words)]


@pytest.fixture(scope="module")
def adversarial(run_dir):
    ctx = context(run_dir)
    return ctx, run_check("adversarial", ctx, **ADV)


def test_the_stand_in_gives_no_gradients(run_dir):
    ctx = context(run_dir)
    x = ctx.test.images[:4].float().div(255).requires_grad_(True)
    assert not ctx.model(x).requires_grad and next(ctx.model.net.parameters(), None) is None
    with pytest.raises(RuntimeError):  # so white-box attacks cannot run on it and the check must switch
        pgd(ctx.model, x.detach(), ctx.test.targets[:4], 0.1, 0.05, 1)


def test_adversarial_switches_to_square_attack_without_gradients(adversarial):
    _, out = adversarial
    m, acc = out["metrics"], out["metrics"]["square_accuracy"]
    assert m["attack"] == "square" and m["skipped"] == ["fgsm", "pgd", "unbounded", "pgd_vs_fgsm", "autoattack"]
    assert not {"fgsm_accuracy", "pgd_accuracy"} & set(m) and m["unbounded"] is None
    assert "Square Attack" in out["headline"]["label"] and "PGD" not in out["headline"]["label"]
    assert m["epsilons"] == [0.0, 0.05, 0.3] and len(acc) == 3
    assert acc[0] == m["clean_accuracy"] == out["summary"]["clean_top1"]
    assert acc[2] <= acc[1] <= acc[0] and acc[2] < acc[0]  # ε = 0.3 breaks some of this weak model's images
    assert out["headline"]["value"] == out["summary"]["robust_top1"] == acc[1]
    assert set(out["curves"]["robust_accuracy"]) == {"epsilon", "square"}
    assert out["figures"][0]["series"] == {"square": "Square Attack"}
    columns = ["epsilon", "Square Attack accuracy", "Square Attack success rate"]
    assert out["tables"]["robust_accuracy"]["columns"] == columns
    assert out["curves"]["examples"] and m["sanity"]["passed"]
    assert notes_with(out, "no gradients", "Square Attack", "skipped")
    assert notes_with(out, "AutoAttack was skipped") and "autoattack" not in m


@pytest.mark.parametrize("eps_index", [1, 2])
def test_square_examples_stay_in_the_ball_and_fool_an_independent_forward_pass(run_dir, adversarial, eps_index):
    """Rerun Square on the images the check attacked; check the ball and [0, 1], and recount its successes with
    the original network (gradients and all, loaded afresh) against the check's robust accuracy."""
    ctx, out = adversarial
    eps = ADV["epsilons"][eps_index]
    idx = subset_indices(len(ctx.test), ADV["n"], ctx.seed)
    x, y = ctx.test.images[idx].float().div(255), ctx.test.targets[idx]
    reference = load_run(run_dir, device=torch.device("cpu")).model.eval()
    with torch.no_grad():
        correct = reference(x).argmax(1) == y
    adv = square(ctx.model, x[correct], y[correct], eps, "linf", ADV["square_queries"], ctx.seed)
    assert (adv - x[correct]).abs().amax() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        fooled = reference(adv).argmax(1) != y[correct]
    assert out["metrics"]["square_accuracy"][eps_index] == (int(correct.sum()) - int(fooled.sum())) / len(idx)
    assert not torch.equal(adv, x[correct])


def test_square_is_seeded_keeps_the_global_stream_and_the_l2_ball(run_dir):
    ctx = context(run_dir)
    x, y = ctx.test.images[:8].float().div(255), ctx.test.targets[:8]
    state = torch.random.get_rng_state()
    a = square(ctx.model, x, y, 1.0, "l2", 10, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, square(ctx.model, x, y, 1.0, "l2", 10, seed=3))
    assert (a - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5 and a.min() >= 0 and a.max() <= 1


def test_explain_runs_only_the_methods_that_query_the_model(run_dir):
    out = run_check("explain", context(run_dir))
    assert list(out["metrics"]["per_method"]) == ["occlusion", "lime", "kernel_shap"]
    assert out["metrics"]["skipped"] == ["gradcam", "gradcam++", "integrated_gradients", "randomization"]
    skipped = "gradcam, gradcam++ and integrated_gradients were skipped"
    assert notes_with(out, "no gradients", skipped, "occlusion, lime and kernel_shap ran")
    assert notes_with(out, "randomisation sanity check", "skipped")
    assert all("randomization_spearman" not in r for r in out["metrics"]["per_method"].values())
    assert out["summary"]["method"] in ("occlusion", "lime", "kernel_shap")


def test_explain_skips_gradcam_alone_without_a_hookable_layer(run_dir):
    ctx = context(run_dir, wrap=lambda net: net, gradients=True, features=True)
    out = run_check("explain", ctx, methods=["gradcam", "integrated_gradients"], randomize=False)
    assert list(out["metrics"]["per_method"]) == ["integrated_gradients"] and out["metrics"]["skipped"] == ["gradcam"]
    assert notes_with(out, "Grad-CAM layer", "gradcam was skipped; integrated_gradients ran")


def test_explain_refuses_in_one_line_when_every_method_needs_gradients(run_dir):
    with pytest.raises(PupilError, match="request occlusion, lime, kernel_shap") as e:
        run_check("explain", context(run_dir), methods=["gradcam", "integrated_gradients"])
    assert "\n" not in str(e.value)


def test_ood_keeps_the_logit_scores(run_dir):
    out = run_check("ood", context(run_dir))
    m = out["metrics"]
    assert list(m["mean"]) == ["msp", "max_logit", "energy"] and "fit" not in m["n"]
    assert m["skipped"] == ["odin", "mahalanobis", "knn", "vim"]
    assert out["summary"]["score"] == "msp" and out["summary"]["best_score"] in m["mean"]
    assert notes_with(out, "no gradients", "odin was skipped")
    assert notes_with(out, "feature contract", "mahalanobis, knn, vim were skipped", "msp, max_logit, energy ran")


def test_ood_without_gradients_but_with_features_skips_odin_only(run_dir):
    out = run_check("ood", context(run_dir, wrap=NoGrad, features=True))
    m = out["metrics"]
    assert m["skipped"] == ["odin"] and m["n"]["fit"] == TINY["ood"]["n_fit"]
    assert set(m["mean"]) == {"msp", "max_logit", "energy", "mahalanobis", "knn", "vim"}
    assert notes_with(out, "no gradients", "odin was skipped") and not notes_with(out, "feature contract")


def test_ood_refuses_when_no_requested_score_can_run(run_dir):
    with pytest.raises(PupilError, match="request msp, max_logit, energy"):
        run_check("ood", context(run_dir), scores=["odin", "knn"])


def test_fairness_clusters_the_softmax_without_features(run_dir):
    out = run_check("fairness", context(run_dir))
    assert out["metrics"]["slice_embedding"] == "softmax" and out["metrics"]["slices"]
    assert notes_with(out, "feature contract", "softmax probabilities")


def test_uncertainty_skips_mc_dropout_without_features(run_dir):
    out = run_check("uncertainty", context(run_dir))
    assert "mc_dropout" in out["metrics"]["skipped"] and list(out["metrics"]["sources"]) == ["softmax", "tta"]
    assert notes_with(out, "mc_dropout skipped", "feature contract")


def test_has_dropout_reads_opaque_networks_as_without():
    assert not has_dropout(Opaque(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))))
    assert has_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    odd = nn.Linear(2, 2)
    odd.drop_rate = "n/a"  # an opaque module's attribute of another meaning
    assert not has_dropout(odd)


def test_efficiency_records_what_it_cannot_count(run_dir, tmp_path):
    ctx = context(run_dir)
    out = run_check("efficiency", ctx)
    assert out["summary"]["flops"] is None and out["summary"]["params"] is None
    assert out["metrics"]["size_on_disk_bytes"] == (run_dir / "model.safetensors").stat().st_size
    assert notes_with(out, "FLOPs not counted", "no gradients") and notes_with(out, "parameters not counted")

    ctx.model.net.param_count = 1234  # an ONNX session states the size of its initializers
    ctx.run.weights_file = tmp_path / "gone.onnx"
    out = run_check("efficiency", ctx)
    assert out["summary"]["params"] == 1234 and out["metrics"]["size_on_disk_bytes"] is None
    assert notes_with(out, "size on disk not measured", "gone.onnx")


def test_efficiency_does_not_report_zero_flops_for_operators_it_cannot_see(run_dir):
    # Gradients claimed, but the forward pass runs in numpy, where PyTorch's counter sees no operator.
    ctx = context(run_dir, gradients=True)
    ctx.model.net = NumpyNet(np.ones((math.prod(ctx.test.shape), 4), np.float32))
    out = run_check("efficiency", ctx)
    assert out["summary"]["flops"] is None and notes_with(out, "FLOPs not counted", "saw no matrix multiplication")
