"""``prune:RATIO``: structured channel pruning of a trained run, then a short fine-tune under a wall-clock budget.

Channels are removed whole, so the pruned network is a smaller dense network that runs faster everywhere, not a
sparse one that needs special kernels. torch-pruning's dependency graph (Fang et al., "DepGraph: Towards Any
Structural Pruning", CVPR 2023) finds every tensor that must lose the same channels (a residual sum, a
depthwise convolution, the batch norm after a convolution); the channels a group keeps are those with the largest
L2 weight magnitude (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017), ranked within each layer, so
every layer loses the same share of its channels.

RATIO is a share of FLOPs, not of channels: the channel share rises step by step until the measured FLOPs (pupil's
own counter, ``torch.utils.flop_counter``, the efficiency check's) fall to ``1 - RATIO`` of the original. Channel
counts stay multiples of 8 where that lands within ``TOLERANCE`` of the target (vector units and oneDNN's blocked
layouts work in 8 or 16 channels), else multiples of 4, 2 or 1.

Not every architecture prunes cleanly: layers whose shapes are fixed in code (an attention's ``head_dim``, a
channel shuffle, a grouped convolution's group count) break when their channels go. Each group is first pruned
alone on a copy and the copy run; groups whose pruning fails stay whole and are listed, and a network with no
group left to prune is refused in one line naming the layer.

Right after pruning, the batch norms' statistics are recomputed on a few training batches (the removed channels
changed every later layer's inputs). The fine-tune then distils the unpruned model into the pruned one (KL at
temperature ``TAU`` plus the run's label-smoothed cross-entropy, Hinton et al. 2015) with SGD and a cosine learning
rate fitted to the wall-clock budget, and keeps the epoch with the best validation top-1 (the weights it started
from included). The test split is never looked at.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pupil.data import BatchAugment, ImageDataset
from pupil.data.transforms import AugmentConfig
from pupil.errors import PupilError
from pupil.models import PixelModel
from pupil.models.stats import count_flops, count_params
from pupil.predict import evaluate
from pupil.run import Run
from pupil.runtime import autocast, resolve_device, resolve_precision, to_input

TOLERANCE = 0.05
"""How far above the asked FLOPs share the removed share may land before a finer channel rounding is tried."""
ROUNDINGS = (8, 4, 2, 1)
"""Channel multiples tried in turn (1: no rounding)."""
STEPS = 60
"""Pruning steps from no pruning to the largest channel share; each removes a little more and is measured."""
MAX_CHANNEL_SHARE = 0.9
"""No layer loses more than this share of its channels."""
BN_BATCHES = 20
"""Batches of 256 training images over which batch-norm statistics are recomputed right after pruning."""
TAU, ALPHA = 4.0, 0.7
"""Distillation temperature, and the weight of the teacher's term against the label term, in the fine-tune."""
FLOP_COUNTER = "torch.utils.flop_counter (pupil.models.stats.count_flops): one multiply-add is 2 FLOPs, per image"


