"""Retrieval: the model as a visual search engine. Test images are the queries, the training split is the gallery
(the catalogue), and the embedding is the run's (``pupil.search.embed``: penultimate features of a classifier, or
the embedding head of a metric-learning run).

- **Recall@K** (K = 1, 5, 10), overall and per label: the share of queries with at least one gallery item of their
  label among their K nearest (the metric-learning convention; Recall@1 is precision at 1).
- **MAP@R** (Musgrave et al. 2020, "A Metric Learning Reality Check", section 3.2): for a query whose label has R
  items in the gallery, AP@R = (1/R) sum_{i<=R} P(i) rel(i) over its R nearest, where P(i) is the precision of the
  first i and rel(i) whether the i-th is of its label; MAP@R is the mean over queries. Unlike Recall@1 it rewards
  a neighbourhood that holds the whole class, not one lucky neighbour.
- **Approximate search**: the gallery in a faiss index of the check's kind (HNSW by default, through pupil's own
  search path: id map, tombstone filter, labels), its recall@10 against exact search (the share of the exact 10
  nearest it returns), queries per second over all queries at once and the p50/p99 latency of one query at a
  time, all on one thread (``faiss.omp_set_num_threads(1)``), with exact search's queries per second beside them.
- **Recall@1 under corruption**: the shopper's blurry, dark photograph: the 19 corruptions of
  ``pupil.data.corruptions`` at severity 3 (saturate left out on grey images, where it changes nothing) applied to
  a class-stratified subset of the queries, as the corruption check applies them.
- **The worst queries**: those with the lowest AP@R, each with its nearest gallery images, for the card.

Quality figures use exact nearest neighbours (cosine similarity of the unit vectors, in float32), so that they
measure the embedding; the approximate index's own loss is its recall@10 against exact. The check runs when the
model keeps the feature contract and the run's data has a training split; otherwise ``unavailable`` says why (the
runner can then leave it out with a note; asked for anyway, it refuses in one line).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pupil.audit.common import (
    CHECKS,
    Allowed,
    AuditContext,
    Check,
    at_least,
    each,
    figure,
    headline,
    names_from,
    one_of,
    table,
    validate_settings,
)
from pupil.audit.corruption import subset
from pupil.data.corruptions import (
    CORRUPTIONS,
    GROUPS,
    REFERENCE_SIZE,
    SEVERITIES,
    corrupt,
    corruption_seed,
    parse_names,
)
from pupil.errors import PupilError
from pupil.results import png_data_uri

EXAMPLE_SIDE = 32  # worst-query images in results.json are at most this many pixels on a side
ANN_K = 10  # ANN recall is measured on the 10 nearest
REPEATS = 3  # timings of the batched searches; the best is kept


# ---------------------------------------------------------------------------------------------------------------
# Metrics: pure functions of embeddings and labels (tests compare them with naive loops and pytorch-metric-learning)


def exact_neighbours(
    queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, k: int, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar gallery rows of each query (unit vectors): similarities (Q, k) float32 and
    gallery indices (Q, k) int64, most similar first. Exact: one float32 matrix product per ``chunk`` queries."""
    q, g = torch.as_tensor(queries, dtype=torch.float32), torch.as_tensor(gallery, dtype=torch.float32)
    if not 1 <= k <= len(g):
        raise PupilError(f"cannot take the {k} nearest of a gallery of {len(g)}")
    sims, idx = [], []
    for part in q.split(chunk):
        s, i = (part @ g.T).topk(k, dim=1)  # (chunk, N) -> (chunk, k)
        sims.append(s)
        idx.append(i)
    if not sims:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def recall_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    """Per query and K, whether any of its first K neighbours (labels (Q, >= max K), nearest first) has its label."""
    hit = neighbour_labels == query_labels[:, None]  # (Q, K)
    return {k: hit[:, :k].any(1) for k in ks}


def average_precision_at_r(neighbour_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray) -> np.ndarray:
    """AP@R of each query (Musgrave et al. 2020): (1/R) sum_{i<=R} P(i) rel(i), with R the query's own count of
    relevant gallery items and ``neighbour_labels`` (Q, >= max R) its neighbours' labels, nearest first. A query
    whose label is not in the gallery (R = 0) scores 0."""
    width = int(r.max()) if len(r) else 0
    rel = neighbour_labels[:, :width] == query_labels[:, None]  # (Q, Rmax)
    rel &= np.arange(width)[None, :] < r[:, None]  # only the first R count
    precision = np.cumsum(rel, 1) / np.arange(1, width + 1)[None, :]
    return np.where(r > 0, (precision * rel).sum(1) / np.maximum(r, 1), 0.0)


