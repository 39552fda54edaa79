"""The HTTP service: FastAPI routes over the served models, one batcher per model, a guard in front, metrics.

Routes (``create_app``):

    GET  /                            the web page (one template, plain JS, nothing fetched from elsewhere)
    GET  /healthz                     liveness: the process answers
    GET  /readyz                      readiness: every model loaded and warmed up, not shutting down (else 503)
    GET  /metrics                     Prometheus text format
    GET  /v1/models                   {"models": [entry, ...]}; entry: ``Served.describe``
    GET  /v1/models/{name}            one entry
    GET  /v1/models/{name}/report     the run's report.html, sandboxed by its Content-Security-Policy
    POST /v1/models/{name}/predict    images -> top-k, OOD score and flag, deferral, conformal set
    POST /v1/models/{name}/explain    one image -> overlay PNG (Grad-CAM; occlusion for a model without a Grad-CAM
                                      layer or without gradients, such as an ONNX Runtime session)

Uploads: ``multipart/form-data`` (each file part is an image), ``application/json`` (``{"images": [base64, ...]}``
or ``{"image": base64}``; data URIs accepted) or the raw bytes with an ``image/*`` content type.

The guard (``Guard``, plain ASGI, in front of every route) answers before the route reads anything: 401 without
the API key (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``) on every route but the page and the health
checks; 400 for a Host header the server was not bound for (DNS rebinding, when bound to loopback); 413 when
Content-Length exceeds the upload limit, or as soon as a streamed body passes it (bytes are counted as they
arrive, so an oversized body is never held); 504 when predict or explain takes longer than ``timeout_s``,
reading the body included. It also counts every request for ``/metrics``.

The hot path. FastAPI serves every route but predict; predict is answered by the guard itself (``Predictor``, plain
ASGI: the body read, the images opened, the batch awaited, one JSON response), because under load the per-request
Python of the framework's middleware stack, routing and response objects was about a quarter of the event loop's
time in a profile, and the event loop is what bounds the service: it and the inference thread share one
interpreter lock, so every microsecond of Python per request is one the forward pass cannot overlap. The answers,
status codes and headers are the ones the FastAPI route gave (the API tests, unchanged, hold it to them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import json
import logging
import re
import secrets
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.exceptions import HTTPException as AnyHTTPException  # FastAPI's is a subclass

from pupil.serve.batching import Batcher, Busy, Closed
from pupil.serve.models import (
    DEFAULT_LEVEL,
    EXPLAIN_METHODS,
    GRADIENT_METHODS,
    MAX_PIXELS,
    BadUpload,
    Served,
    open_upload,
)

if TYPE_CHECKING:
    from pupil.serve.search import ServedIndex

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # pragma: no cover

    @asynccontextmanager
    async def deadline(seconds: float):
        import anyio

        with anyio.fail_after(seconds):
            yield


log = logging.getLogger("pupil.serve")
PAGE = Path(__file__).with_name("templates") / "index.html"
INLINE_PIXELS = 256 * 256  # uploads up to this size are decoded by the inference thread; larger ones in a decode thread
OPEN = frozenset({"page", "healthz", "readyz"})  # reachable without the API key
TIMED = frozenset({"predict", "explain", "search", "item"})
HOT = ("/v1/models/{name}/predict", "/v1/models/{name}/explain")
FILENAME = re.compile(rb";\s*filename\*?=", re.IGNORECASE)  # a file part's Content-Disposition parameter
FIXED = {
    "/": "page",
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
    "/v1/models": "models",
    "/v1/indexes": "indexes",
}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NOSNIFF = (b"x-content-type-options", b"nosniff")
JSON = (b"content-type", b"application/json")
PAGE_CSP = (
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The report card is pupil's own self-contained HTML (inline styles, scripts and images); sandboxed, its scripts
# run without this origin, so they cannot call the API with the visitor's key.
REPORT_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "sandbox allow-scripts allow-popups"
)


@dataclass(frozen=True)
class Settings:
    """How the service batches, what it accepts and whom it answers."""

    max_batch: int = 32
    """Images per forward pass at most."""
    max_wait_ms: float = 5.0
    """How long an idle model waits for more requests that are already arriving."""
    max_upload_bytes: int = 8 << 20
    """Request bodies larger than this get 413."""
    max_images: int = 16
    """Images per predict request at most."""
    max_pixels: int = MAX_PIXELS
    """Decoded size (width x height) an upload may have."""
    timeout_s: float = 10.0
    """Predict and explain requests still unanswered after this get 504."""
    api_keys: tuple[str, ...] = ()
    """Keys one of which every request but the page and the health checks must carry; none: no check."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host header values (without port) the server answers; None: any."""
    max_queue: int = 1024
    """Images waiting per model beyond which predict answers 503."""
    in_flight: int = 1
    """Batches of one model that may run at once, each on its own inference thread (``pupil.serve.batching``)."""
    top: int = 5
    """Classes per prediction unless the request asks ``?top=``."""

    def __post_init__(self):
        if min(self.max_batch, self.max_images, self.max_upload_bytes, self.max_pixels, self.in_flight) < 1:
            raise ValueError("max_batch, max_images, max_upload_bytes, max_pixels and in_flight must be positive")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and timeout_s > 0")


