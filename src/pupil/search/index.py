"""A faiss index over a run's embeddings that stays fresh: items are added and removed without a rebuild.

**Kinds.** ``flat`` (exact search, ``IndexFlatL2``), ``hnsw`` (``IndexHNSWFlat``, Malkov & Yashunin 2018; ``M``
links per node, ``efConstruction`` at build, ``efSearch`` per query) and ``ivfpq`` (``IndexIVFPQ``, Jégou et al.
2011: ``nlist`` inverted lists, vectors compressed to ``pq_m`` bytes; it trains on the items it is built from, so it
needs at least 256 of them). Embeddings are unit vectors (``pupil.search.embed``), so L2 ranks as cosine
similarity does; a hit's ``distance`` is the cosine distance ``1 - cos = |a - b|^2 / 2`` (0 = the same direction).

**Ids.** Every item gets a pupil id, an int64 handed out in order and never reused: an id that was removed can never
name another item. Flat and HNSW indexes are wrapped in ``IndexIDMap2``; an IVF index keeps the ids in its
inverted lists itself, and must not be wrapped: ``IndexIDMap2.remove_ids`` compacts its id map on the assumption
that the inner index shifts the ids after a removal, as a flat index does, which IVF does not (wrapped, every id
after a removed one came back off by the number removed). Either way faiss itself answers with pupil ids, and
``labels[id]`` (an array indexed by id) turns them into labels without a Python loop. Each id maps to its source: a
file path, or ``<dataset>:<split>:<row>`` for a registered dataset (the row of the split as ``pupil.data.load``
returns it), with the manifest's extra columns.

**Removal.** ``flat`` and ``ivfpq`` delete for real (``remove_ids``). HNSW cannot delete a node
without breaking the graph's links, so a removed HNSW item becomes a tombstone: it stays in the graph as a
stepping stone, and every search passes faiss an ``IDSelectorNot(IDSelectorBatch(tombstones))`` in its
``SearchParametersHNSW``. We chose the selector over the "search k + len(tombstones) and filter" recipe because
the graph walk then collects k *live* results itself (the cost does not grow with the number of tombstones, and no
second search is needed), and with no tombstones no selector is passed at all (raw faiss's speed). Should a walk
still come back short (many tombstones around a query), that query is searched again with efSearch doubled, up
to an exact search. Once tombstones pass ``REBUILD_FRACTION`` (20%) of the graph, the graph is rebuilt from the
live vectors (read back from its own flat storage): dead nodes cost memory and walk time, and a rebuild of a
catalogue is minutes at most.

**File.** One file, a safetensors container: the faiss index's own serialisation (``faiss.serialize_index``) as a
uint8 tensor, the labels, live flags and tombstones as tensors, the sources and columns as UTF-8 JSON bytes, and
the metadata (run, weights hash, kind, settings, data, conversions, a sha256 of every tensor) in the header. One
file because the index, its id map and its tombstones must change together: a folder of files cannot be replaced
in one step, so a reader between two renames could pair an index with the wrong ids. It is written to a temporary
name and renamed over the old one (``pupil.io.atomic_write``), and nothing in it is ever unpickled: safetensors
checks the header against the file's length (a truncated file is refused), and every tensor must match the sha256
recorded in the header before faiss reads a byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from pupil.data.images import CONVERSIONS
from pupil.errors import PupilError
from pupil.extras import require

if TYPE_CHECKING:
    from pupil.data import ImageDataset
    from pupil.run import Run
    from pupil.search.embed import Embedder

KINDS = ("flat", "hnsw", "ivfpq")
FORMAT = "pupil-search-index"
VERSION = 1
REBUILD_FRACTION = 0.2
"""An HNSW index is rebuilt from its live vectors once tombstones pass this share of its nodes."""
IVF_MIN_ITEMS = 256  # one PQ codebook of 8 bits has 256 centroids, and k-means needs a point per centroid
DEFAULT_NPROBE = 16


class Hits(NamedTuple):
    """What a search returns, one row per query, nearest first."""

    ids: np.ndarray
    """(Q, k) int64 pupil ids."""
    distances: np.ndarray
    """(Q, k) float32 cosine distances, 1 - cos (0 = same direction, 2 = opposite)."""
    labels: np.ndarray
    """(Q, k) int64 label indices into ``SearchIndex.classes`` (-1: an item added without a label)."""


def _faiss():
    require(("faiss",), "visual search")
    import faiss

    return faiss


def numpy_call(obj: Any, method: str) -> Any:
    """``obj.<method>`` as faiss's numpy wrapper defines it. ``faiss.contrib.torch_utils`` (which
    pytorch-metric-learning imports) replaces the methods of every index with torch-aware ones that take no
    ``params=`` and answer reconstructions with tensors; it keeps the numpy ones as ``<method>_numpy``."""
    numpy = getattr(type(obj), f"{method}_numpy", None)  # looked up on the class: SWIG's instance lookup of a
    return numpy.__get__(obj) if numpy is not None else getattr(obj, method)  # missing name costs microseconds


def check_settings(kind: str, hnsw_m: int, ef_construction: int, nlist: int = 0, pq_m: int = 0) -> None:
    """Refuse a bad index setting in one line, before any work."""
    if kind not in KINDS:
        raise PupilError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    for name, value, low in (("hnsw-m", hnsw_m, 2), ("ef-construction", ef_construction, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PupilError(f"--{name} must be a whole number >= {low}, not {value!r}")
    for name, value in (("nlist", nlist), ("pq-m", pq_m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PupilError(f"--{name} must be a whole number >= 0 (0: chosen from the data), not {value!r}")


def _new_index(kind: str, dim: int, settings: dict[str, int], train: np.ndarray | None = None):
    """An empty index of ``kind`` that takes our ids: ``IndexIDMap2`` over a flat or HNSW index, or an
    ``IndexIVFPQ`` trained on ``train`` (its automatic ``nlist`` and ``pq_m`` are written back into ``settings``)."""
    faiss = _faiss()
    if kind == "flat":
        inner = faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, settings["hnsw_m"])
        inner.hnsw.efConstruction = settings["ef_construction"]
    else:
        n = 0 if train is None else len(train)
        if n < IVF_MIN_ITEMS:
            raise PupilError(
                f"an ivfpq index trains on the items it is built from and needs at least {IVF_MIN_ITEMS}; "
                f"this one has {n}: use --kind hnsw or flat"
            )
        nlist = settings.get("nlist") or max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants 39 per list
        # about 4 dimensions per sub-quantizer: 16 bytes a vector at 64-d, 32 at 128-d
        pq_m = settings.get("pq_m") or max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)
        if dim % pq_m:
            raise PupilError(f"--pq-m {pq_m} must divide the embedding's {dim} dimensions")
        if nlist > n:
            raise PupilError(f"--nlist {nlist} is more than the {n} items to train on")
        settings.update(nlist=nlist, pq_m=pq_m)
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, pq_m, 8)
        numpy_call(ivf, "train")(train)
        return ivf  # its inverted lists store our ids themselves (see the module docstring)
    return faiss.IndexIDMap2(inner)


class SearchIndex:
    """A faiss index of unit-vector embeddings with pupil ids, labels, sources and tombstones.

    Build one with ``SearchIndex.build(run, data, out)`` (a run's embeddings of a dataset) or
    ``SearchIndex.from_embeddings(vectors, ...)``; read one with ``SearchIndex.open(path)``. ``add``, ``remove`` and
    their ``*_embeddings`` forms change it in memory (searches see the change at once); ``save`` writes it.
    """

    def __init__(
        self,
        index: Any,
        *,
        kind: str,
        settings: dict[str, int],
        identity: dict[str, Any],
        classes: list[str],
        labels: np.ndarray,
        alive: np.ndarray,
        sources: list[str],
        columns: dict[str, list],
        tombstones: np.ndarray,
        data: dict[str, Any],
        path: Path | None = None,
        created: str | None = None,
    ):
        self.index, self.kind, self.settings = index, kind, settings
        self.identity, self.classes, self.data = identity, classes, data
        self.labels, self.alive = labels, alive
        self.sources, self.columns = sources, columns
        self.tombstones = tombstones
        self.path, self.created = path, created or _now()
        self._live = int(alive.sum())
        self._params: dict[tuple[int, int], Any] = {}  # (ef_search, nprobe) -> faiss search parameters
        self._embedder: Embedder | None = None
        self.stamp: tuple[int, int, int] | None = None
        """``file_stamp`` of ``path`` when this index was read or written: a server compares it with the file's now,
        one ``stat`` per request, to see that another process has saved a new version."""
        self.catalogues: dict[tuple[str, str], ImageDataset] = {}
        """The registered datasets ``pixels`` has loaded, by (name, split): loaded once per index, not per call."""
        self._catalogue_lock = threading.Lock()

    # -----------------------------------------------------------------------------------------------------------
    # Building

    @classmethod
    def from_embeddings(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray | list[int] | None = None,
        *,
        identity: dict[str, Any],
        kind: str = "hnsw",
        hnsw_m: int = 32,
        ef_construction: int = 200,
        nlist: int = 0,
        pq_m: int = 0,
        classes: list[str] | None = None,
        sources: list[str] | None = None,
        columns: dict[str, list] | None = None,
        data: dict[str, Any] | None = None,
    ) -> SearchIndex:
        """An index of ``vectors`` (N, D) float32 unit vectors with ids 0..N-1, not yet saved. ``identity`` is
        what embedded them (``EmbeddingInfo.as_dict()``): queries from anything else are refused."""
        check_settings(kind, hnsw_m, ef_construction, nlist, pq_m)
        vectors = _vectors(vectors, identity.get("dim"))
        settings = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "nlist": nlist, "pq_m": pq_m}
        index = _new_index(kind, vectors.shape[1], settings, vectors if kind == "ivfpq" else None)
        out = cls(
            index,
            kind=kind,
            settings=settings,
            identity={**identity, "dim": vectors.shape[1]},
            classes=list(classes or []),
            labels=np.empty(0, np.int64),
            alive=np.empty(0, bool),
            sources=[],
            columns={k: [] for k in columns or {}},
            tombstones=np.empty(0, np.int64),
            data=dict(data or {}),
        )
        out.add_embeddings(vectors, labels, sources, columns)
        return out

    @classmethod
    def build(
        cls,
        run: Run | str | Path,
        data: str | Path | ImageDataset,
        out: str | Path,
        kind: str = "hnsw",
        hnsw_m: int = 32,
        ef_construction: int = 200,
        *,
        nlist: int = 0,
        pq_m: int = 0,
        split: str | None = None,
        data_dir: str | None = None,
        batch: int = 256,
        device: str | torch.device = "auto",
        progress: bool = False,
    ) -> SearchIndex:
        """Embed ``data`` with ``run`` and write the index to ``out`` (atomically).

        ``data`` is a registered dataset's name (its ``split``, default train), an image folder or a CSV manifest
        (default: all of it), or an ImageDataset. Images are converted to the run's input as the loaders convert
        them (mode, then size), and the conversions are counted in ``data["conversions"]``.
        """
        from pupil.search.embed import Embedder

        check_settings(kind, hnsw_m, ef_construction, nlist, pq_m)
        out = Path(out)
        _check_out(out)
        run = _as_run(run, device)
        embedder = Embedder(run, device, batch)
        ds, described = load_catalogue(data, split, data_dir, embedder.info.input_shape)
        vectors = embedder.embed(ds, progress)
        conversions = _merge(ds.meta.get("conversions") or {}, embedder.conversions)
        described["conversions"] = {k: v for k, v in conversions.items() if v}
        sources = catalogue_sources(ds, described)
        columns = {k: list(v) for k, v in ds.columns.items() if k != "path"}
        identity = {**embedder.info.as_dict(), "run_dir": str(Path(run.dir).resolve())}
        index = cls.from_embeddings(
            vectors,
            ds.targets.numpy(),
            identity=identity,
            kind=kind,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction,
            nlist=nlist,
            pq_m=pq_m,
            classes=list(ds.classes),
            sources=sources,
            columns=columns,
            data=described,
        )
        index._embedder = embedder
        index.save(out)
        return index

    # -----------------------------------------------------------------------------------------------------------
    # Reading and writing

    @classmethod
    def open(cls, path: str | Path) -> SearchIndex:
        """Read an index file; refuses (one line) a missing, truncated, corrupt or foreign file."""
        from safetensors import SafetensorError, safe_open

        faiss = _faiss()
        path = Path(path)
        if not path.is_file():
            raise PupilError(f"no search index at {path}" + (" (it is a folder)" if path.is_dir() else ""))
        stamp = file_stamp(path)  # before reading: a file replaced meanwhile is seen as changed, never missed
        rebuild = "build it again with pupil index build"
        try:
            with safe_open(str(path), "np") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise PupilError(f"{path} is not a pupil search index")
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, ValueError) as e:
            raise PupilError(f"corrupt or truncated search index {path} ({e}); {rebuild}") from None
        if header.get("version") != str(VERSION):
            raise PupilError(f"{path} is a search index of format {header.get('version')}, not {VERSION}; {rebuild}")
        try:
            meta = json.loads(header["meta"])
            if _checksum(t) != meta["sha256"]:
                raise PupilError(f"corrupt search index {path}: its contents do not match their checksum; {rebuild}")
            items = json.loads(t["items"].tobytes().decode("utf-8"))
            blob, labels, alive, tombstones = t["faiss"], t["labels"], t["alive"].astype(bool), t["tombstones"]
            kind, settings, identity, sources = meta["kind"], meta["settings"], meta["identity"], items["sources"]
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            raise PupilError(f"corrupt search index {path} (its metadata: {e}); {rebuild}") from None
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(blob))
        except RuntimeError as e:
            first = (str(e).splitlines() or ["unreadable"])[0][:160]
            raise PupilError(f"corrupt search index {path}: faiss cannot read it ({first}); {rebuild}") from None
        n = int(meta.get("next_id", -1))
        stored = int(alive.sum()) + (len(tombstones) if kind == "hnsw" else 0)
        if not (len(labels) == len(alive) == n == len(sources)) or index.ntotal != stored:
            raise PupilError(f"corrupt search index {path}: its ids, labels and faiss index disagree; {rebuild}")
        out = cls(
            index,
            kind=kind,
            settings=settings,
            identity=identity,
            classes=items.get("classes", []),
            labels=np.array(labels, np.int64),
            alive=np.array(alive, bool),
            sources=sources,
            columns=items.get("columns", {}),
            tombstones=np.array(tombstones, np.int64),
            data=meta.get("data", {}),
            path=path,
            created=meta.get("created"),
        )
        out.stamp = stamp
        return out

    def save(self, path: str | Path | None = None) -> Path:
        """Write the index (to ``path``, or where it was read from) atomically: a temporary file renamed over it."""
        from safetensors.numpy import save_file

        from pupil.io import atomic_write

        faiss = _faiss()
        path = Path(path or self.path or "")
        if not path.name:
            raise PupilError("give the file to write the search index to")
        blob = faiss.serialize_index(self.index)
        items = json.dumps({"classes": self.classes, "sources": self.sources, "columns": self.columns}).encode()
        meta = {
            "kind": self.kind,
            "settings": self.settings,
            "identity": self.identity,
            "data": self.data,
            "next_id": len(self.labels),
            "live": self.live,
            "tombstones": len(self.tombstones),
            "faiss_version": faiss.__version__,
            "created": self.created,
            "updated": _now(),
        }
        tensors = {
            "faiss": blob,
            "labels": self.labels,
            "alive": self.alive.astype(np.uint8),
            "tombstones": self.tombstones,
            "items": np.frombuffer(items, np.uint8),
        }
        meta["sha256"] = _checksum(tensors)
        header = {"format": FORMAT, "version": str(VERSION), "meta": json.dumps(meta)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
        self.path, self.stamp = path, file_stamp(path)
        return path

    # -----------------------------------------------------------------------------------------------------------
    # Changing the catalogue

    @property
    def live(self) -> int:
        """Items a search can return."""
        return self._live

    def __len__(self) -> int:
        return self.live

    def add_embeddings(
        self,
        vectors: np.ndarray,
        labels: np.ndarray | list[int] | None = None,
        sources: list[str] | None = None,
        columns: dict[str, list] | None = None,
    ) -> np.ndarray:
        """Add unit vectors (N, D); returns their new ids. They are searchable at once (save to keep them)."""
        vectors = _vectors(vectors, self.dim)
        n = len(vectors)
        labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
        sources = [""] * n if sources is None else [str(s) for s in sources]
        if len(labels) != n or len(sources) != n:
            raise PupilError(f"{n} vectors but {len(labels)} labels and {len(sources)} sources")
        if len(labels) and (labels.min() < -1 or (self.classes and labels.max() >= len(self.classes))):
            raise PupilError(f"labels must index the {len(self.classes)} classes (or be -1 for none)")
        ids = np.arange(len(self.labels), len(self.labels) + n, dtype=np.int64)
        if n:
            numpy_call(self.index, "add_with_ids")(vectors, ids)
        self.labels = np.concatenate([self.labels, labels])
        self.alive = np.concatenate([self.alive, np.ones(n, bool)])
        self._live += n
        self.sources += sources
        columns = columns or {}
        for key in set(self.columns) | set(columns):
            values = list(columns.get(key, [None] * n))
            if len(values) != n:
                raise PupilError(f"column {key!r} has {len(values)} values for {n} items")
            self.columns.setdefault(key, [None] * (len(self.labels) - n)).extend(values)
        return ids

    def add(
        self,
        images: list[str | Path] | torch.Tensor,
        labels: list[str] | str | None = None,
        *,
        run: Run | str | Path | None = None,
        device: str | torch.device = "auto",
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Embed image files (or uint8 images (N, C, H, W)) with the run that built the index and add them;
        returns their ids and the conversions done to bring them to the run's input. ``labels``: a class name for
        all of them, one per image, or None (unlabelled); a new name becomes a new class."""
        embedder = self.embedder(run, device)
        pixels, conversions = self._pixels_of(images, embedder)
        names = [labels] * len(pixels) if isinstance(labels, str) else labels
        if names is not None and len(names) != len(pixels):
            raise PupilError(f"{len(pixels)} images but {len(names)} labels")
        index = [-1] * len(pixels) if names is None else [self._class_index(str(c)) for c in names]
        sources = [str(Path(p).resolve()) for p in images] if not isinstance(images, torch.Tensor) else None
        ids = self.add_embeddings(embedder(pixels), np.array(index, np.int64), sources)
        return ids, conversions

    def remove(self, ids: list[int] | np.ndarray) -> bool:
        """Remove items by id; an id that is not in the index (never added, or removed before) is refused before
        anything changes. Returns whether an HNSW index was rebuilt (tombstones past ``REBUILD_FRACTION``)."""
        ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
        unknown = ids[(ids < 0) | (ids >= len(self.alive))]
        known = ids[(ids >= 0) & (ids < len(self.alive))]
        unknown = np.concatenate([unknown, known[~self.alive[known]]])
        if len(unknown):
            shown = ", ".join(map(str, sorted(unknown.tolist())[:5])) + (" ..." if len(unknown) > 5 else "")
            raise PupilError(
                f"unknown id(s) {shown}: the index holds ids from 0 to {len(self.alive) - 1} that were not removed "
                f"({self.live} live items)"
            )
        if not len(ids):
            return False
        self.alive[ids] = False
        self._live -= len(ids)
        self.labels[ids] = -1
        for i in ids.tolist():
            self.sources[i] = ""
            for values in self.columns.values():
                values[i] = None
        self._params.clear()
        if self.kind != "hnsw":
            removed = numpy_call(self.index, "remove_ids")(ids)
            if removed != len(ids):
                raise PupilError(f"faiss removed {removed} of {len(ids)} ids: the index is inconsistent; rebuild it")
            return False
        self.tombstones = np.union1d(self.tombstones, ids)
        if len(self.tombstones) > REBUILD_FRACTION * self.index.ntotal:
            self.rebuild()
            return True
        return False

    def rebuild(self) -> None:
        """Rebuild an HNSW graph from its live vectors (read back from its flat storage); tombstones go."""
        faiss = _faiss()
        inner = faiss.downcast_index(self.index.index)
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        vectors = numpy_call(inner, "reconstruct_n")(0, self.index.ntotal)
        keep = self.alive[ids]
        index = _new_index(self.kind, self.dim, self.settings)
        if keep.any():
            numpy_call(index, "add_with_ids")(np.ascontiguousarray(vectors[keep]), ids[keep])
        self.index = index
        self.tombstones = np.empty(0, np.int64)
        self._params.clear()

    # -----------------------------------------------------------------------------------------------------------
    # Searching

    @property
    def index(self) -> Any:
        """The faiss index (``IndexIDMap2`` over flat or HNSW, or ``IndexIVFPQ``)."""
        return self._index

    @index.setter
    def index(self, index: Any) -> None:
        self._index = index
        self._search = numpy_call(index, "search")  # bound once: a query pays no lookups
        self.dim = int(index.d)

    def search(self, queries: np.ndarray, k: int, ef_search: int = 64, nprobe: int = DEFAULT_NPROBE) -> Hits:
        """The ``k`` nearest live items of each query (Q, D) unit vector: ids, cosine distances and labels.

        Refuses (one line) an empty index, ``k`` < 1 or larger than the live items, and queries of another
        dimension. ``ef_search`` is HNSW's candidate list (at least k is used); ``nprobe`` the IVF lists visited."""
        q = queries
        if type(q) is not np.ndarray or q.dtype != np.float32 or q.ndim != 2 or not q.flags.c_contiguous:
            q = _vectors(q[None] if np.ndim(q) == 1 else q, self.dim)  # the slow path: convert, or refuse
        if q.shape[1] != self.dim:
            raise PupilError(f"queries must be (N, {self.dim}) embeddings, not {tuple(q.shape)}")
        if type(k) is not int or not 0 < k <= self._live:
            k = self._check_k(k)
        try:
            params = self._params[ef_search, nprobe]
        except KeyError:
            params = self._search_params(ef_search, nprobe)
        d2, ids = self._search(q, k, params=params)
        if (ids.item(-1) < 0) if len(ids) == 1 else (ids[:, -1] < 0).any():  # faiss puts missing results last
            d2, ids = self._complete(q, k, d2, ids, ef_search, nprobe)
        d2 *= 0.5  # squared L2 of unit vectors -> cosine distance, in place
        return Hits(ids, d2, self.labels.take(ids))

    def _check_k(self, k: Any) -> int:
        if self._live == 0:
            raise PupilError("the search index is empty: add images to it first")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= self._live:
            raise PupilError(f"-k must be from 1 to the index's {self._live} live items, not {k}")
        return int(k)

    def _search_params(self, ef_search: int, nprobe: int):
        """faiss search parameters for these settings, with the tombstone filter; cached until the next removal."""
        key = (ef_search, nprobe)
        if key not in self._params:
            if ef_search < 1 or nprobe < 1:
                raise PupilError(f"--ef-search and --nprobe must be at least 1, not {ef_search} and {nprobe}")
            faiss = _faiss()
            if self.kind == "hnsw":
                p = faiss.SearchParametersHNSW()
                p.efSearch = ef_search
                if len(self.tombstones):  # faiss's wrappers keep the selectors alive as long as the parameters
                    p.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.tombstones))
            elif self.kind == "ivfpq":
                p = faiss.SearchParametersIVF()
                p.nprobe = min(nprobe, self.settings["nlist"])
            else:
                p = None
            self._params[key] = p
        return self._params[key]

    def _complete(self, q: np.ndarray, k: int, d2: np.ndarray, ids: np.ndarray, ef: int, nprobe: int):
        """Rows that came back with fewer than k results (an HNSW walk hemmed in by tombstones, IVF lists too
        few), searched again with efSearch and nprobe doubled until they are full, exactly at last."""
        short = np.flatnonzero((ids < 0).any(1))
        ntotal, nlist = self.index.ntotal, self.settings.get("nlist") or 1
        while len(short) and (ef < ntotal or (self.kind == "ivfpq" and nprobe < nlist)):
            ef, nprobe = min(2 * ef, ntotal), min(2 * nprobe, nlist)
            d2[short], ids[short] = numpy_call(self.index, "search")(
                q[short], k, params=self._search_params(ef, nprobe)
            )
            short = short[(ids[short] < 0).any(1)]
        if len(short):  # still short: exact search over the live vectors (flat storage: flat and hnsw)
            d2[short], ids[short] = self._exact(q[short], k)
        return d2, ids

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if self.kind == "ivfpq":
            raise PupilError("the ivfpq index returned fewer results than asked for with every list visited")
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        vectors = numpy_call(faiss.downcast_index(self.index.index), "reconstruct_n")(0, self.index.ntotal)
        keep = self.alive[ids]
        flat = faiss.IndexFlatL2(self.dim)
        numpy_call(flat, "add")(np.ascontiguousarray(vectors[keep]))
        d2, rows = numpy_call(flat, "search")(q, k)
        return d2, ids[keep][rows]

    def search_images(
        self,
        images: list[str | Path] | torch.Tensor,
        k: int = 10,
        ef_search: int = 64,
        *,
        run: Run | str | Path | None = None,
        device: str | torch.device = "auto",
    ) -> tuple[Hits, torch.Tensor, dict[str, int]]:
        """Search with image files (or uint8 images), embedded by the run that built the index: the hits, the
        query pixels as the model saw them, and the conversions done (size, mode...), which are never refused."""
        embedder = self.embedder(run, device)
        pixels, conversions = self._pixels_of(images, embedder)
        return self.search(embedder(pixels), k, ef_search), pixels, conversions

    # -----------------------------------------------------------------------------------------------------------
    # The model and the images behind the ids

    def check_run(self, run: Run) -> None:
        """Refuse a run whose weights or embedding differ from those the index was built with."""
        from pupil.search.embed import embedding_info

        self.check_embedding(embedding_info(run).as_dict())

    def check_embedding(self, info: dict[str, Any]) -> None:
        """Refuse an embedding (``EmbeddingInfo.as_dict()``) other than the one the index was built with: another
        run's weights or another dimension."""
        built = self.identity
        if info["weights_sha256"] != built.get("weights_sha256") or info["dim"] != built.get("dim"):
            raise PupilError(
                f"the index was built by {built.get('run')} (weights {built.get('weights_sha256')}, "
                f"{built.get('kind')} {built.get('dim')}-d); {info['run']} (weights {info['weights_sha256']}, "
                f"{info['kind']} {info['dim']}-d) is another model: query with the model that built it or build a "
                "new index"
            )

    def embedder(self, run: Run | str | Path | None = None, device: str | torch.device = "auto") -> Embedder:
        """The embedder of ``run`` (by default the run directory the index records), checked against the index."""
        from pupil.search.embed import Embedder

        if run is None and self._embedder is not None:
            return self._embedder
        if run is None:
            where = self.identity.get("run_dir")
            if not where or not Path(where).is_dir():
                raise PupilError(
                    f"the run that built the index, {self.identity.get('run')}, is not at {where}: give the run "
                    "directory (--run)"
                )
            run = where
        run = _as_run(run, device)
        self.check_run(run)
        self._embedder = Embedder(run, device)
        return self._embedder

    def _pixels_of(self, images: list[str | Path] | torch.Tensor, embedder: Embedder) -> tuple[torch.Tensor, dict]:
        """uint8 pixels of the run's input shape for files (decoded as ``pupil predict`` decodes them) or tensors,
        and the conversions counted on the way."""
        from pupil.data.images import read_images

        c, h, _ = embedder.info.input_shape
        if isinstance(images, torch.Tensor):
            before = dict(embedder.conversions)
            x = embedder.fit(images)
            return x, {k: v - before[k] for k, v in embedder.conversions.items() if v - before[k]}
        if not images:
            raise PupilError("give at least one image")
        decoded = read_images([Path(p) for p in images], img_size=h, mode="L" if c == 1 else "RGB")
        return decoded.images, {k: v for k, v in decoded.conversions.items() if v}

    def _class_index(self, name: str) -> int:
        if name not in self.classes:
            self.classes.append(name)
        return self.classes.index(name)

    def pixels(self, ids: list[int] | np.ndarray) -> list[torch.Tensor | None]:
        """The images behind ids (uint8 (C, H, W) as their source holds them), for a strip or a server; None where
        the source is gone (a removed item, a moved file, an item added as a tensor). A registered dataset is loaded
        once per index (``catalogues``), not per call: a server asks for a few items at a time, and loading
        Fashion-MNIST's training split took about a second. Safe to call from several threads."""
        from pupil.data import DATASETS
        from pupil.data.images import read_images

        out: list[torch.Tensor | None] = []
        for i in np.asarray(ids).reshape(-1).tolist():
            source = self.sources[i] if 0 <= i < len(self.sources) else ""
            ref = _dataset_ref(source, DATASETS)
            try:
                if ref is not None:
                    name, split, row = ref
                    out.append(self._catalogue(name, split).images[row])
                elif source and Path(source).is_file():
                    out.append(read_images([Path(source)]).images[0])
                else:
                    out.append(None)
            except (PupilError, IndexError):
                out.append(None)
        return out

    def _catalogue(self, name: str, split: str) -> ImageDataset:
        """A registered dataset's split, loaded on first use (one thread loads it; the others wait for it)."""
        from pupil.data import load

        ds = self.catalogues.get((name, split))
        if ds is None:
            with self._catalogue_lock:
                ds = self.catalogues.get((name, split))
                if ds is None:
                    ds = self.catalogues[name, split] = load(name, split, data_dir=self.data.get("data_dir"))
        return ds

    def describe(self) -> dict[str, Any]:
        """What the index is, for printing."""
        return {
            "kind": self.kind,
            "settings": self.settings,
            "live": self.live,
            "tombstones": len(self.tombstones),
            "next_id": len(self.labels),
            "embedding": self.identity,
            "data": self.data,
        }


