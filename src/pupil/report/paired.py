"""Paired tests between two audits of the same test images: is NEW better than BASE, worse, or within noise?

Two models scored on the same images make paired observations, so their difference is measured far more
precisely than two separate confidence intervals suggest (an image both get wrong says nothing about which is
better). The figures come from the per-image files the audit writes beside results.json
(``pupil.results.read_per_image``); two audits pair only when ``per_image_identity`` matches (same images, split,
budget, seed, precision and TTA) and the classes agree.

Figures and tests (all at a 95% level; ``difference`` is always NEW minus BASE):

- ``accuracy.top1``: McNemar's test (McNemar 1947), the exact conditional form: with b images that only BASE
  gets right and c that only NEW gets right, p = min(1, 2 P[X <= min(b, c)]) for X ~ Binomial(b + c, 1/2)
  (1 when b + c = 0), as ``statsmodels.stats.contingency_tables.mcnemar(exact=True)``; no mid-p correction.
  Its interval is the paired bootstrap's, like the other figures'.
- ``accuracy.macro_f1``, ``calibration.ece`` (15 equal-width bins, as ``pupil.metrics.ece``, from the accuracy
  check's test logits), ``corruption.mean_corrupted_top1`` (the mean over corruptions, severities and the scored
  subset) and ``ood.mean_auroc`` (the headline score's AUROC, averaged over the OOD sets): a paired percentile
  bootstrap (Efron & Tibshirani 1993, ch. 13 and 16). Each replicate draws image indices with replacement once
  and scores both models on the same draw; for OOD the in-distribution images and each OOD set are drawn
  separately (one draw of each per replicate). The interval is the 2.5-97.5% percentiles of the replicated
  differences d*. The two-sided p-value inverts that interval: p = min(1, 2 min(1 + #{d* <= 0}, 1 + #{d* >= 0})
  / (B + 1)), the smallest level at which a percentile interval excludes 0 (Davison & Hinkley 1997, eq. 4.11, with
  its +1 so that p is never 0); ties at 0 count on both sides, so identical models get p = 1.

Holm's step-down correction (Holm 1979) runs across every figure compared; a figure is "better" or "worse" when
its Holm-adjusted p is below 0.05, in the direction that is better for that figure (lower ECE is better), and
"no significant difference" otherwise. A figure one audit lacks is listed under ``not_compared`` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pupil.errors import PupilError
from pupil.metrics import ece as ece_of
from pupil.results import load_results, per_image_identity, read_per_image

ALPHA = 0.05
N_BINS = 15  # ECE bins, as the calibration check's default and pupil.metrics.ece
CHUNK = 200  # bootstrap replicates drawn at once: bounds memory at 200 x N indices
# figure -> (check whose per-image file holds its data, label, higher is better)
FIGURES: dict[str, tuple[str, str, bool]] = {
    "accuracy.top1": ("accuracy", "top-1 accuracy", True),
    "accuracy.macro_f1": ("accuracy", "macro-F1", True),
    "calibration.ece": ("accuracy", "ECE (15 bins)", False),
    "corruption.mean_corrupted_top1": ("corruption", "mean corruption accuracy", True),
    "ood.mean_auroc": ("ood", "OOD mean AUROC", True),
}
PER_IMAGE_CHECKS = ("accuracy", "corruption", "ood")
FLAGS = {"seed": "--seed", "budget": "--budget", "precision": "--precision"}  # pupil audit's flags for identity keys
DEFAULTS = {"seed": 0, "budget": "quick", "precision": "fp32"}


# ---------------------------------------------------------------------------------------------------------------
# Statistics: pure functions of per-image arrays and resampled indices, each tested against a naive loop.


def mcnemar(base_correct: torch.Tensor, new_correct: torch.Tensor) -> dict[str, Any]:
    """Exact McNemar test on two (N,) bool vectors of the same images: the discordant counts and the two-sided p."""
    from scipy.special import bdtr  # the binomial CDF (scipy.stats costs a second to import)

    b = int((base_correct & ~new_correct).sum())  # only BASE right
    c = int((~base_correct & new_correct).sum())  # only NEW right
    p = 1.0 if b + c == 0 else min(1.0, 2 * float(bdtr(min(b, c), b + c, 0.5)))
    return {"base_only": b, "new_only": c, "p": p}


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest is max over j <= i of
    min(1, (m - j + 1) p_(j))."""
    m = len(p)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def resamples(sizes: tuple[int, ...], n_bootstrap: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Bootstrap draws in chunks of at most ``CHUNK`` replicates: per chunk, one (b, n) tensor of indices drawn with
    replacement for each group size n in ``sizes``, in that order, from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n_bootstrap, CHUNK):
        b = min(CHUNK, n_bootstrap - start)
        yield tuple(torch.randint(0, n, (b, n), generator=g) for n in sizes)