def retrieval_metrics(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    ks: list[int],
    chunk: int = 256,
) -> dict[str, Any]:
    """Exact Recall@K and AP@R per query, and each query's ``max(ks)`` nearest (gallery indices, similarities).

    The neighbours are taken to R_max = the largest class's gallery count (MAP@R needs them all), ``chunk``
    queries at a time so memory stays at chunk x R_max."""
    counts = np.bincount(gallery_labels, minlength=int(max(query_labels.max(initial=0), gallery_labels.max()) + 1))
    r = counts[query_labels]
    depth = max(int(r.max(initial=0)), max(ks))
    top = max(ks)
    hits = {k: [] for k in ks}
    ap, nearest, sims = [], [], []
    for start in range(0, len(queries), chunk):
        s, idx = exact_neighbours(queries[start : start + chunk], gallery, min(depth, len(gallery)), chunk)
        labels, y = gallery_labels[idx], query_labels[start : start + chunk]
        for k, v in recall_at_k(labels, y, ks).items():
            hits[k].append(v)
        ap.append(average_precision_at_r(labels, y, r[start : start + chunk]))
        nearest.append(idx[:, :top])
        sims.append(s[:, :top])
    return {
        "hits": {k: np.concatenate(v) for k, v in hits.items()},
        "ap_at_r": np.concatenate(ap),
        "r": r,
        "nearest": np.concatenate(nearest),
        "similarity": np.concatenate(sims),
    }


