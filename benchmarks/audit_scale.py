"""Peak memory and speed of ``pupil audit`` on an image folder larger than its memory budget, against a plain
torchvision loop measured the same way in the same invocation.

1. Generates ``--images`` 224x224 RGB JPEGs (quality 90) in 10 class folders: smooth random colour gradients, a
   faint class stripe and Gaussian noise, so that they cost a real decode (about 150 KB each decoded: 20,000
   images are about 3 GB). Deterministic from ``--seed``.
2. Saves a timm ``resnet18`` with random weights (``torch.manual_seed(0)``, 10 classes) as W.safetensors: speed
   and memory do not depend on what the weights learned.
3. Ours: ``python -m pupil audit timm:resnet18 --weights W --data DIR --img-size 224 --checks
   accuracy,calibration,efficiency --max-memory 1GB --device cpu`` as a subprocess. Every 0.2 s the unique set
   size (USS: the pages no other process shares) of the process and each of its descendants (DataLoader workers)
   is read and summed; the peak of that sum is the audit's peak memory. Summing RSS instead would count the pages
   that forked workers share with their parent once per process. Its images/s is ``audit.n /
   audit.prediction_s`` from results.json: the one prediction pass over the test split (decode + forward).
4. Reference, run after ours: ``torchvision.datasets.ImageFolder`` (PIL decode, ToTensor, Normalize with timm's
   resnet18 mean and std: the preprocessing pupil applies at ``--img-size 224``, no resize needed) and a
   ``DataLoader(batch_size=64, num_workers=min(4, cpu_count - 1))``, the same model in eval mode, fp32, under
   ``torch.inference_mode``, over the first ``n`` images of the folder (``n`` = pupil's test split; ImageFolder's
   order is class by class, so it covers the first classes: all images cost the same to decode). It runs in a
   subprocess of this script (``--plain-loop``) and is measured exactly like ours; its time is the whole loop.
5. JPEG decode speed in this process on 500 of the files: PIL (open, convert RGB, np.asarray) against
   ``torchvision.io.decode_jpeg(read_file(path))``, alternating, median of 3.

Both sides leave torch's thread count at its default (pupil sets it to the cores it may use). Writes
benchmarks/results/audit_scale.json; ``readme_table`` renders it. The generated folder goes to a new temporary
folder (or ``--work``, new or empty) and is deleted afterwards unless ``--keep``. About 20-30 minutes on 2 cores
at the default 20,000 images.

    python benchmarks/audit_scale.py [--images 20000] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIDE, CLASSES, QUALITY = 224, 10, 90
MAX_MEMORY = "1GB"  # the setting; --max-memory changes it (to debug streaming on a small folder)
CHECKS = ("accuracy", "calibration", "efficiency")  # in the order the audit runs them
BATCH = 64  # pupil's batch_for((3, 224, 224)): PIXELS_PER_BATCH // 224**2 rounded down to a power of two
GOAL_PEAK_BYTES = 2.5e9  # the "peak < 2.5 GB"
GOAL_RATIO = 0.9  # the "at least 0.9x the plain loop's images/s"
INTERVAL_S = 0.2
TRACE_POINTS = 300
DECODE_FILES = 500
STEP_TIMEOUT_S = 3 * 3600


def workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))  # pupil.data.images.LazyImages's default


# --- the data -----------------------------------------------------------------------------------------------


def make_image(job: tuple[int, str, int]) -> int:
    """Write image ``i``: a bilinear blend of 4 random corner colours, a faint stripe whose frequency is the class,
    and Gaussian noise (sigma 6) that keeps JPEG from compressing it to nothing. Returns the file's bytes."""
    i, path, seed = job
    rng = np.random.default_rng([seed, i])
    y = np.linspace(0.0, 1.0, SIDE)[:, None, None]  # (H, 1, 1)
    x = np.linspace(0.0, 1.0, SIDE)[None, :, None]  # (1, W, 1)
    c = rng.uniform(0, 255, (2, 2, 3))
    img = c[0, 0] * (1 - y) * (1 - x) + c[0, 1] * (1 - y) * x + c[1, 0] * y * (1 - x) + c[1, 1] * y * x  # (H, W, 3)
    angle, phase = rng.uniform(0, np.pi, 2)
    img = img + 12 * np.sin(2 * np.pi * (i % CLASSES + 1) * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    img = img + rng.normal(0, 6, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=QUALITY)
    return os.path.getsize(path)


def make_folder(folder: Path, n: int, seed: int) -> int:
    """``n`` JPEGs in ``folder/class_K/``, image ``i`` in class ``i % 10``; returns their total file bytes."""
    for k in range(CLASSES):
        (folder / f"class_{k}").mkdir(parents=True)
    jobs = [(i, str(folder / f"class_{i % CLASSES}" / f"img_{i:06d}.jpg"), seed) for i in range(n)]
    total, t0 = 0, time.perf_counter()
    with multiprocessing.Pool(os.cpu_count()) as pool:
        for done, size in enumerate(pool.imap_unordered(make_image, jobs, chunksize=64), 1):
            total += size
            if done % 2000 == 0 or done == n:
                print(f"    {done:,}/{n:,} images ({time.perf_counter() - t0:.0f} s)", flush=True)
    return total


def save_weights(path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", pretrained=False, num_classes=CLASSES).state_dict(), str(path))


# --- measuring a process tree -------------------------------------------------------------------------------


def tree_memory(root: psutil.Process) -> dict[int, tuple[str, int, int]]:
    """``pid -> (name, uss, rss)`` for ``root`` and its descendants; processes that end while they are read are
    left out."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:  # the root itself ended
        return {}
    out = {}
    for p in procs:
        try:
            m = p.memory_full_info()  # reads /proc/PID/smaps_rollup for the USS
            out[p.pid] = (p.name(), m.uss, m.rss)
        except psutil.Error:
            pass
    return out


def watch(cmd: list[str], log: Path) -> tuple[dict, list[tuple[float, int, int]], float]:
    """Run ``cmd`` from the repo root, sampling its process tree's memory every INTERVAL_S seconds until it ends.
    Returns the summary, the samples ``(seconds since start, tree USS, tree RSS sum)`` and the start's epoch time.
    Exits with the log's tail if the command fails."""
    print("    " + " ".join(cmd), flush=True)
    samples, per_pid, peak, at_peak = [], {}, 0, {}
    t0, started = time.perf_counter(), time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            if time.perf_counter() - t0 > STEP_TIMEOUT_S:
                proc.kill()
                sys.exit(f"{cmd[1:4]} ran past {STEP_TIMEOUT_S} s; stopped")
            snap = tree_memory(root)
            uss, rss = sum(s[1] for s in snap.values()), sum(s[2] for s in snap.values())
            samples.append((time.perf_counter() - t0, uss, rss))
            for pid, (name, u, _) in snap.items():
                label = "main" if pid == root.pid else f"child {name} {pid}"
                per_pid[label] = max(per_pid.get(label, 0), u)
            if uss > peak:
                peak = uss
                at_peak = {
                    "t_s": round(samples[-1][0], 2),
                    "main_uss_bytes": snap.get(root.pid, ("", 0, 0))[1],
                    "children_uss_bytes": sorted((s[1] for p, s in snap.items() if p != root.pid), reverse=True),
                }
            time.sleep(INTERVAL_S)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        sys.exit(f"{' '.join(cmd[1:4])} failed (exit {proc.returncode}):\n{tail}")
    children = sorted((v for k, v in per_pid.items() if k != "main"), reverse=True)
    return (
        {
            "wall_s": round(wall, 2),
            "load_avg_1min_at_end": os.getloadavg()[0],  # above ~2 on 2 cores: something else ran too
            "peak_uss_bytes": peak,
            "peak_rss_sum_bytes": max((s[2] for s in samples), default=0),
            "samples": len(samples),
            "at_peak": at_peak,
            "per_process_peak_uss_bytes": {
                "main": per_pid.get("main", 0),
                "children_seen": len(children),
                "largest_children": children[:8],
            },
            "trace": downsample(samples),
        },
        samples,
        started,
    )


def downsample(samples: list[tuple[float, int, int]]) -> dict:
    """At most TRACE_POINTS points of (seconds, tree USS in MB), each the maximum of its bin so the peak stays."""
    step = max(1, -(-len(samples) // TRACE_POINTS))
    bins = [samples[i : i + step] for i in range(0, len(samples), step)]
    return {
        "t_s": [round(b[0][0], 1) for b in bins],
        "uss_mb": [round(max(s[1] for s in b) / 1e6, 1) for b in bins],
    }


# --- the two sides ------------------------------------------------------------------------------------------


def run_ours(work: Path, data: Path, weights: Path, max_memory: str) -> dict:
    out = work / "audit"
    cmd = [sys.executable, "-m", "pupil", "audit", "timm:resnet18", "--weights", str(weights), "--data", str(data)]
    cmd += ["--img-size", "224", "--checks", ",".join(CHECKS), "--max-memory", max_memory]
    cmd += ["--device", "cpu", "--out", str(out)]
    m, samples, started = watch(cmd, work / "ours.log")
    results = json.loads((out / "results.json").read_text())
    audit, n, secs = results["audit"], results["audit"]["n"], results["audit"]["prediction_s"]
    spans = phase_spans(results, (out / "results.json").stat().st_mtime - started, m["wall_s"])
    phases = {k: max((u for t, u, _ in samples if a <= t < b), default=0) for k, (a, b) in spans.items()}
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "images_per_s": n / secs,
        "n": n,
        "prediction_s": secs,
        "streamed": audit["data"]["streamed"],
        "max_memory_bytes": audit["data"]["max_memory_bytes"],
        "threads": audit["threads"],
        **m,
        "peak_uss_bytes_by_phase": phases,
        "phase_spans_s": {k: [round(a, 1), round(b, 1)] for k, (a, b) in spans.items()},
        "check_runtime_s": {k: results["checks"][k]["runtime_s"] for k in CHECKS},
    }


def phase_spans(results: dict, written_s: float, wall_s: float) -> dict[str, tuple[float, float]]:
    """When each part of the audit ran, in seconds since its start: results.json is written (``written_s``) as the
    last check ends, and each check records its own runtime_s; before the checks the model and data load, after
    them the report renders."""
    end, spans = written_s, {}
    for name in reversed(CHECKS):
        spans[f"check {name}"] = (end - results["checks"][name]["runtime_s"], end)
        end -= results["checks"][name]["runtime_s"]
    return {"load model and data": (0.0, end), **dict(reversed(spans.items())), "report": (written_s, wall_s)}


def run_reference(work: Path, data: Path, weights: Path, n: int) -> dict:
    result = work / "reference.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-loop", "--data", str(data)]
    cmd += ["--weights", str(weights), "--n", str(n), "--result", str(result)]
    m, _, _ = watch(cmd, work / "reference.log")
    command = " ".join(["python", "benchmarks/audit_scale.py", *cmd[2:]])
    return {"command": command, **json.loads(result.read_text()), **m}


def plain_loop(data: Path, weights: Path, n: int, result: Path) -> None:
    """The reference: what a PyTorch user writes to evaluate a model on an image folder (``--plain-loop``)."""
    import timm
    from safetensors.torch import load_file
    from torchvision import datasets, transforms

    net = timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)
    net.load_state_dict(load_file(str(weights)))
    net.eval()
    cfg = timm.data.resolve_data_config({}, model=net)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(cfg["mean"], cfg["std"])])
    ds = torch.utils.data.Subset(datasets.ImageFolder(str(data), transform=tf), range(n))  # the first n images
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers(), shuffle=False)
    with torch.inference_mode():
        logits = torch.cat([net(x) for x, _ in loader])
    secs = time.perf_counter() - t0
    assert logits.shape == (n, CLASSES) and torch.isfinite(logits).all()
    out = {"images_per_s": n / secs, "n": n, "loop_s": secs, "threads": torch.get_num_threads(), "workers": workers()}
    result.write_text(json.dumps(out))


