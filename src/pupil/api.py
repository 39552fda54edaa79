"""``pupil.audit(model, data, ...)``: the report card for any image classifier, from Python.

``pupil audit`` calls this too, so the command line and the API take one path: a run directory is opened as
it was trained, any other model through ``pupil.sources``; the audit writes results.json; the report and the
model card are rendered from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from pupil.errors import PupilError

AUDITS = Path("audits")  # where an audit of a model pupil did not train goes unless ``out`` names a folder


def is_run_dir(model: Any) -> bool:
    """Whether ``model`` names a run directory (as opposed to a ``kind:target`` model source or a module)."""
    if not isinstance(model, str | Path):
        return False
    return not (isinstance(model, str) and re.match(r"^\w+:", model) and not Path(model).exists())


def audit(
    model: str | Path | nn.Module,
    data: Any = None,
    checks: list[str] | str | None = None,
    budget: str = "quick",
    out: str | Path | None = None,
    preprocess: dict[str, Any] | None = None,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    classes: str | Path | list[str] | None = None,
    class_map: str | None = None,
    val_size: float = 0.1,
    device: str = "auto",
    seed: int = 0,
    settings: dict[str, dict[str, Any]] | None = None,
    precision: str = "fp32",
    thresholds: str | Path | None = None,
    on_bad_image: str = "fail",
    max_memory: int | str | None = None,
    on_check: Callable[[str, str], None] | None = None,
    gate: str | Path | None = None,
) -> dict[str, Any]:
    """Audit ``model`` on ``data``; write results.json, report.html and model_card.md; return the results.

    ``model``: a run directory, ``timm:NAME`` or ``torchvision:NAME`` (with ``weights=FILE`` or
    ``pretrained=True``), ``onnx:FILE``, ``torchscript:FILE``, ``export:FILE``, ``py:package.module:factory``,
    or an ``nn.Module``. ``data``: a dataset name, an image folder, a CSV manifest, or a
    ``torch.utils.data.Dataset`` of (image, label); for a run directory it defaults to the run's data (and
    then points at it, like ``--data-dir``). ``preprocess``: ``img_size``, ``resize``, ``crop``,
    ``interpolation``, ``mean``, ``std``, ``input_range`` where the model does not say them itself. ``out``:
    the folder for the results (a run directory's own by default, else ``audits/<model name>``).
    ``max_memory``: bytes (or ``"4GB"``) a split may take decoded; larger folders and manifests are streamed
    from their files (default: a quarter of this machine's memory). ``gate``: a YAML file of release rules
    (``pupil.report.gates``) judged on the new results, written into results.json under ``gate`` and onto the
    card; rules against a base run need ``pupil compare BASE NEW --gate FILE``.
    """
    from pupil.audit import run_audit
    from pupil.report.render import load_thresholds, render_run
    from pupil.run import prepare_run_dir, read_info, remove_if_empty, run_lock
    from pupil.runtime import resolve_device

    load_thresholds(thresholds)  # a bad file fails before the audit, not after
    rules = _gate_rules(gate)
    names = [c.strip() for c in checks.split(",") if c.strip()] if isinstance(checks, str) else checks
    if is_run_dir(model):
        given = {"weights": weights, "pretrained": pretrained or None, "classes": classes, "class_map": class_map}
        given |= {k: v for k, v in (preprocess or {}).items() if v is not None}
        if extra := [k for k, v in given.items() if v]:
            raise PupilError(
                f"{', '.join(extra)} describe(s) a model pupil did not train; a run directory brings its own"
            )
        if out is not None:
            raise PupilError("a run directory's audit is written into it; out is for other models")
        run_dir = Path(model)
        read_info(run_dir)  # a missing or corrupt run fails here, before the lock
        with run_lock(run_dir, "auditing"):  # results.json, report.html and model_card.md change together
            results = run_audit(
                run_dir,
                names,
                budget=budget,
                device=device,
                seed=seed,
                settings=settings,
                data_dir=None if data is None else str(data),
                on_check=on_check,
                precision=precision,
                max_memory=max_memory,
                amend=_judge(rules, gate),
            )
            render_run(run_dir, thresholds)
        return results

    from pupil.sources import open_audit, parse_source

    if out is None:
        if isinstance(model, nn.Module):
            name = type(model).__name__
        else:
            kind, target = parse_source(str(model))
            name = f"{kind}-{Path(target).stem if kind in ('onnx', 'torchscript', 'export') else target}"
        out = AUDITS / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "model")
    out = Path(out)
    run = open_audit(
        model,
        data,
        out=out,
        weights=weights,
        pretrained=pretrained,
        preprocess=preprocess,
        classes=classes,
        class_map=class_map,
        val_size=val_size,
        seed=seed,
        device=resolve_device(device),
        on_bad_image=on_bad_image,
        max_memory=max_memory,
    )
    created = prepare_run_dir(out, overwrite=False)
    try:
        with run_lock(out, "auditing"):
            results = run_audit(
                run,
                names,
                budget=budget,
                device=device,
                seed=seed,
                settings=settings,
                on_check=on_check,
                precision=precision,
                amend=_judge(rules, gate),
            )
            render_run(out, thresholds)
    except BaseException:
        if created:
            remove_if_empty(out)
        raise
    return results


def _gate_rules(gate: str | Path | None) -> list:
    """The gate file's rules, read before the audit so that a bad file fails first; rules that need a base run
    are refused here (they belong to ``pupil compare BASE NEW --gate FILE``)."""
    if gate is None:
        return []
    from pupil.report.gates import load_gates

    rules = load_gates(gate)
    if based := [r.text for r in rules if r.base]:
        raise PupilError(
            f"{gate}: {based[0]!r} compares with a base run; judge it with pupil compare BASE NEW --gate {gate}"
        )
    return rules


def _judge(rules: list, gate: str | Path | None) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """What adds the gate's verdict to the results under ``gate`` before results.json is written (None: no gate)."""
    if gate is None:
        return None
    from pupil.report.gates import evaluate

    return lambda results: {**results, "gate": evaluate(rules, results, file=str(gate))}
