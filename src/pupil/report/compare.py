"""Rank many runs' results.json side by side: a leaderboard and Pareto plots, from the checks' summaries.

Runs audited with different settings (dataset, split size, budget, seed, device, threads, precision)
are flagged in the leaderboard rather than silently mixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pupil.errors import PupilError
from pupil.io import write_json, write_text
from pupil.results import CONSUMED, consumed, load_results

SETTINGS = ("dataset", "split", "n", "budget", "seed", "device", "threads", "precision")
# (key, label, higher is better)
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


def compare(paths: list[str | Path], out: str | Path) -> dict[str, Any]:
    if len(paths) < 2:
        raise PupilError("compare needs at least two runs (or results.json files)")
    rows = [row(load_results(p), str(p)) for p in paths]
    names = [r["name"] for r in rows]
    if len(set(names)) < len(names):  # same run name in different folders: make them distinguishable
        for r in rows:
            r["name"] = f"{Path(r['source']).parent.name}/{r['name']}" if names.count(r["name"]) > 1 else r["name"]
    mismatched = {k: sorted({str(r["settings"][k]) for r in rows}) for k in SETTINGS}
    mismatched = {k: v for k, v in mismatched.items() if len(v) > 1}
    mark_pareto(rows)
    rows.sort(key=lambda r: -(r["top1"] or 0))
    board = {"runs": rows, "mismatched_settings": mismatched}
    out = Path(out)
    write_json(out / "leaderboard.json", board)
    write_text(out / "compare.html", render_compare(board))
    return board


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
                fmt(r["flops"]),
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
        columns=cols, rows=rows, plots=plots, mismatched=board["mismatched_settings"]
    )
