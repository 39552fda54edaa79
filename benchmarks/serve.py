"""Requests/s, latency, errors and memory of ``pupil serve`` under load, against the plain FastAPI endpoint everyone
writes first, measured the same way in the same invocation.

1. Runs: the audited vgg_small run ``runs/fmnist_fast`` (``--vgg``) and a lenet5 run: by default trained here for
   one epoch into a temporary folder (``pupil train recipes/fmnist_fast.yaml --model lenet5 --epochs 1``) and
   audited with the checks the service reads (accuracy, calibration, ood, uncertainty, conformal); ``--lenet RUN``
   reuses one instead.
2. Three servers per run, one after the other, each a subprocess on 127.0.0.1 at a free port:
   - plain: this file's ``plain_app`` (``--plain``): FastAPI + uvicorn, the upload decoded with PIL, the same model
     (``pupil.load_run``) run one request at a time under ``torch.inference_mode`` on the event loop, top-1 label
     and softmax returned;
   - pupil unbatched: ``pupil serve RUN --max-batch 1``;
   - pupil batched: ``pupil serve RUN --max-batch 32 --max-wait-ms 5`` (the defaults).
   Every side runs torch on THREADS thread(s) (pupil's own default on 2 cores: cores - 1).
3. The load: ``--clients`` processes (fewer when the concurrency is lower), each an asyncio loop holding its share
   of the connections open (HTTP/1.1 keep-alive over raw sockets), each connection sending one request after
   another. The requests are multipart PNG uploads of the first IMAGES Fashion-MNIST test images, built once.
   Every connection first sends WARMUP untimed requests; then all processes start together and send ``--requests``
   requests in all or stop at ``--limit-s`` seconds. req/s is 200 responses / wall time; latency is per request,
   send to the whole response read; an error is a non-200 answer or a broken connection. The load generator's CPU
   share is its processes' CPU time over the wall time (1.0 = one core), reported beside the server's.
4. Soak: the batched pupil server under concurrency 8 for ``--soak-s`` seconds; RSS summed over its process tree
   before (after the measured loads, so warm) and after, sampled every SOAK_SAMPLE_S seconds between.

``--extra RUN ...`` measures more audited runs the same way, each under its model name and, for a run that
``pupil compress`` wrote, its artefact's format: vgg_small deployed for ONNX Runtime, for example, where the
plain endpoint (which opens the run with ``pupil.load_run`` too) runs the same ONNX Runtime session.

For a quicker look (an A/B of a setting, say): ``--no-lenet``, ``--sides``, ``--concurrency``, ``--soak-s 0`` and
``--serve-args`` (flags added to every ``pupil serve`` side, such as ``--in-flight 1``); the goals are judged only
when every side ran at concurrency 1 and 32.

Writes benchmarks/results/serve.json; ``readme_table`` renders it. A hard cap (``--max-minutes``) stops the whole
script; the servers it started are always stopped. The work folder (servers' logs, the lenet5 run) is deleted
after a successful run unless ``--keep``. About 15 minutes on 2 cores at the defaults (lenet5 and vgg_small), about
7 more per extra run.

    python benchmarks/serve.py [--lenet RUN | --no-lenet] [--vgg runs/fmnist_fast] [--extra RUN ...] [--soak-s 300]
        [--sides SIDE ...] [--concurrency N ...] [--serve-args "FLAGS"]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from fastapi import FastAPI, UploadFile  # at the top: FastAPI resolves the endpoint's annotations in these globals

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1  # torch threads on every side: pupil serve's default on 2 cores (one core stays with the event loop)
CONCURRENCY = (1, 8, 32)
SOAK_CONCURRENCY = 8
IMAGES = 256  # distinct uploads, cycled
WARMUP = 5  # untimed requests per connection before each measurement
SOAK_SAMPLE_S = 10.0
CHECKS = "accuracy,calibration,ood,uncertainty,conformal"  # what the service reads from the audit
SIDES = {  # label -> pupil serve flags (None: the plain endpoint)
    "plain": None,
    "pupil unbatched": ["--max-batch", "1"],
    "pupil batched": ["--max-batch", "32", "--max-wait-ms", "5"],
}
GOALS = {"speedup_c32": 2.0, "p99_c32_ms": 25.0, "p99_c1_ms": 5.0, "batching_c32": 2.0, "rss_growth": 0.05}


# --- the reference: the plain endpoint ----------------------------------------------------------------------


def plain_app(run_dir: str, port: int) -> None:
    """The endpoint everyone writes first (``--plain``): decode, forward one request at a time, top-1 + softmax."""
    import torch
    import uvicorn
    from PIL import Image

    from pupil import load_run

    torch.set_num_threads(THREADS)
    run = load_run(run_dir)
    model, classes, (c, side, _) = run.model.eval(), run.classes, run.info["data"]["input_shape"]
    app = FastAPI()

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, image: UploadFile) -> dict:
        im = Image.open(io.BytesIO(await image.read())).convert("L" if c == 1 else "RGB").resize((side, side))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).reshape(1, c, side, side)  # (1, C, H, W)
        with torch.inference_mode():
            p = model(x).softmax(1)[0]
        return {"label": classes[int(p.argmax())], "probabilities": p.tolist()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the requests -------------------------------------------------------------------------------------------


def uploads(n: int) -> list[bytes]:
    """The first ``n`` Fashion-MNIST test images as PNG files."""
    from PIL import Image

    from pupil.data import load

    images = load("fashion-mnist", split="test").images[:n].numpy()  # (n, 1, 28, 28) uint8
    out = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a[0]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def http_requests(pngs: list[bytes], port: int, name: str) -> list[bytes]:
    """Whole HTTP/1.1 requests, one per PNG: a multipart upload with one file part named ``image``."""
    b = "pupilbenchboundary"
    out = []
    for i, png in enumerate(pngs):
        part = f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{i}.png"\r\nContent-Type: image/png'
        body = f"{part}\r\n\r\n".encode() + png + f"\r\n--{b}--\r\n".encode()
        head = (
            f"POST /v1/models/{name}/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={b}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> tuple[int, bool]:
    """Send one request and read its whole response: (status, whether the connection stays open)."""
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status, length, keep = int(lines[0].split()[1]), None, True
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.lower() == "content-length":
            length = int(v)
        elif k.lower() == "connection" and v.strip().lower() == "close":
            keep = False
    if length is None:
        raise ConnectionError("response without Content-Length")
    await reader.readexactly(length)
    return status, keep


async def connection(port: int, reqs: list[bytes], offset: int, warmup: int, state: dict) -> None:
    """One client connection: ``warmup`` untimed requests, then (once ``state['go']`` is set) requests until the
    process's share is sent or the deadline passes. A broken connection counts one error and is reopened."""
    reader = writer = None
    i, timed = offset, False
    while True:
        if not timed and warmup <= 0:
            state["ready"] += 1
            await state["go"].wait()
            timed = True
        if timed and (state["left"] <= 0 or time.perf_counter() > state["deadline"]):
            break
        if timed:
            state["left"] -= 1
        req, i = reqs[i % len(reqs)], i + 1
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status, keep = await exchange(reader, writer, req)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            status, keep = 0, False
        if timed:
            (state["lat"] if status == 200 else state["err"]).append(time.perf_counter() - t0)
        else:
            warmup -= 1
        if not keep and writer is not None:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def client(port: int, reqs: list[bytes], conns: int, n: int, limit_s: float, warmup: int, barrier, out) -> None:
    """One load-generator process: ``conns`` connections sending ``n`` timed requests in all (or until ``limit_s``)."""

    async def main() -> dict:
        state = {"left": n, "lat": [], "err": [], "ready": 0, "go": asyncio.Event(), "deadline": 0.0}
        tasks = [asyncio.create_task(connection(port, reqs, k * 997, warmup, state)) for k in range(conns)]
        while state["ready"] < conns:
            await asyncio.sleep(0.005)
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)  # all processes start together
        cpu0, t0 = sum(os.times()[:2]), time.perf_counter()
        state["deadline"] = t0 + limit_s
        state["go"].set()
        await asyncio.gather(*tasks)
        t1 = time.perf_counter()
        cpu = sum(os.times()[:2]) - cpu0
        return {"lat": state["lat"], "errors": len(state["err"]), "t0": t0, "t1": t1, "cpu_s": cpu}

    out.put(asyncio.run(main()))


