"""Visual search: embeddings, the faiss index that stays fresh, pupil search's strip, and the retrieval check.

Metrics are checked against naive loops and pytorch-metric-learning's AccuracyCalculator, faiss's answers against
exact numpy search; freshness (added items found at once, removed items never again) for every index kind, in
memory and after a save; every refusal is one line. The end-to-end tests run on a one-epoch smoke run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

faiss = pytest.importorskip("faiss")

from pupil.audit.retrieval import (  # noqa: E402
    Retrieval,
    ann_recall,
    average_precision_at_r,
    exact_neighbours,
    recall_at_k,
    retrieval_metrics,
)
from pupil.errors import PupilError  # noqa: E402
from pupil.models import PixelModel  # noqa: E402
from pupil.run import Run  # noqa: E402
from pupil.search import index_add_command, index_build_command, index_remove_command, search_command  # noqa: E402
from pupil.search.embed import Embedder, embed, embedding_info  # noqa: E402
from pupil.search.index import REBUILD_FRACTION, SearchIndex  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

IDENTITY = {"kind": "penultimate", "dim": 16, "run": "unit", "weights_sha256": "0" * 12}


def clustered(n: int, dim: int = 16, classes: int = 5, seed: int = 0, spread: float = 0.35):
    """Unit vectors around ``classes`` random centres, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y.astype(np.int64)


def numpy_knn(q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """Exact nearest neighbours by brute force (squared Euclidean distance), a stable sort for ties."""
    d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_exact_neighbours_match_numpy_brute_force():
    g, _ = clustered(300, seed=1)
    q, _ = clustered(40, seed=2)
    sims, idx = exact_neighbours(q, g, 7, chunk=16)
    ref = numpy_knn(q, g, 7)
    assert (idx == ref).all()
    assert np.allclose(sims, (q[:, None, :] * g[ref]).sum(-1), atol=1e-5)


def test_recall_at_k_and_ap_at_r_match_naive_loops():
    rng = np.random.default_rng(3)
    g, gy = clustered(200, seed=4, spread=0.9)
    q, qy = clustered(60, seed=5, spread=0.9)
    order = numpy_knn(q, g, len(g))
    labels = gy[order]
    got = recall_at_k(labels, qy, [1, 5, 10])
    r = np.bincount(gy, minlength=5)[qy]
    ap = average_precision_at_r(labels, qy, r)
    for i in range(len(q)):
        for k in (1, 5, 10):
            assert got[k][i] == any(labels[i, j] == qy[i] for j in range(k))
        hits, total = 0, 0.0
        for j in range(r[i]):  # Musgrave et al. 2020: (1/R) sum_{i<=R} P(i) rel(i)
            if labels[i, j] == qy[i]:
                hits += 1
                total += hits / (j + 1)
        assert ap[i] == pytest.approx(total / r[i])
    # A perfect ranking scores 1; a query whose class is absent from the gallery scores 0.
    perfect = np.sort(gy)[None, :].repeat(2, 0)
    assert average_precision_at_r(perfect, np.array([0, 0]), np.array([(gy == 0).sum(), 0])).tolist() == [1.0, 0.0]
    assert rng is not None


def test_retrieval_metrics_match_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    g, gy = clustered(400, seed=6, spread=0.8)
    q, qy = clustered(120, seed=7, spread=0.8)
    m = retrieval_metrics(q, qy, g, gy, [1, 5, 10], chunk=32)
    calc = pml.AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    ref = calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(qy), torch.from_numpy(g), torch.from_numpy(gy))
    assert m["hits"][1].mean() == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert m["ap_at_r"].mean() == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-5)


def test_ann_recall_counts_the_exact_neighbours_found():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, 1], [5, 6, 7, 8]])
    assert ann_recall(approx, exact) == pytest.approx((3 / 4 + 1) / 2)


# ---------------------------------------------------------------------------------------------------------------
# The index: exact against numpy, HNSW against exact, ids, freshness, files


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_search_agrees_with_exact_numpy_search(kind):
    g, gy = clustered(1200, seed=8)
    q, _ = clustered(50, seed=9)
    idx = SearchIndex.from_embeddings(g, gy, identity=IDENTITY, kind=kind, hnsw_m=16, ef_construction=100)
    hits = idx.search(q, 10, ef_search=128, nprobe=idx.settings.get("nlist") or 1)
    ref = numpy_knn(q, g, 10)
    if kind == "ivfpq":  # compressed vectors: the exact neighbours are mostly, not always, found
        assert ann_recall(hits.ids, ref) > 0.6
    else:
        assert ann_recall(hits.ids, ref) >= (1.0 if kind == "flat" else 0.98)
    if kind == "flat":
        d = ((q[:, None] - g[hits.ids]) ** 2).sum(-1) / 2  # cosine distance of unit vectors = |a - b|^2 / 2
        assert np.allclose(hits.distances, d, atol=1e-5)
    assert (hits.labels == gy[hits.ids]).all()


