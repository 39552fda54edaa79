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


def audit_demos(data: dict) -> str:
    m, o, p, steps = data["machine"], data["outside"], data["photos"], data["steps"]
    load = max(s["load_avg_1min"] for s in steps.values())
    n = next(iter(o["sources"].values()))["n"]
    lines = [
        "**A model trained outside pupil.** `examples/train_outside.py` trains a small CNN in plain PyTorch "
        f"(one epoch; the script took {steps['train outside pupil']['wall_s']:.0f} s) and saves it as a state "
        "dict, an ONNX file and a TorchScript file; `pupil audit` audits each file on the Fashion-MNIST test split "
        f"({n:,} images) with `--mean 0.2860 --std 0.3530 --checks accuracy,calibration,efficiency` "
        f"({m['threads']} threads, {m['cpu']}, torch {m['torch']}; `benchmarks/audit_demos.py`):",
        "",
        "| source | test top-1 (95% CI) | ECE | ECE after temperature | latency p50, batch 1 (fastest) "
        "| throughput, batch 256 | params | FLOPs | audit wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for label, s in o["sources"].items():
        lo, hi = s["top1_ci95"]
        flops = f"{s['flops'] / 1e6:.1f} M" if s["flops"] is not None else "not counted"
        lines.append(
            f"| {label} | {s['top1'] * 100:.2f}% ({lo * 100:.1f}–{hi * 100:.1f}) | {s['ece']:.4f} "
            f"| {s['ece_after_temperature']:.4f} | {s['latency_ms_p50']:.2f} ms ({s['latency_ms_min']:.2f}) "
            f"| {s['throughput_img_s']:,.0f} img/s | {s['params']:,} | {flops} "
            f"| {steps[f'audit {label}']['wall_s']:.0f} s |"
        )
        if kept := [note for note in s["efficiency_notes"] if not note.startswith("peak memory")]:
            quoted = "; ".join(f'"{note}"' for note in kept)
            notes.append(f"The efficiency check's notes on the {label} file: {quoted}.")
    same = "yes" if o["top1_identical"] else "no"
    lines += ["", f"Top-1 identical: {same}, max |ΔECE| = {o['max_abs_delta_ece']:.1e}."]
    if len({s["params"] for s in o["sources"].values()}) > 1:
        notes.append(
            "The ONNX parameter count is that of the exported graph, where the exporter has folded each batch norm "
            "into its convolution's weight and bias."
        )
    if notes:
        lines += ["", " ".join(notes)]
    if slow := [label for label, s in o["sources"].items() if s["latency_ms_p50"] > 5 * s["latency_ms_min"]]:
        lines += [
            "",
            f"The machine was shared (1-minute load average up to {load:.1f} on {m['cpus']} CPUs): a "
            f"{m['threads']}-thread PyTorch forward pass then waits for its other thread to be scheduled, so the "
            f"batch-1 p50 of the {' and '.join(slow)} row sits far above its fastest repeat. Read the fastest "
            "repeat as the network's own batch-1 cost here.",
        ]
    lines += [
        "",
        "The top of the ONNX file's report (`docs/audit_a-onnx.png`, from an earlier run of the same commands, so "
        "its timings differ):",
        "",
        "![Report card of the ONNX file's audit: summary cards, accuracy tables, confusion matrix]"
        "(docs/audit_a-onnx.png)",
        "",
    ]
    lines += _photos(p, steps["audit efficientnet_lite0"]["wall_s"])
    return "\n".join(lines)


def _photos(p: dict, wall_s: float) -> list[str]:
    """Demo 2 of audit_demos: the published EfficientNet-Lite0 on three photographs."""
    pre = p["preprocess"]
    conversions = ", ".join(f"{k} {v}" for k, v in p["conversions"].items()) or "none"
    runtime = p["runtime_s"]
    seconds = ", ".join(f"{name} {secs:.0f}" if secs >= 10 else f"{name} {secs:.1f}" for name, secs in runtime.items())
    slowest = max(runtime, key=runtime.get)
    mean, std = (", ".join(f"{v:g}" for v in pre[k]) for k in ("mean", "std"))
    return [
        "**ImageNet weights on real photographs.** `examples/imagenet_photos.py` writes 3 colour photographs that "
        "ship with scikit-image and scikit-learn (a tabby cat, an espresso, a palace) under their ImageNet "
        "WordNet ids, 10 views each; `pupil audit timm:efficientnet_lite0 --pretrained --class-map auto --checks "
        f"accuracy,calibration,efficiency,corruption,explain` audits the published weights on them "
        f"({wall_s / 60:.0f} minutes, {runtime[slowest] / wall_s:.0%} of it the {slowest} check):",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| test images | {p['n']} (the other {30 - p['n']} of the 30 are the validation split) |",
        f"| protocol | {p['protocol']} |",
        f"| top-1 over the mapped classes | {p['top1'] * 100:.1f}% |",
        f"| top-1 over all 1,000 classes | {p['top1_all_classes'] * 100:.1f}% |",
        f"| ECE (mapped classes) | {p['ece']:.4f} |",
        f"| latency p50, batch 1 (fastest) | {p['latency_ms_p50']:.1f} ms ({p['latency_ms_min']:.1f}) |",
        f"| mean corruption accuracy (19 corruptions × 5 severities) | {p['mean_corrupted_top1'] * 100:.1f}% |",
        f"| most faithful explanation, insertion − deletion gap | {p['explain']['method']}, "
        f"{p['explain']['insertion_deletion_gap']:.3f} |",
        f"| seconds per check | {seconds} |",
        "",
        f"Preprocessing ({pre['source']}): shorter side to {pre['resize']} ({pre['interpolation']}), centre crop "
        f"{pre['crop']}, mean ({mean}) and std ({std}) on {pre['input_range']} pixels; "
        f"conversions counted on the data: {conversions}.",
        "",
        "The set is tiny: 3 photographs, 10 views each (the whole photo, four corner crops and their mirror "
        "images). The views of one photo are not independent samples, so these figures show that the audit runs "
        "end to end on real photographs and maps ImageNet's classes; they do not measure the model's accuracy, "
        "calibration or robustness.",
        "",
        "The top of its report (`docs/audit_lite0.png`, from an earlier run of the same commands):",
        "",
        "![Report card of EfficientNet-Lite0's audit on the photographs: summary cards, accuracy, calibration]"
        "(docs/audit_lite0.png)",
    ]


def _beside(script: str):
    """A renderer that lives beside its measurement, in benchmarks/<script>.py (its ``readme_table``)."""

    def render(data: dict) -> str:
        import importlib.util

        spec = importlib.util.spec_from_file_location(script, ROOT / "benchmarks" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.readme_table(data)

    return render


audit_scale = _beside("audit_scale")
card_fmnist = _beside("card_fmnist")
serve = _beside("serve")
search = _beside("search")
compress = _beside("compress")


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
    "audit_scale": audit_scale,
    "audit_demos": audit_demos,
    "card_fmnist": card_fmnist,
    "serve": serve,
    "search": search,
    "compress": compress,
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