def decode_speed(files: list[Path], repeats: int = 3) -> dict:
    """Images/s decoding JPEG files to RGB arrays in this process: PIL against torchvision.io, alternating."""
    from torchvision.io import decode_jpeg, read_file

    ways = {
        "pil_img_s": lambda p: np.asarray(Image.open(p).convert("RGB")),
        "torchvision_img_s": lambda p: decode_jpeg(read_file(str(p))),
    }
    for way in ways.values():  # warm-up: the files into the page cache, the libraries' first-call costs
        for p in files[:50]:
            way(p)
    rates = {k: [] for k in ways}
    for _ in range(repeats):
        for k, way in ways.items():
            t0 = time.perf_counter()
            for p in files:
                way(p)
            rates[k].append(len(files) / (time.perf_counter() - t0))
    out = {k: statistics.median(r) for k, r in rates.items()}
    return {**out, "files": len(files), "repeats": repeats, "runs": rates}


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line for line in lines if line.startswith("flags")), "")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "threads": torch.get_num_threads(),
        "workers": workers(),
        "memory_bytes": psutil.virtual_memory().total,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


# --- the README ---------------------------------------------------------------------------------------------


def readme_table(data: dict) -> str:
    """A paragraph and a table of the measurement and the goals, met or missed, from audit_scale.json."""
    o, r, g, m = data["ours"], data["reference"], data["goals"], data["machine"]
    gb, met = 1e9, {True: "yes", False: "**no**"}
    phases = o["peak_uss_bytes_by_phase"]
    top = max(phases, key=phases.get)
    side = "pupil audit (streamed)" if o["streamed"] else "pupil audit (NOT streamed: the folder fit in memory)"
    lines = [
        f"`pupil audit` on a folder of {data['images']:,} generated 224×224 JPEGs ({data['decoded_bytes'] / gb:.2f} GB "
        f"decoded) with `--max-memory {data['max_memory']}`, which keeps the images in their files and decodes them "
        f"batch by batch in {m['workers']} DataLoader worker process(es). timm resnet18 (random weights), fp32, CPU "
        f"({m['cpu']}, {o['threads']} threads), checks {', '.join(o['check_runtime_s'])} over the {o['n']:,}-image "
        f"test split. Reference, run after pupil's audit: a plain torchvision `ImageFolder` + `DataLoader` loop (batch "
        f"{BATCH}, {m['workers']} worker(s), same model) over the first {r['n']:,} images. Memory is the peak unique "
        f"set size (USS) summed over each side's process and its workers, sampled every {INTERVAL_S:g} s; speed is "
        f"images per second of the prediction pass (decode + forward); one run of each. Goals: peak below "
        f"{g['peak_bytes'] / gb:g} GB and at least {g['ratio']:g}× the plain loop's speed.",
        "",
        f"| | {side} | plain torchvision loop | goal | met |",
        "| --- | ---: | ---: | --- | --- |",
        f"| peak memory, whole command | {o['peak_uss_bytes'] / gb:.2f} GB (during {top}) "
        f"| {r['peak_uss_bytes'] / gb:.2f} GB | < {g['peak_bytes'] / gb:g} GB | {met[g['peak_met']]} |",
        f"| peak memory, prediction pass (check accuracy) | {phases['check accuracy'] / gb:.2f} GB | | | |",
        f"| images/s, prediction pass | {o['images_per_s']:.1f} | {r['images_per_s']:.1f} "
        f"| ratio ≥ {g['ratio']:g} (measured {data['speed_ratio_vs_plain_loop']:.2f}) | {met[g['ratio_met']]} |",
        f"| wall time, whole command | {o['wall_s']:.0f} s | {r['wall_s']:.0f} s | | |",
        "",
        f"JPEG decoding in one process ({data['decode']['files']} of these files): PIL "
        f"{data['decode']['pil_img_s']:.0f} images/s, `torchvision.io.decode_jpeg` "
        f"{data['decode']['torchvision_img_s']:.0f} images/s.",
    ]
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000, help="images to generate (default 20,000: ~3 GB decoded)")
    ap.add_argument("--work", type=Path, help="folder for the images, weights and audit (new or empty)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-memory", default=MAX_MEMORY, help="pupil's --max-memory (default 1GB, the issue's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "audit_scale.json")
    ap.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)  # the reference, in a subprocess
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_loop:
        plain_loop(args.data, args.weights, args.n, args.result)
        return
    if args.work is not None and args.work.exists() and (not args.work.is_dir() or any(args.work.iterdir())):
        sys.exit(f"--work {args.work} exists and is not an empty folder; give a new one")
    work = (args.work or Path(tempfile.mkdtemp(prefix="audit_scale_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, weights = work / "images", work / "W.safetensors"
    print(f"work folder: {work}", flush=True)
    load_at_start = os.getloadavg()[0]  # other work on the machine slows both sides; recorded, not corrected
    try:
        print(f"[1] {args.images:,} JPEGs of {SIDE}x{SIDE}", flush=True)
        file_bytes = make_folder(data, args.images, args.seed)
        save_weights(weights)
        print("[2] ours: pupil audit", flush=True)
        ours = run_ours(work, data, weights, args.max_memory)
        print(f"    {ours['images_per_s']:.1f} img/s, peak USS {ours['peak_uss_bytes'] / 1e9:.2f} GB", flush=True)
        print("[3] reference: plain torchvision loop", flush=True)
        ref = run_reference(work, data, weights, ours["n"])
        print(f"    {ref['images_per_s']:.1f} img/s, peak USS {ref['peak_uss_bytes'] / 1e9:.2f} GB", flush=True)
        print(f"[4] JPEG decode, {DECODE_FILES} files", flush=True)
        decode = decode_speed(sorted(data.rglob("*.jpg"))[:DECODE_FILES])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ratio = ours["images_per_s"] / ref["images_per_s"]
    report = {
        "benchmark": "audit_scale",
        "peak_rss_bytes": ours["peak_uss_bytes"],  # the name; the value is USS summed over the process tree
        "peak_uss_bytes": ours["peak_uss_bytes"],
        "peak_note": "USS (unique set size) summed over pupil's process and all its descendants, sampled every "
        f"{INTERVAL_S:g} s; RSS summed over the tree would count pages shared by the forked workers several times "
        "(ours.peak_rss_sum_bytes gives that sum for comparison)",
        "speed_ratio_vs_plain_loop": ratio,
        "goals": {
            "peak_bytes": GOAL_PEAK_BYTES,
            "ratio": GOAL_RATIO,
            "peak_met": ours["peak_uss_bytes"] < GOAL_PEAK_BYTES,
            "ratio_met": ratio >= GOAL_RATIO,
        },
        "images": args.images,
        "decoded_bytes": args.images * 3 * SIDE * SIDE,
        "file_bytes": file_bytes,
        "max_memory": args.max_memory,
        "order": "ours first, then the reference",
        "reference_images": "the first n images of ImageFolder's order (n = pupil's test split), not pupil's own "
        "test files; every generated image costs the same to decode",
        "seed": args.seed,
        "machine": machine(),
        "load_avg_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        "ours": ours,
        "reference": ref,
        "decode": decode,
    }
    from pupil.io import write_json  # not at the top: the --plain-loop subprocess must not import pupil

    write_json(args.out, report)  # atomic: a temporary file in the same folder, then a rename
    print(f"ratio {ratio:.2f}; wrote {args.out}")
    print(readme_table(report))


if __name__ == "__main__":
    main()