def _assert_fresh(idx: SearchIndex, g: np.ndarray, new: np.ndarray, gone: set[int]) -> np.ndarray:
    """Added vectors are their own nearest item at once; removed ids come back for no query and no k."""
    ids = idx.add_embeddings(new, np.zeros(len(new), np.int64))
    first = idx.search(new, 1, ef_search=64, nprobe=64).ids[:, 0]
    assert (first == ids).all()
    everything = np.concatenate([g, new])
    hits = idx.search(everything, idx.live, ef_search=64, nprobe=64)  # k = every live item: a removed one would show
    assert not (set(np.unique(hits.ids).tolist()) & gone)
    assert (hits.ids >= 0).all()
    return ids


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_added_items_are_found_at_once_and_removed_items_never_come_back(kind, tmp_path):
    g, gy = clustered(600, seed=10)
    idx = SearchIndex.from_embeddings(g, gy, identity=IDENTITY, kind=kind, hnsw_m=16, ef_construction=64)
    removed = [3, 17, 250]
    for i in removed:  # remove the nearest neighbour of a query: it must not be the answer any more
        assert idx.search(g[i : i + 1], 1, nprobe=64).ids[0, 0] == i
    assert idx.remove(removed) is False
    new = np.random.default_rng(11).standard_normal((5, 16)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)  # far from each other and from the catalogue
    added = _assert_fresh(idx, g, new, set(removed))
    assert added.tolist() == list(range(600, 605))  # ids are handed out in order, never reused
    for i in removed:
        assert idx.search(g[i : i + 1], 1, nprobe=64).ids[0, 0] != i
    idx.save(tmp_path / "idx")
    back = SearchIndex.open(tmp_path / "idx")
    assert back.live == 602 and back.search(new, 1, nprobe=64).ids[:, 0].tolist() == added.tolist()
    hits = back.search(np.concatenate([g, new]), back.live, nprobe=64)
    assert not set(np.unique(hits.ids).tolist()) & set(removed)
    more = back.add_embeddings(new[:1])
    assert more.tolist() == [605]  # the removed ids and the counter survive the file
    if kind == "hnsw":
        assert sorted(back.tombstones.tolist()) == removed


def test_hnsw_tombstones_are_filtered_then_rebuilt_away():
    g, gy = clustered(500, seed=12)
    idx = SearchIndex.from_embeddings(g, gy, identity=IDENTITY, kind="hnsw", hnsw_m=8, ef_construction=32)
    # Remove every item of class 0 but a few: the survivors' neighbourhoods are all tombstones, so the walk must
    # still find k live items (the filter works inside the walk; short walks are retried).
    class0 = np.flatnonzero(gy == 0)
    doomed = class0[: min(len(class0) - 3, int(REBUILD_FRACTION * len(g)))]
    assert idx.remove(doomed) is False and len(idx.tombstones) == len(doomed)
    hits = idx.search(g[class0], 20, ef_search=16)
    assert (hits.ids >= 0).all() and not set(hits.ids.ravel().tolist()) & set(doomed.tolist())
    # past the fraction: the graph is rebuilt from the live vectors and the tombstones go
    extra = np.setdiff1d(np.arange(len(g)), doomed)[:30]
    assert idx.remove(extra) is True
    assert len(idx.tombstones) == 0 and idx.index.ntotal == idx.live == len(g) - len(doomed) - len(extra)
    gone = set(doomed.tolist()) | set(extra.tolist())
    hits = idx.search(g, 10)
    assert not set(hits.ids.ravel().tolist()) & gone
    assert ann_recall(hits.ids, _live_knn(g, gone, 10)) > 0.97


def _live_knn(g: np.ndarray, gone: set[int], k: int) -> np.ndarray:
    live = np.array([i for i in range(len(g)) if i not in gone])
    return live[numpy_knn(g, g[live], k)]


