"""Visual search in ``pupil serve``: the nearest catalogue images of an upload, from indexes that stay fresh.

``pupil serve RUN --index [NAME=]IDX`` opens each index (``load_indexes``) with the embedder of the run that built
it (its weights checked against the index, as ``pupil search`` checks them), warms both up, and ``install_search``
adds the routes:

    GET  /v1/indexes                          {"indexes": [entry, ...]}; entry: ``ServedIndex.describe``
    GET  /v1/indexes/{name}                   one entry
    POST /v1/indexes/{name}/search?k=8        images -> per image its k nearest live items (k from 1 to 64): id,
                                              label, cosine distance, source, columns and the item's image URL; the
                                              conversions done to the query; the index's live count
    GET  /v1/indexes/{name}/items/{id}.png    a catalogue image as PNG (``?max_side=N``: scaled down to fit N x N)

Uploads are what predict takes (multipart, base64 JSON, raw bytes), parsed and decoded by the same functions with
the same status codes; an upload is decoded to the embedding run's input exactly as ``pupil search`` decodes a
file, so the service and the command line give the same ids and distances. The embedding and the search run on
the app's one inference thread, so they never compete with a forward pass; a large upload is decoded in a decode
thread, and a catalogue image is read and encoded there too.

A source never shows a path of the server: a dataset item is ``<dataset>:<split>:<row>`` as the index holds it, a
file is its name only; an item's image comes from its id, parsed as a whole number, so nothing of the URL ever
reaches the file system.

**Freshness.** ``pupil index add|remove`` rewrite the file by renaming a new one over it while the server runs.
Every request stats the file (``pupil.search.index.file_stamp``: a few microseconds) and, when it changed, reads it
again off the event loop; requests that arrive meanwhile wait for the read, so an item added before a request is
found by it. A file that cannot be served (corrupt, gone, or built by another model, whose embeddings would be
compared with this model's) is refused with a note in ``GET /v1/indexes`` and a warning in the log, and the index
read before is served on; the file is tried again once it changes.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import torch

from pupil.errors import PupilError
from pupil.search.index import SearchIndex, file_stamp

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pupil.search.embed import Embedder
    from pupil.search.index import Hits

log = logging.getLogger("pupil.serve")
DEFAULT_K = 8
MAX_K = 64
MAX_SIDE = 4096  # the largest ?max_side= an item request may ask for
ITEM = re.compile(r"([0-9]{1,18})\.png")  # an item's file name in its URL; 18 digits stay within int64


@dataclass
class ServedIndex:
    """One search index behind the service: the index as last read, the embedder of the run that built it, and
    what became of the file since (``current`` rereads it when it changes)."""

    name: str
    path: Path
    index: SearchIndex
    embedder: Embedder = field(repr=False)
    seen: tuple[int, int, int] | None = None
    """``file_stamp`` of the file last looked at, served or refused: it is not read again until it changes."""
    note: str | None = None
    """Why the file on disk is not the index served (None when it is)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def mode(self) -> str:
        """What uploads are converted to: "L" or "RGB", the embedding run's channels."""
        return "L" if self.embedder.info.input_shape[0] == 1 else "RGB"

    @property
    def side(self) -> int:
        return self.embedder.info.input_shape[1]

    def decode(self, im) -> np.ndarray:
        """An opened upload decoded to the embedding run's input, as ``pupil search`` decodes a file."""
        from pupil.serve.models import to_pixels

        return to_pixels(im, self.mode, self.side)

    async def current(self) -> SearchIndex:
        """The index, read again first when its file changed (off the event loop; concurrent requests wait for one
        read)."""
        if file_stamp(self.path) == self.seen:
            return self.index
        async with self.lock:
            stamp = file_stamp(self.path)
            if stamp != self.seen:  # (else another request reread it while this one waited)
                fresh = await asyncio.to_thread(self.reread) if stamp is not None else None
                if fresh is not None:
                    self.index, self.seen, self.note = fresh, fresh.stamp, None
                    log.info("index %s: reread %s, %d live items", self.name, self.path, fresh.live)
                else:
                    self.seen = stamp
                    if stamp is None:
                        self.refuse(f"{self.path} is gone")
        return self.index

    def reread(self) -> SearchIndex | None:
        """The file read again and checked against this index's model, or None (with a note) when it cannot be
        served."""
        try:
            fresh = SearchIndex.open(self.path)
            fresh.check_embedding(self.embedder.info.as_dict())
        except PupilError as e:
            self.refuse(f"{self.path} changed but cannot be served: {e}")
            return None
        if fresh.data.get("data_dir") == self.index.data.get("data_dir"):
            fresh.catalogues.update(self.index.catalogues)  # the datasets its items come from, loaded already
        return fresh

    def refuse(self, why: str) -> None:
        """Keep the index read before, noted (the log has the file's path; the API its name only)."""
        why = f"{why}; serving the index read before ({self.index.live} live items, read {_when(self.index.stamp)})"
        log.warning("index %s: %s", self.name, why)
        self.note = why.replace(str(self.path), self.path.name)

    def describe(self, models: dict[str, Any]) -> dict[str, Any]:
        """The index's entry in ``GET /v1/indexes``. ``models``: the served models by name; those whose version is
        the index's weights hash embed as the index does (the page searches with the chosen model's index)."""
        idx, e = self.index, self.index.identity
        catalogue = str(idx.data.get("name") or "")
        return {
            "name": self.name,
            "live": idx.live,
            "kind": idx.kind,
            "embedding": {
                "run": e.get("run"),
                "kind": e.get("kind"),
                "dim": e.get("dim"),
                "weights": e.get("weights_sha256"),
            },
            "models": [m.name for m in models.values() if m.version == e.get("weights_sha256")],
            "input": {"channels": 1 if self.mode == "L" else 3, "size": self.side},
            "classes": idx.classes,
            "catalogue": {"name": Path(catalogue).name, "split": idx.data.get("split")},  # a folder: its name only
            "updated": _when(idx.stamp),
            "search": f"/v1/indexes/{quote(self.name, safe='')}/search",
            "note": self.note,
        }


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_indexes(specs: list[str], device: torch.device | str = "cpu") -> list[ServedIndex]:
    """Open each ``--index`` spec (``PATH``, named after the file without its suffix, or ``NAME=PATH``) with the
    embedder of the run that built it, and warm both up (a forward pass, a search, the catalogue's first image).

    Raises PupilError in one line for a missing, corrupt or foreign file, an invalid or duplicate name, or the run
    that built the index gone or changed."""
    out: list[ServedIndex] = []
    names: dict[str, str] = {}
    for spec in specs:
        name, path = parse_spec(spec)
        if name in names:
            raise PupilError(
                f"--index {names[name]} and --index {spec} are both named {name}: name them (--index NAME=PATH)"
            )
        names[name] = spec
        out.append(open_index(name, path, device, spec))
    return out


