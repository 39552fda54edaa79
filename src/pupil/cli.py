"""The ``pupil`` command line: a thin layer over the Python API.

Every error the user can fix is a PupilError, printed as one line on stderr with exit status 2;
Ctrl-C during training saves the resume state and exits with 130.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pupil.errors import Interrupted, PupilError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")
index_app = typer.Typer(no_args_is_help=True, help="Build and change visual-search indexes (faiss).")
app.add_typer(index_app, name="index")
console = Console(soft_wrap=True)  # long lines stay whole when piped (no hard wrap at 80 columns)

DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]

# How a model pupil did not train is opened (pupil audit and pupil serve take the same flags; pupil.sources).
WeightsOpt = Annotated[
    Path | None, typer.Option(help="timm:/torchvision:/py: weights: .safetensors or a .pth/.pt state dict.")
]
PretrainedOpt = Annotated[bool, typer.Option(help="timm:/torchvision: the published weights (network).")]
ImgSizeOpt = Annotated[int | None, typer.Option(help="The model's input side in pixels.")]
ResizeOpt = Annotated[int | None, typer.Option(help="Resize the shorter side to this before the crop.")]
CropOpt = Annotated[int | None, typer.Option(help="Centre crop side (default: --img-size).")]
InterpolationOpt = Annotated[str | None, typer.Option(help="nearest, bilinear or bicubic.")]
MeanOpt = Annotated[str | None, typer.Option(help="Per-channel mean the model subtracts, e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[str | None, typer.Option(help="Per-channel std the model divides by.")]
InputRangeOpt = Annotated[
    str | None, typer.Option(help="0-1 or 0-255: the pixel range the model takes (mean/std in its units).")
]
ClassesOpt = Annotated[Path | None, typer.Option(help="The model's class names, one per line, in output order.")]
DataDirOpt = Annotated[
    str | None,
    typer.Option(
        help="Use this data on purpose instead of what run.json records (checked by fingerprint): a registered "
        "dataset's folder of files, or the image folder or CSV manifest itself."
    ),
]


@app.command("eval")
def eval_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 1024,
    data_dir: DataDirOpt = None,
) -> None:
    """Evaluate a run on a split: top-1, top-5 and loss, printed and written to <run>/eval_<split>.json."""
    from pupil.io import write_json
    from pupil.predict import evaluate
    from pupil.run import load_run
    from pupil.runtime import resolve_device, resolve_precision, setup_threads

    dev = resolve_device(device)
    threads = setup_threads(0)
    r = load_run(run, device=dev)
    d, cfg = r.info["data"], r.info["config"]
    ds = r.split(split, data_dir)
    dtype = resolve_precision(cfg["train"]["precision"], dev)
    metrics = evaluate(
        r.model, ds, batch_size=batch_size, device=dev, dtype=dtype, channels_last=r.info["runtime"]["channels_last"]
    )
    out = {"run": str(run), "split": split, "tta": r.model.tta, "device": str(dev), "threads": threads, **metrics}
    path = write_json(Path(run) / f"eval_{split}.json", out)
    table = Table(title=f"{run} on {d['dataset']} {split} ({metrics['n']} images{', flip TTA' if r.model.tta else ''})")
    for k in metrics:
        table.add_column(k, justify="right")
    table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in metrics.values()])
    console.print(table)
    console.print(f"wrote {path}")


@app.command("predict")
def predict_cmd(
    run: Annotated[
        str, typer.Argument(help="Run directory, or efficientnet_lite0.imagenet (weights shipped offline).")
    ],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    top: Annotated[int, typer.Option(help="How many labels to print per image.")] = 5,
    defer_below: Annotated[
        str | None,
        typer.Option(
            help="Defer to a human below this confidence; 'auto': the threshold the uncertainty audit fitted."
        ),
    ] = None,
    ood_score: Annotated[
        str, typer.Option(help="OOD score for --ood-below: msp, max_logit, energy or odin.")
    ] = "energy",
    ood_below: Annotated[
        float | None, typer.Option(help="Defer when the OOD score is below this (higher = more in-distribution).")
    ] = None,
    conformal: Annotated[
        float | None,
        typer.Option(
            help="Print the conformal prediction set that holds the true class with this probability (e.g. 0.95), "
            "calibrated by the audit's conformal check."
        ),
    ] = None,
    conformal_score: Annotated[
        str | None, typer.Option(help="thr, aps or raps (default: the score the audit found smallest sets with).")
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Top-k labels with probabilities for image files, resized and converted to the run's input.

    With --defer-below or --ood-below an image the model should not decide alone is reported as deferred.
    With --conformal LEVEL each image also gets its prediction set: the labels that, over images like the
    validation split's, contain the true one with probability LEVEL.
    """
    import torch

    from pupil.data.images import read_images
    from pupil.models.pretrained import PRETRAINED
    from pupil.run import load_run
    from pupil.runtime import resolve_device

    dev = resolve_device(device)
    if run in PRETRAINED:
        model, classes, h = PRETRAINED[run]()
        model, c = model.to(dev), 3
    else:
        r = load_run(run, device=dev)
        model, classes = r.model, r.classes
        c, h, _ = r.info["data"]["input_shape"]
    if top < 1:
        raise PupilError(f"--top must be at least 1, not {top}")
    threshold = _deferral_threshold(run, defer_below)
    if conformal is not None and run in PRETRAINED:
        raise PupilError("--conformal needs a run audited with the conformal check, not shipped weights")
    if conformal is not None and not 0 < conformal < 1:
        raise PupilError(f"--conformal takes a coverage between 0 and 1 (e.g. 0.95), not {conformal:g}")
    pixels = read_images(images, img_size=h, mode="L" if c == 1 else "RGB").images
    x = pixels.float().div(255).to(dev)
    with torch.inference_mode():
        logits = model(x).float().cpu()
    probs = logits.softmax(1)
    sets = None
    if conformal is not None:
        from pupil.conformal import sets_for_run

        keys = [img.numpy().tobytes() for img in pixels]  # an image's randomized set depends on it alone
        sets, used = sets_for_run(run, logits, conformal, conformal_score, keys)
    ood = None
    if ood_below is not None:
        from pupil.ood import score_images

        ood = score_images(model, x, ood_score).cpu()
    k = min(top, probs.shape[1])
    for j, (path, p) in enumerate(zip(images, probs)):
        values, idx = p.topk(k)
        reasons = []
        if threshold is not None and values[0] < threshold:
            reasons.append(f"confidence {values[0]:.2%} < {threshold:.2%}")
        if ood is not None and ood[j] < ood_below:
            reasons.append(f"{ood_score} score {ood[j]:.4g} < {ood_below:g} (looks out of distribution)")
        console.print(f"[bold]{path}[/]" + (f": [bold yellow]deferred[/] ({'; '.join(reasons)})" if reasons else ""))
        for v, i in zip(values.tolist(), idx.tolist()):
            console.print(f"  {classes[i]:<24s} {v:7.2%}")
        if sets is not None:
            labels = ", ".join(classes[i] for i in sets[j]) or "(empty: no label reaches the threshold)"
            console.print(f"  {used['level']:.0%} prediction set ({len(sets[j])}): {labels}", markup=False)
    if sets is not None:
        console.print(
            f"conformal: {used['score'].upper()} score, threshold {used['threshold']:.4g}, calibrated on "
            f"{used['n_calibration']:,} validation images" + (", randomized" if used.get("randomized") else ""),
            markup=False,
        )


