"""Wall time of ``pupil audit --checks accuracy,calibration,efficiency`` against a straightforward script
that computes the same figures with torchmetrics, in one invocation on the same run and test split.

Both sides predict the test split once, compute top-1/top-5, macro and weighted precision/recall/F1,
per-class figures, the confusion matrix, bootstrap intervals for top-1 and macro-F1 (same number of
resamples), ECE/MCE/adaptive ECE, Brier, NLL, temperature scaling on the validation split, and the
same latency, throughput and peak-memory measurements. Writes benchmarks/results/audit_core.json.

    python benchmarks/audit_core.py runs/fmnist_fast
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pupil.audit import run_audit
from pupil.audit.common import make_context
from pupil.audit.efficiency import EfficiencyConfig, peak_memory_bytes, timed
from pupil.io import write_json
from pupil.models.stats import count_flops
from pupil.predict import predict_logits
from pupil.runtime import setup_threads

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["accuracy", "calibration", "efficiency"]


def reference(run_dir: Path, n_boot: int, eff: EfficiencyConfig) -> dict:
    """The straightforward script: torchmetrics for every figure it has, a loop for the bootstrap."""
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassCalibrationError,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    ctx = make_context(run_dir, "cpu", "quick", 0)
    model = ctx.model
    logits = predict_logits(model, ctx.test, 1024, ctx.device, ctx.dtype, ctx.channels_last)
    y = ctx.test.targets
    k = logits.shape[1]
    probs = logits.softmax(1)
    out = {
        "top1": MulticlassAccuracy(k, top_k=1, average="micro")(logits, y).item(),
        "top5": MulticlassAccuracy(k, top_k=5, average="micro")(logits, y).item(),
        "confusion": MulticlassConfusionMatrix(k)(logits, y).tolist(),
    }
    for avg in ("macro", "weighted", "none"):
        for name, metric in (
            ("precision", MulticlassPrecision),
            ("recall", MulticlassRecall),
            ("f1", MulticlassF1Score),
        ):
            out[f"{avg}_{name}"] = metric(k, average=avg)(logits, y).tolist()
    g = torch.Generator().manual_seed(0)
    top1s, f1s = [], []
    acc, f1 = MulticlassAccuracy(k, average="micro"), MulticlassF1Score(k, average="macro")
    for _ in range(n_boot):
        idx = torch.randint(0, len(y), (len(y),), generator=g)
        top1s.append(acc(logits[idx], y[idx]).item())
        f1s.append(f1(logits[idx], y[idx]).item())
    q = torch.tensor([0.025, 0.975])
    out["ci_top1"] = torch.quantile(torch.tensor(top1s), q).tolist()
    out["ci_f1"] = torch.quantile(torch.tensor(f1s), q).tolist()
    out["ece"] = MulticlassCalibrationError(k, n_bins=15, norm="l1")(probs, y).item()
    out["mce"] = MulticlassCalibrationError(k, n_bins=15, norm="max")(probs, y).item()
    conf, pred = probs.max(1)
    order = conf.argsort()
    correct = (pred == y).float()
    out["adaptive_ece"] = sum(
        (correct[c].mean() - conf[c].mean()).abs().item() * len(c) / len(y) for c in order.chunk(15)
    )
    out["brier"] = ((probs - F.one_hot(y, k)) ** 2).sum(1).mean().item()
    out["nll"] = F.cross_entropy(logits, y).item()
    val_logits = predict_logits(model, ctx.val, 1024, ctx.device, ctx.dtype, ctx.channels_last).clone()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(val_logits / log_t.exp(), ctx.val.targets)
        loss.backward()
        return loss

    opt.step(closure)
    t = log_t.exp().item()
    out["ece_after"] = MulticlassCalibrationError(k, n_bins=15, norm="l1")((logits / t).softmax(1), y).item()
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    one = ctx.test.images[:1].float().div(255).contiguous(memory_format=fmt)
    big = ctx.test.images[: eff.throughput_batch].float().div(255).contiguous(memory_format=fmt)

    def fwd(x):
        def go():
            with torch.inference_mode():
                model(x)

        return go

    out["latency"] = timed(fwd(one), eff.latency_repeats, eff.warmup, ctx.device)
    out["throughput"] = timed(fwd(big), eff.throughput_repeats, max(1, eff.warmup // 5), ctx.device)
    out["peak"] = peak_memory_bytes(fwd(big), ctx.device)[0]
    out["flops"] = count_flops(model.net, (1, *ctx.test.shape))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", default=ROOT / "runs" / "fmnist_fast")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed repeats of each side")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "audit_core.json")
    args = ap.parse_args()
    threads = setup_threads(0)
    eff = EfficiencyConfig(latency_repeats=50, warmup=5, throughput_repeats=5)  # the quick budget's settings
    times = {"pupil audit": [], "torchmetrics script": []}
    for _ in range(args.repeats):  # alternate so that machine noise hits both sides alike
        t0 = time.perf_counter()
        results = run_audit(args.run, CHECKS, budget="quick", device="cpu")
        times["pupil audit"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = reference(args.run, results["checks"]["accuracy"]["config"]["n_bootstrap"], eff)
        times["torchmetrics script"].append(time.perf_counter() - t0)
    acc = results["checks"]["accuracy"]["metrics"]
    cal = results["checks"]["calibration"]["metrics"]
    agreement = {
        "top1": [acc["top1"], ref["top1"]],
        "macro_f1": [acc["macro_f1"], ref["macro_f1"]],
        "ece": [cal["before"]["ece"], ref["ece"]],
        "ece_after_temperature": [cal["after"]["ece"], ref["ece_after"]],
    }
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    report = {
        "benchmark": "audit_core",
        "run": str(args.run),
        "n_test": acc["n"],
        "threads": threads,
        "checks": CHECKS,
        "seconds": times,
        "median_s": med,
        "ratio_ours_over_reference": med["pupil audit"] / med["torchmetrics script"],
        "agreement_ours_vs_reference": agreement,
    }
    write_json(args.out, report)
    print(f"{'':22s} {'median s':>10s}  runs")
    for k, v in times.items():
        print(f"{k:22s} {med[k]:10.2f}  {', '.join(f'{x:.2f}' for x in v)}")
    print(f"ratio ours/reference: {report['ratio_ours_over_reference']:.2f}")
    for k, (a, b) in agreement.items():
        print(f"{k:24s} ours {a:.5f}  reference {b:.5f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
