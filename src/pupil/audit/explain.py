"""Explanations with measured faithfulness: saliency maps, deletion/insertion curves and a sanity check.

Methods, all in pixel space against the ``PixelModel`` wrapper, so they explain the deployed model (flip TTA
included where the run uses it). Each returns a ``(B, H, W)`` map; channels are always summed.

- Grad-CAM (Selvaraju et al., ICCV 2017) and Grad-CAM++ (Chattopadhay et al., WACV 2018), written here with a
  forward hook on the model's ``gradcam_layer``; token maps ``(B, N, C)`` or ``(B, h, w, C)`` are reshaped to
  ``(B, C, h, w)`` with ``feature_grid`` and ``num_prefix_tokens``, then upsampled bilinearly. Non-negative.
- Integrated Gradients (Sundararajan et al., ICML 2017), Occlusion (Zeiler & Fergus, ECCV 2014), LIME (Ribeiro
  et al., KDD 2016) and KernelSHAP (Lundberg & Lee, NeurIPS 2017) through captum; LIME and KernelSHAP switch a
  ``grid x grid`` set of patches on and off. Signed: positive values are evidence for the explained class.

One baseline image stands for "absent" everywhere: IG's path start, occluded patches, LIME/SHAP's switched-off
patches, and the pixels deleted (or not yet inserted) by the faithfulness curves. ``zero`` is black; ``blur`` is a
Gaussian blur of the image (sigma = 1/14 of its side), RISE's insertion substrate.

Faithfulness (Petsiuk, Das & Saenko, "RISE", BMVC 2018): pixels are deleted from the image (set to the baseline), or
inserted into the baseline, in order of decreasing saliency, in ``steps`` equal increments; the curve is the
softmax probability of the explained class and its area is taken by the trapezoid rule over the fraction of pixels
changed. A faithful map gives a low deletion area and a high insertion area.

Everything runs in float32 whatever the run's training precision: attributions are gradients and small differences.

Sanity (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): every weight of a copy of the model is
re-initialised at once (the end point of the paper's cascading randomisation), the maps are recomputed, and their
Spearman rank correlation with the original maps is reported; a map that barely changes does not depend on what
the model learned.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pupil.audit.common import (
    CHECKS,
    AuditContext,
    Check,
    at_least,
    comma_names,
    headline,
    one_of,
    table,
    validate_settings,
)
from pupil.errors import PupilError
from pupil.io import atomic_write
from pupil.models.contract import gradcam_module

BASELINES = ("zero", "blur")
# A mean Spearman correlation above 0.5 between the maps of the trained and the fully randomised model means the
# two maps still agree on most of their pixel ranking. Maps that follow the model fall well below it under full
# randomisation, while maps fixed by the image alone (edge detectors, or attributions that are exactly zero wherever
# the image equals the baseline) stay near 1 (Adebayo et al. 2018, Sec. 3); 0.5 sits between the two.
FLAG_SPEARMAN = 0.5
EXAMPLE_SIDE = 32  # example images and maps are stored at most 32x32 so results.json stays small


def baseline_image(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The "absent" image (B, C, H, W) for ``x``: ``zero`` (black) or ``blur`` (Gaussian, sigma = side / 14)."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        side = min(x.shape[-2:])
        sigma = max(x.shape[-2:]) / 14
        k = min(2 * math.ceil(2 * sigma) + 1, side - 1 + side % 2)  # odd, and small enough for reflect padding
        return gaussian_blur(x, [k, k], [sigma, sigma])
    raise PupilError(f"unknown baseline {kind!r}; choose {' or '.join(BASELINES)}")


# ---------------------------------------------------------------------------------------------------------------
# Grad-CAM and Grad-CAM++ by hand


def to_grid(t: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """A hooked activation or its gradient as a map (B, C, h, w).

    CNN maps pass through; token models give (B, prefix + h*w, C) (ViT, DeiT, Swin) or channels-last
    (B, h, w, C) (some timm models), reshaped with ``net.feature_grid`` after dropping the prefix tokens.
    """
    grid = tuple(getattr(net, "feature_grid", ()) or ())
    if t.ndim == 4:
        # Channels-last where the grid says so, or where the last axis, not the second, holds the features (timm's
        # Swin, whose feature_grid is the patch grid, not the final stage's).
        c = getattr(net, "num_features", None)
        if (grid and tuple(t.shape[-2:]) != grid and tuple(t.shape[1:3]) == grid) or (t.shape[-1] == c != t.shape[1]):
            return t.permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)
        return t
    if t.ndim == 3 and grid:
        tokens = t[:, getattr(net, "num_prefix_tokens", 0) :]  # (B, h*w, C): class/distillation tokens dropped
        if tokens.shape[1] != grid[0] * grid[1]:
            raise PupilError(f"{tokens.shape[1]} tokens at {net.gradcam_layer} do not fill the grid {grid}")
        return tokens.transpose(1, 2).reshape(t.shape[0], -1, *grid)
    raise PupilError(f"Grad-CAM cannot read the output {tuple(t.shape)} of {net.gradcam_layer} as a map")


def gradcam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM channel weights (B, C): the spatial mean of the gradient (Selvaraju et al. 2017, Eq. 1)."""
    return g.mean((2, 3))