# ---------------------------------------------------------------------------------------------------------------
# The catalogue: a dataset, a folder or a manifest, decoded to the run's input


def load_catalogue(
    data: str | Path | ImageDataset, split: str | None, data_dir: str | None, shape: tuple[int, int, int]
) -> tuple[ImageDataset, dict[str, Any]]:
    """The images to index, with the run's channels (and, for files, its size) and what they are.

    A registered dataset is read at ``split`` (default train, whole: no validation carve); a folder or manifest
    at ``split`` (default all), decoded to the run's mode and size exactly as training decodes files."""
    from pupil.data import DATASETS, ImageDataset, load

    c, h, _ = shape
    if isinstance(data, ImageDataset):
        return data, {"name": data.meta.get("name", "a dataset"), "split": data.meta.get("split"), "data_dir": None}
    name = str(data)
    if name in DATASETS:
        split = split or "train"
        ds = load(name, split, data_dir=data_dir, channels=c)
        return ds, {"name": name, "split": split, "data_dir": data_dir}
    path = Path(name)
    if not (path.is_dir() or path.suffix.lower() == ".csv"):
        raise PupilError(
            f"unknown data {name!r}: give one of {', '.join(DATASETS.names())}, an image folder, or a CSV manifest"
        )
    split = split or "all"
    ds = load(name, split, img_size=h, channels=c, min_per_class=1)
    return ds, {"name": str(path.resolve()), "split": split, "data_dir": None}


