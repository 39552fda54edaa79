"""A PNG strip of a search: each query on the left, its neighbours to the right, nearest first, each captioned
with its id, label and cosine distance.

Images are scaled to one cell size with nearest-neighbour pixels (a 28-px product photo stays crisp at 112 px; a
large photo is shrunk with antialiasing). An image whose source is gone (a moved file, an item added as pixels)
gets a grey cell that says so. Written atomically, like everything pupil writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pupil.io import atomic_write

CELL = 112  # pixels per image side in the strip
CAPTION = 40  # pixels of caption text under each image (three lines of PIL's default font)
GAP = 6
QUERY_BORDER = (214, 40, 40)  # the query's frame
BACKGROUND = (255, 255, 255)


@dataclass
class Tile:
    """One cell: uint8 pixels (C, H, W) or None (a grey placeholder), and up to three caption lines."""

    image: torch.Tensor | None
    lines: list[str]
    border: tuple[int, int, int] | None = None


def write_strip(path: str | Path, rows: list[list[Tile]], cell: int = CELL) -> Path:
    """Draw ``rows`` of tiles (the query first in each) and write them as a PNG at ``path``."""
    from PIL import Image, ImageDraw

    width = max(len(r) for r in rows) * (cell + GAP) + GAP
    height = len(rows) * (cell + CAPTION + GAP) + GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        top = GAP + i * (cell + CAPTION + GAP)
        for j, tile in enumerate(row):
            left = GAP + j * (cell + GAP)
            canvas.paste(_cell(tile.image, cell), (left, top))
            if tile.border:
                draw.rectangle([left - 2, top - 2, left + cell + 1, top + cell + 1], outline=tile.border, width=2)
            for n, line in enumerate(tile.lines[:3]):
                draw.text((left, top + cell + 2 + 12 * n), _fit(draw, line, cell), fill=(0, 0, 0))
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG", optimize=True))


def search_rows(
    queries: torch.Tensor,
    names: list[str],
    ids: np.ndarray,
    distances: np.ndarray,
    labels: np.ndarray,
    pixels: list[torch.Tensor | None],
    classes: list[str],
) -> list[list[Tile]]:
    """Tiles for a search: per query its pixels and name, then its hits with id, label and distance (``pixels``
    holds the hits' images in the order of ``ids.ravel()``)."""
    rows, k = [], ids.shape[1]
    for q in range(len(ids)):
        row = [Tile(queries[q], ["query", names[q]], QUERY_BORDER)]
        for j in range(k):
            label = classes[labels[q, j]] if 0 <= labels[q, j] < len(classes) else "-"
            lines = [f"#{j + 1} id {ids[q, j]}", label, f"d {distances[q, j]:.3f}"]
            row.append(Tile(pixels[q * k + j], lines))
        rows.append(row)
    return rows


def _cell(image: torch.Tensor | None, cell: int):
    from PIL import Image, ImageDraw

    if image is None:
        grey = Image.new("RGB", (cell, cell), (200, 200, 200))
        ImageDraw.Draw(grey).text((6, cell // 2 - 6), "not available", fill=(80, 80, 80))
        return grey
    a = image.detach().cpu()
    a = a.float().clamp(0, 1).mul(255).round().to(torch.uint8) if a.dtype != torch.uint8 else a
    a = a.numpy()
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    im = Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    w, h = im.size
    scale = cell / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = im.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    out = Image.new("RGB", (cell, cell), BACKGROUND)
    out.paste(im, ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return out


def _fit(draw, text: str, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels in the default font."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
