"""Decoding the user's image files: every conversion is exact and counted, every failure is named.

``read_images`` turns a list of files into one uint8 tensor ``(N, C, H, W)``. It first reads only the
headers (mode and size, no pixels) to choose the common mode and size, then decodes one file at a time
straight to that size, so memory grows with the number of images, not with their resolution: JPEGs are
decoded at a reduced scale (``Image.draft``) and large images are shrunk with ``reducing_gap``.

Bit depth is rescaled, never clipped: PIL's ``convert("L")`` clips a 16-bit image at 255, which turns
it into a white silhouette. Here a 16-bit value ``v`` becomes ``round(v * 255 / 65535)``; 32-bit
integer images are read as 16-bit when their values fit in 0..65535 (how 16-bit files decode) and as
8-bit when they fit in 0..255, else stretched from their minimum to their maximum; float images in
[0, 1] are scaled by 255, others stretched from minimum to maximum. Each of these, a dropped alpha
channel, a mode change, an EXIF rotation and a resize is counted in ``conversions``.

With a ``Fit`` the images get the standard ImageNet evaluation preprocessing that models trained
elsewhere (timm, torchvision) expect instead of a square resize: the shorter side is resized to
``fit.resize`` keeping the aspect ratio, then the centre ``fit.crop`` square is cut out, with the same
arithmetic and the same PIL call as torchvision's ``Resize(int)`` and ``CenterCrop`` on PIL images.
``fit_tensor`` does the same to images already held as a uint8 tensor.

A file that cannot be used (missing, empty, not an image, truncated, over PIL's decompression-bomb
limit, non-finite pixels) is a ``BadImage``. With ``on_bad="fail"`` all of them are reported at once in
one error; with ``on_bad="skip"`` they are left out and returned, so the caller can write them down.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pupil.errors import PupilError

ON_BAD = ("fail", "skip")
CONVERSIONS = (
    "converted_mode",
    "resized",
    "rescaled_16bit",
    "rescaled_32bit",
    "rescaled_float",
    "alpha_dropped",
    "exif_rotated",
    "cropped",
    "upsampled",
    "grey_to_rgb",
    "rgb_to_grey",
)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
GREY_MODES = ("1", "L", "LA", "La", "I", "F", *SIXTEEN_BIT)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
MAX_LISTED = 50  # bad files named in one error message
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # torchvision.transforms.InterpolationMode values


@dataclass(frozen=True)
class Fit:
    """Resize the shorter side, keeping the aspect ratio, then centre-crop a square (ImageNet evaluation)."""

    resize: int
    """Length of the shorter side after resizing, in pixels (256 for most ImageNet models)."""
    crop: int
    """Side of the square cut from the centre of the resized image (224 for most ImageNet models)."""
    interpolation: str = "bilinear"
    """One of nearest, bilinear, bicubic (timm's models state theirs in their pretrained config)."""

    def __post_init__(self):
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PupilError(f"the {name} size must be a positive whole number of pixels, not {v!r}")
        if self.crop > self.resize:
            raise PupilError(f"the crop ({self.crop}) cannot be larger than the resized shorter side ({self.resize})")
        if self.interpolation not in INTERPOLATIONS:
            raise PupilError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """``(width, height)`` after the resize; the longer side is truncated as in torchvision's
        ``_compute_resized_output_size``."""
        short, long = min(w, h), max(w, h)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if w <= h else (new_long, self.resize)

    def crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        """PIL's ``(left, top, right, bottom)`` of the centre crop of a ``w`` x ``h`` image, rounded as in
        torchvision's ``_center_crop_compute_crop_anchor``."""
        top, left = round((h - self.crop) / 2.0), round((w - self.crop) / 2.0)  # half to even, as there
        return left, top, left + self.crop, top + self.crop

    def count(self, w: int, h: int, conv: dict[str, int], n: int = 1) -> None:
        """Count in ``conv`` what fitting ``n`` images of ``w`` x ``h`` does to them."""
        resized = self.resized_size(w, h)
        conv["resized"] += n * (resized != (w, h))
        conv["upsampled"] += n * (min(w, h) < self.resize)
        conv["cropped"] += n * (resized != (self.crop, self.crop))


@dataclass
class BadImage:
    path: str
    reason: str


@dataclass
class Decoded:
    """What ``read_images`` returns: the images, what was converted, what was left out."""

    images: torch.Tensor
    conversions: dict[str, int]
    bad: list[BadImage] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    """Indices (into the given paths) of the images that were decoded, in order."""


class _Bad(Exception):
    """One file's problem, turned into a BadImage by read_images."""


def read_images(
    paths: list[Path],
    img_size: int | None = None,
    mode: str | None = None,
    on_bad: str = "fail",
    hint: str = "",
    fit: Fit | None = None,
    max_bytes: int | None = None,
) -> Decoded:
    """Decode image files into one uint8 tensor, converting mixed modes and sizes to the majority (or to
    ``mode`` and ``img_size``, or resized and cropped by ``fit``). Raises PupilError naming every bad file
    (followed by ``hint``) unless ``on_bad`` is ``skip``.

    When the decoded images would take more than ``max_bytes``, they are not decoded now: ``images`` is a
    ``LazyImages`` over the files, and the conversions are counted from the headers. Under ``skip`` every file
    is decoded once (in worker processes, nothing kept) so that a file that fails mid-stream is left out now.
    """
    if on_bad not in ON_BAD:
        raise PupilError(f"--on-bad-image must be one of {', '.join(ON_BAD)}, not {on_bad!r}")
    if img_size and fit:
        raise PupilError("give either an image size or a resize-and-crop fit, not both")
    heads, bad = [], []
    for i, p in enumerate(paths):
        try:
            heads.append((i, *_probe(Path(p))))
        except _Bad as e:
            bad.append(BadImage(str(p), str(e)))
    small = [hd for hd in heads if min(hd[2]) < fit.crop] if fit else []
    if small and len(small) < len(heads):
        # A folder that mixes in images smaller than the crop: those would be blown up while the rest shrink, so
        # they are refused (or skipped) like bad files. A folder of small images only is upsampled, and counted.
        bad += [
            BadImage(str(paths[i]), f"{w}x{h} is smaller than the model's {fit.crop}-px crop")
            for i, _, (w, h), _ in small
        ]
        heads = [hd for hd in heads if min(hd[2]) >= fit.crop]
    if bad and on_bad == "fail":
        raise_bad(bad, len(paths), hint)
    if not heads:
        raise PupilError(f"none of the {len(paths)} image files could be read: {bad[0].path}: {bad[0].reason}")
    mode = mode or Counter("L" if m in GREY_MODES else "RGB" for _, m, *_ in heads).most_common(1)[0][0]
    size = (img_size, img_size) if img_size else Counter(s for _, _, s, _ in heads).most_common(1)[0][0]
    c, (w, h) = (1 if mode == "L" else 3), ((fit.crop, fit.crop) if fit else size)
    if max_bytes is not None and len(heads) * c * h * w > max_bytes:
        if c * h * w > max_bytes:
            raise PupilError(f"--max-memory {max_bytes:,} bytes is less than one {c}x{h}x{w} image")
        if on_bad == "skip":
            heads, late = _verify(paths, heads, mode, size, fit)
            bad += late
            if not heads:
                raise PupilError(f"none of the {len(paths)} image files could be read: {bad[0].path}: {bad[0].reason}")
        kept = [i for i, *_ in heads]
        lazy = LazyImages([str(paths[i]) for i in kept], mode, size, fit)
        return Decoded(lazy, _header_conversions(heads, mode, size, fit), bad, kept)
    conv = dict.fromkeys(CONVERSIONS, 0)
    arrays, kept = [], []
    for i, *_ in heads:
        try:
            arrays.append(_decode(Path(paths[i]), mode, size, conv, fit))
            kept.append(i)
        except _Bad as e:
            bad.append(BadImage(str(paths[i]), str(e)))
    if bad and on_bad == "fail":
        raise_bad(bad, len(paths), hint)
    if not arrays:
        raise PupilError(f"none of the {len(paths)} image files could be read: {bad[0].path}: {bad[0].reason}")
    return Decoded(torch.from_numpy(np.stack(arrays)), conv, bad, kept)


def raise_bad(bad: list[BadImage], total: int, hint: str = "") -> None:
    """One error that lists every bad file (up to MAX_LISTED), with ``hint`` on how to go on without them."""
    if len(bad) == 1:
        raise PupilError(f"cannot use image {bad[0].path}: {bad[0].reason}{hint}")
    lines = [f"{len(bad)} of {total} image files cannot be used{hint}:"]
    lines += [f"  {b.path}: {b.reason}" for b in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    raise PupilError("\n".join(lines))


def _open(path: Path):
    """Open lazily (header only), with PIL's decompression-bomb warning raised as an error."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise _Bad("missing file")
    if path.stat().st_size == 0:
        raise _Bad("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Bad(f"over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise _Bad("not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise _Bad(f"unreadable ({e})") from None


def _probe(path: Path) -> tuple[str, tuple[int, int], Head]:
    """The mode and (width, height) as the header states them, after any EXIF rotation, and what else the header
    says that decoding will change."""
    with _open(path) as im:
        w, h = im.size
        orientation = _exif_orientation(im)
        if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: width and height swap
            w, h = h, w
        return im.mode, (w, h), Head(orientation != 1, im.mode == "P" and "transparency" in im.info)


@dataclass(frozen=True)
class Head:
    rotated: bool
    palette_alpha: bool


def _header_conversions(heads: list, mode: str, size: tuple[int, int], fit: Fit | None) -> dict[str, int]:
    """The conversions ``_decode`` counts, from the headers alone (for a streamed set, whose images are decoded
    later and in worker processes): the same rules, in the same order."""
    conv = dict.fromkeys(CONVERSIONS, 0)
    for _, m, (w, h), head in heads:
        conv["exif_rotated"] += head.rotated
        if m in SIXTEEN_BIT:
            conv["rescaled_16bit"] += 1
        elif m in ("I", "F"):
            conv["rescaled_32bit" if m == "I" else "rescaled_float"] += 1
        m = "L" if m in (*SIXTEEN_BIT, "I", "F") else m
        if m in ALPHA_MODES or head.palette_alpha:
            conv["alpha_dropped"] += 1
            m = "RGBA" if m == "P" else m
        conv["converted_mode"] += m != mode
        if fit:
            fit.count(w, h, conv)
        else:
            conv["resized"] += (w, h) != size
    return conv


def _exif_orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make the image unreadable
        return 1


def _decode(path: Path, mode: str, size: tuple[int, int], conv: dict[str, int], fit: Fit | None = None) -> np.ndarray:
    """Decode one file to ``mode`` at ``size`` (or as ``fit`` says): (C, H, W) uint8, counting each conversion
    in ``conv``."""
    from PIL import Image, ImageOps

    with _open(path) as im:
        try:
            w, h = im.size
            rotated = _exif_orientation(im) in (5, 6, 7, 8)
            if rotated:
                w, h = h, w  # the size as viewed
            if fit:
                size = fit.resized_size(w, h)
            if im.format == "JPEG":
                # Decode at the smallest DCT scale that still covers ``size`` (stored, not viewed, orientation
                # under a fit: Image.draft keeps both sides >= the request, so the shorter one stays >= resize).
                source_mode = im.mode
                im.draft(mode, size[::-1] if fit and rotated else size)
                if im.mode != source_mode:  # RGB decoded straight to L
                    conv["converted_mode"] += 1
            im.load()
            if _exif_orientation(im) != 1:
                im = ImageOps.exif_transpose(im)
                conv["exif_rotated"] += 1
            im = _to_8bit(im, conv)
            if im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
                conv["alpha_dropped"] += 1  # PIL's conversions below ignore the alpha channel
                im = im.convert("RGBA") if im.mode == "P" else im
            if im.mode != mode:
                conv["converted_mode"] += 1
                im = im.convert(mode)
            if fit:
                im = _fit(im, fit, size, (w, h), conv)
            elif im.size != size:
                conv["resized"] += 1
                im = im.resize(size, Image.BILINEAR, reducing_gap=3.0)
            elif (w, h) != size:  # the JPEG decoder alone brought it to size
                conv["resized"] += 1
            a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            raise _Bad(f"corrupt or truncated ({e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _fit(im, fit: Fit, size: tuple[int, int], full: tuple[int, int], conv: dict[str, int]):
    """Resize ``im`` (decoded from a ``full``-sized image, perhaps at a reduced JPEG scale) to ``size`` and cut
    out the centre crop. The call is torchvision's ``_resize_image_pil``: ``Image.resize`` without
    ``reducing_gap``, so a file that is not drafted gives exactly torchvision's pixels."""
    from PIL import Image

    fit.count(*full, conv)
    if im.size != size:
        im = im.resize(size, getattr(Image.Resampling, fit.interpolation.upper()))
    return im.crop(fit.crop_box(*size)) if size != (fit.crop, fit.crop) else im


def fit_tensor(x: torch.Tensor, fit: Fit, conv: dict[str, int], chunk: int = 1024) -> torch.Tensor:
    """Resize and centre-crop uint8 images ``(N, C, H, W)`` with torchvision's tensor kernels (antialiased),
    ``chunk`` images at a time to bound the float copies; counts go in ``conv``."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = x.shape[-2:]
    fit.count(w, h, conv, len(x))
    mode = InterpolationMode(fit.interpolation)
    parts = [F.center_crop(F.resize(c, [fit.resize], mode, antialias=True), [fit.crop]) for c in x.split(chunk)]
    return torch.cat(parts)  # split always gives at least one (perhaps empty) chunk


def convert_channels(x: torch.Tensor, channels: int, conv: dict[str, int]) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` to 1 or 3 channels: grey is repeated; RGB becomes ITU-R 601-2 luma in
    PIL's fixed-point arithmetic (``convert("L")`` exactly); counts go in ``conv``."""
    if x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        conv["grey_to_rgb"] += len(x)
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and x.shape[1] == 3:
        conv["rgb_to_grey"] += len(x)
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)  # 0.299, 0.587, 0.114 * 2^16
        return (((x.int() * weights).sum(1, keepdim=True) + 0x8000) >> 16).to(torch.uint8)
    raise PupilError(f"cannot turn {x.shape[1]}-channel images into {channels} channels (give 1 or 3)")


def _to_8bit(im, conv: dict[str, int]):
    """16-bit, 32-bit integer and float images rescaled to 8-bit grey (see the module docstring)."""
    from PIL import Image

    if im.mode not in (*SIXTEEN_BIT, "I", "F"):
        return im
    a = np.asarray(im).astype(np.float64)
    if not np.isfinite(a).all():
        raise _Bad("non-finite pixel values")
    lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
    if im.mode in SIXTEEN_BIT or (im.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        kind, a = ("rescaled_16bit" if im.mode in SIXTEEN_BIT else "rescaled_32bit"), a / 257.0  # 65535 / 255
    elif im.mode == "I" and lo >= 0 and hi <= 255:
        kind = "rescaled_32bit"
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        kind, a = "rescaled_float", a * 255.0
    else:  # an arbitrary range: stretch it onto 0..255
        kind = "rescaled_float" if im.mode == "F" else "rescaled_32bit"
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    conv[kind] += 1
    return Image.fromarray(np.round(a).clip(0, 255).astype(np.uint8), "L")


# ---------------------------------------------------------------------------------------------------------------
# Streaming: images decoded on demand when the decoded set would not fit the memory budget


def memory_budget(given: int | float | str | None = None) -> int:
    """Bytes a dataset may take decoded: ``given`` (bytes, or a string such as ``4GB``, ``512MB``) or a quarter
    of this machine's memory."""
    if given is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX
            total = 8 << 30
        return total // 4
    if isinstance(given, str):
        text = given.strip().upper().removesuffix("B")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
        try:
            value = float(text[:-1] if scale > 1 else text) * scale
        except ValueError:
            raise PupilError(f"--max-memory must be a size such as 4GB or 512MB, not {given!r}") from None
    else:
        value = float(given)
    if not np.isfinite(value) or value <= 0:
        raise PupilError(f"--max-memory must be a positive size, not {given!r}")
    return int(value)


class LazyImages:
    """uint8 images ``(N, C, H, W)`` that stay in their files: ``ImageDataset.images`` when the decoded set would
    exceed the memory budget. It answers what the code asks of an image tensor: ``len``, ``shape``, ``dtype``,
    indexing (an int, a slice, a list or tensor of indices: those images are decoded, exactly as ``read_images``
    decodes them) and ``split(n)`` (chunks in order, decoded ahead in DataLoader worker processes).

    A file that fails to decode here (it passed the header check) raises one line naming it: with
    ``--on-bad-image skip`` the loader decoded every file once beforehand and left such files out.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, paths: list[str], mode: str, size: tuple[int, int], fit: Fit | None, workers: int | None = None):
        self.paths, self.mode, self.size, self.fit = list(paths), mode, size, fit
        c = 1 if mode == "L" else 3
        h, w = (fit.crop, fit.crop) if fit else (size[1], size[0])
        self.item_shape = (c, h, w)
        self.workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if workers is None else workers

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), *self.item_shape))

    def numel(self) -> int:
        return self.shape.numel()

    def decode(self, i: int) -> torch.Tensor:
        try:
            a = _decode(Path(self.paths[i]), self.mode, self.size, dict.fromkeys(CONVERSIONS, 0), self.fit)
        except _Bad as e:
            raise PupilError(
                f"cannot use image {self.paths[i]}: {e} (found while streaming; --on-bad-image skip checks every "
                "file first and leaves such files out)"
            ) from None
        return torch.from_numpy(np.array(a, copy=True, order="C"))  # np.asarray of a PIL image is read-only

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int | np.integer) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            return self.decode(int(index))
        picks = self._indices(index)
        if not picks:
            return torch.empty((0, *self.item_shape), dtype=torch.uint8)
        return torch.stack([self.decode(i) for i in picks])

    def _indices(self, index) -> list[int]:
        n = len(self.paths)
        if isinstance(index, slice):
            return list(range(n))[index]
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            return index.nonzero().flatten().tolist()
        picks = index.tolist() if isinstance(index, torch.Tensor | np.ndarray) else list(index)
        return [i + n if i < 0 else i for i in picks]

    def subset(self, index) -> LazyImages:
        """The chosen images, still in their files."""
        return LazyImages([self.paths[i] for i in self._indices(index)], self.mode, self.size, self.fit, self.workers)

    def split(self, n: int):
        """Chunks of ``n`` images in order, decoded ahead by worker processes."""
        if not self.paths:
            return iter([torch.empty((0, *self.item_shape), dtype=torch.uint8)])
        return self._decoded_ahead(batch_size=n)

    def batches(self, index_lists: list[list[int]]):
        """The images of each index list in turn (a training epoch's batches), decoded ahead by workers."""
        return self._decoded_ahead(batch_sampler=index_lists)

    def _decoded_ahead(self, **batching):
        """Batches (``batch_size`` in order, or a ``batch_sampler``'s) decoded by this set's workers."""
        loader = torch.utils.data.DataLoader(
            _Files(self),
            num_workers=self.workers,
            collate_fn=torch.stack,
            generator=_quiet(),
            prefetch_factor=2 if self.workers else None,
            **batching,
        )
        return iter(loader)

    def __iter__(self):
        for chunk in self.split(256):
            yield from chunk


def _quiet() -> torch.Generator:
    """A DataLoader's own generator: without one, starting its workers draws a seed from torch's global random
    state, and streaming would change every random number drawn after it (dropout, training order)."""
    return torch.Generator().manual_seed(0)


class _Files(torch.utils.data.Dataset):
    """The files of a LazyImages, one decoded image per item (what a DataLoader worker runs)."""

    def __init__(self, images: LazyImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images.decode(i)


def _verify(paths: list, heads: list, mode: str, size: tuple[int, int], fit: Fit | None) -> tuple[list, list[BadImage]]:
    """Decode every file once in worker processes, keeping nothing: the heads of those that decode, and the
    others as BadImages (a truncated JPEG passes the header check and fails only here)."""
    lazy = LazyImages([str(paths[i]) for i, *_ in heads], mode, size, fit)
    loader = torch.utils.data.DataLoader(
        _Check(lazy), batch_size=64, num_workers=lazy.workers, collate_fn=lambda items: items, generator=_quiet()
    )
    reasons = [r for batch in loader for r in batch]
    bad = [BadImage(lazy.paths[j], r) for j, r in enumerate(reasons) if r]
    return [hd for hd, r in zip(heads, reasons, strict=True) if not r], bad


class _Check(_Files):
    def __getitem__(self, i: int) -> str:
        try:
            _decode(
                Path(self.images.paths[i]),
                self.images.mode,
                self.images.size,
                dict.fromkeys(CONVERSIONS, 0),
                self.images.fit,
            )
        except _Bad as e:
            return str(e)
        return ""
