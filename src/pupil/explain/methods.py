"""Attribution methods: saliency maps for a classifier, and one image explained for ``pupil explain``.

All in pixel space against the ``PixelModel`` wrapper, so they explain the deployed model (flip TTA included where
the run uses it). Each returns a ``(B, H, W)`` map; channels are always summed.

- Grad-CAM (Selvaraju et al., ICCV 2017) and Grad-CAM++ (Chattopadhay et al., WACV 2018), written here with a
  forward hook on the model's ``gradcam_layer``; token maps ``(B, N, C)`` or ``(B, h, w, C)`` are reshaped to
  ``(B, C, h, w)`` with ``feature_grid`` and ``num_prefix_tokens``, then upsampled bilinearly. Non-negative.
- Integrated Gradients (Sundararajan et al., ICML 2017), Occlusion (Zeiler & Fergus, ECCV 2014), LIME (Ribeiro
  et al., KDD 2016) and KernelSHAP (Lundberg & Lee, NeurIPS 2017) through captum, imported inside each method;
  LIME and KernelSHAP switch a ``grid x grid`` set of patches on and off. Signed: positive values are evidence
  for the explained class.

One baseline image stands for "absent" everywhere: IG's path start, occluded patches, LIME/SHAP's switched-off
patches, and the pixels deleted (or not yet inserted) by the faithfulness curves (``pupil.explain.faithfulness``).
``zero`` is black; ``blur`` is a Gaussian blur of the image (sigma = 1/14 of its side), RISE's insertion substrate.

Everything runs in float32 whatever the run's training precision: attributions are gradients and small differences.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pupil.errors import PupilError
from pupil.io import atomic_write
from pupil.models.contract import gradcam_module

BASELINES = ("zero", "blur")


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
# One image, for `pupil explain`


def explain_image(
    model: nn.Module, image: torch.Tensor, method_name: str = "gradcam", target: int | None = None, **options
) -> tuple[torch.Tensor, int, float]:
    """Saliency (H, W) on the CPU for one image (C, H, W) (uint8, or float in [0, 1]), the predicted class and its
    probability. ``target`` picks the class explained (the prediction by default)."""
    fn = method(method_name)
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
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
