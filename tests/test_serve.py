"""pupil serve: every endpoint and every bad input through FastAPI's TestClient; predictions against `pupil predict`
(same pixels, same probabilities after temperature, same conformal sets and deferrals); batching; the batcher on its
own; and a real uvicorn server on 127.0.0.1 for what only a socket shows: raw paths, a body streamed past the limit,
startup failures before listening, and a graceful shutdown.

One smoke run is trained and audited (accuracy, calibration, ood, uncertainty, conformal, with tiny settings) per
session; a copy without results.json stands for a run nobody audited."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import re
import select
import shutil
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from pupil.errors import PupilError
from pupil.serve import prepare, read_api_keys
from pupil.serve.app import Settings, create_app, multipart_files
from pupil.serve.batching import Batcher, Closed
from pupil.serve.models import frozen_forward, load_served, open_upload, to_pixels
from tests.conftest import ROOT

KEY = "k3y-for-the-tests-0123456789"
TINY = {
    "accuracy": {"n_bootstrap": 20},
    "ood": {"n_id": 64, "n_ood": 32, "n_fit": 64, "sets": ["noise", "uniform"], "scores": ["msp", "energy"]},
    "uncertainty": {"n": 64, "sources": ["softmax"], "target_accuracy": 0.9},
    "conformal": {"n": 64, "corruptions": ["contrast"]},
}
CHECKS = ["accuracy", "calibration", "ood", "uncertainty", "conformal"]
_RUNS: dict[str, Path] = {}


def audited_run(tmp_path_factory) -> Path:
    """The smoke run, trained, audited and rendered once per session (the browser test uses it too)."""
    if "smoke" not in _RUNS:
        from pupil.audit import run_audit
        from pupil.config import build
        from pupil.report.render import render_run
        from pupil.training.loop import fit

        out = tmp_path_factory.mktemp("serve")
        run = fit(build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(out), "name": "smoke"}), progress=False).dir
        run_audit(run, CHECKS, budget="quick", device="cpu", settings=TINY)
        render_run(run)
        _RUNS["smoke"] = run
    return _RUNS["smoke"]


@contextlib.contextmanager
def running(runs: list[str], **options):
    """A real server from ``pupil.serve.prepare`` on 127.0.0.1 and a free port, in a thread: yields (server, port)
    once it accepts connections, stops it afterwards."""
    options = {"port": 0, "threads": torch.get_num_threads(), "log_level": "warning", "log": lambda _: None} | options
    server, sock, _ = prepare(runs, **options)
    with in_thread(server, sock) as port:
        yield server, port


@contextlib.contextmanager
def in_thread(server, sock):
    """``server`` (a uvicorn.Server) run on the bound ``sock`` in a thread: yields the port once it accepts
    connections; stops it and closes the socket afterwards."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    return audited_run(tmp_path_factory)


@pytest.fixture(scope="module")
def bare(audited, tmp_path_factory) -> Path:
    """The same model with nothing audited: run.json and the weights only."""
    run = tmp_path_factory.mktemp("bare") / "bare"
    run.mkdir()
    for name in ("run.json", "model.safetensors"):
        shutil.copy(audited / name, run / name)
    return run


@pytest.fixture(scope="module")
def served(audited):
    return load_served(audited, torch.device("cpu"), warm_batch=4)


@pytest.fixture(scope="module")
def client(served, bare):
    app = create_app([served, load_served(bare, torch.device("cpu"))], Settings(max_images=16))
    with TestClient(app) as c:
        yield c


def _png(a: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """Images of every kind the decoder converts: two test images of the synthetic set (in distribution), grey
    noise, a colour JPEG, RGBA, 16-bit grey, a palette GIF with transparency, an EXIF-rotated JPEG, and a JPEG large
    enough to be drafted and decoded in a decode thread."""
    from pupil.data import load

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    test = load("synthetic", "test").images
    paths = []
    for i in (0, 1):
        paths.append(folder / f"grating{i}.png")
        paths[-1].write_bytes(_png(test[i, 0].numpy()))
    (folder / "noise.png").write_bytes(_png(rng.integers(0, 255, (16, 16), dtype=np.uint8)))
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "colour.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)).save(folder / "deep.png")  # 16-bit grey
    pal = Image.fromarray(rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)).convert("P")
    pal.save(folder / "palette.gif", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "rotated.jpg", exif=exif)
    big = np.kron(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), np.ones((20, 20, 1), np.uint8))  # 600x800
    Image.fromarray(big).save(folder / "large.jpg", quality=85)
    names = ["noise.png", "colour.jpg", "alpha.png", "deep.png", "palette.gif", "rotated.jpg", "large.jpg"]
    return paths + [folder / n for n in names]


