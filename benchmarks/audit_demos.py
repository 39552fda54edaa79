"""The two "audit any model" demonstrations whose figures the README gives, run end to end with the CLI.

1. A model trained outside pupil: ``examples/train_outside.py`` trains a small CNN in plain PyTorch and saves it
   as a state dict, an ONNX file and a TorchScript file; ``pupil audit`` then audits each of the three on the
   Fashion-MNIST test split (accuracy, calibration, efficiency). The three should agree on top-1 and ECE.
2. ImageNet weights on real photographs: ``examples/imagenet_photos.py`` builds a folder of 3 photographs x 10
   views under ImageNet WordNet ids; ``pupil audit timm:efficientnet_lite0 --pretrained --class-map auto`` audits
   the published weights on it (accuracy, calibration, efficiency, corruption, explain).

Writes benchmarks/results/audit_demos.json (the machine, each step's command and wall time, and the figures read
from each audit's results.json). The intermediate files go to a new temporary folder unless ``--work`` names one
(it must be new or empty). About 15-20 minutes on 2 CPU cores, most of it the explain check at 224 px.

    python benchmarks/audit_demos.py
    python benchmarks/audit_demos.py --work /tmp/demos
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pupil.io import write_json

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ["--data", "fashion-mnist", "--mean", "0.2860", "--std", "0.3530"]  # examples/outside_cnn.py's MEAN, STD
SOURCES = {  # label -> (audit folder, model argument, extra flags); WORK is replaced by the work folder
    "py state dict": ("a-py", "py:examples.outside_cnn:build", ["--weights", "WORK/outside/model.pth"]),
    "ONNX": ("a-onnx", "onnx:WORK/outside/model.onnx", []),
    "TorchScript": ("a-ts", "torchscript:WORK/outside/model.ts", []),
}
PHOTO_CHECKS = "accuracy,calibration,efficiency,corruption,explain"
STEP_TIMEOUT_S = 3 * 3600  # a generous ceiling: the explain check at 224 px alone takes ~10 minutes on 2 cores


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {
        "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "avx512": "avx512f" in flags,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def step(name: str, args: list[str], work: Path, log: dict) -> str:
    """Run ``python ARGS`` (``WORK`` replaced by ``work``) from the repo root; record the command and wall time.
    Returns its stdout and stderr; on failure prints their tail and exits 1."""
    print(f"[{len(log) + 1}] {name}: python {' '.join(args)}", flush=True)
    cmd = [sys.executable, *(a.replace("WORK", str(work)) for a in args)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.CalledProcessError as e:
        tail = "\n".join((e.stdout + e.stderr).splitlines()[-20:])
        sys.exit(f"{name} failed (exit {e.returncode}):\n{tail}")
    except subprocess.TimeoutExpired:
        sys.exit(f"{name} ran past {STEP_TIMEOUT_S} s; stopped")
    secs = time.perf_counter() - t0
    # The 1-minute load average as the step ends: other work on the machine slows the timings (batch-1 latency most).
    log[name] = {"command": "python " + " ".join(args), "wall_s": secs, "load_avg_1min": os.getloadavg()[0]}
    print(f"    done in {secs:.0f} s", flush=True)
    return done.stdout + done.stderr


def read_results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def outside_figures(r: dict) -> dict:
    """Demo 1's figures from one audit's results.json."""
    c = r["checks"]
    acc, cal, eff = c["accuracy"]["summary"], c["calibration"]["summary"], c["efficiency"]
    return {
        "n": c["accuracy"]["metrics"]["n"],
        "top1": acc["top1"],
        "top1_ci95": acc["top1_ci95"],
        "ece": cal["ece"],
        "ece_after_temperature": cal["ece_after_temperature"],
        "latency_ms_p50": eff["summary"]["latency_ms_p50"],
        # The fastest repeat: with both cores busy elsewhere, a 2-thread PyTorch forward pass waits for its second
        # thread to be scheduled and p50 rises far above it; ONNX Runtime's thread pool is hit less.
        "latency_ms_min": eff["metrics"]["latency_ms"]["min"],
        "throughput_img_s": eff["summary"]["throughput_img_s"],
        "params": eff["summary"]["params"],
        "flops": eff["summary"]["flops"],  # None where the check could not count them (its notes say why)
        "threads": eff["metrics"]["threads"],
        "efficiency_notes": eff["notes"],
        "runtime_s": {name: check["runtime_s"] for name, check in c.items()},
        "preprocess": r["run"]["source"].get("preprocess"),
    }


def photo_figures(r: dict) -> dict:
    """Demo 2's figures from the EfficientNet-Lite0 audit's results.json."""
    c = r["checks"]
    acc = c["accuracy"]
    return {
        "n": acc["metrics"]["n"],
        "protocol": acc["metrics"]["protocol"],
        "top1": acc["metrics"]["top1"],
        "top1_ci95": acc["summary"]["top1_ci95"],
        "top1_all_classes": acc["metrics"]["top1_all_classes"],
        "ece": c["calibration"]["summary"]["ece"],
        "ece_after_temperature": c["calibration"]["summary"]["ece_after_temperature"],
        "latency_ms_p50": c["efficiency"]["summary"]["latency_ms_p50"],
        "latency_ms_min": c["efficiency"]["metrics"]["latency_ms"]["min"],
        "throughput_img_s": c["efficiency"]["summary"]["throughput_img_s"],
        "mean_corrupted_top1": c["corruption"]["summary"]["mean_corrupted_top1"],
        "clean_top1_corruption_images": c["corruption"]["summary"]["clean_top1"],
        "explain": c["explain"]["summary"],  # method, insertion_deletion_gap
        "runtime_s": {name: check["runtime_s"] for name, check in c.items()},
        "preprocess": r["run"]["source"].get("preprocess"),
        "conversions": r["audit"]["data"]["conversions"],
        "accuracy_notes": acc["notes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder for the trained model, photos and audits (new or empty)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "audit_demos.json")
    args = ap.parse_args()
    if args.work is not None and args.work.exists() and (not args.work.is_dir() or any(args.work.iterdir())):
        sys.exit(f"--work {args.work} exists and is not an empty folder; give a new one")
    work = (args.work or Path(tempfile.mkdtemp(prefix="audit_demos_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    steps: dict[str, dict] = {}
    audit = ["-m", "pupil", "audit"]

    train_log = step("train outside pupil", ["examples/train_outside.py", "--out", "WORK/outside"], work, steps)
    outside = {}
    for label, (folder, model, extra) in SOURCES.items():
        checks = ["--checks", "accuracy,calibration,efficiency", "--out", f"WORK/{folder}"]
        step(f"audit {label}", [*audit, model, *extra, *FMNIST, *checks], work, steps)
        outside[label] = outside_figures(read_results(work / folder))
    eces = [s["ece"] for s in outside.values()]
    top1s = {s["top1"] for s in outside.values()}

    step("build photo folder", ["examples/imagenet_photos.py", "--out", "WORK/photos"], work, steps)
    lite0 = ["timm:efficientnet_lite0", "--pretrained", "--data", "WORK/photos", "--class-map", "auto"]
    step("audit efficientnet_lite0", [*audit, *lite0, "--checks", PHOTO_CHECKS, "--out", "WORK/lite0"], work, steps)
    photos = photo_figures(read_results(work / "lite0"))

    report = {
        "benchmark": "audit_demos",
        "machine": machine(),
        "steps": steps,
        "outside": {
            # the training script's own summary lines (steps, test accuracy, agreement of the three exports)
            "train_log": [line for line in train_log.splitlines() if line.startswith(("trained", "test", "model."))],
            "sources": outside,
            "top1_identical": len(top1s) == 1,
            "max_abs_delta_ece": max(eces) - min(eces),
        },
        "photos": photos,
    }
    write_json(args.out, report)  # atomic: a temporary file in the same folder, then a rename
    print("outside: " + ", ".join(f"{k} top-1 {v['top1']:.2%} ECE {v['ece']:.4f}" for k, v in outside.items()))
    print(f"lite0: top-1 {photos['top1']:.1%} ({photos['protocol']}), all classes {photos['top1_all_classes']:.1%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
