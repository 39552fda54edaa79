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
from pupil.results import consumed, load_results

HERE = Path(__file__).parent
UNITS = {"fraction": "%", "ms": " ms", "J": " J"}
# What a user string in the model card must not be able to start: an HTML tag or entity (as entities), and
# Markdown's escape, code, emphasis, strikethrough, link and table-cell characters (backslash-escaped). The
# backslash is among them so that a user's own backslash cannot cancel the escape of the character after it.
HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
MARKDOWN_SPECIAL = frozenset("\\`*_~[]|")


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


def escape_md(value: Any) -> str:
    """``value`` as literal text on one line of Markdown, table cells included.

    Class names, run and dataset names, group columns and notes come from the user's files: a class named
    ``<img src=x onerror=alert(1)>`` must not become a tag when the card is rendered, ``a|b`` must not split a
    table cell, and ``line1\\nline2`` must not end a table row, so line breaks and other non-printing characters
    become spaces.
    """
    out = []
    for ch in str(value):
        if ch in HTML_ENTITIES:
            out.append(HTML_ENTITIES[ch])
        elif ch in MARKDOWN_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch if ch.isprintable() else " ")
    return "".join(out)


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
    from pupil.report.plots import draw

    figures = []
    for spec in s.get("figures", []):
        try:
            figures.append({"caption": spec["caption"], "uri": draw(spec, s)})
        except (KeyError, ValueError, TypeError, IndexError) as e:  # a figure must not take the report down
            figures.append({"caption": f"{spec['caption']}: could not be drawn ({e})", "uri": ""})
    notes = list(s.get("notes", []))
    if "figures" not in s and s.get("curves"):
        notes.append(
            f"figures were not recorded in this results.json (schema 2.0): `pupil audit --checks {name}` redraws them"
        )
    tables = []
    for tname, t in s.get("tables", {}).items():
        rows = [[{"text": fmt(c), "num": isinstance(c, int | float)} for c in row] for row in t["rows"]]
        tables.append({"name": tname.replace("_", " "), "columns": t["columns"], "rows": rows})
    metrics = [(k, fmt(v)) for k, v in flatten(s["metrics"])]
    config = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in s["config"].items())
    return {
        "name": name,
        "title": s["title"],
        "config": config,
        "runtime_s": s["runtime_s"],
        "notes": notes,
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


def data_lines(audit: dict[str, Any]) -> list[str]:
    """Markdown bullets: which data the audit used, and what an earlier results.json lost."""
    md, lines = escape_md, []
    if d := audit.get("data"):
        fp = d.get("fingerprint")
        match = {True: "the data the run was trained on", False: "NOT the data the run was trained on"}
        said = match.get(d.get("matches_training"), "not compared with the training data (no fingerprint)")
        lines.append(
            f"- Data: {md(d['dataset'])}"
            + (f" ({md(fp['files'])} files, fingerprint {md(fp['sha256'])})" if fp else "")
            + f": {said}"
            + (f", chosen with --data-dir {md(d['data_dir'])}" if d.get("data_dir") else "")
            + "."
        )
        if conv := d.get("conversions"):
            counts = ", ".join(f"{md(v)} {md(k.replace('_', ' '))}" for k, v in conv.items())
            lines.append(f"- Converted on load: {counts}.")
        if d.get("bad_images"):
            lines.append(f"- Left out as unreadable (--on-bad-image skip): {md(d['bad_images'])} images.")
    for drop in audit.get("dropped_sections", []):
        lines.append(f"- Dropped from an earlier results.json: {md(drop['check'])} ({md(drop['reason'])}).")
    lines += [f"- Note: {md(n)}" for n in audit.get("notes", [])]
    return lines


def model_card(results: dict[str, Any], info: dict[str, Any] | None) -> str:
    """A model card in the spirit of Mitchell et al. (2019), from ``templates/model_card.md.j2``, filled from
    results.json and run.json (``info``, optional). The template passes every value from those files through
    ``escape_md``; this function only picks the figures out: each check's headline, and the summary figures
    ``CONSUMED["model_card"]`` lists."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=False,  # Markdown, not HTML: escape_md does the escaping, value by value
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["md"], env.filters["fmt"] = escape_md, fmt
    checks, m, cfg = results["checks"], results["run"]["model"], (info or {}).get("config", {})
    metrics = []
    for s in checks.values():
        h, unit = s["headline"], s["headline"].get("unit", "")
        ci = f"{fmt(h['ci95'][0], unit)} – {fmt(h['ci95'][1], unit)}" if "ci95" in h else ""
        metrics.append({"title": s["title"], "label": h["label"], "value": fmt(h["value"], unit), "ci": ci})
    accuracy = consumed(results, "model_card", "accuracy")
    calibration = consumed(results, "model_card", "calibration")
    fair = consumed(results, "model_card", "fairness")
    fairness_column = None
    if fair and fair["attribute_kind"] == "column":
        fairness_column = {"attribute": fair["attribute"], "value": fmt(fair["accuracy_gap"], "fraction")}
    return env.get_template("model_card.md.j2").render(
        run=results["run"],
        audit=results["audit"],
        info=info,
        versions=(info or {}).get("versions", {}),
        train=cfg.get("train", {}),
        optim=cfg.get("optim", {}),
        params=fmt(m["params"]) if "params" in m else "?",
        data_lines=data_lines(results["audit"]),
        metrics=metrics,
        accuracy=accuracy,
        calibration=calibration if calibration and calibration["temperature"] is not None else None,
        fairness_column=fairness_column,
        fairness_ran=fair is not None,
        notes=[(s["title"], note) for s in checks.values() for note in s.get("notes", [])],
    )


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
