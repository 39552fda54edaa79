"""The page of `pupil serve` in a real browser: headless Chromium opens it on a server the test starts on 127.0.0.1,
uploads an image through the file input, waits for the answer, and checks that the top-1 label, the probability bars
and the explanation overlay rendered, and that the console stayed clean; it takes a screenshot.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ended by a NUL
byte, written to its file descriptor 3 and read from its 4), so neither a websocket client nor a driver binary is
needed. Every wait is bounded.

``python -m tests.test_serve_browser RUN IMAGE OUT.png`` takes the same screenshot of any run: docs/serve.png was taken
so, of runs/fmnist_fast (``make run``'s model, audited) and a Fashion-MNIST test image it defers. The test writes its
own screenshot to a temporary folder, so that running the tests never changes the repository.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-pipe"]  # fmt: skip
WIDTH, HEIGHT = 1280, 720
LAUNCH = """import os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
tmp_r, tmp_w = os.dup(r), os.dup(w)  # r or w may be 3 or 4 already
os.dup2(tmp_r, 3)
os.dup2(tmp_w, 4)
for fd in {r, w, tmp_r, tmp_w} - {3, 4}:
    os.close(fd)
os.set_inheritable(3, True)  # dup2 onto itself (a dup that landed on 3 or 4) keeps close-on-exec
os.set_inheritable(4, True)
os.execv(sys.argv[3], sys.argv[3:])
"""


class DevTools:
    """A headless Chromium and its DevTools protocol over a pipe; ``send`` waits (bounded) for the answer, events
    are kept in ``events``."""

    def __init__(self, chromium: str, profile: str):
        to_chrome_r, self._out = os.pipe()
        self._in, from_chrome_w = os.pipe()
        # A small Python launcher puts the browser's pipe ends on fds 3 and 4 (subprocess cannot choose fd numbers).
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCH,
                str(to_chrome_r),
                str(from_chrome_w),
                chromium,
                *FLAGS,
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next, self._answers, self.events = 0, queue.Queue(), []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._in, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                (self._answers.put if "id" in msg else self.events.append)(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                answer = self._answers.get(timeout=left)
            except queue.Empty:
                break
            if answer["id"] == self._next:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
        raise TimeoutError(f"no answer to {method} within {timeout} s")

    def wait_event(self, method: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := [e for e in self.events if e.get("method") == method]:
                return found[0]
            time.sleep(0.05)
        raise TimeoutError(f"no {method} within {timeout} s")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._out)
        self._reader.join(5)
        os.close(self._in)


def console_problems(events: list[dict]) -> list[str]:
    """Console errors and warnings, uncaught exceptions and the browser's own error log entries (failed loads)."""
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            out.append(p["exceptionDetails"].get("exception", {}).get("description", str(p["exceptionDetails"])))
        elif method == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
            out.append(f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return out


SUMMARY = """JSON.stringify({
  state: document.body.dataset.state,
  status: document.getElementById("status").textContent,
  top1: (document.querySelector("#bars .bar.first .name") || {}).textContent,
  bars: [...document.querySelectorAll("#bars .bar")].map((b) => ({
    label: b.querySelector(".name").textContent,
    width: parseFloat(b.querySelector(".fill").style.width),
    pixels: b.querySelector(".fill").getBoundingClientRect().width,
    track: b.querySelector(".track").getBoundingClientRect().width,
  })),
  overlay: { hidden: document.getElementById("overlay").hidden, width: document.getElementById("overlay").naturalWidth,
             shown: document.getElementById("overlay").getBoundingClientRect().width },
  preview: document.getElementById("preview").naturalWidth,
  verdict: document.getElementById("verdict").textContent,
  ood: !document.getElementById("ood").hidden,
  chips: [...document.querySelectorAll("#conformal .chip")].map((c) => c.textContent),
  report: document.getElementById("report").hidden ? null : document.getElementById("report").getAttribute("href"),
  search: document.getElementById("search").hidden,
  neighbours: [...document.querySelectorAll("#neighbours figure.hit")].map((f) => ({
    id: Number(f.dataset.id),
    label: f.querySelector(".label").textContent,
    distance: f.querySelector(".distance").textContent,
    width: (f.querySelector("img") || { naturalWidth: 0 }).naturalWidth,
    shown: (f.querySelector("img") || { getBoundingClientRect: () => ({ width: 0 }) }).getBoundingClientRect().width,
  })),
  searchNote: document.getElementById("search-note").textContent,
})"""


def drive(url: str, images: list[Path], screenshot: Path, timeout: float = 30) -> tuple[list[dict], list[str]]:
    """Open the page, upload each image in turn through the file input, wait for the answer and the overlay;
    returns the page's state (``SUMMARY``) after each, and its console problems, and writes a screenshot of the
    last."""
    with tempfile.TemporaryDirectory() as profile:
        tools = DevTools(CHROMIUM, profile)
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "DOM"):
                tools.send(f"{domain}.enable", session=session)
            metrics = {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}
            tools.send("Emulation.setDeviceMetricsOverride", metrics, session=session)
            tools.send("Page.navigate", {"url": url}, session=session)
            tools.wait_event("Page.loadEventFired", timeout)

            def evaluate(expression: str):
                result = tools.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
                return result["result"].get("value")

            def wait_state(states: tuple[str, ...]) -> str:
                deadline = time.monotonic() + timeout
                while (state := evaluate("document.body.dataset.state")) not in states:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the page stayed {state!r}: {evaluate('document.body.innerText')[:500]}")
                    time.sleep(0.05)
                return state

            wait_state(("ready", "error"))
            root = tools.send("DOM.getDocument", session=session)["root"]["nodeId"]
            node = tools.send("DOM.querySelector", {"nodeId": root, "selector": "#file"}, session)["nodeId"]
            summaries = []
            for image in images:
                evaluate("document.body.dataset.state = 'uploading'")
                tools.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(image.resolve())]}, session)
                wait_state(("done", "error"))
                summaries.append(json.loads(evaluate(SUMMARY)))
            shot = tools.send("Page.captureScreenshot", {"format": "png"}, session)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return summaries, console_problems(tools.events)
        finally:
            tools.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_page_predicts_explains_defers_and_links_the_report_card(tmp_path_factory, tmp_path):
    import io

    import httpx
    import numpy as np
    from PIL import Image

    from pupil.data import load
    from tests.test_serve import audited_run, running

    run = audited_run(tmp_path_factory)
    grating = tmp_path / "grating.png"
    Image.fromarray(load("synthetic", "test").images[2, 0].numpy()).save(grating)
    rng = np.random.default_rng(0)
    noise = []
    for i in range(5):
        noise.append(tmp_path / f"noise{i}.png")
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(noise[-1])
    with running([str(run)]) as (_, port):
        url = f"http://127.0.0.1:{port}/"

        def ask(path: Path) -> dict:
            r = httpx.post(
                url + "v1/models/smoke/predict", content=path.read_bytes(), headers={"content-type": "image/png"}
            )
            return r.json()["predictions"][0]

        # an image the model decides, then one it must defer (noise: far from the gratings it was trained on)
        unsure = next((p for p in noise if ask(p)["deferral"]["deferred"]), None)
        assert unsure is not None, "the smoke model deferred none of five noise images"
        images = [grating, unsure]
        expected = [ask(p) for p in images]
        summaries, problems = drive(url, images, tmp_path / "serve.png")
    for summary, want in zip(summaries, expected, strict=True):
        assert summary["state"] == "done", summary["status"]
        assert summary["top1"] == want["top"][0]["label"]
        assert [b["label"] for b in summary["bars"]] == [c["label"] for c in want["top"]]  # 4 classes: 4 bars
        for bar, c in zip(summary["bars"], want["top"]):
            assert bar["width"] == pytest.approx(100 * c["probability"], abs=0.01)
            assert bar["pixels"] == pytest.approx(bar["track"] * c["probability"], abs=1.5)  # drawn that wide
        assert not summary["overlay"]["hidden"] and summary["overlay"]["width"] >= 256 and summary["overlay"]["shown"]
        assert summary["preview"] == 16
        assert ("Deferred to a human" in summary["verdict"]) == want["deferral"]["deferred"]
        assert summary["ood"] == bool(want["ood"]["flagged"])
        assert summary["chips"] == want["conformal"]["set"]
        assert summary["report"] == "/v1/models/smoke/report" and summary["search"] is True
    assert "Deferred to a human" in summaries[1]["verdict"]
    assert not problems, problems
    shot = Image.open(io.BytesIO((tmp_path / "serve.png").read_bytes()))
    assert shot.size == (WIDTH, HEIGHT)


