"""Energy and CO2-equivalent of a piece of work, from codecarbon's offline tracker.

The figures are estimates: codecarbon reads RAPL or NVML counters where it can and otherwise models
power from the CPU type (on virtual machines often a few watts for the whole package). The method
string says which model and grid were used, and reports must show it.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import Any


@cache
def grid_codes() -> frozenset[str]:
    """The country codes whose grid carbon intensity codecarbon knows (its global energy-mix table).

    codecarbon only logs an unknown code and falls back to another grid, so a figure would be mislabelled:
    callers refuse codes outside this set."""
    from codecarbon.input import DataSource

    return frozenset(DataSource().get_global_energy_mix_data())


class EnergyMeter:
    """``with EnergyMeter("USA") as m: work()`` then ``m.result`` (kWh, kg CO2-eq, watts, method)."""

    def __init__(self, country: str = "USA", measure_s: float = 1.0):
        self.country, self.measure_s = country, measure_s
        self.result: dict[str, Any] = {}

    def __enter__(self) -> EnergyMeter:
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self.tracker = OfflineEmissionsTracker(
            country_iso_code=self.country,
            save_to_file=False,
            log_level="error",
            measure_power_secs=self.measure_s,
            tracking_mode="process",
        )
        self.tracker.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import codecarbon

        seconds = time.perf_counter() - self.t0
        kg = self.tracker.stop() or 0.0
        data = self.tracker.final_emissions_data
        self.result = {
            "seconds": seconds,
            "energy_kwh": float(data.energy_consumed),
            "emissions_kg_co2eq": float(kg),
            "cpu_power_w": float(data.cpu_power),
            "gpu_power_w": float(data.gpu_power),
            "ram_power_w": float(data.ram_power),
            "method": f"codecarbon {codecarbon.__version__} OfflineEmissionsTracker, country {self.country}, "
            f"cpu model: {data.cpu_model}",
        }


def add(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Accumulate a resumed run's sessions."""
    if not total:
        return dict(part, sessions=1)
    out = dict(total)
    for k in ("seconds", "energy_kwh", "emissions_kg_co2eq"):
        out[k] = total[k] + part[k]
    out["sessions"] = total.get("sessions", 1) + 1
    return out