def _deferral_threshold(run: str, value: str | None) -> float | None:
    """--defer-below as a confidence in (0, 1), or 'auto': the softmax threshold the uncertainty audit fitted."""
    if value is None:
        return None
    if value == "auto":
        from pupil.results import consumed, load_results

        if not (Path(run) / "results.json").exists():
            raise PupilError(f"--defer-below auto needs an audit: run pupil audit {run}")
        soft = consumed(load_results(run), "predict", "uncertainty")
        if soft is None:
            raise PupilError(f"--defer-below auto: {run}/results.json has no uncertainty section")
        if soft["deferral_threshold"] is None:
            raise PupilError(
                f"the audit found no confidence threshold that reaches {soft['target_accuracy']:.0%} accuracy"
            )
        return float(soft["deferral_threshold"])
    try:
        t = float(value)
    except ValueError:
        raise PupilError(f"--defer-below takes a confidence between 0 and 1 or 'auto', not {value!r}") from None
    if not 0 < t <= 1:
        raise PupilError(f"--defer-below takes a confidence between 0 and 1, not {t}")
    return t


@app.command("serve")
def serve_cmd(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="What to serve, each under its name: run directories, audit folders (audits/NAME from pupil audit "
            "MODEL --data D, served with the audit's rules), or model sources (timm:NAME, torchvision:NAME, onnx:FILE, "
            "torchscript:FILE, export:FILE, py:pkg.mod:factory), served unaudited.",
            show_default=False,
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps the service on this machine.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most images in one forward pass (dynamic batching).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Longest a request waits for others to share its batch.")] = 5.0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body; larger ones get 413.")] = 8.0,
    max_images: Annotated[int, typer.Option(help="Most images in one request.")] = 16,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File holding the API key requests must send (X-API-Key or Bearer).")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="Seconds before a request gets 504.")] = 10.0,
    threads: Annotated[int, typer.Option(help="Torch threads per batch (0: cores - 1, shared by the batches).")] = 0,
    in_flight: Annotated[
        int,
        typer.Option(
            help="Batches of one model run at once (0: two on two cores or more when every forward pass releases "
            "the interpreter lock once (a frozen graph, ONNX Runtime), else one)."
        ),
    ] = 0,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    index: Annotated[
        list[str] | None,
        typer.Option(
            "--index",
            help="A search index (pupil index build) as PATH or NAME=PATH, kept fresh as pupil index add/remove "
            "change it; the page shows each upload's nearest catalogue images. Repeat for more.",
        ),
    ] = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    classes: ClassesOpt = None,
    img_size: ImgSizeOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    input_range: InputRangeOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Serve runs, audited models or model sources over HTTP with a web page: predictions with calibrated
    probabilities, OOD flags, deferral, conformal sets and explanations, the nearest catalogue images of search
    indexes; /healthz, /readyz and Prometheus /metrics. Ctrl-C finishes the requests in flight, then stops.
    --weights, --pretrained, --classes and the preprocessing flags describe a model source, served on its own."""
    from pupil.serve import serve_command_main

    source = {
        "weights": weights,
        "pretrained": pretrained,
        "classes": classes,
        "preprocess": {
            "img_size": img_size,
            "resize": resize,
            "crop": crop,
            "interpolation": interpolation,
            "mean": mean,
            "std": std,
            "input_range": input_range,
        },
    }

    serve_command_main(
        runs,
        host=host,
        port=port,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_mb=max_upload_mb,
        api_key_file=api_key_file,
        device=device,
        timeout_s=timeout_s,
        max_images=max_images,
        threads=threads,
        in_flight=in_flight,
        access_log=access_log,
        indexes=index or [],
        source=source,
        log=lambda line: console.print(line, markup=False),
    )


@app.command("explain")
def explain_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    image: Annotated[Path, typer.Argument(help="Image file, converted and resized to the run's input.")],
    method: Annotated[
        str, typer.Option(help="gradcam, gradcam++, integrated_gradients, occlusion, lime or kernel_shap.")
    ] = "gradcam",
    target: Annotated[str | None, typer.Option(help="Class name or index to explain (default: predicted).")] = None,
    out: Annotated[Path | None, typer.Option(help="Overlay PNG to write (default: <image>_<method>.png).")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Explain one prediction: write the image with the method's saliency map overlaid as a PNG."""
    from pupil.data.images import read_images
    from pupil.explain import explain_image, overlay_png
    from pupil.explain import method as check_method
    from pupil.run import load_run
    from pupil.runtime import resolve_device

    check_method(method)  # an unknown method fails before the model loads
    r = load_run(run, device=resolve_device(device))
    c, h, _ = r.info["data"]["input_shape"]
    x = read_images([image], img_size=h, mode="L" if c == 1 else "RGB").images
    cls = None
    if target is not None:
        if target in r.classes:
            cls = r.classes.index(target)
        elif target.isdigit() and int(target) < len(r.classes):
            cls = int(target)
        else:
            raise PupilError(f"unknown class {target!r}; the run's classes are {', '.join(r.classes)}")
    sal, pred, prob = explain_image(r.model, x[0], method, target=cls)
    out = _new_output(out, image.with_name(f"{image.stem}_{method.replace('+', 'pp')}.png"))
    overlay_png(x[0], sal, out)
    explained = r.classes[cls if cls is not None else pred]
    console.print(f"predicted {r.classes[pred]} ({prob:.2%}); {method} map for {explained} written to {out}")


