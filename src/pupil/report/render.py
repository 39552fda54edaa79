"""Render results.json into a self-contained report.html (plots inline, no network) and model_card.md.

The report reads files only: results.json, and run.json for the model card's training details.
Nothing in training or audit code formats HTML.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pupil.errors import PupilError
from pupil.io import read_json, write_text
from pupil.report import labels
from pupil.report.findings import findings
from pupil.report.labels import show
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


THRESHOLD_FIELDS = {"good", "fair", "why", "of", "higher_is_better"}


def load_thresholds(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """The grade limits of each check: ``thresholds.yaml`` beside this file, with the checks a user's file names
    replaced by its entries. A user's entry needs ``good`` and ``fair`` (numbers) and may give ``why``, ``of``
    and ``higher_is_better``; it keeps the default's ``of`` and ``higher_is_better`` unless it sets them, so that
    its limits apply to the same figure."""
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
    if not isinstance(user, dict):
        raise PupilError(f"thresholds file {p} must map check names to {{good, fair}} limits")
    merged = dict(default)
    for check, limits in user.items():
        if not isinstance(limits, dict) or not {"good", "fair"} <= set(limits):
            raise PupilError(f"thresholds file {p}: {check} needs good and fair limits")
        bad = [k for k in ("good", "fair") if isinstance(limits[k], bool) or not isinstance(limits[k], int | float)]
        if bad or set(limits) - THRESHOLD_FIELDS:
            what = (
                f"{' and '.join(bad)} must be numbers"
                if bad
                else f"unknown field {sorted(set(limits) - THRESHOLD_FIELDS)[0]}"
            )
            raise PupilError(f"thresholds file {p}: {check}: {what} (fields: {', '.join(sorted(THRESHOLD_FIELDS))})")
        kept = {k: v for k, v in default.get(check, {}).items() if k in ("of", "higher_is_better")}
        merged[check] = {**kept, "why": f"limits from {p.name}", **limits}
    return merged


def grade(head: dict[str, Any], limits: dict[str, Any] | None, summary: dict[str, Any] | None = None) -> str:
    """The grade of a check's headline ``head`` against ``limits``: good, fair, poor, or none when there are no
    limits or the graded figure is missing. Limits with ``of`` grade that figure of the check's ``summary``."""
    value = graded_value(head, limits, summary)
    if value is None:
        return "none"
    v, hib = value
    ok = (lambda lim: v >= lim) if hib else (lambda lim: v <= lim)
    return "good" if ok(limits["good"]) else "fair" if ok(limits["fair"]) else "poor"


def graded_value(
    head: dict[str, Any], limits: dict[str, Any] | None, summary: dict[str, Any] | None = None
) -> tuple[float, bool] | None:
    """(the figure the grade is on, whether higher is better), or None when there is nothing to grade."""
    if not limits:
        return None
    if not limits.get("of"):
        return head["value"], head["higher_is_better"]
    v = (summary or {}).get(limits["of"])
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return v, limits.get("higher_is_better", head["higher_is_better"])


# Headline units of results.json -> the card's units (labels.show)
HEADLINE_UNITS = {"fraction": "fraction", "ms": "ms", "J": "J", "classes": "labels"}


def headline_text(h: dict[str, Any]) -> tuple[str, str]:
    """A headline's value and 95% interval ("" without one) as the card shows them."""
    unit = HEADLINE_UNITS.get(h.get("unit", ""), "")
    value = show(h["value"], unit) + (f" {h['unit']}" if h.get("unit") == "classes" else "")
    return value, show(h["ci95"], f"interval:{unit}") if "ci95" in h else ""


def limits_text(check: str, head: dict[str, Any], limits: dict[str, Any] | None) -> str:
    """The grade limits in words: "good ≥ 90%, fair ≥ 80%" (and the figure graded when it is not the headline)."""
    if not limits:
        return ""
    if of := limits.get("of"):
        found = labels.lookup(check, (of,))
        unit, name = (found[0].unit, found[0].label) if found else ("", of.replace("_", " "))
        hib = limits.get("higher_is_better", head["higher_is_better"])
    else:
        unit, name, hib = HEADLINE_UNITS.get(head.get("unit", ""), ""), "", head["higher_is_better"]
    op = "≥" if hib else "≤"
    bound = labels.level if unit == "fraction" else lambda v: show(v, unit)  # limits are round: 90%, not 90.0%
    text = f"good {op} {bound(limits['good'])}, fair {op} {bound(limits['fair'])}"
    return f"{name}: {text}" if name else text


@cache
def reference_points() -> dict[str, Any]:
    return yaml.safe_load((HERE / "reference.yaml").read_text()) or {}


def reference(results: dict[str, Any], check: str) -> dict[str, Any] | None:
    """The zoo's best and worst figure for ``check`` on the audited dataset (reference.yaml), when its settings
    match: every ``match`` entry equals the check's summary figure, metric or audit setting of that name."""
    ref = reference_points().get(str(results["run"]["dataset"]).lower(), {}).get(check)
    section = results["checks"].get(check)
    if not ref or not section:
        return None
    for key, want in (ref.get("match") or {}).items():
        for where in (section.get("summary", {}), section.get("metrics", {}), results["audit"]):
            if key in where:
                got = where[key]
                break
        else:
            return None
        same = math.isclose(got, want) if _is_num(got) and _is_num(want) else got == want
        if not same:
            return None
    unit = HEADLINE_UNITS.get(section["headline"].get("unit", ""), "")
    return {
        "best": f"{show(ref['best']['value'], unit)} ({ref['best']['model']})",
        "worst": f"{show(ref['worst']['value'], unit)} ({ref['worst']['model']})",
        "source": ", ".join(sorted({ref["best"]["source"], ref["worst"]["source"]})),
    }


