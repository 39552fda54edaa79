"""What the training loop works on: a ``TrainState``, which ``build`` makes from a Config and each step changes.

``TrainState.checkpoint`` and ``TrainState.restore`` are the one place that says which fields survive a
restart; ``DeferredInterrupt`` makes a Ctrl-C wait for a step boundary, so that the state they save is whole;
``stream_seed`` gives every random stream its own seed.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pupil.config import Config
from pupil.data import BatchAugment, ImageDataset, load
from pupil.data.images import memory_budget
from pupil.data.transforms import AugmentConfig
from pupil.energy import grid_codes
from pupil.errors import PupilError
from pupil.models import PixelModel, create
from pupil.models.registry import check_name
from pupil.runtime import resolve_device, resolve_precision, seed_everything, setup_threads
from pupil.training.checkpoint import rng_state, set_rng_state
from pupil.training.optim import create_optimizer
from pupil.training.tasks import TASKS

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.utils import ModelEmaV3

# The epoch order and precise BN's sample each draw from a generator of their own, seeded ``seed * prime + offset
# + index``, so that changing what one draws (more precise-BN batches, say) never shifts the other, nor the
# checkpointed augmentation generator. The primes and offsets are the ones every checkpoint and measured result
# was made with: changing them would break bit-exact resume and move every figure. (At seed 0 two seeds
# coincide: precise BN's sample is epoch 1's order. That correlates the two draws but shifts nothing.)
STREAMS = {"epoch_order": (100_003, 0), "precise_bn": (7_919, 1)}

# checkpoint.pt's keys, which are TrainState's field names; renaming one breaks resuming older runs.
COUNTERS = ("step", "elapsed", "best_val", "total_steps", "warmup_steps", "budget_fitted", "bn_recomputed")
MODULES = ("model", "opt", "ema")  # saved through state_dict(); ema may be None


def stream_seed(seed: int, stream: str, index: int = 0) -> int:
    """The seed of ``stream``'s ``index``-th draw (e.g. the order of epoch ``index``) for the run seed ``seed``."""
    prime, offset = STREAMS[stream]
    return seed * prime + offset + index


