"""How far to trust a saliency map: deletion/insertion faithfulness and the randomisation sanity check.

Faithfulness (Petsiuk, Das & Saenko, "RISE", BMVC 2018): pixels are deleted from the image (set to the baseline), or
inserted into the baseline, in order of decreasing saliency, in ``steps`` equal increments; the curve is the
softmax probability of the explained class and its area is taken by the trapezoid rule over the fraction of pixels
changed. A faithful map gives a low deletion area and a high insertion area.

Sanity (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): every weight of a copy of the model is
re-initialised at once (the end point of the paper's cascading randomisation), the maps are recomputed, and their
Spearman rank correlation with the original maps is reported; a map that barely changes does not depend on what
the model learned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from pupil.explain.methods import baseline_image, saliency

# A mean Spearman correlation above 0.5 between the maps of the trained and the fully randomised model means the
# two maps still agree on most of their pixel ranking. Maps that follow the model fall well below it under full
# randomisation, while maps fixed by the image alone (edge detectors, or attributions that are exactly zero wherever
# the image equals the baseline) stay near 1 (Adebayo et al. 2018, Sec. 3); 0.5 sits between the two.
FLAG_SPEARMAN = 0.5


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
