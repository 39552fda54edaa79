"""Visual search on Fashion-MNIST: three embeddings, exact against approximate search, pupil's search path against
raw faiss, and the latency from a query image to its neighbours, all measured in one invocation.

1. Embeddings (each L2-normalised): raw pixels (784-d); the penultimate features of the default run
   ``runs/fmnist_fast`` (``--fast``); the embedding of a metric-learning run ``runs/fmnist_metric`` (``--metric``),
   a row skipped with a note when that run does not exist. Queries: the test split (10,000); gallery: the training
   split of ``--fast`` as its run carves it (60,000 minus its 5,000 validation images), the same for all three.
   ``--queries`` and ``--gallery`` take class-stratified subsets (seeded).
2. Quality: MAP@R (Musgrave et al. 2020) and Recall@1 by exact search (``pupil.audit.retrieval``).
3. Speed, one thread everywhere (``faiss.omp_set_num_threads(1)``, numpy's BLAS limited by threadpoolctl, torch
   ``set_num_threads(1)``): exact search by faiss ``IndexFlatL2`` and by plain numpy (matrix product and
   ``argpartition``, 256 queries at a time); HNSW (``--hnsw-m``, ``--ef-construction``; built on all threads) at
   each ``--ef`` value: recall@10 against exact and queries/s. Raw faiss is the HNSW graph searched directly
   (``SearchParametersHNSW``); pupil is ``SearchIndex.search`` on the same graph (id map, tombstone filter, label
   lookup), so the two have the same recall and their ratio is the cost of pupil's path. Both are timed over all
   queries at once and one query per call, alternating, best of ``--repeats``.
4. Image to neighbours (``--fast`` run): PNG files of test images, each through ``SearchIndex.search_images``
   (decode, convert, embed, search k = 10 at efSearch 64) at batch 1 on one thread; p50/p99 over ``--latency``
   images after a warm-up, with the median of each part.

Writes benchmarks/results/search.json; ``readme_table`` (also ``render``) turns it into the README's block. Timings
on a shared machine are noisy: the load average at start and end is recorded, not corrected for.

    python benchmarks/search.py [--quick] [--fast runs/fmnist_fast] [--metric runs/fmnist_metric]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GOAL_RATIO = 0.9  # pupil's search path vs raw faiss's queries/s
GOAL_RECALL, GOAL_QPS, GOAL_DIM = 0.995, 15_000, 128  # recall@10 at queries/s on one thread, for <= 128-d
GOAL_P99_MS = 3.0  # image to neighbours at batch 1
K = 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~1-minute smoke run: 1,000 queries, a 10,000 gallery")
    p.add_argument("--fast", default=str(ROOT / "runs/fmnist_fast"), help="the default (classification) run")
    p.add_argument("--metric", default=str(ROOT / "runs/fmnist_metric"), help="a metric-learning run, if any")
    p.add_argument("--queries", type=int, default=0, help="test queries (0: all 10,000)")
    p.add_argument("--gallery", type=int, default=0, help="gallery images (0: the whole train split)")
    p.add_argument("--hnsw-m", type=int, default=16, help="HNSW M (the issue's reference figures use 16)")
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef", default="16,32,64,128,256", help="efSearch values")
    p.add_argument("--latency", type=int, default=1000, help="query images timed one by one")
    p.add_argument("--repeats", type=int, default=3, help="timings per measurement (the best is kept)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/search.json"))
    args = p.parse_args()
    if args.quick:
        args.queries, args.gallery = args.queries or 1000, args.gallery or 10_000
        args.ef, args.latency, args.repeats = "32,64,128", min(args.latency, 200), 2
    efs = [int(v) for v in args.ef.split(",")]
    data = run(args, efs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(readme_table(data))
    print(f"wrote {out}")


def run(args: argparse.Namespace, efs: list[int]) -> dict:
    from pupil.audit.corruption import subset
    from pupil.audit.retrieval import retrieval_metrics
    from pupil.run import load_run
    from pupil.search.embed import Embedder

    load_start, t_start = os.getloadavg()[0], time.perf_counter()
    fast = load_run(args.fast)
    test, train = fast.split("test"), fast.split("train")
    qidx, gidx = subset(test.targets, args.queries, 0), subset(train.targets, args.gallery, 0)
    qx, gx = test.images[qidx], train.images[gidx]
    qy, gy = test.targets[qidx].numpy(), train.targets[gidx].numpy()
    gallery_note = (
        f"{len(gidx):,} of the {len(train):,} training images of {Path(args.fast).name} (60,000 minus its "
        f"{fast.info['data']['val_size']:,}-image validation carve)"
        + (", class-stratified subset" if args.gallery else "")
    )
    sources: list[tuple[str, object]] = [("raw pixels", None), ("penultimate", fast)]
    skipped = []
    if Path(args.metric).is_dir():
        sources.append(("metric", load_run(args.metric)))
    else:
        skipped.append(f"metric-learned embedding: no run at {args.metric} (train recipes/fmnist_metric.yaml)")
    rows, fast_index = [], None
    for name, r in sources:
        t0 = time.perf_counter()
        if r is None:
            q, g = pixels(qx), pixels(gx)
            info = {"kind": "pixels", "dim": q.shape[1], "run": "raw pixels", "weights_sha256": ""}
        else:
            e = Embedder(r, "cpu", 512)
            q, g, info = e.embed(qx), e.embed(gx), e.info.as_dict()
        embed_s = time.perf_counter() - t0
        m = retrieval_metrics(q, qy, g, gy, [1, 5, K])
        row = {
            "embedding": name,
            "run": info["run"],
            "dim": int(q.shape[1]),
            "map_at_r": float(m["ap_at_r"].mean()),
            "recall_at_1": float(m["hits"][1].mean()),
            "recall_at_10": float(m["hits"][K].mean()),
            "embed_s": embed_s,
        }
        row |= speed(q, g, gy, info, args, efs)
        rows.append(row)
        print(f"{name}: MAP@R {row['map_at_r']:.4f}, Recall@1 {row['recall_at_1']:.4f}", flush=True)
        if name == "penultimate":
            fast_index = row.pop("_index")
        row.pop("_index", None)
    latency = image_latency(fast, fast_index, test.images[qidx[: args.latency]], args)
    return {
        "machine": machine(),
        "settings": {
            "quick": args.quick,
            "queries": len(qidx),
            "gallery": gallery_note,
            "gallery_size": len(gidx),
            "hnsw_m": args.hnsw_m,
            "ef_construction": args.ef_construction,
            "ef_search": efs,
            "k": K,
            "repeats": args.repeats,
            "threads": 1,
        },
        "embeddings": rows,
        "skipped": skipped,
        "latency": latency,
        "goals": goals(rows, latency),
        "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - t_start,
    }


def pixels(images: torch.Tensor) -> np.ndarray:
    """Raw pixels as L2-normalised float32 vectors (N, C*H*W)."""
    x = images.reshape(len(images), -1).float().div(255).numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def speed(q: np.ndarray, g: np.ndarray, gy: np.ndarray, info: dict, args, efs: list[int]) -> dict:
    """Exact (faiss, numpy) and HNSW (raw faiss, pupil) queries/s and recall@10 on one thread."""
    import faiss
    from threadpoolctl import threadpool_limits

    from pupil.search.index import SearchIndex, numpy_call

    t0 = time.perf_counter()
    index = SearchIndex.from_embeddings(
        g, gy, identity=info, kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction
    )
    build_s = time.perf_counter() - t0
    raw = faiss.downcast_index(index.index.index)  # the same graph, without pupil's id map and bookkeeping
    raw_search = numpy_call(raw, "search")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            flat = faiss.IndexFlatL2(g.shape[1])
            numpy_call(flat, "add")(g)
            exact_s, (_, truth) = best(lambda: numpy_call(flat, "search")(q, K), args.repeats)
            numpy_s, mine = best(lambda: numpy_knn(q, g, K), args.repeats)
        rows = []
        for ef in efs:
            params = faiss.SearchParametersHNSW(efSearch=ef)
            sides = {
                "raw": lambda x, ef=ef, params=params: raw_search(x, K, params=params),
                "pupil": lambda x, ef=ef: index.search(x, K, ef_search=ef),
            }
            t = {side: [] for side in sides}
            t1 = {side: [] for side in sides}
            for _ in range(args.repeats):  # alternate the sides so that the machine's load falls on both
                for side, fn in sides.items():
                    t[side].append(timed(lambda fn=fn: fn(q)))
                    t1[side].append(timed(lambda fn=fn: [fn(q[i : i + 1]) for i in range(min(len(q), 2000))]))
            hits = index.search(q, K, ef_search=ef)
            _, raw_ids = raw_search(q, K, params=params)
            n1 = min(len(q), 2000)
            rows.append(
                {
                    "ef_search": ef,
                    "recall_at_10": recall(hits.ids, truth),
                    "same_as_raw": bool((raw_ids == hits.ids).all()),
                    "raw_qps": len(q) / min(t["raw"]),
                    "pupil_qps": len(q) / min(t["pupil"]),
                    "ratio": min(t["raw"]) / min(t["pupil"]),
                    "raw_qps_batch1": n1 / min(t1["raw"]),
                    "pupil_qps_batch1": n1 / min(t1["pupil"]),
                    "ratio_batch1": min(t1["raw"]) / min(t1["pupil"]),
                }
            )
    finally:
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(torch_threads)
    return {
        "exact": {
            "faiss_qps": len(q) / exact_s,
            "numpy_qps": len(q) / numpy_s,
            "numpy_recall_at_10": recall(mine, truth),  # the two exact searches agree (ties aside)
        },
        "hnsw": {"build_s": build_s, "build_threads": threads, "rows": rows},
        "_index": index,
    }


def numpy_knn(q: np.ndarray, g: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Exact k nearest by plain numpy: |q|^2 - 2 q.g + |g|^2, argpartition, then sort the k."""
    g2 = (g * g).sum(1)
    out = []
    for s in range(0, len(q), chunk):
        d = g2[None, :] - 2 * q[s : s + chunk] @ g.T  # (chunk, N); |q|^2 is constant per row
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.take_along_axis(d, part, 1).argsort(1)
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float((found[:, :, None] == truth[:, None, :]).any(1).mean())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best(fn, repeats: int):
    """The shortest of ``repeats`` timings of ``fn`` and its (last) result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def image_latency(run, index, images: torch.Tensor, args) -> dict:
    """p50/p99 from a PNG file to its 10 neighbours at batch 1 on one thread, and each part's median."""
    import faiss
    from PIL import Image

    from pupil.data.images import read_images
    from pupil.search.embed import Embedder

    index._embedder = Embedder(run, "cpu")  # the run that built it (no reload per query)
    threads, torch_threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    parts = {"decode": [], "embed": [], "search": []}
    total = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, img in enumerate(images):
                paths.append(Path(tmp) / f"{i}.png")
                Image.fromarray(img[0].numpy()).save(paths[-1])
            for p in paths[:20]:  # warm-up
                index.search_images([p], K, 64)
            for p in paths:
                t0 = time.perf_counter()
                index.search_images([p], K, 64)
                total.append(time.perf_counter() - t0)
            for p in paths:  # the parts, timed apart
                t0 = time.perf_counter()
                x = read_images([p], img_size=28, mode="L").images
                t1 = time.perf_counter()
                z = index._embedder(x)
                t2 = time.perf_counter()
                index.search(z, K, 64)
                t3 = time.perf_counter()
                for key, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    parts[key].append(v)
    finally:
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(torch_threads)
    ms = np.array(total) * 1e3
    return {
        "run": run.name,
        "model": run.info["model"]["name"],
        "n": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "parts_median_ms": {k: float(np.median(v) * 1e3) for k, v in parts.items()},
    }


