"""Typed training configuration: dataclass defaults < YAML recipe < command-line flags.

Each section is a dataclass whose fields carry a one-line docstring; the command line is generated
from these fields (``--lr``, ``--epochs`` ...), so a field name is unique across sections. Each training
method (``train.task``) has its own section of settings, ``task``, holding only the chosen method's fields
(``TASK_CONFIGS``). The resolved configuration is saved in ``run.json``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pupil.errors import PupilError


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    """Registered dataset name, an image folder, or a CSV manifest."""
    data_dir: str | None = None
    """Folder holding the dataset's files (Fashion-MNIST: the four IDX files)."""
    val_size: float = 5000
    """Images held out of the training split for validation (a count, or a fraction below 1; 0 for none)."""
    img_size: int | None = None
    """Resize the user's images to this size (default: their most common size)."""
    batch_size: int = 256
    """Training batch size."""
    eval_batch_size: int = 1024
    """Batch size for evaluation."""
    crop_pad: int = 2
    """Random-crop padding in pixels (0 turns it off)."""
    flip: bool = True
    """Random horizontal flips."""
    rotate: float = 0.0
    """Maximum random rotation in degrees."""
    color_jitter: float = 0.0
    """Colour jitter strength (colour images only)."""
    erase_prob: float = 0.0
    """Random-erasing probability per image."""
    mixup: float = 0.0
    """Mixup alpha (timm's Mixup; 0 turns it off)."""
    cutmix: float = 0.0
    """CutMix alpha (timm's Mixup; 0 turns it off)."""
    on_bad_image: str = "fail"
    """fail: refuse the data and list every unreadable image; skip: leave them out and list them in the run."""
    min_per_class: int = 2
    """Refuse image folders and manifests with a class of fewer images than this (a typo'd label, say)."""
    max_memory: str | None = None
    """Decoded size a split may take in memory (``4GB``); a larger folder or manifest streams from its files
    (default: a quarter of this machine's memory)."""

    def __post_init__(self):
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise PupilError("batch sizes must be positive")
        if self.val_size < 0:
            raise PupilError("val_size must be >= 0")
        if self.on_bad_image not in ("fail", "skip"):
            raise PupilError(f"on_bad_image must be fail or skip, not {self.on_bad_image!r}")
        if self.min_per_class < 1:
            raise PupilError("min_per_class must be at least 1")


@dataclass
class ModelConfig:
    model: str = "resnet20"
    """Registered model name (`pupil models` lists them) or timm:<name>."""
    model_args: dict = field(default_factory=dict)
    """Overrides of the named size, e.g. {widths: [32, 64, 128]}."""
    drop_rate: float = 0.0
    """Dropout before the classifier."""
    drop_path_rate: float = 0.0
    """Stochastic-depth rate of the last block (models with residual blocks)."""
    pretrained: bool = False
    """Start from ImageNet weights: timm:efficientnet_lite0 (shipped, offline) or timm:<name> (hub)."""

    def __post_init__(self):
        reserved = {"num_classes": "the dataset", "in_chans": "the dataset", "img_size": "--img-size"}
        reserved |= {"drop_rate": "--drop-rate", "drop_path_rate": "--drop-path-rate"}
        if clash := [k for k in self.model_args if k in reserved]:
            k = clash[0]
            raise PupilError(f"model_args may not set {k}: it comes from {reserved[k]}")
        if self.pretrained and self.model_args:
            raise PupilError("model_args cannot change a pretrained architecture; drop --model-args or --pretrained")