def paired_bootstrap(
    stat: Callable[..., torch.Tensor], sizes: tuple[int, ...], n_bootstrap: int, seed: int
) -> torch.Tensor:
    """(B, 2) replicates of a statistic of both models: ``stat(*idx)`` gets one (b, n) index tensor per group of
    ``resamples`` and returns (b, 2), BASE's and NEW's value on the same draw."""
    return torch.cat([stat(*idx) for idx in resamples(sizes, n_bootstrap, seed)])


def bootstrap_summary(boot: torch.Tensor) -> dict[str, Any]:
    """The 95% percentile interval of the replicated differences NEW - BASE and the two-sided p-value that inverts
    it, p = min(1, 2 min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (B + 1))."""
    d = (boot[:, 1] - boot[:, 0]).double()
    q = torch.quantile(d, torch.tensor([ALPHA / 2, 1 - ALPHA / 2], dtype=torch.float64))
    below, above = int((d <= 0).sum()), int((d >= 0).sum())
    p = min(1.0, 2 * min(1 + below, 1 + above) / (len(d) + 1))
    return {"ci95": [q[0].item(), q[1].item()], "p": p}


def top1(correct: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Accuracy (b,) of each resample (b, N) of a (N,) bool vector."""
    return correct[idx].double().mean(1)


def macro_f1(y: torch.Tensor, pred: torch.Tensor, k: int, idx: torch.Tensor) -> torch.Tensor:
    """Macro-F1 (b,) of each resample over the classes present in truth or predictions (as the accuracy check and
    scikit-learn). F1 = 2 TP / (support + predicted) per class, from (b, K) counts: no (b, K, K) confusion
    matrices, which a thousand classes would make gigabytes."""
    b = idx.shape[0]
    offsets = torch.arange(b)[:, None] * k

    def counts(labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        w = None if weights is None else weights[idx].flatten().double()
        return torch.bincount((labels[idx] + offsets).flatten(), w, minlength=b * k).reshape(b, k).double()

    support, predicted = counts(y), counts(pred)
    tp = counts(y, (pred == y).double())
    present = (support > 0) | (predicted > 0)
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp_min(1), 0.0)
    return f1.sum(1) / present.sum(1)


def ece(conf: torch.Tensor, correct: torch.Tensor, idx: torch.Tensor, n_bins: int = N_BINS) -> torch.Tensor:
    """ECE (b,) of each resample, binned as ``pupil.metrics.ece``: sum over bins of |sum(correct - conf)| / N."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = (torch.bucketize(conf.double(), edges, right=True) - 1).clamp(0, n_bins - 1)
    gap = correct.double() - conf.double()
    b, n = idx.shape
    cell = bins[idx] + torch.arange(b)[:, None] * n_bins
    sums = torch.bincount(cell.flatten(), gap[idx].flatten(), minlength=b * n_bins).reshape(b, n_bins)
    return sums.abs().sum(1) / n


def auroc(pos: torch.Tensor, neg: torch.Tensor, ipos: torch.Tensor, ineg: torch.Tensor) -> torch.Tensor:
    """AUROC (b,) of each resample of positives (b, n_pos) and negatives (b, n_neg), a tie counting one half
    (Mann-Whitney U / (n_pos n_neg), equal to ``pupil.ood.auroc``'s trapezoid): each negative's multiplicity in the
    draw is counted, cumulated over the sorted negatives, and read off at every positive's rank."""
    b, n_neg = ineg.shape
    order = neg.double().argsort()
    sorted_neg = neg.double()[order]
    weight = torch.zeros(b, n_neg, dtype=torch.float64).scatter_add_(1, ineg, torch.ones(b, n_neg, dtype=torch.float64))
    cum = torch.cat([torch.zeros(b, 1, dtype=torch.float64), weight[:, order].cumsum(1)], 1)  # (b, n_neg + 1)
    lt = torch.searchsorted(sorted_neg, pos.double(), right=False)  # negatives strictly below each positive
    le = torch.searchsorted(sorted_neg, pos.double(), right=True)
    wins = cum[:, lt] + 0.5 * (cum[:, le] - cum[:, lt])  # (b, n_pos): drawn negatives beaten by each positive
    return wins.gather(1, ipos).sum(1) / (ipos.shape[1] * n_neg)


# ---------------------------------------------------------------------------------------------------------------
# Loading and refusing


def _open(path: str | Path) -> tuple[dict[str, Any], Path]:
    path = Path(path)
    results = load_results(path)
    return results, path if path.is_dir() else path.parent


def _flag(key: str, value: Any) -> str:
    """``pupil audit``'s flag that sets an identity key to ``value`` (results.json spells bf16 "torch.bfloat16")."""
    return f"{FLAGS[key]} {'bf16' if value == 'torch.bfloat16' else value}"


def _rerun(run_dir: Path, audit: dict[str, Any], check: str) -> str:
    """The command that rewrites ``check``'s section and per-image file with the audit's own settings."""
    flags = "".join(f" {_flag(k, audit[k])}" for k in FLAGS if audit.get(k, DEFAULTS[k]) != DEFAULTS[k])
    return f"`pupil audit {run_dir} --checks {check}{flags}`"


def _refuse_mismatch(base: dict[str, Any], new: dict[str, Any], names: tuple[Path, Path]) -> None:
    if base["run"]["classes"] != new["run"]["classes"]:
        raise PupilError(
            f"{names[0]} and {names[1]} have different classes ({len(base['run']['classes'])} vs "
            f"{len(new['run']['classes'])}, or in another order): a paired test needs the same test images and labels"
        )
    a, b = per_image_identity(base["audit"]), per_image_identity(new["audit"])
    if differ := [k for k in a if a[k] != b[k]]:
        said = "; ".join(f"{k} {a[k]} vs {b[k]}" if k != "fingerprint" else "data fingerprint" for k in differ)
        flags = " ".join(_flag(k, a[k]) for k in differ if k in FLAGS)
        todo = f"audit {names[1]} again with {flags}" if flags else "audit both on the same data and settings"
        raise PupilError(
            f"{names[0]} and {names[1]} were audited on different images or settings ({said}); "
            f"a paired test needs the same ones: {todo}"
        )


def _per_image(results: dict[str, Any], run_dir: Path, check: str) -> dict[str, torch.Tensor]:
    tensors = read_per_image(run_dir, check, results["audit"])
    if tensors is None:
        raise PupilError(
            f"{run_dir} has no per-image figures of its {check} check that belong to its results.json (missing, or "
            f"written by another audit); {_rerun(run_dir, results['audit'], check)} rewrites them"
        )
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# The figures


def _accuracy_figures(base: dict, new: dict, n_bootstrap: int, seed: int, where: tuple[Path, Path]) -> list[dict]:
    y = base["targets"].long()
    if not torch.equal(y, new["targets"].long()):
        raise PupilError(f"{where[0]} and {where[1]} have different test labels: a paired test needs the same ones")
    z0, z1 = base["logits"].double(), new["logits"].double()
    k = z0.shape[1]
    p0, p1 = z0.argmax(1), z1.argmax(1)
    c0, c1 = p0 == y, p1 == y
    conf0, conf1 = z0.softmax(1).amax(1), z1.softmax(1).amax(1)
    n = len(y)
    every = torch.arange(n)[None]  # the observed sample as one "resample"
    out = []

    boot = paired_bootstrap(lambda i: torch.stack([top1(c0, i), top1(c1, i)], 1), (n,), n_bootstrap, seed)
    test = mcnemar(c0, c1)
    out.append(
        {
            "figure": "accuracy.top1",
            "base": top1(c0, every).item(),
            "new": top1(c1, every).item(),
            "ci95": bootstrap_summary(boot)["ci95"],
            "p": test["p"],
            "test": "McNemar (exact binomial on the discordant pairs)",
            "discordant": {"base_only": test["base_only"], "new_only": test["new_only"]},
            "n": n,
        }
    )
    f1 = lambda i: torch.stack([macro_f1(y, p0, k, i), macro_f1(y, p1, k, i)], 1)
    out.append(_bootstrapped("accuracy.macro_f1", f1, (n,), n_bootstrap, seed, n))
    stat = lambda i: torch.stack([ece(conf0, c0, i), ece(conf1, c1, i)], 1)
    row = _bootstrapped("calibration.ece", stat, (n,), n_bootstrap, seed, n)
    row["base"], row["new"] = ece_of(conf0, c0, N_BINS), ece_of(conf1, c1, N_BINS)  # exactly the audit's function
    out.append(row)
    return out


def _bootstrapped(figure: str, stat: Callable, sizes: tuple[int, ...], n_bootstrap: int, seed: int, n: int) -> dict:
    observed = stat(*(torch.arange(s)[None] for s in sizes))[0]
    boot = paired_bootstrap(stat, sizes, n_bootstrap, seed)
    return {
        "figure": figure,
        "base": observed[0].item(),
        "new": observed[1].item(),
        **bootstrap_summary(boot),
        "test": "paired bootstrap",
        "n": n,
    }


def _corruption_figure(
    base: dict, new: dict, names: tuple[list, list], n_bootstrap: int, seed: int
) -> dict[str, Any] | str:
    """The paired mean corruption accuracy, or why it cannot be compared."""
    if not torch.equal(base["index"], new["index"]):
        return "the two audits scored different subsets of test images (corruption.n differs)"
    if names[0] != names[1] or not torch.equal(base["severities"], new["severities"]):
        return f"the two audits ran different corruptions or severities ({names[0]} vs {names[1]})"
    # Every (corruption, severity) cell holds the same images, so the mean over cells is the mean over images of
    # each image's share of corrupted copies classified correctly.
    a0 = base["correct"].double().mean((0, 1))  # (n,)
    a1 = new["correct"].double().mean((0, 1))
    stat = lambda i: torch.stack([a0[i].mean(1), a1[i].mean(1)], 1)
    return _bootstrapped("corruption.mean_corrupted_top1", stat, (len(a0),), n_bootstrap, seed, len(a0))


def _ood_figure(base: dict, new: dict, scores: tuple[str, str], n_bootstrap: int, seed: int) -> dict[str, Any] | str:
    """The paired mean AUROC over the OOD sets, or why it cannot be compared."""
    if scores[0] != scores[1]:
        return f"the headline OOD scores differ ({scores[0]} vs {scores[1]})"
    if not torch.equal(base["index"], new["index"]):
        return "the two audits used different in-distribution test images (ood.n_id differs)"
    sets = sorted(k for k in base if k.startswith("ood:"))
    if sets != sorted(k for k in new if k.startswith("ood:")):
        return "the two audits used different OOD sets"
    if any(len(base[s]) != len(new[s]) for s in sets):
        return "the two audits used OOD sets of different sizes (ood.n_ood differs)"

    def stat(i_id: torch.Tensor, *i_sets: torch.Tensor) -> torch.Tensor:
        vals = [torch.stack([auroc(r["id"], r[s], i_id, i) for s, i in zip(sets, i_sets)]).mean(0) for r in (base, new)]
        return torch.stack(vals, 1)

    sizes = (len(base["id"]), *(len(base[s]) for s in sets))
    row = _bootstrapped("ood.mean_auroc", stat, sizes, n_bootstrap, seed, sizes[0])
    row["n_ood"] = {s.removeprefix("ood:"): len(base[s]) for s in sets}
    return row


def paired(base_dir: str | Path, new_dir: str | Path, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Paired tests of NEW against BASE on the same test images (see the module docstring for each test).

    Args:
        base_dir: the reference run directory (or its results.json).
        new_dir: the candidate run directory (or its results.json).
        n_bootstrap: bootstrap replicates per figure.
        seed: seeds the bootstrap draws (each figure's draws start from it).

    Returns:
        ``{"base", "new", "n_bootstrap", "seed", "alpha", "figures": [...], "not_compared": [...]}``; each figure
        has its name, label, higher_is_better, base, new, difference, ci95, p, p_holm, test, n and verdict.

    Raises:
        PupilError: the audits differ in classes, labels, images or settings (``per_image_identity``), a check that
            ran on both lacks its per-image file (the message names the ``pupil audit`` that rewrites it), or no
            figure can be compared.
    """
    (base, bdir), (new, ndir) = _open(base_dir), _open(new_dir)
    where = (bdir, ndir)
    _refuse_mismatch(base, new, where)
    data: dict[str, tuple[dict, dict]] = {}
    skipped: dict[str, str] = {}
    for check in PER_IMAGE_CHECKS:
        lacking = [(d, r) for d, r in ((bdir, base), (ndir, new)) if check not in r["checks"]]
        if not lacking:
            data[check] = (_per_image(base, bdir, check), _per_image(new, ndir, check))
        elif len(lacking) == 2:
            skipped[check] = f"the {check} check ran on neither run"
        else:
            d, r = lacking[0]
            skipped[check] = f"the {check} check did not run on {d} ({_rerun(d, r['audit'], check)} runs it)"

    rows: list[dict[str, Any]] = []
    not_compared: list[dict[str, str]] = []
    if "accuracy" in data:
        rows += _accuracy_figures(*data["accuracy"], n_bootstrap, seed, where)
    if "corruption" in data:
        names = tuple(r["checks"]["corruption"]["metrics"]["corruptions"] for r in (base, new))
        got = _corruption_figure(*data["corruption"], names, n_bootstrap, seed)
        if isinstance(got, str):
            skipped["corruption"] = got
        else:
            rows.append(got)
    if "ood" in data:
        scores = tuple(r["checks"]["ood"]["summary"]["score"] for r in (base, new))
        got = _ood_figure(*data["ood"], scores, n_bootstrap, seed)
        if isinstance(got, str):
            skipped["ood"] = got
        else:
            rows.append(got)
    for figure, (check, _, _) in FIGURES.items():
        if check in skipped:
            not_compared.append({"figure": figure, "reason": skipped[check]})
    if not rows:
        raise PupilError(f"nothing to pair between {bdir} and {ndir}: {'; '.join(dict.fromkeys(skipped.values()))}")
    for row, p_holm in zip(rows, holm([r["p"] for r in rows])):
        _, label, higher = FIGURES[row["figure"]]
        row.update(label=label, higher_is_better=higher, difference=row["new"] - row["base"], p_holm=p_holm)
        row["verdict"] = verdict(row["difference"], p_holm, higher)
    order = list(FIGURES)
    rows.sort(key=lambda r: order.index(r["figure"]))
    return {
        "base": {"dir": str(bdir), "name": base["run"]["name"]},
        "new": {"dir": str(ndir), "name": new["run"]["name"]},
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "alpha": ALPHA,
        "figures": [_ordered(r) for r in rows],
        "not_compared": not_compared,
    }


KEYS = ("figure", "label", "higher_is_better", "base", "new", "difference", "ci95", "p", "p_holm", "verdict", "test")


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    return {**{k: row[k] for k in KEYS}, **{k: v for k, v in row.items() if k not in KEYS}}


def verdict(difference: float, p_holm: float, higher_is_better: bool) -> str:
    """ "better", "worse" or "no significant difference" (Holm-adjusted p at or above 0.05, or no difference)."""
    if p_holm >= ALPHA or difference == 0:
        return "no significant difference"
    return "better" if (difference > 0) == higher_is_better else "worse"