def _same(a, b) -> bool:
    """Two answers alike up to float rounding (a forward pass over another batch size rounds a little differently)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, abs=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _multipart(paths: list[Path]) -> list:
    return [("image", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


# ---------------------------------------------------------------------------------------------------------------
# Decoding and predictions: the same as `pupil predict`


@pytest.mark.parametrize("mode,side", [("L", 16), ("RGB", 24)])
def test_uploads_decode_to_the_pixels_read_images_gives(files, mode, side):
    from pupil.data.images import read_images

    for path in files:
        expected = read_images([path], img_size=side, mode=mode).images[0].numpy()
        got = to_pixels(open_upload(path.read_bytes()), mode, side)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected, err_msg=path.name)


def test_predictions_equal_pupil_predicts(client, audited, files, capsys):
    from pupil.cli import _deferral_threshold, main
    from pupil.conformal import sets_for_run
    from pupil.data.images import read_images
    from pupil.ood import score_images
    from pupil.results import load_results
    from pupil.run import load_run

    r = client.post("/v1/models/smoke/predict?top=4", files=_multipart(files))
    assert r.status_code == 200, r.text
    body = r.json()
    preds = body["predictions"]
    assert len(preds) == len(files)
    weights = (audited / "model.safetensors").read_bytes()
    assert body["model"] == "smoke" and body["version"] == hashlib.sha256(weights).hexdigest()[:12]

    run = load_run(audited)
    pixels = read_images(files, img_size=16, mode="L").images
    x = pixels.float().div(255)
    with torch.inference_mode():
        logits = run.model(x).float()
    results = load_results(audited)
    t = results["checks"]["calibration"]["summary"]["temperature"]
    assert body["calibration"] == {"temperature": t, "audited": True}
    probs = (logits.double() / t).softmax(1)
    for p, expected in zip(preds, probs):
        assert [c["index"] for c in p["top"]] == expected.argsort(descending=True).tolist()
        got = torch.tensor([c["probability"] for c in sorted(p["top"], key=lambda c: c["index"])], dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)

    keys = [img.numpy().tobytes() for img in pixels]
    sets, used = sets_for_run(audited, logits, 0.95, keys=keys)
    assert [p["conformal"]["indices"] for p in preds] == sets
    assert [p["conformal"]["set"] for p in preds] == [[run.classes[c] for c in s] for s in sets]
    assert body["conformal"] == {**used, "threshold": pytest.approx(used["threshold"])}
    other = client.post("/v1/models/smoke/predict?conformal=0.8", files=_multipart(files)).json()
    sets, used = sets_for_run(audited, logits, 0.8, keys=keys)
    assert [p["conformal"]["indices"] for p in other["predictions"]] == sets and other["conformal"]["level"] == 0.8

    # Deferral and OOD as `pupil predict --defer-below auto --ood-score msp --ood-below <the served threshold>`
    threshold = _deferral_threshold(str(audited), "auto")
    ood_threshold = body["ood"]["threshold"]
    assert body["deferral"]["threshold"] == threshold and body["ood"]["score"] == "msp"
    ood = score_images(run.model, x, "msp")
    confidence = logits.softmax(1).amax(1)
    for p, conf, score in zip(preds, confidence.tolist(), ood.tolist()):
        # the service runs the model channels-last, as the audit did; `pupil predict` contiguous: float rounding apart
        assert p["ood"]["score"] == pytest.approx(score, abs=1e-6) and p["ood"]["flagged"] == (score < ood_threshold)
        assert p["deferral"]["deferred"] == (conf < threshold or score < ood_threshold)
    assert any(p["deferral"]["deferred"] for p in preds) and not all(p["deferral"]["deferred"] for p in preds)
    capsys.readouterr()
    argv = ["predict", str(audited), *map(str, files), "--defer-below", "auto", "--ood-score", "msp"]
    argv += ["--ood-below", repr(ood_threshold), "--conformal", "0.95", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if any(line.startswith(str(f)) for f in files)]
    assert [": deferred (" in h for h in heads] == [p["deferral"]["deferred"] for p in preds]
    cli_sets = re.findall(r"95% prediction set \(\d+\): (.*)", out)
    assert cli_sets == [", ".join(p["conformal"]["set"]) or "(empty: no label reaches the threshold)" for p in preds]


def test_json_base64_and_raw_bodies_answer_like_multipart(client, files):
    data = files[0].read_bytes()
    want = client.post("/v1/models/smoke/predict", files=_multipart(files[:1])).json()
    b64 = base64.b64encode(data).decode()
    for r in (
        client.post("/v1/models/smoke/predict", json={"images": [b64]}),
        client.post("/v1/models/smoke/predict", json={"image": "data:image/png;base64," + b64}),
        client.post("/v1/models/smoke/predict", content=data, headers={"content-type": "image/png"}),
    ):
        assert r.status_code == 200, r.text
        assert r.json() == want
    two = client.post("/v1/models/smoke/predict", json={"images": [b64, b64]}).json()["predictions"]
    assert _same(two, want["predictions"] * 2)


def test_the_guards_predict_answers_as_the_fastapi_route_does(client, served, files):
    """The guard answers predict itself (the hot path); the FastAPI route behind it, reached when the app is called
    without its guard, gives the same body, byte for byte, and other methods their 405."""
    r = client.post("/v1/models/smoke/predict?top=3", files=_multipart(files[:2]))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.content == json.dumps(r.json()).encode()  # the fixed head and the answers make one json.dumps
    app = create_app([served])

    async def unguarded(scope, receive, send):  # the FastAPI stack alone, lifespan included
        await FastAPI.__call__(app, scope, receive, send)

    with TestClient(unguarded) as direct:
        again = direct.post("/v1/models/smoke/predict?top=3", files=_multipart(files[:2]))
        assert again.status_code == 200 and again.content == r.content
        assert direct.post("/v1/models/nope/predict", files=_multipart(files[:1])).status_code == 404
    assert client.get("/v1/models/smoke/predict").status_code == 405


def test_an_unaudited_run_is_served_with_t1_and_no_thresholds(client, bare, files):
    r = client.post("/v1/models/bare/predict", files=_multipart(files[:2]))
    body = r.json()
    assert body["calibration"] == {"temperature": 1.0, "audited": False}
    assert body["ood"] == {"score": "energy", "threshold": None} and body["conformal"] is None
    for p in body["predictions"]:
        assert p["ood"]["flagged"] is None and p["conformal"] is None and not p["deferral"]["deferred"]
        assert sum(c["probability"] for c in p["top"]) == pytest.approx(1.0)
    entry = client.get("/v1/models/bare").json()
    assert entry["report"] is None and "not audited" in entry["notes"][0]
    assert client.post("/v1/models/bare/predict?conformal=0.9", files=_multipart(files[:1])).status_code == 400


def test_the_frozen_forward_gives_the_eager_logits(audited):
    """Served.logits runs frozen_forward's graph where tracing works: the eager model's logits to float rounding,
    at batch sizes it was not traced at; a model swapped in later, or one whose trace would be wrong, runs eagerly."""
    served = load_served(audited, torch.device("cpu"), warm_batch=4)
    assert served.frozen is not None and served.frozen[0] is served.model
    eager = dataclasses.replace(served, frozen=None)
    rng = np.random.default_rng(3)
    c = 1 if served.mode == "L" else 3
    for b in (1, 3, 7):
        pixels = rng.integers(0, 256, (b, c, served.side, served.side), dtype=np.uint8)
        torch.testing.assert_close(served.logits(pixels), eager.logits(pixels), rtol=1e-4, atol=1e-5)

    class BatchOfOne(nn.Module):  # a Python branch on the batch size: a trace keeps the branch it saw
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 4)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return y if x.shape[0] == 1 else -y

    assert frozen_forward(BatchOfOne(), False, (1, 8, 8), [1, 4]) is None
    swapped = dataclasses.replace(served, model=nn.Sequential(nn.Flatten(), nn.LazyLinear(len(served.classes))))
    pixels = rng.integers(0, 256, (2, c, served.side, served.side), dtype=np.uint8)
    with torch.no_grad():
        want = swapped.model(torch.from_numpy(pixels).float().div(255))
    torch.testing.assert_close(swapped.logits(pixels), want)


def test_an_onnx_runtime_model_is_served_like_the_torch_one_and_explained_by_occlusion(served, bare, files, tmp_path):
    """A model without gradients or the feature contract (an ONNX Runtime session, as ``pupil.sources`` opens one and
    ``pupil compress --format onnx`` deploys one): the same answers as the PyTorch network it was exported from,
    its session on the server's threads without spinning, occlusion for its explanations and a 400 for Grad-CAM."""
    pytest.importorskip("onnxruntime")
    from pupil.run import load_run
    from pupil.sources import open_audit

    run = load_run(bare)
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            run.model.net.eval(),
            (torch.rand(2, 1, 16, 16),),
            str(path),
            input_names=["input"],
            dynamic_axes={"input": {0: "n"}},
            dynamo=False,
            opset_version=17,
        )
    d = run.info["data"]
    stats = {"mean": ",".join(map(str, d["mean"])), "std": ",".join(map(str, d["std"]))}
    opened = open_audit(f"onnx:{path}", "synthetic", out=tmp_path / "ort", preprocess=stats, device=torch.device("cpu"))
    ort_served = load_served(opened, torch.device("cpu"), warm_batch=4, threads=1)
    options = ort_served.model.net.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert not ort_served.gradients and ort_served.explain_method == "occlusion"

    # The source is decoded as its audit decoded the data (shorter side resized, centre crop), the run by a plain
    # resize: uploads already at the input size are the same pixels for both.
    same = []
    for i, f in enumerate(files):
        same.append(tmp_path / f"{i}.png")
        same[-1].write_bytes(_png(ort_served.decode(open_upload(f.read_bytes()))[0]))
    with TestClient(create_app([load_served(bare, torch.device("cpu")), ort_served])) as c:
        want = c.post("/v1/models/bare/predict?top=4", files=_multipart(same)).json()
        got = c.post("/v1/models/ort/predict?top=4", files=_multipart(same)).json()
        assert got["model"] == "ort" and got["version"] == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        assert got["ood"] == want["ood"] and got["calibration"] == want["calibration"]
        for a, b in zip(got["predictions"], want["predictions"], strict=True):
            assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
            assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-5)
            assert a["ood"]["score"] == pytest.approx(b["ood"]["score"], abs=1e-5)
        assert c.get("/v1/models/ort").json()["explain"] == "occlusion"
        r = c.post("/v1/models/ort/explain", files=_multipart(same[:1]))
        assert r.status_code == 200 and r.headers["x-method"] == "occlusion", r.text
        assert r.headers["x-predicted-class"] == got["predictions"][0]["top"][0]["label"]
        assert Image.open(io.BytesIO(r.content)).size[0] >= 256
        r = c.post("/v1/models/ort/explain?method=gradcam", files=_multipart(files[:1]))
        assert r.status_code == 400 and "no gradients" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------------------------
