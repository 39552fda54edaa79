"""Deletion/insertion faithfulness (Petsiuk et al. 2018) for 1,000 Fashion-MNIST test images: the batched
``deletion_insertion`` against the per-image, per-step loop ``deletion_insertion_loop``, in one invocation, on the
same Grad-CAM maps of the same trained run. Writes benchmarks/results/explain.json and prints a table.

Both sides evaluate the same images (2 (steps + 1) per explained image) in the same memory format; the batched side
builds all masks with one argsort and a comparison and sends chunks of about ``--batch-size`` images through the
model, the loop sends one image at a time. Where the loop would take too long it is timed on the first
``--loop-n`` images and extrapolated linearly to all of them (the JSON says so).

    taskset -c 0 python benchmarks/explain.py                       # runs/fmnist_fast and runs/fmnist_lenet5
    taskset -c 0 python benchmarks/explain.py runs/fmnist_fast --loop-n 1000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pupil.explain import deletion_insertion, deletion_insertion_loop, gradcam, saliency
from pupil.io import write_json
from pupil.run import load_run
from pupil.runtime import setup_threads

ROOT = Path(__file__).resolve().parents[1]


def trained_run(path: Path) -> Path:
    """``path`` if it holds a finished run; otherwise a one-epoch fmnist_fast run trained now under /tmp."""
    if (path / "model.safetensors").exists():
        return path
    from pupil.config import build
    from pupil.training.loop import fit

    print(f"{path} has no trained model: training recipes/fmnist_fast.yaml for one epoch")
    cfg = build(ROOT / "recipes" / "fmnist_fast.yaml", {"epochs": 1, "out": "/tmp/pupil-bench", "name": path.name})
    return fit(cfg, progress=False).dir


def bench(run_dir: Path, n: int, loop_n: int, steps: int, baseline: str, batch_size: int) -> dict:
    run = load_run(run_dir)
    model, cl = run.model, run.info["runtime"]["channels_last"]
    test = run.split("test")
    x = test.images[:n].float().div(255)
    with torch.no_grad():
        target = torch.cat([model(c) for c in x.split(batch_size)]).argmax(1)
    t0 = time.perf_counter()
    maps = saliency(model, x, target, gradcam, chunk=batch_size)
    cam_s = time.perf_counter() - t0
    # Warm-up outside the timings (first-call allocations, kernel selection).
    deletion_insertion(model, x[:4], maps[:4], target[:4], steps, baseline, batch_size, cl)
    deletion_insertion_loop(model, x[:1], maps[:1], target[:1], steps, baseline, cl)
    t0, c0 = time.perf_counter(), time.process_time()
    fast = deletion_insertion(model, x, maps, target, steps, baseline, batch_size, cl)
    batched_s, batched_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    loop_n = min(loop_n, n)
    t0, c0 = time.perf_counter(), time.process_time()
    slow = deletion_insertion_loop(model, x[:loop_n], maps[:loop_n], target[:loop_n], steps, baseline, cl)
    loop_measured_s, loop_measured_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    loop_s, loop_cpu_s = loop_measured_s * n / loop_n, loop_measured_cpu_s * n / loop_n
    diff = {k: (fast[k][:loop_n] - slow[k]).abs().max().item() for k in fast}
    return {
        "run": str(run_dir),
        "model": run.info["model"]["name"],
        "tta": bool(model.tta),
        "channels_last": cl,
        "n": n,
        "steps": steps,
        "baseline": baseline,
        "batch_size": batch_size,
        "forward_images_per_explained_image": 2 * (steps + 1) * (2 if model.tta else 1),
        "gradcam_s": cam_s,
        "batched_s": batched_s,
        "loop_s": loop_s,
        "batched_cpu_s": batched_cpu_s,
        "loop_cpu_s": loop_cpu_s,
        "loop_timed_on": loop_n,
        "loop_measured_s": loop_measured_s,
        "loop_extrapolated": loop_n < n,
        "speedup": loop_s / batched_s,
        "speedup_cpu_time": loop_cpu_s / batched_cpu_s,
        "max_abs_diff": diff,
        "mean_deletion_auc": fast["deletion_auc"].mean().item(),
        "mean_insertion_auc": fast["insertion_auc"].mean().item(),
    }


def _rel(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = [ROOT / "runs" / "fmnist_fast", ROOT / "runs" / "fmnist_lenet5"]
    ap.add_argument("runs", type=Path, nargs="*", default=default)
    ap.add_argument("--n", type=int, default=1000, help="test images explained and scored")
    ap.add_argument("--loop-n", type=int, default=100, help="images the per-image loop is timed on")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--baseline", default="zero")
    ap.add_argument("--batch-size", type=int, default=256, help="images per forward pass on the batched side")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "explain.json")
    args = ap.parse_args()
    threads = setup_threads(0)
    rows = []
    for path in args.runs:
        run_dir = trained_run(path) if path == default[0] else path
        rows.append(bench(run_dir, args.n, args.loop_n, args.steps, args.baseline, args.batch_size))
    report = {
        "benchmark": "explain",
        "command": "taskset -c 0 python benchmarks/explain.py " + " ".join(_rel(p) for p in args.runs),
        "threads": threads,
        "device": "cpu",
        "note": "seconds are wall time; *_cpu_s are process CPU time, less disturbed by other work on a shared core",
        "results": rows,
    }
    write_json(args.out, report)
    head = ("model", "tta", "n", "batched s", "loop s", "speed-up", "(CPU time)", "max |d AUC|")
    print("{:12s} {:>4s} {:>5s} {:>10s} {:>10s} {:>9s} {:>10s} {:>12s}".format(*head))
    for r in rows:
        loop = f"{r['loop_s']:.1f}" + ("*" if r["loop_extrapolated"] else "")
        d = max(r["max_abs_diff"]["deletion_auc"], r["max_abs_diff"]["insertion_auc"])
        print(
            f"{r['model']:12s} {r['tta']!s:>4s} {r['n']:5d} {r['batched_s']:10.1f} {loop:>10s} "
            f"{r['speedup']:8.1f}x {r['speedup_cpu_time']:9.1f}x {d:12.2e}"
        )
    if any(r["loop_extrapolated"] for r in rows):
        print(f"* timed on the first {args.loop_n} images and scaled to all of them")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
