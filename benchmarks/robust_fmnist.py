"""Robust training measured on Fashion-MNIST: a standard run, an adversarially trained run and a noise-trained
run, each audited by pupil's adversarial and certify checks, with torchattacks' PGD run beside ours on the same
images as the reference attack. Writes benchmarks/results/robust_fmnist.json and prints a table.

    pupil train recipes/fmnist_fast.yaml && pupil train recipes/fmnist_adversarial.yaml \
        && pupil train recipes/fmnist_noise.yaml
    python benchmarks/robust_fmnist.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pupil.audit import CHECKS
from pupil.audit.common import AuditContext, make_context
from pupil.io import write_json
from pupil.predict import evaluate
from pupil.robust import pgd
from pupil.runtime import setup_threads

ROOT = Path(__file__).resolve().parents[1]


def run_check(ctx: AuditContext, name: str, settings: dict) -> dict:
    check = CHECKS.get(name)()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = check.run(ctx, check.config("full", settings))
    out["runtime_s"] = round(time.perf_counter() - t0, 1)
    return out


def pgd_side_by_side(ctx: AuditContext, eps: float, steps: int, n: int) -> dict:
    """Robust accuracy under PGD (L-inf, random start) from pupil and from torchattacks on the same images."""
    import torchattacks

    model = ctx.model.eval()
    idx = torch.randperm(len(ctx.test), generator=torch.Generator().manual_seed(0))[:n]
    x, y = ctx.test.images[idx].float().div(255).to(ctx.device), ctx.test.targets[idx].to(ctx.device)
    alpha = 2.5 * eps / steps
    ref = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    out = {}
    for side, attack in (
        ("pupil", lambda a, b: pgd(model, a, b, eps, alpha, steps, norm="linf", random_start=True)),
        ("torchattacks", ref),
    ):
        torch.manual_seed(0)
        t0, hits = time.perf_counter(), 0
        for i in range(0, n, 250):
            adv = attack(x[i : i + 250], y[i : i + 250])
            with torch.inference_mode():
                hits += (model(adv).argmax(1) == y[i : i + 250]).sum().item()
        out[side] = {"robust_accuracy": hits / n, "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--standard", type=Path, default=ROOT / "runs" / "fmnist_fast")
    ap.add_argument("--adversarial", type=Path, default=ROOT / "runs" / "fmnist_adversarial")
    ap.add_argument("--noise", type=Path, default=ROOT / "runs" / "fmnist_noise")
    ap.add_argument("--n-attack", type=int, default=500, help="test images attacked per run")
    ap.add_argument("--n-certify", type=int, default=200, help="test images certified per run")
    ap.add_argument("--draws", type=int, default=2000, help="noise draws N per certified image")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robust_fmnist.json")
    args = ap.parse_args()
    threads = setup_threads(0)
    attack = {"epsilons": [0, 0.02, 0.05, 0.1, 0.15, 0.2], "steps": 20, "n": args.n_attack}
    certify = {"sigma": 0.5, "n0": 100, "n": args.draws, "images": args.n_certify, "alpha": 0.001}
    certify["radii"] = [0, 0.25, 0.5, 0.75, 1.0, 1.25]
    rows = {}
    for label, run in (("standard", args.standard), ("adversarial", args.adversarial), ("noise", args.noise)):
        ctx = make_context(run, "auto", "full", seed=0)
        row = {"run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run)}
        row["task"] = ctx.run.info["config"]["train"]["task"]
        row["clean_top1"] = evaluate(ctx.model, ctx.test)["top1"]
        adv = run_check(ctx, "adversarial", attack)
        row["adversarial"] = {k: adv["metrics"][k] for k in ("epsilons", "fgsm_accuracy", "pgd_accuracy", "sanity")}
        row["pgd_eps0.1"] = pgd_side_by_side(ctx, 0.1, 20, args.n_attack)
        if label != "adversarial":
            cert = run_check(ctx, "certify", certify)
            row["certify"] = {
                k: cert["metrics"][k]
                for k in ("certified_accuracy", "abstention_rate", "seconds_per_image", "max_certifiable_radius")
            }
        rows[label] = row
        print(label, {k: v for k, v in row.items() if k != "adversarial"}, flush=True)
    report = {
        "benchmark": "robust_fmnist",
        "threads": threads,
        "attack": attack,
        "certify": certify,
        "runs": rows,
    }
    write_json(args.out, report)
    print(f"\n{'run':12s} {'task':12s} {'clean':>7s} {'PGD0.1 ours':>12s} {'PGD0.1 ref':>11s}  certified@0/0.5/1.0")
    for label, r in rows.items():
        c = r.get("certify", {}).get("certified_accuracy", {})
        cert = " / ".join(f"{c[k]:.3f}" for k in ("0", "0.5", "1") if k in c)
        p = r["pgd_eps0.1"]
        print(
            f"{label:12s} {r['task']:12s} {r['clean_top1']:7.4f} {p['pupil']['robust_accuracy']:12.4f} "
            f"{p['torchattacks']['robust_accuracy']:11.4f}  {cert}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
