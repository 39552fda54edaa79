"""Out-of-distribution scores and the metrics that grade them: a library for the audit's ``ood`` check,
``pupil predict --defer-below`` and anything else that asks how in-distribution an image looks.

Convention: every score is **higher for inputs that look in-distribution (ID)**; the ID images are the positive
class for AUROC, AUPR-In and FPR at 95% TPR, and the OOD images the positive class for AUPR-Out.

Scores
    msp          maximum softmax probability (Hendrycks & Gimpel 2017).
    max_logit    the largest logit (Hendrycks et al. 2022, "Scaling OOD detection for real-world settings").
    energy       T * logsumexp(logits / T), the negative free energy, with T = 1 (Liu et al. 2020).
    odin         max softmax of logits / T after nudging the input by epsilon * sign of the gradient that raises
                 it (Liang et al. 2018). T = 1000 and epsilon = 0.0014 are fixed defaults; the paper tunes
                 epsilon on held-out data, which is not done here. The step is taken in [0, 1] pixel space
                 through the wrapper (the paper steps in normalised space), without clipping to [0, 1].
    mahalanobis  minus the smallest Mahalanobis distance to a class mean, with class means and one shared
                 covariance fitted on penultimate features of training images (Lee et al. 2018). Simplified:
                 penultimate layer only, no input pre-processing and no ensemble over layers.
    knn          minus the distance from the L2-normalised feature to its k-th nearest L2-normalised training
                 feature (Sun et al. 2022), through faiss ``IndexFlatL2`` (imported only when fitted).
    vim          energy minus alpha times the norm of the feature's residual off the principal subspace of the
                 training features, measured from the origin o = -pinv(W) b of the linear head (Wang et al. 2022).

Metrics (AUROC, AUPR-In, AUPR-Out, FPR at 95% TPR) are written here over distinct thresholds exactly as
scikit-learn's ``roc_curve`` and ``average_precision_score`` treat ties, and tested against them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pupil.errors import PupilError

SCORES = ("msp", "max_logit", "energy", "odin", "mahalanobis", "knn", "vim")
FITTED = ("mahalanobis", "knn", "vim")  # need training features


# ---------------------------------------------------------------------------------------------------------------
# Metrics: ID positive unless stated; pure functions of two score vectors.


def _counts(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative true/false positive counts at each distinct threshold, highest first (sklearn's
    ``_binary_clf_curve``): samples with tied scores enter together."""
    s = torch.cat([pos, neg]).double()
    if not torch.isfinite(s).all():
        raise ValueError(f"{(~torch.isfinite(s)).sum().item()} OOD scores are not finite")
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    order = s.argsort(descending=True, stable=True)
    s, y = s[order], y[order]
    last = torch.ones(len(s), dtype=torch.bool)  # last member of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    return y.cumsum(0)[last], (1 - y).cumsum(0)[last]


