"""Uncertainty and deferral: predictive distributions from four sources, their uncertainty, selective
prediction and the confidence threshold below which cases go to a human.

Sources: the plain softmax; MC dropout (Gal & Ghahramani 2016: T passes with dropout on and BatchNorm
in eval mode); deep ensembles (Lakshminarayanan et al. 2017: the softmax averaged with other runs'); and
test-time augmentation (flip and small shifts). For each, the predictive entropy H[p̄] splits into the
expected entropy E_t H[p_t] and the mutual information (BALD; Houlsby et al. 2011) H[p̄] − E_t H[p_t].

Selective prediction follows Geifman & El-Yaniv (2017) and Geifman et al. (2019): the risk–coverage
curve accepts the most confident cases first; AURC is its mean over all coverage levels and E-AURC
subtracts the AURC of a perfect ranking. Deferral picks the lowest confidence threshold whose accepted
cases reach a target accuracy, fitted on the validation split and then applied to the test split.

MC dropout samples the classifier's ``forward_head`` over ``forward_features``; a model without that feature
contract (ONNX, TorchScript) has it skipped with a note, while the other sources, which need only forward
passes, still run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pupil.audit.common import (
    CHECKS,
    Allowed,
    AuditContext,
    Check,
    at_least,
    figure,
    headline,
    names_from,
    subset_indices,
    table,
    validate_settings,
)
from pupil.data import ImageDataset
from pupil.errors import PupilError
from pupil.metrics import ece
from pupil.predict import predict_logits
from pupil.runtime import autocast, to_input

SOURCES = ("softmax", "mc_dropout", "tta", "ensemble")
DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
CURVE_POINTS = 200
ENTROPY_BINS = 20


# ---------------------------------------------------------------------------------------------------------------
# Pure functions of predictions


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last dimension (0 log 0 = 0). (..., K) -> (...)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def aggregate(passes: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean distribution p̄ (N, K), expected entropy E_t H[p_t] (N,) and the number of passes T, from T
    distributions (N, K) streamed one at a time (so T x N x K is never held)."""
    total, total_h, t = None, None, 0
    for p in passes:
        p = p.double()
        total = p.clone() if total is None else total + p
        total_h = entropy(p) if total_h is None else total_h + entropy(p)
        t += 1
    if total is None:
        raise ValueError("aggregate needs at least one pass")
    return total / t, total_h / t, t


