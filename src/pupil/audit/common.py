"""The audit runner and the Check protocol.

A check is a registered class with a name, a ``Config`` dataclass and ``run(ctx, cfg) -> dict``. It never
prints or renders, and never depends on another check except through the predictions that the
context computes once and shares (``ctx.logits("test")``). The runner records each check's config and
runtime next to its figures, so that every number in ``results.json`` can be reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch

from pupil.data import ImageDataset
from pupil.errors import PupilError
from pupil.io import write_json
from pupil.registry import Registry
from pupil.run import Run, load_run

CHECKS = Registry("check")
BUDGETS = ("quick", "full")
SCHEMA_VERSION = "1.0"


class Check:
    """Base class: subclasses set ``name``, ``Config`` and ``quick`` (config overrides for the quick budget)."""

    name: ClassVar[str]
    title: ClassVar[str]
    Config: ClassVar[type]
    quick: ClassVar[dict[str, Any]] = {}

    def config(self, budget: str, overrides: dict[str, Any] | None = None) -> Any:
        values = dict(self.quick) if budget == "quick" else {}
        values.update(overrides or {})
        names = {f.name for f in dataclasses.fields(self.Config)}
        if unknown := set(values) - names:
            raise PupilError(f"check {self.name} has no setting(s) {', '.join(sorted(unknown))}")
        return self.Config(**values)

    def run(self, ctx: AuditContext, cfg: Any) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class AuditContext:
    """What a check may use: the wrapped model (takes [0, 1] pixels), the splits, and shared predictions."""

    run: Run
    test: ImageDataset
    val: ImageDataset | None
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    seed: int
    budget: str
    batch_size: int = 1024
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> torch.nn.Module:
        return self.run.model

    def split(self, name: str) -> ImageDataset:
        ds = {"test": self.test, "val": self.val}[name]
        if ds is None:
            raise PupilError(f"the run has no {name} split (it was trained with val_size 0)")
        return ds

    def logits(self, split: str = "test") -> torch.Tensor:
        """Logits (N, K) over a split, computed once per audit and shared by every check."""
        key = f"logits/{split}"
        if key not in self._cache:
            from pupil.training.loop import predict_logits

            t0 = time.perf_counter()
            self._cache[key] = predict_logits(
                self.model, self.split(split), self.batch_size, self.device, self.dtype, self.channels_last
            )
            self._cache[f"{key}/seconds"] = time.perf_counter() - t0
        return self._cache[key]

    def targets(self, split: str = "test") -> torch.Tensor:
        return self.split(split).targets


def table(columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    """The one table shape results.json uses."""
    return {"columns": columns, "rows": rows}


def subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded random subset of n indices (all when n is 0 or at least total), in ascending order."""
    if not n or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def headline(label: str, value: float, higher_is_better: bool, unit: str = "", ci: list[float] | None = None) -> dict:
    out = {"label": label, "value": value, "higher_is_better": higher_is_better, "unit": unit}
    if ci is not None:
        out["ci95"] = ci
    return out


def make_context(run_dir: str | Path, device: str, budget: str, seed: int, data_dir: str | None = None) -> AuditContext:
    from pupil.training.loop import resolve_device, resolve_precision

    if budget not in BUDGETS:
        raise PupilError(f"unknown budget {budget!r}; choose {' or '.join(BUDGETS)}")
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev)
    info, cfg = run.info, run.info["config"]
    test = run.split("test", data_dir)
    val = run.split("val", data_dir) if cfg["data"]["val_size"] else None
    return AuditContext(
        run=run,
        test=test,
        val=val,
        device=dev,
        dtype=resolve_precision(cfg["train"]["precision"], dev),
        channels_last=info["runtime"]["channels_last"],
        seed=seed,
        budget=budget,
    )


def run_audit(
    run_dir: str | Path,
    checks: list[str] | None = None,
    *,
    budget: str = "quick",
    device: str = "auto",
    seed: int = 0,
    settings: dict[str, dict[str, Any]] | None = None,
    data_dir: str | None = None,
    on_check: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Run the named checks (all registered ones by default) and write ``<run>/results.json``.

    Sections of an earlier results.json that were audited with the same split, budget and seed are
    kept for checks not re-run now; otherwise the file is replaced.
    """
    from pupil.audit import DEFAULT_CHECKS

    names = checks or list(DEFAULT_CHECKS)
    for n in names:
        CHECKS.entry(n)  # an unknown name fails before any work
    settings = settings or {}
    if unknown := set(settings) - set(names):
        raise PupilError(f"settings given for check(s) not being run: {', '.join(sorted(unknown))}")
    ctx = make_context(run_dir, device, budget, seed, data_dir)
    audit = {
        "split": "test",
        "n": len(ctx.test),
        "budget": budget,
        "seed": seed,
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "precision": str(ctx.dtype or "fp32"),
        "tta": ctx.model.tta,
    }
    path = Path(run_dir) / "results.json"
    sections: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if {k: old.get("audit", {}).get(k) for k in ("split", "budget", "seed")} == {
                k: audit[k] for k in ("split", "budget", "seed")
            }:
                sections = old.get("checks", {})
        except json.JSONDecodeError:
            pass
    for n in names:
        check = CHECKS.get(n)()
        cfg = check.config(budget, settings.get(n))
        if on_check:
            on_check(n, "start")
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        result = check.run(ctx, cfg)
        result = {"title": check.title, "config": dataclasses.asdict(cfg), **result}
        result["runtime_s"] = round(time.perf_counter() - t0, 3)
        sections[n] = result
        if on_check:
            on_check(n, "done")
    if "logits/test/seconds" in ctx._cache:
        audit["prediction_s"] = round(ctx._cache["logits/test/seconds"], 3)
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {
            "dir": str(run_dir),
            "name": ctx.run.name,
            "model": ctx.run.info["model"],
            "dataset": ctx.run.info["data"]["dataset"],
            "classes": ctx.run.classes,
        },
        "audit": audit,
        "checks": {k: sections[k] for k in sorted(sections, key=_order)},
    }
    from pupil.report.schema import validate

    validate(results)
    write_json(path, results)
    return results


def _order(name: str) -> int:
    from pupil.audit import DEFAULT_CHECKS

    return DEFAULT_CHECKS.index(name) if name in DEFAULT_CHECKS else len(DEFAULT_CHECKS)