def parse_spec(spec: str) -> tuple[str, Path]:
    """(name, path) of ``NAME=PATH`` or ``PATH``; a file whose own name holds "=" is taken as a path."""
    from pupil.config import check_run_name

    name, sep, rest = spec.partition("=")
    if sep and not any(c in name for c in "/\\") and not Path(spec).exists():
        path = Path(rest)
    else:
        path = Path(spec)
        name = path.stem
    try:
        check_run_name(name)
        ok = bool(name)
    except PupilError:
        ok = False
    if not ok:
        raise PupilError(
            f"--index {spec}: the name {name!r} must be a plain name, as run names are (no '/', no '..', not starting "
            "with '.', '~' or '-'); give one with --index NAME=PATH"
        )
    return name, path


def open_index(name: str, path: Path, device: torch.device | str, spec: str | None = None) -> ServedIndex:
    """One index opened, its run's embedder loaded and checked, both warmed up (see ``load_indexes``)."""
    spec = spec or str(path)
    try:
        index = SearchIndex.open(path)
        built, where = index.identity.get("run"), index.identity.get("run_dir")
        if not where or not Path(where).is_dir():
            raise PupilError(
                f"the run that built it, {built}, is not at {where} any more: serve the index where that run is, "
                "or build it again with pupil index build"
            )
        embedder = index.embedder(device=device)  # loads the run and checks its weights against the index
        c, h, w = embedder.info.input_shape
        if c not in (1, 3) or h != w:
            raise PupilError(f"{built} takes {c}x{h}x{w} images; serving needs 1 or 3 x N x N")
    except PupilError as e:
        raise PupilError(f"--index {spec}: {e}") from None
    served = ServedIndex(name, Path(path), index, embedder, seen=index.stamp)
    try:
        z = embedder(torch.zeros((1, c, h, w), dtype=torch.uint8))
        if index.live:
            index.search(z, 1)
            index.pixels(np.flatnonzero(index.alive)[:1])  # a dataset catalogue is loaded now, not on a request
    except Exception as e:  # whatever the model or faiss raises becomes one line
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise PupilError(f"--index {spec}: the warm-up failed: {first}") from None
    return served


