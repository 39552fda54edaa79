"""``pupil compress``'s artefacts against the fastest fp32 form of the same model in PyTorch, measured in the same
invocation: batch-1 latency (p50, p99), batch-256 throughput, at 1 and 2 threads, and top-1 on the test split.

1. Runs: the default run ``runs/fmnist_fast`` (vgg_small, ``--vgg``), a resnet20 and a lenet5 run (``--resnet``,
   ``--lenet``; by default trained here into the work folder on the default recipe with the model swapped, resnet20
   for ``--resnet-minutes`` of training, lenet5 for one epoch).
2. Each run is compressed with ``pupil.compress.compress_run`` into the work folder, once per method: ``export``
   to ONNX (fp32), ``int8`` (the default options) and each int8 option the issue asks to try (``qdq``: every layer
   int8, per-channel U8S8, QDQ; ``qoperator``; ``reduce_range``; ``u8u8``; ``keep_ends``), torchao's PT2E
   (``int8:torchao``) where torchao is installed, ``bf16`` where the CPU runs it natively, and ``prune:0.5``
   where ``pupil.compress.prune.prune_run`` exists (its fine-tune gets ``--prune-minutes``).
3. Speed is the network as deployed, without flip TTA (both sides alike: TTA doubles both), on copies of the
   first test images: ONNX files through ``onnxruntime.InferenceSession.run`` on NumPy input with pupil's session
   settings (``pupil.compress.export.session_options``); torch forms under ``torch.inference_mode``. The PyTorch
   baseline is the fastest fp32 form per figure among eager, eager with weights and inputs channels-last, and
   ``torch.compile`` (Inductor, weight freezing, static shapes) of the channels-last model. Forms are measured
   round-robin (ROUNDS rounds, each timing every form) so that a busy machine slows all of them alike; latency
   percentiles pool every round's calls, throughput is 256 over the median batch time.
4. Top-1 is the compressed run's model as ``pupil.load_run`` gives it (flip TTA included where the run uses it) on
   the test split; the loss is against the same run in PyTorch fp32. int8 calibrates on validation images only.

``speedup_vs_torch_fp32`` is the batch-256 throughput ratio at the largest thread count (the issue's first goal;
``latency_speedup_vs_torch_fp32`` is the batch-1 one). Writes benchmarks/results/compress.json; ``render`` turns
it into the README table. ``--quick`` (vgg_small, fewer methods and calls, 2,000 test images) is a smoke run of a
minute or two; the full run takes about 20 minutes on 2 cores.

    python benchmarks/compress.py [--quick] [--vgg runs/fmnist_fast] [--resnet RUN] [--lenet RUN]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

METHODS = [
    "export",
    "int8",
    "int8:qdq",
    "int8:qoperator",
    "int8:reduce_range",
    "int8:u8u8",
    "int8:qdq,per_tensor",
    "int8:torchao",
    "bf16",
    "prune:0.5",
]
QUICK_METHODS = ["export", "int8", "int8:qdq", "int8:torchao", "bf16"]
ROUNDS, QUICK_ROUNDS = 7, 2
CALLS_B1, CALLS_B256 = 60, 4  # per form and round
QUICK_CALLS_B1, QUICK_CALLS_B256 = 20, 2
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")


# ---------------------------------------------------------------------------------------------------------------
# Timing


def measure(forms: dict[str, Callable[[int], Any]], rounds: int, calls_b1: int, calls_b256: int) -> dict[str, dict]:
    """Round-robin timing of ``forms`` (name -> fn(batch) that runs one prepared batch of 1 or 256)."""
    lat: dict[str, list[float]] = {k: [] for k in forms}
    big: dict[str, list[float]] = {k: [] for k in forms}
    for fn in forms.values():  # warm-up (and compilation) outside the timed rounds
        for _ in range(3):
            fn(1)
            fn(256)
    for _ in range(rounds):
        for name, fn in forms.items():
            for _ in range(calls_b1):
                t0 = time.perf_counter()
                fn(1)
                lat[name].append(time.perf_counter() - t0)
            for _ in range(calls_b256):
                t0 = time.perf_counter()
                fn(256)
                big[name].append(time.perf_counter() - t0)
    return {
        k: {
            "latency_ms_p50": float(np.percentile(lat[k], 50) * 1e3),
            "latency_ms_p99": float(np.percentile(lat[k], 99) * 1e3),
            "throughput_img_s": 256 / float(np.median(big[k])),
        }
        for k in forms
    }


def torch_form(model: torch.nn.Module, x: dict[int, torch.Tensor], channels_last: bool) -> Callable[[int], Any]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = {b: t.contiguous(memory_format=fmt) for b, t in x.items()}

    def run(b: int) -> Any:
        with torch.inference_mode():
            return model(inputs[b])

    return run


def compiled_form(model: torch.nn.Module, x: dict[int, torch.Tensor]) -> Callable[[int], Any]:
    import torch._inductor.config as inductor

    compiled = torch.compile(model, dynamic=False)
    inputs = {b: t.contiguous(memory_format=torch.channels_last) for b, t in x.items()}

    def run(b: int) -> Any:
        with torch.inference_mode(), inductor.patch(freezing=True):
            return compiled(inputs[b])

    return run


def ort_form(path: Path, x: dict[int, torch.Tensor], threads: int) -> Callable[[int], Any]:
    import onnxruntime as ort

    from pupil.compress.export import session_options

    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    inputs = {b: np.ascontiguousarray(t.numpy()) for b, t in x.items()}
    return lambda b: session.run(None, {"pixels": inputs[b]})


def baseline_forms(model, x: dict[int, torch.Tensor]) -> dict[str, Callable[[int], Any]]:
    """The fp32 PyTorch forms of ``model`` (a PixelModel without TTA) the baseline is the best of."""
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return {
        "eager": torch_form(model, x, False),
        "eager channels_last": torch_form(cl, x, True),
        "torch.compile": compiled_form(copy.deepcopy(cl), x),
    }


def artefact_forms(run, x: dict[int, torch.Tensor], threads: int) -> dict[str, Callable[[int], Any]]:
    """How a compressed run's artefact is timed: the file's own runtime, without pupil's wrapper or TTA."""
    c = run.info["compressed"]
    path = run.dir / c["artefact"]
    if c["format"] == "onnx":
        return {"onnxruntime": ort_form(path, x, threads)}
    net = run.model.net
    if c["format"] in ("pt2", "torchscript"):
        return {c["format"]: torch_form(net, x, False)}  # Compiled converts to channels-last itself
    model = copy.deepcopy(run.model)
    model.tta = False
    cl = model.to(memory_format=torch.channels_last)
    return {"eager channels_last": torch_form(cl, x, True), "torch.compile": compiled_form(copy.deepcopy(cl), x)}


