"""Time-to-accuracy on Fashion-MNIST: pupil's recipes against a plain reference loop, in one invocation.

The reference is the loop the project brief names: a small VGG-style CNN (two 3x3 conv-BN-GELU per stage,
widths 32/64/128, max-pool), SGD with Nesterov momentum, one-cycle, label smoothing 0.1, batch 256,
random flip and 2-pixel shift, flip test-time augmentation, 4 epochs. It uses bf16 autocast only where
the CPU runs bf16 natively (pupil's ``precision: auto`` rule), so both sides get the same precision.

Test accuracy is traced after every epoch, outside the timed training, for the curves; the test set
informs no choice. Writes benchmarks/results/train_fmnist.json and prints a table.

    python benchmarks/train_fmnist.py                 # fast recipe and reference, 2 seeds; long recipe, 1 seed
    python benchmarks/train_fmnist.py --smoke         # a few steps of each, for the tests
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pupil
from pupil.config import build
from pupil.data import load
from pupil.io import write_json
from pupil.predict import evaluate
from pupil.runtime import autocast, cpu_has_fast_bf16, resolve_precision, setup_threads
from pupil.training.loop import evaluate_deployed, fit
from pupil.training.schedule import lr_factor
from pupil.training.state import TrainState

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_fmnist.json"


def reference_net() -> nn.Sequential:
    layers, cin = [], 1
    for w in (32, 64, 128):
        for _ in range(2):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU()]
            cin = w
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def reference(seed: int, epochs: float, max_steps: int | None = None) -> dict:
    """The plain loop, written out in full so that nothing of pupil's training code is shared."""
    torch.manual_seed(seed)
    train, test = load("fashion-mnist", "train"), load("fashion-mnist", "test")
    mean, std = train.mean_std()
    dtype = resolve_precision("auto", torch.device("cpu"))
    net = reference_net().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    bs, n = 256, len(train)
    spe = n // bs
    total = int(epochs * spe) if max_steps is None else max_steps
    g = torch.Generator().manual_seed(seed)
    norm = lambda x: ((x.float() / 255 - mean[0]) / std[0]).contiguous(memory_format=torch.channels_last)

    def test_acc() -> float:
        net.eval()
        correct = 0
        with torch.no_grad(), autocast(torch.device("cpu"), dtype):
            for xb, yb in zip(test.images.split(1024), test.targets.split(1024)):
                x = norm(xb)
                logits = net(x).float() + net(x.flip(3)).float()
                correct += (logits.argmax(1) == yb).sum().item()
        return correct / len(test)

    curve, step, elapsed = [], 0, 0.0
    while step < total:
        net.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=g)
        for i in range(spe):
            if step >= total:
                break
            idx = perm[i * bs : (i + 1) * bs]
            x = F.pad(train.images[idx], (2, 2, 2, 2))
            shifts = torch.randint(0, 5, (len(idx), 2), generator=g).tolist()
            x = torch.stack([im[:, dy : dy + 28, dx : dx + 28] for im, (dy, dx) in zip(x, shifts)])
            x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
            for group in opt.param_groups:
                group["lr"] = 0.2 * lr_factor(step, total, spe // 2, "onecycle")
            with autocast(torch.device("cpu"), dtype):
                loss = F.cross_entropy(net(norm(x)).float(), train.targets[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        elapsed += time.perf_counter() - t0
        curve.append({"epoch": step / spe, "train_time_s": round(elapsed, 1), "test_top1": test_acc()})
    return {"final_test_top1": curve[-1]["test_top1"], "train_time_s": round(elapsed, 1), "curve": curve}


def ours(recipe: Path, seed: int, overrides: dict | None = None) -> dict:
    test = load("fashion-mnist", "test")
    curve = []

    def trace(state: TrainState, record: dict) -> None:
        top1 = evaluate_deployed(state, test)["top1"]
        curve.append(
            {
                "epoch": state.step / state.steps_per_epoch,
                "train_time_s": record["train_time_s"],
                "test_top1": top1,
            }
        )

    with tempfile.TemporaryDirectory() as out:
        cfg = build(recipe, {"out": out, "seed": seed, **(overrides or {})})
        run = fit(cfg, progress=False, on_epoch=trace)
        final = evaluate(run.model, test)["top1"]
    return {"final_test_top1": final, "train_time_s": curve[-1]["train_time_s"], "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a few steps of each side, no JSON written")
    ap.add_argument("--skip-long", action="store_true", help="leave out the long recipe")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    threads = setup_threads(0)
    entries = [("pupil fmnist_fast", ROOT / "recipes/fmnist_fast.yaml", args.seeds)]
    if not args.skip_long:
        entries.append(("pupil fmnist_long", ROOT / "recipes/fmnist_long.yaml", 1))
    smoke = {"epochs": 0.02, "val_size": 512} if args.smoke else None
    results = {}
    for label, recipe, seeds in entries:
        results[label] = [ours(recipe, s, smoke) for s in range(min(seeds, 1) if args.smoke else seeds)]
    results["reference VGG loop"] = [
        reference(s, 4, max_steps=4 if args.smoke else None) for s in range(1 if args.smoke else args.seeds)
    ]
    summary = {
        label: {
            "median_test_top1": statistics.median(r["final_test_top1"] for r in runs),
            "median_train_time_s": statistics.median(r["train_time_s"] for r in runs),
            "seeds": len(runs),
        }
        for label, runs in results.items()
    }
    report = {
        "benchmark": "train_fmnist",
        "machine": {
            "threads": threads,
            "cpu_bf16": cpu_has_fast_bf16(),
            "cuda": torch.cuda.is_available(),
            "torch": torch.__version__,
            "pupil": pupil.__version__,
        },
        "summary": summary,
        "runs": results,
    }
    print_table(summary)
    if not args.smoke:
        write_json(args.out, report)
        print(f"wrote {args.out}")


def print_table(summary: dict) -> None:
    print(f"{'':24s} {'test top-1 (median)':>20s} {'train time (s)':>15s} {'seeds':>6s}")
    for label, s in summary.items():
        print(f"{label:24s} {s['median_test_top1']:20.4f} {s['median_train_time_s']:15.1f} {s['seeds']:6d}")


if __name__ == "__main__":
    main()