# The other endpoints


def test_models_list_and_report_card(client, audited):
    from pupil.results import load_results, read_per_image

    listed = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in listed] == ["smoke", "bare"]
    smoke = listed[0]
    assert smoke == client.get("/v1/models/smoke").json()
    assert smoke["classes"] == ["class0", "class1", "class2", "class3"] and smoke["input"] == {
        "channels": 1,
        "size": 16,
    }
    results = load_results(audited)
    ids = read_per_image(audited, "ood", results["audit"])["id"]
    t = smoke["ood"]["threshold"]
    assert (ids >= t).double().mean() >= 0.95 and (ids > t).double().mean() < 0.95  # the 95%-TPR threshold
    assert smoke["ood"]["fpr95"] == results["checks"]["ood"]["summary"]["mean_fpr95"]
    assert smoke["conformal"] == {
        "default_level": 0.95,
        "score": results["checks"]["conformal"]["summary"]["score"],
        "randomized": True,
    }
    r = client.get(smoke["report"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == (audited / "report.html").read_bytes()
    assert "sandbox" in r.headers["content-security-policy"] and r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/v1/models/bare/report").status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/../report",
        "/v1/models/%2e%2e/report",
        "/v1/models/%2E%2E/report",
        "/v1/models/..%2f..%2fetc%2fpasswd/report",
        "/v1/models/smoke%2f..%2f..%2fsmoke/report",
        "/v1/models/smoke/..%2freport",
        "/v1/models/..%5c..%5crun.json/report",
        "/v1/models/smoke%00/report",
    ],
)
def test_report_paths_cannot_traverse(client, path):
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert b"schema_version" not in r.content and b"root:" not in r.content