def risk_coverage(conf: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage k/N and selective risk (error rate among the k most confident) for k = 1..N.

    Ties: cases of equal confidence cannot be told apart, so within a tie the risk at an intermediate
    coverage is its expectation over all orders of the tied cases (their errors are spread evenly);
    at the tie's end it is exact. The result is deterministic and independent of the input order.
    """
    n = len(conf)
    order = conf.double().argsort(descending=True, stable=True)
    c, err = conf.double()[order], (~correct.bool()[order]).double()
    _, counts = torch.unique_consecutive(c, return_counts=True)
    ends = counts.cumsum(0)
    starts = ends - counts
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), err.cumsum(0)])  # (N + 1,) errors among the first j
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (N,) tie group of each position
    a, b = starts[group], ends[group]
    k = torch.arange(1, n + 1, dtype=torch.float64)
    expected = cum[a] + (cum[b] - cum[a]) * (k - a) / (b - a)
    return k / n, expected / k


def aurc(conf: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk–coverage curve: the mean selective risk over coverage levels 1/N..1."""
    return risk_coverage(conf, correct)[1].mean().item()


def optimal_aurc(correct: torch.Tensor) -> float:
    """AURC of a perfect ranking (every correct case accepted before any error)."""
    n = len(correct)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return ((k - correct.sum()).clamp_min(0) / k).mean().item()


def deferral_threshold(conf: torch.Tensor, correct: torch.Tensor, target: float) -> float | None:
    """The lowest confidence threshold t such that the cases with confidence >= t reach accuracy >= target.

    Accepting ``conf >= t`` keeps ties together. Returns None where no non-empty accepted set reaches the
    target (then every case would have to be deferred).
    """
    if len(conf) == 0:
        return None
    order = conf.double().argsort(descending=True, stable=True)
    c, ok = conf.double()[order], correct.bool()[order].double()
    last = torch.ones(len(c), dtype=torch.bool)  # the last position of each tie group
    last[:-1] = c[1:] != c[:-1]
    k = torch.arange(1, len(c) + 1, dtype=torch.float64)
    valid = last & (ok.cumsum(0) >= target * k - 1e-9)
    if not valid.any():
        return None
    return c[valid.nonzero().max()].item()


def defer(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask (N,) of the cases to hand to a human: top-class probability below ``threshold``."""
    return probs.max(1).values < threshold


def summarize(probs: torch.Tensor, expected_h: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, ECE, mean entropies and mutual information, AURC and E-AURC of a source."""
    conf, pred = probs.max(1)
    correct = pred == y
    h = entropy(probs)
    a, opt = aurc(conf, correct), optimal_aurc(correct)
    return {
        "accuracy": correct.double().mean().item(),
        "nll": -probs.gather(1, y[:, None]).clamp_min(1e-300).log().mean().item(),
        "ece": ece(conf, correct),
        "predictive_entropy": h.mean().item(),
        "expected_entropy": expected_h.mean().item(),
        "mutual_information": (h - expected_h).clamp_min(0).mean().item(),
        "aurc": a,
        "optimal_aurc": opt,
        "e_aurc": a - opt,
    }


# ---------------------------------------------------------------------------------------------------------------
# Sources of predictive distributions


def has_dropout(net: nn.Module) -> bool:
    """True where the classifier has dropout to sample: a dropout layer with p > 0 or a ``drop_rate`` > 0.

    The layers of an opaque network (an ONNX session, a TorchScript module) are not ``nn.Dropout`` modules, so it
    counts as having none."""
    layers = isinstance(net, nn.Module) and any(isinstance(m, DROPOUT_LAYERS) and m.p > 0 for m in net.modules())
    rate = getattr(net, "drop_rate", 0)
    return layers or (isinstance(rate, int | float) and rate > 0)


@contextmanager
def mc_dropout(net: nn.Module) -> Iterator[None]:
    """Dropout in training mode, everything else (BatchNorm above all) in eval mode; restored afterwards."""
    was = net.training
    net.eval()
    for m in net.modules():
        if isinstance(m, DROPOUT_LAYERS) and m.p > 0:
            m.train()
    if float(getattr(net, "drop_rate", 0) or 0) > 0:
        # Only the classifier's own flag (not .train(), which would recurse into BatchNorm): the functional
        # dropout in ClassifierBase.forward_head (and timm's forward_head) reads self.training.
        net.training = True
    try:
        yield
    finally:
        net.train(was)


def dropout_in_features(net: nn.Module, x: torch.Tensor) -> bool:
    """Whether a dropout layer runs inside ``forward_features`` (then the features must be resampled).

    Runs in eval mode, so it draws no random numbers and leaves the MC passes' stream untouched."""
    was = net.training
    net.eval()
    fired = []
    hooks = [
        m.register_forward_hook(lambda *_: fired.append(1))
        for m in net.modules()
        if isinstance(m, DROPOUT_LAYERS) and m.p > 0
    ]
    try:
        net.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
        net.train(was)
    return bool(fired)


@torch.inference_mode()
def mc_dropout_passes(
    model: nn.Module, ds: ImageDataset, samples: int, batch_size: int, device, dtype, cl: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """MC dropout over ``ds``: (mean probs (N, K), expected entropy (N,), T).

    When no dropout layer runs inside ``forward_features`` the features are computed once per batch and
    only ``forward_head`` is sampled T times (the usual case: dropout before the classifier). The
    wrapper's flip TTA, if on, is kept: each pass averages the logits of the image and its mirror.
    """

    net = model.net
    means, hs = [], []
    resample_features = dropout_in_features(net, model.normalize(to_input(ds.images[:2], device, cl)))
    with mc_dropout(net):
        for chunk in ds.images.split(batch_size):
            x = model.normalize(to_input(chunk, device, cl))
            views = [x, x.flip(3)] if model.tta else [x]
            with autocast(device, dtype):
                feats = None if resample_features else [net.forward_features(v) for v in views]
            mean, h, _ = aggregate(_mc_batch(net, views, feats, samples, device, dtype))
            means.append(mean)
            hs.append(h)
    return torch.cat(means), torch.cat(hs), samples


def _mc_batch(net: nn.Module, views: list, feats: list | None, samples: int, device, dtype) -> Iterator[torch.Tensor]:
    """T softmax draws (B, K) for one batch; each averages the logits over the views (image, mirror)."""

    for _ in range(samples):
        with autocast(device, dtype):
            outs = [net(v) for v in views] if feats is None else [net.forward_head(f) for f in feats]
        yield (sum(o.float() for o in outs) / len(outs)).double().softmax(1).cpu()


def tta_views(samples: int, flip: bool, shift: int, seed: int) -> list[tuple[bool, int, int]]:
    """(flip, dy, dx) per view: the image itself, then its mirror (when flips are allowed), then seeded draws
    of a flip and a shift of up to ``shift`` pixels each way."""
    views = [(False, 0, 0)] + ([(True, 0, 0)] if flip else [])
    g = torch.Generator().manual_seed(seed)
    while len(views) < samples:
        f = bool(torch.randint(0, 2, (1,), generator=g)) and flip
        dy, dx = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
        views.append((f, dy, dx))
    return views[:samples]


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift images (B, C, H, W) down by dy and right by dx pixels, filling with zeros like the training crop."""
    if not (dy or dx):
        return x
    p = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    return F.pad(x, (p, p, p, p))[..., p - dy : p - dy + h, p - dx : p - dx + w]


@torch.inference_mode()
def tta_passes(
    model: nn.Module, ds: ImageDataset, views: list[tuple[bool, int, int]], batch_size: int, device, dtype, cl: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Test-time augmentation over ``ds``: one softmax per view, straight through ``model.net`` (so the
    wrapper's own flip averaging is not applied on top). Returns (mean probs, expected entropy, T)."""

    model.eval()
    means, hs = [], []
    for chunk in ds.images.split(batch_size):
        mean, h, _ = aggregate(_tta_batch(model, to_input(chunk, device, cl), views, device, dtype))
        means.append(mean)
        hs.append(h)
    return torch.cat(means), torch.cat(hs), len(views)


def _tta_batch(model: nn.Module, x: torch.Tensor, views: list, device, dtype) -> Iterator[torch.Tensor]:

    for f, dy, dx in views:
        v = translate(x.flip(3) if f else x, dy, dx)
        with autocast(device, dtype):
            out = model.net(model.normalize(v))
        yield out.double().softmax(1).cpu()


def load_members(ctx: AuditContext, members: list[str]) -> list:
    """The ensemble's other runs, refused unless their classes and input shape match this run's."""
    from pupil.run import load_run

    runs = []
    for path in members:
        run = load_run(path, device=ctx.device)
        if run.classes != ctx.run.classes:
            raise PupilError(f"ensemble member {path} has classes {run.classes}, but this run has {ctx.run.classes}")
        shape, ours = run.info["data"]["input_shape"], ctx.run.info["data"]["input_shape"]
        if shape != ours:
            raise PupilError(f"ensemble member {path} takes images of shape {shape}, but this run takes {ours}")
        runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------------------------
# The check


@dataclass
class UncertaintyConfig:
    mc_samples: int = 20
    """Stochastic passes for MC dropout."""
    tta_samples: int = 8
    """Views for test-time augmentation (the image, its mirror, then seeded flips and shifts)."""
    members: list[str] = field(default_factory=list)
    """Other run directories for the deep ensemble (same classes and input shape)."""
    target_accuracy: float = 0.99
    """Accuracy the accepted (not deferred) cases must reach."""
    sources: list[str] = field(default_factory=lambda: ["softmax", "mc_dropout", "tta", "ensemble"])
    """Sources of predictive distributions: softmax, mc_dropout, tta, ensemble."""
    n: int = 0
    """Evaluate on a seeded random subset of this many test (and validation) images (0: all)."""

    def __post_init__(self):
        # A distribution from one pass has no spread to measure; the plain softmax is always computed.
        twice = at_least(2)
        validate_settings(
            self,
            "uncertainty",
            mc_samples=twice,
            tta_samples=twice,
            target_accuracy=Allowed("{type} in (0, 1]", lambda v: 0 < v <= 1),
            sources=names_from(SOURCES, "uncertainty source", empty=True),
            n=at_least(0),
        )


@CHECKS.register("uncertainty")
class Uncertainty(Check):
    name, title, Config = "uncertainty", "Uncertainty and deferral", UncertaintyConfig
    shortcuts = {"members": "members"}
    quick = {"mc_samples": 8, "tta_samples": 4, "n": 1000}

    def run(self, ctx: AuditContext, cfg: UncertaintyConfig) -> dict:
        notes: list[str] = []
        splits = {"test": _subset(ctx, "test", cfg.n)}
        if ctx.val is not None:
            splits["val"] = _subset(ctx, "val", cfg.n)
        fit = "val" if "val" in splits else "test"
        if fit == "test":
            notes.append("no validation split: the deferral threshold was fitted on the test split itself (optimistic)")
        sources = self._sources(ctx, cfg, notes)
        y = {s: ds.targets for s, (ds, _) in splits.items()}
        metrics: dict = {"target_accuracy": cfg.target_accuracy, "fit_split": fit, "n": len(y["test"]), "sources": {}}
        metrics["skipped"] = [s for s in cfg.sources if s not in sources]
        rows, curves = [], {"risk_coverage": {}, "entropy_histogram": {}}
        for name, compute in sources.items():
            dist = {s: compute(s, ds, idx) for s, (ds, idx) in splits.items()}
            probs, expected_h, t = dist["test"]
            m = summarize(probs, expected_h, y["test"])
            m["passes"] = t
            m["deferral"] = _deferral(dist, y, fit, cfg.target_accuracy)
            metrics["sources"][name] = m
            d = m["deferral"]
            mi = m["mutual_information"] if t > 1 else None
            summary_cells = [m[c] for c in ("accuracy", "nll", "ece", "predictive_entropy")]
            deferral_cells = [d[c] for c in ("threshold", "test_coverage", "test_accuracy", "deferred")]
            rows.append([name, t, *summary_cells, mi, m["aurc"], m["e_aurc"], *deferral_cells])
            conf, pred = probs.max(1)
            correct = pred == y["test"]
            curves["risk_coverage"][name] = _downsample(*risk_coverage(conf, correct))
            curves["entropy_histogram"][name] = _histogram(entropy(probs), correct, probs.shape[1])
        soft = metrics["sources"]["softmax"]["deferral"]
        metrics["deferred"] = soft["deferred"]
        if not soft["reachable"]:
            notes.append(
                f"the plain softmax never reaches {cfg.target_accuracy:g} accuracy on the {fit} split at any "
                "threshold: every case would go to a human"
            )
        elif fit != "test" and not soft["meets_target_on_test"]:
            notes.append(
                f"the softmax threshold fitted on {fit} gives {soft['test_accuracy']:.4f} accuracy on the accepted "
                f"test cases, short of the {cfg.target_accuracy:g} target (the {fit} split is a finite sample)"
            )
        notes.append(
            "risk–coverage ties: cases of equal confidence are accepted together; inside a tie the risk is its "
            "expectation over the tied cases' orders"
        )
        notes.append(
            f"deferral: threshold fitted on the {fit} split (n={len(y[fit])}), then applied to the test split; "
            "a case is deferred when its top-class probability is below the threshold"
        )
        label = f"deferred for {cfg.target_accuracy * 100:g}% accuracy (softmax)"
        columns = ["source", "passes", "accuracy", "NLL", "ECE", "mean entropy", "mean MI", "AURC", "E-AURC"]
        columns += ["threshold", "coverage", "accepted accuracy", "deferred"]
        return {
            "headline": headline(label, soft["deferred"], False, "fraction"),
            "summary": {  # the plain softmax's figures
                "deferral_threshold": soft["threshold"],  # None when no threshold reaches the target
                "target_accuracy": cfg.target_accuracy,
                "deferred": soft["deferred"],
                "aurc": metrics["sources"]["softmax"]["aurc"],
            },
            "metrics": metrics,
            "tables": {"sources": table(columns, rows)},
            "curves": curves,
            "figures": [
                figure(
                    "Risk against coverage (selective prediction) per source",
                    "drawer",
                    "risk_coverage",
                    drawer="risk_coverage",
                ),
                figure(
                    "Predictive entropy of correct and wrong predictions",
                    "drawer",
                    "entropy_histogram",
                    drawer="entropy_histograms",
                ),
            ],
            "notes": notes,
        }

    def _sources(self, ctx: AuditContext, cfg: UncertaintyConfig, notes: list[str]) -> dict:
        """Name -> function (split, dataset, index) -> (mean probs, expected entropy, passes); softmax first."""
        model, kw = ctx.model, dict(device=ctx.device, dtype=ctx.dtype)
        wanted = cfg.sources

        def softmax(split: str, ds: ImageDataset, idx: torch.Tensor):
            p = ctx.logits(split)[idx].double().softmax(1)
            return p, entropy(p), 1

        out = {"softmax": softmax}
        if "mc_dropout" in wanted:
            if not ctx.features:
                notes.append(
                    "mc_dropout skipped: the model keeps no feature contract (forward_features, forward_head), "
                    "through which MC dropout samples the classifier (the other sources need forward passes only)"
                )
            elif has_dropout(model.net):

                def mc(split: str, ds: ImageDataset, idx: torch.Tensor):
                    torch.manual_seed(ctx.seed)
                    return mc_dropout_passes(model, ds, cfg.mc_samples, ctx.batch_size, **kw, cl=ctx.channels_last)

                out["mc_dropout"] = mc
            else:
                notes.append("mc_dropout skipped: the model has no dropout (train with drop_rate > 0 to use it)")
        if "tta" in wanted:
            data = ctx.run.info["config"]["data"]
            flip, pad = bool(data.get("flip", True)), int(data.get("crop_pad", 2) or 0)
            shift = pad or 2  # a run trained without crops still tolerates a 2-pixel shift on 28-pixel images
            views = tta_views(cfg.tta_samples, flip, shift, ctx.seed)
            out["tta"] = lambda split, ds, idx: tta_passes(model, ds, views, ctx.batch_size, **kw, cl=ctx.channels_last)
            notes.append(
                f"tta: {len(views)} views (flip, dy, dx) = {views}; "
                + ("flips as in training; " if flip else "no flips (the run was trained without them); ")
                + f"shifts up to {shift} px, zero-filled"
                + ("" if pad else " (the run was trained without crops)")
            )
        if "ensemble" in wanted:
            members = load_members(ctx, cfg.members)
            if members:

                def ensemble(split: str, ds: ImageDataset, idx: torch.Tensor):

                    def passes() -> Iterator[torch.Tensor]:
                        yield ctx.logits(split)[idx].double().softmax(1)
                        for r in members:
                            cl = r.info.get("runtime", {}).get("channels_last", False)
                            yield predict_logits(r.model, ds, ctx.batch_size, ctx.device, ctx.dtype, cl).softmax(1)

                    return aggregate(passes())

                out["ensemble"] = ensemble
                notes.append(f"ensemble: this run and {', '.join(r.name for r in members)}, softmax averaged")
            else:
                notes.append("ensemble skipped: no members given (set members to other run directories)")
        elif cfg.members:
            notes.append("members were given but the ensemble source is not among the sources: they were not used")
        return out


def _subset(ctx: AuditContext, split: str, n: int) -> tuple[ImageDataset, torch.Tensor]:
    ds = ctx.split(split)
    idx = subset_indices(len(ds), n, ctx.seed)
    return (ds, idx) if len(idx) == len(ds) else (ds.subset(idx), idx)


def _deferral(dist: dict, y: dict, fit: str, target: float) -> dict:
    """Fit the threshold on ``fit`` and apply it to the test split."""
    conf_fit, pred_fit = dist[fit][0].max(1)
    t = deferral_threshold(conf_fit, pred_fit == y[fit], target)
    correct = dist["test"][0].argmax(1) == y["test"]
    # Unreachable: no threshold works, so every case is deferred.
    accepted = ~defer(dist["test"][0], t) if t is not None else torch.zeros_like(correct)
    acc = correct[accepted].double().mean().item() if accepted.any() else None
    return {
        "threshold": t,
        "reachable": t is not None,
        "fit_coverage": (conf_fit >= t).double().mean().item() if t is not None else 0.0,
        "test_coverage": accepted.double().mean().item(),
        "test_accuracy": acc,
        "deferred": 1.0 - accepted.double().mean().item(),
        "meets_target_on_test": acc is not None and acc >= target,
    }


def _downsample(coverage: torch.Tensor, risk: torch.Tensor) -> dict[str, list[float]]:
    n = len(coverage)
    idx = torch.linspace(0, n - 1, min(n, CURVE_POINTS)).round().long().unique()
    return {"coverage": coverage[idx].tolist(), "risk": risk[idx].tolist()}


def _histogram(h: torch.Tensor, correct: torch.Tensor, k: int) -> dict[str, list]:
    """Entropy histograms of correct and wrong cases over [0, log K] (nats)."""
    top = math.log(max(k, 2))
    edges = torch.linspace(0, top, ENTROPY_BINS + 1, dtype=torch.float64)
    idx = (h / top * ENTROPY_BINS).long().clamp(0, ENTROPY_BINS - 1)
    return {
        "edges": edges.tolist(),
        "correct": torch.bincount(idx[correct], minlength=ENTROPY_BINS).tolist(),
        "wrong": torch.bincount(idx[~correct], minlength=ENTROPY_BINS).tolist(),
    }