def gradcam_pp_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights (B, C) (Chattopadhay et al. 2018, Eqs. 10 and 19, with Y = exp(score)).

    alpha_ij = g^2 / (2 g^2 + sum_ab A_ab g^3), w = sum_ij alpha_ij relu(g_ij); alpha is 0 where the gradient is.
    """
    g2, g3 = g.pow(2), g.pow(3)
    denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    return (alpha * g.relu()).sum((2, 3))


Weights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (activations, gradients) (B, C, h, w) -> (B, C)


def _cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, weights: Weights) -> torch.Tensor:
    """relu(sum_k w_k A_k) at the gradcam layer, upsampled bilinearly to (B, H, W).

    With flip TTA the layer sees 2B images (originals, then mirrors) and the score is the averaged logit; each
    view's linear map is taken, the mirror's is flipped back, and the two are summed before the ReLU, so the map
    is Grad-CAM of the deployed (averaged) model.
    """
    net, seen = model.net, []
    hook = gradcam_module(net).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            if len(seen) != 1:
                raise PupilError(f"{net.gradcam_layer} ran {len(seen)} times in one forward pass; Grad-CAM needs one")
            score = logits.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(score, seen[0])
    finally:
        hook.remove()
    a, g = to_grid(seen[0].detach().float(), net), to_grid(grad.float(), net)  # (V*B, C, h, w), V views
    lin = (weights(a, g)[:, :, None, None] * a).sum(1)  # (V*B, h, w)
    if getattr(model, "tta", False):
        first, mirror = lin.chunk(2)
        lin = first + mirror.flip(-1)
    cam = lin.relu()[:, None]  # (B, 1, h, w)
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, **_) -> torch.Tensor:
    """Grad-CAM map (B, H, W), non-negative."""
    return _cam(model, x, target, gradcam_weights)


def gradcam_pp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, **_) -> torch.Tensor:
    """Grad-CAM++ map (B, H, W), non-negative."""
    return _cam(model, x, target, gradcam_pp_weights)


# ---------------------------------------------------------------------------------------------------------------
# captum methods


def patch_mask(h: int, w: int, grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, H, W) patch ids 0 .. grid*grid - 1 of a ``grid x grid`` tiling (LIME/KernelSHAP features)."""
    rows = torch.arange(h, device=device) * grid // h
    cols = torch.arange(w, device=device) * grid // w
    return (rows[:, None] * grid + cols[None, :])[None, None]


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    baseline: str = "zero",
    ig_steps: int = 32,
    batch_size: int = 1024,
    **_,
) -> torch.Tensor:
    """Integrated Gradients from the baseline image (Gauss-Legendre, ``ig_steps`` points), channels summed."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    base = baseline_image(x, baseline)
    attr = ig.attribute(x, base, target=target, n_steps=ig_steps, internal_batch_size=batch_size)
    return attr.sum(1).detach()


def occlusion(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    baseline: str = "zero",
    grid: int = 7,
    batch_size: int = 1024,
    **_,
) -> torch.Tensor:
    """Occlusion: drop in the target logit when a square of side/grid pixels (stride half that) is set to the
    baseline, averaged over the squares covering each pixel, channels summed."""
    from captum.attr import Occlusion

    C, H, W = x.shape[1:]
    side = max(1, round(min(H, W) / grid))
    stride = max(1, side // 2)
    attr = Occlusion(model).attribute(
        x,
        sliding_window_shapes=(C, side, side),
        strides=(C, stride, stride),
        baselines=baseline_image(x, baseline),
        target=target,
        perturbations_per_eval=max(1, batch_size // len(x)),
    )
    return attr.sum(1).detach()


def _surrogate(explainer, x, target, baseline, grid, samples, batch_size) -> torch.Tensor:
    """LIME/KernelSHAP one image at a time (captum fits one surrogate per image either way), samples batched."""
    mask = patch_mask(*x.shape[-2:], grid, x.device)
    base = baseline_image(x, baseline)
    maps = []
    for i in range(len(x)):
        attr = explainer.attribute(
            x[i : i + 1],
            baselines=base[i : i + 1],
            target=int(target[i]),
            feature_mask=mask,
            n_samples=samples,
            perturbations_per_eval=max(1, min(samples, batch_size)),
        )
        maps.append(attr.sum(1).detach())
    return torch.cat(maps)


def lime(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    baseline: str = "zero",
    grid: int = 7,
    lime_samples: int = 200,
    batch_size: int = 1024,
    **_,
) -> torch.Tensor:
    """LIME over a ``grid x grid`` patch tiling: captum's defaults (Lasso, alpha 0.01; exponential kernel on the
    cosine distance, width 1), ``lime_samples`` random patch subsets per image."""
    from captum.attr import Lime

    return _surrogate(Lime(model), x, target, baseline, grid, lime_samples, batch_size)


def kernel_shap(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    baseline: str = "zero",
    grid: int = 7,
    shap_samples: int = 200,
    batch_size: int = 1024,
    **_,
) -> torch.Tensor:
    """KernelSHAP over a ``grid x grid`` patch tiling with ``shap_samples`` coalitions per image."""
    from captum.attr import KernelShap

    return _surrogate(KernelShap(model), x, target, baseline, grid, shap_samples, batch_size)


# name -> fn(model, x (B, C, H, W) in [0, 1], target (B,), **options) -> (B, H, W); options a method does not
# use are ignored, so one dict of settings serves them all.
METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_pp,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
    "lime": lime,
    "kernel_shap": kernel_shap,
}
SIGNED = {"integrated_gradients", "occlusion", "lime", "kernel_shap"}


def method(name: str) -> Callable[..., torch.Tensor]:
    if name not in METHODS:
        raise PupilError(f"unknown explanation method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def saliency(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, fn: Callable[..., torch.Tensor], chunk: int = 64, **options
) -> torch.Tensor:
    """``fn`` over ``x`` in chunks of images: (B, H, W) on x's device."""
    return torch.cat([fn(model, xc, tc, **options) for xc, tc in zip(x.split(chunk), target.split(chunk), strict=True)])


