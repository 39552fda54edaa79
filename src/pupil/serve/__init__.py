"""``pupil serve``: an HTTP service and a web page over audited runs, built on FastAPI and uvicorn.

Each prediction carries what the audit measured: temperature-scaled probabilities, an OOD score with the flag at
the audit's 95%-TPR threshold, the deferral decision at the uncertainty check's threshold, and a conformal set
(``pupil.serve.models``). Concurrent requests share forward passes (``pupil.serve.batching``); the routes, the
guard in front of them and the metrics are in ``pupil.serve.app``; the page is ``templates/index.html``.

``serve_command_main`` is what the command line calls: it checks every setting, binds the socket and loads and
warms up every model *before* the server accepts a connection, so any problem is one PupilError line and never
a half-ready server. ``prepare`` does all of that and returns the server unstarted (the tests run it in a thread).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pupil.errors import PupilError

if TYPE_CHECKING:
    from pupil.serve.app import Settings

NEEDS = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}
MIN_KEY_CHARS = 16
SWITCH_S = 0.0002  # the interpreter's switch interval while serving (see prepare)
LOOPBACK_NAMES = ("localhost",)


def serve_command_main(runs: list[str], log: Callable[[str], Any] = print, **settings: Any) -> None:
    """Serve ``runs`` (run directories, audit folders or model sources) until Ctrl-C or SIGTERM, then finish the
    requests in flight and return. ``settings`` are ``prepare``'s (host, port, max_batch, ...).

    Raises PupilError (one line) for every problem found before the server listens: a bad setting, a missing
    package, an API key file that is missing, empty or holds a short key, a host that is not an address of this
    machine, a port in use, a run that fails to load or to warm up.
    """
    server, sock, url = prepare(runs, log=log, **settings)
    n = len(settings.get("indexes") or [])
    what = f"{len(runs)} model{'s' if len(runs) > 1 else ''}" + (f" and {n} index{'es' if n > 1 else ''}" if n else "")
    log(f"serving {what} at {url} (Ctrl-C stops after the requests in flight)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise PupilError("the server did not start; see the messages above")


def prepare(
    runs: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_upload_mb: float = 8.0,
    api_key_file: str | Path | None = None,
    device: str = "auto",
    timeout_s: float = 10.0,
    max_images: int = 16,
    threads: int = 0,
    in_flight: int = 0,
    access_log: bool = False,
    log_level: str = "info",
    log: Callable[[str], Any] = print,
    indexes: list[str] | None = None,
    source: dict[str, Any] | None = None,
):
    """Everything ``serve_command_main`` does before serving: returns ``(uvicorn.Server, bound socket, url)``;
    ``server.run(sockets=[sock])`` then serves (``port=0`` binds a free port). ``in_flight`` 0 (automatic): two
    batches of a model at once where there is a second core and every model's forward pass takes the interpreter
    lock back once (``pupil.serve.batching``), else one; ``threads`` 0: the cores but one, shared by those batches.
    ``indexes``: search indexes as PATH or NAME=PATH (``pupil.serve.search``). ``source``: the weights, classes and
    preprocessing of the one model source served (``pupil.serve.models.load_served``)."""
    from pupil.sources import option_flags

    if not runs:
        raise PupilError("give at least one run directory, audit folder or model source to serve")
    if len(runs) != 1 and (flags := option_flags(source or {})):
        raise PupilError(f"{' '.join(flags)} describe one model source: serve it on its own")
    require()
    cores, auto, auto_threads = len(os.sched_getaffinity(0)), not in_flight, not threads
    in_flight = in_flight or (2 if cores > 1 else 1)  # two where there is a second core, unless (below)
    settings = _settings(max_batch, max_wait_ms, max_upload_mb, timeout_s, max_images, host, api_key_file, in_flight)
    if not 0 <= port <= 65535:
        raise PupilError(f"--port must be from 0 to 65535, not {port}")
    if threads < 0:
        raise PupilError(f"--threads must be 0 (automatic) or more, not {threads}")

    import torch
    import uvicorn

    from pupil.runtime import resolve_device
    from pupil.serve.app import create_app
    from pupil.serve.models import load_served
    from pupil.serve.search import load_indexes

    dev = resolve_device(device)
    sock = bind(host, port)
    try:
        # One core stays with the event loop (HTTP parsing, answers); the batches in flight share the rest.
        threads = threads or max(1, (cores - 1) // settings.in_flight)
        torch.set_num_threads(threads)
        models, names = [], {}
        for run in runs:
            served = load_served(run, dev, warm_batch=max_batch, threads=threads, source=source)
            if served.name in names:
                raise PupilError(f"{run} and {names[served.name]} are both named {served.name}: serve distinct names")
            names[served.name] = run
            models.append(served)
        if auto and settings.in_flight > 1 and not all(map(_one_release, models)):
            # An eager forward pass returns to Python between operators: two of them beside the event loop fought
            # over the interpreter lock more than they overlapped (pupil.serve.batching), so one, on every thread.
            settings = dataclasses.replace(settings, in_flight=1)
            if auto_threads:
                torch.set_num_threads(max(1, cores - 1))
        app = create_app(models, settings, load_indexes(list(indexes or []), dev))
    except BaseException:
        sock.close()
        raise
    # Everything loaded so far (torch, the models: some 400,000 objects) lives as long as the server: frozen out of
    # the cyclic garbage collector, whose full passes over it took about 180 ms, stalling every request in flight.
    gc.collect()
    gc.freeze()
    if settings.in_flight > 1:
        # A thread that gave the interpreter lock up (a forward pass, a decode) waits this long before it may take
        # it back from one running Python (the event loop): at CPython's default of 5 ms, a batch handed to a free
        # thread waited for the loop to finish answering the last one. (With eager forward passes, which take the
        # lock back after every operator, the shorter interval cost more in switching than it saved.)
        sys.setswitchinterval(SWITCH_S)
    if not settings.api_keys and not _loopback(host):
        log(f"warning: listening on {host} without --api-key-file: anyone who can reach this machine can use it")
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=int(timeout_s) + 5,  # in-flight requests end by their own timeout first
        server_header=False,
        proxy_headers=False,  # nothing proxies for it by default; a local client could spoof X-Forwarded-For
        http=http_protocol(),
    )
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return uvicorn.Server(config), sock, f"http://{shown}:{bound_port}/"


HELD_BYTES = 8192  # a response head up to this size waits for its body


def http_protocol() -> Any:
    """uvicorn's httptools protocol with each response's head and body sent in one write (``OneWrite``), or
    "auto" where httptools is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class Protocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(OneWrite(transport))

    return Protocol


