"""Batched ImageNet-C corruptions (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019) in PyTorch.

The 15 common corruptions and the 4 held-out extras, each at severities 1-5, with the parameter tables of the
``imagecorruptions`` package (Michaelis et al. 2019), the maintained port of the ImageNet-C code that works on any
image size. Every function takes a float batch ``(B, C, H, W)`` in [0, 1] with C = 1 or 3 and works on the whole
batch at once; randomness comes from one ``torch.Generator`` so that a seeded call repeats exactly.

**Fidelity** (tests/test_corruptions.py). Given the same input, brightness, contrast, saturate, zoom blur, Gaussian
blur and JPEG equal the reference to float precision and pixelate to one uint8 level; glass blur's pixel shuffle,
motion blur and spatter's OpenCV chain equal the reference's own steps given the same random numbers. The other
random corruptions draw the same distributions, and their damage (PSNR against the clean image) agrees with the
reference within sampling noise. Two differ by design: the defocus disk weights pixels by the area of them inside
the circle (the reference tests pixel centres; at most 6/255 apart), and frost synthesises its texture where the
reference overlays photographs that ship with it.

**Resolution.** The reference's lengths are pixels of a 224x224 ImageNet crop. ``scale`` (default
``min(H, W) / 224``) multiplies every length: blur sigmas and radii, glass-blur shuffle distance, motion-blur length,
snow-flake zoom, spatter blob size, elastic displacement and the frost texture's grain, so that a small image gets
what a 224-pixel one would show after downsampling. A 32x32 image gets about 1/7 of the ImageNet blur, close to the
hand-made CIFAR-10-C tables (defocus radius 0.3-1.5 against our 0.43-1.43). Noise amplitudes, brightness,
contrast, saturation, JPEG quality, zoom factors, pixelation ratios and the fog fractal are resolution-free and stay
as they are. ``scale=1`` reproduces the reference's absolute-pixel behaviour at any size (what the fidelity tests
use). Where a scaled length falls below a pixel: glass blur shuffles by one pixel but moves only a fraction
``delta * scale`` of the pixels, snow flakes stay one pixel wide, the defocus disk still spreads (area weights), and
the fields the reference smooths (spatter's liquid layer, elastic's displacement) keep the spread they have at 224
pixels. So at 28-32 pixels the mildest blurs barely change an image (Gaussian blur sigma 1 at 224 is 0.14 px at 32),
as ImageNet-C's severity-1 blur would after downsampling.

**Grey images** (C = 1) get the natural single-channel equivalent: noise, blur and geometric corruptions act on the
one channel; snow and spatter use the image itself (or the luma of the coloured layer) where the reference takes a
colour image's luma; frost uses the luma of its texture; JPEG encodes a greyscale JPEG; brightness adds to the
value directly (HSV value of a grey pixel is the pixel); and saturate is the identity, as in the reference's own
grey path (a grey pixel has no saturation to change).
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pupil.errors import PupilError

# ---------------------------------------------------------------------------------------------------------------
# Parameter tables: one row per severity 1..5, copied from imagecorruptions 1.1.2 (corruptions.py).

PARAMS: dict[str, list[Any]] = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],  # noise std
    "shot_noise": [60, 25, 12, 5, 3],  # photons per unit intensity
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],  # salt-and-pepper fraction
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],  # disk radius, anti-alias sigma
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],  # sigma, max shift, sweeps
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],  # radius, sigma
    "zoom_blur": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)],  # arange
    # loc, scale, zoom, threshold, blur radius, blur sigma, blend
    "snow": [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],  # image weight, frost weight
    "fog": [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],  # fog strength, fractal decay
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],  # added to HSV value
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],  # factor about the mean
    "elastic_transform": [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12],  # alpha
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],  # downsampling ratio
    "jpeg_compression": [25, 18, 15, 10, 7],  # quality
    "speckle_noise": [0.15, 0.2, 0.35, 0.45, 0.6],  # multiplicative noise std
    "gaussian_blur": [1, 2, 3, 4, 6],  # sigma
    # loc, scale, sigma, threshold, intensity (water) or blur sigma (mud), 0 = water / 1 = mud
    "spatter": [
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    ],
    "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],  # HSV saturation * a + b
}
CORRUPTIONS = tuple(PARAMS)  # ImageNet-C order: 15 common, then the 4 extras
COMMON = CORRUPTIONS[:15]
EXTRA = CORRUPTIONS[15:]
SEVERITIES = (1, 2, 3, 4, 5)
GROUPS = {"all": CORRUPTIONS, "common": COMMON, "extra": EXTRA}  # names that stand for several corruptions
REFERENCE_SIZE = 224
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as cv2.COLOR_RGB2GRAY

# Mean RGB and per-channel spread of the reference's frost photos as it samples them for a 224x224 image (random
# 224-pixel crops of the photo enlarged 1.1x), measured from the files it ships. It draws one of frost1-frost5
# uniformly (frost6 never); frost2 and frost3 hold the same picture. Our five textures are procedural.
FROST_PHOTOS = (
    ((0.307, 0.581, 0.645), (0.111, 0.065, 0.058)),
    ((0.776, 0.793, 0.829), (0.078, 0.081, 0.084)),
    ((0.776, 0.793, 0.829), (0.078, 0.081, 0.084)),
    ((0.564, 0.622, 0.672), (0.105, 0.105, 0.110)),
    ((0.402, 0.447, 0.493), (0.149, 0.147, 0.143)),
)


# ---------------------------------------------------------------------------------------------------------------
# Public API


@torch.no_grad()
def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    generator: torch.Generator | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Apply one corruption at one severity to a batch.

    Args:
        images: float ``(B, C, H, W)`` in [0, 1], C = 1 or 3.
        name: one of ``CORRUPTIONS``.
        severity: 1 (mild) to 5 (severe).
        generator: source of all randomness; a seeded generator makes the call repeat exactly. Its device is
            where random numbers are drawn (they are moved to the images' device).
        scale: multiplier for the reference's pixel lengths; default ``min(H, W) / 224`` (see the module
            docstring); ``1.0`` matches ``imagecorruptions`` at any size.

    Returns:
        The corrupted batch, same shape and dtype, clamped to [0, 1].
    """
    if name not in PARAMS:
        raise PupilError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise PupilError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise PupilError(f"corrupt() takes float images (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    s = min(images.shape[-2:]) / REFERENCE_SIZE if scale is None else float(scale)
    if s <= 0:
        raise PupilError(f"scale must be positive, got {scale}")
    x = images.float()
    out = _FUNCS[name](x, PARAMS[name][severity - 1], s, generator)
    return out.clamp_(0, 1).to(images.dtype)


def corrupt_uint8(
    images: torch.Tensor,
    name: str,
    severity: int,
    generator: torch.Generator | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``corrupt`` for uint8 batches ``(B, C, H, W)``: converts to [0, 1], corrupts, rounds back to uint8."""
    if images.dtype != torch.uint8:
        raise PupilError(f"corrupt_uint8() takes uint8 images, got {images.dtype}")
    out = corrupt(images.float().div_(255), name, severity, generator, scale)
    return out.mul_(255).round_().to(torch.uint8)


def parse_names(spec: str | Iterable[str]) -> list[str]:
    """``"all"``, ``"common"``, ``"extra"`` or a comma list of names -> the names in ImageNet-C order."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if s]
    chosen: set[str] = set()
    for item in items:
        if item in GROUPS:
            chosen.update(GROUPS[item])
        elif item in PARAMS:
            chosen.add(item)
        else:
            raise PupilError(f"unknown corruption {item!r}; choose all, common, extra or from {', '.join(CORRUPTIONS)}")
    if not chosen:
        raise PupilError("no corruptions given")
    return [c for c in CORRUPTIONS if c in chosen]


def parse_severities(spec: str | Iterable[int]) -> list[int]:
    """``"1,2,3,4,5"`` (or a list) -> sorted unique severities, each checked to be in 1..5."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        sevs = sorted({int(str(s).strip()) for s in items if str(s).strip()})
    except ValueError:
        raise PupilError(f"severities must be integers from 1 to 5, got {spec!r}") from None
    if not sevs or not set(sevs) <= set(SEVERITIES):
        raise PupilError(f"severities must be integers from 1 to 5, got {spec!r}")
    return sevs


def corruption_seed(seed: int, name: str, severity: int) -> int:
    """The generator seed for one (corruption, severity), so that each is reproducible on its own."""
    return seed * 1_000_003 + CORRUPTIONS.index(name) * 16 + severity


def write_corrupted_tree(
    ds: Any,
    out: str | Path,
    names: Iterable[str] = CORRUPTIONS,
    severities: Iterable[int] = SEVERITIES,
    seed: int = 0,
    scale: float | None = None,
    batch_size: int = 256,
    on_done: Callable[[str, int], None] | None = None,
) -> Path:
    """Write an ImageNet-C style tree ``out/<corruption>/<severity>/<class>/<index>.png``.

    Each (corruption, severity) folder is written under a temporary name and renamed when complete, so an
    interrupted run leaves only whole folders; running again skips the folders that exist. ``out/corruptions.json``
    records what was written (names, severities, seed, scale, source dataset, class folders).

    Args:
        ds: an ``ImageDataset`` (uint8 images, targets, classes).
        out: the tree's root folder.
        names: corruptions to write (default all 19).
        severities: severities to write (default 1-5).
        seed: base seed; each (corruption, severity) uses ``corruption_seed(seed, name, severity)``.
        scale: as in ``corrupt`` (default ``min(H, W) / 224``).
        batch_size: images corrupted at once.
        on_done: called with (corruption, severity) after each folder is complete.
    """
    from PIL import Image

    from pupil.io import write_json

    out = Path(out)
    names, severities = parse_names(names), parse_severities(severities)
    folders = _class_folders(ds.classes)
    width = len(str(max(len(ds) - 1, 0)))
    for name in names:
        for sev in severities:
            final = out / name / str(sev)
            if final.exists():
                continue
            tmp = out / name / f".{sev}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in folders:
                (tmp / folder).mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(corruption_seed(seed, name, sev))
            for start in range(0, len(ds), batch_size):
                batch = corrupt_uint8(ds.images[start : start + batch_size], name, sev, g, scale)
                for i, img in enumerate(batch.permute(0, 2, 3, 1).numpy()):
                    k = start + i
                    path = tmp / folders[int(ds.targets[k])] / f"{k:0{width}d}.png"
                    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
            tmp.rename(final)
            if on_done:
                on_done(name, sev)
    write_json(
        out / "corruptions.json",
        {
            "corruptions": names,
            "severities": severities,
            "seed": seed,
            "scale": min(ds.images.shape[-2:]) / REFERENCE_SIZE if scale is None else scale,
            "dataset": dict(ds.meta),
            "n": len(ds),
            "classes": dict(zip(ds.classes, folders, strict=True)),
            "reference": "Hendrycks & Dietterich 2019, parameters of imagecorruptions 1.1.2",
        },
    )
    return out


def _class_folders(classes: list[str]) -> list[str]:
    """Folder-safe class names ("T-shirt/top" -> "T-shirt_top"), made unique."""
    seen: set[str] = set()
    folders = []
    for c in classes:
        f = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in str(c)).strip(" .") or "class"
        base, k = f, 1
        while f in seen:
            k += 1
            f = f"{base}_{k}"
        seen.add(f)
        folders.append(f)
    return folders


# ---------------------------------------------------------------------------------------------------------------
# Helpers: random draws, borders, filters


def _device(g: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return g.device if g is not None else like.device


def _rand(shape: tuple[int, ...], g: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=_device(g, like)).to(like.device)


def _randn(shape: tuple[int, ...], g: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=_device(g, like)).to(like.device)


def _uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator | None, like: torch.Tensor):
    return low + (high - low) * _rand(shape, g, like)


def _border_index(n: int, pad: int, mode: str, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis extended by ``pad`` on each side; modes named as in scipy.ndimage:
    ``nearest`` (aaa|abcd|ddd), ``reflect`` (cba|abcd|dcb) and ``mirror`` (dcb|abcd|cba, OpenCV's default)."""
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    period = 2 * n if mode == "reflect" else 2 * n - 2
    i = i % period
    return torch.where(i < n, i, period - 1 - i if mode == "reflect" else period - i)


def _extend(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    """Pad the last two axes of (N, C, H, W) by (ph, pw) with a scipy border mode."""
    h, w = x.shape[-2:]
    if mode == "nearest" or (mode == "mirror" and ph < h and pw < w):  # torch's own pads are faster
        return F.pad(x, (pw, pw, ph, ph), mode="replicate" if mode == "nearest" else "reflect")
    rows, cols = _border_index(h, ph, mode, x.device), _border_index(w, pw, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _gaussian_kernel(sigma: float, truncate: float) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, weights summing to one."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2) if sigma > 0 else (x == 0).double()
    return (k / k.sum()).float()


def _filter(x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor | None = None, mode: str = "nearest") -> torch.Tensor:
    """Correlate every channel of ``x`` (..., H, W) with ``kh`` (2-D kernel, or 1-D along H when ``kw`` is the
    1-D kernel along W), extending the borders with ``mode``."""
    shape = x.shape
    n = math.prod(shape[:-2])
    # One depthwise convolution with the images as channels: far faster on CPU than a batch of 1-channel images.
    y = x.reshape(1, n, *shape[-2:])
    kh = kh.to(x.device, x.dtype)
    if kw is None:
        y = _extend(y, kh.shape[0] // 2, kh.shape[1] // 2, mode)
        return F.conv2d(y, kh.expand(n, 1, *kh.shape), groups=n).view(shape)
    kw = kw.to(x.device, x.dtype)
    y = _extend(y, len(kh) // 2, len(kw) // 2, mode)
    y = F.conv2d(y, kh.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    return F.conv2d(y, kw.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n).view(shape)


def _gaussian(x: torch.Tensor, sigma: float | tuple[float, float], mode: str = "nearest", truncate: float = 4.0):
    """skimage.filters.gaussian over the last two axes (its defaults: mode ``nearest``, truncate 4)."""
    sh, sw = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    return _filter(x, _gaussian_kernel(sh, truncate), _gaussian_kernel(sw, truncate), mode)


def _noise_gain(sigma_ref: tuple[float, float], sigma: tuple[float, float], truncate: float) -> float:
    """How much less a Gaussian filter at ``sigma_ref`` shrinks white noise than one at ``sigma`` (ratio of the
    kernels' L2 norms). Scaling noise by it before filtering at ``sigma`` gives the spread the reference's field
    has at 224 pixels, so a field keeps its statistics when its smoothing length is scaled down."""

    def norm(s: tuple[float, float]) -> float:
        return math.prod(_gaussian_kernel(v, truncate).double().norm().item() for v in s)

    return norm(sigma_ref) / norm(sigma)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W); a grey batch is returned as it is."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """The reference's clipped_zoom: crop the centre 1/zoom and enlarge it by ``zoom`` with scipy's order-1 zoom
    (corner-aligned bilinear, output side ``round(side * zoom)`` >= the input side; callers crop top-left)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    return F.interpolate(crop, size=(round(ch * zoom), round(cw * zoom)), mode="bilinear", align_corners=True)


def _motion_blur(x: torch.Tensor, radius: int, sigma: float, angle: torch.Tensor) -> torch.Tensor:
    """The reference's one-sided motion blur: a sum of ``2 radius + 1`` copies shifted along ``angle`` (degrees,
    one per image) by whole pixels, weighted by a half-Gaussian, borders repeated; it stops at the first copy
    shifted past the image, as the reference does."""
    b, c, h, w = x.shape
    width = 2 * radius + 1
    i = torch.arange(width, dtype=torch.float64)
    k = torch.exp(-(i**2) / (2 * sigma**2))
    k = k / k.sum()
    rad = torch.deg2rad(angle.double().cpu())
    dy = -torch.ceil(i[:, None] * torch.sin(rad) - 0.5).long()  # (width, B)
    dx = -torch.ceil(i[:, None] * torch.cos(rad) - 0.5).long()
    live = ((dy.abs() < h) & (dx.abs() < w)).long().cummin(0).values
    weight = k[:, None] * live  # (width, B)
    if c * h * w <= 4096:  # small images: one gather per copy for the whole batch
        ys, xs = torch.arange(h), torch.arange(w)
        flat = x.flatten(2)  # (B, C, HW)
        out = torch.zeros_like(flat)
        for t in range(width):
            if not live[t].any():
                break
            rows = (ys - dy[t][:, None]).clamp(0, h - 1)  # (B, H)
            cols = (xs - dx[t][:, None]).clamp(0, w - 1)  # (B, W)
            src = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w).to(x.device)
            out.addcmul_(weight[t].view(b, 1, 1).to(x.device, x.dtype), flat.gather(2, src))
        return out.view(b, c, h, w)
    # large images: pad once, then every copy of every image is a slice of contiguous rows
    r = int(max(dy.abs().max(), dx.abs().max()))
    pad = F.pad(x, (r, r, r, r), mode="replicate")
    dy, dx, weight = (r - dy).tolist(), (r - dx).tolist(), weight.tolist()
    out = torch.zeros_like(x)
    for i in range(b):
        for t in range(width):
            if weight[t][i]:
                out[i].add_(pad[i, :, dy[t][i] : dy[t][i] + h, dx[t][i] : dx[t][i] + w], alpha=weight[t][i])
    return out


def _plasma(b: int, size: int, decay: float, g: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Diamond-square fractal (B, size, size) in [0, 1], the reference's plasma_fractal for a batch (including its
    noise amplitude of wibble squared). ``size`` is a power of two."""
    dev = _device(g, like)
    a = torch.zeros(b, size, size, device=dev)
    step, wibble = size, 100.0

    def wibbled(t: torch.Tensor) -> torch.Tensor:
        return t / 4 + wibble * (2 * torch.rand(t.shape, generator=g, device=dev) - 1) * wibble

    while step >= 2:
        half = step // 2
        corner = a[:, 0::step, 0::step]  # squares: centre = mean of four corners
        sq = corner + corner.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        a[:, half::step, half::step] = wibbled(sq)
        centre, corner = a[:, half::step, half::step], a[:, 0::step, 0::step]  # diamonds
        a[:, 0::step, half::step] = wibbled(centre + centre.roll(1, 1) + corner + corner.roll(-1, 2))
        a[:, half::step, 0::step] = wibbled(centre + centre.roll(1, 2) + corner + corner.roll(-1, 1))
        step, wibble = half, wibble / decay
    a -= a.amin((1, 2), keepdim=True)
    a /= a.amax((1, 2), keepdim=True)
    return a.to(like.device)


def _next_pow2(n: int) -> int:
    return 1 << (max(n, 2) - 1).bit_length()


def _standardise(t: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation per image of (B, 1, H, W)."""
    t = t - t.mean((1, 2, 3), keepdim=True)
    return t / t.std((1, 2, 3), keepdim=True).clamp_min(1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Noise


def gaussian_noise(x: torch.Tensor, c: float, s: float, g: torch.Generator | None) -> torch.Tensor:
    return x + c * _randn(x.shape, g, x)


def shot_noise(x: torch.Tensor, c: float, s: float, g: torch.Generator | None) -> torch.Tensor:
    rate = (x * c).to(_device(g, x))
    return torch.poisson(rate, generator=g).to(x.device) / c


def impulse_noise(x: torch.Tensor, c: float, s: float, g: torch.Generator | None) -> torch.Tensor:
    # skimage random_noise(mode="s&p"): each value (every channel separately) flips with probability c, to 0 or 1
    # with equal odds; one uniform draw decides both (u < c/2: 0, c/2 <= u < c: 1).
    u = _rand(x.shape, g, x)
    return torch.where(u < c, (u >= c / 2).to(x.dtype), x)


def speckle_noise(x: torch.Tensor, c: float, s: float, g: torch.Generator | None) -> torch.Tensor:
    return x + x * c * _randn(x.shape, g, x)


# ---------------------------------------------------------------------------------------------------------------
# Blur


def gaussian_blur(x: torch.Tensor, c: float, s: float, g: torch.Generator | None) -> torch.Tensor:
    return _gaussian(x, c * s)


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """A normalised disk kernel anti-aliased by a small Gaussian, as the reference's ``disk``. Weights are the
    fraction of each pixel inside the circle (8x8 sub-samples), so fractional radii from ``scale`` still blur."""
    ksize = 3 if radius <= 8 else 5  # the reference's anti-alias kernel size
    half = math.ceil(radius) + ksize // 2
    ss = 8
    u = (torch.arange((2 * half + 1) * ss, dtype=torch.float64) + 0.5) / ss - half - 0.5
    inside = (u[:, None] ** 2 + u[None, :] ** 2 <= radius**2).double()
    k = inside.view(2 * half + 1, ss, 2 * half + 1, ss).mean((1, 3))
    k /= k.sum()
    # cv2.getGaussianKernel(ksize, alias_blur), applied with zero borders (the disk never reaches them).
    t = torch.arange(ksize, dtype=torch.float64) - ksize // 2
    gk = torch.exp(-(t**2) / (2 * alias_blur**2))
    gk /= gk.sum()
    k = F.conv2d(k[None, None], (gk[:, None] * gk[None, :])[None, None], padding=ksize // 2)[0, 0]
    return k.float()


def defocus_blur(x: torch.Tensor, c: tuple, s: float, g: torch.Generator | None) -> torch.Tensor:
    radius, alias_blur = c
    return _filter(x, _disk(radius * s, alias_blur), mode="mirror")  # cv2.filter2D borders


def _glass_shuffle(x: torch.Tensor, delta: int, sweeps: int, move: float, g: torch.Generator | None) -> torch.Tensor:
    """The reference glass blur's local pixel shuffle, exactly, for the whole batch at once.

    The reference sweeps the interior (a ``delta`` border left out) from bottom-right to top-left and, for each
    pixel, runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with (h', w') at a random offset in [-delta, delta)^2.
    On an RGB array the right-hand side holds views, so this copies rather than swaps: the pixel takes the current
    value at (h', w'), which is that position's new value if the sweep has already passed it and the original
    otherwise. Values therefore travel in chains through already-visited pixels. Each pixel points at its
    neighbour while that neighbour was visited earlier; pointer jumping (``f = f[f]``, log of the chain length
    steps) finds the end of every chain in parallel, whose neighbour is the original pixel the value comes from.
    ``move`` < 1 lets only that fraction of the visited pixels take a neighbour's value (for sub-pixel scales).
    """
    b, c, h, w = x.shape
    n = h * w
    dev = x.device
    pos = torch.arange(n, device=dev)
    ys, xs = pos // w, pos % w
    visited = (ys > delta) & (ys <= h - delta) & (xs > delta) & (xs <= w - delta)  # (HW,)
    src = pos.expand(b, n)  # (B, HW): original pixel that each position shows, composed over sweeps
    for _ in range(sweeps):
        dy, dx = _glass_offsets(b, n, delta, g, x)
        moves = visited
        if move < 1:
            moves = visited & (torch.rand((b, n), generator=g, device=_device(g, x)).to(dev) < move)
        target = torch.where(moves, pos + dy * w + dx, pos)  # (B, HW)
        # visited before this pixel = later in raster order (the sweep runs backwards)
        follow = moves & visited[target] & (target > pos)
        f = torch.where(follow, target, pos)
        while True:
            f2 = f.gather(1, f)
            if torch.equal(f2, f):
                break
            f = f2
        src = src.gather(1, target.gather(1, f))
    return x.flatten(2).gather(2, src[:, None, :].expand(b, c, n)).view(b, c, h, w)


def _glass_offsets(b: int, n: int, delta: int, g: torch.Generator | None, like: torch.Tensor):
    """Random offsets (dy, dx), each (B, HW) and uniform on [-delta, delta), from one integer draw per pixel."""
    v = torch.randint(0, 4 * delta * delta, (b, n), generator=g, device=_device(g, like)).to(like.device)
    return v // (2 * delta) - delta, v % (2 * delta) - delta


def glass_blur(x: torch.Tensor, c: tuple, s: float, g: torch.Generator | None) -> torch.Tensor:
    """Blur, shuffle pixels locally (``_glass_shuffle``), blur again. Scaled, the shuffle distance is
    ``round(delta * s)`` pixels, at least one; below one pixel only a fraction ``delta * s`` of the pixels move."""
    sigma, delta, sweeps = c
    d = max(1, int(delta * s + 0.5))
    x = torch.floor(_gaussian(x, sigma * s) * 255) / 255  # the reference converts to uint8 here
    return _gaussian(_glass_shuffle(x, d, sweeps, min(1.0, delta * s), g), sigma * s)


def motion_blur(x: torch.Tensor, c: tuple, s: float, g: torch.Generator | None) -> torch.Tensor:
    radius, sigma = c
    angle = _uniform((x.shape[0],), -45, 45, g, x)
    return _motion_blur(x, math.ceil(radius * s), sigma * s, angle)


def zoom_blur(x: torch.Tensor, c: tuple, s: float, g: torch.Generator | None) -> torch.Tensor:
    h, w = x.shape[-2:]
    zooms = np.arange(*c)  # the reference's float sequence, bit for bit
    out = x.clone()
    for z in zooms:
        out += _clipped_zoom(x, float(z))[..., :h, :w]
    return out / (len(zooms) + 1)


# ---------------------------------------------------------------------------------------------------------------
# Weather


def snow(x: torch.Tensor, c: tuple, s: float, g: torch.Generator | None) -> torch.Tensor:
    loc, scale, zoom, threshold, radius, sigma, blend = c
    b, _, h, w = x.shape
    layer = loc + scale * _randn((b, 1, h, w), g, x)
    layer = _clipped_zoom(layer, max(1.0, zoom * s))  # flakes of `zoom` pixels, never below one
    layer = torch.where(layer < threshold, 0, layer).clamp(0, 1)
    layer = _motion_blur(layer, math.ceil(radius * s), sigma * s, _uniform((b,), -135, -45, g, x))
    layer = (layer * 255).round()[..., :h, :w] / 255
    x = blend * x + (1 - blend) * torch.maximum(x, _luma(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-2, -1)


def _frost_texture(b: int, h: int, w: int, s: float, g: torch.Generator | None, like: torch.Tensor):
    """Procedural frost (B, 1, H, W), zero mean and unit spread per texture: a soft haze (three octaves of smooth
    noise, the coarsest with 128 s pixel cells) plus bright ice needles (sparse seeds drawn out by one-sided motion
    blur in three directions ~60 degrees apart, 12 s pixels long). Grain sizes scale with ``s`` as the
    reference's photographs do, which it crops at their own resolution."""
    haze = torch.zeros(b, 1, h, w, device=like.device)
    for octave in range(3):
        cell = max(1.0, 128 * s / 2**octave)
        grid = _randn((b, 1, math.ceil(h / cell) + 1, math.ceil(w / cell) + 1), g, like)
        haze += 0.5**octave * F.interpolate(grid, scale_factor=cell, mode="bilinear")[..., :h, :w]
    length = max(1, math.ceil(12 * s))
    density = min(0.3, 0.02 / s**2)
    needles = torch.zeros(b, 1, h, w, device=like.device)
    base = _uniform((b,), 0, 360, g, like)
    for k in range(3):
        seeds = (_rand((b, 1, h, w), g, like) < density).float() * _rand((b, 1, h, w), g, like)
        angle = base + 60 * k + _uniform((b,), -20, 20, g, like)
        needles += _motion_blur(seeds, length, length / 2, angle)
    return _standardise(0.6 * _standardise(haze) + 0.8 * _standardise(needles))


@functools.lru_cache(maxsize=8)
def _frost_bank(size: int, s: float) -> torch.Tensor:
    """Five square frost textures (5, size, size), drawn once from a fixed seed: the counterpart of the five
    photographs the reference ships and crops at random (a memo of a pure function of its arguments)."""
    return _frost_texture(5, size, size, s, torch.Generator().manual_seed(2019), torch.empty(0))[:, 0]


def frost(x: torch.Tensor, c: tuple, s: float, g: torch.Generator | None) -> torch.Tensor:
    """Frost over the image, ``c0 x + c1 F``, as the reference: F is a random crop of one of five textures,
    coloured like the reference's photo of that number (``FROST_PHOTOS``). The reference's textures are
    photographs that ship with it; ours are procedural (``_frost_texture``), fixed like files."""
    image_weight, frost_weight = c
    b, ch, h, w = x.shape
    bank = _frost_bank(max(h, w) + round(256 * s), s).to(x.device)  # crops start anywhere in 256 s pixels
    dev = _device(g, x)
    pick = torch.randint(0, len(FROST_PHOTOS), (b,), generator=g, device=dev).to(x.device)
    y0 = torch.randint(0, bank.shape[1] - h + 1, (b, 1), generator=g, device=dev).to(x.device)
    x0 = torch.randint(0, bank.shape[2] - w + 1, (b, 1), generator=g, device=dev).to(x.device)
    rows = y0 + torch.arange(h, device=x.device)  # (B, H)
    cols = x0 + torch.arange(w, device=x.device)  # (B, W)
    texture = bank[pick[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]  # (B, 1, H, W)
    photos = torch.tensor(FROST_PHOTOS, device=x.device)[pick]  # (B, 2, 3): mean, spread per channel
    mean, std = photos[:, 0, :, None, None], photos[:, 1, :, None, None]
    if ch == 1:
        mean, std = _luma(mean), _luma(std)
    return image_weight * x + frost_weight * (mean + std * texture).clamp(0, 1)


def fog(x: torch.Tensor, c: tuple, s: float, g: torch.Generator | None) -> torch.Tensor:
    strength, decay = c
    b, _, h, w = x.shape
    size = _next_pow2(max(h, w))
    top = x.amax((1, 2, 3), keepdim=True)
    x = x + strength * _plasma(b, size, decay, g, x)[:, None, :h, :w]
    return x * top / (top + strength)


# ---------------------------------------------------------------------------------------------------------------
# Digital


def brightness(x: torch.Tensor, c: float, s: float, g: torch.Generator | None) -> torch.Tensor:
    # HSV value + c with hue and saturation kept: RGB scales by V'/V; black (V = 0, S = 0) becomes grey V'.
    v = x.amax(1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v2 / v.clamp_min(1e-12), v2)


def contrast(x: torch.Tensor, c: float, s: float, g: torch.Generator | None) -> torch.Tensor:
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * c + mean


def saturate(x: torch.Tensor, c: tuple, s: float, g: torch.Generator | None) -> torch.Tensor:
    """HSV saturation S -> clip(a S + b) with hue and value kept. Each channel sits at V - S V g(hue), so it moves
    to V - (S'/S)(V - x). A grey pixel has hue 0 (red) in skimage, so b > 0 tints it red as in the reference.
    Grey images are returned unchanged (the reference's grey path keeps the red channel, which is the value)."""
    if x.shape[1] == 1:
        return x.clone()
    a, b = c
    v = x.amax(1, keepdim=True)
    chroma = v - x.amin(1, keepdim=True)
    sat = torch.where(v > 0, chroma / v.clamp_min(1e-12), 0)
    sat2 = (sat * a + b).clamp(0, 1)
    coloured = v - (sat2 / sat.clamp_min(1e-12)) * (v - x)
    red = torch.cat([v, v * (1 - sat2), v * (1 - sat2)], 1)  # hue 0
    return torch.where(chroma > 0, coloured, red)


def jpeg_compression(x: torch.Tensor, c: int, s: float, g: torch.Generator | None) -> torch.Tensor:
    """Encode and decode at quality ``c`` with libjpeg as the reference does through PIL (4:2:0 chroma). We call
    torchvision's libjpeg bindings, which give the same bytes as PIL for the same image (tested) at a quarter of
    the cost, and fall back to PIL where they are missing (torchvision deprecated them in 0.29). Grey images become
    greyscale JPEGs, which is what the reference's convert-to-RGB-and-back amounts to."""
    u8 = (x * 255).round().to(torch.uint8).cpu()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import decode_jpeg, encode_jpeg

            out = torch.stack(decode_jpeg(encode_jpeg(list(u8), quality=int(c))))
    except (ImportError, AttributeError, RuntimeError):
        out = torch.stack([_jpeg(img, int(c)) for img in u8])
    return out.to(x.device, x.dtype) / 255


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """One uint8 (C, H, W) image through PIL's JPEG encoder and decoder."""
    import io

    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "JPEG", quality=quality)
    return torch.from_numpy(np.asarray(Image.open(buf)).reshape(arr.shape).copy()).permute(2, 0, 1)


def _box_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of PIL's BOX downsampling (Resample.c precompute_coeffs with box_filter): output i
    averages the inputs j in [int(c - support + 0.5), int(c + support + 0.5)) whose (j - c + 0.5) / scale falls in
    (-0.5, 0.5], with c = (i + 0.5) * scale."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    lo = torch.floor(centre - support + 0.5).clamp(min=0)
    hi = torch.floor(centre + support + 0.5).clamp(max=n_in)
    j = torch.arange(n_in, dtype=torch.float64)
    u = (j[None, :] - centre[:, None] + 0.5) / max(scale, 1.0)
    m = ((u > -0.5) & (u <= 0.5) & (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])).double()
    return (m / m.sum(1, keepdim=True)).float()


def pixelate(x: torch.Tensor, c: float, s: float, g: torch.Generator | None) -> torch.Tensor:
    # PIL: resize down by c with BOX, back up with NEAREST (source pixel floor((i + 0.5) * in / out)).
    h, w = x.shape[-2:]
    sh, sw = max(1, int(h * c)), max(1, int(w * c))
    small = _box_weights(h, sh).to(x.device) @ x @ _box_weights(w, sw).to(x.device).T
    rows = ((torch.arange(h) + 0.5) * sh / h).long().to(x.device)
    cols = ((torch.arange(w) + 0.5) * sw / w).long().to(x.device)
    return small.index_select(-2, rows).index_select(-1, cols)


def elastic_transform(x: torch.Tensor, c: float, s: float, g: torch.Generator | None) -> torch.Tensor:
    """Resample at a smooth random displacement: uniform noise of amplitude 0.005 H, Gaussian-smoothed with sigma
    0.01 of each side (reflect borders, truncate 3), times alpha; bilinear with reflected borders (scipy
    map_coordinates order 1). Scaled, the smoothing stays 0.01 of the side but the noise is rescaled so that the
    displacement, in units of the image, has the spread the reference gives a 224-pixel image."""
    b, _, h, w = x.shape
    sigma = (0.01 * h, 0.01 * w)
    gain = _noise_gain((0.01 * h / s, 0.01 * w / s), sigma, 3.0)
    amp = 0.005 * h
    field = _uniform((b, 2, h, w), -amp, amp, g, x)
    dy, dx = (_gaussian(field, sigma, mode="reflect", truncate=3.0) * c * gain).unbind(1)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    # grid_sample with align_corners=False and reflection padding reflects about the pixel edges, as scipy's
    # "reflect" mode does.
    gy = (2 * (ys + dy) + 1) / h - 1
    gx = (2 * (xs + dx) + 1) / w - 1
    grid = torch.stack([gx, gy], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _canny(img: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """OpenCV's Canny edges (cv2.Canny, aperture 3, L1 gradient) of uint8-valued (B, H, W) floats: Sobel with
    repeated borders, non-maximum suppression in four directions with OpenCV's tie-breaking and its integer
    tangent test, then hysteresis (8-connected growth from pixels above ``high`` through pixels above ``low``)."""
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gx = _filter(img, sobel, mode="nearest").int()  # exact: small integer sums
    gy = _filter(img, sobel.T.contiguous(), mode="nearest").int()
    mag = gx.abs() + gy.abs()
    m = F.pad(mag, (1, 1, 1, 1))  # zeros beyond the image, as OpenCV's magnitude buffer

    def at(dy: int, dx: int) -> torch.Tensor:
        return m[:, 1 + dy : m.shape[1] - 1 + dy, 1 + dx : m.shape[2] - 1 + dx]

    ax, ay = gx.abs(), gy.abs() << 15  # |g| <= 1020 * 2, so all of this fits in int32
    tg22 = ax * 13573  # round(tan(22.5 deg) * 2^15)
    tg67 = tg22 + (ax << 16)
    same = (gx ^ gy) >= 0
    horizontal = (mag > at(0, -1)) & (mag >= at(0, 1))
    vertical = (mag > at(-1, 0)) & (mag >= at(1, 0))
    diagonal = torch.where(same, (mag > at(-1, -1)) & (mag > at(1, 1)), (mag > at(-1, 1)) & (mag > at(1, -1)))
    peak = torch.where(ay < tg22, horizontal, torch.where(ay > tg67, vertical, diagonal))
    weak = peak & (mag > low)
    edge = weak & (mag > high)
    while True:
        grown = weak & (F.max_pool2d(edge.float()[:, None], 3, 1, 1)[:, 0] > 0)
        if torch.equal(grown, edge):
            return edge
        edge = grown


def _chamfer_distance(edge: torch.Tensor, cap: float) -> torch.Tensor:
    """cv2.distanceTransform(DIST_L2, mask 5) to the nearest True of ``edge`` (B, H, W), capped at ``cap``: the
    5x5 chamfer metric (steps a = 1, b = 1.4 and c = 2.1969 for straight, diagonal and knight moves) by OpenCV's two
    raster passes, one row at a time for the whole batch. Within a row the chain along it, d_j = min(v_j,
    d_{j-1} + 1), is j + cummin(v_k - k), so each row is a handful of tensor operations."""
    h, w = edge.shape[-2:]
    a, b, c = 1.0, 1.4, 2.1969
    big = float(cap) + 10
    d = F.pad(torch.where(edge, 0.0, big), (2, 2), value=big)  # (B, H, W + 4): two columns of "far" each side
    j = torch.arange(w, device=edge.device, dtype=d.dtype)
    for order in (range(h), range(h - 1, -1, -1)):
        step = 1 if order.step == 1 else -1  # rows already done lie at i - step and i - 2 step
        for i in order:
            v = d[:, i, 2 : 2 + w]
            if 0 <= i - step < h:
                prev = d[:, i - step]
                v = torch.minimum(v, prev[:, 2 : 2 + w] + a)
                v = torch.minimum(v, torch.minimum(prev[:, 1 : 1 + w], prev[:, 3 : 3 + w]) + b)
                v = torch.minimum(v, torch.minimum(prev[:, :w], prev[:, 4 : 4 + w]) + c)
            if 0 <= i - 2 * step < h:
                prev2 = d[:, i - 2 * step]
                v = torch.minimum(v, torch.minimum(prev2[:, 1 : 1 + w], prev2[:, 3 : 3 + w]) + c)
            if step == 1:  # left to right: d_j = min over k <= j of v_k + (j - k)
                v = (v - j).cummin(1).values + j
            else:  # right to left: d_j = min over k >= j of v_k + (k - j)
                v = (v + j).flip(1).cummin(1).values.flip(1) - j
            d[:, i, 2 : 2 + w] = v
    return d[..., 2 : 2 + w].clamp(max=cap)


def _equalize(img: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist per image of uint8-valued (B, H, W) floats."""
    b = img.shape[0]
    v = img.long().flatten(1)
    hist = torch.zeros(b, 256, dtype=torch.long, device=img.device).scatter_add_(1, v, torch.ones_like(v))
    first = hist.gt(0).long().argmax(1, keepdim=True)
    lowest = hist.gather(1, first)
    total = v.shape[1]
    cdf = hist.cumsum(1)
    lut = ((cdf - lowest).double() * 255 / (total - lowest).clamp_min(1).double()).round().clamp(0, 255)
    lut = torch.where(lowest == total, first.double(), lut)  # a flat image stays as it is
    return lut.gather(1, v).view_as(img).float()


def _water_shading(liquid: torch.Tensor, s: float) -> torch.Tensor:
    """The reference's OpenCV chain that turns the thresholded liquid layer (B, H, W) into drop intensities in
    [0, 1], step for step in torch: Canny edges, chamfer distance to them capped at 20 px (scaled), 3x3 box blur,
    histogram equalisation, an emboss kernel, another box blur, times the layer, over its maximum."""
    liquid8 = (liquid * 255).clamp(0, 255).floor()  # astype(np.uint8)
    edge = _canny(liquid8, 50, 150)
    dist = _chamfer_distance(edge, max(1.0, 20 * s))
    ones = torch.ones(3, 3)
    ninth = torch.tensor(1 / 9, dtype=torch.float32)  # cv2.blur sums, then scales (1/9 in float, as here)
    dist = (_filter(dist, ones, mode="mirror") * ninth).floor()  # then astype(np.uint8)
    dist = _equalize(dist)
    emboss = torch.tensor([[-2.0, -1, 0], [-1, 1, 1], [0, 1, 2]])
    dist = _filter(dist, emboss, mode="mirror").round().clamp(0, 255)  # filter2D to CV_8U saturates
    dist = (_filter(dist, ones, mode="mirror") / 9).round()  # cv2.blur on uint8 rounds
    m = liquid8 * dist
    return m / m.amax((1, 2), keepdim=True).clamp_min(1e-12)


def spatter(x: torch.Tensor, c: tuple, s: float, g: torch.Generator | None) -> torch.Tensor:
    """Water drops (severities 1-3: pale turquoise, shaded by ``_water_shading``) or mud (4-5: brown where the
    smoothed drop mask exceeds 0.8) from a thresholded, smoothed noise layer."""
    loc, scale, sigma, threshold, strength, mud = c
    b, ch, h, w = x.shape
    gain = _noise_gain((sigma, sigma), (sigma * s, sigma * s), 4.0)
    liquid = loc + scale * gain * _gaussian(_randn((b, 1, h, w), g, x), sigma * s)[:, 0]  # (B, H, W)
    liquid = torch.where(liquid < threshold, 0, liquid)
    if mud:
        m = _gaussian((liquid > threshold).float()[:, None], strength * s)
        m = torch.where(m < 0.8, 0, m)
        brown = torch.tensor([63, 42, 20], device=x.device, dtype=x.dtype).view(1, 3, 1, 1) / 255
        return x * (1 - m) + m * _luma(brown) if ch == 1 else x * (1 - m) + m * brown
    m = _water_shading(liquid, s)[:, None] * strength
    water = torch.tensor([175, 238, 238], device=x.device, dtype=x.dtype).view(1, 3, 1, 1) / 255
    layer = (m * water).clamp(0, 1)
    return x + _luma(layer) if ch == 1 else x + layer


_FUNCS: dict[str, Callable[[torch.Tensor, Any, float, torch.Generator | None], torch.Tensor]] = {
    name: globals()[name] for name in CORRUPTIONS
}
