"""The audit runner and the Check protocol.

A check is a registered class with a name, a ``Config`` dataclass and ``run(ctx, cfg) -> dict``: its headline,
summary (the figures other code reads, copied from its metrics; see ``pupil.results``), metrics, tables, curves
and notes; optionally ``per_image``, tensors with one row per test image (or per scored image) that a paired
comparison of two audits needs, which the runner writes beside results.json (``pupil.results.write_per_image``).
It never prints or renders, and never depends on another check except through the predictions that
the context computes once and shares (``ctx.logits("test")``). The runner records each check's config and
runtime next to its figures, so that every number in ``results.json`` can be reproduced. Each ``Config``
checks its settings in ``__post_init__`` with ``validate_settings`` (type from the hints, range or choices
given there), so a bad ``--set`` value fails as one line before any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch

from pupil.config import BAD, bad_item, shown, type_noun, typed_value
from pupil.data import ImageDataset
from pupil.data.images import memory_budget
from pupil.errors import PupilError
from pupil.extras import install_hint, missing, require
from pupil.io import write_json
from pupil.predict import predict_logits
from pupil.registry import Registry
from pupil.results import SCHEMA_VERSION, other_version, section_problem, validate, write_per_image
from pupil.run import Run, load_run
from pupil.runtime import autocast, resolve_device, resolve_precision, to_input

CHECKS = Registry("check")
BUDGETS = ("quick", "full")


class Check:
    """Base class: subclasses set ``name``, ``Config`` and ``quick`` (config overrides for the quick budget)."""

    name: ClassVar[str]
    title: ClassVar[str]
    Config: ClassVar[type]
    quick: ClassVar[dict[str, Any]] = {}
    shortcuts: ClassVar[dict[str, str]] = {}
    """``pupil audit`` flags that set one of this check's settings: flag name -> setting (``--ood`` -> extra)."""
    needs_val: ClassVar[bool] = False
    """The check fits on the validation split: without one it is left out of the default list with a note (and,
    asked for by name, refuses in one line)."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Modules the check imports beyond pupil's core, and the pip extra that brings them."""
    extra: ClassVar[str] = ""

    def unavailable(self, ctx: AuditContext) -> str:
        """Why this check cannot run on this run ("" when it can): the default list leaves it out with that note,
        and asked for by name it refuses in one line."""
        return ""

    def config(self, budget: str, overrides: dict[str, Any] | None = None) -> Any:
        """The budget's settings updated with ``overrides``; the Config checks each value's type and range."""
        values = dict(self.quick) if budget == "quick" else {}
        values.update(overrides or {})
        names = [f.name for f in dataclasses.fields(self.Config)]
        if unknown := set(values) - set(names):
            raise PupilError(
                f"check {self.name} has no setting(s) {', '.join(sorted(unknown))}; its settings are {', '.join(names)}"
            )
        return self.Config(**values)

    def run(self, ctx: AuditContext, cfg: Any) -> dict[str, Any]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# Check settings: each Config's __post_init__ calls validate_settings with the range or choices of its fields.


@dataclass(frozen=True)
class Allowed:
    """The values a setting takes beyond its type: ``text`` ends the sentence "calibration.n_bins must be ...",
    with ``{type}`` standing for the type's noun ("an integer"); ``test`` passes a value of the right type, and
    ``detail``, if given, says what is wrong with one that fails."""

    text: str
    test: Callable[[Any], bool]
    detail: Callable[[Any], str] | None = None


def at_least(low: float) -> Allowed:
    return Allowed(f"{{type}} >= {low:g}", lambda v: v >= low)


def above(low: float) -> Allowed:
    return Allowed(f"{{type}} > {low:g}", lambda v: v > low)


def one_of(*choices: str) -> Allowed:
    return Allowed(f"one of {', '.join(choices)}" if len(choices) > 1 else choices[0], lambda v: v in choices)


def each(rule: Allowed, noun: str) -> Allowed:
    """A list setting with at least one item, each passing ``rule``; ``noun`` names an item in errors."""

    def detail(value: list) -> str:
        bad = [v for v in value if not rule.test(v)]
        return f"{noun} {bad[0]!r} is not {rule.text.format(type='').strip()}" if bad else f"no {noun} given"

    return Allowed(rule.text, lambda v: bool(v) and all(rule.test(x) for x in v), detail)


