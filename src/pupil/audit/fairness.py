"""Fairness across groups: per-group accuracy, macro-F1, ECE and per-class recall through fairlearn's
``MetricFrame`` (Weerts et al. 2023), the gaps between groups with percentile-bootstrap intervals, the
equalised-odds difference (Hardt, Price & Srebro 2016), and slice discovery.

Groups come from a per-sample column of the evaluation data (a CSV manifest's extra column); without
one, from a declared stand-in attribute computed from the images (brightness terciles), which the notes
name as a proxy. Slice discovery always runs: k-means on the model's L2-normalised penultimate features,
a simple member of the family of slice-discovery methods compared by Eyuboglu et al. (2022, Domino), so
that failure modes no column names still surface. A model without the feature contract (ONNX, TorchScript) is
clustered on its softmax probabilities instead, with a note.

Equalised odds is defined for binary outcomes; for K classes this check reports the largest one-vs-rest
``fairlearn.metrics.equalized_odds_difference`` over the classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from pupil.audit.common import CHECKS, AuditContext, Check, at_least, figure, headline, one_of, table, validate_settings
from pupil.errors import PupilError
from pupil.metrics import ece, prf
from pupil.results import png_data_uri

PROXIES = ("brightness", "none")
BRIGHTNESS = ["dark", "medium", "bright"]
WORST_SLICES = 3
THUMBNAIL = 28  # slice example images in results.json are at most this many pixels on a side
N_BINS = 15


# ---------------------------------------------------------------------------------------------------------------
# Groups and their metrics


def brightness_terciles(images: torch.Tensor) -> list[str]:
    """The declared stand-in attribute: mean pixel intensity of (N, C, H, W) images in three equal-count bins
    (ties broken by position, so the split is deterministic)."""
    n = len(images)
    means = torch.cat([chunk.double().mean((1, 2, 3)) for chunk in images.split(1024)])  # streamed images too
    order = means.argsort(stable=True)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    return [BRIGHTNESS[r] for r in (rank * 3 // max(n, 1)).tolist()]


def _ece(y_true, y_pred, conf) -> float:
    return ece(torch.as_tensor(np.asarray(conf)), torch.as_tensor(np.asarray(y_true) == np.asarray(y_pred)), N_BINS)


def _recall(y_true, y_pred, c: int) -> float:
    from sklearn.metrics import recall_score

    return recall_score(np.asarray(y_true) == c, np.asarray(y_pred) == c, zero_division=np.nan)


def metric_frame(y: np.ndarray, pred: np.ndarray, conf: np.ndarray, groups: list[str], k: int):
    """fairlearn ``MetricFrame`` of accuracy, macro-F1, ECE (15 bins) and recall of each class (``recall/<c>``,
    NaN in a group without that class) by group."""
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import accuracy_score, f1_score

    metrics = {
        "accuracy": accuracy_score,
        "macro_f1": partial(f1_score, average="macro", zero_division=0),
        "ece": _ece,
    }
    metrics |= {f"recall/{c}": partial(_recall, c=c) for c in range(k)}
    return MetricFrame(
        metrics=metrics,
        y_true=y,
        y_pred=pred,
        sensitive_features=np.asarray(groups, dtype=object),
        sample_params={"ece": {"conf": conf}},
    )


def equalized_odds(y: np.ndarray, pred: np.ndarray, groups: list[str], k: int) -> list[float]:
    """One-vs-rest equalised-odds difference of each class (fairlearn; a rate with no cases counts as 0 there).
    The multiclass figure is their maximum."""
    from fairlearn.metrics import equalized_odds_difference

    sf = np.asarray(groups, dtype=object)
    return [float(equalized_odds_difference(y == c, pred == c, sensitive_features=sf)) for c in range(k)]


def group_stats(
    y: torch.Tensor,
    pred: torch.Tensor,
    conf: torch.Tensor,
    codes: torch.Tensor,
    n_groups: int,
    k: int,
    index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-group figures, batched over resamples, from per-group confusion matrices.

    ``index`` (B, N) holds resampled positions (None: the data as given, B = 1). Returns ``count``,
    ``accuracy``, ``macro_f1``, ``ece`` (B, G) and ``tpr``, ``fpr`` (B, G, K) one-vs-rest, with fairlearn's
    conventions (macro-F1 over the classes present in truth or prediction; a rate with no cases is 0).
    Accuracy, macro-F1 and ECE are NaN for a group absent from a resample.
    """
    n = len(y)
    index = torch.arange(n)[None] if index is None else index
    b = len(index)
    yy, pp, cc = y[index], pred[index], conf.double()[index]  # (B, N)
    bg = torch.arange(b)[:, None] * n_groups + codes[index]  # (B, N) flat (resample, group)
    cm = torch.bincount(((bg * k + yy) * k + pp).flatten(), minlength=b * n_groups * k * k)
    cm = cm.reshape(b, n_groups, k, k).double()  # (B, G, K, K) rows = truth
    count = cm.sum((-1, -2))
    tp = cm.diagonal(dim1=-2, dim2=-1)  # (B, G, K)
    support, predicted = cm.sum(-1), cm.sum(-2)
    absent = torch.where(count > 0, 0.0, math.nan)
    p = prf(cm)
    present = (support > 0) | (predicted > 0)
    macro_f1 = (p["f1"] * present).sum(-1) / present.sum(-1).clamp_min(1) + absent
    # ECE: sum over bins of |sum(correct) - sum(conf)| / n, the same 15 equal-width bins as calibration.ece.
    edges = torch.linspace(0, 1, N_BINS + 1, dtype=torch.float64)
    bins = (torch.bucketize(cc, edges, right=True) - 1).clamp(0, N_BINS - 1)
    key = (bg * N_BINS + bins).flatten()
    size = b * n_groups * N_BINS
    s_conf = torch.bincount(key, cc.flatten(), minlength=size).reshape(b, n_groups, N_BINS)
    s_ok = torch.bincount(key, (yy == pp).double().flatten(), minlength=size).reshape(b, n_groups, N_BINS)
    negatives = count[..., None] - support
    return {
        "count": count,
        "accuracy": tp.sum(-1) / count.clamp_min(1) + absent,
        "macro_f1": macro_f1,
        "ece": (s_ok - s_conf).abs().sum(-1) / count.clamp_min(1) + absent,
        "tpr": torch.where(support > 0, tp / support.clamp_min(1), 0.0),
        "fpr": torch.where(negatives > 0, (predicted - tp) / negatives.clamp_min(1), 0.0),
    }