# ---------------------------------------------------------------------------------------------------------------
# The routes


@dataclass
class Search:
    """What the routes share: the indexes by name and their metrics."""

    indexes: dict[str, ServedIndex]
    images: Any = None
    """Counter: query images searched, by index."""
    items: Any = None
    """Gauge: live items of the index served, by index."""


def install_search(app: FastAPI, indexes: list[ServedIndex]) -> None:
    """Add ``indexes`` to an app made by ``pupil.serve.app.create_app``; the first call also adds the routes (see
    the module docstring), so a later call adds more indexes to the same routes. Raises ValueError for a name
    already served."""
    from fastapi import HTTPException, Request
    from fastapi.responses import Response

    state = app.state.pupil
    search: Search | None = getattr(app.state, "search", None)
    if search is not None:
        _add(search, state, indexes)
        return
    search = app.state.search = Search({})
    _add(search, state, indexes)

    def find(name: str) -> ServedIndex:
        if name not in search.indexes:
            have = ", ".join(search.indexes) or "no index"
            raise HTTPException(404, f"no index named {name[:100]!r}; this server has {have}")
        return search.indexes[name]

    def json_response(body: Any) -> Response:
        return Response(json.dumps(body), media_type="application/json")

    @app.get("/v1/indexes")
    async def list_indexes() -> Response:
        for si in search.indexes.values():
            await si.current()
        return json_response({"indexes": [si.describe(state.models) for si in search.indexes.values()]})

    @app.get("/v1/indexes/{name}")
    async def one_index(name: str) -> Response:
        si = find(name)
        await si.current()
        return json_response(si.describe(state.models))

    async def search_route(request: Request) -> Response:
        si = find(request.path_params["name"])
        k = _k(request.query_params.get("k"))
        return json_response(await _search(state, search, si, k, request))

    async def item_route(request: Request) -> Response:
        si = find(request.path_params["name"])
        item = request.path_params["item"]
        m = ITEM.fullmatch(item)
        if m is None:
            raise HTTPException(404, f"no item {item[:40]!r}: an item's image is items/ID.png, ID a whole number")
        max_side = _max_side(request.query_params.get("max_side"))
        index = await si.current()
        i = int(m[1])
        if i >= len(index.alive) or not index.alive[i]:
            raise HTTPException(404, f"index {si.name} has no item {i} (never added, or removed)")
        loop = asyncio.get_running_loop()
        png = await loop.run_in_executor(state.decode_pool, item_png, index, i, max_side)
        if png is None:
            why = "its file moved, or it was added as pixels"
            raise HTTPException(404, f"item {i} of index {si.name} has no image this server can read ({why})")
        return Response(png, media_type="image/png", headers={"cache-control": "private, no-cache"})

    # Plain routes, as predict and explain are: they read the request themselves.
    app.add_route("/v1/indexes/{name}/search", search_route, methods=["POST"], include_in_schema=False)
    app.add_route("/v1/indexes/{name}/items/{item}", item_route, methods=["GET"], include_in_schema=False)