def names_from(choices: tuple[str, ...] | list[str], noun: str, empty: bool = False) -> Allowed:
    """A list setting of names from ``choices``, at least one unless ``empty``; ``noun`` names one in errors."""

    def detail(value: list[str]) -> str:
        unknown = [n for n in value if n not in choices]
        return f"unknown {noun} {', '.join(map(repr, unknown))}" if unknown else f"no {noun} given"

    text = f"a list of names from {', '.join(choices)}" + (" (or none)" if empty else "")
    return Allowed(text, lambda v: (empty or bool(v)) and set(v) <= set(choices), detail)


def validate_settings(cfg: Any, check: str, **allowed: Allowed) -> None:
    """Check every field of a check's Config against its type hint and, where given, ``allowed[field]``.

    Raises one line for the first bad value: "calibration.n_bins must be an integer >= 2, not 'abc'". Ints stay
    ints and bools are not ints; an int is taken for a float and floats must be finite; ``X | None`` allows None.
    ``--set`` values come through YAML 1.1, so a number is taken for a string field and a numeric string for a
    float field (YAML reads ``1e-3`` as a string). A list field takes a list (``epsilons=[0.1,0.05]``), a comma
    string (``severities=1,3``, the CLI's ``--ood a,b``, older Python callers), split here and nowhere else, or a
    lone number (YAML reads ``severities=3`` as one). Accepted values are stored converted (an int given for a
    float becomes a float, a comma string a list); a list field's rule is ``each`` or ``names_from``.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, value, rule = hints[f.name], getattr(cfg, f.name), allowed.get(f.name)
        optional = type(None) in typing.get_args(tp)
        if optional:
            tp = next(t for t in typing.get_args(tp) if t is not type(None))
        if value is None and optional:
            continue
        typed = typed_value(value, tp)
        if typed is BAD or (rule is not None and not rule.test(typed)):
            wanted = rule.text.format(type=type_noun(tp)) if rule is not None else type_noun(tp)
            if typed is BAD:
                why = bad_item(value, tp)
            else:
                why = f" ({rule.detail(typed)})" if rule is not None and rule.detail else ""
            given = shown(value)
            raise PupilError(f"{check}.{f.name} must be {wanted}{' or null' if optional else ''}, not {given}{why}")
        setattr(cfg, f.name, typed)


# ---------------------------------------------------------------------------------------------------------------
# Context and runner


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
    """Images per forward pass: 1,024 for small images, fewer for large ones (``batch_for``), so that activations
    stay bounded; every check's own batch setting is capped by it (``ctx.batch``)."""
    gradients: bool = True
    """Whether gradients flow through the model (not through an ONNX session): white-box attacks, Grad-CAM,
    Integrated Gradients and ODIN need them; without them a check switches to a black-box method or skips the
    part, with a note."""
    features: bool = True
    """Whether ``model.net`` keeps the feature contract (``forward_features``, ``forward_head(pre_logits=True)``,
    ``num_features``): feature-space OOD scores, fairness's slice features and MC dropout's head need it."""
    gradcam: bool = True
    """Whether ``model.net`` names a ``gradcam_layer`` that forward hooks can see (not TorchScript or ONNX)."""
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
            t0 = time.perf_counter()
            self._cache[key] = predict_logits(
                self.model, self.split(split), self.batch_size, self.device, self.dtype, self.channels_last
            )
            self._cache[f"{key}/seconds"] = time.perf_counter() - t0
        return self._cache[key]

    def batch(self, wanted: int) -> int:
        """A check's batch setting, capped by the context's batch size for the image size."""
        return max(1, min(wanted, self.batch_size))

    def grad_batch(self, wanted: int) -> int:
        """A check's batch setting for a pass that back-propagates to the input: a quarter of ``batch``, since
        autograd keeps every activation of the batch for the backward pass (ODIN at batch 500 on 224-px
        images took 7 GB)."""
        return max(1, min(wanted, self.batch_size // 4))

    def targets(self, split: str = "test") -> torch.Tensor:
        return self.split(split).targets

    def forward(
        self, images: torch.Tensor, fn: Callable[[torch.Tensor], Any] | None = None, batch_size: int = 0, grad=False
    ) -> Any:
        """``fn(x)`` (default: the model) over uint8 images (N, C, H, W), chunk by chunk: each chunk becomes [0, 1]
        floats on the device, channels-last when the run is, under the run's autocast and, unless ``grad``, in
        inference mode. ``fn`` returns a tensor or a tuple of tensors (or None); each is concatenated in float32 on
        the CPU. The one batching loop of the audit, so that device, format and precision are decided once."""
        fn = fn or self.model
        parts: list[Any] = []
        mode = nullcontext() if grad else torch.inference_mode()
        with mode:
            for chunk in images.split(batch_size or self.batch_size):
                x = to_input(chunk, self.device, self.channels_last)
                with autocast(self.device, self.dtype):
                    out = fn(x)
                parts.append(tuple(o.detach().float().cpu() if o is not None else None for o in _tuple(out)))
        joined = tuple(torch.cat(p) if p[0] is not None else None for p in zip(*parts, strict=True))
        return joined if isinstance(out, tuple) else joined[0]


def _tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def table(columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    """The one table shape results.json uses."""
    return {"columns": columns, "rows": rows}


def subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded random subset of n indices (all when n is 0 or at least total), in ascending order."""
    if not n or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


FIGURE_KINDS = ("line", "bars", "histogram", "images", "drawer")


def figure(caption: str, kind: str, curve: str = "", **options: Any) -> dict[str, Any]:
    """A figure of the check's section, for its ``figures`` list: the report draws it by ``kind`` (line, bars,
    histogram, images, or a bespoke ``drawer=`` it names) from the data at ``curve``, a dotted path into the
    section's curves (``table=`` names a table instead). ``options`` are the kind's: line takes ``x``, ``series``
    ({key: label}), ``xlabel`` and ``ylabel``; bars ``labels``, ``values``, ``xlabel`` and ``xlim``; histogram
    ``bins``, ``xlabel`` and ``ylabel``; images ``per_row``. The data stays where it is; the spec only points."""
    if kind not in FIGURE_KINDS:
        raise ValueError(f"unknown figure kind {kind!r}")
    return {"caption": caption, "kind": kind, "curve": curve, **options}


def headline(label: str, value: float, higher_is_better: bool, unit: str = "", ci: list[float] | None = None) -> dict:
    out = {"label": label, "value": value, "higher_is_better": higher_is_better, "unit": unit}
    if ci is not None:
        out["ci95"] = ci
    return out


def make_context(
    run: str | Path | Run,
    device: str,
    budget: str,
    seed: int,
    data_dir: str | None = None,
    precision: str = "fp32",
    max_memory: int | str | None = None,
) -> AuditContext:
    """The audit's context for a run directory, or for a ``Run`` that ``pupil.sources`` opened (a model pupil
    did not train). The audit computes in ``precision``: fp32, the model as given, unless asked otherwise."""
    if budget not in BUDGETS:
        raise PupilError(f"unknown budget {budget!r}; choose {' or '.join(BUDGETS)}")
    dev = resolve_device(device)
    if not isinstance(run, Run):
        run = load_run(run, device=dev)
    run.max_memory = memory_budget(max_memory) if run.max_memory is None else run.max_memory
    run.model.to(dev)
    info, cfg = run.info, run.info["config"]
    if info["runtime"]["channels_last"]:  # the weights too: channels-last inputs alone gain little
        run.model.to(memory_format=torch.channels_last)
    test = run.split("test", data_dir)
    val = run.split("val", data_dir) if cfg["data"]["val_size"] else None
    source = info.get("source") or {}
    batch = batch_for(test.shape)
    one = min(batch, len(test)) * math.prod(test.shape)
    if test.streamed and one > run.max_memory:
        raise PupilError(
            f"--max-memory {run.max_memory:,} bytes does not hold one batch of {min(batch, len(test))} images of "
            f"{'x'.join(map(str, test.shape))} ({one:,} bytes); give it more"
        )
    return AuditContext(
        run=run,
        test=test,
        val=val,
        device=dev,
        dtype=resolve_precision(precision, dev),
        channels_last=info["runtime"]["channels_last"],
        seed=seed,
        budget=budget,
        gradients=source.get("gradients", True),
        features=source.get("features", True),
        gradcam=source.get("gradcam", True),
        batch_size=batch,
    )


PIXELS_PER_BATCH = 1 << 22  # 4M pixels: 1,024 images of 64x64 or less, 64 of 224x224


def batch_for(shape: tuple[int, int, int]) -> int:
    """Images per forward pass for ``(C, H, W)`` inputs: a power of two with at most ``PIXELS_PER_BATCH`` pixels
    (at least 8, at most 1,024), which bounds the activations of a 224-px ImageNet model to a few hundred MB."""
    fits = max(1, PIXELS_PER_BATCH // (shape[1] * shape[2]))
    return max(8, min(1024, 1 << (fits.bit_length() - 1)))


def run_audit(
    run_dir: str | Path | Run,
    checks: list[str] | None = None,
    *,
    budget: str = "quick",
    device: str = "auto",
    seed: int = 0,
    settings: dict[str, dict[str, Any]] | None = None,
    data_dir: str | None = None,
    on_check: Callable[[str, str], None] | None = None,
    precision: str = "fp32",
    max_memory: int | str | None = None,
    amend: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the named checks (all registered ones by default) and write ``<run>/results.json``.

    ``amend`` takes the finished results and returns them with more sections (the release gate's verdict), so
    that results.json is written once, complete.

    ``run_dir`` is a run directory, or a ``Run`` from ``pupil.sources.open_audit`` (a model pupil did not
    train; results.json goes to its ``dir``).

    Sections of an earlier results.json that were audited with the same split, budget and seed are
    kept for checks not re-run now; otherwise the file is replaced. A kept section that no longer follows
    the results schema is dropped and listed under ``audit.dropped_sections``.
    """
    from pupil.audit import DEFAULT_CHECKS

    names = list(checks or DEFAULT_CHECKS)
    settings = settings or {}
    for n in [*names, *settings]:
        CHECKS.entry(n)  # an unknown name fails before any work
    if unknown := set(settings) - set(names):
        raise PupilError(f"settings given for check(s) not being run: {', '.join(sorted(unknown))}")
    skipped = []
    for n in list(names):
        check = CHECKS.get(n)
        if gone := missing(check.requires):
            if checks:  # asked for by name: refuse in one line
                require(gone, f"the {n} check", check.extra)
            names.remove(n)  # the default list: run the rest and say what was left out
            skipped.append(f"skipped the {n} check: it needs {install_hint(gone, check.extra)}")
    checks_run = {n: CHECKS.get(n)() for n in names}
    configs = {n: c.config(budget, settings.get(n)) for n, c in checks_run.items()}  # bad settings fail here too
    ctx = make_context(run_dir, device, budget, seed, data_dir, precision, max_memory)
    run_dir = ctx.run.dir
    if ctx.val is None and not checks:
        for n in [n for n, c in checks_run.items() if c.needs_val]:
            del checks_run[n], configs[n]
            skipped.append(f"skipped the {n} check: it calibrates on a validation split, and this run has none")
    for n, c in list(checks_run.items()):
        if why := c.unavailable(ctx):
            if checks:
                raise PupilError(f"the {n} check cannot run on {run_dir}: {why}")
            del checks_run[n], configs[n]
            skipped.append(f"skipped the {n} check: {why}")
    audit = {
        "split": "test",
        "n": len(ctx.test),
        "budget": budget,
        "seed": seed,
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "precision": str(ctx.dtype or "fp32"),
        "tta": ctx.model.tta,
        "data": {
            "dataset": ctx.test.meta.get("name", ctx.run.info["data"]["dataset"]),
            "fingerprint": ctx.test.meta.get("fingerprint"),
            "matches_training": ctx.test.meta.get("matches_training"),
            "data_dir": data_dir,
            "conversions": {k: v for k, v in ctx.test.meta.get("conversions", {}).items() if v},
            "bad_images": len(ctx.test.meta.get("bad_images", [])),
            "streamed": ctx.test.streamed,
            "max_memory_bytes": ctx.run.max_memory,
        },
    }
    path = Path(run_dir) / "results.json"
    sections, dropped, notes = earlier_sections(path, audit, names)
    notes = skipped + list((ctx.run.info.get("source") or {}).get("notes", [])) + notes
    per_image: dict[str, dict[str, torch.Tensor]] = {}
    for n, cfg in configs.items():
        check = checks_run[n]
        if on_check:
            on_check(n, "start")
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        result = check.run(ctx, cfg)
        if "per_image" in result:  # written beside results.json, not into it
            per_image[n] = result.pop("per_image")
        if not isinstance(result.get("summary"), dict):  # a bug in the check: fail before the next one runs
            raise PupilError(f"the {n} check returned no summary (the figures other code reads)")
        result = {"title": check.title, "config": dataclasses.asdict(cfg), **result}
        result["runtime_s"] = round(time.perf_counter() - t0, 3)
        sections[n] = result
        if on_check:
            on_check(n, "done")
    if "logits/test/seconds" in ctx._cache:
        audit["prediction_s"] = round(ctx._cache["logits/test/seconds"], 3)
    if dropped:
        audit["dropped_sections"] = dropped
    if notes:
        audit["notes"] = notes
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {
            "dir": str(run_dir),
            "name": ctx.run.name,
            "model": ctx.run.info["model"],
            "dataset": ctx.run.info["data"]["dataset"],
            "classes": ctx.run.classes,
            **({"source": ctx.run.info["source"]} if "source" in ctx.run.info else {}),
        },
        "audit": audit,
        "checks": {k: sections[k] for k in sorted(sections, key=_order)},
    }
    if amend is not None:
        results = amend(results)
    validate(results)
    for n, tensors in per_image.items():
        write_per_image(run_dir, n, tensors, audit)
    write_json(path, results)
    return results