class OneWrite:
    """A transport that holds a response head back until the body's first write and sends both with one
    ``writelines`` (one system call, one TCP segment for a small answer). uvicorn writes the head on
    ``http.response.start`` and the body on ``http.response.body``: two system calls per answer, about a tenth of
    the event loop's time under load in a profile of the predict path. A head whose body does not follow within
    the same turn of the event loop (a HEAD request, a streamed body) goes out at the end of that turn."""

    def __init__(self, transport):
        import asyncio

        self.transport, self.held = transport, None
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if self.held is not None:
            head, self.held = self.held, None
            self.transport.writelines((head, data))
        elif len(data) <= HELD_BYTES and data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):
            self.held = data
            self.loop.call_soon(self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        if self.held is not None:
            head, self.held = self.held, None
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's
        return getattr(self.transport, name)


def _one_release(served: Any) -> bool:
    """Whether a forward pass of ``served`` takes the interpreter lock back once only: a frozen TorchScript graph
    (``Served.frozen``) or an ONNX Runtime session (a model without gradients)."""
    return getattr(served, "frozen", None) is not None or not served.gradients


def require() -> None:
    """One line naming the missing packages and the pip command, when the serve extra is not installed."""
    import importlib.util

    if gone := [pkg for mod, pkg in NEEDS.items() if importlib.util.find_spec(mod) is None]:
        raise PupilError(f"pupil serve needs {', '.join(gone)}: pip install 'pupil[serve]'")


def _settings(
    max_batch: int,
    max_wait_ms: float,
    max_upload_mb: float,
    timeout_s: float,
    max_images: int,
    host: str,
    api_key_file: str | Path | None,
    in_flight: int = 1,
) -> Settings:
    from pupil.serve.app import Settings

    checks = [
        (max_batch >= 1, f"--max-batch must be at least 1, not {max_batch}"),
        (max_wait_ms >= 0, f"--max-wait-ms must be 0 or more, not {max_wait_ms:g}"),
        (max_upload_mb > 0, f"--max-upload-mb must be positive, not {max_upload_mb:g}"),
        (timeout_s > 0, f"--timeout-s must be positive, not {timeout_s:g}"),
        (max_images >= 1, f"--max-images must be at least 1, not {max_images}"),
        (in_flight >= 0, f"--in-flight must be 0 (automatic) or more, not {in_flight}"),
    ]
    for ok, message in checks:
        if not ok:
            raise PupilError(message)
    keys = read_api_keys(api_key_file) if api_key_file is not None else ()
    # Bound to loopback, the server answers only for loopback host names, so a web page elsewhere cannot reach
    # it through DNS rebinding; bound wider, any Host (the API key is the guard there).
    hosts = ("127.0.0.1", "localhost", "[::1]", host) if _loopback(host) else None
    return Settings(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_images=max_images,
        timeout_s=timeout_s,
        api_keys=keys,
        allowed_hosts=hosts,
        in_flight=in_flight,
    )


def read_api_keys(path: str | Path) -> tuple[str, ...]:
    """The keys in ``path``: one per line; blank lines and lines starting with # are skipped. Each must be at
    least 16 printable ASCII characters without spaces (it travels in an HTTP header)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PupilError(f"--api-key-file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PupilError(f"--api-key-file {path} cannot be read: {e}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise PupilError(f"--api-key-file {path} holds no key (one per line)")
    for n, key in enumerate(keys, 1):
        if not (key.isascii() and key.isprintable()) or " " in key or "\t" in key:
            raise PupilError(f"--api-key-file {path}: key {n} must be printable ASCII without spaces")
        if len(key) < MIN_KEY_CHARS:
            raise PupilError(f"--api-key-file {path}: key {n} has {len(key)} characters; use at least {MIN_KEY_CHARS}")
    return tuple(keys)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; one line for a bad host or a port in use."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise PupilError(f"--host {host!r} is not a valid host name or address ({e})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free; one in use is not
        sock.bind(address)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PupilError(f"port {port} on {host} is in use: stop what uses it or give another --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise PupilError(f"--host {host} is not an address of this machine") from None
        if e.errno == errno.EACCES:
            raise PupilError(f"no permission to listen on port {port} (ports below 1024 need privileges)") from None
        raise PupilError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
