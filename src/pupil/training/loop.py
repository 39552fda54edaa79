"""The training loop: ``fit`` builds a ``TrainState`` from a Config (``state.build``), ``run_epoch`` trains,
validates and checkpoints one epoch at a time, and every epoch leaves a complete, resumable run directory.

Determinism: the order of epoch ``e`` is a permutation drawn from its own seeded stream (``stream_seed``), and
every augmentation draw comes from one generator whose state is checkpointed, so a run resumed after a kill or
Ctrl-C replays exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pupil.config import Config, from_dict
from pupil.data import ImageDataset
from pupil.energy import EnergyMeter
from pupil.energy import add as add_energy
from pupil.errors import Interrupted, PupilError
from pupil.io import append_jsonl, write_json
from pupil.predict import evaluate
from pupil.run import Run, clear_run_files, load_run, prepare_run_dir, remove_if_empty, run_info, run_lock
from pupil.runtime import autocast, to_input
from pupil.training.checkpoint import load_checkpoint, save_checkpoint, save_weights
from pupil.training.precise_bn import precise_bn, precise_bn_pending
from pupil.training.schedule import BUDGET_PROBE_STEPS, BUDGET_REFIT_STEPS, fit_budget, lr_factor, refit_budget
from pupil.training.state import HardInterrupt, TrainState, build, stream_seed

Bar = Callable[[int, dict], None]  # the progress bar's update(step, stats)
OnEpoch = Callable[[TrainState, dict], None]


def fit(
    cfg: Config | None = None,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[TrainState], None] | None = None,
    on_epoch: OnEpoch | None = None,
    log: Callable[[str], None] | None = None,
) -> Run:
    """Train ``cfg`` into ``<out>/<name>``, or continue the run directory ``resume``.

    ``on_step(state)`` runs after every optimizer step and ``on_epoch(state, record)`` after every epoch
    (benchmarks use it to trace test accuracy against training time; training never looks at the test set).
    ``log`` receives one-line notices for the user (the inferred class list, skipped images).

    A run killed before its first checkpoint resumes by starting again from run.json's config. The run
    directory is locked while training; a folder this call created is removed again if it fails before
    writing anything.
    """
    info = None
    if resume is not None:
        run_dir = Path(resume)
        info = load_run(run_dir, load_model=False).info
        cfg = from_dict(info["config"])
        if info["status"] == "finished":
            raise PupilError(f"run {run_dir} already finished; nothing to resume")
        created = False
    else:
        cfg = with_absolute_paths(cfg)
        run_dir = Path(cfg.train.out) / cfg.train.name
        created = prepare_run_dir(run_dir, overwrite)
    try:
        with run_lock(run_dir, "training"):
            if resume is None:
                clear_run_files(run_dir)
            return _fit(cfg, run_dir, info, progress, on_step, on_epoch, log or (lambda message: None))
    except BaseException:
        if created:
            remove_if_empty(run_dir)
        raise


def with_absolute_paths(cfg: Config) -> Config:
    """The config with its data paths made absolute, so that run.json works from any folder."""
    from pupil.data import DATASETS

    d = cfg.data
    dataset = d.dataset if d.dataset in DATASETS or not Path(d.dataset).exists() else str(Path(d.dataset).resolve())
    data_dir = str(Path(d.data_dir).resolve()) if d.data_dir else None
    return dataclasses.replace(cfg, data=dataclasses.replace(d, dataset=dataset, data_dir=data_dir))


def _fit(
    cfg: Config,
    run_dir: Path,
    info: dict[str, Any] | None,
    progress: bool,
    on_step: Callable[[TrainState], None] | None,
    on_epoch: OnEpoch | None,
    log: Callable[[str], None],
) -> Run:
    state = build(cfg, run_dir)
    state.on_step = on_step
    announce_data(state.train_ds, state.val_ds, run_dir, log)
    resuming = info is not None and (run_dir / "checkpoint.pt").exists()
    if resuming:
        state.restore(load_checkpoint(run_dir / "checkpoint.pt"))
    history = {"epochs": cfg.train.epochs, "total_steps": state.total_steps}
    if resuming:
        history = dict(info.get("history") or history)
    write_run_json(state, "running", history)
    meter = EnergyMeter(cfg.train.energy_country) if cfg.train.track_energy else None
    interrupted = hard = False
    try:
        with progress_bar(progress, state) as bar, meter or nullcontext(), state.interrupt:
            try:
                train(state, history, bar, on_epoch)
            except HardInterrupt:
                interrupted = hard = True
            except KeyboardInterrupt:
                interrupted = True
    except Exception as e:
        history["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        write_run_json(state, "failed", history)
        raise
    if meter is not None:
        history["energy"] = add_energy(history.get("energy"), meter.result)
    if interrupted:
        if not hard:  # the step in flight has finished (DeferredInterrupt): the state is whole
            save_state(state)
        write_run_json(state, "interrupted", history)
        at = "the last checkpoint" if hard else f"step {state.step}"
        raise Interrupted(f"interrupted at {at}; continue with: pupil train --resume {run_dir}")
    write_run_json(state, "finished", history)
    return load_run(run_dir, device=state.device)


def train(state: TrainState, history: dict[str, Any], bar: Bar, on_epoch: OnEpoch | None) -> None:
    """Train epoch after epoch to the last step, then run precise BN when it is pending; ``history`` (run.json's
    summary) follows along."""
    while state.step < state.total_steps:
        state.interrupt.check()
        record = run_epoch(state, bar, on_epoch)
        history.update(last=record, best_val_top1=state.best_val, train_time_s=round(state.elapsed, 2))
        history["total_steps"] = state.total_steps  # a time budget may have shrunk it
        write_run_json(state, "running", history)
    state.interrupt.check()
    if precise_bn_pending(state):
        record = {**history.get("last", {}), **recompute_bn(state)}
        history.update(last=record, best_val_top1=state.best_val, train_time_s=round(state.elapsed, 2))


def run_epoch(state: TrainState, bar: Bar, on_epoch: OnEpoch | None) -> dict[str, Any]:
    """Train the rest of the current epoch, validate, log and checkpoint; returns the metrics record."""
    optim = state.cfg.optim
    epoch, start = divmod(state.step, state.steps_per_epoch)
    t0 = time.perf_counter()
    try:
        stats = train_one_epoch(state, epoch, start, bar)
    finally:  # on Ctrl-C too, so that the saved state carries the time spent
        state.elapsed += time.perf_counter() - t0
    last_lr = lr_factor(state.step - 1, state.total_steps, state.warmup_steps, optim.sched, optim.min_lr_ratio)
    record = {
        "epoch": epoch + 1,
        "step": state.step,
        **stats,
        "lr_factor": last_lr,
        "train_time_s": round(state.elapsed, 2),
    }
    # After the last step with precise BN to come, validation waits for the new statistics (recompute_bn).
    last_before_bn = state.step >= state.total_steps and precise_bn_pending(state)
    if not last_before_bn:
        validate(state, record)
    if on_epoch is not None:
        on_epoch(state, record)
    append_jsonl(state.run_dir / "metrics.jsonl", record)
    save_state(state)
    return record


def train_one_epoch(state: TrainState, epoch: int, start: int, bar: Bar) -> dict[str, float]:
    """Run the steps of ``epoch`` from batch ``start``; returns mean loss and accuracy over them."""
    cfg, model, opt, device, ds = state.cfg, state.model, state.opt, state.device, state.train_ds
    bs, spe = cfg.data.batch_size, state.steps_per_epoch
    seed = stream_seed(cfg.train.seed, "epoch_order", epoch)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, t0 = 0, time.perf_counter()
    model.train()
    # Streamed images are decoded ahead, batch by batch in this epoch's order, by DataLoader workers.
    ahead = (
        ds.images.batches([order[i * bs : (i + 1) * bs].tolist() for i in range(start, spe)]) if ds.streamed else None
    )
    for i in range(start, spe):
        if state.step >= state.total_steps:
            break
        idx = order[i * bs : (i + 1) * bs]
        pixels = next(ahead) if ahead is not None else ds.images[idx]
        x = state.augment(to_input(pixels, device, state.channels_last), state.gen)
        y = hard_y = ds.targets[idx].to(device, non_blocking=True)
        if state.mixup is not None:
            x, y = state.mixup(x, y)
        factor = lr_factor(state.step, state.total_steps, state.warmup_steps, cfg.optim.sched, cfg.optim.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * factor
        with autocast(device, state.dtype):
            out = state.task(model, x, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if cfg.optim.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        state.step += 1
        if state.ema is not None:
            state.ema.update(model, step=state.step)
        loss_sum += out["loss"].detach() * len(idx)
        correct += (out["logits"].detach().argmax(1) == hard_y).sum()
        seen += len(idx)
        if cfg.train.max_minutes and state.step == BUDGET_PROBE_STEPS and not state.budget_fitted:
            bn_batches = cfg.train.precise_bn if precise_bn_pending(state) else 0
            probe_s = state.elapsed + time.perf_counter() - t0
            fitted = fit_budget(state.total_steps, state.warmup_steps, probe_s, cfg.train.max_minutes, bn_batches)
            state.total_steps, state.warmup_steps, state.budget_fitted = *fitted, True
        elif cfg.train.max_minutes and state.budget_fitted and state.step % BUDGET_REFIT_STEPS == 0:
            bn_batches = cfg.train.precise_bn if precise_bn_pending(state) else 0
            so_far = state.elapsed + time.perf_counter() - t0
            state.total_steps, state.warmup_steps = refit_budget(
                state.step, state.total_steps, state.warmup_steps, so_far, cfg.train.max_minutes, bn_batches
            )
        if state.on_step is not None:
            state.on_step(state)
        if i % 10 == 0 or i == spe - 1:
            rate, loss = seen / (time.perf_counter() - t0), loss_sum.item() / seen
            if not math.isfinite(loss):
                raise PupilError(
                    f"the training loss became {loss} by step {state.step} (learning rate {cfg.optim.lr:g} too "
                    "high, or non-finite inputs); the run is marked failed"
                )
            bar(state.step, {"loss": loss, "acc": correct.item() / seen, "img/s": rate})
        state.interrupt.check()  # a Ctrl-C that arrived during the step takes effect here, between steps
    return {"train_loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1), "seen": seen}


def validate(state: TrainState, record: dict[str, Any]) -> None:
    """Add the deployed model's val_* metrics to ``record`` and track the best val top-1 (no-op without a val split)."""
    if state.val_ds is None:
        return
    val = evaluate_deployed(state, state.val_ds)
    record.update({f"val_{k}": v for k, v in val.items() if k != "n"})
    state.best_val = max(state.best_val or 0.0, val["top1"])


