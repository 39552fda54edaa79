"""Render results.json into a self-contained report.html (plots inline, no network) and model_card.md.

The report reads files only: results.json, and run.json for the model card's training details.
Nothing in training or audit code formats HTML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pupil.errors import PupilError
from pupil.io import read_json, write_text
from pupil.report.schema import load_results

HERE = Path(__file__).parent
UNITS = {"fraction": "%", "ms": " ms", "J": " J"}


def fmt(value: Any, unit: str = "") -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if unit == "fraction":
            return f"{value * 100:.2f}%"
        if abs(value) >= 1000:
            return f"{value:,.0f}{UNITS.get(unit, '')}"
        if abs(value) >= 1 or value == 0:
            return f"{value:.3g}{UNITS.get(unit, '')}" if abs(value) < 100 else f"{value:.1f}{UNITS.get(unit, '')}"
        return f"{value:.4f}{UNITS.get(unit, '')}"
    return str(value)


def load_thresholds(path: str | Path | None) -> dict[str, dict[str, float]]:
    default = yaml.safe_load((HERE / "thresholds.yaml").read_text())
    if path is None:
        return default
    p = Path(path)
    if not p.exists():
        raise PupilError(f"thresholds file {p} does not exist")
    try:
        user = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise PupilError(f"thresholds file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    for check, limits in user.items():
        if not isinstance(limits, dict) or not {"good", "fair"} <= set(limits):
            raise PupilError(f"thresholds file {p}: {check} needs good and fair limits")
    return default | user


def grade(head: dict[str, Any], limits: dict[str, float] | None) -> str:
    if not limits:
        return "none"
    v, hib = head["value"], head["higher_is_better"]
    ok = (lambda lim: v >= lim) if hib else (lambda lim: v <= lim)
    return "good" if ok(limits["good"]) else "fair" if ok(limits["fair"]) else "poor"


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += flatten(v, key + ".")
        elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
            out.append((key, f"[{fmt(v[0])}, {fmt(v[1])}]"))
        elif not isinstance(v, list):
            out.append((key, v))
    return out


def section(name: str, s: dict[str, Any]) -> dict[str, Any]:
    from pupil.report.plots import FIGURES

    figures = []
    for caption, draw in FIGURES.get(name, []):
        try:
            figures.append({"caption": caption, "uri": draw(s)})
        except (KeyError, ValueError, TypeError, IndexError) as e:  # a figure must not take the report down
            figures.append({"caption": f"{caption}: could not be drawn ({e})", "uri": ""})
    tables = []
    for tname, t in s.get("tables", {}).items():
        rows = [[{"text": fmt(c), "num": isinstance(c, int | float)} for c in row] for row in t["rows"]]
        tables.append({"name": tname.replace("_", " "), "columns": t["columns"], "rows": rows})
    metrics = [(k, fmt(v)) for k, v in flatten(s["metrics"])]
    config = ", ".join(f"{k}={v}" for k, v in s["config"].items())
    return {
        "name": name,
        "title": s["title"],
        "config": config,
        "runtime_s": s["runtime_s"],
        "notes": s.get("notes", []),
        "metrics": metrics,
        "tables": tables,
        "figures": figures,
    }


def render_html(results: dict[str, Any], thresholds: dict[str, dict[str, float]]) -> str:
    import jinja2

    from pupil import __version__

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    tiles = []
    for name, s in results["checks"].items():
        h = s["headline"]
        ci = f"{fmt(h['ci95'][0], h.get('unit', ''))} – {fmt(h['ci95'][1], h.get('unit', ''))}" if "ci95" in h else ""
        tiles.append(
            {
                "title": s["title"],
                "value": fmt(h["value"], h.get("unit", "")),
                "label": h["label"],
                "ci": ci,
                "grade": grade(h, thresholds.get(name)),
            }
        )
    return env.get_template("report.html.j2").render(
        run=results["run"],
        audit=results["audit"],
        created=results["created"],
        tiles=tiles,
        sections=[section(n, s) for n, s in results["checks"].items()],
        version=__version__,
        schema_version=results["schema_version"],
    )


def model_card(results: dict[str, Any], info: dict[str, Any] | None) -> str:
    """A model card in the spirit of Mitchell et al. (2019), filled from results.json and run.json."""
    r, a, checks = results["run"], results["audit"], results["checks"]
    lines = [f"# Model card: {r['name']}", "", "## Model details", ""]
    m = r["model"]
    lines += [f"- Architecture: `{m['name']}` ({m.get('params', '?'):,} parameters), {m['num_classes']} classes."]
    if info:
        cfg = info.get("config", {})
        opt = cfg.get("optim", {})
        lines += [
            f"- Trained by pupil {info.get('versions', {}).get('pupil', '?')} with torch "
            f"{info.get('versions', {}).get('torch', '?')}: {cfg.get('train', {}).get('epochs')} epochs of "
            f"{opt.get('opt')} (peak lr {opt.get('lr')}, {opt.get('sched')} schedule, label smoothing "
            f"{opt.get('label_smoothing')}), seed {info.get('seed')}.",
            f"- Deployed with flip test-time augmentation: {'yes' if info.get('tta') else 'no'}. "
            "Inputs are pixels in [0, 1]; normalisation is inside the model.",
        ]
    lines += [
        "",
        "## Intended use",
        "",
        f"- Classifying {r['dataset']} images into: {', '.join(r['classes'])}.",
        "- A benchmark and teaching model: it was not validated for decisions about people, health or safety.",
        "- Out of scope: images unlike the training data (other domains, sizes, colour statistics); "
        "the audit's figures do not transfer to them.",
        "",
    ]
    lines += ["## Training data", ""]
    if info:
        d = info["data"]
        lines += [
            f"- {d['dataset']}: {d['train_size']:,} training images, {d['val_size']:,} held out for validation "
            f"(seeded, class-stratified); input {'x'.join(map(str, d['input_shape']))}."
        ]
    else:
        lines += ["- run.json was not available."]
    lines += [
        "",
        "## Evaluation data",
        "",
        f"- The untouched {a['split']} split: {a['n']:,} images. "
        f"Audit budget {a['budget']}, seed {a['seed']}, {a['device']}, {a['threads']} threads, {a['precision']}.",
        "",
    ]
    lines += ["## Metrics", "", "| check | figure | value | 95% interval |", "| --- | --- | ---: | --- |"]
    for s in checks.values():
        h = s["headline"]
        ci = f"{fmt(h['ci95'][0], h.get('unit', ''))} – {fmt(h['ci95'][1], h.get('unit', ''))}" if "ci95" in h else ""
        lines.append(f"| {s['title']} | {h['label']} | {fmt(h['value'], h.get('unit', ''))} | {ci} |")
    if "accuracy" in checks:
        am = checks["accuracy"]["metrics"]
        ci = am["ci95"]["macro_f1"]
        lines += ["", f"Macro-F1 {am['macro_f1']:.4f} (95% bootstrap interval {ci[0]:.4f} – {ci[1]:.4f})."]
        worst = sorted(checks["accuracy"]["tables"]["per_class"]["rows"], key=lambda row: row[3])[:3]
        lines.append("Lowest recall: " + ", ".join(f"{w[0]} ({w[3] * 100:.1f}%)" for w in worst) + ".")
    if "calibration" in checks and "temperature" in checks["calibration"]["metrics"]:
        cm = checks["calibration"]["metrics"]
        lines.append(
            f"Temperature scaling (T = {cm['temperature']:.3f}, fitted on the validation split) moves ECE "
            f"from {cm['before']['ece']:.4f} to {cm['after']['ece']:.4f}."
        )
    lines += ["", "## Ethical considerations", ""]
    fair = checks.get("fairness", {}).get("metrics", {})
    if fair.get("attribute_kind") == "column":
        h = checks["fairness"]["headline"]
        lines.append(
            f"- Groups by `{fair['attribute']}`: {h['label']} {fmt(h['value'], h.get('unit', ''))} "
            "(see the report's fairness section for every metric, gap and interval)."
        )
    else:
        lines.append(
            "- The evaluation data carries no demographic attributes, so nothing here says how the model treats "
            "groups of people"
            + (
                "; the fairness section compares a declared image property or discovered slices only."
                if fair
                else "; a fairness audit (`--checks fairness --groups COLUMN`) needs data that records them."
            )
        )
    lines += [
        "- Energy figures are estimates from codecarbon's power model (see the report's energy section).",
        "",
        "## Caveats and recommendations",
        "",
        "- Figures hold for this split and these settings only; re-audit on data from the deployment setting.",
        "- Accuracy intervals are percentile bootstrap intervals over test images; they do not cover "
        "training randomness (train several seeds for that).",
    ]
    for s in checks.values():
        for note in s.get("notes", []):
            lines.append(f"- {s['title']}: {note}")
    return "\n".join(lines) + "\n"


def render_run(run_dir: str | Path, thresholds: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.html and model_card.md beside results.json; returns their paths."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    try:
        info = read_json(run_dir / "run.json", "")
    except PupilError:  # the card is still written from results.json alone
        info = None
    html = write_text(run_dir / "report.html", render_html(results, load_thresholds(thresholds)))
    card = write_text(run_dir / "model_card.md", model_card(results, info))
    return html, card