class Metrics:
    """The Prometheus series, in a registry of their own (two apps in one process do not collide)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "pupil_serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.errors = Counter("pupil_serve_errors", "Responses with status >= 400", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "pupil_serve_request_seconds", "Time to answer a request", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch = Histogram(
            "pupil_serve_batch_size", "Images per forward pass", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter("pupil_serve_images", "Images predicted", ["model"], registry=r)
        self.deferrals = Counter("pupil_serve_deferrals", "Images deferred to a human", ["model"], registry=r)
        self.ood = Counter("pupil_serve_ood_flags", "Images flagged as out of distribution", ["model"], registry=r)


def endpoint(path: str) -> str:
    """The route a path belongs to (a bounded label for the metrics): page, predict, report..., or other."""
    if path in FIXED:
        return FIXED[path]
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "v1" and parts[2] == "models":
        if len(parts) == 4:
            return "model"
        if len(parts) == 5 and parts[4] in ("predict", "explain", "report"):
            return parts[4]
    if len(parts) >= 4 and parts[1] == "v1" and parts[2] == "indexes":
        if len(parts) == 4:
            return "index"
        if len(parts) == 5 and parts[4] == "search":
            return "search"
        if len(parts) == 6 and parts[4] == "items":
            return "item"
    return "other"


async def reply(send: Callable, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON error response {"detail": ...} sent straight to the ASGI server."""
    body = json.dumps({"detail": detail}).encode()
    head = [JSON, (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """API key, Host header, upload limit, request timeout and request metrics, in front of every route; predict
    is answered here by ``predict`` (see the module docstring), every other route by ``app`` (FastAPI)."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: Settings, metrics: Metrics, predict: Predictor):
        self.app, self.settings, self.metrics, self.predict = app, settings, metrics, predict
        self.keys = [k.encode() for k in settings.api_keys]
        self.hosts = None if settings.allowed_hosts is None else {h.lower() for h in settings.allowed_hosts}
        self.series: dict[tuple[str, int], tuple] = {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name, t0, status = endpoint(scope["path"]), time.perf_counter(), [0]

        async def send_(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), NOSNIFF]
            await send(message)

        try:
            refusal = self.refuse(scope, name)
            if refusal is not None:
                await reply(send_, *refusal)
            elif name == "predict" and scope["method"] == "POST":
                status[0] = await self.answer(scope, self.counted(receive), send)
            elif name in TIMED:
                await self.timed(scope, self.counted(receive), send_, status)
            else:
                await self.app(scope, self.counted(receive), send_)
        finally:
            self.count(name, status[0] or 500, time.perf_counter() - t0)

    async def answer(self, scope: dict, receive: Callable, send: Callable) -> int:
        """Predict, within the timeout; the response (or the error) is sent whole, after the deadline or not. Returns
        the status sent (0 when the client went away before an answer)."""
        headers: list[tuple[bytes, bytes]] = []
        try:
            async with deadline(self.settings.timeout_s):
                status, body = 200, await self.predict(scope, receive)
        except TimeoutError:
            status, body = 504, _detail(f"no answer within {self.settings.timeout_s:g} s")
            headers.append((b"connection", b"close"))
        except AnyHTTPException as e:
            status, body = e.status_code, _detail(e.detail)
            headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (e.headers or {}).items()]
        except Disconnected:
            return 0
        except Exception:  # a bug: logged with its traceback, answered in one line
            log.exception("predict failed")
            status, body = 500, _detail("internal error; see the server's log")
        head = [(b"content-length", b"%d" % len(body)), JSON, NOSNIFF, *headers]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})
        return status

    def count(self, name: str, status: int, seconds: float) -> None:
        """One request in the metrics (each label set's series looked up once, then kept)."""
        series = self.series.get((name, status))
        if series is None:
            m, code = self.metrics, str(status)
            errors = m.errors.labels(name, code) if status >= 400 else None
            series = self.series[name, status] = (m.requests.labels(name, code), errors, m.latency.labels(name))
        series[0].inc()
        if series[1] is not None:
            series[1].inc()
        series[2].observe(seconds)

    async def timed(self, scope: dict, receive: Callable, send: Callable, status: list[int]) -> None:
        import anyio

        async def shielded(message: dict) -> None:  # a response once begun is sent whole, deadline or not
            with anyio.CancelScope(shield=True):
                await send(message)

        try:
            with anyio.fail_after(self.settings.timeout_s):
                await self.app(scope, receive, shielded)
        except TimeoutError:
            if not status[0]:
                await reply(send, 504, f"no answer within {self.settings.timeout_s:g} s", [(b"connection", b"close")])

    def refuse(self, scope: dict, name: str) -> tuple[int, str, list] | None:
        """(status, detail, headers) when the request is refused before the route runs, else None."""
        headers = dict(scope["headers"])  # lower-cased names (ASGI)
        if self.hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # drop the port
            if host not in self.hosts:
                return 400, f"this server does not answer for host {host[:100]!r}", []
        if self.keys and name not in OPEN and not self.authorised(headers):
            return (
                401,
                "missing or wrong API key (send X-API-Key: KEY or Authorization: Bearer KEY)",
                [(b"www-authenticate", b"Bearer")],
            )
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "invalid Content-Length", [(b"connection", b"close")]
            if int(length) > self.settings.max_upload_bytes:
                return 413, self.too_large(), [(b"connection", b"close")]
        return None

    def authorised(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        if given is None:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else None
        # compare_digest against every key, so the time taken does not tell which key nearly matched
        return given is not None and sum(hmac.compare_digest(given, k) for k in self.keys) > 0

    def too_large(self) -> str:
        return f"the request body is over this server's limit of {self.settings.max_upload_bytes / 2**20:g} MiB"

    def counted(self, receive: Callable) -> Callable:
        """``receive`` that counts body bytes and raises 413 as soon as they pass the limit."""
        seen, limit = 0, self.settings.max_upload_bytes

        async def receive_() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, self.too_large(), headers={"connection": "close"})
            return message

        return receive_


def _detail(detail: Any) -> bytes:
    return json.dumps({"detail": detail}).encode()


class Disconnected(Exception):
    """The client went away before its request's body was read whole."""


@dataclass
class Work:
    """One predict request as the batch sees it."""

    images: list[Any]
    """Each image opened (header read, pixels not yet decoded: the inference thread decodes small ones, which
    takes that work off the event loop) or already decoded to (C, H, W) uint8 (large ones, in a decode thread)."""
    top: int
    level: float | None


@dataclass
class State:
    models: dict[str, Served]
    settings: Settings
    metrics: Metrics
    batchers: dict[str, Batcher] = field(default_factory=dict)
    executor: ThreadPoolExecutor | None = None
    """The inference thread: explanations, searches, and predict batches when one runs at a time."""
    batch_pool: ThreadPoolExecutor | None = None
    """Where predict batches run: ``executor``, or ``in_flight`` threads of their own."""
    decode_pool: ThreadPoolExecutor | None = None
    ready: bool = False


def run_batch(served: Served, works: list[Work], answering: threading.Lock | None = None) -> list[Any]:
    """Decode what is left to decode, one forward pass over every request's images, then each request's answers
    (or the error it gets: a corrupt image, non-finite logits). ``answering``: held while the answers are made,
    when two batches of ``served`` may run at once (the conformal calibrations are cached on first use)."""
    out: list[Any] = [None] * len(works)
    arrays: list[np.ndarray] = []
    spans: list[tuple[int, int, int]] = []  # (request, first row, rows)
    for j, w in enumerate(works):
        try:
            px = [_pixels_of(im, served, i, len(w.images)) for i, im in enumerate(w.images)]
        except BadUpload as e:
            out[j] = e
            continue
        spans.append((j, len(arrays), len(px)))
        arrays += px
    if not arrays:
        return out
    logits = served.logits(np.stack(arrays))
    rows = [(works[j], n) for j, _, n in spans]
    top = [w.top for w, n in rows for _ in range(n)]
    levels = [w.level for w, n in rows for _ in range(n)]
    with answering or contextlib.nullcontext():
        answers = served.answer(logits, [a.tobytes() for a in arrays], top, levels)
        finite = torch.isfinite(logits).all(1).tolist()
        for j, start, n in spans:
            if not all(finite[start : start + n]):
                out[j] = RuntimeError("the model produced non-finite logits for this image")
            else:
                level = works[j].level
                out[j] = (answers[start : start + n], served.conformal_info(level) if level is not None else None)
    return out


def _pixels_of(image: Any, served: Served | ServedIndex, i: int, n: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    try:
        return served.decode(image)
    except BadUpload as e:
        raise BadUpload(e.status, f"image {i + 1}: {e}" if n > 1 else str(e)) from None


class Predictor:
    """``POST /v1/models/{name}/predict`` as plain ASGI, called by the guard: the JSON body of the answer, or an
    HTTPException. The steps and messages are those of every other route: the model (404), the query (400), the
    body (415/400), each image's header (415/413/400), then the batch."""

    def __init__(self, state: State):
        self.state = state
        # What every answer of a model starts with, encoded once: the body is this, the conformal calibration and
        # the predictions (the same bytes json.dumps gives the whole dict).
        self.heads = {name: _head(served) for name, served in state.models.items()}
        self.series: dict[str, tuple] = {}

    async def __call__(self, scope: dict, receive: Callable) -> bytes:
        state, settings = self.state, self.state.settings
        name = scope["path"].split("/")[3]  # /v1/models/{name}/predict, as ``endpoint`` matched it
        served = find(state.models, name)
        query = _query(scope)
        top, level = _top(query, served, settings), _level(query, served)
        batcher = state.batchers.get(name)
        if batcher is None:
            raise HTTPException(503, "the server is not ready")
        with batcher.arriving():
            body = await _body(receive)
            blobs = _uploads(_header(scope, b"content-type"), body, settings.max_images)
            images = [await _open(state, served, b, i, len(blobs), large_only=True) for i, b in enumerate(blobs)]
        try:
            future = batcher.submit(len(images), Work(images, top, level))
        except Closed as e:
            raise HTTPException(503, str(e)) from None
        except Busy as e:
            raise HTTPException(503, str(e), headers={"retry-after": "1"}) from None
        try:
            answers, conformal = await future
        except BadUpload as e:  # found while decoding (a truncated file passes the header check)
            raise HTTPException(e.status, str(e)) from None
        except Exception as e:  # the model failed on the batch, or gave non-finite logits for these images
            log.error("predict on %s failed: %s", name, e)
            raise HTTPException(
                500, f"inference failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
            ) from None
        self.count(name, answers)
        tail = f'{json.dumps(conformal)}, "predictions": {json.dumps(answers)}}}'
        return (self.heads[name] + tail).encode()

    def count(self, name: str, answers: list[dict]) -> None:
        """The images, deferrals and OOD flags of one answer in the metrics (each model's series looked up once)."""
        series = self.series.get(name)
        if series is None:
            m = self.state.metrics
            series = self.series[name] = (m.images.labels(name), m.deferrals.labels(name), m.ood.labels(name))
        series[0].inc(len(answers))
        if deferred := sum(a["deferral"]["deferred"] for a in answers):
            series[1].inc(deferred)
        if flagged := sum(bool(a["ood"]["flagged"]) for a in answers):
            series[2].inc(flagged)


def _head(served: Served) -> str:
    """The start of every predict answer of ``served``, up to the conformal calibration's value."""
    fixed = {
        "model": served.name,
        "version": served.version,
        "calibration": {"temperature": served.temperature, "audited": served.temperature_audited},
        "ood": {"score": served.ood.score, "threshold": served.ood.threshold},
        "deferral": {"threshold": served.deferral_threshold, "target_accuracy": served.target_accuracy},
    }
    return json.dumps(fixed)[:-1] + ', "conformal": '


class ServeApp(FastAPI):
    """FastAPI behind the guard: every request passes ``guard`` first, which answers predict itself and hands the
    rest to FastAPI (see the module docstring)."""

    guard: Guard

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        await self.guard(scope, receive, send)


def find(models: dict[str, Served], name: str) -> Served:
    if name not in models:
        raise HTTPException(404, f"no model named {name[:100]!r}; this server has {', '.join(models)}")
    return models[name]


def create_app(
    models: list[Served], settings: Settings | None = None, indexes: list[ServedIndex] | None = None
) -> ServeApp:
    """The FastAPI app serving ``models`` (loaded and warmed up by ``load_served``) and the search ``indexes``
    (``pupil.serve.search.load_indexes``; the search routes are there with none, and list none)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from pupil.serve.search import install_search

    settings = settings or Settings()
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise ValueError("two served models share a name")
    state = State(by_name, settings, Metrics())
    page = PAGE.read_text()

    @asynccontextmanager
    async def lifespan(app):
        state.executor = ThreadPoolExecutor(1, "pupil-infer")
        state.decode_pool = ThreadPoolExecutor(2, "pupil-decode")  # large uploads, decoded off the event loop
        n = settings.in_flight
        state.batch_pool = state.executor if n == 1 else ThreadPoolExecutor(n, "pupil-batch")
        for name, served in by_name.items():
            observe = state.metrics.batch.labels(name).observe
            lock = threading.Lock() if n > 1 else None
            b = Batcher(
                lambda works, s=served, lock=lock: run_batch(s, works, lock),
                state.batch_pool,
                settings.max_batch,
                settings.max_wait_ms / 1000,
                settings.max_queue,
                observe,
                n,
            )
            b.start()
            state.batchers[name] = b
        state.ready = True
        try:
            yield
        finally:
            state.ready = False  # readyz says 503 from here on; uvicorn has already stopped accepting
            for b in state.batchers.values():
                await b.close()
            state.batch_pool.shutdown(wait=True)
            state.executor.shutdown(wait=True)
            state.decode_pool.shutdown(wait=True)

    # No /docs (its page loads scripts from a CDN) and no /openapi.json (predict and explain are plain routes, so it
    # would describe half the API); the module docstring is the reference.
    app = ServeApp(title="pupil serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    predictor = Predictor(state)
    app.guard = Guard(functools.partial(FastAPI.__call__, app), settings, state.metrics, predictor)
    app.state.pupil = state

    def json_response(body: Any, status: int = 200) -> Response:
        return Response(json.dumps(body), status, media_type="application/json")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        csp = PAGE_CSP.format(nonce=nonce)
        return HTMLResponse(page.replace("__NONCE__", nonce), headers={"content-security-policy": csp})

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = state.ready and len(state.batchers) == len(by_name)
        return json_response({"ready": ready, "models": list(by_name)}, 200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response({"models": [m.describe() for m in by_name.values()]})

    @app.get("/v1/models/{name}")
    async def one_model(name: str) -> Response:
        return json_response(find(by_name, name).describe())

    @app.get("/v1/models/{name}/report")
    async def report(name: str) -> Response:
        served = find(by_name, name)
        path = served.report  # a fixed file name inside the run directory: nothing of the URL reaches the path
        if path is None:
            raise HTTPException(404, f"{name} has no report card: run `pupil report` on its run directory")
        return FileResponse(path, media_type="text/html", headers={"content-security-policy": REPORT_CSP})

    async def predict(request: Request) -> Response:
        """The guard answers predict itself; this route gives other methods their 405, and serves predict should
        the app ever be called without its guard."""
        return Response(await predictor(request.scope, request.receive), media_type="application/json")

    async def explain(request: Request) -> Response:
        name = request.path_params["name"]
        served = find(by_name, name)
        method = request.query_params.get("method", served.explain_method)
        if method not in EXPLAIN_METHODS:
            raise HTTPException(400, f"method must be one of {', '.join(EXPLAIN_METHODS)}, not {method[:50]!r}")
        if method in GRADIENT_METHODS and not served.gradients:
            raise HTTPException(400, f"{name} gives no gradients (an ONNX Runtime model): use method=occlusion")
        target = _target(request.query_params, served)
        blobs = _uploads(request.headers.get("content-type", ""), await request.body(), 1)
        pixels = await _open(state, served, blobs[0], 0, 1, large_only=False)
        batcher = state.batchers.get(name)
        if batcher is None or state.executor is None:
            raise HTTPException(503, "the server is not ready")
        try:
            # Grad-CAM hooks the model's layer, which would see a predict batch's forward pass on another thread
            png, pred, explained = await batcher.run_exclusive(state.executor, served.explain, pixels, method, target)
        except RuntimeError as e:  # an executor shut down, or the method failed on this model
            raise HTTPException(503 if "shutdown" in str(e) else 500, f"explanation failed: {e}") from None
        except Exception as e:
            raise HTTPException(500, f"explanation failed: {str(e).splitlines()[0][:200]}") from None
        headers = {
            "x-predicted-class": quote(served.classes[pred]),
            "x-explained-class": quote(served.classes[explained]),
            "x-method": method,
            "cache-control": "no-store",
        }
        return Response(png, media_type="image/png", headers=headers)

    # Plain Starlette routes: these two read everything from the request themselves, so FastAPI's parameter
    # resolution would only add work; they are matched first.
    app.add_route("/v1/models/{name}/predict", predict, methods=["POST"], include_in_schema=False)
    app.add_route("/v1/models/{name}/explain", explain, methods=["POST"], include_in_schema=False)
    app.router.routes.sort(key=lambda r: getattr(r, "path", "") not in HOT)  # a stable sort
    install_search(app, list(indexes or []))
    return app


# ---------------------------------------------------------------------------------------------------------------
# Request parsing


def _top(query: Mapping[str, str], served: Served, settings: Settings) -> int:
    raw = query.get("top")
    if raw is None:
        return min(settings.top, len(served.classes))
    if not raw.isdigit() or not 1 <= int(raw) <= len(served.classes):
        raise HTTPException(400, f"top must be a whole number from 1 to {len(served.classes)}, not {raw[:20]!r}")
    return int(raw)


def _level(query: Mapping[str, str], served: Served) -> float | None:
    """The conformal level: ``?conformal=0.9``, ``?conformal=off``, or 0.95 when the run was audited for it."""
    raw = query.get("conformal")
    if raw is None:
        return DEFAULT_LEVEL if served.conformal is not None else None
    if raw.lower() in ("off", "none", "0"):
        return None
    if served.conformal is None:
        raise HTTPException(400, f"{served.name} has no conformal calibration: audit it with the conformal check")
    try:
        level = float(raw)
    except ValueError:
        level = float("nan")
    if not 0 < level < 1:
        raise HTTPException(400, f"conformal takes a coverage level between 0 and 1 (e.g. 0.9), not {raw[:20]!r}")
    return round(level, 6)  # a bounded number of distinct calibrations


def _target(query: Mapping[str, str], served: Served) -> int | None:
    raw = query.get("target")
    if raw is None:
        return None
    if raw in served.classes:
        return served.classes.index(raw)
    if raw.isdigit() and int(raw) < len(served.classes):
        return int(raw)
    raise HTTPException(400, f"unknown class {raw[:100]!r}; give a class name or an index below {len(served.classes)}")


def _query(scope: dict) -> dict[str, str]:
    """The query string's parameters (the last of a repeated one), as Starlette's ``query_params`` reads them."""
    raw = scope.get("query_string", b"")
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}


def _header(scope: dict, name: bytes) -> str:
    """The first value of a header (lower-case ``name``), or ""."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), "")


async def _body(receive: Callable) -> bytes:
    """The whole request body (the guard's ``receive`` has bounded its size)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _uploads(content_type: str, body: bytes, most: int) -> list[bytes]:
    """The uploaded images' bytes (at most ``most``), from a multipart form, base64 JSON or a raw image body."""
    kind, _, params = content_type.partition(";")
    kind = kind.strip().lower()
    if kind == "multipart/form-data":
        blobs = multipart_files(body, params, most)
    elif kind == "application/json":
        blobs = _base64_images(body, most)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        blobs = [body]
    else:
        raise HTTPException(
            415,
            f"unsupported content type {kind[:60]!r}: send multipart/form-data, JSON with base64 images, or the "
            "image bytes with an image/* content type",
        )
    if len(blobs) > most:
        raise HTTPException(400, f"at most {most} image{'s' if most > 1 else ''} per request, not {len(blobs)}")
    return blobs


def multipart_files(body: bytes, params: str, most: int) -> list[bytes]:
    """The contents of the file parts (those whose Content-Disposition names a filename) of a multipart/form-data
    body (RFC 7578, RFC 2046 section 5.1.1); other fields are ignored. ``params``: the content type's parameters.

    Written here rather than through python-multipart, whose byte-by-byte streaming parser was the largest single
    cost of the event loop in a profile of the predict path (the body is bounded and already read whole here); the
    tests compare the two on the bodies clients send."""
    boundary = next(
        (v for k, _, v in (p.strip().partition("=") for p in params.split(";")) if k.lower() == "boundary"), ""
    )
    boundary = boundary.strip().strip('"')
    if not 0 < len(boundary) <= 200 or not boundary.isascii():  # RFC 2046: 1 to 70 ASCII characters
        raise HTTPException(400, "multipart/form-data without a valid boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    pos = body.find(delimiter)
    if pos < 0:
        raise HTTPException(400, "malformed multipart body: no boundary line")
    pos += len(delimiter)
    files: list[bytes] = []
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body
        line_end = body.find(b"\r\n", pos)  # the rest of the delimiter line (transport padding)
        head_end = body.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            raise HTTPException(400, "malformed or truncated multipart body")
        for line in body[line_end + 2 : head_end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-disposition" and FILENAME.search(value):
                files.append(body[head_end + 4 : end])
                break
        if len(files) > most:
            raise HTTPException(400, f"at most {most} image{'s' if most > 1 else ''} per request")
        pos = end + 2 + len(delimiter)
    if not files:
        raise HTTPException(400, "the form holds no image file (send one as a file part: -F image=@photo.png)")
    return files


def _base64_images(body: bytes, most: int) -> list[bytes]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise HTTPException(400, "the body is not valid JSON") from None
    if isinstance(doc, dict) and isinstance(doc.get("image"), str):
        items = [doc["image"]]
    elif isinstance(doc, dict) and isinstance(doc.get("images"), list):
        items = doc["images"]
    else:
        raise HTTPException(400, 'send {"images": [base64, ...]} or {"image": base64}')
    if not items or len(items) > most:
        raise HTTPException(400, f"send 1 to {most} images per request, not {len(items)}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise HTTPException(400, f"image {i + 1} is not a base64 string")
        text = item.split(",", 1)[1] if item.startswith("data:") else item
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"image {i + 1} is not valid base64") from None
    return out


async def _open(state: State, served: Served, data: bytes, i: int, n: int, large_only: bool) -> Any:
    """One upload, its header checked (an image, within the pixel limit): decoded to (C, H, W) uint8 in a decode
    thread when it is large, else (``large_only``) left opened for the inference thread or decoded here."""
    try:
        im = open_upload(data, state.settings.max_pixels)
        if im.width * im.height <= INLINE_PIXELS:
            return im if large_only else served.decode(im)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(state.decode_pool, served.decode, im)
    except BadUpload as e:
        raise HTTPException(e.status, f"image {i + 1}: {e}" if n > 1 else str(e)) from None