@contextlib.contextmanager
def serving(app):
    """``app`` served by uvicorn on 127.0.0.1 and a free port, in a thread: yields the port once it accepts."""
    import uvicorn

    from pupil.serve import bind
    from tests.test_serve import in_thread

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    with in_thread(server, bind("127.0.0.1", 0)) as port:
        yield port


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_page_shows_the_nearest_catalogue_images(tmp_path_factory, tmp_path):
    """With an index of the model's own embedding loaded, an upload shows its nearest catalogue images: the API's
    hits, in order, each thumbnail loaded (fetched with the page's key handling, decoded, drawn)."""
    import httpx
    import torch
    from PIL import Image

    from pupil.data import load
    from pupil.search.index import SearchIndex
    from pupil.serve.app import create_app
    from pupil.serve.models import load_served
    from pupil.serve.search import install_search, load_indexes
    from tests.test_serve import audited_run

    run = audited_run(tmp_path_factory)
    SearchIndex.build(run, "synthetic", tmp_path / "catalogue.idx", kind="flat", device="cpu")
    app = create_app([load_served(run, torch.device("cpu"))])
    install_search(app, load_indexes([str(tmp_path / "catalogue.idx")], torch.device("cpu")))
    grating = tmp_path / "grating.png"
    Image.fromarray(load("synthetic", "test").images[3, 0].numpy()).save(grating)
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}/"
        files = {"image": ("grating.png", grating.read_bytes(), "image/png")}
        want = httpx.post(url + "v1/indexes/catalogue/search?k=8", files=files).json()["queries"][0]["hits"]
        [summary], problems = drive(url, [grating], tmp_path / "search.png")
    assert summary["state"] == "done", summary["status"]
    assert summary["search"] is False and len(summary["neighbours"]) == 8
    assert [n["id"] for n in summary["neighbours"]] == [h["id"] for h in want]
    assert [n["label"] for n in summary["neighbours"]] == [h["label"] for h in want]
    assert [n["distance"] for n in summary["neighbours"]] == [f"{h['distance']:.3f}" for h in want]
    assert all(n["width"] == 16 and n["shown"] > 0 for n in summary["neighbours"])  # loaded, decoded and drawn
    assert "8 nearest of 512 in index catalogue (smoke's embedding, the model chosen" in summary["searchNote"]
    assert not problems, problems


def main(argv: list[str]) -> None:
    """``python -m tests.test_serve_browser RUN IMAGE OUT.png [INDEX]``: a screenshot of the page answering IMAGE
    (with the nearest catalogue images of INDEX)."""
    from tests.test_serve import running

    global HEIGHT
    run, image, out, *index = argv
    HEIGHT = 820 if index else HEIGHT  # room for the catalogue images' labels
    with running([run], indexes=index) as (_, port):
        summaries, problems = drive(f"http://127.0.0.1:{port}/", [Path(image)], Path(out))
    print(json.dumps(summaries[-1], indent=1), problems or "console clean", f"wrote {out}", sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])
