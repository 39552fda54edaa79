"""Regenerate the README's results tables from benchmarks/results/*.json (never typed by hand).

Each table sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers in README.md.

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_fmnist(data: dict) -> str:
    m = data["machine"]
    hw = f"{m['threads']} CPU threads, {'native bf16' if m['cpu_bf16'] else 'fp32 (no native bf16 on this CPU)'}"
    lines = [
        f"Fashion-MNIST test top-1 after training; {hw}; torch {m['torch']}. "
        "Median over the seeds shown; training time excludes evaluation.",
        "",
        "| recipe | test top-1 | training time | seeds | test top-1 after each epoch (training s) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for label, s in data["summary"].items():
        curve = data["runs"][label][0]["curve"]
        trace = ", ".join(f"{p['test_top1'] * 100:.2f}% ({p['train_time_s']:.0f})" for p in curve)
        top1, secs = s["median_test_top1"] * 100, s["median_train_time_s"]
        lines.append(f"| {label} | {top1:.2f}% | {secs:.0f} s | {s['seeds']} | {trace} |")
    return "\n".join(lines)


def audit_core(data: dict) -> str:
    med = data["median_s"]
    lines = [
        f"`pupil audit --checks {','.join(data['checks'])}` on the {data['n_test']:,}-image test split, "
        f"{data['threads']} threads, median of {len(data['seconds']['pupil audit'])} alternating runs:",
        "",
        "| side | median wall time | runs |",
        "| --- | ---: | --- |",
    ]
    for side, runs in data["seconds"].items():
        lines.append(f"| {side} | {med[side]:.2f} s | {', '.join(f'{x:.2f}' for x in runs)} |")
    lines += ["", f"Ratio ours / reference: **{data['ratio_ours_over_reference']:.2f}**. Agreement:", ""]
    lines += ["| figure | pupil | torchmetrics script |", "| --- | ---: | ---: |"]
    for k, (a, b) in data["agreement_ours_vs_reference"].items():
        lines.append(f"| {k} | {a:.5f} | {b:.5f} |")
    return "\n".join(lines)


def journey(data: dict) -> str:
    lines = [
        f"Each family's representative size trained on Fashion-MNIST for {data['minutes_per_model']:g} minute(s) of "
        f"training ({data['threads']} CPU thread(s), fp32){'' if data['complete'] else ' — INCOMPLETE run'}; "
        "latency and throughput measured after training on the same machine"
        + (f" ({data['note']})." if data.get("note") else "."),
        "",
        "| family | year | model | params | FLOPs | test top-1 | train img/s | latency b=1 | img/s b=256 |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for r in data["rows"]:
        mark = ""
        if r.get("task", "classification") != "classification":
            notes.append(f"{r['family']}: trained with {r['task']} (the other rows train on the labels alone).")
            mark = "\\*" * len(notes)
        lines.append(
            f"| {r['family']}{mark} | {r['year']} | `{r['model']}` | {r['params'] / 1e6:.2f} M "
            f"| {r['flops'] / 1e6:.1f} M "
            f"| {r['test_top1'] * 100:.2f}% | {r['train_img_s']:.0f} | {r['latency_ms_b1']:.2f} ms "
            f"| {r['throughput_b256']:.0f} |"
        )
    if notes:
        lines += ["", "  \n".join("\\*" * (i + 1) + " " + n for i, n in enumerate(notes))]
    return "\n".join(lines) + "\n\n![journey](benchmarks/results/journey.png)"


def distill_fmnist(data: dict) -> str:
    lines = [
        f"Teacher `{data['teacher']}` (test top-1 {data['teacher_test_top1'] * 100:.2f}%); every student trained "
        f"{data['epochs']:g} epochs with the same optimiser settings ({data['threads']} threads):",
        "",
        "| student | test top-1 | training time |",
        "| --- | ---: | ---: |",
    ]
    for label, r in data["arms"].items():
        lines.append(f"| {label} | {r['test_top1'] * 100:.2f}% | {r['train_time_s']:.0f} s |")
    return "\n".join(lines)


def corruptions(data: dict) -> str:
    sizes = data["sizes"]
    lines = [
        f"Time per image and severity for each corruption (mean over the 5 severities; the whole suite is all 19 × 5 "
        f"per image), {data['hardware']['threads']} thread; "
        f"{data['method']}. Fidelity: the largest gap over the 5 severities between the mean PSNR (against the clean "
        "image) of pupil's corrupted images and the reference's.",
        "",
        "| corruption | "
        + " | ".join(f"{k}×{k}: pupil | reference | speed-up" for k in sizes)
        + " | max ΔPSNR (32×32) |",
        "| --- |" + " ---: | ---: | ---: |" * len(sizes) + " ---: |",
    ]
    first = next(iter(sizes.values()))["per_corruption"]
    for name in first:
        cells = []
        for v in sizes.values():
            c = v["per_corruption"][name]
            ours, ref = c["s_per_image_pupil"] * 1e3, c["s_per_image_reference"] * 1e3
            cells.append(f"{ours:.2f} ms | {ref:.1f} ms | {c['speedup']:.0f}×")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {first[name]['max_abs_delta_db']:.2f} dB |")
    total = []
    for v in sizes.values():
        total.append(
            f"{v['suite_s_per_image_pupil'] * 1e3:.1f} ms | {v['suite_s_per_image_reference'] * 1e3:.0f} ms "
            f"| **{v['overall_speedup']:.0f}×**"
        )
    lines.append("| **whole suite** | " + " | ".join(total) + " | |")
    goals = "; ".join(
        f"{k}×{k}: " + ", ".join(f"{g} {'met' if ok else 'NOT met'}" for g, ok in v["goals_met"].items())
        for k, v in sizes.items()
    )
    return "\n".join([*lines, "", f"Goals: {goals}."])


def explain(data: dict) -> str:
    lines = [
        f"Deletion and insertion areas ({data['results'][0]['steps']} steps, zero baseline, Grad-CAM maps) for "
        f"{data['results'][0]['n']:,} Fashion-MNIST test images, {data['threads']} thread; the loop was timed on "
        "a subset and extrapolated where the table says so:",
        "",
        "| run | model (with flip TTA) | batched | per-image loop | speed-up | max abs. difference of the areas |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in data["results"]:
        loop = f"{r['loop_s']:.0f} s" + (f" (timed on {r['loop_timed_on']})" if r.get("loop_extrapolated") else "")
        diff = max(r["max_abs_diff"]["deletion_auc"], r["max_abs_diff"]["insertion_auc"])
        run = Path(r["run"]).name
        lines.append(f"| {run} | `{r['model']}` | {r['batched_s']:.0f} s | {loop} | {r['speedup']:.1f}× | {diff:.1e} |")
    return "\n".join(lines)


def robust_fmnist(data: dict) -> str:
    c = data["certify"]
    lines = [
        f"Clean test top-1 on all 10,000 images; PGD (L∞, ε = 0.1, {data['attack']['steps']} steps of 2.5ε/steps, "
        f"random start) on {data['attack']['n']} seeded test images, by pupil and by torchattacks on the same images; "
        f"randomized smoothing with σ = {c['sigma']}, N = {c['n']:,}, α = {c['alpha']} on {c['images']} images "
        f"({data['threads']} threads).",
        "",
        "| run | training | clean top-1 | PGD ε=0.1 (pupil) | PGD ε=0.1 (torchattacks) | certified r = 0 / 0.5 / 1.0 |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for label, r in data["runs"].items():
        p = r["pgd_eps0.1"]
        cert = r.get("certify", {}).get("certified_accuracy", {})
        cert_s = " / ".join(f"{cert[k] * 100:.1f}%" for k in ("0", "0.5", "1") if k in cert) or "—"
        lines.append(
            f"| {label} (`{r['run']}`) | {r['task']} | {r['clean_top1'] * 100:.2f}% "
            f"| {p['pupil']['robust_accuracy'] * 100:.1f}% | {p['torchattacks']['robust_accuracy'] * 100:.1f}% "
            f"| {cert_s} |"
        )
    lines += ["", "PGD accuracy against ε (pupil's `adversarial` check, same images):", ""]
    eps = next(iter(data["runs"].values()))["adversarial"]["epsilons"]
    lines += ["| run | " + " | ".join(f"ε={e:g}" for e in eps) + " |", "| --- |" + " ---: |" * len(eps)]
    for label, r in data["runs"].items():
        lines.append(f"| {label} | " + " | ".join(f"{a * 100:.1f}%" for a in r["adversarial"]["pgd_accuracy"]) + " |")
    return "\n".join(lines)


def finetune_fmnist(data: dict) -> str:
    lines = [
        f"`timm:efficientnet_lite0` on Fashion-MNIST upsampled to {data['img_size']}×{data['img_size']}, "
        f"{data['minutes_per_arm']:g} minutes of training per arm, same recipe (AdamW, lr {data['recipe']['lr']}, "
        f"cosine, batch {data['recipe']['batch_size']}), {data['threads']} thread(s):",
        "",
        "| start | test top-1 | training time | epochs seen |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, r in data["rows"].items():
        lines.append(f"| {label} | {r['test_top1'] * 100:.2f}% | {r['train_time_s']:.0f} s | {r['epochs_seen']:.2f} |")
    return "\n".join(lines)


def audit_forward(data: dict) -> str:
    lines = [
        f"`benchmarks/audit_forward.py`: the audit's forward pass over {data['n']:,} images of 1x28x28, "
        f"{data['model']} with flip TTA, batch {data['batch']}, {data['threads']} threads, median of alternating runs:",
        "",
        "| precision | inputs channels-last (before) | weights and inputs channels-last (now) | speed-up | "
        "max logit difference |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in data["results"].items():
        before, now = r["img_per_s"].values()
        lines.append(
            f"| {name} | {before:,.0f} img/s | {now:,.0f} img/s | {r['speedup']:.2f}x | {r['max_abs_logit_diff']:.1e} |"
        )
    return "\n".join(lines)


TABLES = {
    "train_fmnist": train_fmnist,
    "audit_core": audit_core,
    "journey": journey,
    "distill_fmnist": distill_fmnist,
    "explain": explain,
    "corruptions": corruptions,
    "robust_fmnist": robust_fmnist,
    "finetune_fmnist": finetune_fmnist,
    "audit_forward": audit_forward,
}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, render in TABLES.items():
        path = ROOT / "benchmarks" / "results" / f"{name}.json"
        if not path.exists():
            continue
        block = render(json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no {name} markers")
        text = pattern.sub(lambda m, block=block: m.group(1) + block + m.group(2), text)
    readme.write_text(text)
    print("README.md tables updated")


if __name__ == "__main__":
    main()