class HardInterrupt(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, keep the last checkpoint as it is."""


class DeferredInterrupt:
    """Defer SIGINT and SIGTERM to a step boundary, so that a Ctrl-C, a ``kill`` or a cluster scheduler's
    preemption landing anywhere in a step still leaves a state that resumes bit-exactly: the handler only sets a
    flag, and ``check()``, called between steps, raises KeyboardInterrupt. A second signal raises HardInterrupt at
    once (nothing more is saved). Outside the main thread signals cannot be handled, and the default behaviour
    stays."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.pending, self.previous = False, None

    def __enter__(self) -> DeferredInterrupt:
        self.pending = False
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
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
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            self.previous = None


@dataclass(eq=False)
class TrainState:
    """Everything a training run holds between two steps."""

    cfg: Config
    """The resolved config."""
    run_dir: Path
    """Where run.json, the checkpoint, the weights and metrics.jsonl go."""
    device: torch.device
    """Where the model and batches live."""
    threads: int
    """CPU threads PyTorch uses."""
    dtype: torch.dtype | None
    """Autocast dtype, or None for fp32."""
    channels_last: bool
    """Whether the model and batches use the channels-last memory format."""
    train_ds: ImageDataset
    """The training split."""
    val_ds: ImageDataset | None
    """The validation split, or None without one."""
    model: PixelModel
    """The weights the optimizer moves."""
    ema: ModelEmaV3 | None
    """Exponential moving average of ``model`` (the deployed weights when on), or None."""
    mixup: Mixup | None
    """Mixup/cutmix of a batch and its labels, or None."""
    task: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    """The training method: maps (model, images, labels) to ``{"loss", "logits"}``."""
    opt: torch.optim.Optimizer
    """The optimizer over ``model``'s parameters."""
    augment: BatchAugment
    """The batch augmentations, drawing from ``gen``."""
    gen: torch.Generator
    """The augmentation generator; its state is checkpointed."""
    steps_per_epoch: int
    """Full batches per epoch (a last partial batch is dropped)."""
    total_steps: int
    """Steps of the whole run; a time budget may shrink it after the first steps."""
    warmup_steps: int
    """Steps of learning-rate warm-up."""
    step: int = 0
    """Optimizer steps taken."""
    elapsed: float = 0.0
    """Seconds spent training (steps and precise BN; not validation), across restarts."""
    best_val: float | None = None
    """Best validation top-1 so far, or None before the first validation."""
    budget_fitted: bool = False
    """Whether ``total_steps`` has been fitted to ``max_minutes``."""
    bn_recomputed: bool = False
    """Whether precise BN has run (and its validation been logged)."""
    on_step: Callable[[TrainState], None] | None = None
    """Called after every optimizer step (benchmarks and tests watch the run through it)."""
    interrupt: DeferredInterrupt = field(default_factory=DeferredInterrupt)
    """Holds a Ctrl-C until the step in flight has finished."""

    @property
    def deployed(self) -> PixelModel:
        """The weights that are evaluated and saved: the EMA when it is on."""
        return self.ema.module if self.ema is not None else self.model

    def checkpoint(self) -> dict[str, Any]:
        """What checkpoint.pt holds: the counters, the model, optimizer and EMA state, and every random state."""
        ckpt: dict[str, Any] = {key: getattr(self, key) for key in COUNTERS}
        ckpt |= {key: None if (m := getattr(self, key)) is None else m.state_dict() for key in MODULES}
        return ckpt | {"gen": self.gen.get_state(), "rng": rng_state()}

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from ``checkpoint()``'s dict, as if the run had never stopped."""
        for key in COUNTERS:
            # bn_recomputed is absent from checkpoints written before precise BN existed
            setattr(self, key, ckpt.get(key, False) if key == "bn_recomputed" else ckpt[key])
        for key in MODULES:
            if (m := getattr(self, key)) is not None and ckpt[key] is not None:
                m.load_state_dict(ckpt[key])
        self.gen.set_state(ckpt["gen"])
        set_rng_state(ckpt["rng"])


def build(cfg: Config, run_dir: Path) -> TrainState:
    """Data, model, task, optimizer, EMA and mixup for ``cfg``: the state before the first step."""
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
    train_ds, val_ds = load_splits(cfg)
    model, channels_last = build_model(cfg, train_ds, device)
    mixup = ema = None
    if d.mixup or d.cutmix:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=d.mixup,
            cutmix_alpha=d.cutmix,
            label_smoothing=cfg.optim.label_smoothing,
            num_classes=len(train_ds.classes),
        )
    if cfg.optim.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.optim.ema_decay)
    spe = len(train_ds) // d.batch_size
    return TrainState(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        threads=threads,
        train_ds=train_ds,
        val_ds=val_ds,
        model=model,
        ema=ema,
        mixup=mixup,
        task=TASKS.get(cfg.train.task).from_config(cfg, device, classes=train_ds.classes, shape=train_ds.shape),
        opt=create_optimizer(model, cfg.optim),
        augment=BatchAugment(AugmentConfig(d.crop_pad, d.flip, d.rotate, d.color_jitter, d.erase_prob)),
        channels_last=channels_last,
        dtype=resolve_precision(cfg.train.precision, device),
        gen=torch.Generator().manual_seed(cfg.train.seed),
        steps_per_epoch=spe,
        total_steps=math.ceil(cfg.train.epochs * spe),
        warmup_steps=int(cfg.optim.warmup_epochs * spe),
    )


def load_splits(cfg: Config) -> tuple[ImageDataset, ImageDataset | None]:
    """The training split and the validation split (None when ``val_size`` is 0), checked for training."""
    d = cfg.data
    kw = dict(
        data_dir=d.data_dir,
        val_size=d.val_size,
        seed=cfg.train.seed,
        img_size=d.img_size,
        on_bad_image=d.on_bad_image,
        min_per_class=d.min_per_class,
        max_memory=memory_budget(d.max_memory),
    )
    train_ds = load(d.dataset, "train", **kw)
    val_ds = load(d.dataset, "val", **kw) if d.val_size else None
    _, h, w = train_ds.shape
    if h != w:
        raise PupilError(f"images are {h}x{w}; pass --img-size to train on square images")
    if d.batch_size > len(train_ds):
        raise PupilError(f"batch size {d.batch_size} is larger than the {len(train_ds)}-image training split")
    return train_ds, val_ds


def build_model(cfg: Config, train_ds: ImageDataset, device: torch.device) -> tuple[PixelModel, bool]:
    """The model for ``train_ds``'s classes and shape on ``device``, and whether it runs channels-last."""
    c, h, _ = train_ds.shape
    mean, std = train_ds.mean_std()
    if cfg.model.pretrained:
        from pupil.models.pretrained import pretrained_net

        net, mean, std = pretrained_net(cfg.model.model, len(train_ds.classes), c)
    else:
        kwargs = dict(cfg.model.model_args, drop_rate=cfg.model.drop_rate)
        if cfg.model.drop_path_rate:
            kwargs["drop_path_rate"] = cfg.model.drop_path_rate
        net = create(cfg.model.model, num_classes=len(train_ds.classes), in_chans=c, img_size=h, **kwargs)
    channels_last = cfg.train.channels_last and any(isinstance(m, nn.Conv2d) for m in net.modules())
    model = PixelModel(net, mean, std).to(device)
    return (model.to(memory_format=torch.channels_last) if channels_last else model), channels_last