def earlier_sections(
    path: Path, audit: dict[str, Any], rerun: list[str]
) -> tuple[dict[str, Any], list[dict[str, str]], list[str]]:
    """The sections of an earlier results.json to keep beside this audit's, the ones dropped, and notes.

    Kept: sections of checks not in ``rerun``, audited with the same split, budget and seed, that follow the
    results schema. Dropped (as ``{"check", "reason"}``): those that do not, so that one hand-edited or
    outdated section costs a re-run of its check instead of blocking every later audit. A file of another major
    schema version (1.x sections have no summary) is replaced whole, with a note naming the sections lost.
    """
    if not path.exists():
        return {}, [], []
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {}, [], [f"the earlier results.json was not valid JSON ({e}); it was replaced"]
    if not isinstance(old, dict) or not isinstance(old.get("audit"), dict) or not isinstance(old.get("checks"), dict):
        return {}, [], ["the earlier results.json had no audit and checks objects; it was replaced"]
    if age := other_version(old):
        note = f"the earlier results.json was written by {age} pupil (schema {old['schema_version']}); it was replaced"
        if lost := sorted(set(old["checks"]) - set(rerun)):
            note += f" without its {', '.join(lost)} section(s): `pupil audit {path.parent} --checks {','.join(lost)}`"
            note += " re-runs them"
        return {}, [], [note]
    if any(old["audit"].get(k) != audit[k] for k in ("split", "budget", "seed")):
        return {}, [], []
    kept, dropped = {}, []
    for name, section in old["checks"].items():
        if name in rerun:
            continue
        if problem := section_problem(section, name):
            reason = f"it broke the results schema at {problem}; `pupil audit {path.parent} --checks {name}` re-runs it"
            dropped.append({"check": name, "reason": reason})
        else:
            kept[name] = section
    return kept, dropped, []


def _order(name: str) -> int:
    from pupil.audit import DEFAULT_CHECKS

    return DEFAULT_CHECKS.index(name) if name in DEFAULT_CHECKS else len(DEFAULT_CHECKS)
