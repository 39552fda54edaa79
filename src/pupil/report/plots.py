"""Figures for the report, drawn from results.json curves only; each returns an inline PNG data URI."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

INK, ACCENT, MUTED = "#1f2937", "#2563eb", "#9ca3af"
PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"]


def to_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def reliability(curves: dict[str, Any]) -> str:
    r = curves["reliability"]
    n = len(r["count"])
    centers = [(i + 0.5) / n for i in range(n)]
    fig, axes = plt.subplots(1, 2 if "reliability_after" in curves else 1, figsize=(8.5, 3.6), squeeze=False)
    panels = [("before temperature scaling", r)]
    if "reliability_after" in curves:
        panels.append(("after temperature scaling", curves["reliability_after"]))
    for ax, (title, c) in zip(axes[0], panels):
        filled = [i for i, k in enumerate(c["count"]) if k > 0]
        ax.bar(
            [centers[i] for i in filled],
            [c["accuracy"][i] for i in filled],
            width=1 / n,
            edgecolor="white",
            color=ACCENT,
            label="accuracy in bin",
        )
        # Mean confidence per bin as a red tick: above the bar = over-confident, below = under-confident.
        ax.scatter(
            [centers[i] for i in filled],
            [c["confidence"][i] for i in filled],
            marker="_",
            s=180,
            color="#dc2626",
            linewidths=2.5,
            zorder=3,
            label="mean confidence in bin",
        )
        ax.plot([0, 1], [0, 1], "--", color=MUTED, lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    return to_uri(fig)


def confusion(cm: dict[str, Any]) -> str:
    counts, classes = cm["counts"], cm["classes"]
    k = len(classes)
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.55 * k, 11), min(0.8 + 0.5 * k, 10)))
    rows = [[v / max(sum(row), 1) for v in row] for row in counts]
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i][j]:
                    ax.text(
                        j,
                        i,
                        counts[i][j],
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rows[i][j] > 0.5 else INK,
                    )
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true")
    fig.tight_layout()
    return to_uri(fig)


def pareto(points: list[dict[str, Any]], x: str, y: str, xlabel: str, ylabel: str, x_lower_better: bool = True) -> str:
    """Scatter of runs with the Pareto front (best y for no worse x) drawn as a step line."""
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for p in pts:
        ax.scatter(p[x], p[y], color=ACCENT if p.get("pareto_" + x) else MUTED, zorder=3)
        ax.annotate(p["name"], (p[x], p[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted([p for p in pts if p.get("pareto_" + x)], key=lambda p: p[x], reverse=not x_lower_better)
    if len(front) > 1:
        ax.step([p[x] for p in front], [p[y] for p in front], where="post", color=ACCENT, lw=1, alpha=0.6)
    if x in ("latency_ms", "flops"):
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short log ranges
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_uri(fig)


def line_curves(x: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str, xlog: bool = False) -> str:
    """One line per named series over a shared x axis."""
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for i, (label, ys) in enumerate(series.items()):
        ax.plot(x, ys, marker="o" if len(x) <= 12 else None, ms=3, label=label, color=PALETTE[i % len(PALETTE)])
    if xlog:
        ax.set_xscale("symlog", linthresh=min((v for v in x if v > 0), default=1e-3))
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return to_uri(fig)


def decode_png(uri: str):
    """An example image of results.json (a PNG data URI, see ``pupil.results.png_data_uri``) as a uint8 numpy
    array, (H, W) grey or (H, W, C). Bare base64 is read too (the corruption check wrote it before 2.0's images
    became URIs); anything else is a TypeError, which the report shows as a figure that could not be drawn."""
    import numpy as np
    from PIL import Image

    if not isinstance(uri, str):
        raise TypeError(f"example image is a {type(uri).__name__}, not a PNG data URI: run the audit again")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[-1]))))


def image_grid(rows: list[list[str]], titles: list[list[str]], col_titles: list[str] | None = None) -> str:
    """A grid of small images (PNG data URIs), one row per example, drawn with nearest pixels."""
    n, m = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n, m, figsize=(1.7 * m, 1.8 * n), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(m):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(row):
                continue
            img = decode_png(row[j])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_title(titles[i][j], fontsize=7)
    if col_titles:
        for j, t in enumerate(col_titles):
            axes[0][j].set_title(f"{t}\n{axes[0][j].get_title()}", fontsize=7)
    fig.tight_layout()
    return to_uri(fig)


def adversarial_examples(ex: list[dict[str, Any]]) -> str:
    rows = [[e["clean"], e["adversarial"], e["perturbation"]] for e in ex]
    titles = [
        [f"clean: {e['clean_pred']}", f"ε={e['eps']:g}: {e['adv_pred']}", f"perturbation ×{e['perturbation_scale']:g}"]
        for e in ex
    ]
    return image_grid(rows, titles)


def score_histograms(hists: dict[str, Any]) -> str:
    """One panel per score: the in-distribution histogram filled, each OOD set as a step outline."""
    names = list(hists)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 2.9), squeeze=False)
    for ax, name in zip(axes[0], names):
        h = hists[name]
        edges = h["edges"]
        for i, (label, counts) in enumerate(h["counts"].items()):
            total = max(sum(counts), 1)
            dens = [c / total for c in counts]
            if label == "id":
                ax.stairs(dens, edges, fill=True, color=MUTED, alpha=0.6, label="in-distribution")
            else:
                ax.stairs(dens, edges, color=PALETTE[i % len(PALETTE)], lw=1.4, label=label)
        ax.set(title=name, xlabel="score (higher = more in-distribution)", ylabel="fraction")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return to_uri(fig)


def faithfulness_curves(curves: dict[str, Any]) -> str:
    """Mean deletion (left) and insertion (right) curves, one line per method."""
    x = curves["fraction"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for i, (method, ys) in enumerate(curves[kind].items()):
            ax.plot(x, ys, label=method, color=PALETTE[i % len(PALETTE)], lw=1.4)
        ax.set(xlabel=f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}", ylabel="probability")
        ax.set(title=f"{kind} ({'lower' if kind == 'deletion' else 'higher'} area is more faithful)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return to_uri(fig)


def saliency_examples(ex: dict[str, Any]) -> str:
    """Each example image beside its saliency map (grey 0..255) overlaid in inferno (the best method's)."""
    items = ex["items"]
    fig, axes = plt.subplots(2, len(items), figsize=(1.6 * len(items), 3.5), squeeze=False)
    for j, it in enumerate(items):
        img = decode_png(it["image"])
        grey = img.ndim == 2
        axes[0][j].imshow(img, cmap="gray" if grey else None, interpolation="nearest")
        axes[0][j].set_title(f"{'✓' if it['correct'] else '✗'} {it['pred']}\n(true {it['true']})", fontsize=6)
        axes[1][j].imshow(img, cmap="gray" if grey else None, interpolation="nearest")
        axes[1][j].imshow(decode_png(it["saliency"]), cmap="inferno", alpha=0.55, interpolation="bilinear")
        axes[0][j].axis("off")
        axes[1][j].axis("off")
    fig.suptitle(f"{ex['method']}: top row prediction, bottom row saliency", fontsize=8)
    fig.tight_layout()
    return to_uri(fig)


def risk_coverage(curves: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(5.6, 3.5))
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(c["coverage"], c["risk"], label=name, color=PALETTE[i % len(PALETTE)], lw=1.4)
    ax.set(xlabel="coverage (fraction of cases the model answers)", ylabel="risk (error rate among them)", xlim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return to_uri(fig)


def entropy_histograms(curves: dict[str, Any]) -> str:
    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        h = curves[name]
        for key, color in (("correct", ACCENT), ("wrong", "#dc2626")):
            total = max(sum(h[key]), 1)
            ax.stairs([c / total for c in h[key]], h["edges"], color=color, lw=1.4, label=key)
        ax.set(title=name, xlabel="predictive entropy (nats)", ylabel="fraction")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return to_uri(fig)


def group_bars(g: dict[str, Any]) -> str:
    """Accuracy per group with its bootstrap interval; group sizes under the bars."""
    names = [str(x) for x in g["groups"]]
    acc = g["accuracy"]
    lo = [a - ci[0] if ci else 0 for a, ci in zip(acc, g["accuracy_ci95"])]
    hi = [ci[1] - a if ci else 0 for a, ci in zip(acc, g["accuracy_ci95"])]
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.7 * len(names), 11), 3.2))
    ax.bar(range(len(names)), acc, yerr=[lo, hi], color=ACCENT, capsize=3)
    ax.set_xticks(range(len(names)), [f"{n}\n(n={c:,})" for n, c in zip(names, g["count"])], fontsize=7)
    ax.set(ylabel="accuracy", ylim=(max(0, min(acc) - 0.15), 1), title=f"{g['attribute']} ({g['kind']})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return to_uri(fig)


def slice_examples(slices: list[dict[str, Any]]) -> str:
    rows, titles = [], []
    for s in slices:
        rows.append(s["images"])
        titles.append(
            [
                f"slice {s['slice']} acc {s['accuracy']:.0%}\n{t} → {p}" if j == 0 else f"{t} → {p}"
                for j, (t, p) in enumerate(zip(s["true"], s["pred"]))
            ]
        )
    return image_grid(rows, titles)


def corruption_lines(c: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 4))
    cmap = plt.get_cmap("tab20")
    for i, (name, acc) in enumerate(c["series"].items()):
        ax.plot(c["severities"], acc, marker="o", ms=2.5, lw=1.1, color=cmap(i % 20), label=name)
    ax.axhline(c["clean"], ls="--", color=INK, lw=1)
    ax.set(xlabel="severity", ylabel="accuracy", ylim=(0, 1.02), xticks=c["severities"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return to_uri(fig)


def corruption_examples(ex: dict[str, Any]) -> str:
    names = list(ex["corrupted"])
    per_row = 7
    images = [ex["clean"], *ex["corrupted"].values()]
    titles = ["clean", *names]
    rows = [images[i : i + per_row] for i in range(0, len(images), per_row)]
    labels = [titles[i : i + per_row] for i in range(0, len(titles), per_row)]
    return image_grid(rows, labels)


def histogram(values: list[float], bins: int = 30, xlabel: str = "", ylabel: str = "count") -> str:
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.hist(values, bins=bins, color=ACCENT)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    return to_uri(fig)


MAX_BARS = 60  # more bars than this (1,000 ImageNet classes) show the lowest values only


def bars(labels: list[str], values: list[float], xlabel: str = "", xlim: tuple[float, float] | None = None) -> str:
    """Horizontal bars, the first label on top; of more than ``MAX_BARS``, the ``MAX_BARS`` lowest values."""
    total = len(labels)
    if total > MAX_BARS:
        keep = sorted(range(total), key=lambda i: values[i])[:MAX_BARS]
        labels, values = [labels[i] for i in keep], [values[i] for i in keep]
        xlabel = f"{xlabel} (the {MAX_BARS} lowest of {total:,})"
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 0.8))
    ax.barh([str(n) for n in labels[::-1]], values[::-1], color=ACCENT)
    ax.set(xlabel=xlabel)
    if xlim is not None:
        ax.set_xlim(*xlim)
    fig.tight_layout()
    return to_uri(fig)


