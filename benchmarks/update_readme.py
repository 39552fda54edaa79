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
        f"training ({data['threads']} CPU threads, fp32){'' if data['complete'] else ' — INCOMPLETE run'}; "
        "latency and throughput measured after training on the same machine.",
        "",
        "| family | year | model | params | FLOPs | test top-1 | train img/s | latency b=1 | img/s b=256 |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['family']} | {r['year']} | `{r['model']}` | {r['params'] / 1e6:.2f} M | {r['flops'] / 1e6:.1f} M "
            f"| {r['test_top1'] * 100:.2f}% | {r['train_img_s']:.0f} | {r['latency_ms_b1']:.2f} ms "
            f"| {r['throughput_b256']:.0f} |"
        )
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


TABLES = {"train_fmnist": train_fmnist, "audit_core": audit_core, "journey": journey, "distill_fmnist": distill_fmnist}


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
