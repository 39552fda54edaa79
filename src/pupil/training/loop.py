"""The training loop: ``fit`` builds everything from a Config, ``train_one_epoch`` and ``evaluate``
do the work, and every epoch leaves a complete, resumable run directory.

Determinism: the order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``, and every augmentation draw comes from one generator whose state is checkpointed, so
a run resumed after a kill or Ctrl-C replays exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pupil.config import Config, from_dict
from pupil.data import BatchAugment, ImageDataset, load
from pupil.data.transforms import AugmentConfig
from pupil.errors import Interrupted, PupilError
from pupil.io import append_jsonl, write_json
from pupil.models import PixelModel, create
from pupil.models.registry import check_name
from pupil.run import Run, clear_run_files, environment, load_run, prepare_run_dir, remove_if_empty, run_lock
from pupil.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, save_weights, set_rng_state
from pupil.training.energy import EnergyMeter, grid_codes
from pupil.training.energy import add as add_energy
from pupil.training.optim import create_optimizer
from pupil.training.schedule import lr_factor
from pupil.training.tasks import TASKS


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PupilError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PupilError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and measured ~10x slower than fp32 (benchmarks/train_fmnist.py)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return torch.bfloat16 if fast else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def seed_everything(seed: int) -> None:
    """Seed torch, numpy (timm's Mixup draws from it) and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def setup_threads(threads: int) -> int:
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1] on ``device``."""
    x = images.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    ds: ImageDataset,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Logits (N, K) in float32 on the CPU, in dataset order."""
    device = torch.device(device)
    model.eval()
    out = []
    for chunk in ds.images.split(batch_size):
        with autocast(device, dtype):
            out.append(model(to_input(chunk, device, channels_last)).float().cpu())
    logits = torch.cat(out)
    if not torch.isfinite(logits).all():
        raise PupilError(f"the model produced {(~torch.isfinite(logits)).sum().item()} non-finite logits")
    return logits


def evaluate(model: nn.Module, ds: ImageDataset, **kwargs: Any) -> dict[str, float]:
    """Top-1, top-5 (where there are more than 5 classes) and cross-entropy over ``ds``."""
    logits = predict_logits(model, ds, **kwargs)
    y = ds.targets
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {
        "top1": (top[:, 0] == y).float().mean().item(),
        f"top{k}": (top == y[:, None]).any(1).float().mean().item(),
        "loss": nn.functional.cross_entropy(logits, y).item(),
        "n": len(y),
    }


