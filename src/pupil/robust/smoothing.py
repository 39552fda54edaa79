"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019, "Certified Adversarial Robustness via Randomized
Smoothing"): the smoothed classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), and its L2
certificate.

``predict`` is the paper's Algorithm 2 (PREDICT, a two-sided binomial test between the top two classes)
and ``certify`` its Algorithm 1 (CERTIFY: pick the class with n0 samples, bound its probability from below
with n fresh samples by a one-sided Clopper-Pearson interval, radius = sigma * Phi^-1(pA_lower)). The
``*_batch`` versions do the same for many images at once: every (image, noise draw) pair goes through the
model in chunks of ``batch`` rows, so several images share each forward pass.

Noise is added in pixel space and not clipped, as in the paper; the model takes pixels (normalisation is
inside ``PixelModel``), so sigma is in pixel units of [0, 1] images.
"""

from __future__ import annotations

import torch
from torch import nn

from pupil.errors import PupilError

ABSTAIN = -1


def clopper_pearson_lower(k: torch.Tensor | int, n: int, alpha: float) -> torch.Tensor:
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion from k successes in n trials
    (Clopper & Pearson 1934): the p with P(X >= k | p) = alpha, i.e. the alpha quantile of Beta(k, n - k + 1);
    0 when k = 0. Works elementwise on a tensor of counts; returns float64."""
    from scipy.stats import beta

    k = torch.as_tensor(k, dtype=torch.float64)
    lower = beta.ppf(alpha, k.clamp_min(1).numpy(), (n - k + 1).numpy())
    return torch.where(k > 0, torch.as_tensor(lower, dtype=torch.float64), 0.0)


def binomial_p_value(k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Two-sided exact binomial test of k successes in n trials against p = 1/2, elementwise (float64).

    For p = 1/2 the distribution is symmetric, so the p-value is 2 * P(X <= min(k, n - k)), capped at 1
    (what ``scipy.stats.binomtest(k, n, 0.5).pvalue`` gives); 1 when n = 0.
    """
    from scipy.stats import binom

    k, n = torch.as_tensor(k, dtype=torch.float64), torch.as_tensor(n, dtype=torch.float64)
    tail = torch.as_tensor(binom.cdf(torch.minimum(k, n - k).numpy(), n.numpy(), 0.5), dtype=torch.float64)
    return torch.where(n > 0, (2 * tail).clamp(max=1.0), 1.0)


@torch.no_grad()
def sample_counts(
    model: nn.Module,
    x: torch.Tensor,
    num: int,
    sigma: float,
    batch: int = 1000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """How often the base classifier predicts each class under Gaussian noise (Cohen et al. 2019, SAMPLENOISE).

    Args:
        model: takes (B, C, H, W) pixels and returns logits (B, K); the caller puts it in eval mode.
        x: images (B, C, H, W).
        num: noise draws per image.
        sigma: the noise's standard deviation in pixel units.
        batch: rows per forward pass; draws for several images share one pass.
        generator: draws the noise (on ``x``'s device); the global one when None.

    Returns:
        Counts (B, K), int64 on the CPU; each row sums to ``num``.
    """
    b = len(x)
    counts = None
    # Row r of the flattened (image, draw) grid is draw r % num of image r // num.
    for start in range(0, b * num, batch):
        rows = torch.arange(start, min(start + batch, b * num), device=x.device)
        img = rows // num
        xi = x[img]
        noisy = xi + sigma * torch.randn(xi.shape, generator=generator, device=x.device, dtype=xi.dtype)
        logits = model(noisy)  # (rows, K)
        k = logits.shape[1]
        cell = img * k + logits.argmax(1)
        part = torch.bincount(cell, minlength=b * k).view(b, k)
        counts = part if counts is None else counts + part
    if counts is None:
        raise PupilError("sample_counts needs at least one image and one noise draw")
    return counts.cpu()


def predict_batch(
    model: nn.Module,
    x: torch.Tensor,
    n: int,
    alpha: float,
    sigma: float,
    batch: int = 1000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cohen et al. 2019, Alg. 2 for each image of a batch: the top class by n noisy votes, or ABSTAIN unless a
    two-sided binomial test between the top two counts rejects a tie at level alpha.

    Returns:
        Labels (B,), int64 on the CPU, ABSTAIN (-1) where the test does not reject.
    """
    _check(alpha, sigma, n)
    counts = sample_counts(model, x, n, sigma, batch, generator)
    if counts.shape[1] == 1:  # one class: every vote agrees
        return torch.zeros(len(x), dtype=torch.long)
    top2 = counts.topk(2, dim=1)
    n_a, n_b = top2.values[:, 0], top2.values[:, 1]
    p = binomial_p_value(n_a, n_a + n_b)
    return torch.where(p <= alpha, top2.indices[:, 0], ABSTAIN)


def certify_batch(
    model: nn.Module,
    x: torch.Tensor,
    n0: int,
    n: int,
    alpha: float,
    sigma: float,
    batch: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cohen et al. 2019, Alg. 1 for each image of a batch.

    The class cA is chosen by n0 noisy votes; n fresh votes give the one-sided Clopper-Pearson lower bound
    pA_lower on P(f(x + e) = cA) at level alpha; the radius is sigma * Phi^-1(pA_lower). With probability at
    least 1 - alpha (per image) the smoothed classifier predicts cA everywhere within that L2 radius.

    Returns:
        Labels (B,) int64 (ABSTAIN where pA_lower < 1/2) and radii (B,) float64 (0 where abstaining), on the CPU.
    """
    from scipy.stats import norm

    _check(alpha, sigma, n)
    if n0 < 1:
        raise PupilError(f"certify needs n0 >= 1 selection draws, got {n0}")
    c_a = sample_counts(model, x, n0, sigma, batch, generator).argmax(1)  # (B,)
    counts = sample_counts(model, x, n, sigma, batch, generator)
    p_lower = clopper_pearson_lower(counts.gather(1, c_a[:, None])[:, 0], n, alpha)
    ok = p_lower >= 0.5
    radius = sigma * torch.as_tensor(norm.ppf(p_lower.numpy()), dtype=torch.float64)
    return torch.where(ok, c_a, ABSTAIN), torch.where(ok, radius, 0.0)


def predict(
    model: nn.Module,
    x: torch.Tensor,
    n: int,
    alpha: float,
    sigma: float,
    batch: int = 1000,
    generator: torch.Generator | None = None,
) -> int:
    """Alg. 2 for one image (C, H, W): its smoothed label, or ABSTAIN."""
    return int(predict_batch(model, x[None], n, alpha, sigma, batch, generator)[0])


def certify(
    model: nn.Module,
    x: torch.Tensor,
    n0: int,
    n: int,
    alpha: float,
    sigma: float,
    batch: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[int, float]:
    """Alg. 1 for one image (C, H, W): (label or ABSTAIN, certified L2 radius)."""
    label, radius = certify_batch(model, x[None], n0, n, alpha, sigma, batch, generator)
    return int(label[0]), float(radius[0])


def max_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius n draws can certify (all n votes for cA): sigma * Phi^-1(alpha^(1/n))."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def _check(alpha: float, sigma: float, n: int) -> None:
    if not 0 < alpha < 1:
        raise PupilError(f"smoothing alpha must be in (0, 1), got {alpha}")
    if sigma <= 0:
        raise PupilError(f"smoothing sigma must be > 0, got {sigma}")
    if n < 1:
        raise PupilError(f"smoothing needs n >= 1 noise draws, got {n}")