def test_health_readiness_and_the_page(client, served):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "models": ["smoke", "bare"]}
    not_started = TestClient(create_app([served]))  # outside `with`: no lifespan, nothing warmed up for it
    assert not_started.get("/readyz").status_code == 503
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    nonce = re.search(r"'nonce-([^']+)'", page.headers["content-security-policy"]).group(1)
    assert page.text.count(f'nonce="{nonce}"') == 2 and "__NONCE__" not in page.text
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page.text)  # nothing fetched from elsewhere (no CDN)
    assert "http://" not in page.text and "https://" not in page.text
    for element in ('id="model"', 'id="file"', 'id="bars"', 'id="verdict"', 'id="ood"', 'id="overlay"', 'id="report"'):
        assert element in page.text


def test_explain_returns_an_overlay_png(client, files):
    top = client.post("/v1/models/smoke/predict", files=_multipart(files[:1])).json()["predictions"][0]["top"][0]
    r = client.post("/v1/models/smoke/explain", files=_multipart(files[:1]))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-method"] == "gradcam" and r.headers["x-predicted-class"] == top["label"]
    im = Image.open(io.BytesIO(r.content))
    assert im.size[0] >= 256 and im.mode == "RGB"
    other = client.post("/v1/models/smoke/explain?target=class0&method=gradcam%2B%2B", files=_multipart(files[:1]))
    assert other.status_code == 200 and other.headers["x-explained-class"] == "class0"
    assert other.content != r.content or top["label"] == "class0"


def test_metrics_count_requests_batches_deferrals_ood_flags_and_errors(served, files):
    with TestClient(create_app([served])) as c:
        preds = c.post("/v1/models/smoke/predict", files=_multipart(files)).json()["predictions"]
        assert c.post("/v1/models/nope/predict", files=_multipart(files[:1])).status_code == 404
        text = c.get("/metrics").text

    def value(series: str) -> float:
        m = re.search(re.escape(series) + r" ([0-9.e+]+)", text)
        return float(m.group(1)) if m else 0.0

    assert value('pupil_serve_requests_total{endpoint="predict",status="200"}') == 1
    assert value('pupil_serve_errors_total{endpoint="predict",status="404"}') == 1
    assert value('pupil_serve_request_seconds_count{endpoint="predict"}') == 2
    assert value('pupil_serve_batch_size_count{model="smoke"}') == 1
    assert value('pupil_serve_batch_size_sum{model="smoke"}') == len(files)
    assert value('pupil_serve_images_total{model="smoke"}') == len(files)
    assert value('pupil_serve_deferrals_total{model="smoke"}') == sum(p["deferral"]["deferred"] for p in preds)
    assert value('pupil_serve_ood_flags_total{model="smoke"}') == sum(bool(p["ood"]["flagged"]) for p in preds)