def train_one_epoch(
    state: dict[str, Any], epoch: int, start: int, bar: Callable[[int, dict], None]
) -> dict[str, float]:
    """Run the steps of ``epoch`` from batch ``start``; returns mean loss and accuracy over them."""
    cfg: Config = state["cfg"]
    model, opt, task, device = state["model"], state["opt"], state["task"], state["device"]
    ds: ImageDataset = state["train_ds"]
    bs, spe = cfg.data.batch_size, state["steps_per_epoch"]
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch))
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, t0 = 0, time.perf_counter()
    model.train()
    for i in range(start, spe):
        if state["step"] >= state["total_steps"]:
            break
        idx = order[i * bs : (i + 1) * bs]
        x = state["augment"](to_input(ds.images[idx], device, state["channels_last"]), state["gen"])
        y = ds.targets[idx].to(device, non_blocking=True)
        hard_y = y
        if state["mixup"] is not None:
            x, y = state["mixup"](x, y)
        factor = lr_factor(
            state["step"], state["total_steps"], state["warmup_steps"], cfg.optim.sched, cfg.optim.min_lr_ratio
        )
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * factor
        with autocast(device, state["dtype"]):
            out = task(model, x, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if cfg.optim.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        state["step"] += 1
        if state["ema"] is not None:
            state["ema"].update(model, step=state["step"])
        loss_sum += out["loss"].detach() * len(idx)
        correct += (out["logits"].detach().argmax(1) == hard_y).sum()
        seen += len(idx)
        if cfg.train.max_minutes and state["step"] == BUDGET_PROBE_STEPS and not state["budget_fitted"]:
            fit_budget(state, state["elapsed"] + time.perf_counter() - t0)
        if state["on_step"] is not None:
            state["on_step"](state)
        if i % 10 == 0 or i == spe - 1:
            rate, loss = seen / (time.perf_counter() - t0), loss_sum.item() / seen
            if not math.isfinite(loss):
                raise PupilError(
                    f"the training loss became {loss} by step {state['step']} (learning rate {cfg.optim.lr:g} too "
                    "high, or non-finite inputs); the run is marked failed"
                )
            bar(state["step"], {"loss": loss, "acc": correct.item() / seen, "img/s": rate})
        state["interrupt"].check()  # a Ctrl-C that arrived during the step takes effect here, between steps
    return {"train_loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1), "seen": seen}


BUDGET_PROBE_STEPS = 20
# A forward pass without gradients costs about a third of a training step (fp32, measured on CPU); fit_budget
# reserves this fraction of a step for each batch of the precise-BN pass.
PRECISE_BN_STEP_COST = 0.35


def fit_budget(state: dict[str, Any], seconds: float) -> None:
    """Shrink the run to the steps that fit ``max_minutes`` at the speed of its first steps, so that the
    learning-rate schedule still ends at its minimum when the time is up (used to compare models under one
    wall-clock budget). The first steps include warm-up costs, so the estimate errs on the short side."""
    per_step = seconds / BUDGET_PROBE_STEPS
    train = state["cfg"].train
    reserve = 0.0
    if precise_bn_pending(state):
        reserve = PRECISE_BN_STEP_COST * train.precise_bn * per_step  # the precise-BN pass is inside the budget
    fits = int((train.max_minutes * 60 - reserve) / per_step)
    state["total_steps"] = max(BUDGET_PROBE_STEPS + 1, min(state["total_steps"], fits))
    state["warmup_steps"] = min(state["warmup_steps"], state["total_steps"] // 5)
    state["budget_fitted"] = True


def build(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Data, model, task, optimizer, EMA and mixup for ``cfg``; returns the loop state."""
    check_name(cfg.model.model)
    if cfg.train.track_energy and cfg.train.energy_country not in grid_codes():
        raise PupilError(
            f"energy_country must be an ISO 3166 alpha-3 code in codecarbon's energy mix (e.g. USA, FRA, DEU), "
            f"not {cfg.train.energy_country!r}"
        )
    device = resolve_device(cfg.train.device)
    threads = setup_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    d = cfg.data
    kw = dict(
        data_dir=d.data_dir,
        val_size=d.val_size,
        seed=cfg.train.seed,
        img_size=d.img_size,
        on_bad_image=d.on_bad_image,
        min_per_class=d.min_per_class,
    )
    train_ds = load(d.dataset, "train", **kw)
    val_ds = load(d.dataset, "val", **kw) if d.val_size else None
    c, h, w = train_ds.shape
    if h != w:
        raise PupilError(f"images are {h}x{w}; pass --img-size to train on square images")
    if d.batch_size > len(train_ds):
        raise PupilError(f"batch size {d.batch_size} is larger than the {len(train_ds)}-image training split")
    mean, std = train_ds.mean_std()
    model_kwargs = dict(cfg.model.model_args, drop_rate=cfg.model.drop_rate)
    if cfg.model.drop_path_rate:
        model_kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    if cfg.model.pretrained:
        from pupil.models.pretrained import pretrained_net

        net, mean, std = pretrained_net(cfg.model.model, len(train_ds.classes), c)
    else:
        net = create(cfg.model.model, num_classes=len(train_ds.classes), in_chans=c, img_size=h, **model_kwargs)
    channels_last = cfg.train.channels_last and any(isinstance(m, nn.Conv2d) for m in net.modules())
    model = PixelModel(net, mean, std).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    mixup = None
    if d.mixup or d.cutmix:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=d.mixup,
            cutmix_alpha=d.cutmix,
            label_smoothing=cfg.optim.label_smoothing,
            num_classes=len(train_ds.classes),
        )
    ema = None
    if cfg.optim.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.optim.ema_decay)
    spe = len(train_ds) // d.batch_size
    total = math.ceil(cfg.train.epochs * spe)
    aug = AugmentConfig(d.crop_pad, d.flip, d.rotate, d.color_jitter, d.erase_prob)
    return {
        "cfg": cfg,
        "run_dir": run_dir,
        "device": device,
        "threads": threads,
        "train_ds": train_ds,
        "val_ds": val_ds,
        "model": model,
        "ema": ema,
        "mixup": mixup,
        "task": TASKS.get(cfg.train.task).from_config(cfg, device, classes=train_ds.classes, shape=train_ds.shape),
        "opt": create_optimizer(model, cfg.optim),
        "augment": BatchAugment(aug),
        "channels_last": channels_last,
        "dtype": resolve_precision(cfg.train.precision, device),
        "gen": torch.Generator().manual_seed(cfg.train.seed),
        "steps_per_epoch": spe,
        "total_steps": total,
        "warmup_steps": int(cfg.optim.warmup_epochs * spe),
        "step": 0,
        "elapsed": 0.0,
        "on_step": None,
        "best_val": None,
        "budget_fitted": False,
        "bn_recomputed": False,
        "interrupt": DeferredInterrupt(),
    }


def deployed(state: dict[str, Any]) -> PixelModel:
    """The weights that are evaluated and saved: the EMA when it is on."""
    return state["ema"].module if state["ema"] is not None else state["model"]


def save_state(state: dict[str, Any]) -> None:
    ckpt = {
        "step": state["step"],
        "elapsed": state["elapsed"],
        "best_val": state["best_val"],
        "total_steps": state["total_steps"],
        "warmup_steps": state["warmup_steps"],
        "budget_fitted": state["budget_fitted"],
        "bn_recomputed": state["bn_recomputed"],
        "model": state["model"].state_dict(),
        "opt": state["opt"].state_dict(),
        "ema": state["ema"].state_dict() if state["ema"] is not None else None,
        "gen": state["gen"].get_state(),
        "rng": rng_state(),
    }
    save_checkpoint(state["run_dir"] / "checkpoint.pt", ckpt)
    save_weights(state["run_dir"] / "model.safetensors", deployed(state).net)


def restore_state(state: dict[str, Any]) -> None:
    ckpt = load_checkpoint(state["run_dir"] / "checkpoint.pt")
    state["model"].load_state_dict(ckpt["model"])
    state["opt"].load_state_dict(ckpt["opt"])
    if state["ema"] is not None and ckpt["ema"] is not None:
        state["ema"].load_state_dict(ckpt["ema"])
    state["gen"].set_state(ckpt["gen"])
    set_rng_state(ckpt["rng"])
    for key in ("step", "elapsed", "best_val", "total_steps", "warmup_steps", "budget_fitted"):
        state[key] = ckpt[key]
    state["bn_recomputed"] = ckpt.get("bn_recomputed", False)  # absent from checkpoints before precise BN


def run_info(state: dict[str, Any], status: str, summary: dict[str, Any]) -> dict[str, Any]:
    cfg: Config = state["cfg"]
    ds: ImageDataset = state["train_ds"]
    net = state["model"].net
    build_args = dict(cfg.model.model_args, drop_rate=cfg.model.drop_rate)
    return {
        "schema": 1,
        "status": status,
        "model": {
            "name": cfg.model.model,
            "kwargs": build_args,
            "num_classes": len(ds.classes),
            "in_chans": ds.shape[0],
            "img_size": ds.shape[1],
            "params": sum(p.numel() for p in net.parameters()),
        },
        "data": {
            "dataset": cfg.data.dataset,
            "data_dir": cfg.data.data_dir,
            "classes": ds.classes,
            "input_shape": list(ds.shape),
            "mean": state["model"].mean.flatten().tolist(),
            "std": state["model"].std.flatten().tolist(),
            "train_size": len(ds),
            "val_size": len(state["val_ds"]) if state["val_ds"] is not None else 0,
            "conversions": ds.meta.get("conversions", {}),
            "fingerprint": ds.meta.get("fingerprint"),
            "classes_from": ds.meta.get("classes_from", "the dataset"),
            "bad_images": len(ds.meta.get("bad_images", [])),
        },
        "tta": cfg.train.tta,
        "config": cfg.to_dict(),
        "seed": cfg.train.seed,
        "runtime": {
            "device": str(state["device"]),
            "precision": str(state["dtype"] or "fp32"),
            "threads": state["threads"],
            "channels_last": state["channels_last"],
        },
        "versions": environment(),
        "history": summary,
    }


def fit(
    cfg: Config | None = None,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    on_epoch: Callable[[dict, dict], None] | None = None,
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
    on_step: Callable | None,
    on_epoch: Callable | None,
    log: Callable[[str], None],
) -> Run:
    state = build(cfg, run_dir)
    state["on_step"] = on_step
    announce_data(state, log)
    resuming = info is not None and (run_dir / "checkpoint.pt").exists()
    if resuming:
        restore_state(state)
    history = {"epochs": cfg.train.epochs, "total_steps": state["total_steps"]}
    if resuming:
        history = dict(info.get("history") or history)
    write_json(run_dir / "run.json", run_info(state, "running", history))
    meter = EnergyMeter(cfg.train.energy_country) if cfg.train.track_energy else None
    interrupted = hard = False
    try:
        with _progress(progress, state) as bar, meter or nullcontext(), state["interrupt"]:
            try:
                while state["step"] < state["total_steps"]:
                    state["interrupt"].check()
                    record = run_epoch(state, bar, on_epoch)
                    history.update(
                        last=record,
                        best_val_top1=state["best_val"],
                        train_time_s=round(state["elapsed"], 2),
                        total_steps=state["total_steps"],
                    )
                    write_json(run_dir / "run.json", run_info(state, "running", history))
                state["interrupt"].check()
                if precise_bn_pending(state):
                    record = recompute_bn(state)
                    history.update(
                        last={**history.get("last", {}), **record},
                        best_val_top1=state["best_val"],
                        train_time_s=round(state["elapsed"], 2),
                    )
            except HardInterrupt:
                interrupted = hard = True
            except KeyboardInterrupt:
                interrupted = True
    except Exception as e:
        history["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        write_json(run_dir / "run.json", run_info(state, "failed", history))
        raise
    if meter is not None:
        history["energy"] = add_energy(history.get("energy"), meter.result)
    if interrupted:
        if not hard:  # the step in flight has finished (DeferredInterrupt): the state is whole
            save_state(state)
        write_json(run_dir / "run.json", run_info(state, "interrupted", history))
        at = "the last checkpoint" if hard else f"step {state['step']}"
        raise Interrupted(f"interrupted at {at}; continue with: pupil train --resume {run_dir}")
    write_json(run_dir / "run.json", run_info(state, "finished", history))
    return load_run(run_dir, device=state["device"])


def announce_data(state: dict[str, Any], log: Callable[[str], None]) -> None:
    """Tell the user what the data loader decided on its own: an inferred class list, left-out images."""
    ds: ImageDataset = state["train_ds"]
    source = ds.meta.get("classes_from")
    if source in ("folder names", "the manifest's labels"):
        log(f"{len(ds.classes)} classes, inferred from {source}: {', '.join(ds.classes)}")
    bad = [b for d in (ds, state["val_ds"]) if d is not None for b in d.meta.get("bad_images", [])]
    if bad:
        unique = {b["path"]: b for b in bad}
        path = write_json(state["run_dir"] / "bad_images.json", list(unique.values()))
        log(f"skipped {len(unique)} image file(s) that cannot be used; listed in {path}")
    if ignored := ds.meta.get("ignored_files"):
        log(f"ignored {ignored} file(s) without an image suffix in the class folders")


class HardInterrupt(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, keep the last checkpoint as it is."""


class DeferredInterrupt:
    """Defer SIGINT to a step boundary, so that a Ctrl-C (or ``kill -INT``) landing anywhere in a step still
    leaves a state that resumes bit-exactly: the handler only sets a flag, and ``check()``, called between
    steps, raises KeyboardInterrupt. A second SIGINT raises HardInterrupt at once (nothing more is saved).
    Outside the main thread signals cannot be handled, and the default behaviour stays."""

    def __init__(self):
        self.pending, self.previous = False, None

    def __enter__(self) -> DeferredInterrupt:
        self.pending = False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending:
            raise HardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def run_epoch(state: dict[str, Any], bar: Callable[[int, dict], None], on_epoch: Callable | None) -> dict[str, Any]:
    """Train the rest of the current epoch, validate, log and checkpoint; returns the metrics record."""
    cfg: Config = state["cfg"]
    epoch, start = divmod(state["step"], state["steps_per_epoch"])
    t0 = time.perf_counter()
    try:
        stats = train_one_epoch(state, epoch, start, bar)
    finally:  # on Ctrl-C too, so that the saved state carries the time spent
        state["elapsed"] += time.perf_counter() - t0
    last_lr = lr_factor(
        state["step"] - 1, state["total_steps"], state["warmup_steps"], cfg.optim.sched, cfg.optim.min_lr_ratio
    )
    record = {
        "epoch": epoch + 1,
        "step": state["step"],
        **stats,
        "lr_factor": last_lr,
        "train_time_s": round(state["elapsed"], 2),
    }
    # After the last step with precise BN to come, validation waits for the new statistics (recompute_bn).
    last_before_bn = state["step"] >= state["total_steps"] and precise_bn_pending(state)
    if not last_before_bn:
        validate(state, record)
    if on_epoch is not None:
        on_epoch(state, record)
    append_jsonl(state["run_dir"] / "metrics.jsonl", record)
    save_state(state)
    return record


def validate(state: dict[str, Any], record: dict[str, Any]) -> None:
    """Add the deployed model's val_* metrics to ``record`` and track the best val top-1 (no-op without a val split)."""
    if state["val_ds"] is None:
        return
    val = evaluate_deployed(state, state["val_ds"])
    record.update({f"val_{k}": v for k, v in val.items() if k != "n"})
    state["best_val"] = max(state["best_val"] or 0.0, val["top1"])


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def precise_bn_pending(state: dict[str, Any]) -> bool:
    """Whether the run asks for precise BN, its model has batch norm, and it has not been done yet."""
    return bool(state["cfg"].train.precise_bn) and not state["bn_recomputed"] and bool(batch_norms(deployed(state)))


@torch.no_grad()
def precise_bn(state: dict[str, Any]) -> int:
    """Recompute the deployed model's batch-norm statistics with its final weights ("precise BN": Wu &
    Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

    Running averages with momentum 0.1 lag the weights; after a short or high-learning-rate run they can
    describe weights from many steps back, and the model then collapses in eval mode (measured: an
    EfficientNet-B0 after 26 steps scored 54% in train mode and 10% in eval mode). Each layer's statistics
    become the average of its batch statistics over ``cfg.train.precise_bn`` batches of un-augmented
    training images (a seeded sample), with every other layer in eval mode. On an exception the old
    statistics are put back. Returns the number of images used (0 when the model has no batch norm).
    """
    cfg: Config = state["cfg"]
    model, ds, device = deployed(state), state["train_ds"], state["device"]
    bns = batch_norms(model)
    if not bns or not cfg.train.precise_bn:
        return 0
    bs = cfg.data.batch_size
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.train.seed * 7_919 + 1))
    idx = order[: min(cfg.train.precise_bn, len(ds) // bs) * bs]  # full batches only: each has the same weight
    saved = [(m.momentum, {k: v.clone() for k, v in m.named_buffers()}) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        for chunk in idx.split(bs):
            with autocast(device, state["dtype"]):
                model(to_input(ds.images[chunk], device, state["channels_last"]))
            state["interrupt"].check()
    except BaseException:
        for m, (_, buffers) in zip(bns, saved, strict=True):
            for k, v in m.named_buffers():
                v.copy_(buffers[k])
        raise
    finally:
        for m, (momentum, _) in zip(bns, saved, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(idx)


def recompute_bn(state: dict[str, Any]) -> dict[str, Any]:
    """Run ``precise_bn`` after the last step (its time counts as training), validate again, log and
    checkpoint; returns the record. A run interrupted during it redoes it on resume."""
    t0 = time.perf_counter()
    try:
        n = precise_bn(state)
    finally:
        state["elapsed"] += time.perf_counter() - t0
    record: dict[str, Any] = {
        "epoch": math.ceil(state["step"] / state["steps_per_epoch"]),
        "step": state["step"],
        "precise_bn_images": n,
        "train_time_s": round(state["elapsed"], 2),
    }
    validate(state, record)
    append_jsonl(state["run_dir"] / "metrics.jsonl", record)
    state["bn_recomputed"] = True  # only now: a Ctrl-C before this point redoes the pass and the validation
    save_state(state)
    return record


def evaluate_deployed(state: dict[str, Any], ds: ImageDataset) -> dict[str, float]:
    """Evaluate the deployed weights as they will be served (with flip TTA when the recipe says so).

    TTA is switched on for this call only: left on, it would double the cost of the training steps
    that follow and change what they optimise.
    """
    model = deployed(state)
    model.tta = state["cfg"].train.tta
    try:
        return evaluate(
            model,
            ds,
            batch_size=state["cfg"].data.eval_batch_size,
            device=state["device"],
            dtype=state["dtype"],
            channels_last=state["channels_last"],
        )
    finally:
        model.tta = False


class _progress:
    """A rich progress bar over training steps (loss, accuracy, images/s, ETA), or nothing."""

    def __init__(self, enabled: bool, state: dict[str, Any]):
        self.enabled, self.state = enabled, state

    def __enter__(self) -> Callable[[int, dict], None]:
        if not self.enabled:
            return lambda step, stats: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.bar.__enter__()
        s = self.state
        name = s["cfg"].train.name
        self.task = self.bar.add_task(f"train {name}", total=s["total_steps"], completed=s["step"], stats="")

        def update(step: int, stats: dict) -> None:
            epoch = (step - 1) // s["steps_per_epoch"] + 1
            text = f"epoch {epoch} loss {stats['loss']:.3f} acc {stats['acc']:.3f} {stats['img/s']:.0f} img/s"
            self.bar.update(self.task, completed=step, total=s["total_steps"], stats=text)  # a budget may shrink it

        return update

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