# ---------------------------------------------------------------------------------------------------------------
# Faithfulness: deletion and insertion (Petsiuk et al. 2018)


def step_counts(pixels: int, steps: int) -> torch.Tensor:
    """Pixels changed after each of ``steps`` equal increments: (steps + 1,) from 0 to all."""
    return torch.arange(steps + 1) * pixels // steps


def curve_area(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of curves (..., S+1) sampled at fractions 0, 1/S, ..., 1."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), dim=-1)


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    saliency: torch.Tensor,
    target: torch.Tensor,
    steps: int = 20,
    baseline: str = "zero",
    batch_size: int = 1024,
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves (B, steps + 1) of the target's softmax probability, and their areas (B,).

    Batched: one argsort ranks every pixel of every image; a comparison of the ranks with the step counts gives
    all B * (steps + 1) masks at once, and the 2 (steps + 1) perturbed copies of each image go through the model
    in chunks of about ``batch_size`` images. Ties in saliency keep raster order (stable sort).
    ``channels_last`` feeds the model that memory format (as the run was trained and is predicted with).
    """
    B, _, H, W = x.shape
    S1 = steps + 1
    base = baseline_image(x, baseline)
    counts = step_counts(H * W, steps).to(x.device)  # (S1,)
    order = saliency.reshape(B, -1).argsort(dim=1, descending=True, stable=True)  # (B, HW), most salient first
    positions = torch.arange(H * W, device=x.device).expand(B, -1)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # (B, HW): place of each pixel in the order
    per = max(1, batch_size // (2 * S1))  # images per forward chunk
    curves = []
    for i in range(0, B, per):
        changed = (rank[i : i + per, None, :] < counts[None, :, None]).view(-1, S1, 1, H, W)  # (b, S1, 1, H, W)
        xi, bi = x[i : i + per, None], base[i : i + per, None]  # (b, 1, C, H, W)
        batch = torch.cat([torch.where(changed, bi, xi), torch.where(changed, xi, bi)], 1)  # (b, 2 S1, C, H, W)
        batch = batch.flatten(0, 1).contiguous(memory_format=_format(channels_last))
        probs = model(batch).float().softmax(-1).view(len(xi), 2 * S1, -1)
        t = target[i : i + per, None, None].expand(-1, 2 * S1, 1)
        curves.append(probs.gather(2, t)[..., 0])  # (b, 2 S1)
    both = torch.cat(curves)
    deletion, insertion = both[:, :S1], both[:, S1:]
    return {
        "deletion": deletion,
        "insertion": insertion,
        "deletion_auc": curve_area(deletion),
        "insertion_auc": curve_area(insertion),
    }


@torch.no_grad()
def deletion_insertion_loop(
    model: nn.Module,
    x: torch.Tensor,
    saliency: torch.Tensor,
    target: torch.Tensor,
    steps: int = 20,
    baseline: str = "zero",
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """The same numbers as ``deletion_insertion``, one image and one step at a time (the reference)."""
    B, C, H, W = x.shape
    base = baseline_image(x, baseline)
    counts = step_counts(H * W, steps).tolist()
    out = {"deletion": torch.zeros(B, steps + 1), "insertion": torch.zeros(B, steps + 1)}
    for b in range(B):
        order = saliency[b].flatten().argsort(descending=True, stable=True)
        for s, k in enumerate(counts):
            idx = order[:k]
            deleted, inserted = x[b].clone().view(C, -1), base[b].clone().view(C, -1)
            deleted[:, idx] = base[b].view(C, -1)[:, idx]
            inserted[:, idx] = x[b].view(C, -1)[:, idx]
            for name, img in (("deletion", deleted), ("insertion", inserted)):
                img = img.view(1, C, H, W).contiguous(memory_format=_format(channels_last))
                out[name][b, s] = model(img).float().softmax(-1)[0, target[b]]
    for name in ("deletion", "insertion"):
        c = out[name]
        areas = [sum((c[b, s] + c[b, s + 1]) / 2 for s in range(steps)) / steps for b in range(B)]
        out[f"{name}_auc"] = torch.tensor(areas)
    return out


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# ---------------------------------------------------------------------------------------------------------------
# Sanity: model-parameter randomisation (Adebayo et al. 2018)


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every weight re-initialised (full, not cascading, randomisation).

    Modules with ``reset_parameters`` (convolutions, linears, norms, BatchNorm statistics) get their own
    initialisation; any other parameter (position embeddings, class tokens, relative-position tables) is drawn
    from N(0, 0.02^2) truncated at +-2 std, the transformers' initialisation. Seeded, global RNG untouched.
    """
    device = next(iter(model.buffers()), next(model.parameters())).device
    rand = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        covered = set()
        for m in rand.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
                covered.update(id(p) for p in m.parameters(recurse=False))
        with torch.no_grad():
            for p in rand.parameters():
                if id(p) not in covered:
                    nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
    return rand.to(device).eval()


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation (B,) between the flattened maps of a and b, ties at average ranks.

    A constant map has no ranking to share, so a pair with one is given 0 rather than NaN.
    """
    from scipy.stats import rankdata

    ra = torch.as_tensor(rankdata(a.reshape(len(a), -1).double().cpu().numpy(), axis=1))
    rb = torch.as_tensor(rankdata(b.reshape(len(b), -1).double().cpu().numpy(), axis=1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = (ra.pow(2).sum(1) * rb.pow(2).sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), 0.0)


def randomization_spearman(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    fn: Callable[..., torch.Tensor],
    maps: torch.Tensor | None = None,
    seed: int = 0,
    random_model: nn.Module | None = None,
    **options,
) -> torch.Tensor:
    """Per-image Spearman (B,) between ``fn``'s maps for the model and for its randomised copy (same targets)."""
    maps = saliency(model, x, target, fn, **options) if maps is None else maps
    random_model = random_model or randomized_copy(model, seed)
    return spearman_rows(maps, saliency(random_model, x, target, fn, **options))


# ---------------------------------------------------------------------------------------------------------------
# One image, for `pupil explain`


def explain_image(
    model: nn.Module, image: torch.Tensor, method_name: str = "gradcam", target: int | None = None, **options
) -> tuple[torch.Tensor, int, float]:
    """Saliency (H, W) on the CPU for one image (C, H, W) (uint8, or float in [0, 1]), the predicted class and its
    probability. ``target`` picks the class explained (the prediction by default)."""
    fn = method(method_name)
    device = next(model.parameters()).device
    x = image.float().div(255) if image.dtype == torch.uint8 else image.float()
    x = (x[None] if x.ndim == 3 else x).to(device)
    model.eval()
    with torch.no_grad():
        probs = model(x).float().softmax(-1)[0]
    pred = int(probs.argmax())
    t = pred if target is None else target
    if not 0 <= t < len(probs):
        raise PupilError(f"target class {t} is out of range: the model has {len(probs)} classes")
    sal = fn(model, x, torch.tensor([t], device=device), **options)[0]
    return sal.cpu(), pred, float(probs[pred])


def overlay_png(image: torch.Tensor, saliency: torch.Tensor, path: str | Path, alpha: float = 0.6) -> Path:
    """Write the image with the positive part of ``saliency`` as a heat map on top (PNG, at least 256 px wide,
    written atomically). ``image`` is (C, H, W), uint8 or float in [0, 1]."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    img = image.float().div(255) if image.dtype == torch.uint8 else image.float()
    img = img.clamp(0, 1).expand(3, -1, -1) if img.shape[0] == 1 else img[:3].clamp(0, 1)
    H, W = img.shape[-2:]
    scale = max(1, math.ceil(256 / W))
    size = (H * scale, W * scale)
    big = F.interpolate(img[None], size=size, mode="nearest")[0].permute(1, 2, 0)  # (h, w, 3)
    s = F.interpolate(saliency.float()[None, None].cpu(), size=size, mode="bilinear", align_corners=False)[0, 0]
    s = s.relu() / s.relu().max().clamp_min(1e-12)  # (h, w) in [0, 1]
    heat = torch.as_tensor(colormaps["jet"](s.numpy())[..., :3], dtype=torch.float32)
    w = alpha * s[..., None]
    out = ((1 - w) * big + w * heat).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    pic = Image.fromarray(np.ascontiguousarray(out), "RGB")
    return atomic_write(path, lambda tmp: pic.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------------------------
# The check


@dataclass
class ExplainConfig:
    methods: str = "gradcam,gradcam++,integrated_gradients,occlusion,lime,kernel_shap"
    """Comma-separated attribution methods to compare."""
    n: int = 200
    """Test images (a seeded random subset) explained and scored for faithfulness."""
    steps: int = 20
    """Equal increments of pixels deleted/inserted along the faithfulness curves."""
    baseline: str = "zero"
    """The "absent" image (zero: black; blur: Gaussian blur) for deletion/insertion, IG, occlusion, LIME and SHAP."""
    lime_samples: int = 200
    """Random patch subsets per image for LIME."""
    shap_samples: int = 200
    """Coalitions per image for KernelSHAP."""
    ig_steps: int = 32
    """Points on the Integrated Gradients path."""
    grid: int = 7
    """Patches per side for LIME/KernelSHAP features; occlusion squares are side/grid pixels."""
    examples: int = 4
    """Correct and (as many) wrong predictions whose maps are stored for the report."""
    randomize: bool = True
    """Run the model-parameter randomisation sanity check (doubles the time spent on maps)."""

    def __post_init__(self):
        once = at_least(1)
        validate_settings(
            self,
            "explain",
            methods=comma_names(list(METHODS), "explanation method"),
            n=once,
            steps=once,
            baseline=one_of(*BASELINES),
            lime_samples=once,
            shap_samples=once,
            ig_steps=once,
            grid=once,
            examples=at_least(0),
        )

    @property
    def method_names(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def options(self, batch_size: int) -> dict:
        """Keyword options for every method (each takes the ones it uses)."""
        keys = ("baseline", "grid", "ig_steps", "lime_samples", "shap_samples")
        return {k: getattr(self, k) for k in keys} | {"batch_size": batch_size}


@CHECKS.register("explain")
class Explain(Check):
    name, title, Config = "explain", "Explanations", ExplainConfig
    requires, extra = ("captum",), "trust"
    # Measured on one (shared) core of the 2-core dev machine: 24 s for resnet_test on the 16x16 synthetic smoke run,
    # 93 s for vgg_small with flip TTA on Fashion-MNIST (runs/fmnist_fast), where occlusion alone takes 1.2 s an image.
    quick = {"n": 16, "steps": 10, "lime_samples": 48, "shap_samples": 48, "ig_steps": 16}

    def run(self, ctx: AuditContext, cfg: ExplainConfig) -> dict:
        model, dev = ctx.model.eval(), ctx.device
        pred = ctx.logits("test").argmax(1)
        g = torch.Generator().manual_seed(ctx.seed)
        idx = torch.randperm(len(ctx.test), generator=g)[: cfg.n].sort().values
        x = ctx.test.images[idx].to(dev).float().div(255)
        target = pred[idx].to(dev)  # the prediction is what is explained
        opts = cfg.options(ctx.batch_size)
        random_model = randomized_copy(model, ctx.seed) if cfg.randomize else None
        per, curves = {}, {"fraction": (step_counts(cfg.steps, cfg.steps) / cfg.steps).tolist()}
        curves |= {"deletion": {}, "insertion": {}}
        for name in cfg.method_names:
            fn = METHODS[name]
            t0 = time.perf_counter()
            maps = saliency(model, x, target, fn, **opts)
            seconds = (time.perf_counter() - t0) / len(x)
            fi = deletion_insertion(model, x, maps, target, cfg.steps, cfg.baseline, ctx.batch_size, ctx.channels_last)
            gap = fi["insertion_auc"] - fi["deletion_auc"]
            row = {
                "deletion_auc": fi["deletion_auc"].mean().item(),
                "insertion_auc": fi["insertion_auc"].mean().item(),
                "gap": gap.mean().item(),
                "gap_se": (gap.std() / math.sqrt(len(gap))).item() if len(gap) > 1 else 0.0,
                "seconds_per_image": seconds,
                "signed": name in SIGNED,
            }
            if random_model is not None:
                rmaps = saliency(random_model, x, target, fn, **opts).reshape(len(x), -1)
                rho = spearman_rows(maps, rmaps).mean().item()
                constant = (rmaps.amax(1) == rmaps.amin(1)).float().mean().item()
                row |= {"randomization_spearman": rho, "flagged": rho > FLAG_SPEARMAN, "randomized_constant": constant}
            per[name] = row
            curves["deletion"][name] = fi["deletion"].mean(0).tolist()
            curves["insertion"][name] = fi["insertion"].mean(0).tolist()
        trusted = [m for m in per if not per[m].get("flagged")] or list(per)
        best = max(trusted, key=lambda m: per[m]["gap"])
        curves["examples"] = self._examples(ctx, cfg, model, best, pred, opts)
        columns = ["deletion_auc", "insertion_auc", "gap", "randomization_spearman", "flagged", "seconds_per_image"]
        rows = [[m] + [r.get(c) for c in columns] for m, r in per.items()]
        metrics = {
            "per_method": per,
            "best_method": best,
            "n": len(x),
            "indices": idx.tolist(),
            "baseline": cfg.baseline,
            "flag_spearman": FLAG_SPEARMAN,
            "tta": bool(model.tta),
        }
        return {
            "headline": headline(f"insertion - deletion AUC ({best})", per[best]["gap"], True, "AUC"),
            "metrics": metrics,
            "tables": {"faithfulness": table(["method", *columns], rows)},
            "curves": curves,
            "notes": self._notes(ctx, cfg, per, best),
        }

    @staticmethod
    def _examples(ctx: AuditContext, cfg: ExplainConfig, model, best: str, pred: torch.Tensor, opts: dict) -> dict:
        """The best method's maps over a seeded sample of ``examples`` correct and ``examples`` wrong predictions."""
        y = ctx.targets("test")
        g = torch.Generator().manual_seed(ctx.seed + 1)
        order = torch.randperm(len(y), generator=g)
        right = order[(pred[order] == y[order])][: cfg.examples]
        wrong = order[(pred[order] != y[order])][: cfg.examples]
        idx = torch.cat([right, wrong])
        items = []
        if len(idx):
            x = ctx.test.images[idx].to(ctx.device).float().div(255)
            maps = saliency(model, x, pred[idx].to(ctx.device), METHODS[best], **opts)
            with torch.no_grad():
                probs = model(x).float().softmax(-1)
            for j, i in enumerate(idx.tolist()):
                image, sal = _small(x[j].cpu(), maps[j].cpu())
                items.append(
                    {
                        "index": i,
                        "true": ctx.test.classes[int(y[i])],
                        "pred": ctx.test.classes[int(pred[i])],
                        "prob": probs[j, pred[i]].item(),
                        "correct": bool(pred[i] == y[i]),
                        "image": image,
                        "saliency": sal,
                    }
                )
        return {"method": best, "items": items}

    @staticmethod
    def _notes(ctx: AuditContext, cfg: ExplainConfig, per: dict, best: str) -> list[str]:
        n = min(cfg.n, len(ctx.test))
        notes = [
            f"Faithfulness over a seeded random subset of {n} of {len(ctx.test)} test images (seed {ctx.seed}); "
            f"each map explains the model's predicted class.",
            f"Deletion/insertion (Petsiuk et al. 2018): pixels set to the '{cfg.baseline}' baseline (or restored from "
            f"it) in {cfg.steps} equal steps, most salient first; areas under the predicted class's probability. "
            f"Lower deletion and higher insertion are more faithful.",
        ]
        if ctx.model.tta:
            notes.append("The run predicts with flip TTA; the maps and curves explain that deployed (averaged) model.")
        if cfg.randomize:
            flagged = [m for m in per if per[m].get("flagged")]
            notes.append(
                "Sanity check (Adebayo et al. 2018): all weights re-initialised at once; a mean Spearman correlation "
                f"above {FLAG_SPEARMAN} between the maps before and after flags a method whose maps do not depend "
                f"on what the model learned. Flagged: {', '.join(flagged) or 'none'}."
            )
            if constant := [f"{m} ({per[m]['randomized_constant']:.0%})" for m in per if per[m]["randomized_constant"]]:
                notes.append(
                    "Maps of the randomised model were constant (no ranking; Spearman counted as 0) for a share of "
                    f"the images with: {', '.join(constant)}."
                )
            among = "all methods, every one being flagged" if len(flagged) == len(per) else "the methods not flagged"
            notes.append(f"The headline's method ({best}) has the largest insertion - deletion gap among {among}.")
        if cfg.examples:
            k = cfg.examples
            notes.append(f"Examples show {best} maps for up to {k} correct and {k} wrong predictions (seeded sample).")
        return notes


def _small(image: torch.Tensor, sal: torch.Tensor) -> tuple[list, list]:
    """Image (C, H, W) and map (H, W) at most 32 px a side as uint8 nested lists: the image (H, W) or (H, W, C),
    the map's positive part scaled to 0..255."""
    H, W = image.shape[-2:]
    if max(H, W) > EXAMPLE_SIDE:
        size = (max(1, round(H * EXAMPLE_SIDE / max(H, W))), max(1, round(W * EXAMPLE_SIDE / max(H, W))))
        image = F.interpolate(image[None], size=size, mode="area")[0]
        sal = F.interpolate(sal[None, None].float(), size=size, mode="area")[0, 0]
    img = image.clamp(0, 1).mul(255).round().to(torch.uint8)
    img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    pos = sal.float().relu()
    heat = pos.div(pos.max().clamp_min(1e-12)).mul(255).round().to(torch.uint8)
    return img.tolist(), heat.tolist()
