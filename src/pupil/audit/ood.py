"""Out-of-distribution detection: how well a per-image score tells the test split from images of other kinds.

The scores (msp, max_logit, energy, odin, mahalanobis, knn, vim) and the detection metrics (AUROC, AUPR-In,
AUPR-Out, FPR at 95% TPR) live in ``pupil.ood``, with their papers; this module is the check: it loads the OOD
sets, runs the model over them through the audit context, fits the feature statistics and compares the scores.
Every score is higher for inputs that look in-distribution; the ID test images are the positive class.

Logit scores use the wrapper's logits (flip-averaged when the run uses TTA); feature scores use the penultimate
features of the un-flipped image. Training features are those of a seeded subset of the run's train split.
ODIN needs gradients and the feature scores the model's feature contract (``forward_features``,
``forward_head(pre_logits=True)``); on a model without them (ONNX, TorchScript) those scores are skipped with a
note and the logit scores still run.

OOD sets: ``mnist-5k`` (near-OOD for Fashion-MNIST), ``digits`` (scikit-learn's 8x8 digits), ``noise`` (i.i.d.
N(0.5, 0.5^2) pixels clipped to [0, 1]) and ``uniform`` (i.i.d. U(0, 1) pixels), both seeded, or any dataset name,
image folder or CSV manifest that ``pupil.data.load`` accepts. Each is converted to the ID images' channels and
size and capped at ``n_ood`` images (seeded); the ID dataset itself, or a set mostly made of copies of its test
images, is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pupil.audit.common import (
    CHECKS,
    AuditContext,
    Check,
    above,
    at_least,
    figure,
    headline,
    names_from,
    subset_indices,
    table,
    validate_settings,
)
from pupil.errors import PupilError
from pupil.ood import (
    FITTED,
    SCORES,
    detection_metrics,
    energy,
    fit_knn,
    fit_mahalanobis,
    fit_vim,
    knn,
    linear_head,
    mahalanobis,
    max_logit,
    msp,
    odin,
    vim,
)

NOISE_SETS = ("noise", "uniform")
NOISE_STD = 0.5  # "noise": i.i.d. N(0.5, 0.5^2) per pixel, clipped to [0, 1]
HIST_SCORES = ("msp", "energy", "knn")  # histograms kept in results.json (plus the best score)
HIST_BINS = 30
NEEDS = {"odin": "gradients", **dict.fromkeys(FITTED, "features")}  # AuditContext flags beyond forward passes
LACKS = {
    "gradients": "the model gives no gradients",
    "features": "the model keeps no feature contract (forward_features, forward_head(pre_logits=True))",
}
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's RGB -> "L"


# ---------------------------------------------------------------------------------------------------------------
# Data: OOD sets converted to the ID images' shape, and one pass that gives logits and features.


def convert_images(images: torch.Tensor, shape: tuple[int, int, int], chunk: int = 1024) -> tuple[torch.Tensor, list]:
    """uint8 (N, C', H', W') -> uint8 (N, C, H, W): grey <-> RGB and a bilinear antialiased resize.

    Returns the images and what was done, in words.
    """
    c, h, w = shape
    n, c0, h0, w0 = images.shape
    done = []
    if c0 != c and not {c0, c} == {1, 3}:
        raise PupilError(f"cannot convert {c0}-channel images to the model's {c} channels")
    if c0 != c:
        done.append("grey repeated to RGB" if c == 3 else "RGB to grey (BT.601 luma)")
    if (h0, w0) != (h, w):
        done.append(f"resized {h0}x{w0} -> {h}x{w} (bilinear, antialiased)")
    if not done:
        return images, done
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    out = torch.empty(n, c, h, w, dtype=torch.uint8)
    for i in range(0, n, chunk):
        x = images[i : i + chunk].float()
        if c0 == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c0 == 3 and c == 1:
            x = (x * luma).sum(1, keepdim=True)
        if (h0, w0) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out, done


def _subset(n_total: int, n: int, seed: int) -> torch.Tensor | None:
    """A seeded random index of n of n_total items, or None when n is 0 or covers them all."""
    return None if not n or n >= n_total else subset_indices(n_total, n, seed)


def _refuse_id(name: str, id_name: str) -> None:
    a, b = Path(name), Path(id_name)
    if name == id_name or (a.exists() and b.exists() and a.resolve() == b.resolve()):
        raise PupilError(f"OOD set {name!r} is the in-distribution dataset itself; choose a different set")


def load_ood(name: str, shape: tuple[int, int, int], n: int, seed: int, id_name: str) -> tuple[torch.Tensor, list]:
    """Up to n OOD images (uint8, the ID shape) and notes on how they were made.

    ``noise`` and ``uniform`` are generated (seeded); any other name goes through ``pupil.data.load`` (all of
    its splits: none of it was seen in training). The ID dataset itself is refused.
    """
    g = torch.Generator().manual_seed(seed)
    if name == "noise":
        x = (0.5 + NOISE_STD * torch.randn(n, *shape, generator=g)).clamp(0, 1)
        return (x * 255).round().to(torch.uint8), [f"noise: {n} images of i.i.d. N(0.5, {NOISE_STD}^2) pixels, clipped"]
    if name == "uniform":
        x = torch.rand(n, *shape, generator=g)
        return (x * 255).round().to(torch.uint8), [f"uniform: {n} images of i.i.d. U(0, 1) pixels"]
    _refuse_id(name, id_name)
    from pupil.data import load

    ds = load(name, "all")
    notes = []
    idx = _subset(len(ds), n, seed)
    if idx is not None:
        notes.append(f"{name}: a seeded subset of {n} of its {len(ds)} images")
        ds = ds.subset(idx)
    images, done = convert_images(ds.images, shape)
    if done:
        notes.append(f"{name}: {'; '.join(done)}")
    return images, notes


def _hashes(images: torch.Tensor) -> list[bytes]:
    return [hashlib.blake2b(im.numpy().tobytes(), digest_size=16).digest() for im in images]


def forward_pass(
    model: nn.Module, images: torch.Tensor, ctx: AuditContext, batch_size: int, features: bool, logits: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Logits (N, K) from the wrapper and, when asked, penultimate features (N, D) of the un-flipped images."""

    net = model.net

    def run(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not features:
            return model(x), None
        fmap = net.forward_features(model.normalize(x))
        feats = net.forward_head(fmap, pre_logits=True)
        if not logits:
            return None, feats
        z = net.forward_head(fmap)
        if model.tta:  # the wrapper's flip average, reusing the un-flipped pass
            z = (z + net(model.normalize(x.flip(3)))) / 2
        return z, feats

    return ctx.forward(images, run, ctx.batch(batch_size))


def odin_pass(model: nn.Module, images: torch.Tensor, ctx: AuditContext, cfg: OODConfig) -> torch.Tensor:

    # ODIN perturbs the input along a gradient, so it needs autograd; odin() itself runs in fp32.
    return ctx.forward(
        images,
        lambda x: odin(model, x, cfg.odin_temperature, cfg.odin_epsilon),
        ctx.grad_batch(cfg.batch_size),
        grad=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# The check


@dataclass
class OODConfig:
    sets: list[str] = field(default_factory=lambda: ["mnist-5k", "digits", "noise", "uniform"])
    """OOD sets: dataset names, image folders, CSV manifests, or generated noise/uniform."""
    extra: list[str] = field(default_factory=list)
    """More OOD sets given by the user (the CLI's --ood)."""
    scores: list[str] = field(default_factory=lambda: list(SCORES))
    """Scores to compare (higher = more in-distribution)."""
    n_id: int = 0
    """In-distribution test images used (a seeded subset; 0 = the whole test split)."""
    n_ood: int = 2000
    """Images per OOD set at most (a seeded subset; generated sets have exactly this many)."""
    n_fit: int = 10000
    """Training images whose features fit Mahalanobis, KNN and ViM (a seeded subset of the train split)."""
    odin_temperature: float = 1000.0
    """ODIN's softmax temperature T."""
    odin_epsilon: float = 0.0014
    """ODIN's input step in [0, 1] pixel units (fixed, not tuned on validation data)."""
    knn_k: int = 50
    """KNN's k: the rank of the training neighbour whose distance is the score."""
    batch_size: int = 500
    """Images per forward pass."""

    def __post_init__(self):
        once = at_least(1)
        validate_settings(
            self,
            "ood",
            scores=names_from(SCORES, "OOD score"),
            n_id=at_least(0),
            n_ood=once,
            n_fit=once,
            odin_temperature=above(0),
            odin_epsilon=at_least(0),
            knn_k=once,
            batch_size=once,
        )
        sets = self.all_sets()
        if not sets:
            raise PupilError(f"ood.sets or ood.extra must name at least one OOD set, not {self.sets!r}, {self.extra!r}")
        if "id" in sets:
            raise PupilError("ood.sets and ood.extra must not name a set 'id' (the name of the in-distribution scores)")

    def all_sets(self) -> list[str]:
        """The sets and the extra ones, each once, in the order given."""
        return list(dict.fromkeys([*self.sets, *self.extra]))


@CHECKS.register("ood")
class OOD(Check):
    name, title, Config = "ood", "Out-of-distribution detection", OODConfig
    shortcuts = {"ood": "extra"}
    requires, extra = ("faiss", "mlxtend"), "trust"
    quick = {"n_id": 500, "n_ood": 300, "n_fit": 1000}

    def run(self, ctx: AuditContext, cfg: OODConfig) -> dict:
        model = ctx.model.eval()
        scores, skipped, notes = _runnable(ctx, list(dict.fromkeys(cfg.scores)))
        sets, id_name = cfg.all_sets(), ctx.run.info["data"]["dataset"]
        for name in sets:  # before any loading
            _refuse_id(name, id_name)
        id_images = ctx.test.images
        if (idx := _subset(len(id_images), cfg.n_id, ctx.seed)) is not None:
            id_images = id_images[idx]
            notes.append(f"in-distribution: a seeded subset of {cfg.n_id} of the {len(ctx.test)} test images")
        index = idx if idx is not None else torch.arange(len(id_images))  # into the test split
        images = {"id": id_images}
        id_hashes = set(_hashes(ctx.test.images))
        for name in sets:
            x, how = load_ood(name, ctx.test.shape, cfg.n_ood, ctx.seed, id_name)
            copies = 0 if name in NOISE_SETS else sum(h in id_hashes for h in _hashes(x))
            if copies > len(x) / 2:
                raise PupilError(f"OOD set {name!r}: {copies} of its {len(x)} images are test images of the run")
            if copies:
                how.append(f"{name}: {copies} images are exact copies of test images (kept)")
            images[name] = x
            notes += how

        counts = {k: len(v) for k, v in images.items()}
        train = self._fit_features(model, ctx, cfg, notes) if set(scores) & set(FITTED) else None
        if train is not None:
            counts["fit"] = len(train[0])
        per_score = self._score(model, images, train, ctx, cfg, scores, notes)
        out = self._summarise(per_score, sets, counts, notes, skipped)
        # For paired comparisons (pupil.report.paired): the headline score of the ID test images (which ones:
        # ``index``) and of each OOD set's images (``ood:<set name>``), from which its mean AUROC is recomputed.
        lead = per_score[out["summary"]["score"]]
        out["per_image"] = {"index": index.long(), "id": lead["id"], **{f"ood:{n}": lead[n] for n in sets}}
        return out

    def _score(self, model, images, train, ctx, cfg, scores, notes) -> dict[str, dict[str, torch.Tensor]]:
        """{score: {"id" or set name: scores (N,)}} for every score that could be computed."""
        fitted = [s for s in scores if s in FITTED]
        passes = {k: forward_pass(model, x, ctx, cfg.batch_size, bool(fitted)) for k, x in images.items()}
        out: dict[str, dict[str, torch.Tensor]] = {}
        plain = {"msp": msp, "max_logit": max_logit, "energy": energy}
        for s in scores:
            if s in plain:
                out[s] = {k: plain[s](z) for k, (z, _) in passes.items()}
            elif s == "odin":
                out[s] = {k: odin_pass(model, x, ctx, cfg) for k, x in images.items()}
                notes.append(
                    f"odin: T = {cfg.odin_temperature:g} and epsilon = {cfg.odin_epsilon:g} fixed, not tuned on "
                    "validation data; the step is taken in [0, 1] pixel space"
                )
        if not fitted:
            return out
        train_feats, train_y = train
        feats = {k: f for k, (_, f) in passes.items()}
        if "mahalanobis" in fitted:
            means, precision = fit_mahalanobis(train_feats, train_y, model.num_classes)
            out["mahalanobis"] = {k: mahalanobis(f, means, precision) for k, f in feats.items()}
            notes.append("mahalanobis: penultimate layer only, without input pre-processing or a layer ensemble")
        if "knn" in fitted:
            k = min(cfg.knn_k, len(train_feats))
            if k < cfg.knn_k:
                notes.append(f"knn: k lowered from {cfg.knn_k} to {k}, the number of training features")
            index = fit_knn(train_feats)
            out["knn"] = {name: knn(f, index, k) for name, f in feats.items()}
        if "vim" in fitted:
            head = linear_head(model, images["id"][:8].to(ctx.device).float().div(255))
            if isinstance(head, str):
                notes.append(f"vim skipped: {head}")
            else:
                fit = fit_vim(train_feats, *head)
                out["vim"] = {k: vim(f, fit) for k, f in feats.items()}
        if model.tta:  # penultimate features of a flip average would be a different layer's statistics
            notes.append("feature scores (mahalanobis, knn, vim) use the un-flipped image; logit scores the TTA logits")
        return {s: out[s] for s in scores if s in out}

    def _fit_features(self, model, ctx, cfg, notes) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            train, source = ctx.run.split("train"), "train"
        except PupilError as e:
            if ctx.val is None:
                raise PupilError(f"the ood check's feature scores need the training split: {e}") from None
            train, source = ctx.val, "val"
            notes.append(f"training split unavailable ({e}); feature statistics fitted on the val split")
        if (idx := _subset(len(train), cfg.n_fit, ctx.seed)) is not None:
            train = train.subset(idx)
        notes.append(f"feature statistics (mahalanobis, knn, vim) fitted on {len(train)} {source} images")
        _, feats = forward_pass(model, train.images, ctx, cfg.batch_size, features=True, logits=False)
        return feats, train.targets

    def _summarise(self, per_score, sets, counts, notes, skipped) -> dict:
        metrics = {"sets": {}, "mean": {}, "n": {"id": counts["id"], "ood": {s: counts[s] for s in sets}}}
        metrics["skipped"] = skipped
        if "fit" in counts:
            metrics["n"]["fit"] = counts["fit"]
        rows = []
        for name in sets:
            metrics["sets"][name] = {s: detection_metrics(v["id"], v[name]) for s, v in per_score.items()}
            rows += [[name, s, *m.values()] for s, m in metrics["sets"][name].items()]
        for s in per_score:
            keys = ("auroc", "aupr_in", "aupr_out", "fpr95")
            metrics["mean"][s] = {m: float(np.mean([metrics["sets"][n][s][m] for n in sets])) for m in keys}
            rows.append(["mean", s, *metrics["mean"][s].values()])
        best = max(metrics["mean"], key=lambda s: metrics["mean"][s]["auroc"])
        metrics["best_score"] = best
        # Headline: MSP's mean AUROC, not the best score's. MSP is the baseline every softmax classifier has and
        # needs nothing fitted, so the number compares across runs; the best of seven scores picked on these very
        # OOD sets would be optimistically biased. The table and metrics["best_score"] show the others.
        lead = "msp" if "msp" in per_score else next(iter(per_score))
        label = f"OOD AUROC ({lead}, mean over {len(sets)} set{'s' if len(sets) > 1 else ''})"
        hist_scores = [s for s in per_score if s in HIST_SCORES or s == best]
        return {
            "headline": headline(label, metrics["mean"][lead]["auroc"], True, "fraction"),
            "summary": {  # the headline score's means over the OOD sets
                "mean_auroc": metrics["mean"][lead]["auroc"],
                "mean_fpr95": metrics["mean"][lead]["fpr95"],
                "score": lead,
                "best_score": best,
            },
            "metrics": metrics,
            "tables": {"ood": table(["set", "score", "AUROC", "AUPR-In", "AUPR-Out", "FPR@95TPR"], rows)},
            "curves": {"histograms": {s: histograms(per_score[s]) for s in hist_scores}},
            "figures": [
                figure(
                    "Score histograms: in-distribution test images against each OOD set (the end bins are open-ended)",
                    "drawer",
                    "histograms",
                    drawer="score_histograms",
                )
            ],
            "notes": notes,
        }


def _runnable(ctx: AuditContext, scores: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The requested scores the model allows, those skipped, and one note per missing capability.

    Raises PupilError when none is left, naming the scores to request instead."""
    lacking = [flag for flag in LACKS if not getattr(ctx, flag)]
    run = [s for s in scores if NEEDS.get(s) not in lacking]
    skipped = [s for s in scores if s not in run]
    if not run:
        instead = [s for s in SCORES if NEEDS.get(s) not in lacking]
        raise PupilError(
            f"ood: {'; '.join(LACKS[f] for f in lacking)}, so none of the scores {', '.join(scores)} can run; "
            f"request {', '.join(instead)} instead (--set ood.scores={','.join(instead)})"
        )
    notes = []
    for flag in lacking:
        if gone := [s for s in skipped if NEEDS[s] == flag]:
            were = "was" if len(gone) == 1 else "were"
            notes.append(f"{LACKS[flag]}: {', '.join(gone)} {were} skipped")
    if notes:
        notes[-1] += f"; {', '.join(run)} ran"
    return run, skipped, notes


def histograms(values: dict[str, torch.Tensor], bins: int = HIST_BINS) -> dict:
    """Counts per group over shared equal-width bins spanning the 0.5-99.5% quantiles of all the scores
    (values beyond fall into the end bins, so a far-away set does not squash the rest into one bin)."""
    pooled = torch.cat(list(values.values())).double()
    lo, hi = torch.quantile(pooled, torch.tensor([0.005, 0.995], dtype=torch.float64)).tolist()
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    counts = {}
    for k, v in values.items():
        idx = (torch.bucketize(v.double(), edges, right=True) - 1).clamp(0, bins - 1)
        counts[k] = torch.bincount(idx, minlength=bins).tolist()
    return {"edges": edges.tolist(), "counts": counts}
