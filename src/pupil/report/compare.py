"""Rank many runs' results.json side by side: a leaderboard and Pareto plots, from the checks' summaries, and every
check's headline figure.

Runs audited with different settings (dataset, split size, budget, seed, device, threads, precision)
are flagged in the leaderboard rather than silently mixed. With exactly two runs, BASE and NEW, whose per-image
figures pair up, the leaderboard adds the paired tests of ``pupil.report.paired`` (is NEW better, worse, or within
noise?) and, given a gate file, the verdict of ``pupil.report.gates`` on NEW against BASE. When a later run is a
compressed copy (``pupil compress``), or when asked, it adds the view of ``pupil.report.changes``: every figure of the
card, NEW - BASE, for each later run against the first, with the images whose prediction changed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pupil.errors import PupilError
from pupil.io import write_json, write_text
from pupil.results import CONSUMED, consumed, load_results

SETTINGS = ("dataset", "split", "n", "budget", "seed", "device", "threads", "precision")
# (key, label, higher is better)
HEADLINE_KEYS = ("label", "value", "higher_is_better", "unit")
AXES = [("latency_ms", "batch-1 latency p50 (ms)", False), ("flops", "FLOPs per image", False), ("ece", "ECE", False)]


def row(results: dict[str, Any], source: str) -> dict[str, Any]:
    """One leaderboard row from a results.json's summaries (a figure of a check that did not run is None)."""

    def get(check: str) -> dict[str, Any]:
        return consumed(results, "compare", check) or dict.fromkeys(CONSUMED["compare"][check])

    acc, cal, eff, energy = get("accuracy"), get("calibration"), get("efficiency"), get("energy")
    return {
        "name": results["run"]["name"],
        "source": source,
        "model": results["run"]["model"]["name"],
        "params": eff["params"] or results["run"]["model"].get("params"),
        "flops": eff["flops"],
        "top1": acc["top1"],
        "top1_ci": acc["top1_ci95"],
        "macro_f1": acc["macro_f1"],
        "ece": cal["ece"],
        "latency_ms": eff["latency_ms_p50"],
        "throughput": eff["throughput_img_s"],
        "energy_j_per_1000": energy["energy_j_per_1000_images"],
        "settings": {k: (results["run"]["dataset"] if k == "dataset" else results["audit"].get(k)) for k in SETTINGS},
        "headlines": headlines(results),
    }


