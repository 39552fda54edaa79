"""DeiT-style distillation on Fashion-MNIST: a small ViT trained alone against the same ViT trained with a
CNN teacher, for the same number of epochs, in one invocation. Writes benchmarks/results/distill_fmnist.json.

    python benchmarks/distill_fmnist.py --teacher runs/fmnist_fast --epochs 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pupil.config import build
from pupil.data import load
from pupil.io import write_json
from pupil.predict import evaluate
from pupil.run import load_run
from pupil.runtime import setup_threads
from pupil.training.loop import fit

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=ROOT / "runs" / "fmnist_fast")
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill_fmnist.json")
    args = ap.parse_args()
    threads = setup_threads(0)
    test = load("fashion-mnist", "test")
    teacher_top1 = evaluate(load_run(args.teacher).model, test)["top1"]
    common = {
        "epochs": args.epochs,
        "opt": "adamw",
        "lr": 2e-3,
        "weight_decay": 0.05,
        "warmup_epochs": 0.5,
        "sched": "cosine",
        "track_energy": False,
    }
    arms = {
        "vit_mini_p7 alone": {"model": "vit_mini_p7"},
        "vit_mini_p7 + soft distillation": {"model": "vit_mini_p7", "task": "distill", "distill_kind": "soft"},
        "deit_mini_p7 + hard distillation token": {"model": "deit_mini_p7", "task": "distill", "distill_kind": "hard"},
    }
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for i, (label, over) in enumerate(arms.items()):
            extra = {"teacher": str(args.teacher)} if over.get("task") == "distill" else {}
            cfg = build(ROOT / "recipes/fmnist_fast.yaml", {**common, **over, **extra, "out": out, "name": f"arm{i}"})
            t0 = time.perf_counter()
            run = fit(cfg, progress=False)
            rows[label] = {
                "test_top1": evaluate(run.model, test)["top1"],
                "wall_s": round(time.perf_counter() - t0, 1),
                "train_time_s": run.summary()["train_time_s"],
                "config": {**run.info["config"]["train"], **(run.info["config"]["task"] or {})},
            }
    report = {
        "benchmark": "distill_fmnist",
        "teacher": str(args.teacher),
        "teacher_test_top1": teacher_top1,
        "epochs": args.epochs,
        "threads": threads,
        "arms": rows,
    }
    write_json(args.out, report)
    print(f"teacher {args.teacher}: test top-1 {teacher_top1:.4f}")
    for label, r in rows.items():
        print(f"{label:40s} test top-1 {r['test_top1']:.4f}  training {r['train_time_s']:.0f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