def images(items: list[dict[str, str]] | dict[str, str], per_row: int = 7) -> str:
    """A grid of example images: a list of ``{"image": uri, "title": text}`` or a ``{title: uri}`` mapping."""
    pairs = list(items.items()) if isinstance(items, dict) else [(it.get("title", ""), it["image"]) for it in items]
    rows = [[uri for _, uri in pairs[i : i + per_row]] for i in range(0, len(pairs), per_row)]
    titles = [[t for t, _ in pairs[i : i + per_row]] for i in range(0, len(pairs), per_row)]
    return image_grid(rows, titles)


# Bespoke drawers a check may name (``{"kind": "drawer", "drawer": name}``) for a figure no generic kind draws.
# Each takes the value at the figure's ``curve`` path (the whole curves object when the path is empty).
DRAWERS: dict[str, Callable[[Any], str]] = {
    "reliability": reliability,
    "confusion": confusion,
    "corruption_lines": corruption_lines,
    "corruption_examples": corruption_examples,
    "adversarial_examples": adversarial_examples,
    "score_histograms": score_histograms,
    "faithfulness": faithfulness_curves,
    "saliency_examples": saliency_examples,
    "risk_coverage": risk_coverage,
    "entropy_histograms": entropy_histograms,
    "group_bars": group_bars,
    "slice_examples": slice_examples,
}