def ann_recall(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact k nearest (ids (Q, k)) that the approximate search returned (Q, k)."""
    found = (approximate[:, :, None] == exact[:, None, :]).any(1)  # (Q, k): exact neighbour j found
    return float(found.mean())


# ---------------------------------------------------------------------------------------------------------------
# The check


@dataclass
class RetrievalConfig:
    n_queries: int = 0
    """Test images used as queries: 0 = all, otherwise a class-stratified subset drawn with the seed."""
    n_gallery: int = 0
    """Training images in the gallery: 0 = the whole train split, otherwise a class-stratified subset."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """K of Recall@K (1, 5 and 10 are always measured: the summary reports them)."""
    kind: str = "hnsw"
    """Approximate index measured against exact search: hnsw, ivfpq or flat (exact, for reference)."""
    hnsw_m: int = 32
    """HNSW: links per node (M)."""
    ef_construction: int = 200
    """HNSW: candidate list while building (efConstruction)."""
    ef_search: int = 64
    """HNSW: candidate list per query (efSearch)."""
    latency_queries: int = 1000
    """Queries searched one at a time for the p50/p99 latency."""
    corruptions: list[str] = field(default_factory=lambda: ["all"])
    """Corruptions applied to the queries (names, or the groups all, common, extra); empty: none."""
    severity: int = 3
    """Severity of every corruption, 1 (mild) to 5 (severe)."""
    n_corrupt: int = 1000
    """Queries corrupted (a class-stratified subset of the queries; 0 = all of them)."""
    worst: int = 8
    """Worst queries (lowest AP@R) shown with their neighbours."""
    neighbours: int = 5
    """Neighbours shown beside each worst query."""
    batch_size: int = 500
    """Images embedded (and corrupted) at once."""

    def __post_init__(self):
        once = at_least(1)
        validate_settings(
            self,
            "retrieval",
            n_queries=at_least(0),
            n_gallery=at_least(0),
            ks=each(once, "K"),
            kind=one_of("hnsw", "ivfpq", "flat"),
            hnsw_m=at_least(2),
            ef_construction=once,
            ef_search=once,
            latency_queries=at_least(0),
            corruptions=names_from([*GROUPS, *CORRUPTIONS], "corruption", empty=True),
            severity=Allowed("{type} from 1 to 5", lambda v: v in SEVERITIES),
            n_corrupt=at_least(0),
            worst=at_least(0),
            neighbours=once,
            batch_size=once,
        )


@CHECKS.register("retrieval")
class Retrieval(Check):
    name, title, Config = "retrieval", "Retrieval (visual search)", RetrievalConfig
    requires, extra = ("faiss",), "trust"
    quick = {"n_queries": 2000, "n_gallery": 20000, "n_corrupt": 300, "latency_queries": 300}

    def unavailable(self, ctx: AuditContext) -> str:
        """Why the check cannot run on this run ("" when it can): no feature contract, or no training split."""
        if not ctx.features:
            return "the model keeps no feature contract (forward_features, forward_head(pre_logits=True))"
        try:
            gallery_split(ctx)
        except PupilError as e:
            return f"its gallery is the training split, which this run's data lacks ({e})"
        return ""

    def run(self, ctx: AuditContext, cfg: RetrievalConfig) -> dict:
        from pupil.search.embed import Embedder

        if why := self.unavailable(ctx):
            raise PupilError(f"the retrieval check cannot run: {why}")
        train = gallery_split(ctx)
        embedder = Embedder(ctx.run, ctx.device, ctx.batch(cfg.batch_size))
        qidx = subset(ctx.test.targets, cfg.n_queries, ctx.seed)
        gidx = subset(train.targets, cfg.n_gallery, ctx.seed)
        ks = sorted(set(cfg.ks) | {1, 5, ANN_K})  # the summary's Recall@1/5/10 and the ANN's exact 10 nearest
        if max(ks) > len(gidx):
            raise PupilError(f"retrieval: the gallery has {len(gidx)} images, fewer than K = {max(ks)}")
        queries = embedder.embed(ctx.test.images[qidx])
        gallery = embedder.embed(train.subset(gidx))
        qy, gy = ctx.test.targets[qidx].numpy(), train.targets[gidx].numpy()
        m = retrieval_metrics(queries, qy, gallery, gy, ks)
        notes = self._notes(ctx, cfg, embedder.info.as_dict(), len(qidx), len(gidx), len(train))
        ann = measure_ann(queries, gallery, gy, m["nearest"][:, :ANN_K], cfg, embedder.info.as_dict())
        corrupted = self._corrupted(ctx, cfg, embedder, qidx, gallery, gy, m, notes)
        recall = {str(k): float(m["hits"][k].mean()) for k in ks}
        metrics: dict[str, Any] = {
            "embedding": embedder.info.kind,
            "dim": embedder.info.dim,
            "n_queries": len(qidx),
            "of_queries": len(ctx.test),
            "n_gallery": len(gidx),
            "of_gallery": len(train),
            "recall": recall,
            "map_at_r": float(m["ap_at_r"].mean()),
            "mean_r": float(m["r"].mean()),
            "ann": ann,
        }
        if corrupted is not None:
            metrics["corruption"] = corrupted
        worst = self._worst(ctx, cfg, qidx, train, gidx, qy, gy, m)
        tables, curves, figures = self._presentation(cfg, self._by_label(ctx, ks, qy, m), corrupted, worst, ks)
        return {
            "headline": headline("MAP@R", metrics["map_at_r"], True, "fraction"),
            "summary": {
                "map_at_r": metrics["map_at_r"],
                "recall_at_1": recall["1"],
                "recall_at_5": recall["5"],
                "recall_at_10": recall["10"],
                "ann_recall_at_10": ann["recall_at_10"],
                "qps": ann["qps"],
                "latency_ms_p50": ann["latency_ms_p50"],
                "latency_ms_p99": ann["latency_ms_p99"],
                "corrupted_recall_at_1": corrupted["mean_recall_at_1"] if corrupted else None,
                "embedding": embedder.info.kind,
                "dim": embedder.info.dim,
            },
            "metrics": metrics,
            "per_image": {
                "index": qidx.long(),
                "hit_at_1": torch.from_numpy(m["hits"][1]),
                "ap_at_r": torch.from_numpy(m["ap_at_r"].astype(np.float32)),
            },
            "tables": tables,
            "curves": curves,
            "figures": figures,
            "notes": notes,
        }

    @staticmethod
    def _presentation(
        cfg: RetrievalConfig, by_label: dict, corrupted: dict | None, worst: list[dict], ks: list[int]
    ) -> tuple[dict, dict, list[dict]]:
        """The section's tables, curves and figures: MAP@R per label, Recall@1 per corruption, the worst queries."""
        tables, curves = {"by_label": by_label}, {"worst_queries": worst}
        figures = [
            figure(
                "MAP@R of each label's queries",
                "bars",
                table="by_label",
                labels="label",
                values="MAP@R",
                xlabel="MAP@R",
                xlim=[0, 1],
            ),
        ]
        if corrupted is not None:
            names, clean = list(corrupted["recall_at_1"]), corrupted["clean_recall_at_1"]
            curves["corrupted"] = {"corruption": names, "recall_at_1": [corrupted["recall_at_1"][c] for c in names]}
            rows = [[c, v, clean - v] for c, v in corrupted["recall_at_1"].items()]
            tables["by_corruption"] = table(["corruption", "recall@1", "drop"], rows)
            caption = f"Recall@1 of corrupted queries (severity {cfg.severity}; clean: {clean:.1%})"
            figures.append(
                figure(
                    caption,
                    "bars",
                    "corrupted",
                    labels="corruption",
                    values="recall_at_1",
                    xlabel="Recall@1",
                    xlim=[0, 1],
                )
            )
        if worst:
            caption = "The worst queries (lowest AP@R), each followed by its nearest training images"
            per_row = 1 + min(cfg.neighbours, max(ks))
            figures.append(figure(caption, "images", "worst_queries", per_row=per_row))
        return tables, curves, figures

    @staticmethod
    def _by_label(ctx: AuditContext, ks: list[int], qy: np.ndarray, m: dict) -> dict:
        rows = []
        for c, name in enumerate(ctx.test.classes):
            sel = qy == c
            if not sel.any():
                continue
            row = [name, int(sel.sum()), int(m["r"][sel][0])]
            row += [float(m["hits"][k][sel].mean()) for k in ks]
            rows.append([*row, float(m["ap_at_r"][sel].mean())])
        return table(["label", "queries", "R", *[f"recall@{k}" for k in ks], "MAP@R"], rows)

    @staticmethod
    def _corrupted(ctx, cfg, embedder, qidx, gallery, gy, m, notes) -> dict[str, Any] | None:
        """Recall@1 of corrupted copies of a stratified subset of the queries (exact search), per corruption."""
        names = parse_names(cfg.corruptions) if cfg.corruptions else []
        images = ctx.test.images
        if images.shape[1] == 1 and "saturate" in names and "saturate" not in cfg.corruptions:
            names.remove("saturate")
            notes.append("saturate was left out: it is the identity on grey images")
        if not names:
            return None
        pick = subset(ctx.test.targets[qidx], cfg.n_corrupt, ctx.seed)  # positions among the queries
        chosen, y = images[qidx[pick]], ctx.test.targets[qidx[pick]].numpy()
        scale = min(images.shape[-2:]) / REFERENCE_SIZE
        out = {}
        for name in names:
            g = torch.Generator(device=ctx.device).manual_seed(corruption_seed(ctx.seed, name, cfg.severity))
            parts = []
            for chunk in chosen.split(ctx.batch(cfg.batch_size)):
                x = corrupt(chunk.to(ctx.device).float().div_(255), name, cfg.severity, g, scale)
                parts.append(embedder(x))
            _, nearest = exact_neighbours(np.concatenate(parts), gallery, 1)
            out[name] = float((gy[nearest[:, 0]] == y).mean())
        clean = float(m["hits"][1][pick.numpy()].mean())
        notes.append(
            f"Recall@1 under {len(names)} corruptions at severity {cfg.severity} on a class-stratified subset of "
            f"{len(pick)} of the {len(qidx)} queries (seed {ctx.seed}; pixel lengths scaled by {scale:.3g}); clean "
            "Recall@1 is on the same queries"
        )
        worst = min(out, key=out.get)
        return {
            "severity": cfg.severity,
            "n": len(pick),
            "clean_recall_at_1": clean,
            "mean_recall_at_1": float(np.mean(list(out.values()))),
            "worst": worst,
            "recall_at_1": out,
        }

    @staticmethod
    def _worst(ctx, cfg, qidx, train, gidx, qy, gy, m) -> list[dict[str, str]]:
        """Image tiles for the card: each worst query, then its nearest gallery images (label, distance)."""
        if not cfg.worst:
            return []
        order = np.lexsort((np.arange(len(qy)), m["ap_at_r"]))[: cfg.worst]  # lowest AP@R, ties by position
        classes, tiles = ctx.test.classes, []
        n = min(cfg.neighbours, m["nearest"].shape[1])
        for q in order.tolist():
            image = ctx.test.images[int(qidx[q])]
            tiles.append(
                {
                    "image": png_data_uri(image, EXAMPLE_SIDE),
                    "title": f"query: {classes[qy[q]]}\nAP@R {m['ap_at_r'][q]:.2f}",
                }
            )
            for j in range(n):
                g = int(m["nearest"][q, j])
                label = classes[gy[g]]
                mark = "" if gy[g] == qy[q] else " ✗"
                tiles.append(
                    {
                        "image": png_data_uri(train.images[int(gidx[g])], EXAMPLE_SIDE),
                        "title": f"{label}{mark}\nd {1 - m['similarity'][q, j]:.3f}",
                    }
                )
        return tiles

    @staticmethod
    def _notes(ctx: AuditContext, cfg: RetrievalConfig, info: dict, nq: int, ng: int, ntrain: int) -> list[str]:
        kind = {"penultimate": "the penultimate features of the classifier", "metric": "the metric-learned embedding"}
        notes = [
            f"Embedding: {kind[info['kind']]} ({info['dim']}-d, L2-normalised; weights {info['weights_sha256']}); "
            "distances are cosine distances, 1 - cos.",
            f"Queries: {nq:,} of {len(ctx.test):,} test images"
            + (f" (class-stratified subset, seed {ctx.seed})" if nq < len(ctx.test) else "")
            + f"; gallery: {ng:,} of the {ntrain:,} images of the training split"
            + (f" (class-stratified subset, seed {ctx.seed})" if ng < ntrain else "")
            + " (the validation images carved from it are not in the gallery).",
            "Recall@K and MAP@R come from exact search; the approximate index is measured against it.",
        ]
        if ctx.model.tta:
            notes.append("The run predicts with flip TTA; embeddings are of the un-flipped image.")
        if ctx.dtype is not None:
            notes.append(f"Embeddings are computed in float32 (the audit's {ctx.dtype} is not used for them).")
        return notes


def gallery_split(ctx: AuditContext):
    """The run's training split (the validation carve left out), read once per audit."""
    key = "retrieval/train"
    if key not in ctx._cache:
        ctx._cache[key] = ctx.run.split("train")
    return ctx._cache[key]


def measure_ann(
    queries: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    exact_top: np.ndarray,
    cfg: RetrievalConfig,
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Build the gallery's index (all threads), then on one thread: recall@10 of pupil's search path against the
    exact neighbours ``exact_top`` (Q, 10), queries/s over all queries at once (best of ``REPEATS``), p50/p99
    latency of one query at a time, and exact (IndexFlatL2) queries/s for reference."""
    import faiss

    from pupil.search.index import SearchIndex, numpy_call

    t0 = time.perf_counter()
    index = SearchIndex.from_embeddings(
        gallery,
        gallery_labels,
        identity=identity,
        kind=cfg.kind,
        hnsw_m=cfg.hnsw_m,
        ef_construction=cfg.ef_construction,
    )
    build_s = time.perf_counter() - t0
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.search(queries[:16], ANN_K, cfg.ef_search)  # warm-up
        batch = []
        for _ in range(REPEATS):  # the best of a few: other work on the machine only ever slows a timing down
            t0 = time.perf_counter()
            hits = index.search(queries, ANN_K, cfg.ef_search)
            batch.append(time.perf_counter() - t0)
        qps = len(queries) / min(batch)
        times = []
        for q in queries[: cfg.latency_queries]:
            t0 = time.perf_counter()
            index.search(q[None], ANN_K, cfg.ef_search)
            times.append(time.perf_counter() - t0)
        flat = faiss.IndexFlatL2(gallery.shape[1])
        numpy_call(flat, "add")(gallery)
        exact = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            numpy_call(flat, "search")(queries, ANN_K)
            exact.append(time.perf_counter() - t0)
        exact_qps = len(queries) / min(exact)
    finally:
        faiss.omp_set_num_threads(threads)
    ms = np.array(times) * 1e3
    return {
        "kind": cfg.kind,
        "hnsw_m": cfg.hnsw_m if cfg.kind == "hnsw" else None,
        "ef_construction": cfg.ef_construction if cfg.kind == "hnsw" else None,
        "ef_search": cfg.ef_search if cfg.kind == "hnsw" else None,
        "recall_at_10": ann_recall(hits.ids, exact_top),
        "qps": qps,
        "latency_ms_p50": float(np.percentile(ms, 50)) if len(ms) else None,
        "latency_ms_p99": float(np.percentile(ms, 99)) if len(ms) else None,
        "latency_queries": len(ms),
        "exact_qps": exact_qps,
        "build_s": build_s,
        "threads": 1,
    }