def best(figures: dict[str, dict]) -> dict[str, Any]:
    lat = min(figures, key=lambda k: figures[k]["latency_ms_p50"])
    thr = max(figures, key=lambda k: figures[k]["throughput_img_s"])
    return {
        "latency_form": lat,
        "latency_ms_p50": figures[lat]["latency_ms_p50"],
        "latency_ms_p99": figures[lat]["latency_ms_p99"],
        "throughput_form": thr,
        "throughput_img_s": figures[thr]["throughput_img_s"],
        "forms": figures,
    }


# ---------------------------------------------------------------------------------------------------------------
# Runs


def train_run(model: str, work: Path, **overrides: Any) -> Path:
    import pupil

    name = f"{model}_bench"
    print(f"training {model} into {work / name} ({overrides})", flush=True)
    run = pupil.train(
        ROOT / "recipes" / "fmnist_fast.yaml", model=model, out=str(work), name=name, progress=False, **overrides
    )
    return run.dir


def top1(model, ds) -> float:
    from pupil.predict import predict_logits

    logits = predict_logits(model, ds, batch_size=1000)
    return (logits.argmax(1) == ds.targets).float().mean().item()


def available(method: str) -> str | None:
    """None when ``method`` can run here, else why not."""
    from pupil.compress.export import native_dtype

    if method == "int8:torchao" and importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    if method == "bf16" and (why := native_dtype("bf16", torch.device("cpu"))):
        return why
    if method.startswith("prune:"):
        spec = importlib.util.find_spec("pupil.compress.prune")
        if spec is None:
            return "pupil.compress.prune does not exist yet"
        from pupil.compress import prune

        if not hasattr(prune, "prune_run"):
            return "pupil.compress.prune has no prune_run"
        if importlib.util.find_spec("torch_pruning") is None:
            return "torch-pruning is not installed"
    return None


