"""Headless Chromium for the report tests: a screenshot and the DOM after load, with console messages."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]  # fmt: skip


def _run(args: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120
        )


def render(page: Path, screenshot: Path, width: int = 1280, height: int = 2400) -> dict:
    """Returns the ``data-rendered`` summary the page records on load and any console errors."""
    url = page.resolve().as_uri()
    shot = _run([f"--screenshot={screenshot}", f"--window-size={width},{height}", url])
    dom = _run(["--dump-dom", url])
    logs = shot.stderr + dom.stderr
    console = [line for line in logs.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    m = re.search(r'data-rendered="([^"]*)"', dom.stdout)
    return {"rendered": m.group(1) if m else None, "console": console, "dom": dom.stdout}