def recompute_bn(state: TrainState) -> dict[str, Any]:
    """Run ``precise_bn`` after the last step (its time counts as training), validate again, log and
    checkpoint; returns the record. A run interrupted during it redoes it on resume."""
    t0 = time.perf_counter()
    try:
        n = precise_bn(state)
    finally:
        state.elapsed += time.perf_counter() - t0
    record: dict[str, Any] = {
        "epoch": math.ceil(state.step / state.steps_per_epoch),
        "step": state.step,
        "precise_bn_images": n,
        "train_time_s": round(state.elapsed, 2),
    }
    validate(state, record)
    append_jsonl(state.run_dir / "metrics.jsonl", record)
    state.bn_recomputed = True  # only now: a Ctrl-C before this point redoes the pass and the validation
    save_state(state)
    return record


def evaluate_deployed(state: TrainState, ds: ImageDataset) -> dict[str, float]:
    """Evaluate the deployed weights as they will be served (with flip TTA when the recipe says so).

    TTA is switched on for this call only: left on, it would double the cost of the training steps
    that follow and change what they optimise.
    """
    model = state.deployed
    model.tta = state.cfg.train.tta
    try:
        return evaluate(
            model,
            ds,
            batch_size=state.cfg.data.eval_batch_size,
            device=state.device,
            dtype=state.dtype,
            channels_last=state.channels_last,
        )
    finally:
        model.tta = False