def section(name: str, s: dict[str, Any]) -> dict[str, Any]:
    """One check's section of the card: its notes, figures (labelled, in units, with their meaning; ``metrics``
    the main ones, ``more`` the rest), tables with labelled columns, and drawn figures."""
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
        cols = [labels.column(name, tname, c) for c in t["columns"]]
        rows = [
            [
                {"text": labels.cell(c, cols[i][1] if i < len(cols) else ""), "num": _is_num(c)}
                for i, c in enumerate(row)
            ]
            for row in t["rows"]
        ]
        title = labels.TABLE_TITLES.get(tname, tname.replace("_", " ").capitalize())
        tables.append({"name": title, "columns": [{"label": c[0], "means": c[2]} for c in cols], "rows": rows})
    figs = labels.figures(name, s.get("metrics", {}))
    config = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in s["config"].items())
    return {
        "name": name,
        "title": s["title"],
        "config": config,
        "runtime_s": s["runtime_s"],
        "notes": notes,
        "metrics": [f for f in figs if f.main],
        "more": [f for f in figs if not f.main],
        "tables": tables,
        "figures": figures,
    }


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def tile(name: str, s: dict[str, Any], results: dict[str, Any], thresholds: dict[str, dict[str, Any]]) -> dict:
    """A check's headline on the summary card: value, interval, grade with its limits and reason, meaning and
    the zoo's reference points."""
    h, limits = s["headline"], thresholds.get(name)
    value, ci = headline_text(h)
    return {
        "name": name,
        "title": s["title"],
        "value": value,
        "label": h["label"],
        "ci": ci,
        "grade": grade(h, limits, s.get("summary")),
        "limits": limits_text(name, h, limits),
        "why": " ".join(str((limits or {}).get("why", "")).split()),
        "means": labels.HEADLINES.get(name, ""),
        "reference": reference(results, name),
    }


def gate_box(results: dict[str, Any]) -> dict[str, Any] | None:
    """The release gate's verdict and rules, or None without one."""
    g = results.get("gate")
    if not g:
        return None
    rules = g.get("rules", [])
    return {
        "passed": bool(g.get("passed")),
        "file": g.get("file", ""),
        "base": g.get("base"),
        "failed": sum(not r.get("passed") for r in rules),
        "rules": [
            {"rule": r["rule"], "passed": bool(r.get("passed")), "detail": r.get("detail", ""), "why": r.get("why", "")}
            for r in rules
        ],
    }


def render_html(results: dict[str, Any], thresholds: dict[str, dict[str, Any]]) -> str:
    import jinja2

    from pupil import __version__

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    tiles = [tile(n, s, results, thresholds) for n, s in results["checks"].items()]
    return env.get_template("report.html.j2").render(
        run=results["run"],
        audit=results["audit"],
        created=results["created"],
        findings=findings(results),
        gate=gate_box(results),
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


def model_card(
    results: dict[str, Any], info: dict[str, Any] | None, thresholds: dict[str, dict[str, Any]] | None = None
) -> str:
    """A model card in the spirit of Mitchell et al. (2019), from ``templates/model_card.md.j2``, filled from
    results.json and run.json (``info``, optional). The template passes every value from those files through
    ``escape_md``; this function only picks the figures out: the findings, the release gate, each check's
    headline with its grade (``thresholds``, default ``load_thresholds(None)``), and the summary figures
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
    env.filters["md"], env.filters["fmt"], env.filters["show"] = escape_md, fmt, show
    thresholds = load_thresholds(None) if thresholds is None else thresholds
    checks, m, cfg = results["checks"], results["run"]["model"], (info or {}).get("config", {})
    metrics = []
    for name, s in checks.items():
        value, ci = headline_text(s["headline"])
        g = grade(s["headline"], thresholds.get(name), s.get("summary"))
        metrics.append({"title": s["title"], "label": s["headline"]["label"], "value": value, "ci": ci, "grade": g})
    accuracy = consumed(results, "model_card", "accuracy")
    calibration = consumed(results, "model_card", "calibration")
    fair = consumed(results, "model_card", "fairness")
    fairness_column = None
    if fair and fair["attribute_kind"] == "column":
        fairness_column = {"attribute": fair["attribute"], "value": show(fair["accuracy_gap"], "points")}
    return env.get_template("model_card.md.j2").render(
        run=results["run"],
        audit=results["audit"],
        info=info,
        versions=(info or {}).get("versions", {}),
        train=cfg.get("train", {}),
        optim=cfg.get("optim", {}),
        params=show(m["params"], "count") if "params" in m else "?",
        data_lines=data_lines(results["audit"]),
        findings=findings(results),
        gate=gate_box(results),
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
    limits = load_thresholds(thresholds)
    html = write_text(run_dir / "report.html", render_html(results, limits))
    card = write_text(run_dir / "model_card.md", model_card(results, info, limits))
    return html, card