def _line(value: dict[str, Any], spec: dict[str, Any]) -> str:
    series = {label: value[key] for key, label in spec["series"].items()}
    return line_curves(value[spec["x"]], series, spec.get("xlabel", spec["x"]), spec.get("ylabel", ""))


def _bars(value: dict[str, Any], spec: dict[str, Any]) -> str:
    if "columns" in value:  # a table: labels and values name two of its columns
        cols = value["columns"]
        labels = [r[cols.index(spec["labels"])] for r in value["rows"]]
        values = [r[cols.index(spec["values"])] for r in value["rows"]]
    else:
        labels, values = value[spec["labels"]], value[spec["values"]]
    return bars(labels, values, spec.get("xlabel", ""), tuple(spec["xlim"]) if "xlim" in spec else None)


KINDS: dict[str, Callable[[Any, dict[str, Any]], str]] = {
    "line": _line,
    "bars": _bars,
    "histogram": lambda v, spec: histogram(
        v, spec.get("bins", 30), spec.get("xlabel", ""), spec.get("ylabel", "count")
    ),
    "images": lambda v, spec: images(v, spec.get("per_row", 7)),
    "drawer": lambda v, spec: DRAWERS[spec["drawer"]](v),
}


def draw(spec: dict[str, Any], section: dict[str, Any]) -> str:
    """One figure of a results.json section, drawn by its ``kind`` from the data its spec points at: ``curve``
    (a dotted path into the section's curves; empty for all of them) or ``table`` (a table's name).

    Raises KeyError naming what is missing (an unknown kind or drawer, a path the section lacks)."""
    if spec["kind"] not in KINDS:
        raise KeyError(f"unknown figure kind {spec['kind']!r}")
    if spec["kind"] == "drawer" and spec.get("drawer") not in DRAWERS:
        raise KeyError(f"unknown drawer {spec.get('drawer')!r}")
    if "table" in spec:
        value = section["tables"][spec["table"]]
    else:
        value = section.get("curves", {})
        for part in filter(None, spec.get("curve", "").split(".")):
            value = value[part]
    return KINDS[spec["kind"]](value, spec)