@dataclass
class OptimConfig:
    opt: str = "sgd"
    """Optimizer: sgd (Nesterov momentum) or adamw."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (AdamW: beta1)."""
    weight_decay: float = 5e-4
    """Weight decay; never applied to norms and biases."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this (0 turns it off)."""
    ema_decay: float = 0.0
    """Decay of the model EMA (0 turns it off); when on, the EMA weights are evaluated and saved."""
    sched: str = "onecycle"
    """Learning-rate schedule: onecycle, cosine or constant."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs (fractions allowed)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""

    def __post_init__(self):
        if self.opt not in ("sgd", "adamw"):
            raise PupilError(f"unknown optimizer {self.opt!r}; choose sgd or adamw")
        if self.sched not in ("onecycle", "cosine", "constant"):
            raise PupilError(f"unknown schedule {self.sched!r}; choose onecycle, cosine or constant")
        if self.lr <= 0:
            raise PupilError("lr must be positive")


@dataclass
class TrainConfig:
    name: str = ""
    """Run name (default: the recipe's file name); the run directory is <out>/<name>."""
    out: str = "runs"
    """Folder that holds run directories."""
    epochs: float = 10
    """Training length in epochs (fractions allowed)."""
    seed: int = 0
    """Seed for weights, split, order and augmentation."""
    task: str = "classification"
    """Training task (method): classification, distill, adversarial, noise or metric."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    precision: str = "auto"
    """auto (bf16 where the hardware runs it fast), bf16 or fp32."""
    channels_last: bool = True
    """Channels-last memory format for convolutional models."""
    threads: int = 0
    """CPU threads for PyTorch (0: one per core)."""
    tta: bool = True
    """Evaluate (and deploy) with horizontal-flip test-time augmentation."""
    max_minutes: float = 0.0
    """Wall-clock training budget in minutes (0: none); the schedule is fitted to it from the first steps' speed."""
    precise_bn: int = 0
    """Batches of training images over which batch-norm statistics are recomputed after the last step (0: off)."""
    track_energy: bool = True
    """Estimate training energy and CO2-eq with codecarbon (recorded in run.json)."""
    energy_country: str = "USA"
    """ISO 3166 alpha-3 code of the grid used to convert energy to CO2-eq."""

    def __post_init__(self):
        check_run_name(self.name)
        if self.epochs <= 0:
            raise PupilError("epochs must be positive")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise PupilError(f"unknown precision {self.precision!r}; choose auto, bf16 or fp32")
        if self.precise_bn < 0:
            raise PupilError("precise_bn must be a non-negative number of batches")
        if self.precise_bn and self.task in ("noise", "adversarial"):
            raise PupilError(
                f"precise_bn recomputes batch-norm statistics on clean images; the {self.task} task trained them "
                "on perturbed ones, so the two do not combine"
            )


# The settings of each training method (a Task in pupil.training.tasks names its class as ``Config``). They
# live here, not next to the tasks, because config sits below training in the import layers. Only the chosen
# method's section is built and saved; classification has none.


@dataclass
class DistillConfig:
    teacher: str | None = None
    """Distillation: the teacher's run directory."""
    distill_kind: str = "soft"
    """Distillation: soft (KL at temperature distill_tau) or hard (teacher's argmax)."""
    distill_alpha: float = 0.5
    """Distillation: weight of the teacher's loss against the label loss."""
    distill_tau: float = 3.0
    """Distillation: softmax temperature for soft distillation."""


@dataclass
class AdversarialConfig:
    adv_attack: str = "pgd"
    """Adversarial training: pgd (Madry et al. 2018) or fgsm (with random start, Wong et al. 2020)."""
    epsilon: float = 0.1
    """Adversarial training: L-inf radius in pixels ([0, 1] scale)."""
    adv_steps: int = 7
    """Adversarial training: PGD steps (fgsm takes one)."""
    adv_alpha: float = 0.0
    """Adversarial training: step size (0: 2.5 epsilon / steps for pgd, 1.25 epsilon for fgsm)."""

    def __post_init__(self):
        if self.adv_attack not in ("pgd", "fgsm"):
            raise PupilError(f"unknown adversarial attack {self.adv_attack!r}; choose pgd or fgsm")
        if self.epsilon < 0 or self.adv_alpha < 0 or self.adv_steps < 1:
            raise PupilError("epsilon, sigma and adv_alpha must be non-negative and adv_steps at least 1")


@dataclass
class NoiseConfig:
    sigma: float = 0.25
    """Noise training: standard deviation of the Gaussian noise added to pixels (Cohen et al. 2019)."""

    def __post_init__(self):
        if self.sigma < 0:
            raise PupilError("epsilon, sigma and adv_alpha must be non-negative and adv_steps at least 1")


# The losses of the metric task: (the loss's margin, its scale) at pytorch-metric-learning's defaults (ArcFace's
# margin in degrees: 28.6 is the paper's 0.5 rad), or None for the pair loss, which takes ms_* settings instead.
METRIC_LOSSES = {"arcface": (28.6, 64.0), "proxyanchor": (0.1, 32.0), "multisimilarity": None}
PAIR_FIELDS = ("ms_alpha", "ms_beta", "ms_base", "miner", "miner_epsilon")
EMBED_DIMS = (64, 128)  # the embedding sizes the metric task trains: small enough for fast search (issue 18)
DEFAULT_EMBED_DIM = 128


@dataclass
class MetricConfig:
    metric_loss: str = "arcface"
    """Metric learning: arcface (Deng et al. 2019), proxyanchor (Kim et al. 2020) or multisimilarity (pairs
    picked by MultiSimilarityMiner, Wang et al. 2019); the embedding's size is model_args embed_dim (default 128)."""
    metric_margin: float | None = None
    """Metric learning: the proxy loss's margin (arcface: degrees, default 28.6; proxyanchor: delta, default 0.1)."""
    metric_scale: float | None = None
    """Metric learning: the proxy loss's scale (arcface: s, default 64; proxyanchor: alpha, default 32)."""
    ms_alpha: float = 2.0
    """Metric learning, multisimilarity: weight of the positive pairs' similarities."""
    ms_beta: float = 50.0
    """Metric learning, multisimilarity: weight of the negative pairs' similarities."""
    ms_base: float = 0.5
    """Metric learning, multisimilarity: the similarity threshold (lambda) pairs are pushed past."""
    miner: bool = True
    """Metric learning, multisimilarity: train on the pairs MultiSimilarityMiner picks (else on all pairs)."""
    miner_epsilon: float = 0.1
    """Metric learning, multisimilarity: the miner's margin epsilon for keeping a pair."""

    def __post_init__(self):
        if self.metric_loss not in METRIC_LOSSES:
            raise PupilError(f"unknown metric loss {self.metric_loss!r}; choose {', '.join(METRIC_LOSSES)}")
        # A setting of the other kind of loss would be ignored in silence: refuse it instead.
        proxy_given = [k for k in ("metric_margin", "metric_scale") if getattr(self, k) is not None]
        pair_given = [
            f.name for f in dataclasses.fields(self) if f.name in PAIR_FIELDS and getattr(self, f.name) != f.default
        ]
        if METRIC_LOSSES[self.metric_loss] is None and proxy_given:
            raise PupilError(f"{proxy_given[0]} is a setting of the proxy losses; multisimilarity takes ms_base")
        if METRIC_LOSSES[self.metric_loss] is not None and pair_given:
            raise PupilError(f"{pair_given[0]} is a setting of the multisimilarity loss, not of {self.metric_loss}")
        top = 90 if self.metric_loss == "arcface" else 1  # ArcFace's margin is an angle in degrees
        if self.metric_margin is not None and not 0 <= self.metric_margin < top:
            raise PupilError(f"metric_margin of {self.metric_loss} must be >= 0 and below {top}")
        if (self.metric_scale is not None and self.metric_scale <= 0) or self.ms_alpha <= 0 or self.ms_beta <= 0:
            raise PupilError("metric_scale, ms_alpha and ms_beta must be positive")
        if not -1 < self.ms_base < 1 or self.miner_epsilon < 0:
            raise PupilError("ms_base must lie between -1 and 1 (a cosine similarity) and miner_epsilon be >= 0")

    def margin_and_scale(self) -> tuple[float, float]:
        """The proxy loss's (margin, scale): the ones given, else the loss's defaults."""
        margin, scale = METRIC_LOSSES[self.metric_loss]
        return (
            margin if self.metric_margin is None else self.metric_margin,
            scale if self.metric_scale is None else self.metric_scale,
        )


TaskConfig = DistillConfig | AdversarialConfig | NoiseConfig | MetricConfig
TASK_CONFIGS: dict[str, type[TaskConfig]] = {
    "distill": DistillConfig,
    "adversarial": AdversarialConfig,
    "noise": NoiseConfig,
    "metric": MetricConfig,
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig | None = None
    """The settings of the method ``train.task`` names (its defaults when not given; None for classification)."""

    def __post_init__(self):
        cls = TASK_CONFIGS.get(self.train.task)
        if self.task is None and cls is not None:
            self.task = cls()
        if type(self.task) is not (cls or type(None)):
            takes = cls.__name__ if cls else "no settings"
            raise PupilError(f"task {self.train.task!r} takes {takes}, not {self.task!r}")
        dim = self.model.model_args.get("embed_dim")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise PupilError(f"model_args embed_dim must be a positive integer, not {dim!r}")
        if self.train.task == "metric":
            self.check_metric()

    def check_metric(self) -> None:
        """The metric task trains an embedding network: refuse what cannot make one, and give the model its
        ``embed_dim`` (run.json then records it with the model's other arguments, so the run loads by name)."""
        if self.model.pretrained:
            raise PupilError("--task metric builds an embedding head on a model; it cannot start from --pretrained")
        if self.data.mixup or self.data.cutmix:
            raise PupilError("--task metric needs one label per image; turn mixup and cutmix off")
        dim = self.model.model_args.setdefault("embed_dim", DEFAULT_EMBED_DIM)
        low, high = EMBED_DIMS
        if not low <= dim <= high:
            raise PupilError(
                f"--task metric trains embeddings of {low} to {high} dimensions; model_args embed_dim is {dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def flat_fields() -> dict[str, tuple[str, dataclasses.Field, str]]:
    """Map each flag name to (section, field, help); a method's fields have the method's name as section.

    Field names are unique across sections. The methods' fields follow ``task`` in the train section, where
    they stood when that section held them, so ``pupil train --help`` lists them next to ``--task``.
    """
    out = {}

    def add(section: str, cls: type) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in out:
                raise RuntimeError(f"config field {f.name!r} appears in two sections")
            f.type = hints[f.name]
            out[f.name] = (section, f, field_docs(cls).get(f.name, ""))
            if (section, f.name) == ("train", "task"):
                for method, task_cls in TASK_CONFIGS.items():
                    add(method, task_cls)

    for section, cls in SECTION_TYPES.items():
        add(section, cls)
    return out


@cache
def task_fields() -> dict[str, str]:
    """Map each method setting's field name to the method that owns it (``sigma`` -> ``noise``)."""
    return {f.name: method for method, cls in TASK_CONFIGS.items() for f in dataclasses.fields(cls)}


def task_section(task: str, values: dict[str, Any]) -> TaskConfig | None:
    """The config of method ``task`` from flat method fields (``{"sigma": 0.5}``).

    Every given field is checked by its own method's class first, so a bad value reads the same whichever
    method is chosen. A field of another method is refused unless it holds that method's default: run.json
    files from before the methods had their own sections record every method's fields at their defaults.
    """
    owner = task_fields()
    if unknown := set(values) - set(owner):
        raise PupilError(f"unknown field(s) in section task: {', '.join(sorted(unknown))}")
    chosen = None
    for method, cls in TASK_CONFIGS.items():
        given = {k: _coerce(cls, k, v) for k, v in values.items() if owner[k] == method}
        section = cls(**given)
        if method == task:
            chosen = section
        elif changed := [k for k in given if getattr(section, k) != getattr(cls(), k)]:
            flag = "--" + changed[0].replace("_", "-")
            raise PupilError(f"{flag} is a setting of the {method} task, not of {task}")
    return chosen


def build(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML recipe, then ``overrides`` (flat field names, as on the command line)."""
    raw: dict[str, dict[str, Any]] = {s: {} for s in (*SECTION_TYPES, "task")}
    if recipe is not None:
        recipe = Path(recipe)
        if not recipe.exists():
            raise PupilError(f"recipe {recipe} does not exist")
        try:
            loaded = yaml.safe_load(recipe.read_text()) or {}
        except yaml.YAMLError as e:
            raise PupilError(f"recipe {recipe} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise PupilError(f"recipe {recipe} must be a mapping of sections ({', '.join(raw)})")
        for section, values in loaded.items():
            if section not in raw:
                raise PupilError(f"recipe {recipe}: unknown section {section!r} (expected {', '.join(raw)})")
            raw[section].update(values or {})
        # Recipes written before the methods had their own section set their fields in train:; both read the same.
        owner = task_fields()
        raw["task"] = {k: raw["train"].pop(k) for k in list(raw["train"]) if k in owner} | raw["task"]
        raw["train"].setdefault("name", recipe.stem)
    fields = flat_fields()
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise PupilError(f"unknown config field {key!r}")
        raw["task" if fields[key][0] in TASK_CONFIGS else fields[key][0]][key] = value
    parts = {}
    for section, cls in SECTION_TYPES.items():
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(raw[section]) - names:
            raise PupilError(f"unknown field(s) in section {section}: {', '.join(sorted(unknown))}")
        parts[section] = cls(**{k: _coerce(cls, k, v) for k, v in raw[section].items()})
    cfg = Config(**parts, task=task_section(parts["train"].task, raw["task"]))
    if not cfg.train.name:
        cfg.train.name = cfg.model.model.replace(":", "_")
    return cfg


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved in run.json: the method's fields under ``task``, or (older runs) in ``train``."""
    owner = task_fields()
    train = {k: v for k, v in d.get("train", {}).items() if k not in owner}
    values = {k: v for k, v in d.get("train", {}).items() if k in owner} | (d.get("task") or {})
    parts = {s: cls(**(train if s == "train" else d.get(s, {}))) for s, cls in SECTION_TYPES.items()}
    return Config(**parts, task=task_section(parts["train"].task, values))


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Check a recipe or flag value against the field's type with the rules check settings use (``typed_value``):
    an int is taken for a float, floats must be finite, bools are not ints, ``X | None`` allows None."""
    tp = typing.get_type_hints(cls)[name]
    args = typing.get_args(tp)
    optional = type(None) in args
    inner = next(t for t in args if t is not type(None)) if optional else tp
    if value is None and optional:
        return None
    if (typing.get_origin(inner) or inner) is dict:
        if isinstance(value, dict):
            return value
        raise PupilError(f"config field {name} must be a mapping, not {shown(value)}")
    typed = typed_value(value, inner)
    if typed is BAD:
        raise PupilError(
            f"config field {name} must be {type_noun(inner)}{' or null' if optional else ''}, not {shown(value)}"
        )
    return typed


# ---------------------------------------------------------------------------------------------------------------
# Typed values: one set of rules for training flags, recipes and audit check settings (``--set``).


BAD = object()  # what _typed returns for a value of the wrong type
NOUNS = {  # type -> (noun, plural) in messages
    int: ("an integer", "integers"),
    float: ("a finite number", "finite numbers"),
    str: ("a string", "strings"),
    bool: ("true or false", "true/false values"),
}


def type_noun(tp: Any, plural: bool = False) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return f"a list of {type_noun(typing.get_args(tp)[0], plural=True)}"
    return NOUNS[tp][plural]


def list_items(value: Any, item: Any) -> list | None:
    """A list field's items before conversion: a comma string split (items stripped, empty ones dropped, integers
    read from their text), a lone number as one item, a list or tuple as is; None for anything else."""
    if isinstance(value, str):
        return [_from_text(s.strip(), item) for s in value.split(",") if s.strip()]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    return list(value) if isinstance(value, list | tuple) else None


def _from_text(text: str, item: Any) -> Any:
    if item is int:
        try:
            return int(text)
        except ValueError:
            return text  # refused by _typed, and named by _bad_item
    return text


def bad_item(value: Any, tp: Any) -> str:
    """`` (item 'a' is not a finite number)`` for a list field whose value has an item of the wrong type, else ""."""
    if typing.get_origin(tp) not in (list, tuple) or (given := list_items(value, typing.get_args(tp)[0])) is None:
        return ""
    item = typing.get_args(tp)[0]
    bad = next(v for v in given if typed_value(v, item) is BAD)
    return f" (item {shown(bad)} is not {type_noun(item)})"


def shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def typed_value(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (list[X], tuple[X, ...] or a scalar type of NOUNS), or BAD."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if (given := list_items(value, typing.get_args(tp)[0])) is None:
            return BAD
        items = [typed_value(v, typing.get_args(tp)[0]) for v in given]
        return BAD if any(v is BAD for v in items) else origin(items)
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if tp is bool:
        return value if isinstance(value, bool) else BAD
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else BAD
    if tp is float:
        try:
            number = float(value) if is_number or isinstance(value, str) else math.nan
        except (ValueError, OverflowError):
            return BAD
        return number if math.isfinite(number) else BAD
    if tp is str:
        return str(value) if is_number else value if isinstance(value, str) else BAD
    raise TypeError(f"settings cannot be of type {tp}")


def check_run_name(name: str) -> None:
    """A run name is one plain folder name: no separators, no ``..``, nothing absolute, nothing hidden.

    It is joined to ``--out``, and ``--overwrite`` clears the result, so ``--name ..`` or ``--name /home``
    must never reach the file system.
    """
    if not name:
        return
    bad = (
        "/" in name
        or "\\" in name
        or name in (".", "..")
        or name.startswith((".", "~", "-"))
        or any(ord(ch) < 32 for ch in name)
        or Path(name).is_absolute()
    )
    if bad:
        raise PupilError(
            f"run name {name!r} must be a plain folder name (no '/', no '..', not hidden or absolute); "
            "put the parent folder in --out"
        )