def prune_run(
    run: Run,
    ratio: float,
    *,
    max_minutes: float = 5.0,
    device: str | torch.device = "auto",
    progress: bool = True,
    seed: int = 0,
    precision: str = "auto",
    distill: bool = True,
    lr: float | None = None,
) -> tuple[PixelModel, dict[str, Any]]:
    """Prune ``ratio`` of the FLOPs of a loaded run's network, fine-tune it for ``max_minutes``, return it and a record.

    The model returned takes [0, 1] pixels and returns logits, with the run's normalisation and flip TTA. The
    record holds FLOPs and parameters before and after, the achieved ratio, the pruned layers' channel counts,
    validation top-1 before pruning, right after it, after the batch-norm recalibration and after the fine-tune,
    the minutes and epochs spent, torch-pruning's version, and ``model_kwargs`` (``rebuild_kwargs``).
    ``distill``: fine-tune against the unpruned model's soft labels as well as the labels (default) or the labels
    alone. ``lr``: the fine-tune's peak learning rate (default a tenth of the run's).

    Raises PupilError for a ratio outside (0, 1), a missing torch-pruning, a network torch-pruning cannot prune
    (naming the layer), a run without a validation split, or a budget that is not positive.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
        raise PupilError(f"the prune ratio is the share of FLOPs to remove and must lie in (0, 1), not {ratio!r}")
    if isinstance(max_minutes, bool) or not isinstance(max_minutes, int | float) or not max_minutes > 0:
        raise PupilError(f"the fine-tune budget must be a positive number of minutes, not {max_minutes!r}")
    require_torch_pruning()
    if not isinstance(run.model, PixelModel):
        raise PupilError(f"run {run.dir} has no PyTorch model loaded (pupil.load_run(dir) loads it); nothing to prune")
    if not run.info.get("data", {}).get("val_size", 1):
        raise PupilError(
            f"run {run.dir} has no validation split, on which the fine-tune picks its best epoch; "
            "train it with --val-size (a count or a fraction) and prune that run"
        )
    t0 = time.perf_counter()
    dev = resolve_device(str(device))
    dtype = resolve_precision(precision, dev)
    train, val = run.split("train"), run.split("val")
    base = copy.deepcopy(run.model).to(dev).eval()  # the caller's model stays where it is
    mean, std = base.mean.flatten().tolist(), base.std.flatten().tolist()
    info_model = run.info.get("model", {})
    name = info_model.get("name", type(base.net).__name__)
    before = evaluate_top1(base, val, dev, dtype)
    net, record = prune_net(base.net, ratio, tuple(train.shape), name=name)
    model = PixelModel(net, mean, std, tta=base.tta).to(dev)
    pruned = evaluate_top1(model, val, dev, dtype)
    bn_images = recalibrate_bn(model, train, batches=BN_BATCHES, batch_size=256, device=dev, dtype=dtype, seed=seed)
    cfg = run.info.get("config", {})
    optim, data = cfg.get("optim", {}), cfg.get("data", {})
    tune = fine_tune(
        model,
        train,
        val,
        teacher=PixelModel(base.net, mean, std).to(dev).eval() if distill else None,  # no TTA: half the cost
        minutes=max_minutes,
        device=dev,
        dtype=dtype,
        lr=lr if lr is not None else 0.1 * optim.get("lr", 0.1),
        weight_decay=optim.get("weight_decay", 5e-4),
        label_smoothing=optim.get("label_smoothing", 0.0),
        batch_size=data.get("batch_size", 256),
        augment=augment_of(data),
        seed=seed,
        progress=progress,
    )
    model = model.to(memory_format=torch.contiguous_format).eval()
    record.update(
        val_top1={
            "before": before,
            "pruned": pruned,
            "bn_recalibrated": tune.pop("start_val_top1"),
            "fine_tuned": tune.pop("best_val_top1"),
        },
        bn_recalibration_images=bn_images,
        fine_tune=tune,
        minutes=(time.perf_counter() - t0) / 60,
        tta=base.tta,
        precision=str(dtype or "fp32"),
        model_kwargs=rebuild_kwargs(info_model, net),
    )
    return model, record


def require_torch_pruning() -> None:
    """One line naming the package and the pip command when torch-pruning is missing."""
    from pupil.extras import require

    require(["torch_pruning"], "pruning")


def torch_pruning_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")  # the module's __version__ lagged the release (1.6.0 in 1.6.1)
    except PackageNotFoundError:
        import torch_pruning

        return torch_pruning.__version__


# ---------------------------------------------------------------------------------------------------------------
# Pruning


def prune_net(
    net: nn.Module, ratio: float, shape: tuple[int, ...], *, name: str = "the model"
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``net`` with channels removed until ``ratio`` of its FLOPs for one ``shape`` (C, H, W) image are gone.

    Returns the pruned copy (``net`` is left as it is) and the record of what changed: FLOPs and parameters before
    and after, the achieved ratio, the channel multiple used, the new channel counts of the pruned layers, and the
    layers left whole with the error their pruning gave.
    """
    require_torch_pruning()
    net = copy.deepcopy(net).float().cpu().eval()
    x = torch.rand(1, *shape)
    num_classes = _logits(net, x, name).shape[1]
    flops0, params0 = _flops(net, shape, name), count_params(net)
    groups, whole = probe_groups(net, x, num_classes)
    if not groups:
        first = next(iter(whole.items()), None)
        why = f": pruning layer {first[0]} fails ({first[1]})" if first else ": it has no convolution or linear layer"
        raise PupilError(f"torch-pruning cannot prune {name} cleanly{why}")
    best: tuple[float, int, nn.Module] | None = None
    most = 0.0
    for multiple in ROUNDINGS:
        trial = copy.deepcopy(net)
        flops = _prune_to(trial, x, (1 - ratio) * flops0, groups, multiple, name, shape)
        removed = 1 - flops / flops0
        most = max(most, removed)
        if removed >= ratio - 1e-9 and (best is None or removed < best[0]):
            best = (removed, multiple, trial)
        if best is not None and best[0] <= ratio + TOLERANCE:
            break
    if best is None:
        raise PupilError(
            f"pruning can remove at most {most:.0%} of the FLOPs of {name}, not {ratio:.0%} (every layer keeps "
            f"{1 - MAX_CHANNEL_SHARE:.0%} of its channels; {len(whole)} layer group(s) cannot be pruned at all)"
        )
    _, multiple, pruned = best
    if isinstance(head := getattr(pruned, "head", None), nn.Linear) and hasattr(pruned, "num_features"):
        pruned.num_features = head.in_features  # the contract's feature width follows the classifier's input
    widths0, widths1, flops1 = _widths(net), _widths(pruned), _flops(pruned, shape, name)
    return pruned, {
        "method": "prune",
        "ratio": ratio,
        "achieved_ratio": 1 - flops1 / flops0,
        "flops_before": flops0,
        "flops_after": flops1,
        "flop_counter": FLOP_COUNTER,
        "params_before": params0,
        "params_after": count_params(pruned),
        "channel_multiple": multiple,
        "channels": {k: {"before": widths0[k], "after": w} for k, w in widths1.items() if widths0.get(k) != w},
        "left_whole": whole,
        "importance": "L2 norm of each channel's weights over its dependency group, ranked within each layer",
        "torch_pruning": torch_pruning_version(),
    }


