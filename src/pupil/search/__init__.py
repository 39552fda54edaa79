"""Visual search: a run's embeddings (``embed``), a faiss index over a catalogue that stays fresh as items are
added and removed (``index``), and a PNG strip of a query's neighbours (``strip``).

The functions below are what ``pupil index build|add|remove`` and ``pupil search`` call: plain arguments in, rich
output on the console, PupilError (one line) for anything the user can fix. Changing an index holds an exclusive
lock on a hidden ``.<index>.lock`` file beside it, so that two ``pupil index add`` at once cannot lose each
other's items; searching needs no lock, since every write replaces the file in one rename.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pupil.errors import PupilError

if TYPE_CHECKING:
    import numpy as np
    from rich.console import Console

    from pupil.search.index import Hits, SearchIndex

__all__ = ["index_add_command", "index_build_command", "index_remove_command", "search_command"]


def index_build_command(
    run: str | Path,
    data: str,
    out: str | Path,
    *,
    kind: str = "hnsw",
    hnsw_m: int = 32,
    ef_construction: int = 200,
    split: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
    console: Console | None = None,
) -> SearchIndex:
    """``pupil index build RUN DATA --out IDX``: embed DATA (a registered dataset's split, default train; an image
    folder or CSV manifest, default all of it) with RUN and write the index to IDX."""
    from pupil.search.index import SearchIndex, check_settings

    console = console or _console()
    check_settings(kind, hnsw_m, ef_construction)
    t0 = time.perf_counter()
    with locked(out, create=True):
        index = SearchIndex.build(
            run,
            data,
            out,
            kind,
            hnsw_m,
            ef_construction,
            split=split,
            data_dir=data_dir,
            device=device,
            progress=progress,
        )
    e, d = index.identity, index.data
    console.print(
        f"indexed {index.live:,} images of {d.get('name')} ({d.get('split')}) with {e['run']} "
        f"({e['kind']} embedding, {e['dim']}-d, weights {e['weights_sha256']}) as {_kind(index)} "
        f"in {time.perf_counter() - t0:.1f} s",
        markup=False,
    )
    _print_conversions(console, d.get("conversions") or {}, "converted to the model's input")
    console.print(f"wrote {out}", markup=False)
    return index


def index_add_command(
    index: str | Path,
    images: list[str | Path],
    *,
    label: str | None = None,
    run: str | Path | None = None,
    device: str = "auto",
    console: Console | None = None,
) -> np.ndarray:
    """``pupil index add IDX images...``: embed the images with the run that built the index and add them (with
    ``label`` when given); they are searchable as soon as the command returns. Prints each new id."""
    from pupil.search.index import SearchIndex

    console = console or _console()
    with locked(index):
        idx = SearchIndex.open(index)
        ids, conversions = idx.add(images, label, run=run, device=device)
        idx.save()
    for i, path in zip(ids.tolist(), images, strict=True):
        console.print(f"added id {i}: {path}", markup=False)
    _print_conversions(console, conversions, "converted to the model's input")
    console.print(f"{index}: {idx.live:,} items", markup=False)
    return ids


def index_remove_command(index: str | Path, ids: list[int], *, console: Console | None = None) -> None:
    """``pupil index remove IDX ids...``: remove items by id; an unknown id refuses the whole command."""
    from pupil.search.index import SearchIndex

    console = console or _console()
    if not ids:
        raise PupilError("give the ids to remove")
    with locked(index):
        idx = SearchIndex.open(index)
        rebuilt = idx.remove(ids)
        idx.save()
    how = "; the HNSW graph was rebuilt without its tombstones" if rebuilt else ""
    console.print(f"removed {len(set(ids))} item(s) from {index}: {idx.live:,} left{how}", markup=False)


def search_command(
    index: str | Path,
    images: list[str | Path],
    *,
    k: int = 10,
    ef_search: int = 64,
    out: str | Path | None = None,
    run: str | Path | None = None,
    device: str = "auto",
    console: Console | None = None,
) -> Hits:
    """``pupil search IDX image.png``: the k nearest catalogue items of each image, printed with ids, labels,
    cosine distances and sources; with ``out`` a PNG strip of the queries and their neighbours."""
    from rich.table import Table
    from rich.text import Text

    from pupil.search.index import SearchIndex
    from pupil.search.strip import search_rows, write_strip

    console = console or _console()
    idx = SearchIndex.open(index)
    t0 = time.perf_counter()
    hits, pixels, conversions = idx.search_images(images, k, ef_search, run=run, device=device)
    seconds = time.perf_counter() - t0
    for q, image in enumerate(images):
        table = Table(title=Text(f"{image}: {k} nearest of {idx.live:,} ({_kind(idx)}, efSearch {ef_search})"))
        for col, justify in (("#", "right"), ("id", "right"), ("label", "left"), ("distance", "right")):
            table.add_column(col, justify=justify)
        table.add_column("source", overflow="fold")
        for j in range(hits.ids.shape[1]):
            i, label = int(hits.ids[q, j]), int(hits.labels[q, j])
            name = idx.classes[label] if 0 <= label < len(idx.classes) else "-"
            cells = (str(j + 1), str(i), name, f"{hits.distances[q, j]:.4f}", _source(idx, i))
            table.add_row(*map(Text, cells))  # Text: no markup or :emoji: codes in names and paths
        console.print(table)
    _print_conversions(console, conversions, "query images converted to the model's input")
    console.print(f"embedded and searched {len(images)} image(s) in {seconds * 1e3:.1f} ms", markup=False)
    if out is not None:
        rows = search_rows(
            pixels,
            [Path(p).name for p in images],
            hits.ids,
            hits.distances,
            hits.labels,
            idx.pixels(hits.ids.ravel()),
            idx.classes,
        )
        console.print(f"wrote {write_strip(out, rows)}", markup=False)
    return hits


@contextmanager
def locked(index: str | Path, create: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``.<index>.lock`` beside the index while changing it (none where the system has
    no ``fcntl``); a second process gets a clear error instead of overwriting the first one's change. ``create``
    makes the index's folder when it is missing (a new index)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(index)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise PupilError(f"no search index at {path}: folder {path.parent} does not exist")
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PupilError(f"{path} is being changed by another pupil process; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _source(idx: SearchIndex, i: int) -> str:
    """An item's source with its manifest columns, for printing."""
    extra = [f"{k}={v[i]}" for k, v in idx.columns.items() if v[i] not in (None, "")]
    return " ".join([idx.sources[i] or "(added as pixels)", *extra])


def _kind(idx: SearchIndex) -> str:
    s = idx.settings
    if idx.kind == "hnsw":
        return f"HNSW M={s['hnsw_m']}"
    if idx.kind == "ivfpq":
        return f"IVF-PQ nlist={s['nlist']} m={s['pq_m']}"
    return "exact"


def _print_conversions(console: Console, conversions: dict[str, int], what: str) -> None:
    if done := {k: v for k, v in conversions.items() if v}:
        console.print(f"{what}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in done.items()), markup=False)


def _console() -> Console:
    from rich.console import Console

    return Console(soft_wrap=True)