def catalogue_sources(ds: ImageDataset, described: dict[str, Any]) -> list[str]:
    """Each item's source: its file (absolute path), else ``<dataset>:<split>:<row>``."""
    if "path" in ds.columns:
        return [str(Path(p).resolve()) for p in ds.columns["path"]]
    return [f"{described['name']}:{described.get('split')}:{i}" for i in range(len(ds))]


def file_stamp(path: str | Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of a file, None when it is missing. ``save`` renames a new file over the old one,
    which gives the path another inode while the old file is still open or still there, so a change is seen even
    within the file system's mtime resolution."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _dataset_ref(source: str, datasets) -> tuple[str, str, int] | None:
    parts = source.rsplit(":", 2)
    if len(parts) == 3 and parts[0] in datasets and parts[2].isdigit():
        return parts[0], parts[1], int(parts[2])
    return None


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _vectors(vectors: Any, dim: int | None) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise PupilError(f"embeddings must be (N, {dim or 'D'}), not {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise PupilError("embeddings must be finite")
    return x


def _checksum(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: a flipped byte anywhere (the faiss
    index, labels, live flags, tombstones, sources) is caught before anything is used."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _check_out(out: Path) -> None:
    """Refuse to write an index over a folder or over a file that is not a search index."""
    if out.is_dir():
        raise PupilError(f"--out {out} is a folder; give a file name for the index")
    if out.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(out), "np") as f:
                ours = (f.metadata() or {}).get("format") == FORMAT
        except Exception:  # any unreadable file is not ours
            ours = False
        if not ours:
            raise PupilError(f"{out} exists and is not a pupil search index; choose another --out")


def _as_run(run: Run | str | Path, device: str | torch.device) -> Run:
    from pupil.run import Run, load_run
    from pupil.runtime import resolve_device

    if isinstance(run, Run):
        return run
    return load_run(run, device=resolve_device(device) if isinstance(device, str) else device)


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in dict.fromkeys([*CONVERSIONS, *a, *b])}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