def roc(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(false positive rate, true positive rate) from (0, 0) through every distinct threshold to (1, 1)."""
    tps, fps = _counts(pos, neg)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fps / fps[-1]]), torch.cat([zero, tps / tps[-1]])


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Area under the ROC curve (trapezoidal, so a tie counts one half as in the Mann-Whitney U)."""
    fpr, tpr = roc(pos, neg)
    return torch.trapezoid(tpr, fpr).item()


def aupr(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Average precision, sum over thresholds of (R_n - R_n-1) * P_n, as sklearn's ``average_precision_score``."""
    tps, fps = _counts(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return (torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64)) * precision).sum().item()


def fpr_at_tpr(pos: torch.Tensor, neg: torch.Tensor, level: float = 0.95) -> float:
    """False positive rate at the first threshold whose true positive rate reaches ``level``."""
    fpr, tpr = roc(pos, neg)
    return fpr[(tpr >= level).nonzero()[0, 0]].item()


def detection_metrics(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> dict[str, float]:
    """AUROC, AUPR-In (ID positive), AUPR-Out (OOD positive, scores negated) and FPR at 95% TPR."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "aupr_in": aupr(id_scores, ood_scores),
        "aupr_out": aupr(-ood_scores, -id_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores),
    }


# ---------------------------------------------------------------------------------------------------------------
# Scores: higher = more in-distribution. Computed in float64 so that confident softmaxes do not saturate into ties.


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability, in [1/K, 1]."""
    return logits.double().softmax(1).amax(1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    return logits.double().amax(1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy T * logsumexp(logits / T)."""
    return temperature * torch.logsumexp(logits.double() / temperature, 1)


def odin(model: nn.Module, x: torch.Tensor, temperature: float = 1000.0, epsilon: float = 0.0014) -> torch.Tensor:
    """ODIN on a pixel batch x (B, C, H, W) in [0, 1]: step epsilon along the sign of the gradient of the
    temperature-scaled log max-softmax, then take the temperature-scaled max softmax there.

    Runs in fp32 whatever the run's precision: at T = 1000 the softmax differences are below bf16's resolution.
    """
    x = x.detach().float().requires_grad_(True)
    with torch.autocast(x.device.type, enabled=False):  # fp32 inside any caller's autocast too
        with torch.enable_grad():
            log_p = (model(x).float() / temperature).log_softmax(1).amax(1)  # the predicted class, as in the paper
            (grad,) = torch.autograd.grad(log_p.sum(), x)
        with torch.no_grad():
            return msp(model(x.detach() + epsilon * grad.sign()).float() / temperature)


def fit_mahalanobis(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (K', D) of the classes present and the pseudo-inverse (D, D) of the shared covariance
    (1/N) sum_c sum_{i in c} (f_i - mu_c)(f_i - mu_c)^T, as Lee et al. 2018 (sklearn's EmpiricalCovariance)."""
    f = feats.double()
    present = [c for c in range(num_classes) if (labels == c).any()]
    means = torch.stack([f[labels == c].mean(0) for c in present])
    slot = torch.full((num_classes,), -1, dtype=torch.long)
    slot[present] = torch.arange(len(present))
    centered = f - means[slot[labels]]
    cov = centered.T @ centered / len(f)
    return means, torch.linalg.pinv(cov, hermitian=True)


def mahalanobis(feats: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """-min_c (f - mu_c)^T P (f - mu_c), expanded as f P f - 2 f P mu_c + mu_c P mu_c to avoid a (B, K, D) tensor."""
    f = feats.double()
    fp = f @ precision  # (B, D)
    dist = (fp * f).sum(1, keepdim=True) - 2 * fp @ means.T + ((means @ precision) * means).sum(1)  # (B, K)
    return -dist.min(1).values


def fit_knn(feats: torch.Tensor):
    """A faiss ``IndexFlatL2`` over the L2-normalised training features."""
    import faiss

    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(np.ascontiguousarray(F.normalize(feats.float(), dim=1).numpy()))
    return index


def knn(feats: torch.Tensor, index, k: int = 50) -> torch.Tensor:
    """Minus the Euclidean distance to the k-th nearest training feature (both L2-normalised)."""
    d2, _ = index.search(np.ascontiguousarray(F.normalize(feats.float(), dim=1).numpy()), k)  # squared, ascending
    return -torch.from_numpy(d2[:, -1]).double().clamp_min(0).sqrt()


def linear_head(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The head's (weight, bias) when logits are exactly a linear map of the penultimate features; else why not."""
    net = model.net
    head = net.get_classifier() if hasattr(net, "get_classifier") else getattr(net, "head", None)
    if not isinstance(head, nn.Linear):
        return f"the classifier head is a {type(head).__name__}, not one Linear layer"
    w = head.weight.detach().float()
    b = head.bias.detach().float() if head.bias is not None else torch.zeros(len(w), device=w.device)
    with torch.no_grad():
        fmap = net.forward_features(model.normalize(x.float()))
        feats, logits = net.forward_head(fmap, pre_logits=True), net.forward_head(fmap)
    if feats.shape[1] != w.shape[1] or not torch.allclose(F.linear(feats, w, b), logits, atol=1e-4, rtol=1e-4):
        return "the logits are not a linear map of the penultimate features"
    return w.cpu(), b.cpu()


class VimFit(NamedTuple):
    weight: torch.Tensor  # (K, D) head weight
    bias: torch.Tensor  # (K,)
    origin: torch.Tensor  # (D,) -pinv(W) b
    residual: torch.Tensor  # (D, D - dim) eigenvectors off the principal subspace
    alpha: float


def fit_vim(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dim: int | None = None) -> VimFit:
    """Fit ViM on training features (Wang et al. 2022, Alg. 1 and their code): principal dimension 1000 for
    D >= 2048, 512 for D >= 768, else D / 2; alpha = mean max-logit / mean residual norm."""
    f, w, b = feats.double(), weight.double(), bias.double()
    d = f.shape[1]
    dim = dim or (1000 if d >= 2048 else 512 if d >= 768 else d // 2)
    origin = -torch.linalg.pinv(w) @ b
    x = f - origin
    _, vecs = torch.linalg.eigh(x.T @ x / len(x))  # ascending eigenvalues; covariance about the origin
    residual = vecs[:, : d - dim]
    alpha = ((f @ w.T + b).amax(1).mean() / (x @ residual).norm(dim=1).mean()).item()
    return VimFit(w, b, origin, residual, alpha)


def vim(feats: torch.Tensor, fit: VimFit) -> torch.Tensor:
    """Energy of the head's logits minus the virtual logit alpha * ||(f - o) R||."""
    f = feats.double()
    virtual = fit.alpha * ((f - fit.origin) @ fit.residual).norm(dim=1)
    return torch.logsumexp(f @ fit.weight.T + fit.bias, 1) - virtual


def score_images(
    model: nn.Module, x: torch.Tensor, score: str = "energy", temperature: float | None = None, epsilon: float = 0.0014
) -> torch.Tensor:
    """Per-image OOD score (B,) for a pixel batch x (B, C, H, W) in [0, 1]; higher = more in-distribution.

    For the scores that need no fitted statistics: msp, max_logit, energy (temperature 1 by default) and odin
    (temperature 1000 by default). ``pupil predict --defer-below`` thresholds it.
    """
    if score == "odin":
        return odin(model, x, temperature or 1000.0, epsilon)
    plain = {"msp": msp, "max_logit": max_logit, "energy": lambda z: energy(z, temperature or 1.0)}
    if score not in plain:
        raise PupilError(
            f"score {score!r} cannot be computed per image without training statistics; choose one of "
            f"{', '.join([*plain, 'odin'])}"
        )
    with torch.no_grad():
        return plain[score](model(x).float())