# ---------------------------------------------------------------------------------------------------------------
# Batching


def test_concurrent_requests_share_a_batch_and_get_the_unbatched_answers(served, files):
    n = 12
    images = [files[i % len(files)] for i in range(n)]
    with TestClient(create_app([served], Settings(max_batch=32, timeout_s=60))) as c:
        alone = [c.post("/v1/models/smoke/predict", files=_multipart([p])).json() for p in images]
        state = c.app.state.pupil
        gate = threading.Event()
        state.executor.submit(gate.wait, 30)  # holds the inference thread while the requests come in
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(c.post, "/v1/models/smoke/predict", files=_multipart([p])) for p in images]
            deadline = time.monotonic() + 30
            while state.batchers["smoke"].pending < n and time.monotonic() < deadline:
                time.sleep(0.01)  # the first batch waits for the thread, the other requests in the queue
            gate.set()
            together = [f.result(timeout=30).json() for f in futures]
        text = c.get("/metrics").text
    assert all(_same(a, b) for a, b in zip(alone, together, strict=True))
    count = float(re.search(r'pupil_serve_batch_size_count\{model="smoke"\} (\S+)', text).group(1))
    total = float(re.search(r'pupil_serve_batch_size_sum\{model="smoke"\} (\S+)', text).group(1))
    assert total == 2 * n and count - n <= 2  # the n concurrent requests took at most two forward passes


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_batcher_runs_a_lone_request_at_once_and_waits_only_for_arriving_ones():
    calls: list[list] = []

    def run(payloads):
        calls.append(payloads)
        return [p * 10 for p in payloads]

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(run, pool, max_batch=8, max_wait_s=30.0)  # a lone request must not wait 30 s
            b.start()
            assert await asyncio.wait_for(b.submit(1, 1), 5) == 10
            with b.arriving():  # a second request is still being read: the first one waits for it
                first = b.submit(1, 2)
                await asyncio.sleep(0.05)
                assert not first.done()
                second = b.submit(1, 3)
            assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [20, 30]
            await b.close()

    _run(scenario())
    assert calls == [[1], [2, 3]]


def test_batcher_fills_batches_drains_on_close_and_skips_abandoned_requests():
    calls: list[list] = []
    gate = threading.Event()

    def run(payloads):
        gate.wait(5)
        calls.append(payloads)
        return [RuntimeError("bad") if p == "bad" else p.upper() for p in payloads]

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(run, pool, max_batch=4, max_wait_s=0.0)
            b.start()
            first = b.submit(2, "a")
            await asyncio.sleep(0.05)  # the collector takes it; the gate holds the thread
            rest = [b.submit(2, p) for p in ("b", "c", "d", "e", "bad")]
            rest[1].cancel()  # its handler gave up: it never runs
            assert b.queued == 10
            closing = asyncio.ensure_future(b.close())
            await asyncio.sleep(0)
            with pytest.raises(Closed):
                b.submit(1, "late")
            gate.set()
            await closing  # everything queued before close ran
            assert [f.result() for f in (first, rest[0], rest[2], rest[3])] == ["A", "B", "D", "E"]
            with pytest.raises(RuntimeError, match="bad"):
                rest[4].result()

    _run(scenario())
    assert calls == [["a"], ["b", "d"], ["e", "bad"]]  # at most 4 images (2 each) per batch


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def _form(*parts: bytes) -> dict:
    body = b"".join(b"--zz\r\n" + p + b"\r\n" for p in parts) + b"--zz--\r\n"
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=zz"}}


