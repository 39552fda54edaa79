"""Transfer learning measured: EfficientNet-Lite0 fine-tuned on Fashion-MNIST from the ImageNet weights that ship
with a package, against the same architecture trained from scratch, under the same wall-clock budget and the
same recipe, in one invocation. Writes benchmarks/results/finetune_fmnist.json and prints a table.

    python benchmarks/finetune_fmnist.py --minutes 5 --img-size 32

Grey images go through the pretrained RGB stem with its kernels summed over the colour channels
(``pupil.models.pretrained``); images are upsampled from 28x28 to ``--img-size``, chosen for a CPU budget.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pupil.config import build
from pupil.io import write_json
from pupil.predict import evaluate
from pupil.runtime import setup_threads
from pupil.training.loop import fit

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per arm")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_fmnist.json")
    args = ap.parse_args()
    threads = setup_threads(0)
    common = {
        "model": "timm:efficientnet_lite0",
        "img_size": args.img_size,
        "epochs": 20.0,
        "max_minutes": args.minutes,
        "opt": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "sched": "cosine",
        "warmup_epochs": 0.1,
        "batch_size": 64,
        "track_energy": False,
    }
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for label, pretrained in (("from ImageNet weights", True), ("from scratch", False)):
            over = {**common, "pretrained": pretrained, "out": out, "name": label.replace(" ", "_")}
            cfg = build(ROOT / "recipes/fmnist_fast.yaml", over)
            t0 = time.perf_counter()
            run = fit(cfg, progress=False)
            s = run.summary()
            test = run.split("test")
            rows[label] = {
                "test_top1": evaluate(run.model, test)["top1"],
                "train_time_s": s["train_time_s"],
                "images_seen": s["total_steps"] * cfg.data.batch_size,
                "epochs_seen": round(s["total_steps"] * cfg.data.batch_size / run.info["data"]["train_size"], 3),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            print(label, rows[label], flush=True)
    report = {
        "benchmark": "finetune_fmnist",
        "minutes_per_arm": args.minutes,
        "img_size": args.img_size,
        "threads": threads,
        "recipe": common,
        "rows": rows,
    }
    write_json(args.out, report)
    print(f"\n{'arm':24s} {'test top-1':>10s} {'train s':>8s} {'epochs':>7s}")
    for label, r in rows.items():
        print(f"{label:24s} {r['test_top1']:10.4f} {r['train_time_s']:8.0f} {r['epochs_seen']:7.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
