"""Calibration: expected calibration error (15 equal-width bins; Guo et al. 2017) and adaptive ECE
(equal-mass bins; Nixon et al. 2019), maximum calibration error, Brier score, negative log-likelihood,
the reliability diagram, and temperature scaling fitted on the validation split with the metrics after it.

The metric functions live in ``pupil.metrics``, shared with the other checks that report ECE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pupil.audit.common import CHECKS, Allowed, AuditContext, Check, at_least, figure, headline, validate_settings
from pupil.metrics import bin_stats, brier, ece, mce


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, iters: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017), by L-BFGS on log T."""
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    logits = logits.double()
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.exp().item()


def summary(logits: torch.Tensor, y: torch.Tensor, n_bins: int) -> dict[str, float]:
    probs = logits.double().softmax(1)
    conf, pred = probs.max(1)
    correct = pred == y
    return {
        "ece": ece(conf, correct, n_bins),
        "adaptive_ece": ece(conf, correct, n_bins, adaptive=True),
        "mce": mce(conf, correct, n_bins),
        "brier": brier(probs, y),
        "nll": F.cross_entropy(logits.double(), y).item(),
        "mean_confidence": conf.mean().item(),
        "accuracy": correct.double().mean().item(),
    }


@dataclass
class CalibrationConfig:
    n_bins: int = 15
    """Equal-width (and equal-mass) bins for ECE, MCE and the reliability diagram."""
    fit_split: str = "val"
    """Split the temperature is fitted on (never the test split)."""

    def __post_init__(self):
        # One bin would reduce ECE to |accuracy - mean confidence| and leave no reliability diagram.
        never_test = Allowed("val (the temperature is never fitted on the test split)", lambda v: v == "val")
        validate_settings(self, "calibration", n_bins=at_least(2), fit_split=never_test)


@CHECKS.register("calibration")
class Calibration(Check):
    name, title, Config = "calibration", "Calibration", CalibrationConfig

    def run(self, ctx: AuditContext, cfg: CalibrationConfig) -> dict:
        logits, y = ctx.logits("test"), ctx.targets("test")
        before = summary(logits, y, cfg.n_bins)
        out = {"metrics": {"before": before}, "notes": []}
        s = bin_stats(*_conf_correct(logits, y), cfg.n_bins)
        curves = {
            "reliability": {
                "edges": s["edges"].tolist(),
                "count": s["count"].tolist(),
                "confidence": s["confidence"].tolist(),
                "accuracy": s["accuracy"].tolist(),
            }
        }
        if ctx.val is not None:
            t = fit_temperature(ctx.logits(cfg.fit_split), ctx.targets(cfg.fit_split))
            after = summary(logits / t, y, cfg.n_bins)
            out["metrics"].update(temperature=t, after=after)
            s2 = bin_stats(*_conf_correct(logits / t, y), cfg.n_bins)
            curves["reliability_after"] = {
                "count": s2["count"].tolist(),
                "confidence": s2["confidence"].tolist(),
                "accuracy": s2["accuracy"].tolist(),
            }
        else:
            out["notes"].append("no validation split: temperature scaling was not fitted")
        out["headline"] = headline("ECE (15 bins)", before["ece"], False, "fraction")
        m = out["metrics"]
        out["summary"] = {
            "ece": before["ece"],
            "ece_after_temperature": m["after"]["ece"] if "after" in m else None,
            "temperature": m.get("temperature"),  # None without a validation split
        }
        out["curves"] = curves
        out["figures"] = [figure("Reliability diagram", "drawer", drawer="reliability")]
        return out


def _conf_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conf, pred = logits.double().softmax(1).max(1)
    return conf, pred == y
