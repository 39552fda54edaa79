"""Accuracy: top-1/top-5, precision/recall/F1 (macro and weighted), per-class table, confusion matrix,
bootstrap confidence intervals, the most confused class pairs, and for ordered labels quadratic
weighted kappa and sensitivity/specificity at a threshold.

Metric functions are pure and work from a confusion matrix, so each has a short test against
scikit-learn or torchmetrics. The confusion matrix and per-class precision/recall/F1 (``prf``) live in
``pupil.metrics``, shared with the fairness check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pupil.audit.common import CHECKS, AuditContext, Check, at_least, figure, headline, table, validate_settings
from pupil.errors import PupilError
from pupil.metrics import confusion_matrix, prf

WORST_CLASSES = 3  # classes of lowest recall in the summary (the model card lists them)


def averages(cm: torch.Tensor) -> dict[str, float]:
    """Macro and support-weighted precision/recall/F1 over the classes present in truth or predictions."""
    p = prf(cm)
    present = (p["support"] > 0) | (cm.sum(0) > 0)  # sklearn averages over labels seen in y_true or y_pred
    w = p["support"] / p["support"].sum()
    out = {}
    for m in ("precision", "recall", "f1"):
        out[f"macro_{m}"] = p[m][present].mean().item()
        out[f"weighted_{m}"] = (p[m] * w).sum().item()
    return out


def bootstrap_ci(
    y: torch.Tensor, pred: torch.Tensor, k: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals for top-1 and macro-F1; all resamples are done in one batched bincount."""
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    cell = y * k + pred  # (N,)
    out: dict[str, list[float]] = {"top1": [], "macro_f1": []}
    top1s, f1s = [], []
    for chunk in range(0, n_boot, 200):
        b = min(200, n_boot - chunk)
        idx = torch.randint(0, n, (b, n), generator=g)  # (B, N)
        offsets = torch.arange(b)[:, None] * (k * k)
        cms = torch.bincount((cell[idx] + offsets).flatten(), minlength=b * k * k).reshape(b, k, k)  # (B, K, K)
        top1s.append(cms.diagonal(dim1=1, dim2=2).sum(1).double() / n)
        p = prf(cms)
        present = (p["support"] > 0) | (cms.sum(1) > 0)
        f1s.append((p["f1"] * present).sum(1) / present.sum(1))
    for key, vals in (("top1", torch.cat(top1s)), ("macro_f1", torch.cat(f1s))):
        q = torch.quantile(vals, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=vals.dtype))
        out[key] = [q[0].item(), q[1].item()]
    return out


def quadratic_weighted_kappa(cm: torch.Tensor) -> float:
    """Cohen's kappa with quadratic weights (Cohen 1968) for ordered classes."""
    cm = cm.double()
    k = cm.shape[0]
    i = torch.arange(k, dtype=torch.float64)
    w = (i[:, None] - i[None, :]) ** 2 / max((k - 1) ** 2, 1)
    expected = cm.sum(1)[:, None] * cm.sum(0)[None, :] / cm.sum()
    denom = (w * expected).sum()
    return 1.0 - ((w * cm).sum() / denom).item() if denom > 0 else 1.0


def most_confused(cm: torch.Tensor, classes: list[str], top: int = 10) -> list[list]:
    off = cm.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    order = flat.argsort(descending=True)[:top]
    k = cm.shape[0]
    rows = []
    for o in order.tolist():
        t, p = divmod(o, k)
        if flat[o] == 0:
            break
        rows.append([classes[t], classes[p], int(flat[o]), flat[o].item() / max(cm[t].sum().item(), 1)])
    return rows


@dataclass
class AccuracyConfig:
    n_bootstrap: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    ordered: bool = False
    """The classes are ordered grades (adds quadratic weighted kappa)."""
    positive_from: int | None = None
    """With ordered classes: class index from which a case counts as positive (adds sensitivity/specificity)."""

    def __post_init__(self):
        # positive_from 0 would make every case positive; its upper bound, the class count, is checked in run.
        validate_settings(self, "accuracy", n_bootstrap=at_least(1), positive_from=at_least(1))