def save_state(state: TrainState) -> None:
    """Write the resume state (checkpoint.pt) and the deployed weights (model.safetensors)."""
    save_checkpoint(state.run_dir / "checkpoint.pt", state.checkpoint())
    save_weights(state.run_dir / "model.safetensors", state.deployed.net)


def write_run_json(state: TrainState, status: str, history: dict[str, Any]) -> None:
    """Write run.json for ``status`` (its shape is ``pupil.run.run_info``'s)."""
    info = run_info(
        state.cfg,
        status,
        history,
        train=state.train_ds,
        val=state.val_ds,
        model=state.model,
        device=state.device,
        dtype=state.dtype,
        threads=state.threads,
        channels_last=state.channels_last,
    )
    write_json(state.run_dir / "run.json", info)


def announce_data(train: ImageDataset, val: ImageDataset | None, run_dir: Path, log: Callable[[str], None]) -> None:
    """Tell the user what the data loader decided on its own: an inferred class list, left-out images (listed
    in ``run_dir``/bad_images.json)."""
    if train.meta.get("classes_inferred"):
        log(f"{len(train.classes)} classes, inferred from {train.meta['classes_from']}: {', '.join(train.classes)}")
    bad = [b for d in (train, val) if d is not None for b in d.meta.get("bad_images", [])]
    if bad:
        unique = {b["path"]: b for b in bad}
        path = write_json(run_dir / "bad_images.json", list(unique.values()))
        log(f"skipped {len(unique)} image file(s) that cannot be used; listed in {path}")
    if ignored := train.meta.get("ignored_files"):
        log(f"ignored {ignored} file(s) without an image suffix in the class folders")


@contextmanager
def progress_bar(enabled: bool, state: TrainState) -> Iterator[Bar]:
    """A rich progress bar over training steps (loss, accuracy, images/s, ETA), or nothing."""
    if not enabled:
        yield lambda step, stats: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(f"train {state.cfg.train.name}", total=state.total_steps, completed=state.step, stats="")

        def update(step: int, stats: dict) -> None:
            epoch = (step - 1) // state.steps_per_epoch + 1
            text = f"epoch {epoch} loss {stats['loss']:.3f} acc {stats['acc']:.3f} {stats['img/s']:.0f} img/s"
            bar.update(task, completed=step, total=state.total_steps, stats=text)  # a budget may shrink it

        yield update
