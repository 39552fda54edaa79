"""``distill:STUDENT``: train a smaller registered model on a run's data with the run as its teacher.

This adds no training code: it writes the Config that ``pupil train --task distill --teacher RUN`` would build,
starting from the teacher's own resolved config (its data, split, augmentation, optimiser and schedule, which are
known to work on this data) with the model replaced by the student at its default size, and runs it through
``pupil.training.loop.fit``. The student's run directory is therefore an ordinary run: it shows progress, resumes
after a kill (``distill_run`` again, or ``pupil train --resume OUT``), and its ``run.json`` records the teacher in
``config.task.teacher`` and the method in ``config.train.task``. The loss is ``DistillationTask``'s (Hinton et al.
2015 soft targets mixed with the labels, or DeiT's hard ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pupil.config import Config, DistillConfig, build, check_run_name, flat_fields
from pupil.errors import PupilError
from pupil.run import read_info


def distill_config(
    run_dir: str | Path,
    student: str,
    out: str | Path,
    *,
    max_minutes: float | None = None,
    epochs: float | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """The training config that distils the run at ``run_dir`` (the teacher) into a new ``student`` model at ``out``.

    The teacher's data and recipe settings are kept; ``train.task`` becomes ``distill`` with the teacher's absolute
    path; the model section becomes the student's defaults. ``max_minutes`` (a wall-clock budget the schedule is
    fitted to) and ``epochs`` replace the teacher's; ``overrides`` are flat config fields, as on ``pupil train``'s
    command line (``{"distill_alpha": 0.9, "lr": 0.05}``).

    Raises PupilError for an unknown student (naming close names), a student that cannot take the teacher's
    images or give its number of classes, or a teacher run without weights.
    """
    from pupil.models.registry import check_name

    teacher = Path(run_dir).resolve()
    info = read_info(teacher)
    if not (teacher / "model.safetensors").exists():
        raise PupilError(f"teacher {run_dir} has no model.safetensors (it never finished an epoch); nothing to distil")
    if not isinstance(student, str) or not student:
        raise PupilError(f"the student must be a registered model name (`pupil models` lists them), not {student!r}")
    check_name(student)
    check_student(student, info)
    out = Path(out)
    check_run_name(out.name)
    fields = flat_fields()
    # The teacher's settings as flat fields (unique across sections), so that build() checks and coerces them all
    # as it does a recipe's. Its own method's settings (sigma, epsilon...) are not the student's and stay behind.
    flat: dict[str, Any] = {}
    for section in ("data", "optim", "train"):
        for key, value in (info["config"].get(section) or {}).items():
            if key in fields and fields[key][0] == section:
                flat[key] = value
    flat |= {"model": student, "task": "distill", "teacher": str(teacher), "name": out.name, "out": str(out.parent)}
    if max_minutes is not None:
        flat["max_minutes"] = max_minutes
    if epochs is not None:
        flat["epochs"] = epochs
    for key, value in (overrides or {}).items():
        if key in ("model", "task", "teacher", "name", "out"):
            raise PupilError(f"{key} is set by the distillation itself (its student, teacher and output directory)")
        if key not in fields:
            raise PupilError(f"unknown config field {key!r}")
        flat[key] = value
    return build(None, flat)


def check_student(student: str, info: dict[str, Any]) -> None:
    """Build ``student`` for the teacher's classes and image shape and run one image through it."""
    from pupil.models import create

    m, shape = info["model"], info["data"]["input_shape"]
    classes = len(info["data"]["classes"])
    c, h, w = shape
    try:
        net = create(student, num_classes=classes, in_chans=c, img_size=h).eval()
        with torch.no_grad():
            logits = net(torch.zeros(1, c, h, w))
    except PupilError:
        raise
    except Exception as e:  # a model built for other sizes fails in many ways; the first line says how
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise PupilError(f"student {student} cannot take the teacher's {c}x{h}x{w} images: {why}") from None
    if tuple(logits.shape) != (1, classes):
        raise PupilError(
            f"student {student} gives {tuple(logits.shape)[1:]} outputs, not the {classes} classes of the teacher "
            f"({m.get('name', 'the run')})"
        )


def distill_run(
    run_dir: str | Path,
    student: str,
    out: str | Path,
    *,
    max_minutes: float | None = None,
    epochs: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Distil the run at ``run_dir`` into ``student`` and return the new run directory ``out``.

    Training goes through pupil's normal entry point (``pupil.training.loop.fit``). An unfinished distillation of
    the same teacher into the same student at ``out`` is resumed rather than started again (unless
    ``overwrite``); any other run there is refused unless ``overwrite``. ``overrides`` as for ``distill_config``.
    """
    from pupil.training.loop import fit

    cfg = distill_config(run_dir, student, out, max_minutes=max_minutes, epochs=epochs, overrides=overrides)
    out = Path(out)
    if not overwrite and _resumable(out, cfg):
        return fit(resume=out, progress=progress).dir
    return fit(cfg, overwrite=overwrite, progress=progress).dir


def _resumable(out: Path, cfg: Config) -> bool:
    """Whether ``out`` holds an interrupted distillation of the same teacher into the same student."""
    if not (out / "run.json").exists():
        return False
    info = read_info(out)
    saved = info.get("config", {})
    task = saved.get("task") or {}
    return (
        info.get("status") != "finished"
        and saved.get("train", {}).get("task") == "distill"
        and isinstance(cfg.task, DistillConfig)
        and task.get("teacher") == cfg.task.teacher
        and saved.get("model", {}).get("model") == cfg.model.model
    )