def drive(server: psutil.Process, reqs: list[bytes], conc: int, n: int, limit_s: float, clients: int) -> dict:
    """Run one measurement at concurrency ``conc``; the figures and the CPU shares of the clients and the server."""
    procs = min(clients, conc)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [
        (conc * (k + 1) // procs - conc * k // procs, n * (k + 1) // procs - n * k // procs) for k in range(procs)
    ]
    workers = [
        ctx.Process(target=client, args=(server_port(reqs), reqs, c, m, limit_s, WARMUP, barrier, out), daemon=True)
        for c, m in shares
    ]
    for w in workers:
        w.start()
    try:
        barrier.wait(timeout=120)
        server_cpu0, load0 = tree_cpu(server), os.getloadavg()[0]
        parts = [out.get(timeout=limit_s + 60) for _ in workers]
        server_cpu = tree_cpu(server) - server_cpu0
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
    wall = max(p["t1"] for p in parts) - min(p["t0"] for p in parts)
    lat = np.array([x for p in parts for x in p["lat"]]) * 1e3
    errors = sum(p["errors"] for p in parts)
    ok = len(lat)
    return {
        "concurrency": conc,
        "requests": ok + errors,
        "ok": ok,
        "errors": errors,
        "error_rate": errors / max(1, ok + errors),
        "wall_s": wall,
        "req_s": ok / wall,
        "p50_ms": float(np.percentile(lat, 50)) if ok else None,
        "p99_ms": float(np.percentile(lat, 99)) if ok else None,
        "mean_ms": float(lat.mean()) if ok else None,
        "client_processes": procs,
        "client_cpu_share": sum(p["cpu_s"] for p in parts) / wall,  # 1.0 = one core busy
        "server_cpu_share": server_cpu / wall,
        "server_cpu_us_per_request": server_cpu / ok * 1e6 if ok else None,  # steadier than req/s on a shared machine
        "load_avg_1min_at_start": load0,
    }


def server_port(reqs: list[bytes]) -> int:
    host = reqs[0].split(b"\r\n", 2)[1]  # b"Host: 127.0.0.1:PORT"
    return int(host.rsplit(b":", 1)[1])


# --- the servers --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for p in tree(root):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def tree_cpu(root: psutil.Process) -> float:
    total = 0.0
    for p in tree(root):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


STARTED: list[subprocess.Popen] = []  # every server this script started; stopped in main's finally


def start(cmd: list[str], log: Path, req: bytes, timeout_s: float = 180.0) -> subprocess.Popen:
    """Start a server in its own process group and wait until it answers ``req`` with 200."""
    print("    " + " ".join(cmd[1:]), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    STARTED.append(proc)
    port, t0 = server_port([req]), time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(req)
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return proc
                sys.exit(f"the server answered a test request with an error; see {log}")
        except OSError:
            time.sleep(0.3)
    sys.exit(f"the server did not answer within {timeout_s:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (graceful), SIGKILL after 15 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


# --- the run ------------------------------------------------------------------------------------------------


def train_lenet(work: Path) -> Path:
    run = work / "lenet5"
    steps = [
        ["train", "recipes/fmnist_fast.yaml", "--model", "lenet5", "--epochs", "1", "--out", str(work)],
        ["audit", str(run), "--checks", CHECKS, "--device", "cpu"],
    ]
    steps[0] += ["--name", "lenet5", "--no-progress", "--device", "cpu"]
    for step in steps:
        print("    pupil " + " ".join(step), flush=True)
        subprocess.run([sys.executable, "-m", "pupil", *step], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run


def measure_run(run: Path, pngs: list[bytes], args, work: Path) -> dict:
    """The sides (all three by default) on one run, then the soak on the batched one."""
    name, out = run.name, {"run": str(run), "model": json.loads((run / "run.json").read_text())["model"]["name"]}
    out["sides"], out["soak"] = {}, None
    for side, flags in SIDES.items():
        if side not in args.sides:
            continue
        port = free_port()
        reqs = http_requests(pngs, port, name)
        if flags is None:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(run), "--port", str(port)]
        else:
            cmd = [sys.executable, "-m", "pupil", "serve", str(run), "--port", str(port), "--device", "cpu"]
            cmd += ["--threads", str(THREADS), *flags, *shlex.split(args.serve_args)]
        print(f"  [{out['model']}] {side}", flush=True)
        proc = start(cmd, work / f"{name}_{side.replace(' ', '_')}.log", reqs[0])
        server = psutil.Process(proc.pid)
        try:
            rows = []
            for conc in args.concurrency:
                r = drive(server, reqs, conc, args.requests, args.limit_s, args.clients)
                print(
                    f"    c={conc:>2}: {r['req_s']:7.1f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                    f"errors {r['errors']}  clients {r['client_cpu_share']:.2f} cores, server "
                    f"{r['server_cpu_share']:.2f} ({r['server_cpu_us_per_request'] or 0:.0f} us/request)",
                    flush=True,
                )
                rows.append(r)
            command = " ".join(["python", *cmd[1:]]).replace(str(ROOT) + "/", "")
            out["sides"][side] = {"command": command, "rows": rows}
            if side == "pupil batched" and args.soak_s > 0:
                out["soak"] = soak(server, reqs, args)
        finally:
            stop(proc)
    out["torch_threads"] = THREADS
    return out


def soak(server: psutil.Process, reqs: list[bytes], args) -> dict:
    """Concurrency 8 for ``--soak-s`` seconds; the server tree's RSS before, during (every SOAK_SAMPLE_S) and after."""
    print(f"    soak: concurrency {SOAK_CONCURRENCY} for {args.soak_s:.0f} s", flush=True)
    before, t0, trace = tree_rss(server), time.perf_counter(), []
    result = {}
    job = threading.Thread(  # drive() in a thread (its clients are processes) so this one samples the RSS meanwhile
        target=lambda: result.update(drive(server, reqs, SOAK_CONCURRENCY, 10**9, args.soak_s, args.clients)),
        daemon=True,
    )
    job.start()
    while job.is_alive():
        job.join(SOAK_SAMPLE_S)
        trace.append((round(time.perf_counter() - t0, 1), tree_rss(server)))
    if not result:
        sys.exit("the soak's load generator failed")
    r = result
    time.sleep(1.0)
    after = tree_rss(server)
    print(
        f"    soak: {r['req_s']:.1f} req/s, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}; "
        f"RSS {before / 1e6:.1f} -> {after / 1e6:.1f} MB",
        flush=True,
    )
    return {
        **r,
        "duration_s": args.soak_s,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_growth": after / before - 1,
        "rss_trace": {"t_s": [t for t, _ in trace], "rss_mb": [round(b / 1e6, 2) for _, b in trace]},
    }


def label(run: Path, model: str, taken: dict) -> str:
    """The model's name, with a compressed run's artefact format (``vgg_small (onnx)``); the run's folder name
    where that is taken already."""
    compressed = json.loads((run / "run.json").read_text()).get("compressed") or {}
    name = f"{model} ({compressed['format']})" if compressed.get("format") else model
    return name if name not in taken else f"{name} ({run.name})"


def goals(m: dict) -> dict:
    """The issue's goals for one run, each a measured figure and whether it is met; none when a side or a
    concurrency they need was left out (``--sides``, ``--concurrency``)."""
    rows = {side: {r["concurrency"]: r for r in s["rows"]} for side, s in m["sides"].items()}
    if set(rows) != set(SIDES) or any({1, 32} - set(r) for r in rows.values()):
        return {}
    plain, unb, bat = rows["plain"], rows["pupil unbatched"], rows["pupil batched"]
    pupil_errors = sum(r["errors"] for side in ("pupil unbatched", "pupil batched") for r in rows[side].values())
    pupil_errors += m["soak"]["errors"] if m["soak"] else 0
    figures = {
        "c32 req/s, batched / plain": (bat[32]["req_s"] / plain[32]["req_s"], f"≥ {GOALS['speedup_c32']:g}×"),
        "c32 p99, batched (ms)": (bat[32]["p99_ms"], f"≤ {GOALS['p99_c32_ms']:g} ms"),
        "c1 p99, batched (ms)": (bat[1]["p99_ms"], f"≤ {GOALS['p99_c1_ms']:g} ms"),
        "c32 req/s, batched / unbatched": (bat[32]["req_s"] / unb[32]["req_s"], f"≥ {GOALS['batching_c32']:g}×"),
        "RSS growth over the soak": (m["soak"]["rss_growth"] if m["soak"] else None, f"≤ {GOALS['rss_growth']:.0%}"),
        "pupil errors (all loads and the soak)": (pupil_errors, "0"),
    }
    met = [
        figures["c32 req/s, batched / plain"][0] >= GOALS["speedup_c32"],
        figures["c32 p99, batched (ms)"][0] <= GOALS["p99_c32_ms"],
        figures["c1 p99, batched (ms)"][0] <= GOALS["p99_c1_ms"],
        figures["c32 req/s, batched / unbatched"][0] >= GOALS["batching_c32"],
        m["soak"] is not None and m["soak"]["rss_growth"] <= GOALS["rss_growth"],
        pupil_errors == 0,
    ]
    return {k: {"value": v, "goal": g, "met": ok} for (k, (v, g)), ok in zip(figures.items(), met)}


def machine() -> dict:
    import fastapi
    import torch
    import uvicorn

    import pupil

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "pupil": pupil.__version__,
    }


# --- the README ---------------------------------------------------------------------------------------------


def readme_table(data: dict) -> str:
    """A paragraph, a table per model (concurrency x side) and the goals, met or missed, from serve.json."""
    m, s = data["machine"], data["settings"]
    soak_note = f" {data['soak_note']}" if data.get("soak_note") else ""
    lines = [
        f"`pupil serve` under load on {m['cores']} cores ({m['cpu']}; 1-minute load average "
        f"{data['load_avg_1min']['start']:.2f} before, {data['load_avg_1min']['end']:.2f} after: the machine was "
        f"shared), torch {m['torch']} on {s['torch_threads']} thread(s) on every side, fp32. Each request uploads "
        f"one Fashion-MNIST test image as a multipart PNG to 127.0.0.1. Plain: a ~20-line FastAPI + uvicorn endpoint "
        f"(PIL decode, the same model, one request at a time, top-1 and softmax). pupil answers with "
        f"temperature-scaled top-k, OOD flag, deferral and conformal set, with `--max-batch 1` (unbatched) or "
        f"`--max-batch 32 --max-wait-ms 5` (batched). Load: up to {s['clients']} client processes of asyncio "
        f"keep-alive connections, {s['warmup']} untimed requests per connection, then {s['requests']:,} requests "
        f"(or {s['limit_s']:g} s) per cell; the clients used {data['client_cpu_share']['max']:.2f} core(s) at most "
        f"(median {data['client_cpu_share']['median']:.2f}). Soak: the batched server at concurrency "
        f"{s['soak_concurrency']} for {s['soak_s']:g} s, RSS of its process tree before and after.{soak_note}",
    ]
    for model, r in data["models"].items():
        lines += ["", f"**{model}** (`{r['run']}`)", ""]
        lines += ["| concurrency | side | req/s | p50 | p99 | errors |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
        for conc in s["concurrency"]:
            for side, sd in r["sides"].items():
                row = next(x for x in sd["rows"] if x["concurrency"] == conc)
                lines.append(
                    f"| {conc} | {side} | {row['req_s']:.0f} | {row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms "
                    f"| {row['errors']} |"
                )
    lines += [
        "",
        "| goal | " + " | ".join(data["models"]) + " | target |",
        "| --- |" + " ---: |" * len(data["models"]) + " --- |",
    ]
    first = next(iter(data["models"].values()))
    if not first["goals"]:
        lines.append("| (goals need every side at concurrency 1 and 32) |" + " — |" * len(data["models"]) + " |")
    for k, g in first["goals"].items():
        cells = []
        for r in data["models"].values():
            v = r["goals"][k]
            val = "—" if v["value"] is None else (f"{v['value']:.2%}" if "RSS" in k else f"{v['value']:.2f}")
            val = str(v["value"]) if isinstance(v["value"], int) else val
            cells.append(f"{val} ({'met' if v['met'] else '**missed**'})")
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {g['goal']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lenet", type=Path, help="an audited lenet5 run to reuse (default: train one here)")
    ap.add_argument("--vgg", type=Path, default=ROOT / "runs" / "fmnist_fast", help="an audited vgg_small run")
    ap.add_argument("--requests", type=int, default=3000, help="timed requests per cell (default 3,000)")
    ap.add_argument("--limit-s", type=float, default=30.0, help="time limit per cell (default 30 s)")
    ap.add_argument("--soak-s", type=float, default=300.0, help="soak duration per model (default 300 s)")
    ap.add_argument("--clients", type=int, default=2, help="load-generator processes (default 2)")
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="more audited runs (e.g. pupil compress output)")
    ap.add_argument("--no-lenet", action="store_true", help="measure --vgg and --extra only")
    ap.add_argument(
        "--sides",
        nargs="+",
        choices=list(SIDES),
        default=list(SIDES),
        metavar="SIDE",
        help="sides to measure (default: all; the goals need all): " + ", ".join(f"'{s}'" for s in SIDES),
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY), help="default 1 8 32")
    ap.add_argument("--serve-args", default="", help="more flags for every pupil serve side, e.g. '--in-flight 1'")
    ap.add_argument("--max-minutes", type=float, default=45.0, help="hard cap on the whole script (default 45)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (servers' logs, the lenet5 run)")
    ap.add_argument("--plain", help=argparse.SUPPRESS)  # the reference server, in a subprocess
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        plain_app(args.plain, args.port)
        return

    def cap(*_) -> None:
        raise TimeoutError(f"stopped at the --max-minutes cap of {args.max_minutes:g} minutes")

    signal.signal(signal.SIGALRM, cap)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    signal.alarm(int(args.max_minutes * 60))
    load_start, t_start = os.getloadavg(), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    print(f"work folder: {work}", flush=True)
    models = {}
    try:
        pngs = uploads(IMAGES)
        lenet = args.lenet
        if lenet is None and not args.no_lenet:
            print("[0] a lenet5 run (1 epoch) and its audit", flush=True)
            lenet = train_lenet(work)
        for i, run in enumerate(([] if args.no_lenet else [lenet]) + [args.vgg, *args.extra], 1):
            print(f"[{i}] {run}", flush=True)
            m = measure_run(run.resolve(), pngs, args, work)
            m["goals"] = goals(m)
            here = i == 1 and args.lenet is None and not args.no_lenet
            m["run"] = "trained here" if here else str(run.resolve()).replace(str(ROOT) + "/", "")
            models[label(run, m["model"], models)] = m
    finally:
        signal.alarm(0)
        for proc in STARTED:
            stop(proc)
    shares = sorted(r["client_cpu_share"] for m in models.values() for s in m["sides"].values() for r in s["rows"])
    report = {
        "benchmark": "serve",
        "speedup_vs_plain_fastapi": {
            model: {
                str(r["concurrency"]): r["req_s"] / p["req_s"]
                for r, p in zip(m["sides"]["pupil batched"]["rows"], m["sides"]["plain"]["rows"])
            }
            for model, m in models.items()
            if {"plain", "pupil batched"} <= set(m["sides"])
        },
        "p99_ms": {
            model: {side: {str(r["concurrency"]): r["p99_ms"] for r in s["rows"]} for side, s in m["sides"].items()}
            for model, m in models.items()
        },
        "goals_met": {
            model: all(g["met"] for g in m["goals"].values()) if m["goals"] else None for model, m in models.items()
        },
        "client_cpu_share": {"median": float(np.median(shares)), "max": shares[-1], "unit": "cores (1.0 = one core)"},
        "machine": machine(),
        "load_avg_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - t_start,
        "settings": {
            "torch_threads": THREADS,
            "concurrency": list(args.concurrency),
            "sides": [side for side in SIDES if side in args.sides],
            "serve_args": args.serve_args,
            "requests": args.requests,
            "limit_s": args.limit_s,
            "clients": args.clients,
            "warmup": WARMUP,
            "images": IMAGES,
            "soak_s": args.soak_s,
            "soak_concurrency": SOAK_CONCURRENCY,
            "lenet": "left out"
            if args.no_lenet
            else "reused: " + str(args.lenet)
            if args.lenet
            else "trained here: 1 epoch of recipes/fmnist_fast.yaml",
            "extra": [str(p) for p in args.extra],
            "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
        },
        "goals": GOALS,
        "models": models,
    }
    if args.soak_s < 300:
        report["soak_note"] = f"The soak ran {args.soak_s:g} s, shorter than the issue's 5 minutes."
    from pupil.io import write_json

    write_json(args.out, report)
    if not args.keep:  # kept when something failed: the servers' logs are there
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")
    print(readme_table(report))


if __name__ == "__main__":
    main()