def test_bad_requests_are_refused_in_one_line(tmp_path):
    g, gy = clustered(300, seed=13)
    idx = SearchIndex.from_embeddings(g, gy, identity=IDENTITY, kind="hnsw", hnsw_m=8)
    with pytest.raises(PupilError, match=r"^-k must be from 1 to the index's 300 live items, not 301$"):
        idx.search(g[:1], 301)
    with pytest.raises(PupilError, match=r"unknown id\(s\) 300, 999"):
        idx.remove([5, 300, 999])
    assert idx.live == 300 and not len(idx.tombstones)  # nothing was removed
    idx.remove([5])
    with pytest.raises(PupilError, match=r"unknown id\(s\) 5: "):
        idx.remove([5])  # removed before: gone for good
    with pytest.raises(PupilError, match=r"queries must be \(N, 16\)"):
        idx.search(np.zeros((1, 8), np.float32), 1)
    with pytest.raises(PupilError, match="ivfpq index trains on the items it is built from and needs at least 256"):
        SearchIndex.from_embeddings(g[:100], gy[:100], identity=IDENTITY, kind="ivfpq")
    with pytest.raises(PupilError, match="unknown index kind 'lsh'"):
        SearchIndex.from_embeddings(g, gy, identity=IDENTITY, kind="lsh")
    idx.remove(np.arange(300)[np.arange(300) != 5])
    with pytest.raises(PupilError, match=r"^the search index is empty: add images to it first$"):
        idx.search(g[:1], 1)


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path):
    g, gy = clustered(300, seed=14)
    path = SearchIndex.from_embeddings(g, gy, identity=IDENTITY, kind="flat").save(tmp_path / "idx")
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")  # safetensors: header length, header, then the tensors
    cases = {
        "truncated": data[: len(data) - 1000],
        "half": data[: len(data) // 2],
        "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
        "empty": b"",
    }
    for share in (0.0, 0.3, 0.6, 0.9, 0.999):  # one flipped byte anywhere in the tensors (faiss, labels, ids...)
        at = start + int(share * (len(data) - start - 1))
        cases[f"flipped at {share}"] = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(PupilError) as e:
            SearchIndex.open(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value), name
    with pytest.raises(PupilError, match="no search index at"):
        SearchIndex.open(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PupilError, match="exists and is not a pupil search index"):
        from pupil.search.index import _check_out

        _check_out(tmp_path / "notes.txt")
    assert SearchIndex.open(path).live == 300


def test_a_save_is_atomic(tmp_path, monkeypatch):
    import pupil.io

    g, gy = clustered(300, seed=15)
    idx = SearchIndex.from_embeddings(g, gy, identity=IDENTITY, kind="hnsw", hnsw_m=8)
    path = idx.save(tmp_path / "idx")
    before = path.read_bytes()
    idx.add_embeddings(g[:3])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pupil.io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        idx.save()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["idx"]


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


class TinyMetric(nn.Module):
    """A net with the feature contract whose pre-logits output is an 8-d embedding (``embedding_dim``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(1, 4, 3, padding=1)
        self.embed = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.num_features, self.num_classes, self.embedding_dim, self.gradcam_layer = 8, 3, 8, "body"

    def forward_features(self, x):
        return self.body(x).relu()

    def forward_head(self, x, pre_logits=False):
        z = self.embed(x.mean((2, 3)))
        return z if pre_logits else self.head(z)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _run(net: nn.Module, tmp_path: Path, source: dict | None = None) -> Run:
    info = {
        "model": {"name": "tiny", "in_chans": 1, "img_size": 12},
        "data": {"input_shape": [1, 12, 12], "classes": ["a", "b", "c"]},
        "runtime": {"channels_last": False},
        **({"source": source} if source else {}),
    }
    return Run(tmp_path / "tiny", info, PixelModel(net, [0.5], [0.25]).eval())


def test_embeddings_are_the_normalised_features_and_know_their_kind(tmp_path):
    run = _run(TinyMetric(), tmp_path)
    info = embedding_info(run)
    assert (info.kind, info.dim, info.run, len(info.weights_sha256)) == ("metric", 8, "tiny", 12)
    x = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    z = embed(run, x, batch=2, device="cpu")
    net = run.model.net
    with torch.no_grad():
        ref = F.normalize(
            net.forward_head(net.forward_features((x.float() / 255 - 0.5) / 0.25), pre_logits=True), dim=1
        )
    assert z.dtype == np.float32 and z.shape == (5, 8) and np.allclose(z, ref.numpy(), atol=1e-6)
    e = Embedder(run, "cpu")
    big = torch.randint(0, 256, (2, 3, 30, 20), dtype=torch.uint8)  # RGB, another size: converted, counted
    assert e.embed(big).shape == (2, 8) and e.conversions["rgb_to_grey"] == 2 and e.conversions["resized"] == 2
    del net.embedding_dim
    assert embedding_info(run).kind == "penultimate"


def test_a_model_without_the_feature_contract_is_refused(tmp_path):
    onnx = _run(TinyMetric(), tmp_path, source={"kind": "onnx", "features": False})
    with pytest.raises(PupilError, match=r"tiny \(onnx model\) cannot embed images: search needs a PyTorch model"):
        embed(onnx, torch.zeros(1, 1, 12, 12, dtype=torch.uint8), device="cpu")
    bare = _run(nn.Sequential(nn.Flatten(), nn.Linear(144, 3)), tmp_path)
    with pytest.raises(PupilError, match="cannot embed images"):
        embedding_info(bare)


# ---------------------------------------------------------------------------------------------------------------
# End to end on a smoke run: pupil index build/add/remove, pupil search, the retrieval check


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from pupil.config import build
    from pupil.training.loop import fit

    root = tmp_path_factory.mktemp("search")
    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "smoke", "epochs": 1})
    return fit(cfg, progress=False).dir


def _pngs(folder: Path, n: int, size: int = 16, rgb: bool = False) -> list[Path]:
    from pupil.data import load

    folder.mkdir(parents=True, exist_ok=True)
    test = load("synthetic", "test")
    paths = []
    for i in range(n):
        a = test.images[i, 0].numpy()
        im = Image.fromarray(np.stack([a] * 3, -1) if rgb else a)
        im = im.resize((size + 7, size + 3)) if size != 16 else im
        paths.append(folder / f"q{i}.png")
        im.save(paths[-1])
    return paths


def test_index_commands_end_to_end(smoke, tmp_path, capsys):
    out = tmp_path / "cat" / "idx"
    index = index_build_command(smoke, "synthetic", out, hnsw_m=8, ef_construction=40, progress=False, device="cpu")
    assert index.live == 512 and out.is_file()
    assert index.identity["run"] == "smoke" and index.identity["kind"] == "penultimate"
    queries = _pngs(tmp_path / "q", 2) + _pngs(tmp_path / "odd", 1, size=24, rgb=True)  # RGB 31x27: converted
    hits = search_command(out, queries, k=4, out=tmp_path / "strip.png", device="cpu")
    printed = capsys.readouterr().out
    assert "query images converted to the model's input: 1 converted mode, 1 resized" in printed
    assert "synthetic:train:" in printed and hits.ids.shape == (3, 4)
    strip = Image.open(tmp_path / "strip.png")
    assert strip.format == "PNG" and strip.size[0] > 5 * 100 and strip.size[1] > 3 * 100
    # the first query is a synthetic test image: its neighbours are mostly of its class
    from pupil.data import load

    y0 = int(load("synthetic", "test").targets[0])
    assert (hits.labels[0] == y0).mean() >= 0.5
    # add: searchable at once, from a fresh read of the file
    ids = index_add_command(out, queries[:1], label="new-class", device="cpu")
    again = search_command(out, queries[:1], k=1, device="cpu")
    assert again.ids[0, 0] == ids[0] == 512 and again.distances[0, 0] < 1e-5
    assert SearchIndex.open(out).classes[-1] == "new-class"
    # remove: never again, from a fresh read of the file
    index_remove_command(out, [512])
    assert search_command(out, queries[:1], k=1, device="cpu").ids[0, 0] != 512
    with pytest.raises(PupilError, match=r"unknown id\(s\) 512"):
        index_remove_command(out, [512])
    with pytest.raises(PupilError, match="-k must be from 1 to the index's 512 live items, not 513"):
        search_command(out, queries[:1], k=513, device="cpu")


def nudged_copy(run: Path, dest: Path) -> Path:
    """A copy of ``run`` at ``dest`` whose first weight tensor is moved by 0.01: another model of the same shape."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, dest)
    state = load_file(dest / "model.safetensors")
    key = next(iter(state))
    state[key] = state[key] + 0.01
    save_file(state, dest / "model.safetensors")
    return dest


def test_an_index_refuses_another_models_queries(smoke, tmp_path):
    other = nudged_copy(smoke, tmp_path / "other")
    out = tmp_path / "idx"
    index_build_command(smoke, "synthetic", out, kind="flat", progress=False, device="cpu")
    query = _pngs(tmp_path / "q", 1)
    with pytest.raises(
        PupilError, match=r"the index was built by smoke \(weights .*\); other \(weights .*\) is another"
    ):
        search_command(out, query, k=1, run=other, device="cpu")
    with pytest.raises(PupilError, match="is another model"):
        index_add_command(out, query, run=other, device="cpu")
    same = tmp_path / "renamed"
    shutil.copytree(smoke, same)  # the same weights under another name: the same model
    assert search_command(out, query, k=1, run=same, device="cpu").ids.shape == (1, 1)


def test_a_manifest_catalogue_keeps_paths_and_columns(smoke, tmp_path, capsys):
    paths = _pngs(tmp_path / "img", 6, size=20)  # 27x23: resized to the run's 16x16, counted
    rows = ["path,label,sku"] + [f"img/{p.name},{'ab'[i % 2]},SKU{i}" for i, p in enumerate(paths)]
    (tmp_path / "cat.csv").write_text("\n".join(rows) + "\n")
    idx = index_build_command(
        smoke, str(tmp_path / "cat.csv"), tmp_path / "idx", kind="flat", progress=False, device="cpu"
    )
    assert idx.live == 6 and idx.classes == ["a", "b"] and idx.columns["sku"] == [f"SKU{i}" for i in range(6)]
    assert idx.sources == [str(p.resolve()) for p in paths]
    assert idx.data["conversions"] == {"resized": 6}
    hits = search_command(tmp_path / "idx", paths[2:3], k=1, device="cpu")
    assert hits.ids[0, 0] == 2 and "sku=SKU2" in capsys.readouterr().out
    assert idx.pixels([2])[0].shape == (1, 23, 27)  # the file as it is, for the strip


def test_the_retrieval_check_on_the_smoke_run(smoke, tmp_path):
    from pupil.audit import run_audit
    from pupil.report.plots import draw

    run = tmp_path / "run"
    shutil.copytree(smoke, run)
    settings = {"corruptions": ["contrast", "gaussian_noise"], "n_corrupt": 40, "latency_queries": 20, "worst": 2}
    results = run_audit(run, ["retrieval"], device="cpu", settings={"retrieval": settings})
    section = results["checks"]["retrieval"]
    s, m = section["summary"], section["metrics"]
    assert s["map_at_r"] == section["headline"]["value"] and s["embedding"] == "penultimate" and s["dim"] == 32
    assert m["n_queries"] == 512 and m["n_gallery"] == m["of_gallery"] == 448  # train split minus the val carve
    assert 0 < s["recall_at_1"] <= s["recall_at_5"] <= s["recall_at_10"] <= 1
    assert s["ann_recall_at_10"] > 0.95 and s["qps"] > 0 and s["latency_ms_p50"] <= s["latency_ms_p99"]
    assert set(m["corruption"]["recall_at_1"]) == {"contrast", "gaussian_noise"} and m["corruption"]["n"] == 40
    assert len(section["curves"]["worst_queries"]) == 2 * 6
    for spec in section["figures"]:
        assert draw(spec, section).startswith("data:image/png;base64,")
    # the figures cross-check the functions on the same embeddings
    from pupil.run import load_run

    r = load_run(run)
    q, g = embed(r, r.split("test"), device="cpu"), embed(r, r.split("train"), device="cpu")
    ref = retrieval_metrics(q, r.split("test").targets.numpy(), g, r.split("train").targets.numpy(), [1, 5, 10])
    assert s["map_at_r"] == pytest.approx(ref["ap_at_r"].mean(), abs=1e-6)
    assert s["recall_at_5"] == pytest.approx(ref["hits"][5].mean())
    per = json.loads(json.dumps(section["tables"]["by_label"]))
    assert [row[1] for row in per["rows"]] == [128] * 4


def test_the_retrieval_check_says_why_it_cannot_run(smoke):
    from pupil.audit.common import make_context

    ctx = make_context(smoke, "cpu", "quick", 0)
    assert Retrieval().unavailable(ctx) == ""
    ctx.features = False
    assert "no feature contract" in Retrieval().unavailable(ctx)
    with pytest.raises(PupilError, match="^the retrieval check cannot run: the model keeps no feature contract"):
        Retrieval().run(ctx, Retrieval().config("quick"))
    ctx.features = True
    ctx.run.splits = lambda split: (_ for _ in ()).throw(PupilError("folder has no training split"))
    ctx._cache.clear()
    assert "its gallery is the training split" in Retrieval().unavailable(ctx)