def probe_groups(net: nn.Module, x: torch.Tensor, num_classes: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The prunable groups, as {root layer: every layer whose output channels the group removes}, and the roots of
    the groups whose pruning breaks the network, each with its error. Each group is pruned by half on a copy of its
    own, which must then still map a batch to ``num_classes`` logits. The classifier is never a group."""
    import torch_pruning as tp

    names = {m: n for n, m in net.named_modules()}
    with _quiet():
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=x)
        members = {}
        for group in graph.get_all_groups(ignored_layers=_classifier_layers(net)):
            out = [d.target.module for d, _ in group if graph.is_out_channel_pruning_fn(d.handler)]
            members[names[group[0].dep.target.module]] = [names[m] for m in out if m in names]
    ok, whole, widths = {}, {}, _widths(net)
    for root, layers in members.items():
        trial = copy.deepcopy(net)
        others = [trial.get_submodule(n) for r, ls in members.items() if r != root for n in ls]
        try:
            with _quiet():
                _pruner(trial, x, 0.5, 1, others + _classifier_layers(trial), None).step()
            y = trial(torch.cat([x, x]))
            if y.shape != (2, num_classes):
                raise RuntimeError(f"the logits became {tuple(y.shape)}")
            if _widths(trial) == widths:  # the group is tied to a layer that must stay whole
                raise RuntimeError("torch-pruning removes no channel from it on its own")
        except Exception as e:  # torch-pruning and the forward pass raise many kinds; each is reported, none hidden
            whole[root] = _one_line(e)
            continue
        ok[root] = layers
    return ok, whole


def _prune_to(
    net: nn.Module,
    x: torch.Tensor,
    target: float,
    groups: dict[str, list[str]],
    multiple: int,
    name: str,
    shape: tuple[int, ...],
) -> float:
    """Prune ``net`` in place, step by step with channel counts in multiples of ``multiple``, until its FLOPs are at
    most ``target``; returns its FLOPs (above ``target`` when even the largest channel share does not get there)."""
    modules = dict(net.named_modules())
    prunable = {n for layers in groups.values() for n in layers}
    # Every layer of a group left whole is ignored: ignoring its root alone would let another member root it.
    ignored = [m for n, m in modules.items() if n not in prunable and isinstance(m, nn.Conv2d | nn.Linear)]
    ignored += _classifier_layers(net)
    # With rounding a layer of C channels keeps floor(C * (1 - share) / m) * m of them: keep at least one multiple.
    smallest = min(_out_channels(modules[r]) for r in groups)
    share = min(MAX_CHANNEL_SHARE, 1 - multiple / smallest) if multiple > 1 else MAX_CHANNEL_SHARE
    flops = _flops(net, shape, name)
    if share <= 0 or any(_out_channels(modules[r]) % multiple for r in groups):
        return flops  # this multiple does not fit the network's widths
    with _quiet():
        pruner = _pruner(net, x, share, STEPS, ignored, multiple if multiple > 1 else None)
    names = {m: n for n, m in modules.items()}
    for _ in range(STEPS):
        if flops <= target:
            break
        layers: list[str] = []
        try:
            with _quiet():
                for group in pruner.step(interactive=True):
                    layers.append(names.get(group[0].dep.target.module, "?"))
                    group.prune()
                if layers:
                    net(x)
        except Exception as e:  # as in probe_groups; each group passed alone there, so name this step's
            shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
            raise PupilError(f"torch-pruning failed on {name} while pruning layer(s) {shown}: {_one_line(e)}") from None
        if layers:
            flops = _flops(net, shape, name)
    return flops


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def rebuild_kwargs(info_model: dict[str, Any], net: nn.Module) -> dict[str, Any] | None:
    """Keyword arguments with which ``pupil.models.create`` builds the pruned architecture, so that a run directory's
    ``run.json`` can describe it and ``model.safetensors`` hold its weights; ``info_model`` is run.json's ``model``.

    Only families whose width arguments name every width say it: VGG (``stages``) and LeNet-5 (``widths``).
    Residual families prune widths inside blocks that no argument names (None: the pruned network must travel
    as an exported graph). The answer is checked by building the model and loading the pruned weights into it.
    """
    from pupil.models import MODELS, create
    from pupil.models.lenet import LeNet5
    from pupil.models.vgg import VGG

    name, kwargs = info_model.get("name", ""), dict(info_model.get("kwargs", {}))
    if name not in MODELS:
        return None
    convs = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    if isinstance(net, VGG):
        stages = kwargs.get("stages", MODELS.entry(name).meta.get("defaults", {}).get("stages"))
        widths = iter(convs)
        kwargs["stages"] = [[next(widths) for _ in stage] for stage in stages]
    elif isinstance(net, LeNet5):
        kwargs["widths"] = [*convs, net.fc[1].out_features, net.fc[3].out_features]
    else:
        return None
    try:
        dims = {k: info_model[k] for k in ("num_classes", "in_chans", "img_size")}
        create(name, **dims, **kwargs).load_state_dict(net.state_dict())
    except (KeyError, PupilError, RuntimeError, StopIteration, TypeError):
        return None
    return kwargs


def _pruner(net: nn.Module, x: torch.Tensor, share: float, steps: int, ignored: list[nn.Module], multiple: int | None):
    import torch_pruning as tp

    return tp.pruner.MetaPruner(
        net,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=share,
        iterative_steps=steps,
        ignored_layers=ignored,
        round_to=multiple,
    )


def _classifier_layers(net: nn.Module) -> list[nn.Module]:
    """The output layers, whose output channels are the classes: ``head`` (and DeiT's ``head_dist``)."""
    return [m for n in ("head", "head_dist") if isinstance(m := getattr(net, n, None), nn.Module)]


def _widths(net: nn.Module) -> dict[str, int]:
    """Output channels of every convolution and linear layer, by name."""
    out = {}
    for n, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            out[n] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[n] = m.out_features
    return out


def _flops(net: nn.Module, shape: tuple[int, ...], name: str) -> int:
    try:
        return count_flops(net, (1, *shape))
    except (RuntimeError, TypeError) as e:
        raise PupilError(f"cannot count the FLOPs of {name}: {_one_line(e)}") from None


def _logits(net: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            return net.eval()(x)
    except Exception as e:
        raise PupilError(f"{name} does not run on a {tuple(x.shape[1:])} image: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextmanager
def _quiet() -> Iterator[None]:
    """torch-pruning warns about every parameter it cannot map (a class token) and deprecated arguments."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------------------------
# Fine-tune


def augment_of(data_cfg: dict[str, Any]) -> BatchAugment:
    """The run's own batch augmentations (crop, flip, rotation, jitter, erasing), from its saved data config."""
    d = AugmentConfig()
    return BatchAugment(
        AugmentConfig(
            crop_pad=data_cfg.get("crop_pad", d.crop_pad),
            flip=data_cfg.get("flip", d.flip),
            rotate=data_cfg.get("rotate", d.rotate),
            color_jitter=data_cfg.get("color_jitter", d.color_jitter),
            erase_prob=data_cfg.get("erase_prob", d.erase_prob),
        )
    )


def evaluate_top1(model: PixelModel, ds: ImageDataset, device: torch.device, dtype: torch.dtype | None) -> float:
    """Validation top-1 of the model as it is deployed (its TTA flag as it is)."""
    channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return evaluate(model, ds, batch_size=1024, device=device, dtype=dtype, channels_last=channels_last)["top1"]


@torch.no_grad()
def recalibrate_bn(
    model: PixelModel,
    ds: ImageDataset,
    *,
    batches: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    seed: int,
) -> int:
    """Re-estimate every batch norm's running statistics on ``batches`` batches of clean training images.

    Removing channels changes the inputs of the layers after them, so the statistics the unpruned network
    learned are stale, and a pruned network can score near chance in eval mode until they are recomputed
    (Li et al., "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network Pruning", ECCV 2020, "adaptive
    batch normalization"). The cost is a few forward passes; it gives the fine-tune a much better start. Each
    layer's statistics become the plain average over the batches; only the batch norms run in train mode.
    Returns the number of images used (0 without batch norm).
    """
    from pupil.training.precise_bn import batch_norms

    bns = batch_norms(model)
    if not bns:
        return 0
    bs = min(batch_size, len(ds))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: batches * bs]
    channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
    tta, momenta = model.tta, [m.momentum for m in bns]
    model.eval()
    model.tta = False
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    try:
        for chunk in idx.split(bs):
            with autocast(device, dtype):
                model(to_input(ds.images[chunk], device, channels_last))
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.eval()
        model.tta = tta
    return len(idx)


def cosine_lr(elapsed: float, budget: float, peak: float) -> float:
    """The learning rate ``elapsed`` seconds into a ``budget``-second fine-tune: a half cosine from ``peak`` to 0
    over wall-clock time, so that the schedule ends when the budget does, whatever the speed."""
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, elapsed) / budget)))