def headlines(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every section's headline figure, by check, with the section's title."""
    return {
        name: {"title": section["title"], **{k: section["headline"].get(k) for k in HEADLINE_KEYS}}
        for name, section in results["checks"].items()
    }


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """A run is on the front for axis x when no other run has top-1 >= and x <= with one strict."""
    for x, _, _ in AXES:
        pts = [r for r in rows if r.get(x) is not None and r.get("top1") is not None]
        for r in pts:
            r["pareto_" + x] = not any(
                o is not r and o["top1"] >= r["top1"] and o[x] <= r[x] and (o["top1"] > r["top1"] or o[x] < r[x])
                for o in pts
            )


def compare(
    paths: list[str | Path],
    out: str | Path,
    paired: bool = True,
    gate: str | Path | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    changes: bool | None = None,
) -> dict[str, Any]:
    """Write ``leaderboard.json`` and ``compare.html`` for two or more runs (run directories or results.json files).

    Args:
        paths: the runs; with two, the first is BASE and the second NEW for the paired tests and the gate.
        out: the folder written.
        paired: with exactly two runs, add the paired tests (``pupil.report.paired.paired``) under ``paired``; when
            the runs do not pair up (other images, settings or classes; per-image files missing), the reason is
            under ``paired_refused`` instead.
        gate: a gate file (``pupil.report.gates``), judged on NEW against BASE, under ``gate``; needs two runs.
        n_bootstrap: bootstrap replicates of the paired tests and of the changes view.
        seed: seed of the paired tests' and the changes view's bootstrap.
        changes: add ``pupil.report.changes.changes`` of every later run against the first under ``changes`` (a
            run that does not pair with the first is listed under its ``refused``); None (the default) adds it when
            a later run is a compressed copy (its run.json has a ``compressed`` section).

    Raises:
        PupilError: fewer than two runs, a gate with other than two runs, a bad gate file, or a gate with
            ``(paired)`` rules for runs that do not pair up (the pairing's reason).
    """
    from pupil.report import gates
    from pupil.report.changes import changes as what_changed
    from pupil.report.changes import is_compressed

    if len(paths) < 2:
        raise PupilError("compare needs at least two runs (or results.json files)")
    if gate is not None and len(paths) != 2:
        raise PupilError(f"a gate compares NEW against BASE: give exactly two runs, BASE NEW, not {len(paths)}")
    rules = gates.load_gates(gate) if gate is not None else []  # a bad gate file fails before any work
    loaded = [load_results(p) for p in paths]
    rows = [row(r, str(p)) for r, p in zip(loaded, paths)]
    names = [r["name"] for r in rows]
    if len(set(names)) < len(names):  # same run name in different folders: make them distinguishable
        for r in rows:
            r["name"] = f"{Path(r['source']).parent.name}/{r['name']}" if names.count(r["name"]) > 1 else r["name"]
    mismatched = {k: sorted({str(r["settings"][k]) for r in rows}) for k in SETTINGS}
    mismatched = {k: v for k, v in mismatched.items() if len(v) > 1}
    checks = _checks(loaded)
    mark_pareto(rows)
    rows.sort(key=lambda r: -(r["top1"] or 0))
    board: dict[str, Any] = {"runs": rows, "mismatched_settings": mismatched, "checks": checks}
    if len(paths) == 2 and (paired or any(r.paired for r in rules)):
        from pupil.report.paired import paired as paired_test

        try:
            board["paired"] = paired_test(paths[0], paths[1], n_bootstrap, seed)
        except PupilError as e:
            if any(r.paired for r in rules):
                raise
            board["paired_refused"] = str(e)
    if changes or (changes is None and any(is_compressed(p) for p in paths[1:])):
        board["changes"] = what_changed(paths[0], paths[1:], n_bootstrap=n_bootstrap, seed=seed, skip_mismatched=True)
    if gate is not None:
        board["gate"] = gates.evaluate(rules, loaded[1], loaded[0], board.get("paired"), str(gate))
    out = Path(out)
    write_json(out / "leaderboard.json", board)
    write_text(out / "compare.html", render_compare(board))
    return board


def _checks(loaded: list[dict[str, Any]]) -> dict[str, str]:
    """Every check that ran on any of the runs, by name, with its title: the audits' own orders merged (a check one
    run lacks goes after the check before it in the run that has it)."""
    order: list[str] = []
    titles: dict[str, str] = {}
    for results in loaded:
        at = -1
        for name, section in results["checks"].items():
            titles.setdefault(name, section["title"])
            if name in order:
                at = order.index(name)
            else:
                at += 1
                order.insert(at, name)
    return {name: titles[name] for name in order}


def render_compare(board: dict[str, Any]) -> str:
    import jinja2

    from pupil.report.plots import pareto
    from pupil.report.render import HERE, fmt

    plots = [
        {"caption": f"top-1 against {label}", "uri": pareto(board["runs"], key, "top1", label, "top-1")}
        for key, label, _ in AXES
    ]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    cols = [
        "rank",
        "run",
        "model",
        "params",
        "FLOPs",
        "top-1",
        "95% CI",
        "macro-F1",
        "ECE",
        "latency p50 (ms)",
        "img/s",
        "J / 1k images",
        "settings",
    ]
    rows = []
    for i, r in enumerate(board["runs"], 1):
        ci = f"{fmt(r['top1_ci'][0], 'fraction')} – {fmt(r['top1_ci'][1], 'fraction')}" if r["top1_ci"] else ""
        flagged = [f"{k}={r['settings'][k]}" for k in board["mismatched_settings"]]
        rows.append(
            [
                i,
                r["name"],
                r["model"],
                fmt(r["params"]),
                fmt(r["flops"]) if r["flops"] is not None else "not counted",
                fmt(r["top1"], "fraction"),
                ci,
                fmt(r["macro_f1"]),
                fmt(r["ece"]),
                fmt(r["latency_ms"]),
                fmt(r["throughput"]),
                fmt(r["energy_j_per_1000"]),
                "; ".join(flagged) or "same",
            ]
        )
    return env.get_template("compare.html.j2").render(
        columns=cols,
        rows=rows,
        plots=plots,
        mismatched=board["mismatched_settings"],
        headlines=headline_table(board, fmt),
        paired=paired_table(board.get("paired")),
        paired_refused=board.get("paired_refused"),
        changes=changes_tables(board.get("changes")),
        gate=board.get("gate"),
    )


def headline_table(board: dict[str, Any], fmt: Callable[[Any, str], str]) -> dict[str, Any]:
    """Every check's headline per run, in leaderboard order: each cell's text, its label and whether it is the best
    value of its column (by the headline's own direction, when two or more runs have one)."""
    checks = board["checks"]
    best: dict[str, float] = {}
    for name in checks:
        heads = [h for r in board["runs"] if (h := r["headlines"].get(name)) and h["value"] is not None]
        if len(heads) > 1:
            pick = max if heads[0]["higher_is_better"] else min
            best[name] = pick(h["value"] for h in heads)
    rows = []
    for r in board["runs"]:
        cells = []
        for name in checks:
            h = r["headlines"].get(name)
            if h is None:
                cells.append({"text": "not run", "label": "", "best": False})
            else:
                text = fmt(h["value"], h.get("unit") or "")
                cells.append({"text": text, "label": h["label"], "best": best.get(name) == h["value"]})
        rows.append({"name": r["name"], "cells": cells})
    return {"titles": list(checks.values()), "rows": rows}


def paired_table(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The paired tests as text rows: figure, base, new, difference, interval, p, Holm p, verdict."""
    if result is None:
        return None
    rows = [
        [
            f["label"],
            f"{f['base']:.4f}",
            f"{f['new']:.4f}",
            f"{f['difference']:+.4f}",
            f"[{f['ci95'][0]:+.4f}, {f['ci95'][1]:+.4f}]",
            f"{f['p']:.3g}",
            f"{f['p_holm']:.3g}",
            f["verdict"],
            f["test"],
        ]
        for f in result["figures"]
    ]
    columns = ["figure", "base", "new", "difference", "95% interval", "p", "Holm p", "verdict", "test"]
    return {**result, "columns": columns, "rows": rows}


def changes_tables(view: dict[str, Any] | None) -> dict[str, Any] | None:
    """The changes view as text for the page: per comparison, the figures and per-class rows (``text_row``), the
    exemplars' class mix (classes with a changed prediction) and the rest as it is."""
    if view is None:
        return None
    from pupil.report.changes import per_class_rows, text_row

    comparisons = []
    for c in view["comparisons"]:
        classes, note = per_class_rows(c, 30)
        ex = c["exemplars"]
        mix = [r for r in ex.get("by_class", []) if r["differ"]]
        comparisons.append(
            {**c, "rows": [text_row(r) for r in c["figures"]], "classes": classes, "classes_note": note, "mix": mix}
        )
    return {**view, "comparisons": comparisons}
