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

A file that cannot be used (missing, empty, not an image, truncated, over PIL's decompression-bomb
limit, non-finite pixels) is a ``BadImage``. With ``on_bad="fail"`` all of them are reported at once in
one error; with ``on_bad="skip"`` they are left out and returned, so the caller can write them down.
"""

from __future__ import annotations

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
)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
GREY_MODES = ("1", "L", "LA", "La", "I", "F", *SIXTEEN_BIT)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
MAX_LISTED = 50  # bad files named in one error message


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
    paths: list[Path], img_size: int | None = None, mode: str | None = None, on_bad: str = "fail", hint: str = ""
) -> Decoded:
    """Decode image files into one uint8 tensor, converting mixed modes and sizes to the majority (or to
    ``mode`` and ``img_size``). Raises PupilError naming every bad file (followed by ``hint``) unless
    ``on_bad`` is ``skip``.
    """
    if on_bad not in ON_BAD:
        raise PupilError(f"--on-bad-image must be one of {', '.join(ON_BAD)}, not {on_bad!r}")
    heads, bad = [], []
    for i, p in enumerate(paths):
        try:
            heads.append((i, *_probe(Path(p))))
        except _Bad as e:
            bad.append(BadImage(str(p), str(e)))
    if bad and on_bad == "fail":
        raise_bad(bad, len(paths), hint)
    if not heads:
        raise PupilError(f"none of the {len(paths)} image files could be read: {bad[0].path}: {bad[0].reason}")
    mode = mode or Counter("L" if m in GREY_MODES else "RGB" for _, m, _ in heads).most_common(1)[0][0]
    size = (img_size, img_size) if img_size else Counter(s for _, _, s in heads).most_common(1)[0][0]
    conv = dict.fromkeys(CONVERSIONS, 0)
    arrays, kept = [], []
    for i, _, _ in heads:
        try:
            arrays.append(_decode(Path(paths[i]), mode, size, conv))
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


def _probe(path: Path) -> tuple[str, tuple[int, int]]:
    """The mode and (width, height) as the header states them, after any EXIF rotation."""
    with _open(path) as im:
        w, h = im.size
        if _exif_orientation(im) in (5, 6, 7, 8):  # rotated by 90 degrees: width and height swap
            w, h = h, w
        return im.mode, (w, h)


def _exif_orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make the image unreadable
        return 1


def _decode(path: Path, mode: str, size: tuple[int, int], conv: dict[str, int]) -> np.ndarray:
    """Decode one file to ``mode`` at ``size``: (C, H, W) uint8, counting each conversion in ``conv``."""
    from PIL import Image, ImageOps

    with _open(path) as im:
        try:
            if im.format == "JPEG":
                im.draft(mode, size)  # decode at the smallest DCT scale that still covers ``size``
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
            if im.size != size:
                conv["resized"] += 1
                im = im.resize(size, Image.BILINEAR, reducing_gap=3.0)
            a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            raise _Bad(f"corrupt or truncated ({e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


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