def goals(rows: list[dict], latency: dict) -> list[dict]:
    """Each goal of the issue with what was measured and whether it was met."""
    out = []
    worst_ratio = min(r["ratio"] for row in rows for r in row["hnsw"]["rows"])
    worst_ratio1 = min(r["ratio_batch1"] for row in rows for r in row["hnsw"]["rows"])
    out.append(
        {
            "goal": "pupil's search path vs raw faiss, same graph and efSearch (worst row, all queries at once)",
            "measured": worst_ratio,
            "target": f">= {GOAL_RATIO}x",
            "met": worst_ratio >= GOAL_RATIO,
        }
    )
    out.append(
        {
            "goal": "the same, one query per call",
            "measured": worst_ratio1,
            "target": f">= {GOAL_RATIO}x",
            "met": worst_ratio1 >= GOAL_RATIO,
        }
    )
    for row in rows:
        if row["dim"] > GOAL_DIM:
            continue
        ok = [r["pupil_qps"] for r in row["hnsw"]["rows"] if r["recall_at_10"] >= GOAL_RECALL]
        out.append(
            {
                "goal": f"{row['embedding']} ({row['dim']}-d): queries/s at recall@10 >= {GOAL_RECALL}, one thread",
                "measured": max(ok) if ok else None,
                "target": f">= {GOAL_QPS:,}",
                "met": bool(ok) and max(ok) >= GOAL_QPS,
            }
        )
    out.append(
        {
            "goal": f"image to neighbours, p99 at batch 1 ({latency['model']})",
            "measured": latency["p99_ms"],
            "target": f"<= {GOAL_P99_MS} ms",
            "met": latency["p99_ms"] <= GOAL_P99_MS,
        }
    )
    by = {r["embedding"]: r["map_at_r"] for r in rows}
    if "metric" in by:
        met = by["metric"] > by["penultimate"] > by["raw pixels"]
        measured = f"{by['metric']:.4f} > {by['penultimate']:.4f} > {by['raw pixels']:.4f}"
    else:
        met, measured = None, f"no metric run; penultimate {by['penultimate']:.4f}, raw pixels {by['raw pixels']:.4f}"
    out.append({"goal": "MAP@R: metric > penultimate > raw pixels", "measured": measured, "target": "", "met": met})
    return out