def fine_tune(
    model: PixelModel,
    train: ImageDataset,
    val: ImageDataset,
    *,
    teacher: nn.Module | None,
    minutes: float,
    device: torch.device,
    dtype: torch.dtype | None,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    batch_size: int,
    augment: BatchAugment,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Train ``model`` in place for ``minutes`` of wall-clock time, validations included, then load the weights with
    the best validation top-1 seen, those it came with included. Training steps run without the model's TTA and
    validations with it, as in ``pupil.training.loop``. Returns what happened, epoch by epoch."""
    from pupil.training.optim import param_groups

    budget, deployed_tta = minutes * 60, model.tta
    channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(train))
    steps_per_epoch = len(train) // bs
    t0 = time.perf_counter()
    start = evaluate_top1(model, val, device, dtype)
    val_s = time.perf_counter() - t0  # a validation's cost, kept free at the end of the budget
    best = (start, 0.0, copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    steps = 0
    with _bar(progress, budget) as bar:
        while time.perf_counter() - t0 < budget - val_s:
            model.tta = False
            taken = _epoch(model, teacher, train, opt, augment, gen, t0, budget - val_s, lr, label_smoothing, bs,
                           device, dtype, channels_last, bar)  # fmt: skip
            model.tta = deployed_tta
            if not taken:
                break
            steps += taken
            tv = time.perf_counter()
            top1 = evaluate_top1(model, val, device, dtype)
            val_s = time.perf_counter() - tv
            epochs = steps / steps_per_epoch
            history.append({"epoch": round(epochs, 3), "val_top1": top1, "seconds": round(time.perf_counter() - t0, 2)})
            if top1 > best[0]:
                best = (top1, epochs, copy.deepcopy(model.state_dict()))
    model.tta = deployed_tta
    model.load_state_dict(best[2])
    return {
        "start_val_top1": start,
        "best_val_top1": best[0],
        "best_epoch": round(best[1], 3),
        "epochs": round(steps / steps_per_epoch, 3),
        "steps": steps,
        "minutes": (time.perf_counter() - t0) / 60,
        "budget_minutes": minutes,
        "loss": f"{1 - ALPHA:g} x cross-entropy + {ALPHA:g} x tau^2 KL to the unpruned model at tau {TAU:g}"
        if teacher is not None
        else f"cross-entropy, label smoothing {label_smoothing:g}",
        "optimizer": f"SGD, Nesterov momentum 0.9, peak lr {lr:g} with a cosine over the budget, "
        f"weight decay {weight_decay:g}",
        "batch_size": bs,
        "history": history,
    }


def _epoch(
    model: PixelModel,
    teacher: nn.Module | None,
    train: ImageDataset,
    opt: torch.optim.Optimizer,
    augment: BatchAugment,
    gen: torch.Generator,
    t0: float,
    stop: float,
    peak: float,
    label_smoothing: float,
    bs: int,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    bar: Callable[[float, dict], None],
) -> int:
    """One pass over ``train`` in a fresh order (batches of ``bs``), stopping early once ``stop`` seconds have passed
    since ``t0``; returns the steps taken."""
    order = torch.randperm(len(train), generator=gen)
    model.train()
    steps, seen, loss_sum, t_epoch = 0, 0, 0.0, time.perf_counter()
    for i in range(len(train) // bs):
        elapsed = time.perf_counter() - t0
        if elapsed >= stop:
            break
        idx = order[i * bs : (i + 1) * bs]
        x = augment(to_input(train.images[idx], device, channels_last), gen)
        y = train.targets[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(elapsed, stop, peak)
        with autocast(device, dtype):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(x).float()
                kl = F.kl_div(
                    F.log_softmax(logits.float() / TAU, 1), F.log_softmax(soft / TAU, 1), reduction="batchmean",
                    log_target=True,
                )  # fmt: skip
                loss = (1 - ALPHA) * loss + ALPHA * TAU**2 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps, seen, loss_sum = steps + 1, seen + len(idx), loss_sum + loss.item() * len(idx)
        if not math.isfinite(loss_sum):
            raise PupilError(f"the fine-tune's loss became {loss_sum} (learning rate {peak:g} too high?)")
        if steps % 5 == 0:
            rate = seen / (time.perf_counter() - t_epoch)
            bar(time.perf_counter() - t0, {"loss": loss_sum / seen, "img/s": rate})
    model.eval()
    return steps


@contextmanager
def _bar(enabled: bool, budget: float) -> Iterator[Callable[[float, dict], None]]:
    """A rich progress bar over the fine-tune's seconds (loss, images/s, ETA), or nothing."""
    if not enabled:
        yield lambda elapsed, stats: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]fine-tune"),
        BarColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task("fine-tune", total=budget, stats="")

        def update(elapsed: float, stats: dict) -> None:
            text = f"loss {stats['loss']:.3f} {stats['img/s']:.0f} img/s"
            bar.update(task, completed=min(elapsed, budget), stats=text)

        yield update
        bar.update(task, completed=budget)