def _add(search: Search, state: Any, indexes: list[ServedIndex]) -> None:
    """Indexes into the app's routes, with their series in the app's metrics registry."""
    from prometheus_client import Counter, Gauge

    for si in indexes:
        if si.name in search.indexes or sum(o.name == si.name for o in indexes) > 1:
            raise ValueError(f"two served indexes are named {si.name}")
    registry = state.metrics.registry
    if search.images is None:
        search.images = Counter("pupil_serve_search_images", "Query images searched", ["index"], registry=registry)
        search.items = Gauge("pupil_serve_index_items", "Live items in the index served", ["index"], registry=registry)
    for si in indexes:
        search.indexes[si.name] = si
        search.items.labels(si.name).set_function(lambda si=si: si.index.live)


async def _search(state: Any, search: Search, si: ServedIndex, k: int, request: Any) -> dict[str, Any]:
    """The search answer: the body read, each upload's header checked (415/413/400), decoded (large ones in a
    decode thread), then embedded and searched on the inference thread."""
    from fastapi import HTTPException

    from pupil.serve.app import _uploads
    from pupil.serve.models import BadUpload

    blobs = _uploads(request.headers.get("content-type", ""), await request.body(), state.settings.max_images)
    opened = [await _open_query(state, si, b, i, len(blobs)) for i, b in enumerate(blobs)]
    index = await si.current()
    if state.executor is None:
        raise HTTPException(503, "the server is not ready")
    loop = asyncio.get_running_loop()
    try:
        k, rows = await loop.run_in_executor(state.executor, run_search, si, index, [o[0] for o in opened], k)
    except BadUpload as e:  # found while decoding (a truncated file passes the header check)
        raise HTTPException(e.status, str(e)) from None
    except RuntimeError as e:
        if "shutdown" in str(e):
            raise HTTPException(503, "the server is shutting down") from None
        raise HTTPException(500, f"search failed: {str(e).splitlines()[0][:200] if str(e) else 'error'}") from None
    except PupilError as e:  # the model gave non-finite or misshapen embeddings
        raise HTTPException(500, f"search failed: {e}") from None
    search.images.labels(si.name).inc(len(rows))
    e = index.identity
    return {
        "index": si.name,
        "live": index.live,
        "k": k,
        "embedding": {"run": e.get("run"), "weights": e.get("weights_sha256")},
        "queries": [
            {"input": info, "conversions": conversions, "hits": hits}
            for (_, info, conversions), hits in zip(opened, rows, strict=True)
        ],
    }


def run_search(si: ServedIndex, index: SearchIndex, images: list[Any], k: int) -> tuple[int, list[list[dict]]]:
    """On the inference thread: decode what is left to decode, embed, search; (k used, each image's hits). k is
    at most the live items (none: no hits)."""
    from pupil.serve.app import _pixels_of

    n = len(images)
    pixels = np.stack([_pixels_of(im, si, i, n) for i, im in enumerate(images)])  # (N, C, H, W) uint8
    z = si.embedder(torch.from_numpy(pixels))
    k = min(k, index.live)
    if k == 0:
        return 0, [[] for _ in images]
    return k, hit_rows(si.name, index, index.search(z, k))


