"""Visual search in pupil serve: the nearest catalogue images through FastAPI's TestClient, against `pupil search`
(the same ids and distances for the same files), every bad input answered as predict answers it, catalogue images
equal to the catalogue's pixels, an index file changed while the server runs (items added and removed appear and
go; a file of another model, a corrupt one or none at all is refused and the old index served on), the guard in
front of the routes, and ``--index`` refusals in one line. One one-epoch smoke run and one HNSW index of its
training images are built per module."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import inspect
import io
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("faiss")

from pupil.errors import PupilError
from pupil.search.index import SearchIndex
from pupil.serve import prepare
from pupil.serve.app import Settings, create_app, endpoint
from pupil.serve.models import load_served
from pupil.serve.search import MAX_K, install_search, load_indexes, parse_spec
from tests.conftest import ROOT

KEY = "k3y-for-the-tests-0123456789"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    from pupil.config import build
    from pupil.training.loop import fit

    root = tmp_path_factory.mktemp("serve-search")
    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "smoke", "epochs": 1})
    return fit(cfg, progress=False).dir


@pytest.fixture(scope="module")
def catalogue(smoke, tmp_path_factory) -> Path:
    """An HNSW index of the synthetic training split (512 images), embedded by the smoke run."""
    out = tmp_path_factory.mktemp("catalogue") / "catalogue.idx"
    SearchIndex.build(smoke, "synthetic", out, hnsw_m=8, ef_construction=40, device="cpu")
    return out


@pytest.fixture(scope="module")
def served(smoke):
    return load_served(smoke, CPU)


def make_app(served, indexes, **settings):
    app = create_app([served], Settings(**settings))
    install_search(app, indexes)
    return app


@pytest.fixture(scope="module")
def client(served, catalogue):
    with TestClient(make_app(served, load_indexes([f"cat={catalogue}"], CPU))) as c:
        yield c


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> list[Path]:
    """Two synthetic test images as the model takes them (16x16 grey), the third in colour at 31x27 (converted
    and resized) and a 600x800 JPEG of it (decoded in a decode thread)."""
    from pupil.data import load

    folder = tmp_path_factory.mktemp("queries")
    test = load("synthetic", "test").images
    paths = []
    for i in (0, 1):
        paths.append(folder / f"q{i}.png")
        paths[-1].write_bytes(_png(test[i, 0].numpy()))
    colour = Image.fromarray(np.stack([test[2, 0].numpy()] * 3, -1))
    colour.resize((31, 27)).save(folder / "colour.png")
    colour.resize((600, 800)).save(folder / "large.jpg", quality=90)
    return [*paths, folder / "colour.png", folder / "large.jpg"]


def _multipart(paths: list[Path]) -> list:
    return [("image", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def _decoded(png: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG"
    a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# What the service answers: the same as `pupil search`


def test_the_listing_describes_each_index_without_server_paths(client, served, catalogue):
    r = client.get("/v1/indexes")
    assert r.status_code == 200
    [entry] = r.json()["indexes"]
    idx = SearchIndex.open(catalogue)
    assert entry["name"] == "cat" and entry["live"] == 512 and entry["kind"] == "hnsw"
    assert entry["embedding"] == {"run": "smoke", "kind": "penultimate", "dim": 32, "weights": served.version}
    assert entry["models"] == ["smoke"] and entry["classes"] == idx.classes
    assert entry["catalogue"] == {"name": "synthetic", "split": "train"} and entry["note"] is None
    assert entry["input"] == {"channels": 1, "size": 16} and entry["search"] == "/v1/indexes/cat/search"
    assert str(catalogue.parent) not in r.text and str(served.run_dir) not in r.text
    assert client.get("/v1/indexes/cat").json() == entry
    r = client.get("/v1/indexes/nope")
    assert r.status_code == 404 and "this server has cat" in r.json()["detail"]


def test_hits_are_those_pupil_search_finds(client, catalogue, queries):
    r = client.post("/v1/indexes/cat/search?k=5", files=_multipart(queries))
    assert r.status_code == 200, r.text
    body = r.json()
    idx = SearchIndex.open(catalogue)
    hits, _, conversions = idx.search_images(queries, 5, device="cpu")
    assert body["index"] == "cat" and body["live"] == 512 and body["k"] == 5 and len(body["queries"]) == 4
    for q, ids, distances, labels in zip(body["queries"], hits.ids, hits.distances, hits.labels, strict=True):
        assert [h["id"] for h in q["hits"]] == ids.tolist()
        assert [h["distance"] for h in q["hits"]] == pytest.approx(distances.tolist(), rel=1e-5, abs=1e-7)
        assert [h["label"] for h in q["hits"]] == [idx.classes[y] for y in labels]
        assert [h["source"] for h in q["hits"]] == [f"synthetic:train:{i}" for i in ids]
        assert [h["image"] for h in q["hits"]] == [f"/v1/indexes/cat/items/{i}.png" for i in ids]
    # the conversions, per query, add up to what pupil search counted for the same files
    total = Counter()
    for q in body["queries"]:
        total.update(q["conversions"])
    assert dict(total) == {k: v for k, v in conversions.items() if v} == {"converted_mode": 2, "resized": 2}
    converted = {"converted_mode": 1, "resized": 1}  # RGB to grey, resized to 16x16
    assert [q["conversions"] for q in body["queries"]] == [{}, {}, converted, converted]
    assert body["queries"][2]["input"] == {"width": 31, "height": 27, "mode": "RGB"}
    # a synthetic test image's neighbours are mostly of its class
    from pupil.data import load

    y0 = load("synthetic", "test").classes[int(load("synthetic", "test").targets[0])]
    assert sum(h["label"] == y0 for h in body["queries"][0]["hits"]) >= 3
    # base64 JSON and a raw body answer as multipart does
    data = queries[1].read_bytes()
    want = client.post("/v1/indexes/cat/search", files=_multipart(queries[1:2])).json()
    assert want["k"] == 8 and len(want["queries"][0]["hits"]) == 8
    for again in (
        client.post("/v1/indexes/cat/search", json={"image": base64.b64encode(data).decode()}),
        client.post("/v1/indexes/cat/search", content=data, headers={"content-type": "image/png"}),
    ):
        assert again.status_code == 200 and again.json() == want


def test_item_images_are_the_catalogue_pixels(client, catalogue, monkeypatch):
    import pupil.data
    from pupil.data import load

    train = load("synthetic", "train").images
    loads = []
    monkeypatch.setattr(pupil.data, "load", lambda *a, **kw: loads.append(a) or load(*a, **kw))
    idx = SearchIndex.open(catalogue)
    for ids in ([0], [5, 511], [7]):  # the dataset is loaded once per index, not per call
        assert all(torch.equal(a, train[i]) for a, i in zip(idx.pixels(ids), ids, strict=True))
    assert loads == [("synthetic", "train")]
    for i in (0, 17, 511):
        r = client.get(f"/v1/indexes/cat/items/{i}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(_decoded(r.content), train[i].numpy())
    assert _decoded(client.get("/v1/indexes/cat/items/3.png?max_side=64").content).shape == (1, 16, 16)  # never up
    small = _decoded(client.get("/v1/indexes/cat/items/3.png?max_side=8").content)
    assert small.shape == (1, 8, 8)
    reference = np.asarray(Image.fromarray(train[3, 0].numpy()).resize((8, 8), Image.BILINEAR, reducing_gap=3.0))
    assert np.abs(small[0].astype(int) - reference).max() <= 1


# ---------------------------------------------------------------------------------------------------------------
# Bad input: answered as predict answers it


def _form(*parts: bytes) -> dict:
    body = b"".join(b"--zz\r\n" + p + b"\r\n" for p in parts) + b"--zz--\r\n"
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=zz"}}


def _bad_uploads(queries: list[Path]) -> list[dict]:
    noise = queries[0].read_bytes()
    truncated = noise[: len(noise) // 2]
    return [
        {"files": [("image", ("x.txt", b"just some text", "text/plain"))]},
        {"files": [("image", ("x.png", b"", "image/png"))]},
        {"json": {"images": [base64.b64encode(b"%PDF-1.4 not an image").decode()]}},
        {"json": {"images": ["@@not base64@@"]}},
        {"json": {"pictures": []}},
        {"json": {"images": []}},
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        _form(b'Content-Disposition: form-data; name="note"\r\n\r\nno file here'),
        {"content": b"--zz\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
        {"content": b"--zz\r\n", "headers": {"content-type": "multipart/form-data"}},
        {"files": [("image", ("t.png", truncated, "image/png"))]},
        {"files": [*_multipart(queries[:2]), ("image", ("t.png", truncated, "image/png"))]},  # "image 3: ..."
        {"files": _multipart(queries[:1] * 4)},  # over max_images
        {"files": _multipart(queries[2:3])},  # 31x27: over max_pixels
    ]


def test_bad_uploads_get_the_status_and_message_predict_gives(served, catalogue, queries):
    with TestClient(make_app(served, load_indexes([f"cat={catalogue}"], CPU), max_images=3, max_pixels=500)) as c:
        for kwargs in _bad_uploads(queries):
            got = c.post("/v1/indexes/cat/search", **kwargs)
            want = c.post("/v1/models/smoke/predict", **kwargs)
            assert want.status_code in (400, 413, 415)
            assert (got.status_code, got.json()) == (want.status_code, want.json()), kwargs


@pytest.mark.parametrize(
    "method,url,status,message",
    [
        ("post", "/v1/indexes/nope/search", 404, "no index named 'nope'"),
        ("get", "/v1/indexes/nope/items/0.png", 404, "no index named"),
        *[("post", f"/v1/indexes/cat/search?k={k}", 400, "k must be") for k in ("0", "-1", "abc", "1.5", "", "٣")],
        ("post", f"/v1/indexes/cat/search?k={MAX_K + 1}", 400, f"from 1 to {MAX_K}"),
        ("get", "/v1/indexes/cat/items/512.png", 404, "has no item 512"),
        ("get", "/v1/indexes/cat/items/" + "9" * 19 + ".png", 404, "no item"),
        *[("get", f"/v1/indexes/cat/items/{item}", 404, "no item") for item in ("abc.png", "1.jpg", "-1.png", "1")],
        ("get", "/v1/indexes/cat/items/1.png.png", 404, "no item"),
        ("get", "/v1/indexes/cat/items/%2e%2e", 404, "no item"),
        ("get", "/v1/indexes/cat/items/..%2F..%2Fcatalogue.idx", 404, "Not Found"),
        ("get", "/v1/indexes/cat/items/1.png?max_side=0", 400, "max_side"),
        ("get", "/v1/indexes/cat/items/1.png?max_side=big", 400, "max_side"),
        ("get", "/v1/indexes/cat/search", 405, "Method Not Allowed"),
        ("post", "/v1/indexes/cat/items/1.png", 405, "Method Not Allowed"),
    ],
)
def test_bad_names_ids_and_options(client, queries, method, url, status, message):
    kwargs = {"files": _multipart(queries[:1])} if method == "post" else {}
    r = client.request(method, url, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


# ---------------------------------------------------------------------------------------------------------------
# Freshness: the file changed by another process while the server runs


def _other_model_index(smoke: Path, folder: Path) -> Path:
    """An index of the same images built by a copy of the smoke run whose weights differ."""
    from tests.test_search import nudged_copy

    other = nudged_copy(smoke, folder / "other")
    out = folder / "other.idx"
    SearchIndex.build(other, "synthetic", out, kind="flat", device="cpu")
    return out


def test_items_added_and_removed_while_serving_appear_and_go(served, smoke, catalogue, queries, tmp_path, monkeypatch):
    path = tmp_path / "live.idx"
    shutil.copy(catalogue, path)
    [si] = load_indexes([str(path)], CPU)
    with TestClient(make_app(served, [si])) as c:

        def top(query: Path) -> tuple[dict, dict]:
            body = c.post("/v1/indexes/live/search?k=3", files=_multipart([query])).json()
            return body["queries"][0]["hits"][0], body

        def note() -> str | None:
            return c.get("/v1/indexes/live").json()["note"]

        before, _ = top(queries[0])
        assert before["id"] < 512
        # another process adds the query as a file (pupil index add) and another image as pixels, then saves
        idx = SearchIndex.open(path)
        added = tmp_path / "new boot.png"
        shutil.copy(queries[0], added)
        [new], _ = idx.add([added], "new-class", device="cpu")
        pixels = torch.from_numpy(_decoded(queries[1].read_bytes()).copy())[None]
        [bare], _ = idx.add(pixels, "new-class", device="cpu")
        idx.save()
        hit, body = top(queries[0])
        assert (new, bare) == (512, 513) and body["live"] == 514
        assert hit["id"] == 512 and hit["distance"] < 1e-5 and hit["label"] == "new-class"
        assert hit["source"] == "new boot.png" and str(tmp_path) not in json.dumps(body)  # a name, never a path
        np.testing.assert_array_equal(_decoded(c.get(hit["image"]).content), _decoded(added.read_bytes()))
        hit, _ = top(queries[1])
        assert hit["id"] == 513 and hit["image"] is None and hit["source"] is None
        r = c.get("/v1/indexes/live/items/513.png")
        assert r.status_code == 404 and "added as pixels" in r.json()["detail"]
        # removed: never found again, its image gone
        idx.remove([512])
        idx.save()
        everything = c.post("/v1/indexes/live/search?k=64", files=_multipart(queries[:1])).json()
        assert everything["live"] == 513 and 512 not in [h["id"] for h in everything["queries"][0]["hits"]]
        r = c.get("/v1/indexes/live/items/512.png")
        assert r.status_code == 404 and "removed" in r.json()["detail"]

        # A file the server cannot serve is refused, read once, and the index read before served on.
        opened = []
        real_open = SearchIndex.open.__func__
        monkeypatch.setattr(SearchIndex, "open", classmethod(lambda cls, p: opened.append(p) or real_open(cls, p)))
        served_before = top(queries[0])[1]
        os.replace(_other_model_index(smoke, tmp_path), path)
        assert top(queries[0])[1] == served_before and "is another model" in note() and str(tmp_path) not in note()
        assert c.get("/v1/indexes/live").json()["live"] == 513 and len(opened) == 1
        tmp = tmp_path / "garbage"
        tmp.write_bytes(b"not an index at all")
        os.replace(tmp, path)
        assert top(queries[0])[1] == served_before and "corrupt or truncated" in note()
        path.unlink()
        assert top(queries[0])[1] == served_before and "is gone" in note() and len(opened) == 2
        assert note().startswith("live.idx is gone; serving the index read before (513 live items, read 20")
        # a good file again: served, the note gone; then every item removed: no hits, not an error
        idx.save(path)
        assert note() is None and len(opened) == 3
        idx.remove(np.flatnonzero(idx.alive))
        idx.save()
        empty = c.post("/v1/indexes/live/search", files=_multipart(queries[:1])).json()
        assert empty["live"] == 0 and empty["k"] == 0 and empty["queries"][0]["hits"] == []


# ---------------------------------------------------------------------------------------------------------------
# The guard in front of the routes


def test_the_api_key_and_the_upload_limit_apply_to_the_search_routes(served, catalogue, queries):
    indexes = load_indexes([f"cat={catalogue}"], CPU)
    with TestClient(make_app(served, indexes, api_keys=(KEY,), max_upload_bytes=4096)) as c:
        routes = [
            ("get", "/v1/indexes"),
            ("get", "/v1/indexes/cat"),
            ("post", "/v1/indexes/cat/search"),
            ("get", "/v1/indexes/cat/items/0.png"),
        ]
        for method, url in routes:
            r = c.request(method, url)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", url
            assert c.request(method, url, headers={"x-api-key": "wrong-key-0123456789"}).status_code == 401
        assert c.get("/v1/indexes", headers={"x-api-key": KEY}).status_code == 200
        assert c.get("/v1/indexes/cat/items/0.png", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        ok = c.post("/v1/indexes/cat/search", files=_multipart(queries[:1]), headers={"x-api-key": KEY})
        assert ok.status_code == 200
        big = b"x" * 5000
        headers = {"x-api-key": KEY, "content-type": "image/png"}
        r = c.post("/v1/indexes/cat/search", content=big, headers=headers)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = c.post("/v1/indexes/cat/search", content=iter([big[:3000], big[:3000]]), headers=headers)  # streamed
        assert r.status_code == 413


class _Slow:
    """An embedder that takes a second."""

    def __init__(self, inner):
        self.inner, self.info = inner, inner.info

    def __call__(self, x):
        time.sleep(1.0)
        return self.inner(x)


@pytest.mark.skipif(
    endpoint("/v1/indexes/cat/search") != "search",
    reason="pupil.serve.app.endpoint does not label the search routes yet: they get no timeout and no metrics label",
)
def test_searches_time_out_and_are_labelled_in_the_metrics(served, catalogue, queries):
    [si] = load_indexes([f"cat={catalogue}"], CPU)
    slow = dataclasses.replace(si, name="slow", embedder=_Slow(si.embedder), lock=asyncio.Lock())
    with TestClient(make_app(served, [si, slow], timeout_s=0.3)) as c:
        assert c.post("/v1/indexes/cat/search", files=_multipart(queries[:1])).status_code == 200
        assert c.get("/v1/indexes/cat/items/0.png").status_code == 200
        assert c.get("/v1/indexes").status_code == 200
        r = c.post("/v1/indexes/slow/search", files=_multipart(queries[:1]))  # last: it holds the inference thread
        assert r.status_code == 504 and "0.3 s" in r.json()["detail"]
        text = c.get("/metrics").text
    for label, status in (("search", 200), ("search", 504), ("item", 200), ("indexes", 200)):
        assert f'pupil_serve_requests_total{{endpoint="{label}",status="{status}"}} 1.0' in text, label
    assert 'pupil_serve_search_images_total{index="cat"} 1.0' in text
    assert 'pupil_serve_index_items{index="cat"} 512.0' in text


# ---------------------------------------------------------------------------------------------------------------
# --index: one line for every problem


def test_index_specs_and_their_refusals(smoke, catalogue, tmp_path):
    from safetensors.torch import load_file, save_file

    assert parse_spec("cat=/x/y.idx") == ("cat", Path("/x/y.idx"))
    assert parse_spec("/x/catalogue.idx") == ("catalogue", Path("/x/catalogue.idx"))
    odd = tmp_path / "a=b.idx"  # a file whose name holds "=" is a path
    shutil.copy(catalogue, odd)
    assert parse_spec(str(odd)) == ("a=b", odd)
    [si] = load_indexes([str(odd)], CPU)
    assert si.name == "a=b" and si.index.live == 512

    gone, changed = tmp_path / "gone", tmp_path / "changed"
    for run in (gone, changed):
        shutil.copytree(smoke, run)
        SearchIndex.build(run, "synthetic", tmp_path / f"{run.name}.idx", kind="flat", device="cpu")
    shutil.rmtree(gone)
    state = load_file(changed / "model.safetensors")
    key = next(iter(state))
    state[key] = state[key] * 2
    save_file(state, changed / "model.safetensors")
    (tmp_path / "corrupt.idx").write_bytes(b"\x00" * 100)
    (tmp_path / "copy").mkdir()
    shutil.copy(catalogue, tmp_path / "copy" / "catalogue.idx")
    cases = [
        ([str(tmp_path / "missing.idx")], "no search index at"),
        ([str(tmp_path / "corrupt.idx")], "corrupt or truncated search index"),
        ([f"a={catalogue}", f"a={catalogue}"], "are both named a: name them"),
        ([str(catalogue), str(tmp_path / "copy" / "catalogue.idx")], "are both named catalogue"),
        *[([f"{name}={catalogue}"], "must be a plain name") for name in ("", ".hidden", "-x", "~x", "..")],
        ([str(tmp_path / "gone.idx")], "the run that built it, gone, is not at"),
        ([str(tmp_path / "changed.idx")], "is another model"),
    ]
    for specs, message in cases:
        with pytest.raises(PupilError) as e:
            load_indexes(specs, CPU)
        text = str(e.value)
        assert text.startswith("--index ") and message in text and "\n" not in text, text


@pytest.mark.skipif(
    "indexes" not in inspect.signature(prepare).parameters, reason="pupil.serve.prepare takes no indexes yet"
)
def test_pupil_serve_with_an_index_over_a_socket(smoke, catalogue, queries, tmp_path):
    import httpx

    from tests.test_serve import running

    with running([str(smoke)], indexes=[f"cat={catalogue}"]) as (_, port):
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/indexes").json()["indexes"][0]["live"] == 512
        files = {"image": ("q.png", queries[0].read_bytes(), "image/png")}
        hits = httpx.post(url + "/v1/indexes/cat/search?k=2", files=files).json()["queries"][0]["hits"]
        assert len(hits) == 2 and httpx.get(url + hits[0]["image"]).headers["content-type"] == "image/png"
    with pytest.raises(PupilError, match=r"^--index .*missing\.idx: no search index at"):
        prepare([str(smoke)], port=0, indexes=[str(tmp_path / "missing.idx")], log=lambda _: None)