def spread(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """max - min over the groups present: (..., G) -> (...)."""
    hi = values.masked_fill(~present, -math.inf).max(-1).values
    lo = values.masked_fill(~present, math.inf).min(-1).values
    return hi - lo


def gaps(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Largest differences between groups (B,): accuracy, macro-F1, ECE and the multiclass equalised odds."""
    present = stats["count"] > 0
    out = {m: spread(stats[m], present) for m in ("accuracy", "macro_f1", "ece")}
    per_class = present[..., None].expand_as(stats["tpr"]).transpose(-1, -2)  # (B, K, G)
    tpr = spread(stats["tpr"].transpose(-1, -2), per_class)
    fpr = spread(stats["fpr"].transpose(-1, -2), per_class)
    out["equalized_odds"] = torch.maximum(tpr, fpr).max(-1).values
    return out


def bootstrap_gaps(
    y: torch.Tensor,
    pred: torch.Tensor,
    conf: torch.Tensor,
    codes: torch.Tensor,
    n_groups: int,
    k: int,
    n_boot: int,
    seed: int,
    alpha: float = 0.05,
) -> dict[str, list]:
    """Percentile-bootstrap intervals of the gaps and of each group's accuracy.

    Images are resampled from the whole set (so group sizes vary too), with a seeded generator, in
    chunks that keep the (B, G, K, K) confusion matrices small.
    """
    n = len(y)
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, min(n_boot, 2**24 // max(n, n_groups * k * k)))
    draws: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n_boot, chunk):
        index = torch.randint(0, n, (min(chunk, n_boot - start), n), generator=g)
        stats = group_stats(y, pred, conf, codes, n_groups, k, index)
        for key, v in {**gaps(stats), "group_accuracy": stats["accuracy"]}.items():
            draws.setdefault(key, []).append(v)
    q = [alpha / 2, 1 - alpha / 2]
    out = {}
    for key, parts in draws.items():
        v = torch.cat(parts).numpy()
        if v.ndim == 2:  # (B, G): a group absent from a resample is NaN there
            out[key] = [[_num(x) for x in col] for col in np.nanquantile(v, q, axis=0).T]
        else:
            out[key] = [_num(x) for x in np.quantile(v, q)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Slice discovery


def penultimate_features(ctx: AuditContext, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features (N, num_features), float32 on the CPU, without the wrapper's flip TTA."""
    model = ctx.model.eval()
    net = model.net
    return ctx.forward(images, lambda x: net.forward_head(net.forward_features(model.normalize(x)), pre_logits=True))


def slice_embedding(ctx: AuditContext) -> tuple[torch.Tensor, str]:
    """What slice discovery clusters (N, D) and its name: the penultimate features where the model keeps the
    feature contract, else the softmax probabilities of the shared test logits (flip-averaged under TTA)."""
    if ctx.features:
        return penultimate_features(ctx, ctx.test.images), "penultimate"
    return ctx.logits("test").double().softmax(1).float(), "softmax"


def discover_slices(
    feats: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, n_slices: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """k-means (seeded) on L2-normalised features. Returns each sample's slice (N,), its distance to the
    slice's centre (N,), and one row per slice, worst accuracy first (ties: larger slice first). A row
    names the slice's dominant true class and its commonest confusion (true, predicted class indices)."""
    from sklearn.cluster import KMeans

    x = F.normalize(feats.double(), dim=1).numpy()
    k = max(1, min(n_slices, len(x)))
    km = KMeans(n_clusters=k, random_state=seed, n_init=3).fit(x)
    labels = torch.as_tensor(km.labels_, dtype=torch.long)
    dist = torch.as_tensor(km.transform(x)).gather(1, labels[:, None]).squeeze(1)
    correct = pred == y
    n_classes = int(max(y.max(), pred.max())) + 1
    rows = []
    for s in range(k):
        members = labels == s
        size = int(members.sum())
        if not size:
            continue
        counts = torch.bincount(y[members])
        wrong = members & ~correct
        pairs = torch.bincount(y[wrong] * n_classes + pred[wrong], minlength=n_classes * n_classes)
        rows.append(
            {
                "slice": s,
                "size": size,
                "accuracy": correct[members].double().mean().item(),
                "errors": int(wrong.sum()),
                "dominant_class": int(counts.argmax()),
                "dominant_share": counts.max().item() / size,
                "confusion": list(divmod(int(pairs.argmax()), n_classes)) if wrong.any() else None,
            }
        )
    rows.sort(key=lambda r: (r["accuracy"], -r["size"]))
    return labels, dist, rows


# ---------------------------------------------------------------------------------------------------------------
# The check


@dataclass
class FairnessConfig:
    groups: str = ""
    """Per-sample column of the evaluation data holding the group (a CSV manifest's extra column)."""
    proxy: str = "brightness"
    """Stand-in attribute when no column is given: brightness (terciles of mean intensity) or none (slices only)."""
    min_group: int = 30
    """Groups with fewer images are flagged as too small to trust."""
    n_boot: int = 200
    """Bootstrap resamples for the 95% intervals of the gaps."""
    slices: int = 10
    """k-means clusters of penultimate features for slice discovery."""
    slice_examples: int = 6
    """Example images kept for each of the worst slices (errors first)."""

    def __post_init__(self):
        validate_settings(
            self,
            "fairness",
            proxy=one_of(*PROXIES),
            min_group=at_least(0),
            n_boot=at_least(1),
            slices=at_least(1),
            slice_examples=at_least(0),
        )


@CHECKS.register("fairness")
class Fairness(Check):
    name, title, Config = "fairness", "Fairness across groups", FairnessConfig
    shortcuts = {"groups": "groups"}
    requires, extra = ("fairlearn",), "trust"
    quick = {"n_boot": 100}

    def run(self, ctx: AuditContext, cfg: FairnessConfig) -> dict:
        logits, y = ctx.logits("test"), ctx.targets("test")
        classes, k = ctx.run.classes, logits.shape[1]
        conf, pred = logits.double().softmax(1).max(1)
        notes: list[str] = []
        feats, embedding = slice_embedding(ctx)
        if embedding == "softmax":
            notes.append(
                "the model keeps no feature contract (forward_head(pre_logits=True)): slice discovery clustered its "
                "softmax probabilities instead of its penultimate features"
            )
        labels, dist, slices = discover_slices(feats, y, pred, cfg.slices, ctx.seed)
        groups, attribute, kind, order = self._groups(ctx, cfg, labels, notes)
        position = {g: i for i, g in enumerate(order)}
        codes = torch.tensor([position[g] for g in groups])

        mf = metric_frame(y.numpy(), pred.numpy(), conf.numpy(), groups, k)
        eod = equalized_odds(y.numpy(), pred.numpy(), groups, k)
        boot = bootstrap_gaps(y, pred, conf, codes, len(order), k, cfg.n_boot, ctx.seed)
        count = torch.bincount(codes, minlength=len(order)).tolist()
        support = torch.bincount(codes * k + y, minlength=len(order) * k).reshape(len(order), k)  # (G, K)
        by = mf.by_group
        per_group = {
            g: {
                "n": count[i],
                "small": count[i] < cfg.min_group,
                "accuracy": _num(by.loc[g, "accuracy"]),
                "accuracy_ci95": boot["group_accuracy"][i],
                "macro_f1": _num(by.loc[g, "macro_f1"]),
                "ece": _num(by.loc[g, "ece"]),
                "recall": {c: _num(by.loc[g, f"recall/{j}"]) for j, c in enumerate(classes)},
                "support": dict(zip(classes, support[i].tolist(), strict=True)),
            }
            for i, g in enumerate(order)
        }
        gap = _gap_rows(mf, order, classes, boot, count, support)
        gap["equalized_odds"] = {
            "difference": max(eod),
            "ratio": None,
            "worst_group": None,
            "worst_value": None,
            "worst_n": None,
            "ci95": boot["equalized_odds"],
            "per_class": dict(zip(classes, eod, strict=True)),
        }
        small = [g for g, v in per_group.items() if v["small"]]
        notes += _caveats(cfg, attribute, order, small, gap, ctx.seed)
        for s in slices:
            s["dominant_class"] = classes[s["dominant_class"]]
            s["confusion"] = [classes[c] for c in s["confusion"]] if s["confusion"] else None
        examples = [self._examples(ctx, s, labels, dist, pred, cfg.slice_examples) for s in slices[:WORST_SLICES]]
        acc_gap = gap["accuracy"]
        label = f"accuracy gap between {attribute} groups"
        return {
            "headline": headline(label, acc_gap["difference"], False, "fraction", acc_gap["ci95"]),
            "summary": {
                "accuracy_gap": acc_gap["difference"],
                "accuracy_gap_ci95": acc_gap["ci95"],
                "attribute": attribute,
                "attribute_kind": kind,  # column, proxy or slices
            },
            "metrics": {
                "attribute": attribute,
                "attribute_kind": kind,
                "n": len(y),
                "groups": per_group,
                "small_groups": small,
                "gaps": gap,
                "slices": slices,
                "slice_embedding": embedding,  # penultimate features, or softmax probabilities without them
            },
            "tables": _tables(per_group, gap, slices, classes),
            "figures": [
                figure("Accuracy per group with 95% bootstrap intervals", "drawer", "groups", drawer="group_bars"),
                figure(
                    "The worst discovered slices: samples (true → predicted)",
                    "drawer",
                    "slice_examples",
                    drawer="slice_examples",
                ),
            ],
            "curves": {
                "groups": {
                    "attribute": attribute,
                    "kind": kind,
                    "groups": order,
                    "count": count,
                    **{m: [v[m] for v in per_group.values()] for m in ("accuracy", "accuracy_ci95", "macro_f1", "ece")},
                },
                "slice_examples": examples,
            },
            "notes": notes,
        }

    def _groups(
        self, ctx: AuditContext, cfg: FairnessConfig, labels: torch.Tensor, notes: list[str]
    ) -> tuple[list[str], str, str, list[str]]:
        """(group of each test image, attribute name, kind: column/proxy/slices, group order)."""
        if cfg.groups:
            cols = ctx.test.columns
            if cfg.groups not in cols:
                have = ", ".join(sorted(cols)) or "none (give a CSV manifest with extra columns)"
                raise PupilError(f"the test data has no column {cfg.groups!r}; available columns: {have}")
            groups = [str(v).strip() or "(blank)" for v in cols[cfg.groups]]
            return groups, cfg.groups, "column", sorted(set(groups))
        name = ctx.run.info["data"]["dataset"]
        if cfg.proxy == "brightness":
            notes.append(
                f"PROXY: no group column was given, so the groups are a declared stand-in, not a demographic "
                f"attribute: brightness terciles (mean pixel intensity in three equal-count bins). {name} carries "
                "no demographic attribute; these gaps show how performance varies with brightness, not how fair "
                "the model is to people"
            )
            groups = brightness_terciles(ctx.test.images)
            return groups, "brightness", "proxy", [g for g in BRIGHTNESS if g in groups]
        notes.append(
            "no group column and proxy none: the groups are the discovered slices (k-means clusters of the "
            "model's features), not an attribute, so their gaps are large by construction"
        )
        groups = [f"slice {s}" for s in labels.tolist()]
        return groups, "slice", "slices", sorted(set(groups), key=lambda g: int(g.split()[1]))

    def _examples(self, ctx: AuditContext, s: dict, labels, dist, pred, count: int) -> dict:
        """A slice's example images: its errors nearest the centre first, then its nearest correct cases."""
        members = (labels == s["slice"]).nonzero().squeeze(1)
        correct = pred[members] == ctx.test.targets[members]
        chosen = members[(dist[members] + 1e6 * correct.double()).argsort(stable=True)[:count]]  # errors first
        classes = ctx.run.classes
        return {
            "slice": s["slice"],
            "size": s["size"],
            "accuracy": s["accuracy"],
            "dominant_class": s["dominant_class"],
            "index": chosen.tolist(),
            "images": [png_data_uri(ctx.test.images[i], THUMBNAIL) for i in chosen.tolist()],
            "true": [classes[i] for i in ctx.test.targets[chosen].tolist()],
            "pred": [classes[i] for i in pred[chosen].tolist()],
        }


def _caveats(cfg: FairnessConfig, attribute: str, order: list[str], small: list[str], gap: dict, seed: int) -> list:
    notes = []
    if small:
        notes.append(f"groups with fewer than {cfg.min_group} images (figures unreliable): {', '.join(small)}")
    thin = [
        f"{m} ({v['worst_n']} in {v['worst_group']})"
        for m, v in gap.items()
        if m.startswith("recall/") and v["worst_n"] < cfg.min_group
    ]
    if thin:
        notes.append(f"recall gaps whose worst group has fewer than {cfg.min_group} cases: {', '.join(thin)}")
    if len(order) < 2:
        notes.append(f"only one {attribute} group in the test data: there is nothing to compare")
    notes.append(
        "equalised odds (multiclass): the largest one-vs-rest fairlearn equalized_odds_difference over the "
        "classes; fairlearn counts a rate with no cases in a group as 0"
    )
    notes.append(f"intervals: percentile bootstrap over {cfg.n_boot} resamples of the whole test set (seed {seed})")
    return notes


def _tables(per_group: dict, gap: dict, slices: list[dict], classes: list[str]) -> dict:
    group_rows = [
        [g, v["n"], v["small"], v["accuracy"], *v["accuracy_ci95"], v["macro_f1"], v["ece"]]
        for g, v in per_group.items()
    ]
    gap_cols = ["worst_group", "worst_value", "worst_n", "difference", "ratio"]
    gap_rows = [[m, *(v[c] for c in gap_cols), *(v["ci95"] or [None, None])] for m, v in gap.items()]
    slice_cols = ["slice", "size", "accuracy", "errors", "dominant_class", "dominant_share"]
    slice_rows = [[*(s[c] for c in slice_cols), " -> ".join(s["confusion"] or [])] for s in slices]
    return {
        "groups": table(["group", "n", "small", "accuracy", "ci95 low", "ci95 high", "macro-F1", "ECE"], group_rows),
        "recall": table(["group", *classes], [[g, *v["recall"].values()] for g, v in per_group.items()]),
        "gaps": table(
            ["metric", "worst group", "worst value", "worst n", "difference", "ratio", "ci95 low", "ci95 high"],
            gap_rows,
        ),
        "slices": table(
            ["slice", "size", "accuracy", "errors", "dominant class", "dominant share", "top confusion"], slice_rows
        ),
    }


def _gap_rows(
    mf, order: list[str], classes: list[str], boot: dict, count: list[int], support: torch.Tensor
) -> dict[str, dict]:
    """Difference, ratio and worst group of each MetricFrame metric (worst: lowest, or highest for ECE), and
    ``worst_n``, the number of cases behind the worst figure (the group's size; for a class's recall, the
    class's cases in that group)."""
    by, diff, ratio = mf.by_group.loc[order], mf.difference(), mf.ratio()
    out = {}
    for col in by.columns:
        v = by[col].astype(float)
        if v.isna().all():
            continue
        worst = v.idxmax() if col == "ece" else v.idxmin()
        name = f"recall/{classes[int(col.split('/')[1])]}" if col.startswith("recall/") else col
        out[name] = {
            "difference": _num(diff[col]),
            "ratio": _num(ratio[col]),
            "worst_group": str(worst),
            "worst_value": _num(v[worst]),
            "worst_n": int(support[order.index(worst), int(col.split("/")[1])])
            if col.startswith("recall/")
            else count[order.index(worst)],
            "ci95": boot.get(col),
        }
    return out


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v