def hit_rows(name: str, index: SearchIndex, hits: Hits) -> list[list[dict[str, Any]]]:
    """Each query's hits as the API gives them (see the module docstring); ``image`` is None for an item whose
    image this server cannot read (an item added as pixels, a file gone)."""
    from pupil.data import DATASETS
    from pupil.search.index import _dataset_ref

    prefix = f"/v1/indexes/{quote(name, safe='')}/items/"
    classes, columns = index.classes, index.columns
    out = []
    for ids, distances, labels in zip(hits.ids.tolist(), hits.distances.tolist(), hits.labels.tolist(), strict=True):
        row = []
        for i, d, y in zip(ids, distances, labels, strict=True):
            source = index.sources[i]
            dataset = _dataset_ref(source, DATASETS) is not None
            readable = dataset or (bool(source) and Path(source).is_file())
            row.append(
                {
                    "id": i,
                    "label": classes[y] if 0 <= y < len(classes) else None,
                    "distance": d,
                    "source": source if dataset else Path(source).name or None,
                    "columns": {c: v[i] for c, v in columns.items() if v[i] not in (None, "")},
                    "image": f"{prefix}{i}.png" if readable else None,
                }
            )
        out.append(row)
    return out


def item_png(index: SearchIndex, i: int, max_side: int | None) -> bytes | None:
    """Item ``i``'s image as its source holds it, as PNG (scaled down to fit ``max_side``), or None when gone."""
    from PIL import Image

    pixels = index.pixels([i])[0]
    if pixels is None:
        return None
    a = pixels.numpy()
    im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    if max_side is not None and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BILINEAR, reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Request parsing


def _k(raw: str | None) -> int:
    from fastapi import HTTPException

    if raw is None:
        return DEFAULT_K
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_K:
        raise HTTPException(400, f"k must be a whole number from 1 to {MAX_K}, not {raw[:20]!r}")
    return int(raw)


def _max_side(raw: str | None) -> int | None:
    from fastapi import HTTPException

    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_SIDE:
        raise HTTPException(400, f"max_side must be a whole number from 1 to {MAX_SIDE}, not {raw[:20]!r}")
    return int(raw)


async def _open_query(state: Any, si: ServedIndex, data: bytes, i: int, n: int) -> tuple[Any, dict, dict]:
    """One upload: its header checked (an image, within the pixel limit), what it is (width, height, mode) and
    the conversions that decoding it to the index's input makes; decoded in a decode thread when large, else left
    for the inference thread (as predict does)."""
    from fastapi import HTTPException

    from pupil.serve.app import INLINE_PIXELS
    from pupil.serve.models import BadUpload, open_upload

    try:
        im = open_upload(data, state.settings.max_pixels)
        info = {"width": im.width, "height": im.height, "mode": im.mode}
        conversions = query_conversions(im, si.mode, si.side)
        if im.width * im.height > INLINE_PIXELS:
            loop = asyncio.get_running_loop()
            im = await loop.run_in_executor(state.decode_pool, si.decode, im)
        return im, info, conversions
    except BadUpload as e:
        raise HTTPException(e.status, f"image {i + 1}: {e}" if n > 1 else str(e)) from None


def query_conversions(im: Any, mode: str, side: int) -> dict[str, int]:
    """What ``pupil.serve.models.to_pixels`` will do to an opened upload, counted from its header by the rules
    ``pupil search`` counts a file's with (``pupil.data.images``), nonzero ones only."""
    from pupil.data.images import Head, _exif_orientation, _header_conversions

    w, h = im.size
    orientation = _exif_orientation(im)
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the size as viewed
        w, h = h, w
    head = Head(orientation != 1, im.mode == "P" and "transparency" in im.info)
    counted = _header_conversions([(0, im.mode, (w, h), head)], mode, (side, side), None)
    return {k: v for k, v in counted.items() if v}


def _when(stamp: tuple[int, int, int] | None) -> str | None:
    """The modification time of a ``file_stamp``, ISO 8601 in UTC."""
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp[2] / 1e9, timezone.utc).isoformat(timespec="seconds")