@CHECKS.register("accuracy")
class Accuracy(Check):
    name, title, Config = "accuracy", "Accuracy", AccuracyConfig
    quick = {"n_bootstrap": 500}

    def run(self, ctx: AuditContext, cfg: AccuracyConfig) -> dict:
        logits, y = ctx.logits("test"), ctx.targets("test")
        k = logits.shape[1]
        classes = ctx.run.classes
        if cfg.positive_from is not None and cfg.positive_from >= k:
            raise PupilError(f"accuracy.positive_from must be a class index from 1 to {k - 1}, not {cfg.positive_from}")
        pred = logits.argmax(1)
        cm = confusion_matrix(y, pred, k)
        kk = min(5, k)
        metrics = {
            "top1": (pred == y).double().mean().item(),
            f"top{kk}": (logits.topk(kk, 1).indices == y[:, None]).any(1).double().mean().item(),
            **averages(cm),
            "n": len(y),
        }
        ci = bootstrap_ci(y, pred, k, cfg.n_bootstrap, ctx.seed)
        metrics["ci95"] = ci
        p = prf(cm)
        per_class = [
            [c, int(p["support"][i]), p["precision"][i].item(), p["recall"][i].item(), p["f1"][i].item()]
            for i, c in enumerate(classes)
        ]
        if cfg.ordered:
            metrics["quadratic_weighted_kappa"] = quadratic_weighted_kappa(cm)
        if cfg.positive_from is not None:
            pos_true, pos_pred = y >= cfg.positive_from, pred >= cfg.positive_from
            metrics["sensitivity"] = (pos_true & pos_pred).sum().item() / max(pos_true.sum().item(), 1)
            metrics["specificity"] = (~pos_true & ~pos_pred).sum().item() / max((~pos_true).sum().item(), 1)
        notes = []
        index = (ctx.run.info.get("source") or {}).get("class_index")
        if index is not None:  # the data's classes are some of the model's: say which protocol, give both
            full = ctx.forward(ctx.split("test").images, lambda x: ctx.model.net.full(ctx.model.normalize(x)))
            total = full.shape[1]
            metrics["protocol"] = f"restricted to the {k} mapped classes of the model's {total:,}"
            metrics["top1_all_classes"] = (full.argmax(1) == torch.tensor(index)[y]).double().mean().item()
            notes.append(
                f"top-1 is over the {k} classes of the data (the model's outputs for them); over all "
                f"{total:,} of the model's classes it is {metrics['top1_all_classes']:.2%}"
            )
        else:
            metrics["protocol"] = f"all {k} classes"
        chance = 1 / k
        if k > 1 and ci["top1"][1] < chance + 0.1 * (1 - chance):  # the interval's top within 10% of chance
            notes.append(
                f"top-1 ({metrics['top1']:.1%}) is near chance ({chance:.1%} for {k} classes): the preprocessing "
                "may be wrong (mean and std, input range 0-1 or 0-255, RGB or BGR channel order) or the class order"
            )
        worst = sorted(per_class, key=lambda row: row[3])[:WORST_CLASSES]  # stable: ties keep the class order
        summary = {
            "top1": metrics["top1"],
            "top1_ci95": ci["top1"],
            "top5": metrics.get("top5"),  # None with fewer than 5 classes (metrics then has top{k})
            "macro_f1": metrics["macro_f1"],
            "macro_f1_ci95": ci["macro_f1"],
            "worst_classes": [[row[0], row[3]] for row in worst],  # [[class, recall], ...]
        }
        return {
            "headline": headline("top-1 accuracy", metrics["top1"], True, "fraction", ci["top1"]),
            "summary": summary,
            "metrics": metrics,
            "per_image": {"logits": logits, "targets": y},  # for paired comparisons (pupil compare)
            "tables": {
                "per_class": table(["class", "support", "precision", "recall", "f1"], per_class),
                "most_confused": table(
                    ["true", "predicted", "count", "fraction of true class"], most_confused(cm, classes)
                ),
            },
            "curves": {"confusion_matrix": {"classes": classes, "counts": cm.tolist()}},
            "figures": [
                figure(
                    "Confusion matrix (row-normalised colour, counts)", "drawer", "confusion_matrix", drawer="confusion"
                ),
                figure(
                    "F1 per class",
                    "bars",
                    table="per_class",
                    labels="class",
                    values="f1",
                    xlabel="F1 per class",
                    xlim=[0, 1],
                ),
            ],
            "notes": notes,
        }
