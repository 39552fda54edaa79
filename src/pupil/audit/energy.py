"""Energy and CO2-equivalent of the audit's inference over the test split, and of training when
``pupil train`` recorded it, measured with codecarbon's offline tracker.

The figures are estimates: codecarbon reads RAPL or NVML counters where it can and otherwise models the
CPU's power from its type (on some virtual machines a few watts for the whole package), and converts
energy to CO2-equivalent with the named country's grid intensity. The method is stated in the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pupil.audit.common import CHECKS, Allowed, AuditContext, Check, at_least, headline, validate_settings
from pupil.energy import EnergyMeter, grid_codes
from pupil.predict import predict_logits


@dataclass
class EnergyConfig:
    country: str = "USA"
    """ISO 3166 alpha-3 code of the grid whose carbon intensity converts energy to CO2-eq."""
    passes: int = 1
    """Full passes over the test split while tracking (more passes average out the tracker's sampling)."""

    def __post_init__(self):
        codes = grid_codes()
        country = Allowed(
            f"one of the {len(codes)} ISO 3166 alpha-3 codes in codecarbon's energy mix (e.g. USA, FRA, DEU, IND)",
            lambda v: v in codes,
        )
        validate_settings(self, "energy", country=country, passes=at_least(1))


@CHECKS.register("energy")
class Energy(Check):
    name, title, Config = "energy", "Energy and CO₂", EnergyConfig

    def run(self, ctx: AuditContext, cfg: EnergyConfig) -> dict:
        def infer():
            for _ in range(cfg.passes):
                predict_logits(ctx.model, ctx.test, ctx.batch_size, ctx.device, ctx.dtype, ctx.channels_last)

        with EnergyMeter(cfg.country) as meter:
            infer()
        m = meter.result
        n = len(ctx.test) * cfg.passes
        m["images"] = n
        m["energy_j_per_1000_images"] = m["energy_kwh"] * 3.6e6 / n * 1000
        metrics: dict[str, Any] = {"inference": m}
        notes = ["Energy is an estimate from codecarbon's power model; see the method string."]
        train = ctx.run.info.get("history", {}).get("energy")
        if train:
            metrics["training"] = train
        else:
            notes.append("Training energy was not recorded for this run.")
        if not torch.cuda.is_available() and m["cpu_power_w"] < 20:
            notes.append(f"CPU power was modelled at {m['cpu_power_w']:.1f} W: no hardware counters were readable.")
        return {
            "headline": headline("energy per 1,000 images", m["energy_j_per_1000_images"], False, "J"),
            "summary": {  # inference over the test split, `images` images in all (passes included)
                "energy_j_per_1000_images": m["energy_j_per_1000_images"],
                "energy_kwh": m["energy_kwh"],
                "emissions_kg_co2eq": m["emissions_kg_co2eq"],
                "images": n,
            },
            "metrics": metrics,
            "notes": notes,
        }