def bench_model(label: str, run_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from pupil.compress import compress_run
    from pupil.run import load_run

    base = load_run(run_dir)
    test = base.split("test")
    if args.quick:
        test = test.subset(torch.arange(min(2000, len(test))), "test")
    ref = base.model.eval()
    top1_base = top1(ref, test)
    plain = copy.deepcopy(ref)
    plain.tta = False
    images = test.images[:256].float() / 255
    x = {1: images[:1].clone(), 256: images.clone()}
    out: dict[str, Any] = {
        "run": str(run_dir),
        "model": base.info["model"]["name"],
        "params": base.info["model"]["params"],
        "tta": bool(base.info.get("tta")),
        "test_images": len(test),
        "top1_torch_fp32": top1_base,
        "baseline": {},
        "artefacts": {},
        "skipped": {},
    }
    runs = {}
    for method in args.methods:
        if why := available(method):
            out["skipped"][method] = why
            print(f"  {label} {method}: skipped ({why})", flush=True)
            continue
        t0 = time.perf_counter()
        dest = work / label / method.replace(":", "_").replace(",", "+")
        runs[method] = compress_run(
            run_dir, method, dest, overwrite=True, progress=False, max_minutes=args.prune_minutes
        )
        c = runs[method].info["compressed"]
        acc = top1(runs[method].model, test)
        out["artefacts"][method] = {
            "method": method,
            "format": c["format"],
            "precision": runs[method].info["runtime"]["precision"],
            "artefact": c["artefact"],
            "bytes": c["bytes"],
            "top1": acc,
            "top1_loss_pt": (top1_base - acc) * 100,
            "val_check": c["check"],
            "compress_s": round(time.perf_counter() - t0, 1),
            "fp32_layers": c.get("fp32_layers", []),
            "speed_vs_fp32_onnx_while_compressing": c.get("speed_vs_fp32_onnx"),
            "threads": {},
        }
        print(f"  {label} {method}: top-1 {acc:.4f} ({(acc - top1_base) * 100:+.2f} pt)", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        forms = {f"torch fp32 {k}": f for k, f in baseline_forms(plain, x).items()}
        for method, run in runs.items():
            forms |= {f"{method} | {k}": f for k, f in artefact_forms(run, x, threads).items()}
        figures = measure(forms, args.rounds, args.calls_b1, args.calls_b256)
        base_fig = best({k.removeprefix("torch fp32 "): v for k, v in figures.items() if k.startswith("torch fp32")})
        out["baseline"][str(threads)] = base_fig
        for method in runs:
            mine = best({k.split(" | ", 1)[1]: v for k, v in figures.items() if k.startswith(f"{method} | ")})
            mine["throughput_speedup"] = mine["throughput_img_s"] / base_fig["throughput_img_s"]
            mine["latency_speedup"] = base_fig["latency_ms_p50"] / mine["latency_ms_p50"]
            out["artefacts"][method]["threads"][str(threads)] = mine
        print(
            f"  {label} at {threads} thread(s): torch fp32 {base_fig['throughput_img_s']:.0f} img/s, "
            f"{base_fig['latency_ms_p50']:.3f} ms; "
            + ", ".join(
                f"{m} {out['artefacts'][m]['threads'][str(threads)]['throughput_speedup']:.2f}x/"
                f"{out['artefacts'][m]['threads'][str(threads)]['latency_speedup']:.2f}x"
                for m in runs
            ),
            flush=True,
        )
    top = str(max(args.threads))
    for a in out["artefacts"].values():
        a["speedup_vs_torch_fp32"] = a["threads"][top]["throughput_speedup"]
        a["latency_speedup_vs_torch_fp32"] = a["threads"][top]["latency_speedup"]
    out["int8_vs_onnx_fp32"] = int8_vs_fp32(out, top)
    out["best_int8"] = best_int8(out)
    return out


def best_int8(model: dict[str, Any]) -> dict[str, Any] | None:
    """The int8 artefact with the best geometric mean of its two speed-ups over the PyTorch baseline (batch-256
    throughput, batch-1 latency): the rule that picks what plain ``int8`` means."""
    from pupil.compress.quantize import DEFAULT

    scores = {
        m: math.sqrt(a["speedup_vs_torch_fp32"] * a["latency_speedup_vs_torch_fp32"])
        for m, a in model["artefacts"].items()
        if m.startswith("int8")
    }
    if not scores:
        return None
    winner = max(scores, key=scores.get)
    return {"method": winner, "geomean_speedup": scores, "default_options": list(DEFAULT)}


def int8_vs_fp32(model: dict[str, Any], threads: str) -> dict[str, Any]:
    """Each ONNX Runtime int8 variant against the fp32 ONNX export: speed ratios and their geometric mean."""
    arts = model["artefacts"]
    if "export" not in arts:
        return {}
    fp = arts["export"]["threads"][threads]
    rows = {}
    for m, a in arts.items():
        if not m.startswith("int8") or a["format"] != "onnx":
            continue
        t = a["threads"][threads]
        thr, lat = t["throughput_img_s"] / fp["throughput_img_s"], fp["latency_ms_p50"] / t["latency_ms_p50"]
        rows[m] = {"throughput_ratio": thr, "latency_ratio": lat, "geomean": math.sqrt(thr * lat)}
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def render(data: dict[str, Any]) -> str:
    """The README's Compression table: one block per model, one row per artefact, from compress.json."""
    m = data["machine"]
    top = str(max(data["settings"]["threads"]))
    lines = [
        f"{'Smoke run (`--quick`): ' if data['quick'] else ''}each artefact against the fastest fp32 PyTorch form of "
        f"the same model measured in the same invocation ({m['cpu']}, {m['cores']} cores, flags "
        f"{', '.join(m['flags']) or 'none'}; torch {m['torch']}, onnxruntime {m['onnxruntime']}"
        f"{', torchao ' + m['torchao'] if m.get('torchao') else ''}; load average {data['load_avg_1min']['start']:.1f} "
        f"before and {data['load_avg_1min']['end']:.1f} after: a busy machine blurs these figures). Speed is the "
        "network without TTA; top-1 is on the test split as deployed (flip TTA where the run uses it). Speed-ups are "
        f"at {top} thread(s): batch-256 throughput and batch-1 p50 latency against the PyTorch baseline.",
    ]
    for label, r in data["models"].items():
        b = r["baseline"][top]
        lines += [
            "",
            f"**{label}** (`{r['run']}`, {r['params'] / 1e3:.0f} k parameters, {r['test_images']:,} test images): "
            f"PyTorch fp32 baseline {b['throughput_img_s']:,.0f} img/s ({b['throughput_form']}), "
            f"{b['latency_ms_p50']:.3f} ms p50 / {b['latency_ms_p99']:.3f} ms p99 ({b['latency_form']}), "
            f"top-1 {r['top1_torch_fp32'] * 100:.2f}%.",
            "",
            "| method | artefact | size | top-1 (Δ pt) | b=1 p50 / p99 | b=256 img/s | speed-up b=256 | speed-up b=1 "
            "| 1 thread: b=256, b=1 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for method, a in r["artefacts"].items():
            t, one = a["threads"][top], a["threads"].get("1")
            single = f"{one['throughput_speedup']:.2f}×, {one['latency_speedup']:.2f}×" if one else "—"
            lines.append(
                f"| `{method}` | {a['artefact']} ({a['precision']}) | {a['bytes'] / 1024:.0f} KiB "
                f"| {a['top1'] * 100:.2f}% ({-a['top1_loss_pt']:+.2f}) "
                f"| {t['latency_ms_p50']:.3f} / {t['latency_ms_p99']:.3f} ms | {t['throughput_img_s']:,.0f} "
                f"| **{a['speedup_vs_torch_fp32']:.2f}×** | {a['latency_speedup_vs_torch_fp32']:.2f}× | {single} |"
            )
        if r.get("skipped"):
            lines += ["", "Not measured: " + "; ".join(f"`{k}` ({v})" for k, v in r["skipped"].items()) + "."]
        if b8 := r.get("best_int8"):
            lines += [
                "",
                f"Best int8 by the geometric mean of both speed-ups: `{b8['method']}` "
                + "("
                + ", ".join(f"`{k}` {v:.2f}×" for k, v in b8["geomean_speedup"].items())
                + f"); plain `int8` means `int8:{','.join(b8['default_options'])}`.",
            ]
        if rows := r.get("int8_vs_onnx_fp32"):
            worse = [k for k, v in rows.items() if v["throughput_ratio"] < 1]
            lines += [
                "",
                "ONNX Runtime int8 against ONNX Runtime fp32 (throughput b=256 / latency b=1): "
                + ", ".join(f"`{k}` {v['throughput_ratio']:.2f}× / {v['latency_ratio']:.2f}×" for k, v in rows.items())
                + (f"; slower than fp32 at batch 256: {', '.join(f'`{k}`' for k in worse)}." if worse else "."),
            ]
    return "\n".join(lines)


readme_table = render  # the name benchmarks/update_readme.py looks up beside a benchmark


# ---------------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import onnxruntime

    from pupil.compress.export import cpu_flags

    flags = cpu_flags()
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    spec = importlib.util.find_spec("torchao")
    torchao = None
    if spec is not None:
        from importlib.metadata import version

        torchao = version("torchao")
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "flags": [f for f in FLAGS if f in flags],
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torchao": torchao,
        "python": platform.python_version(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="vgg_small only, fewer methods and calls (1-2 minutes)")
    ap.add_argument("--vgg", type=Path, default=ROOT / "runs" / "fmnist_fast", help="the vgg_small run")
    ap.add_argument("--resnet", type=Path, help="a resnet20 run (default: train one here)")
    ap.add_argument("--lenet", type=Path, help="a lenet5 run (default: train one here for one epoch)")
    ap.add_argument("--resnet-minutes", type=float, default=4.0, help="training budget of the resnet20 run")
    ap.add_argument("--prune-minutes", type=float, default=3.0, help="prune:0.5's fine-tune budget")
    ap.add_argument("--methods", help="space-separated methods, e.g. 'export int8:qdq,per_tensor' (default: all)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compress.json")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (compressed runs, trained runs)")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    args.methods = args.methods.split() if args.methods else (QUICK_METHODS if args.quick else METHODS)
    args.rounds = QUICK_ROUNDS if args.quick else ROUNDS
    args.calls_b1 = QUICK_CALLS_B1 if args.quick else CALLS_B1
    args.calls_b256 = QUICK_CALLS_B256 if args.quick else CALLS_B256
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="pupil_compress_bench_"))
    try:
        runs = {"vgg_small": args.vgg}
        if not args.quick:
            runs["resnet20"] = args.resnet or train_run("resnet20", work, max_minutes=args.resnet_minutes, epochs=30)
            runs["lenet5"] = args.lenet or train_run("lenet5", work, epochs=1)
        models = {}
        for label, run_dir in runs.items():
            print(f"{label}: {run_dir}", flush=True)
            models[label] = bench_model(label, Path(run_dir), work, args)
        report = {
            "benchmark": "compress",
            "quick": args.quick,
            "machine": machine(),
            "settings": {
                "threads": args.threads,
                "rounds": args.rounds,
                "calls_b1_per_round": args.calls_b1,
                "calls_b256_per_round": args.calls_b256,
                "methods": args.methods,
                "prune_minutes": args.prune_minutes,
            },
            "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0]},
            "wall_s": round(time.perf_counter() - t_start, 1),
            "models": models,
        }
        from pupil.io import write_json

        write_json(args.out, report)
        print(render(report))
        print(f"wrote {args.out} in {report['wall_s']:.0f} s")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
