"""The measured history: every family trained on Fashion-MNIST under the same wall-clock budget, then
measured on one machine. Writes benchmarks/results/journey.json, a plot (top-1 against FLOPs and
against batch-1 latency) and prints a table; benchmarks/update_readme.py puts the table in the README.

    python benchmarks/journey.py --minutes 5            # one representative size per family
    python benchmarks/journey.py --smoke                # every family's *_test size, a few steps (a test)

The budget covers training only; each run uses the fast recipe's optimiser settings with AdamW for the
transformer families, and its schedule is fitted to the budget (``max_minutes``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pupil.config import build
from pupil.data import load
from pupil.io import write_json
from pupil.models import MODELS
from pupil.models.stats import count_flops, count_params
from pupil.predict import evaluate
from pupil.runtime import setup_threads
from pupil.training.loop import fit

ROOT = Path(__file__).resolve().parents[1]
# One representative size per family, small enough for a CPU budget of minutes.
REPRESENTATIVE = {
    "LeNet": "lenet5",
    "AlexNet": "alexnet_small",
    "VGG": "vgg_small",
    "GoogLeNet": "googlenet_small",
    "ResNet": "resnet20",
    "ResNeXt": "resnext29_4x8d",
    "DenseNet": "densenet_bc40_k12",
    "MobileNetV2": "mobilenetv2_050",
    "ShuffleNetV2": "shufflenetv2_x0_5",
    "EfficientNet": "efficientnet_b0",
    "ViT": "vit_mini_p7",
    "DeiT": "deit_mini_p7",
    "Swin": "swin_nano",
    "ConvNeXt": "convnext_femto_c",
    "CoAtNet": "coatnet_micro",
}
TRANSFORMERS = {"ViT", "DeiT", "Swin", "CoAtNet", "ConvNeXt"}
# AlexNet has no batch normalisation: at the recipe's SGD peak of 0.2 it diverged to chance (measured), so it
# gets the learning rate of its era instead.
FAMILY_OVERRIDES = {"AlexNet": {"lr": 0.02}}


def speed(model: torch.nn.Module, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    """Seconds per forward pass of a batch, median of ``repeats`` after one warm-up."""
    x = torch.rand(batch, *shape)
    model.eval()
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def one(family: str, name: str, year: int, args: argparse.Namespace, out: str) -> dict:
    start = time.perf_counter()
    over = {"model": name, "out": out, "name": name, "track_energy": False, "epochs": 50.0, "max_minutes": args.minutes}
    # Batch-norm statistics recomputed with the final weights (a no-op for models without batch norm): a few dozen
    # steps leave the running averages far behind the weights, and EfficientNet-B0 then scored chance in eval mode.
    over["precise_bn"] = args.precise_bn
    if family in TRANSFORMERS:
        over.update(opt="adamw", lr=2e-3, weight_decay=0.05, sched="cosine", warmup_epochs=0.5)
    over.update(FAMILY_OVERRIDES.get(family, {}))
    if family == "DeiT" and args.teacher:
        # DeiT's defining idea: the distillation token learns from a convnet teacher's hard labels.
        over.update(task="distill", teacher=str(args.teacher), distill_kind="hard")
    if args.smoke:
        over.update(dataset=args.dataset, epochs=4 * 64 / 448, batch_size=64, val_size=64, max_minutes=0.0, img_size=28)
    cfg = build(ROOT / "recipes/fmnist_fast.yaml", over)
    run = fit(cfg, progress=False)
    test = load(args.dataset, "test", img_size=28 if args.smoke else None)
    shape = tuple(test.shape)
    net = run.model.net
    secs = run.summary()["train_time_s"]
    seen = run.summary()["total_steps"] * cfg.data.batch_size
    task = cfg.train.task
    if task == "distill":
        task = f"{cfg.task.distill_kind} distillation from {args.teacher}"
    return {
        "family": family,
        "model": name,
        "year": year,
        "params": count_params(net),
        "flops": count_flops(net, (1, *shape)),
        "test_top1": evaluate(run.model, test)["top1"],
        "task": task,
        "precise_bn_images": run.summary()["last"].get("precise_bn_images", 0),
        "train_time_s": secs,
        "train_img_s": seen / max(secs, 1e-9),
        "latency_ms_b1": 1000 * speed(run.model, shape, 1, 5 if args.smoke else 50),
        "throughput_b256": 256 / speed(run.model, shape, 256, 1 if args.smoke else 5),
        "wall_s": time.perf_counter() - start,  # training, validation, test evaluation and the speed measurements
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "flops", "FLOPs per image"), (axes[1], "latency_ms_b1", "batch-1 latency (ms)")):
        for r in rows:
            ax.scatter(r[key], r["test_top1"], color="#2563eb")
            ax.annotate(
                f"{r['family']} ({r['year']})",
                (r[key], r["test_top1"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set(xscale="log", xlabel=label, ylabel="test top-1")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per model")
    ap.add_argument("--smoke", action="store_true", help="every family's *_test size for a few steps; no files")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--families", default="", help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "journey.json")
    ap.add_argument("--merge", action="store_true", help="replace only these families' rows in an existing --out")
    ap.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="run directory of a convnet teacher: DeiT then trains with hard distillation through its token",
    )
    ap.add_argument("--precise-bn", type=int, default=8, help="batches for the precise-BN pass (0: off)")
    ap.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="no training: merge the rows of these JSON files (later files win per family) into --out",
    )
    ap.add_argument("--note", default="", help="conditions of the measurement, kept in the JSON (e.g. pinned core)")
    args = ap.parse_args()
    if args.teacher is not None and not (args.teacher / "run.json").is_file():
        raise SystemExit(f"--teacher {args.teacher} is not a run directory (no run.json)")  # before hours of training
    threads = setup_threads(0)
    entries = sorted(MODELS, key=lambda e: e.meta["year"])
    families = dict.fromkeys(e.meta["family"] for e in entries)
    every_family = set(families)
    if args.families:
        families = {f: None for f in args.families.split(",")}
    if args.combine:
        combine(args, every_family)
        return
    kept = []
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        check_protocol(args.out, old, args, threads)
        kept = [r for r in old["rows"] if r["family"] not in families]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for family in families:
            pick = [e for e in entries if e.meta["family"] == family and e.meta.get("test", False) == args.smoke]
            name = pick[0].name if args.smoke else REPRESENTATIVE[family]
            rows.append(one(family, name, MODELS.entry(name).meta["year"], args, out))
            r = rows[-1]
            if not args.smoke:  # written after every family, so an interrupted run keeps what it measured
                merged = sorted(kept + rows, key=lambda r: r["year"])
                complete = {r["family"] for r in merged} == every_family
                write_json(args.out, report(merged, args, threads, complete=complete))
            print(
                f"{r['family']:13s} {r['model']:18s} {r['year']} {r['params']:>10,} {r['flops']:>13,} "
                f"top-1 {r['test_top1']:.4f} {r['train_img_s']:7.0f} img/s train {r['latency_ms_b1']:6.2f} ms "
                f"{r['throughput_b256']:7.0f} img/s",
                flush=True,
            )
    if not args.smoke:
        plot(sorted(kept + rows, key=lambda r: r["year"]), args.out.with_suffix(".png"))
        print(f"wrote {args.out}")


def check_protocol(path: Path, data: dict, args: argparse.Namespace, threads: int) -> None:
    """Refuse to put rows measured under different settings into one table."""
    theirs = {"minutes per model": data["minutes_per_model"], "threads": data["threads"]}
    ours = {"minutes per model": args.minutes, "threads": threads}
    if "precise_bn_batches" in data:  # absent from files written before precise BN existed
        theirs["precise-BN batches"], ours["precise-BN batches"] = data["precise_bn_batches"], args.precise_bn
    for key in theirs:
        if theirs[key] != ours[key]:
            raise SystemExit(f"{path} was measured with {theirs[key]} {key}, not {ours[key]}")


def combine(args: argparse.Namespace, every_family: set[str]) -> None:
    """Merge measurements made in separate invocations (e.g. one per core) into one table and plot."""
    rows: dict[str, dict] = {}
    parts = [(path, json.loads(path.read_text())) for path in args.combine]
    threads = parts[0][1]["threads"]
    for path, data in parts:
        check_protocol(path, data, args, threads)
        rows.update({r["family"]: r for r in data["rows"]})
    if not args.note:
        args.note = "; ".join(dict.fromkeys(d["note"] for _, d in parts if d.get("note")))
    merged = sorted(rows.values(), key=lambda r: r["year"])
    write_json(args.out, report(merged, args, threads, complete=set(rows) == every_family))
    plot(merged, args.out.with_suffix(".png"))
    print(f"wrote {args.out} ({len(merged)} families)")


def report(rows: list[dict], args: argparse.Namespace, threads: int, complete: bool) -> dict:
    return {
        "benchmark": "journey",
        "minutes_per_model": args.minutes,
        "threads": threads,
        "note": args.note,
        "precise_bn_batches": args.precise_bn,
        "complete": complete,
        "rows": rows,
    }


if __name__ == "__main__":
    main()