def machine() -> dict:
    import faiss

    import pupil

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_bf16": any("avx512_bf16" in line for line in lines if line.startswith("flags")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "pupil": pupil.__version__,
    }


# --- the README ---------------------------------------------------------------------------------------------


def readme_table(data: dict) -> str:
    """The README's block from search.json: quality per embedding, exact and HNSW speed, latency, goals."""
    m, s = data["machine"], data["settings"]
    lines = [
        f"Fashion-MNIST, {s['queries']:,} test queries against a gallery of {s['gallery']}"
        f"{' (a --quick run)' if s['quick'] else ''}. One thread for every search (faiss {m['faiss']}, {m['cpu']}; "
        f"1-minute load average {data['load_avg_1min']['start']:.2f} before, {data['load_avg_1min']['end']:.2f} "
        f"after). HNSW M = {s['hnsw_m']}, efConstruction = {s['ef_construction']}, k = {s['k']}; queries/s are the "
        f"best of {s['repeats']} alternating timings.",
        "",
        "| embedding | dim | MAP@R | Recall@1 | Recall@10 | exact faiss q/s | exact numpy q/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["embeddings"]:
        e = r["exact"]
        lines.append(
            f"| {r['embedding']} (`{r['run']}`) | {r['dim']} | {r['map_at_r']:.4f} | {r['recall_at_1']:.2%} "
            f"| {r['recall_at_10']:.2%} | {e['faiss_qps']:,.0f} | {e['numpy_qps']:,.0f} |"
        )
    for note in data.get("skipped", []):
        lines.append(f"| {note} | | | | | | |")
    lines += [
        "",
        "| embedding | efSearch | recall@10 vs exact | raw faiss q/s | pupil q/s | pupil / raw | batch 1: raw q/s "
        "| pupil q/s | pupil / raw |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["embeddings"]:
        for h in r["hnsw"]["rows"]:
            lines.append(
                f"| {r['embedding']} | {h['ef_search']} | {h['recall_at_10']:.4f} | {h['raw_qps']:,.0f} "
                f"| {h['pupil_qps']:,.0f} | {h['ratio']:.2f}x | {h['raw_qps_batch1']:,.0f} "
                f"| {h['pupil_qps_batch1']:,.0f} | {h['ratio_batch1']:.2f}x |"
            )
    lat = data["latency"]
    p = lat["parts_median_ms"]
    lines += [
        "",
        f"From a PNG file to its {s['k']} neighbours with `{lat['run']}` ({lat['model']}), batch 1, one thread, "
        f"{lat['n']:,} images: p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms (medians: decode "
        f"{p['decode']:.2f} ms, embed {p['embed']:.2f} ms, search {p['search']:.3f} ms).",
        "",
        "| goal | measured | target | met |",
        "| --- | ---: | --- | --- |",
    ]
    for g in data["goals"]:
        v = g["measured"]
        shown = f"{v:,.2f}" if isinstance(v, float) else ("—" if v is None else str(v))
        met = {True: "yes", False: "**no**", None: "—"}[g["met"]]
        lines.append(f"| {g['goal']} | {shown} | {g['target']} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