@pytest.mark.parametrize(
    "request_kwargs,status,message",
    [
        ({"files": [("image", ("x.txt", b"just some text", "text/plain"))]}, 415, "not an image"),
        ({"files": [("image", ("x.png", b"", "image/png"))]}, 400, "empty"),
        ({"json": {"images": [base64.b64encode(b"%PDF-1.4 not an image").decode()]}}, 415, "not an image"),
        ({"json": {"images": ["@@not base64@@"]}}, 400, "not valid base64"),
        ({"json": {"pictures": []}}, 400, '{"images"'),
        ({"json": {"images": []}}, 400, "send 1 to"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
        (_form(b'Content-Disposition: form-data; name="note"\r\n\r\nno file here'), 400, "no image file"),
        (
            {"content": b"--zz\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
            400,
            "malformed",
        ),
        ({"content": b"--zz\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, "boundary"),
    ],
)
def test_bad_uploads_get_a_4xx_with_a_message(client, request_kwargs, status, message):
    r = client.post("/v1/models/smoke/predict", **request_kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_truncated_and_corrupt_images_get_400(client, files):
    data = files[2].read_bytes()  # noise.png: its pixel data is most of the file
    for broken in (data[: len(data) // 2], data[:-30] + bytes(18) + data[-12:]):  # truncated; pixel data zeroed
        r = client.post("/v1/models/smoke/predict", files=[("image", ("x.png", broken, "image/png"))])
        assert r.status_code == 400 and "image" in r.json()["detail"], r.text
    several = [*_multipart(files[:2]), ("image", ("y.png", data[: len(data) // 2], "image/png"))]
    r = client.post("/v1/models/smoke/predict", files=several)
    assert r.status_code == 400 and r.json()["detail"].startswith("image 3:")


@pytest.mark.parametrize(
    "url,status",
    [
        ("/v1/models/nope/predict", 404),
        ("/v1/models/nope/explain", 404),
        ("/v1/models/smoke/predict?top=0", 400),
        ("/v1/models/smoke/predict?top=five", 400),
        ("/v1/models/smoke/predict?top=5", 400),  # 4 classes
        ("/v1/models/smoke/predict?conformal=1.5", 400),
        ("/v1/models/smoke/predict?conformal=nan", 400),
        ("/v1/models/smoke/explain?method=lime", 400),
        ("/v1/models/smoke/explain?target=nope", 400),
    ],
)
def test_bad_names_and_options(client, files, url, status):
    r = client.post(url, files=_multipart(files[:1]))
    assert r.status_code == status and r.json()["detail"], r.text
    assert client.get("/v1/models/nope").status_code == 404


def test_too_many_images_in_one_request(served, files):
    with TestClient(create_app([served], Settings(max_images=2))) as c:
        assert c.post("/v1/models/smoke/predict", files=_multipart(files[:2])).status_code == 200
        r = c.post("/v1/models/smoke/predict", files=_multipart(files[:3]))
        assert r.status_code == 400 and "at most 2" in r.json()["detail"]
        r = c.post("/v1/models/smoke/explain", files=_multipart(files[:2]))
        assert r.status_code == 400 and "at most 1" in r.json()["detail"]


def test_uploads_over_the_limit_get_413(served):
    with TestClient(create_app([served], Settings(max_upload_bytes=4096))) as c:
        big = b"x" * 5000
        r = c.post("/v1/models/smoke/predict", content=big, headers={"content-type": "image/png"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]  # refused by Content-Length
        chunks = iter([b"x" * 3000, b"x" * 3000])  # no Content-Length: counted as it arrives
        r = c.post("/v1/models/smoke/predict", content=chunks, headers={"content-type": "image/png"})
        assert r.status_code == 413
        r = c.post("/v1/models/smoke/predict", files=[("image", ("x.png", big, "image/png"))])
        assert r.status_code == 413


def test_decompression_bombs_are_refused(served, monkeypatch):
    wide = _png(np.zeros((200, 200), np.uint8))  # 40,000 pixels in a few hundred bytes
    with TestClient(create_app([served], Settings(max_pixels=10_000))) as c:
        r = c.post("/v1/models/smoke/predict", files=[("image", ("x.png", wide, "image/png"))])
        assert r.status_code == 413 and "over this server's limit" in r.json()["detail"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    with TestClient(create_app([served])) as c:
        for side in (200, 90):  # past twice PIL's limit (its error), and past it (its warning, made an error)
            data = _png(np.zeros((side, side), np.uint8))
            r = c.post("/v1/models/smoke/predict", files=[("image", ("x.png", data, "image/png"))])
            assert r.status_code == 413 and "decompression-bomb" in r.json()["detail"]


class _Broken(nn.Module):
    """A model that is slow, fails, or gives NaN."""

    def __init__(self, inner: nn.Module, how: str):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x):
        if self.how == "slow":
            time.sleep(1.0)
        if self.how == "fails":
            raise RuntimeError("boom")
        out = self.inner(x)
        return out * float("nan") if self.how == "nan" else out


def test_timeouts_model_failures_and_non_finite_logits(served, files):
    broken = [
        dataclasses.replace(served, name=how, model=_Broken(served.model, how)) for how in ("slow", "fails", "nan")
    ]
    with TestClient(create_app(broken, Settings(timeout_s=0.3))) as c:
        r = c.post("/v1/models/fails/predict", files=_multipart(files[:1]))
        assert r.status_code == 500 and "boom" in r.json()["detail"]
        r = c.post("/v1/models/nan/predict", files=_multipart(files[:1]))
        assert r.status_code == 500 and "non-finite" in r.json()["detail"]
        r = c.post("/v1/models/slow/predict", files=_multipart(files[:1]))  # last: it holds the inference thread
        assert r.status_code == 504 and "0.3 s" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Who may ask


def test_an_api_key_is_required_except_for_the_page_and_health(served, files):
    with TestClient(create_app([served], Settings(api_keys=(KEY,), max_upload_bytes=4096))) as c:
        for path in ("/v1/models", "/v1/models/smoke", "/v1/models/smoke/report", "/metrics"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        r = c.post("/v1/models/smoke/predict", files=_multipart(files[:1]))
        assert r.status_code == 401
        assert c.get("/v1/models", headers={"x-api-key": KEY + "x"}).status_code == 401
        assert c.get("/v1/models", headers={"authorization": f"Basic {KEY}"}).status_code == 401
        assert c.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200
        ok = c.post("/v1/models/smoke/predict", files=_multipart(files[:1]), headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        for path in ("/", "/healthz", "/readyz"):
            assert c.get(path).status_code == 200, path
        # the key is checked before anything else: an unauthorised oversized upload is 401, an authorised one 413
        big = {"content": b"x" * 5000, "headers": {"content-type": "image/png"}}
        assert c.post("/v1/models/smoke/predict", **big).status_code == 401
        big["headers"]["x-api-key"] = KEY
        assert c.post("/v1/models/smoke/predict", **big).status_code == 413


def test_requests_for_another_host_are_refused(served):
    app = create_app([served], Settings(allowed_hosts=("127.0.0.1", "localhost")))
    with TestClient(app, base_url="http://evil.example") as c:
        r = c.get("/v1/models")
        assert r.status_code == 400 and "evil.example" in r.json()["detail"]
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/v1/models").status_code == 200


def test_api_key_files(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# keys, one per line\n{KEY}\n\n  other-key-0123456789  \n")
    assert read_api_keys(path) == (KEY, "other-key-0123456789")
    for text, message in [
        ("", "holds no key"),
        ("short\n", "at least 16"),
        ("has a space in it ok\n", "without spaces"),
    ]:
        path.write_text(text)
        with pytest.raises(PupilError, match=message):
            read_api_keys(path)
    with pytest.raises(PupilError, match="does not exist"):
        read_api_keys(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------
# The multipart parser against python-multipart


def _reference_files(body: bytes, content_type: str) -> list[bytes]:
    import python_multipart

    found = []
    headers = {"Content-Type": content_type.encode(), "Content-Length": str(len(body)).encode()}
    python_multipart.parse_form(headers, io.BytesIO(body), lambda f: None, lambda f: found.append(f))
    out = []
    for f in found:
        f.file_object.seek(0)
        out.append(f.file_object.read())
    return out


def test_multipart_parser_agrees_with_python_multipart():
    import httpx

    rng = np.random.default_rng(1)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 300, 5000)]
    blobs.append(b"\r\n--not-the-boundary\r\n\r\n--")  # looks like a delimiter, is not one
    request = httpx.Request(
        "POST",
        "http://x/",
        files=[(f"f{i}", (f'n {i}".bin', b, "application/octet-stream")) for i, b in enumerate(blobs)],
        data={"note": "a field, not a file"},
    )
    body, ctype = request.read(), request.headers["content-type"]
    assert multipart_files(body, ctype.partition(";")[2], 10) == _reference_files(body, ctype) == blobs
    # a quoted boundary, header names in any case, a field that is not a file, an epilogue
    body = (
        b'--b-1\r\nCONTENT-DISPOSITION: form-data; name="a"; filename="a.png"\r\n\r\nAAA\r\n'
        b'--b-1\r\ncontent-disposition: form-data; name="t"\r\n\r\ntext\r\n--b-1--\r\nepilogue'
    )
    ctype = 'multipart/form-data; boundary="b-1"'
    assert multipart_files(body, ctype.partition(";")[2], 10) == _reference_files(body, ctype) == [b"AAA"]
    # RFC 2046 also allows a preamble and padding after a delimiter (python-multipart refuses both)
    padded = b"preamble\r\n" + body.replace(b"--b-1\r\n", b"--b-1  \r\n", 1)
    assert multipart_files(padded, ctype.partition(";")[2], 10) == [b"AAA"]
    with pytest.raises(HTTPException) as e:
        multipart_files(body[:60], ctype.partition(";")[2], 10)
    assert e.value.status_code == 400


# ---------------------------------------------------------------------------------------------------------------
# A real server: startup failures, raw requests, a streamed body, graceful shutdown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_startup_problems_are_one_line_before_listening(audited, bare, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(audited / "run.json", broken / "run.json")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    misfit = tmp_path / "misfit"  # run.json says RGB, the network takes grey: fails its warm-up
    misfit.mkdir()
    info = json.loads((audited / "run.json").read_text())
    info["data"]["input_shape"] = [3, 16, 16]
    (misfit / "run.json").write_text(json.dumps(info))
    shutil.copy(audited / "model.safetensors", misfit / "model.safetensors")
    keys = tmp_path / "keys"
    keys.write_text("short\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cases = [
            ({"runs": [str(tmp_path / "missing")]}, "does not exist"),
            ({"runs": [str(broken)]}, "corrupt weights"),
            ({"runs": [str(misfit)]}, "failed its warm-up"),
            ({"runs": [str(audited), str(audited)]}, "both named smoke"),
            ({"api_key_file": str(keys)}, "at least 16"),
            ({"api_key_file": str(tmp_path / "nokeys")}, "does not exist"),
            ({"port": busy}, "in use"),
            ({"host": "bad..host"}, "not a valid host"),
            ({"host": "192.0.2.1"}, "not an address of this machine"),
            ({"max_batch": 0}, "--max-batch"),
            ({"max_upload_mb": 0}, "--max-upload-mb"),
            ({"port": 70000}, "--port"),
        ]
        for kwargs, message in cases:
            port = _free_port()
            kwargs = {"runs": [str(audited)], "port": port, "threads": torch.get_num_threads(), "log": print} | kwargs
            with pytest.raises(PupilError, match=message) as e:
                prepare(**kwargs)
            assert "\n" not in str(e.value)
            if kwargs["port"] == port:  # nothing was left listening or bound
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))


def _raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are (no client normalises the path) and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


@pytest.fixture(scope="module")
def live(audited):
    with running([str(audited)], max_upload_mb=0.25) as (_, port):
        yield port


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models/../../../../etc/passwd",
        "/v1/models/../report",
        "/v1/models/%2e%2e/report",
        "/v1/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd/report",
        "/v1/models/smoke/..%2f..%2fresults.json",
        "/v1/models/smoke%2f..%2f..%2fsmoke/report",
        "/v1/models/smoke/report/../../run.json",
        "/v1/models/..%252f..%252fsmoke/report",
    ],
)
def test_raw_paths_cannot_reach_run_files(live, target):
    reply = _raw(live, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 404") or reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"schema_version" not in reply and b"root:" not in reply and b'"status":' not in reply


def test_the_report_card_over_a_socket(live, audited):
    reply = _raw(live, b"GET /v1/models/smoke/report HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith((audited / "report.html").read_bytes())


def test_answers_over_a_socket_come_whole_in_order_on_one_connection(live, files):
    """The server sends each answer's head and body in one write (``pupil.serve.OneWrite``): on one keep-alive
    connection, answers with a body, without one (HEAD) and a streamed file arrive whole and in order."""
    data = files[0].read_bytes()
    predict = (
        b"POST /v1/models/smoke/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(data)
        + data
    )
    head = b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    report = b"GET /v1/models/smoke/report HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    last = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", live), timeout=10) as s:
        reader = s.makefile("rb")
        for request, has_body in ((predict, True), (head, False), (report, True), (predict, True), (last, True)):
            s.sendall(request)  # a HEAD is answered with a head alone (405 here: the routes take GET)
            status = reader.readline()
            fields = {}
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                fields[name.strip().lower()] = value.strip()
            assert status.startswith(b"HTTP/1.1 405" if request is head else b"HTTP/1.1 200"), (status, fields)
            body = reader.read(int(fields["content-length"])) if has_body else b""
            if request is predict:
                assert json.loads(body)["predictions"][0]["top"]
            elif request is last:
                assert json.loads(body) == {"status": "ok"}
        assert reader.read() == b""  # nothing after the last answer: the server closed


def test_oversized_bodies_are_refused_before_they_are_read(live):
    head = "POST /v1/models/smoke/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
    # Content-Length over the limit, and no body at all: the answer comes without waiting for one
    reply = _raw(live, (head + f"Content-Length: {100 << 20}\r\n\r\n").encode())
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # A chunked body, never ended: at the limit (256 KiB) the server waits for more; one byte past it, it refuses
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    with socket.create_connection(("127.0.0.1", live), timeout=10) as s:
        s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunk * 4)
        assert not select.select([s], [], [], 0.3)[0]  # no answer at the limit
        s.sendall(b"1\r\n\0\r\n")
        reply = b""
        while part := s.recv(65536):
            reply += part
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_graceful_shutdown_finishes_requests_in_flight(audited, files):
    import http.client

    gate, entered = threading.Event(), threading.Event()

    class Held(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            entered.set()
            gate.wait(10)
            return self.inner(x)

    data = files[0].read_bytes()

    def ask(port: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("POST", "/v1/models/smoke/predict", body=data, headers={"content-type": "image/png"})
        status = conn.getresponse().status
        conn.close()
        return status

    with running([str(audited)]) as (server, port):
        state = server.config.app.state.pupil
        served = state.models["smoke"]
        served.model = Held(served.model)
        with ThreadPoolExecutor(4) as pool:
            asks = [pool.submit(ask, port) for _ in range(4)]
            assert entered.wait(10)
            deadline = time.monotonic() + 10
            while state.batchers["smoke"].pending < 4 and time.monotonic() < deadline:
                time.sleep(0.01)  # all four in: one or two (arrived together) in the held forward pass, the rest queued
            server.should_exit = True
            deadline = time.monotonic() + 10  # its own time: a loaded machine may have spent the first on queueing
            while time.monotonic() < deadline:  # the server stops accepting first...
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the server kept accepting connections after shutdown began")
            gate.set()  # ...then the requests in flight finish
            assert [a.result(timeout=20) for a in asks] == [200] * 4