@app.command("models")
def models_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset whose input shape and classes are used for FLOPs.")] = "",
    in_chans: Annotated[int, typer.Option(help="Input channels (when no dataset is given).")] = 1,
    img_size: Annotated[int, typer.Option(help="Input side (when no dataset is given).")] = 28,
    num_classes: Annotated[int, typer.Option(help="Classes (when no dataset is given).")] = 10,
    family: Annotated[str, typer.Option(help="Only this family.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List registered models: family, paper and year, parameters and FLOPs at the dataset's resolution."""
    from pupil.models import MODELS, create
    from pupil.models.stats import count_flops

    if dataset:
        from pupil.data import load

        ds = load(dataset, "test")
        (in_chans, img_size, _), num_classes = ds.shape, len(ds.classes)
    rows = []
    for e in sorted(MODELS, key=lambda e: (e.meta["year"], e.meta["family"], e.meta.get("test", False))):
        if family and e.meta["family"].lower() != family.lower():
            continue
        net = create(e.name, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        rows.append(
            {
                "name": e.name,
                "family": e.meta["family"],
                "paper": e.meta["paper"],
                "year": e.meta["year"],
                "params": sum(p.numel() for p in net.parameters()),
                "flops": count_flops(net, (1, in_chans, img_size, img_size)),
                "test": e.meta.get("test", False),
            }
        )
    if family and not rows:
        raise PupilError(f"no family {family!r}")
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(
        title=f"pupil models at {in_chans}x{img_size}x{img_size}, {num_classes} classes (timm:<name> also works)"
    )
    for col in ("name", "family", "paper", "year", "params", "FLOPs"):
        table.add_column(col, justify="right" if col in ("year", "params", "FLOPs") else "left")
    for r in rows:
        name = r["name"] + (" (test size)" if r["test"] else "")
        table.add_row(name, r["family"], r["paper"], str(r["year"]), _si(r["params"]), _si(r["flops"]))
    console.print(table)


@data_app.command("show")
def data_show(
    name: Annotated[str, typer.Argument(help="Dataset name, image folder or CSV manifest.")],
    split: Annotated[str, typer.Option(help="train, test or all.")] = "train",
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: <name>_<split>.png).")] = None,
    per_class: Annotated[int, typer.Option(help="Samples per class in the grid.")] = 8,
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset's files.")] = None,
    seed: Annotated[int, typer.Option(help="Which samples are drawn.")] = 0,
    on_bad_image: Annotated[
        str, typer.Option(help="fail: list every unusable image and stop; skip: list them and go on.")
    ] = "fail",
    min_per_class: Annotated[int, typer.Option(min=1, help="Refuse classes with fewer images than this.")] = 2,
) -> None:
    """Print a dataset's class counts and write a PNG grid of samples, one row per class."""
    from pupil.data import load
    from pupil.data.show import sample_grid

    out = _new_output(out, Path(f"{Path(name).stem.replace('/', '_')}_{split}.png"))
    ds = load(name, split, data_dir=data_dir, on_bad_image=on_bad_image, min_per_class=min_per_class)
    table = Table(title=f"{name} {split}: {len(ds)} images of {'x'.join(map(str, ds.shape))}")
    table.add_column("class")
    table.add_column("images", justify="right")
    for cls, n in ds.class_counts().items():
        table.add_row(cls, str(n))
    console.print(table)
    if conv := {k: v for k, v in ds.meta.get("conversions", {}).items() if v}:
        console.print("converted on load: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in conv.items()))
    if ds.meta.get("classes_inferred"):
        console.print(f"classes inferred from {ds.meta['classes_from']}")
    for b in ds.meta.get("bad_images", []):
        console.print(f"skipped {b['path']}: {b['reason']}", markup=False)
    if n := ds.meta.get("ignored_files"):
        console.print(f"ignored {n} file(s) without an image suffix")
    if n := ds.meta.get("duplicate_rows"):
        console.print(f"counted {n} duplicate manifest row(s) once")
    sample_grid(ds, out, per_class=per_class, seed=seed)
    console.print(f"wrote {out}")


@data_app.command("corrupt")
def data_corrupt(
    name: Annotated[str, typer.Argument(help="Dataset name, image folder or CSV manifest.")],
    out: Annotated[Path, typer.Option(help="Folder for the tree <corruption>/<severity>/<class>/<index>.png.")],
    split: Annotated[str, typer.Option(help="train, test or all.")] = "test",
    corruptions: Annotated[str, typer.Option(help="Comma-separated corruption names, or all.")] = "all",
    severities: Annotated[str, typer.Option(help="Comma-separated severities 1-5.")] = "1,2,3,4,5",
    n: Annotated[int, typer.Option(help="Only the first N images (0: all).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the random corruptions.")] = 0,
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset's files.")] = None,
) -> None:
    """Write an ImageNet-C style copy of a dataset: every corruption at every severity (resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pupil.data import load
    from pupil.data.corruptions import parse_names, parse_severities, write_corrupted_tree

    names, levels = parse_names(corruptions), parse_severities(severities)
    ds = load(name, split, data_dir=data_dir)
    if n:
        ds = ds.subset(list(range(min(n, len(ds)))))
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*cols, console=console) as bar:
        task = bar.add_task(f"corrupt {len(ds):,} images", total=len(names) * len(levels))
        root = write_corrupted_tree(
            ds, out, names, levels, seed=seed, on_done=lambda c, s: bar.update(task, advance=1, description=f"{c} {s}")
        )
    console.print(f"wrote {len(names)} corruptions x {len(levels)} severities of {len(ds):,} images under {root}")


@app.command("audit")
def audit_cmd(
    model: Annotated[
        str,
        typer.Argument(
            help="A run directory, or a model pupil did not train: timm:NAME, torchvision:NAME, onnx:FILE, "
            "torchscript:FILE, export:FILE or py:package.module:factory.",
            show_default=False,
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(help="Dataset name, image folder or CSV manifest (a run's own data by default)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the results of a model pupil did not train (audits/NAME).")
    ] = None,
    checks: Annotated[str, typer.Option(help="Comma-separated check names (default: all).")] = "",
    budget: Annotated[str, typer.Option(help="quick (minutes) or full.")] = "quick",
    device: DeviceOpt = "auto",
    precision: Annotated[
        str, typer.Option(help="fp32 (the model as given), bf16, or auto (bf16 where the device is fast at it).")
    ] = "fp32",
    seed: Annotated[int, typer.Option(help="Seed for bootstrap and sampling.")] = 0,
    setting: Annotated[
        list[str] | None, typer.Option("--set", help="check.field=value, e.g. energy.country=FRA.")
    ] = None,
    thresholds: Annotated[Path | None, typer.Option(help="YAML of grade limits for the summary card.")] = None,
    data_dir: DataDirOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    img_size: ImgSizeOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    input_range: InputRangeOpt = None,
    classes: ClassesOpt = None,
    class_map: Annotated[
        str | None, typer.Option(help="auto (by name or WordNet id) or a CSV of data_class,model_class.")
    ] = None,
    val_size: Annotated[
        float, typer.Option(help="Validation images held out of the data (count or fraction) for fitted thresholds.")
    ] = 0.1,
    on_bad_image: Annotated[str, typer.Option(help="fail or skip (and count) images that cannot be read.")] = "fail",
    max_memory: Annotated[
        str | None,
        typer.Option(help="Decoded size a split may take in memory (e.g. 4GB); larger data streams from its files."),
    ] = None,
    ood: Annotated[
        str | None, typer.Option(help="Extra OOD sets (ood check): dataset names, folders or CSVs, comma-separated.")
    ] = None,
    groups: Annotated[str | None, typer.Option(help="Manifest column the fairness check groups by.")] = None,
    members: Annotated[
        str | None, typer.Option(help="Other run directories that form a deep ensemble with RUN (uncertainty check).")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Baseline run (audited with the corruption check) for mCE and relative mCE.")
    ] = None,
    gate: Annotated[
        Path | None,
        typer.Option(
            help="YAML of release rules (e.g. calibration.ece <= 0.03) to judge the audit by; exit 1 on a fail."
        ),
    ] = None,
) -> None:
    """Audit a model on data: write results.json, then render report.html and model_card.md from it."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from pupil.api import audit, is_run_dir
    from pupil.runtime import setup_threads

    setup_threads(0)
    names = [c.strip() for c in checks.split(",") if c.strip()] or None
    settings = _parse_settings(setting or [])
    shortcuts = audit_shortcuts()  # declared by the checks: flag -> (check, setting)
    given = {"ood": ood, "groups": groups, "members": members, "baseline": baseline}
    for flag, value in given.items():
        if value is None:
            continue
        check, field = shortcuts[flag]
        if names is not None and check not in names:
            raise PupilError(f"--{flag} is a setting of the {check} check, which --checks leaves out")
        settings.setdefault(check, {})[field] = value
    if data is not None and data_dir is not None:
        raise PupilError("give --data or --data-dir, not both")
    preprocess = {
        "img_size": img_size,
        "resize": resize,
        "crop": crop,
        "interpolation": interpolation,
        "mean": mean,
        "std": std,
        "input_range": input_range,
    }
    if not is_run_dir(model) and data_dir is not None:
        raise PupilError("--data-dir points a run at its moved data; give a model pupil did not train --data")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        tasks = {}

        def on_check(name: str, event: str) -> None:
            if event == "start":
                tasks[name] = bar.add_task(f"audit: {name}", total=1)
            else:
                bar.update(tasks[name], completed=1, description=f"audit: {name} done")

        results = audit(
            model,
            data if data is not None else data_dir,
            names,
            budget,
            out,
            preprocess,
            weights=weights,
            pretrained=pretrained,
            classes=classes,
            class_map=class_map,
            val_size=int(val_size) if val_size >= 1 and val_size == int(val_size) else val_size,
            device=device,
            seed=seed,
            settings=settings,
            precision=precision,
            thresholds=thresholds,
            on_bad_image=on_bad_image,
            max_memory=max_memory,
            on_check=on_check,
            gate=gate,
        )
    _print_card(results)
    for note in results["audit"].get("notes", []):
        console.print(f"note: {note}", markup=False)
    folder = Path(results["run"]["dir"])
    console.print(
        f"results: {folder / 'results.json'}\nreport: {folder / 'report.html'}\nmodel card: {folder / 'model_card.md'}"
    )
    if "gate" in results:
        _print_gate(results["gate"])
        if not results["gate"]["passed"]:
            raise typer.Exit(1)


@app.command("report")
def report_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory holding results.json.")],
    thresholds: Annotated[Path | None, typer.Option(help="YAML of grade limits for the summary card.")] = None,
) -> None:
    """Re-render report.html and model_card.md from results.json alone."""
    from pupil.report.render import render_run
    from pupil.run import read_info, run_lock

    read_info(run)
    with run_lock(run, "rendering the report of"):
        html, card = render_run(run, thresholds)
    console.print(f"report: {html}\nmodel card: {card}")


@app.command("compare")
def compare_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories or results.json files.")],
    out: Annotated[Path, typer.Option(help="Folder for compare.html and leaderboard.json.")] = Path("compare"),
    gate: Annotated[
        Path | None,
        typer.Option(help="YAML of release rules judged on NEW against BASE (two runs: BASE NEW); exit 1 on a fail."),
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates of the paired tests (two runs).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the paired tests' bootstrap.")] = 0,
    changes: Annotated[
        bool | None,
        typer.Option(
            "--changes/--no-changes",
            help="What changed in each later run against the first: every figure of the card with a paired "
            "interval, and the images whose prediction changed (default: when a later run is compressed).",
        ),
    ] = None,
) -> None:
    """Leaderboard and Pareto plots over many runs' results.json; mismatched audit settings are flagged.

    With two runs, BASE NEW, also paired tests on the same test images (McNemar for top-1, paired bootstrap for
    macro-F1, ECE, corruption accuracy and OOD AUROC, Holm-corrected), and with --gate the release rules.
    """
    from pupil.report.compare import compare
    from pupil.report.render import fmt

    if bootstrap < 100:
        raise PupilError(f"--bootstrap must be at least 100, not {bootstrap}")
    board = compare(runs, out, gate=gate, n_bootstrap=bootstrap, seed=seed, changes=changes)
    table = Table(title=f"leaderboard ({len(board['runs'])} runs)")
    for col in ("run", "model", "top-1", "macro-F1", "ECE", "latency p50 ms", "FLOPs", "Pareto (latency)"):
        table.add_column(col)
    for r in board["runs"]:
        table.add_row(
            r["name"],
            r["model"],
            fmt(r["top1"], "fraction"),
            fmt(r["macro_f1"]),
            fmt(r["ece"]),
            fmt(r["latency_ms"]),
            _si(r["flops"] or 0),
            "yes" if r.get("pareto_latency_ms") else "",
        )
    console.print(table)
    for k, v in board["mismatched_settings"].items():
        console.print(f"[bold red]warning[/]: runs differ in {k}: {', '.join(v)}")
    if "paired" in board:
        _print_paired(board["paired"])
    elif "paired_refused" in board:
        console.print(f"no paired tests: {board['paired_refused']}", markup=False)
    if "changes" in board:
        from pupil.report.changes import print_changes

        print_changes(board["changes"], console)
    console.print(f"wrote {out / 'compare.html'} and {out / 'leaderboard.json'}")
    if "gate" in board:
        _print_gate(board["gate"])
        if not board["gate"]["passed"]:
            raise typer.Exit(1)


@app.command("compress")
def compress_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory to compress (the base).")],
    out: Annotated[Path, typer.Option(help="Run directory to write; it appears whole or not at all.")],
    method: Annotated[
        str | None,
        typer.Option(
            help="int8 (ONNX Runtime static, calibrated on the validation split; int8:OPTION,... for a variant: "
            "qdq, qoperator, reduce_range, u8u8, keep_ends, per_tensor, dynamic, torchao), prune:RATIO (FLOPs "
            "removed, then a fine-tune), distill:STUDENT (a registered model trained on the run's outputs), bf16, "
            "fp16, or export (no compression; the default with --format)."
        ),
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="onnx, torchscript, pt2 or safetensors (default: per method).")
    ] = None,
    calib_size: Annotated[int, typer.Option(help="Validation images int8 calibrates on.")] = 512,
    max_minutes: Annotated[float, typer.Option(help="Fine-tune budget of prune:, training budget of distill:.")] = 5.0,
    threads: Annotated[int, typer.Option(help="CPU threads (0: all).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run at --out (pupil's files only).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    device: DeviceOpt = "cpu",
) -> None:
    """Compress or export a run into a run directory of its own, so that pupil audit and pupil compare treat the
    deployed artefact like any run (pupil compare BASE OUT shows what compression changed)."""
    from pupil.runtime import setup_threads

    if method is None and format is None:
        raise PupilError("give --method (int8, prune:RATIO, distill:STUDENT, bf16, fp16) or --format to export")
    method = method or "export"
    if threads < 0:
        raise PupilError(f"--threads must be 0 (all) or more, not {threads}")
    setup_threads(threads)
    if method.startswith("distill:") or method == "distill":
        from pupil.compress.distill import distill_run

        student = method.partition(":")[2]
        if not student:
            raise PupilError("distill needs a student: --method distill:STUDENT, e.g. distill:lenet5")
        if format is not None:
            raise PupilError("distill: writes a trained run (model.safetensors); compress it afterwards to export it")
        done = distill_run(run, student, out, max_minutes=max_minutes, overwrite=overwrite, progress=progress)
        console.print(f"wrote {done}: {student} distilled from {run}; audit it with pupil audit {done}", markup=False)
        return
    from pupil.compress import compress_run

    result = compress_run(
        run,
        method,
        out,
        fmt=format,
        calib_size=calib_size,
        device=device,
        overwrite=overwrite,
        max_minutes=max_minutes,
        progress=progress,
    )
    comp = result.info["compressed"]
    console.print(
        f"wrote {out}: {comp['method']} of {run} as {comp['format']} ({comp['artefact']}, {_si(comp['bytes'])}B)",
        markup=False,
    )
    if check := comp.get("check"):
        console.print(_compress_check(check), markup=False)
    for note in comp.get("notes", [])[1:]:
        console.print(f"note: {note}", markup=False)
    console.print(f"next: pupil audit {out}, then pupil compare {run} {out}", markup=False)


def _compress_check(check: dict[str, Any]) -> str:
    """One line: the artefact against the base model on the validation split."""
    change = 100 * check["top1_change"]
    return (
        f"{check['split']} top-1 {check['top1_base']:.2%} -> {check['top1_compressed']:.2%} ({change:+.2f} pt) on "
        f"{check['images']:,} images; top-1 agrees with the base on {check['top1_agreement']:.2%}; largest logit "
        f"difference {check['max_abs_logit_diff']:.3g}"
        + (" (includes the calibration images)" if check.get("includes_calibration_images") else "")
    )


@index_app.command("build")
def index_build_cmd(
    run: Annotated[str, typer.Argument(help="Run directory whose embeddings index the images.")],
    data: Annotated[str, typer.Argument(help="Dataset name, image folder or CSV manifest (the catalogue).")],
    out: Annotated[Path, typer.Option(help="Index file to write.")],
    kind: Annotated[str, typer.Option(help="hnsw (approximate, fast), flat (exact) or ivfpq (compressed).")] = "hnsw",
    hnsw_m: Annotated[int, typer.Option(help="HNSW links per node.")] = 32,
    ef_construction: Annotated[int, typer.Option(help="HNSW candidates kept while building.")] = 200,
    split: Annotated[
        str | None, typer.Option(help="Split of a registered dataset (default train; folders and CSVs: all).")
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="Folder holding a registered dataset's files.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    device: DeviceOpt = "auto",
) -> None:
    """Embed a catalogue of images with a run and write a faiss index that records the run's weights."""
    from pupil.search import index_build_command

    index_build_command(
        run,
        data,
        out,
        kind=kind,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        split=split,
        data_dir=data_dir,
        device=device,
        progress=progress,
        console=console,
    )


@index_app.command("add")
def index_add_cmd(
    index: Annotated[Path, typer.Argument(help="Index file.")],
    images: Annotated[list[Path], typer.Argument(help="Image files to add to the catalogue.")],
    label: Annotated[str | None, typer.Option(help="Label of the added images.")] = None,
    run: Annotated[str | None, typer.Option(help="Run directory, when it moved since the build.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Add images to an index without a rebuild; they are searchable at once. Prints each new id."""
    from pupil.search import index_add_command

    index_add_command(index, list(images), label=label, run=run, device=device, console=console)


@index_app.command("remove")
def index_remove_cmd(
    index: Annotated[Path, typer.Argument(help="Index file.")],
    ids: Annotated[list[int], typer.Argument(help="Ids to remove (as printed by search and add).")],
) -> None:
    """Remove items from an index without a rebuild; they never come back in a search."""
    from pupil.search import index_remove_command

    index_remove_command(index, list(ids), console=console)


@app.command("search")
def search_cmd(
    index: Annotated[Path, typer.Argument(help="Index file (pupil index build).")],
    images: Annotated[list[Path], typer.Argument(help="Query images, converted to the model's input.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.")] = 10,
    ef_search: Annotated[int, typer.Option(help="HNSW candidates kept per query (recall against speed).")] = 64,
    out: Annotated[Path | None, typer.Option(help="PNG strip of each query and its neighbours.")] = None,
    run: Annotated[str | None, typer.Option(help="Run directory, when it moved since the build.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """The nearest catalogue images of each query image, with ids, labels, distances and sources."""
    from pupil.search import search_command

    search_command(index, list(images), k=k, ef_search=ef_search, out=out, run=run, device=device, console=console)


def _print_paired(paired: dict[str, Any]) -> None:
    from pupil.report.render import fmt

    new, base = paired["new"]["name"], paired["base"]["name"]
    table = Table(title=f"paired tests, {new} against {base} (same test images, Holm-corrected)")
    for col in ("figure", "base", "new", "difference", "95% CI", "p", "p (Holm)", "verdict"):
        table.add_column(col)
    for f in paired["figures"]:
        lo, hi = f["ci95"]
        table.add_row(
            f["label"],
            fmt(f["base"]),
            fmt(f["new"]),
            f"{f['difference']:+.4f}",
            f"{lo:+.4f} – {hi:+.4f}",
            f"{f['p']:.3g}",
            f"{f['p_holm']:.3g}",
            f["verdict"],
        )
    console.print(table)
    for item in paired.get("not_compared", []):
        console.print(f"not compared: {item['figure']}: {item['reason']}", markup=False)


def _print_gate(gate: dict[str, Any]) -> None:
    from pupil.report.gates import gate_lines

    for line in gate_lines(gate):
        style = "green" if line.startswith("PASS") else "bold red"
        console.print(f"[{style}]{line[:4]}[/]{escape(line[4:])}")
    failed = sum(not r["passed"] for r in gate["rules"])
    verdict = "[bold green]passed[/]" if gate["passed"] else f"[bold red]failed[/] ({failed} of {len(gate['rules'])})"
    console.print(f"gate {gate['file']}: {verdict}")


def audit_shortcuts() -> dict[str, tuple[str, str]]:
    """The audit's shortcut flags as the checks declare them (``Check.shortcuts``): flag -> (check, setting).

    The flags themselves are typer options of ``audit_cmd`` (typer needs them in its signature, and reading the
    check registry at start-up would import torch); a test keeps the two in step."""
    from pupil.audit import CHECKS

    return {flag: (e.name, field) for e in CHECKS for flag, field in e.obj.shortcuts.items()}


def _parse_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        check, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise PupilError(f"--set {item!r}: expected check.field=value")
        out.setdefault(check, {})[name] = yaml.safe_load(value)
    return out


def _print_card(results: dict[str, Any]) -> None:
    from pupil.report.render import fmt, grade, load_thresholds

    limits = load_thresholds(None)
    table = Table(title=f"report card: {results['run']['name']}")
    for col in ("check", "figure", "value", "95% CI", "grade", "time"):
        table.add_column(col)
    for name, s in results["checks"].items():
        h = s["headline"]
        u = h.get("unit", "")
        ci = f"{fmt(h['ci95'][0], u)} – {fmt(h['ci95'][1], u)}" if "ci95" in h else ""
        table.add_row(
            s["title"],
            h["label"],
            fmt(h["value"], u),
            ci,
            grade(h, limits.get(name), s["summary"]),
            f"{s['runtime_s']:.1f} s",
        )
    console.print(table)


def _new_output(given: Path | None, default: Path) -> Path:
    """The output file: ``given`` as the user named it, else ``default``, which must not exist yet (a file
    pupil chose the name of never replaces one of the user's)."""
    if given is not None:
        return given
    if default.exists():
        raise PupilError(f"{default} already exists; pass --out to name the file to write")
    return default


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


# ---------------------------------------------------------------------------------------------------------------
# `pupil train`: its options are generated from the config dataclasses.


def _option(name: str, f: Any, help_text: str) -> click.Option:
    flag = "--" + name.replace("_", "-")
    tp = f.type
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    base = typing.get_origin(args[0]) or args[0]
    if base is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text)
    if base is dict:
        return click.Option([flag, name], default=None, help=help_text + " (YAML or JSON mapping)")
    return click.Option([flag, name], type=base, default=None, help=help_text)


def _train(recipe: str | None, resume: str | None, overwrite: bool, progress: bool, **flags: Any) -> None:
    from pupil.config import build
    from pupil.training.loop import fit

    overrides = {k: v for k, v in flags.items() if v is not None}
    if "model_args" in overrides:
        parsed = yaml.safe_load(overrides["model_args"])
        if not isinstance(parsed, dict):
            raise PupilError("--model-args must be a mapping, e.g. '{widths: [32, 64, 128]}'")
        overrides["model_args"] = parsed
    if resume:
        if recipe or overrides:
            raise PupilError("--resume continues a run with its saved config; give no recipe or flags with it")
        run = fit(resume=resume, progress=progress, log=console.print)
    else:
        run = fit(build(recipe, overrides), overwrite=overwrite, progress=progress, log=console.print)
    last = run.summary().get("last", {})
    val = f", val top-1 {last['val_top1']:.4f}" if "val_top1" in last else ""
    console.print(f"trained {run.info['model']['name']} in {run.summary().get('train_time_s', 0):.0f} s{val}")
    console.print(f"run directory: {run.dir}")


def train_command() -> click.Command:
    from pupil.config import flat_fields

    params: list[click.Parameter] = [
        click.Argument(["recipe"], required=False),
        click.Option(["--resume"], help="Continue the run directory RUN from its last saved step."),
        click.Option(["--overwrite"], is_flag=True, help="Replace an existing run directory of the same name."),
        click.Option(["--progress/--no-progress"], default=True, help="Show the progress bar."),
    ]
    params += [_option(name, f, doc) for name, (_, f, doc) in flat_fields().items()]
    return click.Command(
        "train",
        params=params,
        callback=_train,
        help="Train a model from a YAML RECIPE; flags override the recipe's fields.",
    )


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Exit, Abort) of every click in use: typer ships its own copy (``typer._click``, with
    Exit and Abort in ``typer.exceptions``), whose exceptions are not the installed click's, and the train
    command is built on the installed one."""
    import contextlib
    import importlib

    modules = [click.exceptions]
    for name in ("typer._click.exceptions", "typer.exceptions"):
        with contextlib.suppress(ImportError):  # a typer that uses the installed click has neither
            modules.append(importlib.import_module(name))
    return tuple(
        tuple({getattr(m, name) for m in modules if isinstance(getattr(m, name, None), type)})
        for name in ("ClickException", "Exit", "Abort")
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending a job, ``kill``): raised like Ctrl-C, so that the same clean-up runs."""


TERMINATED: list[int] = []  # SIGTERM arrived (typer turns the KeyboardInterrupt it raises into exit status 130)


def _on_sigterm(signum: int, frame: object) -> None:
    TERMINATED.append(signum)
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # Without this, SIGTERM kills the process where it stands: no `finally` runs, and a half-built output (a
        # compressed run's hidden folder, a temporary file) stays behind. uvicorn sets its own handler while serving.
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    group = typer.main.get_command(app)
    group.add_command(train_command())
    click_error, click_exit, click_abort = _click_exceptions()
    try:
        code = group.main(args=argv, prog_name="pupil", standalone_mode=False)  # typer.Exit(n) returns n here
    except Interrupted as e:
        print(f"pupil: {e}", file=sys.stderr)
        return 130
    except PupilError as e:
        print(f"pupil: error: {e}", file=sys.stderr)
        return 2
    except click_exit as e:  # --help
        return e.exit_code
    except click_abort as e:  # click turns Ctrl-C (and so SIGTERM) into Abort
        if isinstance(e.__cause__, Terminated):
            print("pupil: terminated", file=sys.stderr)
            return 143
        print("pupil: aborted", file=sys.stderr)
        return 130
    except click_error as e:  # usage errors: the usage line, the problem, exit status 2
        e.show()
        return e.exit_code
    except Terminated:
        print("pupil: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("pupil: interrupted", file=sys.stderr)
        return 130
    if code == 130:  # typer's answer to a KeyboardInterrupt in a command: Ctrl-C, or SIGTERM (Terminated)
        print(f"pupil: {'terminated' if TERMINATED else 'interrupted'}", file=sys.stderr)
        return 143 if TERMINATED else 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
