"""Split conformal prediction sets for classifiers: sets of labels that hold the true one with a chosen probability.

Three conformity scores, each a function E(x, y, u) of the softmax p = softmax(logits / T) (larger = stranger):

    THR  (Sadinle et al. 2019, "Least ambiguous set-valued classifiers"):  E = 1 - p_y
    APS  (Romano et al. 2020, "Classification with valid and adaptive coverage"):
         E = rho(y) + u * p_y,             rho(y) = the mass of the labels ranked above y
    RAPS (Angelopoulos et al. 2021, "Uncertainty sets for image classifiers using conformal prediction"):
         E = rho(y) + u * p_y + lambda * (o(y) - k_reg)^+,   o(y) = y's rank, 1 for the most probable label

Split conformal: on n calibration images the threshold q is the ceil((n + 1)(1 - alpha))-th smallest score (the
finite-sample correction); it is +inf, the set of every label, when that rank exceeds n (too few images for the
level). A new image's set is {y : E(x, y, u) <= q}; over exchangeable images it holds the true label with
probability at least 1 - alpha, and with u ~ U(0, 1) drawn independently per image (the randomized form, as in
both papers) at most 1 - alpha + 1/(n + 1) for continuous scores.

Non-randomized APS and RAPS follow the papers' code (and MAPIE's ``include_last_label=True``): the calibration
scores take u = 1 (the mass up to and including y) and a set keeps every label up to and including the first one
whose score reaches q, so it is never empty; coverage is at least 1 - alpha, often more. Every set is a prefix of
the labels sorted by probability (E grows with the rank), so a set is stored as its size.

RAPS's k_reg and lambda follow the paper's code (``pick_kreg``, ``pick_lamda_size``): on a tuning part disjoint
from the calibration images, k_reg is the ``higher`` (1 - alpha) quantile of the true labels' ranks, and lambda
the value of (0.001, 0.01, 0.1, 0.2, 0.5) whose sets, calibrated and measured on the tuning part, are smallest.

Pure torch on the CPU (float64), in row chunks so that a 1,000-class model's sets take bounded memory. The audit's
conformal check, ``pupil predict --conformal`` and the HTTP service all call this module.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pupil.errors import PupilError

SCORES = ("thr", "aps", "raps")
LAMBDAS = (0.001, 0.01, 0.1, 0.2, 0.5)  # Angelopoulos et al. 2021, pick_lamda_size
SIZE_BINS = ((0, 1), (2, 3), (4, 6), (7, 10), (11, 100), (101, 1000), (1001, None))  # RAPS paper, Table 5
CHUNK = 4096  # rows sorted at once: 4,096 x 1,000 classes in float64 is 32 MB


# ---------------------------------------------------------------------------------------------------------------
# Scores and sets


def _ranked(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted high to low and their class indices, both (N, K); ties keep the class order."""
    return probs.double().sort(dim=1, descending=True, stable=True)


def _score_matrix(p: torch.Tensor, score: str, u: torch.Tensor | None, k_reg: int, lam: float) -> torch.Tensor:
    """E(x, label of rank r, u) for every rank, (N, K), from probabilities ``p`` sorted high to low.

    ``u`` None is the non-randomized u = 1: the mass up to and including the label (its inclusive cumulative sum,
    computed as such so that it equals MAPIE's to the last bit)."""
    if score == "thr":
        return 1 - p
    if u is None:
        e = p.cumsum(1)
    else:
        before = torch.cat([torch.zeros_like(p[:, :1]), p.cumsum(1)[:, :-1]], 1)  # rho: mass ranked above
        e = before + u.double()[:, None] * p
    if score == "raps" and lam:
        rank = torch.arange(1, p.shape[1] + 1, dtype=torch.float64)
        e = e + lam * (rank - k_reg).clamp_min(0)
    return e


def _check(score: str, u: torch.Tensor | None, n: int) -> None:
    if score not in SCORES:
        raise PupilError(f"unknown conformal score {score!r}; choose one of {', '.join(SCORES)}")
    if u is not None and len(u) != n:
        raise ValueError(f"u has {len(u)} values for {n} images")


def true_ranks(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0-based rank of the true label among the probabilities sorted high to low (ties: class order), (N,)."""
    out = []
    for rows in torch.arange(len(y)).split(CHUNK):
        _, order = _ranked(probs[rows])
        out.append((order == y[rows, None]).int().argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def conformity_scores(
    probs: torch.Tensor,
    y: torch.Tensor,
    score: str,
    u: torch.Tensor | None = None,
    k_reg: int = 1,
    lam: float = 0.0,
) -> torch.Tensor:
    """Scores E(x_i, y_i, u_i) of the true labels, (N,) float64; ``u`` (N,) in [0, 1) for the randomized form."""
    _check(score, u, len(y))
    out = []
    for rows in torch.arange(len(y)).split(CHUNK):
        p, order = _ranked(probs[rows])
        e = _score_matrix(p, score, None if u is None else u[rows], k_reg, lam)
        rank = (order == y[rows, None]).int().argmax(1)
        out.append(e.gather(1, rank[:, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def quantile_rank(n: int, level: float) -> int:
    """ceil((n + 1) * level): which order statistic of n calibration scores is the threshold for coverage
    ``level`` = 1 - alpha. The 1e-9 absorbs binary rounding: 200 * 0.545 is 109.00000000000001 in floating point
    and must not ask for the 110th score (MAPIE's plain ceil does, one order statistic more conservative)."""
    return math.ceil((n + 1) * level - 1e-9)


def conformal_quantile(scores: torch.Tensor, level: float) -> float:
    """The split-conformal threshold: the ceil((n + 1) * level)-th smallest score, or +inf (every label in every
    set) when that rank exceeds n, i.e. when level > n / (n + 1)."""
    if not 0 < level < 1:
        raise PupilError(f"a conformal coverage level must be between 0 and 1, not {level:g}")
    n, k = len(scores), quantile_rank(len(scores), level)
    if k > n:
        return math.inf
    return scores.double().kthvalue(k).values.item()


def set_sizes(
    probs: torch.Tensor,
    q: float | torch.Tensor,
    score: str,
    u: torch.Tensor | None = None,
    k_reg: int = 1,
    lam: float = 0.0,
) -> torch.Tensor:
    """Size (N,) of each image's prediction set at threshold ``q`` (one, or one per image (N,)); the set is that
    many most probable labels.

    Randomized (``u`` given) and THR: {y : E(x, y, u) <= q}, which may be empty. Non-randomized APS/RAPS: the
    labels up to and including the first whose score E(x, y, 1) reaches q (never empty)."""
    _check(score, u, len(probs))
    out = []
    for rows in torch.arange(len(probs)).split(CHUNK):
        p, _ = _ranked(probs[rows])
        e = _score_matrix(p, score, None if u is None else u[rows], k_reg, lam)
        t = q[rows, None].double() if isinstance(q, torch.Tensor) else q
        if score == "thr" or u is not None:
            out.append((e <= t).sum(1))
        else:  # a label is in when the one ranked just above it scored <= q; the top label always is
            out.append(1 + (e[:, :-1] <= t).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def expected_set_sizes(
    probs: torch.Tensor, q: float, score: str, randomized: bool, k_reg: int = 1, lam: float = 0.0
) -> torch.Tensor:
    """Each image's set size, (N,) float64, averaged over u ~ U(0, 1) when ``randomized``: label r is in with
    probability clamp((q - rho_r - penalty_r) / p_r, 0, 1). Deterministic, so the choice of lambda on the tuning
    part does not depend on one draw of u."""
    if not randomized or score == "thr":
        return set_sizes(probs, q, score, None, k_reg, lam).double()
    _check(score, None, len(probs))
    out = []
    for rows in torch.arange(len(probs)).split(CHUNK):
        p, _ = _ranked(probs[rows])
        base = _score_matrix(p, score, torch.zeros(len(p)), k_reg, lam)  # E at u = 0: rho + penalty
        share = torch.where(p > 0, ((q - base) / p.clamp_min(1e-300)).clamp(0, 1), (base <= q).double())
        out.append(share.sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def prediction_sets(
    probs: torch.Tensor,
    q: float,
    score: str,
    u: torch.Tensor | None = None,
    k_reg: int = 1,
    lam: float = 0.0,
) -> torch.Tensor:
    """Membership mask (N, K) in class order: ``mask[i, c]`` is True when class c is in image i's set."""
    sizes = set_sizes(probs, q, score, u, k_reg, lam)
    _, order = _ranked(probs)
    keep = torch.arange(probs.shape[1])[None, :] < sizes[:, None]  # (N, K) in rank order
    return torch.zeros(probs.shape, dtype=torch.bool).scatter(1, order, keep)


def set_lists(probs: torch.Tensor, sizes: torch.Tensor) -> list[list[int]]:
    """Each set as class indices, most probable first."""
    out: list[list[int]] = []
    for rows in torch.arange(len(probs)).split(CHUNK):
        _, order = _ranked(probs[rows])
        out += [o[:s].tolist() for o, s in zip(order, sizes[rows].tolist())]
    return out


# ---------------------------------------------------------------------------------------------------------------
# RAPS's regularisation, chosen on the tuning part


def choose_k_reg(probs: torch.Tensor, y: torch.Tensor, level: float) -> int:
    """k_reg: the ``higher`` ``level`` quantile of the true labels' 0-based ranks, plus one (RAPS's pick_kreg)."""
    ranks = true_ranks(probs, y).double()
    return int(torch.quantile(ranks, level, interpolation="higher").item()) + 1


def choose_lambda(
    probs: torch.Tensor, y: torch.Tensor, level: float, k_reg: int, u: torch.Tensor | None = None
) -> float:
    """lambda from ``LAMBDAS`` with the smallest mean set size when RAPS is calibrated and measured on the same
    (tuning) images (RAPS's pick_lamda_size); the first of equals. ``u`` (the tuning images' calibration draws)
    selects the randomized form, whose size is averaged over u (``expected_set_sizes``)."""
    best, best_size = LAMBDAS[0], math.inf
    for lam in LAMBDAS:
        q = conformal_quantile(conformity_scores(probs, y, "raps", u, k_reg, lam), level)
        size = expected_set_sizes(probs, q, "raps", u is not None, k_reg, lam).mean().item()
        if size < best_size:
            best, best_size = lam, size
    return best


# ---------------------------------------------------------------------------------------------------------------
# Calibration from a validation split


@dataclass(frozen=True)
class Calibration:
    """One conformal threshold and everything needed to apply it to new logits."""

    score: str
    level: float
    threshold: float
    """q; +inf when the calibration part is too small for the level (every set holds every label)."""
    temperature: float
    randomized: bool
    n_calibration: int
    k_reg: int | None = None
    """RAPS only."""
    lam: float | None = None
    """RAPS only: lambda."""

    def sizes(self, logits: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """Set sizes (N,) for ``logits`` (N, K), a chunk of rows at a time; ``u`` (N,) is required when the sets
        are randomized."""
        if self.randomized and u is None:
            raise ValueError("randomized sets need u")
        out = [torch.zeros(0, dtype=torch.long)]
        for rows in torch.arange(len(logits)).split(CHUNK):
            probs = softmax(logits[rows], self.temperature)
            u_rows = u[rows] if self.randomized and u is not None else None
            out.append(set_sizes(probs, self.threshold, self.score, u_rows, self.k_reg or 1, self.lam or 0.0))
        return torch.cat(out)

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["lambda"] = out.pop("lam")
        return out


def softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits.double() / temperature).softmax(1)


def logit_ranks(logits: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """``true_ranks`` of softmax(logits / T), a chunk of rows at a time (the ranks sets are cut by: softmax can
    tie labels whose logits differ, by underflow)."""
    out = [torch.zeros(0, dtype=torch.long)]
    for rows in torch.arange(len(y)).split(CHUNK):
        out.append(true_ranks(softmax(logits[rows], temperature), y[rows]))
    return torch.cat(out)


def calibrate(
    logits: torch.Tensor,
    y: torch.Tensor,
    calibration_mask: torch.Tensor,
    temperature: float,
    level: float,
    score: str,
    u: torch.Tensor | None = None,
) -> Calibration:
    """The threshold for ``score`` at coverage ``level`` from validation ``logits`` (N, K) and labels ``y``:
    RAPS's k_reg and lambda are chosen on the tuning part (``~calibration_mask``), the quantile is taken over the
    calibration part (``calibration_mask``) only, so that the guarantee holds exactly. ``u`` (N,), the
    validation images' draws, selects the randomized form for APS and RAPS."""
    _check(score, u, len(y))
    if not 0 < level < 1:
        raise PupilError(f"a conformal coverage level must be between 0 and 1, not {level:g}")
    mask = calibration_mask.bool()
    if not mask.any():
        raise PupilError("the conformal calibration part is empty: the validation split is too small")
    probs = softmax(logits, temperature)
    randomized = u is not None and score != "thr"
    k_reg, lam = None, None
    if score == "raps":
        tune = ~mask
        if not tune.any():
            raise PupilError("RAPS needs a tuning part beside the calibration part: the validation split is too small")
        k_reg = choose_k_reg(probs[tune], y[tune], level)
        lam = choose_lambda(probs[tune], y[tune], level, k_reg, u[tune] if randomized else None)
    cal_u = u[mask] if randomized else None
    s = conformity_scores(probs[mask], y[mask], score, cal_u, k_reg or 1, lam or 0.0)
    q = conformal_quantile(s, level)
    return Calibration(score, level, q, temperature, randomized, int(mask.sum()), k_reg, lam)


def uniforms(n: int, seed: int, stream: str) -> torch.Tensor:
    """n draws of U(0, 1), float64, from a generator seeded by ``seed`` and a named stream ("val", "test",
    "predict"), so that each use repeats on its own and none touches torch's global RNG."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{stream}".encode()))
    return torch.rand(n, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Coverage summaries


def coverage_interval(k: int, n: int, confidence: float = 0.95) -> list[float]:
    """Two-sided Clopper-Pearson interval [low, high] for a proportion of k successes in n trials."""
    from scipy.stats import beta

    if n == 0:
        return [0.0, 1.0]
    tail = (1 - confidence) / 2
    low = beta.ppf(tail, k, n - k + 1) if k > 0 else 0.0
    high = beta.ppf(1 - tail, k + 1, n - k) if k < n else 1.0
    return [float(low), float(high)]


def size_stratified_coverage(sizes: torch.Tensor, covered: torch.Tensor) -> list[dict[str, Any]]:
    """Coverage within each set-size bin of the RAPS paper (0-1, 2-3, 4-6, 7-10, 11-100, 101-1000, 1001+), for the
    bins that occur: [{"sizes": "2-3", "count": 14, "coverage": 0.93}, ...]."""
    out = []
    for low, high in SIZE_BINS:
        inside = (sizes >= low) & (sizes <= high if high is not None else True)
        if inside.any():
            name = f"{low}-{high}" if high is not None else f"{low}+"
            out.append({"sizes": name, "count": int(inside.sum()), "coverage": covered[inside].double().mean().item()})
    return out


def class_coverage(covered: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage per class (K,) (NaN for a class without images) and the number of images per class (K,)."""
    support = torch.bincount(y, minlength=k)
    hits = torch.bincount(y, weights=covered.double(), minlength=k)
    return torch.where(support > 0, hits / support.clamp_min(1), torch.nan), support


# ---------------------------------------------------------------------------------------------------------------
# Sets for new images from an audited run (pupil predict --conformal, the service)


def uniforms_for(keys: list[bytes], seed: int) -> torch.Tensor:
    """One draw of U(0, 1) per key (an image's bytes), float64: a hash of the key and the seed, so that the same
    image gets the same randomized set wherever it stands in a batch, and distinct images get draws that behave as
    independent uniforms."""
    import hashlib

    digests = [hashlib.sha256(f"{seed}/".encode() + k).digest()[:8] for k in keys]
    return torch.tensor([int.from_bytes(d, "big") / 2.0**64 for d in digests], dtype=torch.float64)


def sets_for_run(
    run_dir: str | Path,
    logits: torch.Tensor,
    level: float,
    score: str | None = None,
    keys: list[bytes] | None = None,
) -> tuple[list[list[int]], dict[str, Any]]:
    """Prediction sets at coverage ``level`` for ``logits`` (N, K) of new images, from the run's conformal audit.

        The threshold is recomputed from the validation logits the audit stored (``audit/per_image/conformal``), with
        its temperature, calibration part and draws of u and, for RAPS, k_reg and lambda chosen as it chooses them, so
        any level in (0, 1) works, not only the audited ones. ``score`` defaults to the audit's choice (the smallest
        sets at 95%). Randomized sets draw each image's u from a hash of its ``keys`` entry (its pixels' bytes) and the
    audit's seed, so an image gets the same set in any batch; without keys, from a generator seeded with the audit's
    seed by position, so a call repeats.

        Returns the sets (class indices, most probable first) and what was used: score, level, threshold,
        temperature, randomized, n_calibration, k_reg and lambda (None but for RAPS).
    """
    from pupil.results import consumed, load_results, read_per_image

    run = Path(run_dir)
    redo = f"`pupil audit {run} --checks conformal`"
    if not 0 < level < 1:
        raise PupilError(f"a conformal coverage level must be between 0 and 1 (e.g. 0.95), not {level:g}")
    if not (run / "results.json").is_file():
        raise PupilError(f"{run} has not been audited: run {redo} first")
    results = load_results(run)
    summary = consumed(results, "predict", "conformal")
    if summary is None:
        raise PupilError(f"{run}/results.json has no conformal section: run {redo}")
    score = score or summary["score"]
    if score not in SCORES:
        raise PupilError(f"unknown conformal score {score!r}; choose one of {', '.join(SCORES)}")
    stored = read_per_image(run, "conformal", results["audit"])
    if stored is None or not {"val_logits", "val_targets", "calibration_mask", "val_u"} <= set(stored):
        raise PupilError(f"the conformal check's per-image file of {run} is missing or from another audit: run {redo}")
    k = stored["val_logits"].shape[1]
    if logits.ndim != 2 or logits.shape[1] != k:
        raise PupilError(f"the conformal audit of {run} calibrated {k}-class logits, not {tuple(logits.shape)}")
    randomized = bool(summary["randomized"])
    u_val = stored["val_u"] if randomized else None
    cal = calibrate(
        stored["val_logits"],
        stored["val_targets"].long(),
        stored["calibration_mask"],
        float(summary["temperature"]),
        level,
        score,
        u_val,
    )
    if keys is not None and len(keys) != len(logits):
        raise ValueError(f"{len(keys)} keys for {len(logits)} images")
    seed = results["audit"]["seed"]
    u = None
    if cal.randomized:
        u = uniforms_for(keys, seed) if keys is not None else uniforms(len(logits), seed, "predict")
    sizes = cal.sizes(logits, u)
    return set_lists(softmax(logits, cal.temperature), sizes), cal.describe()
