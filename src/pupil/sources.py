"""Models pupil did not train, opened for the audit: ``timm:``, ``torchvision:``, ``onnx:``, ``torchscript:``,
``export:`` and ``py:`` sources, or an ``nn.Module`` handed to ``pupil.audit``.

Each source becomes a ``Run`` like a trained one: a ``PixelModel`` that takes [0, 1] pixels (the model's
normalisation and input range inside it), its classes, and a ``run.json``-shaped ``info`` whose ``source``
entry records where the model came from and how its input is prepared. The audit then treats it as it treats a
run directory.

Preprocessing is part of the model. It comes from timm's ``pretrained_cfg``, from the torchvision weights'
transforms, or from the user's flags (``Preprocess``); a model that says nothing about its input (a bare ONNX,
TorchScript or ``py:`` model) is refused unless the flags say it, never guessed. The data is then decoded to
the model's input: the shorter side resized, the centre cropped (``pupil.data.images.Fit``), the channels
converted; every conversion is counted in the data's ``conversions``.

Classes come from the model where it knows them (ImageNet names), from ``--classes``, or from the data when the
counts agree. When the data's classes are some of the model's, a class map (``auto``: by WordNet id or name; or
a CSV) picks the model's outputs for them, and the audit runs over those outputs (``Restricted``); the accuracy
check also reports top-1 over all of the model's classes.

Loading never unpickles: state dicts are read with ``weights_only=True`` or from safetensors; TorchScript and
``torch.export`` archives are code pupil runs as the user asked, and ``py:`` imports the user's own module.

``pupil serve`` opens sources too: an audit's folder is re-opened from what its results.json records
(``open_audited``: the same file or published weights, checked against the recorded sha256 before anything runs),
and a source given bare is opened without data (``open_bare``: its input size must be known, its number of
outputs comes from a forward pass on black images).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import math
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pupil.data import ImageDataset
from pupil.data.images import Fit, memory_budget
from pupil.errors import PupilError
from pupil.extras import require
from pupil.io import sha256_file
from pupil.models.contract import PixelModel
from pupil.run import Run

KINDS = ("timm", "torchvision", "onnx", "torchscript", "export", "py")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
RANGES = ("0-1", "0-255")
FLAG_NAMES = "--mean and --std (or --input-range alone for a model that takes raw pixels)"


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


@dataclass
class Preprocess:
    """How a model expects its input; ``None`` where unknown. ``mean``/``std`` are in the units of
    ``input_range``; ``resize`` is the shorter side before the centre crop of ``crop`` pixels."""

    crop: int | None = None
    resize: int | None = None
    interpolation: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    input_range: str | None = None
    channels: int | None = None
    source: str = "flags"

    @classmethod
    def from_flags(cls, flags: dict[str, Any] | None) -> Preprocess:
        """The user's ``--img-size``, ``--resize``, ``--crop``, ``--interpolation``, ``--mean``, ``--std`` and
        ``--input-range`` (Python: the same names with underscores), checked."""
        flags = {k.replace("-", "_"): v for k, v in (flags or {}).items() if v is not None}
        known = {"img_size", "resize", "crop", "interpolation", "mean", "std", "input_range"}
        if unknown := sorted(set(flags) - known):
            raise PupilError(
                f"unknown preprocessing setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        p = cls(source="flags")
        size = flags.get("crop", flags.get("img_size"))
        for name, value in (("img_size", flags.get("img_size")), ("crop", size), ("resize", flags.get("resize"))):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PupilError(f"--{name.replace('_', '-')} must be a positive whole number of pixels, not {value!r}")
        p.crop, p.resize = size, flags.get("resize")
        if "interpolation" in flags:
            if flags["interpolation"] not in INTERPOLATIONS:
                raise PupilError(
                    f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, not {flags['interpolation']!r}"
                )
            p.interpolation = flags["interpolation"]
        if "input_range" in flags:
            if flags["input_range"] not in RANGES:
                raise PupilError(f"--input-range must be 0-1 or 0-255, not {flags['input_range']!r}")
            p.input_range = flags["input_range"]
        for name in ("mean", "std"):
            if name in flags:
                setattr(p, name, _numbers(flags[name], f"--{name}"))
        if (p.mean is None) != (p.std is None):
            raise PupilError("give --mean and --std together")
        if p.std is not None and (len(p.std) != len(p.mean) or any(s <= 0 for s in p.std)):
            raise PupilError("--std needs one positive value per --mean value")
        if p.mean is not None and len(p.mean) == 3:
            p.channels = 3  # one value: the data's own channels, each normalised alike
        return p

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "source"}

    def over(self, base: Preprocess) -> Preprocess:
        """``base`` (what the model's weights say) with every field these flags set replaced."""
        given = self.given()
        if not given:
            return base
        merged = Preprocess(**{**asdict(base), **given})
        if "crop" in given and "resize" not in given:
            merged.resize = None  # a new crop size with the weights' resize would be a different crop ratio
        merged.source = f"{base.source}, overridden by flags ({', '.join(sorted(given))})"
        return merged

    def complete(self, what: str) -> Preprocess:
        """Fill the defaults that are not guesses, or refuse: a model's normalisation is never guessed."""
        if self.mean is None and self.input_range is None:
            raise PupilError(f"{what} does not say how it expects its input: pass {FLAG_NAMES}, and --img-size")
        p = Preprocess(**asdict(self))
        p.input_range = p.input_range or "0-1"
        if p.mean is None:  # --input-range alone: raw pixels in that range, no normalisation
            p.mean, p.std = [0.0] * (p.channels or 1), [1.0] * (p.channels or 1)
        p.interpolation = p.interpolation or "bilinear"
        if p.crop is not None and p.resize is None:
            p.resize = p.crop
        return p

    def fit(self) -> Fit | None:
        if self.crop is None:
            return None
        if self.resize is not None and self.resize < self.crop:
            raise PupilError(f"--resize {self.resize} is smaller than the crop {self.crop}")
        return Fit(self.resize or self.crop, self.crop, self.interpolation or "bilinear")

    def pixel_stats(self, channels: int) -> tuple[list[float], list[float]]:
        """Mean and std for pixels in [0, 1] (PixelModel's), one per channel: a 0-255 model's in its units
        become /255, so that (x - mean/255) / (std/255) = (255 x - mean) / std."""
        scale = 255.0 if self.input_range == "0-255" else 1.0
        mean, std = list(self.mean), list(self.std)
        if len(mean) == 1 and channels > 1:
            mean, std = mean * channels, std * channels
        if len(mean) != channels:
            raise PupilError(f"--mean and --std give {len(mean)} values but the model takes {channels} channels")
        return [m / scale for m in mean], [s / scale for s in std]

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _numbers(value: Any, flag: str) -> list[float]:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list | tuple) else [value]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        raise PupilError(f"{flag} must be numbers separated by commas, not {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise PupilError(f"{flag} must be finite numbers, not {value!r}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Opaque networks: ONNX sessions, and the restriction to mapped classes


class OnnxNet(nn.Module):
    """An onnxruntime session as a module: float32 NCHW in, logits out. No gradients flow through it. ``options``
    (``onnxruntime.SessionOptions``) default to ONNX Runtime's; ``path`` is kept so a server can reopen it."""

    def __init__(self, path: Path, device: torch.device, options: Any = None):
        super().__init__()
        require(["onnxruntime"], f"onnx:{path}", "onnx")
        import onnxruntime as ort

        self.path = Path(path)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types, all user-file errors
            raise PupilError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise PupilError(f"{path} takes {len(inputs)} inputs; pupil audits models with one image input")
        self.input_name, shape = inputs[0].name, inputs[0].shape
        if len(shape) != 4 or not (isinstance(shape[1], int) and shape[1] in (1, 3)):
            last = shape[-1] if shape else None
            layout = "NHWC" if len(shape) == 4 and last in (1, 3) else f"shape {shape}"
            raise PupilError(
                f"{path} takes input {inputs[0].name!r} as {layout}; pupil feeds NCHW images (N, 1 or 3, H, W): "
                "export the model with channels first"
            )
        self.in_chans = shape[1]
        self.batch = shape[0] if isinstance(shape[0], int) else None  # a fixed batch size (often 1) or any
        self.side = shape[2] if isinstance(shape[2], int) and shape[2] == shape[3] else None
        self.param_count = _onnx_params(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        outs = []
        for chunk in x.detach().float().cpu().split(self.batch or len(x)):
            feed = {self.input_name: np.ascontiguousarray(chunk.numpy())}
            outs.append(torch.from_numpy(self.session.run(None, feed)[0]))
        return torch.cat(outs).to(x.device)


def _onnx_params(path: Path) -> int | None:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return int(sum(numpy_helper.to_array(t).size for t in model.graph.initializer))


class Exported(nn.Module):
    """A ``torch.export`` program's module, whose ``train()`` and ``eval()`` raise: it is already in eval mode,
    so the audit's ``model.eval()`` only records the mode here."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> Exported:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class Restricted(nn.Module):
    """The model's outputs for the data's classes only: logits ``net(x)[:, index]``. Keeps the feature contract
    (and the Grad-CAM layer) of a ``net`` that has it; ``full`` gives all of the model's logits."""

    def __init__(self, net: nn.Module, index: list[int]):
        super().__init__()
        self.net = net
        self.register_buffer("index", torch.tensor(index), persistent=False)
        self.num_classes = len(index)
        if hasattr(net, "num_features"):
            self.num_features = net.num_features
        if isinstance(getattr(net, "gradcam_layer", None), str):
            self.gradcam_layer = f"net.{net.gradcam_layer}"
        for attr in ("feature_grid", "num_prefix_tokens"):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))

    def full(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, self.index]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        out = self.net.forward_head(x, pre_logits=pre_logits)
        return out if pre_logits else out[:, self.index]


# ---------------------------------------------------------------------------------------------------------------
# Opening a model


@dataclass
class Opened:
    """A model source, opened: the network (takes normalised input), what its weights say about its input and
    classes, and what it allows (gradients, the feature contract, a Grad-CAM layer)."""

    kind: str
    name: str
    net: nn.Module
    preprocess: Preprocess
    classes: list[str] | None = None
    wnids: list[str] | None = None
    weights_file: Path | None = None
    gradients: bool = True
    features: bool = False
    gradcam: bool = False
    notes: list[str] = field(default_factory=list)
    target: str | None = None
    """What followed ``kind:`` in the spec (a name, a file, ``package.module:factory``); None for a module."""
    pretrained: bool = False
    """Whether the published weights were loaded (``--pretrained``): what re-opening it needs to know."""


def parse_source(spec: str) -> tuple[str, str]:
    """``timm:resnet18`` -> ("timm", "resnet18"); one line for an unknown kind or a missing target."""
    kind, sep, target = spec.partition(":")
    if not sep or kind not in KINDS:
        raise PupilError(
            f"{spec!r} is neither a run directory nor a model source; give a run directory or one of "
            + ", ".join(f"{k}:..." for k in KINDS)
        )
    if not target:
        raise PupilError(f"{spec!r} names no {'model' if kind in ('timm', 'torchvision') else 'file'} after {kind}:")
    return kind, target


def open_source(
    spec: str | nn.Module,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    device: torch.device | None = None,
) -> Opened:
    """Open ``spec`` (a MODEL string or an ``nn.Module``), load ``weights`` or the ``pretrained`` ones."""
    device = device or torch.device("cpu")
    if isinstance(spec, nn.Module):
        net = spec
        if weights is not None:
            _load_state(net, read_state(weights), "the module")
        return _opened_module("module", type(spec).__name__, net, weights)
    kind, target = parse_source(spec)
    if pretrained and weights is not None:
        raise PupilError("give --pretrained or --weights, not both")
    if (pretrained or weights is not None) and kind in ("onnx", "torchscript", "export"):
        raise PupilError(
            f"{kind}: files hold their weights; --weights and --pretrained apply to timm:, torchvision: and py:"
        )
    if pretrained and kind == "py":
        raise PupilError("--pretrained applies to timm: and torchvision: models; give py: models --weights")
    opened = _open_kind(kind, target, weights, pretrained, device)
    opened.target, opened.pretrained = target, pretrained
    return opened


def _open_kind(kind: str, target: str, weights: str | Path | None, pretrained: bool, device: torch.device) -> Opened:
    if kind == "timm":
        return _open_timm(target, weights, pretrained)
    if kind == "torchvision":
        return _open_torchvision(target, weights, pretrained)
    if kind == "py":
        return _open_py(target, weights)
    path = Path(target)
    if not path.is_file():
        raise PupilError(f"{kind}: model file {path} does not exist")
    if kind == "onnx":
        net = OnnxNet(path, device)
        pre = Preprocess(crop=net.side, channels=net.in_chans, source="the ONNX graph's input shape")
        return Opened("onnx", path.stem, net, pre, weights_file=path, gradients=False)
    if kind == "torchscript":
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise PupilError(f"{path} is not a TorchScript archive: {str(e).splitlines()[0][:200]}") from None
        return Opened("torchscript", path.stem, net, Preprocess(source="none (TorchScript)"), weights_file=path)
    try:
        net = Exported(torch.export.load(str(path)).module())
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise PupilError(f"{path} is not a torch.export archive (.pt2): {str(e).splitlines()[0][:200]}") from None
    return Opened("export", path.stem, net, Preprocess(source="none (torch.export)"), weights_file=path)


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt`` read with ``weights_only=True`` (never unpickles
    code); a checkpoint that nests it under ``state_dict`` or ``model`` is unwrapped, DDP's ``module.`` dropped."""
    p = Path(path)
    if not p.is_file():
        raise PupilError(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(p)
        except (SafetensorError, OSError) as e:
            raise PupilError(f"corrupt weights {p}: {e}") from None
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for code, RuntimeError/EOFError for corrupt files
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise PupilError(f"cannot read {p} as a state dict (weights only, no pickled code): {first}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PupilError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _load_state(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = net.state_dict()
    if missing := [k for k in expected if k not in state]:
        raise PupilError(f"the weights lack {len(missing)} tensor(s) that {what} needs, e.g. {missing[0]}")
    if extra := [k for k in state if k not in expected]:
        raise PupilError(f"the weights hold {len(extra)} tensor(s) that {what} does not have, e.g. {extra[0]}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise PupilError(
                f"the weights' {key} has shape {tuple(state[key].shape)} but {what} needs {tuple(value.shape)}"
            )
    net.load_state_dict(state)


def _head_classes(state: dict[str, torch.Tensor], head: str | None) -> int | None:
    """The number of classes a state dict's classifier ``head`` (a module name) has, if it has that layer."""
    w = state.get(f"{head}.weight") if head else None
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def _open_timm(name: str, weights: str | Path | None, pretrained: bool) -> Opened:
    import timm
    from timm.data import resolve_data_config

    from pupil.models.pretrained import PRETRAINED, SHIPPED
    from pupil.models.timm import _last_feature_module

    if not timm.is_model(name):
        raise PupilError(f"timm has no model {name!r} (timm.list_models() lists them)")
    state = read_state(weights) if weights is not None else None
    shipped = None
    if pretrained and f"timm:{name}" in SHIPPED:  # weights that ship with a package: no network needed
        shipped, _, _ = PRETRAINED[SHIPPED[f"timm:{name}"]]()
        net = shipped.net
    else:
        head = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier")
        k = _head_classes(state, head) if state is not None else None
        try:
            net = timm.create_model(name, pretrained=pretrained, **({"num_classes": k} if k else {}))
        except (RuntimeError, OSError) as e:
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise PupilError(
                f"could not load pretrained weights for timm:{name} (no network?): {first}; pass --weights FILE"
            ) from None
        if state is not None:
            _load_state(net, state, f"timm:{name}")
    net.gradcam_layer = _last_feature_module(net)
    if hasattr(net, "patch_embed") and hasattr(net.patch_embed, "grid_size"):
        net.feature_grid = tuple(net.patch_embed.grid_size)
        net.num_prefix_tokens = getattr(net, "num_prefix_tokens", 1)
    cfg = resolve_data_config({}, model=net)
    c, h, _ = cfg["input_size"]
    pre = Preprocess(
        crop=h,
        resize=math.floor(h / cfg["crop_pct"]),
        interpolation=cfg["interpolation"] if cfg["interpolation"] in INTERPOLATIONS else "bicubic",
        mean=list(cfg["mean"]),
        std=list(cfg["std"]),
        input_range="0-1",
        channels=c,
        source="timm pretrained_cfg",
    )
    if shipped is not None:  # these weights were trained with their own normalisation, not timm's default
        pre.mean, pre.std = shipped.mean.flatten().tolist(), shipped.std.flatten().tolist()
        pre.source = f"timm pretrained_cfg, with the mean and std of the shipped weights {SHIPPED[f'timm:{name}']}"
    classes, wnids = _imagenet_names(net.num_classes)
    opened = Opened("timm", name, net, pre, classes, wnids, Path(weights) if weights else None, features=True)
    opened.gradcam = True
    if state is None and not pretrained:
        opened.notes.append(f"timm:{name} has random weights (neither --weights nor --pretrained was given)")
    return opened


def _imagenet_names(k: int) -> tuple[list[str] | None, list[str] | None]:
    """ImageNet-1k's class descriptions and WordNet ids when the model has 1,000 outputs, else (None, None)."""
    if k != 1000:
        return None, None
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(k)], [info.index_to_label_name(i) for i in range(k)]


def _open_torchvision(name: str, weights: str | Path | None, pretrained: bool) -> Opened:
    import torchvision

    if name not in torchvision.models.list_models():
        raise PupilError(f"torchvision has no model {name!r} (torchvision.models.list_models() lists them)")
    try:
        default = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        default = None
    state = read_state(weights) if weights is not None else None
    k = None
    if state is not None:  # the classifier is the last 2-D weight in the state dict's order
        last = [key for key, v in state.items() if key.endswith(".weight") and v.ndim == 2]
        k = int(state[last[-1]].shape[0]) if last else None
    try:
        net = torchvision.models.get_model(
            name, weights=default if pretrained else None, **({"num_classes": k} if k else {})
        )
    except (RuntimeError, OSError, ValueError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise PupilError(f"could not build torchvision:{name} with its weights (no network?): {first}") from None
    if state is not None:
        _load_state(net, state, f"torchvision:{name}")
    pre = Preprocess(source="none (torchvision has no weights for this model)")
    classes = None
    if default is not None:
        t = default.transforms()
        pre = Preprocess(
            crop=t.crop_size[0],
            resize=t.resize_size[0],
            interpolation=t.interpolation.value,
            mean=list(t.mean),
            std=list(t.std),
            input_range="0-1",
            channels=3,
            source=f"torchvision weights {default}",
        )
        cats = default.meta.get("categories")
        classes = list(cats) if cats and len(cats) == _outputs(net) else None
    _, wnids = _imagenet_names(len(classes)) if classes else (None, None)
    opened = _opened_module("torchvision", name, net, weights)
    opened.preprocess, opened.classes, opened.wnids = pre, classes, wnids
    if state is None and not pretrained:
        opened.notes.append(f"torchvision:{name} has random weights (neither --weights nor --pretrained was given)")
    return opened


def _outputs(net: nn.Module) -> int | None:
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linear[-1].out_features if linear else None


def _open_py(target: str, weights: str | Path | None) -> Opened:
    module_name, sep, factory_name = target.partition(":")
    if not sep or not module_name or not factory_name:
        raise PupilError(f"py:{target}: expected py:package.module:factory")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a module beside the user, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any exception it raises on import is theirs to see
        raise PupilError(f"py:{target}: importing {module_name} raised {type(e).__name__}: {e}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise PupilError(f"py:{target}: {module_name} has no function {factory_name}")
    try:
        net = factory()
    except Exception as e:  # likewise the user's code
        raise PupilError(f"py:{target}: {factory_name}() raised {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise PupilError(f"py:{target}: {factory_name}() returned {type(net).__name__}, not a torch nn.Module")
    if weights is not None:
        _load_state(net, read_state(weights), f"py:{target}")
    return _opened_module("py", factory_name, net, weights)


def _opened_module(kind: str, name: str, net: nn.Module, weights: str | Path | None) -> Opened:
    """A plain ``nn.Module``: gradients flow; it keeps the feature contract only if it has its methods."""
    features = all(hasattr(net, a) for a in ("forward_features", "forward_head", "num_features"))
    gradcam = isinstance(getattr(net, "gradcam_layer", None), str)
    if not gradcam and (layer := _last_conv(net)):
        net.gradcam_layer, gradcam = layer, True
    return Opened(
        kind,
        name,
        net,
        Preprocess(source="none"),
        weights_file=Path(weights) if weights else None,
        features=features,
        gradcam=gradcam,
    )


def _last_conv(net: nn.Module) -> str | None:
    """The last 2-D convolution's name: the Grad-CAM layer of a CNN that does not name one."""
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    return names[-1] if names else None


# ---------------------------------------------------------------------------------------------------------------
# Classes


def read_classes(path: str | Path) -> list[str]:
    """``--classes FILE``: one class name per line (blank lines ignored), in the model's output order."""
    p = Path(path)
    if not p.is_file():
        raise PupilError(f"classes file {p} does not exist")
    try:
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise PupilError(f"classes file {p} is not text") from None
    if not names:
        raise PupilError(f"classes file {p} lists no classes")
    if len(set(names)) != len(names):
        raise PupilError(f"classes file {p} lists a class twice")
    return names


def map_classes(
    data_classes: list[str], model_classes: list[str] | None, wnids: list[str] | None, k: int, class_map: str | None
) -> tuple[list[int] | None, str]:
    """The model output index of each data class (None: the same classes, in order) and how it was found.

    Without a class map the classes must agree: the same names in the same order, or (when the model names no
    classes) as many outputs as the data has classes. ``auto`` matches each data class to a model class by
    WordNet id or by name (any of a description's comma-separated synonyms, case and ``_`` ignored); a CSV file
    gives ``data_class,model_class`` rows, the model class as a name or an output index."""
    if class_map is None:
        if model_classes is None:
            if k != len(data_classes):
                raise PupilError(
                    f"the model has {k} outputs but the data has {len(data_classes)} classes: pass --classes FILE "
                    "(the model's class names, one per line) and --class-map auto or FILE"
                )
            return None, "the data's classes, in order (the model names none)"
        if model_classes == data_classes:
            return None, "the model's classes"
        hint = "--class-map auto (by name or WordNet id) or --class-map FILE"
        raise PupilError(
            f"the data's {len(data_classes)} classes are not the model's {len(model_classes)}; pass {hint}"
        )
    if model_classes is None:
        raise PupilError("--class-map needs the model's class names: the model names none, so pass --classes FILE")
    if class_map == "auto":
        index = _auto_map(data_classes, model_classes, wnids)
        how = "mapped automatically by WordNet id or name"
    else:
        index = _file_map(Path(class_map), data_classes, model_classes)
        how = f"mapped by {class_map}"
    if len(set(index)) != len(index):
        raise PupilError("the class map sends two data classes to the same model class")
    if index == list(range(len(model_classes))):
        return None, "the model's classes"
    return index, how


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _aliases(model_classes: list[str]) -> dict[str, int]:
    """Each model class by its full description and each comma-separated synonym (first class wins a tie)."""
    by_name: dict[str, int] = {}
    for i, desc in enumerate(model_classes):
        for alias in [desc, *desc.split(",")]:
            by_name.setdefault(_norm(alias), i)
    return by_name


def _auto_map(data_classes: list[str], model_classes: list[str], wnids: list[str] | None) -> list[int]:
    by_name = _aliases(model_classes)
    by_wnid = {w: i for i, w in enumerate(wnids or [])}
    index, unmatched = [], []
    for c in data_classes:
        i = by_wnid.get(c, by_name.get(_norm(c)))
        if i is None:
            unmatched.append(c)
        index.append(i)
    if unmatched:
        raise PupilError(
            f"--class-map auto found no model class for {', '.join(unmatched[:5])}"
            f"{' and more' if len(unmatched) > 5 else ''}: name the folders by WordNet id or the model's class "
            "names, or pass --class-map FILE"
        )
    return index


def _file_map(path: Path, data_classes: list[str], model_classes: list[str]) -> list[int]:
    if not path.is_file():
        raise PupilError(f"class map {path} does not exist")
    try:
        rows = [r for r in csv.reader(path.read_text().splitlines()) if r and any(x.strip() for x in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise PupilError(f"class map {path} is not a CSV file: {e}") from None
    if rows and [x.strip().lower() for x in rows[0][:2]] == ["data_class", "model_class"]:
        rows = rows[1:]
    by_name = _aliases(model_classes)
    mapping: dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        if len(row) < 2:
            raise PupilError(f"class map {path} row {n}: expected data_class,model_class")
        data_class, target = row[0].strip(), row[1].strip()
        i = int(target) if target.isdigit() else by_name.get(_norm(target))
        if i is None or not 0 <= i < len(model_classes):
            raise PupilError(f"class map {path} row {n}: the model has no class {target!r}")
        mapping[data_class] = i
    if missing := [c for c in data_classes if c not in mapping]:
        raise PupilError(f"class map {path} does not map the data class(es) {', '.join(missing[:5])}")
    return [mapping[c] for c in data_classes]


# ---------------------------------------------------------------------------------------------------------------
# The Run the audit sees


def weights_hash(opened: Opened) -> str | None:
    """sha256 of the weights or model file (first 12 hex digits), or of the module's state dict."""
    if opened.weights_file is not None and opened.weights_file.is_file():
        return sha256_file(opened.weights_file)[:12]
    h = hashlib.sha256()
    try:
        state = opened.net.state_dict()
    except (RuntimeError, AttributeError):
        return None
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:12]


def source_run(
    opened: Opened,
    preprocess: Preprocess,
    out: Path,
    data_name: str,
    classes: list[str],
    index: list[int] | None,
    classes_how: str,
    splits: Callable[[str], ImageDataset],
    channels: int,
    val_size: int,
    seed: int,
    *,
    input_shape: list[int] | None = None,
    weights_sha256: str | None = None,
) -> Run:
    """The ``Run`` the audit sees for an opened source: the wrapped model over the data's classes, and a
    ``run.json``-shaped ``info`` (nothing about training is known; ``source`` records the model's origin).

    ``source`` records all that re-opening the model needs (``open_audited``, for ``pupil serve``): the spec's
    ``target``, ``pretrained``, the weights file's absolute ``weights_path`` (``weights`` as given, for the card)
    and its hash, the preprocessing, the class index, and the ``input_shape`` (C, H, W) the model was fed.
    ``weights_sha256``: the hash when the caller has it already (a state dict's takes a pass over every tensor)."""
    net = Restricted(opened.net, index) if index is not None else opened.net
    mean, std = preprocess.pixel_stats(channels)
    model = PixelModel(net, mean, std).eval()
    try:
        params = sum(p.numel() for p in opened.net.parameters()) or getattr(opened.net, "param_count", None)
    except RuntimeError:
        params = None
    spec = f"{opened.kind}:{opened.name}" if opened.kind != "module" else f"nn.Module {opened.name}"
    info = {
        "schema": 1,
        "status": "external",
        "model": {
            "name": spec,
            "num_classes": len(classes),
            "in_chans": channels,
            "img_size": preprocess.crop,
            "params": params,
        },
        "data": {"dataset": data_name, "classes": classes, "input_shape": None, "mean": mean, "std": std},
        "tta": False,
        "config": {"data": {"val_size": val_size}, "train": {"seed": seed, "task": "unknown"}},
        "runtime": {"channels_last": False},
        "source": {
            "kind": opened.kind,
            "name": opened.name,
            "target": opened.target,
            "pretrained": opened.pretrained,
            "weights": str(opened.weights_file) if opened.weights_file else None,
            "weights_path": str(opened.weights_file.resolve()) if opened.weights_file else None,
            "weights_sha256": weights_sha256 or weights_hash(opened),
            "input_shape": input_shape,
            "preprocess": preprocess.record(),
            "classes_from": classes_how,
            "class_index": index,
            "gradients": opened.gradients,
            "features": opened.features,
            "gradcam": opened.gradcam,
            "notes": opened.notes,
        },
    }
    run = Run(out, info, model)
    run.splits = splits
    run.weights_file = opened.weights_file
    return run


# ---------------------------------------------------------------------------------------------------------------
# The data, decoded to the model's input


def has_test_split(data: str) -> bool:
    """Whether ``data`` brings its own test split (a registered dataset, ``train/`` and ``test/`` folders, a
    manifest with a ``split`` column); otherwise the audit splits all of it into validation and test."""
    from pupil.data import DATASETS

    if data in DATASETS:
        return True
    p = Path(data)
    if p.is_dir():
        return (p / "train").is_dir() and (p / "test").is_dir()
    if p.suffix.lower() == ".csv" and p.is_file():
        with open(p, newline="", errors="replace") as f:
            header = next(csv.reader(f), [])
        return "split" in [h.strip() for h in header]
    return False


def from_torch_dataset(ds: Any, channels: int | None = None) -> ImageDataset:
    """A ``torch.utils.data.Dataset`` of ``(image, label)`` pairs as an ImageDataset: PIL images and uint8
    tensors are kept exactly; float tensors must be pixels in [0, 1] (refused otherwise, not rescaled)."""
    import numpy as np

    images, labels = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise PupilError(f"the dataset's item {i} is not an (image, label) pair")
        img, label = item[0], item[1]
        if hasattr(img, "convert") and hasattr(img, "mode"):  # a PIL image
            a = np.asarray(img.convert("L" if img.mode in ("1", "L", "I;16", "I", "F") else "RGB"))
            img = (
                torch.from_numpy(a.copy()).unsqueeze(0) if a.ndim == 2 else torch.from_numpy(a.copy()).permute(2, 0, 1)
            )
        if not isinstance(img, torch.Tensor) or img.ndim not in (2, 3):
            raise PupilError(
                f"the dataset's item {i} is {type(img).__name__}; expected a PIL image or a (C, H, W) tensor"
            )
        img = img.unsqueeze(0) if img.ndim == 2 else img
        if img.dtype.is_floating_point:
            if not torch.isfinite(img).all() or img.min() < 0 or img.max() > 1:
                raise PupilError(
                    f"the dataset's item {i} is a float image outside [0, 1]; give pixels in [0, 1] or uint8"
                )
            img = (img * 255).round().to(torch.uint8)
        elif img.dtype != torch.uint8:
            raise PupilError(f"the dataset's item {i} has pixels of type {img.dtype}; give uint8 or floats in [0, 1]")
        images.append(img)
        labels.append(int(label))
    if not images:
        raise PupilError("the dataset is empty")
    if len({tuple(x.shape) for x in images}) > 1:
        raise PupilError("the dataset's images differ in shape; give a dataset of one size or a folder of files")
    classes = [str(c) for c in getattr(ds, "classes", range(max(labels) + 1))]
    if min(labels) < 0 or max(labels) >= len(classes):
        raise PupilError(
            f"the dataset's labels run from {min(labels)} to {max(labels)}, outside its {len(classes)} classes"
        )
    meta = {"name": type(ds).__name__, "source": "a torch Dataset", "classes_from": "the dataset"}
    return ImageDataset(torch.stack(images), torch.tensor(labels), classes, meta)


def audit_splits(
    data: Any,
    fit: Fit | None,
    channels: int | None,
    val_size: float,
    seed: int,
    on_bad_image: str = "fail",
    max_memory: int | None = None,
) -> tuple[str, Callable[[str], ImageDataset]]:
    """The data's name and a function split -> ImageDataset (``test``, ``val`` and, where there is one,
    ``train``), each decoded to the model's input. Data with its own test split keeps it and carves validation
    from its training split; other data is split, class-stratified and seeded, into validation and test."""
    from pupil.data import ImageDataset as Images
    from pupil.data import load, stratified_split
    from pupil.data.datasets import _convert_tensors

    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, Images):
        data = from_torch_dataset(data)
    if isinstance(data, Images):
        whole = _convert_tensors(data, fit, channels) if (fit or channels) else data
        name, own = whole.meta.get("name", "a dataset"), False
    else:
        name, own = str(data), has_test_split(str(data))
        opts = {"fit": fit, "channels": channels, "on_bad_image": on_bad_image, "max_memory": max_memory}
        whole = None if own else load(name, "all", seed=seed, **opts)
    cache: dict[str, ImageDataset] = {}

    def split(which: str) -> ImageDataset:
        if which not in cache:
            if own:
                if which == "val" and not val_size:
                    raise PupilError("no validation split (--val-size 0)")
                cache[which] = load(name, which, val_size=val_size if which != "test" else 0, seed=seed, **opts)
            elif which == "train":
                raise PupilError(f"{name} has no training split (the audit splits it into validation and test)")
            elif not val_size:
                if which == "val":
                    raise PupilError("no validation split (--val-size 0)")
                cache[which] = whole.subset(torch.arange(len(whole)), "test")
            else:
                test_idx, val_idx = stratified_split(whole.targets, val_size, seed)
                cache[which] = whole.subset(val_idx if which == "val" else test_idx, which)
        return cache[which]

    return name, split


def open_audit(
    model: str | nn.Module,
    data: Any,
    *,
    out: Path,
    weights: str | Path | None = None,
    pretrained: bool = False,
    preprocess: dict[str, Any] | None = None,
    classes: str | Path | list[str] | None = None,
    class_map: str | None = None,
    val_size: float = 0.1,
    seed: int = 0,
    device: torch.device | None = None,
    on_bad_image: str = "fail",
    max_memory: int | str | None = None,
) -> Run:
    """Open a model source and its data for the audit: the ``Run`` it audits (``run.split`` gives the data)."""
    flags = Preprocess.from_flags(preprocess)
    if data is None:
        raise PupilError("a model that pupil did not train needs --data: a dataset name, an image folder or a CSV")
    if not (isinstance(val_size, int | float) and not isinstance(val_size, bool) and val_size >= 0):
        raise PupilError(f"--val-size must be a count or a fraction >= 0, not {val_size!r}")
    opened = open_source(model, weights=weights, pretrained=pretrained, device=device)
    what = f"{opened.kind}:{opened.name}" if opened.kind != "module" else f"the module {opened.name}"
    known = opened.preprocess.mean is not None
    pre = (flags.over(opened.preprocess) if known else _keep_shape(flags, opened.preprocess)).complete(what)
    budget = memory_budget(max_memory)
    name, split = audit_splits(data, pre.fit(), pre.channels, val_size, seed, on_bad_image, budget)
    test = split("test")
    channels = test.shape[0]
    mean, std = pre.pixel_stats(channels)
    k = _probe(PixelModel(opened.net, mean, std).eval(), test, what)
    if not isinstance(getattr(opened.net, "num_classes", None), int):
        with contextlib.suppress(AttributeError, RuntimeError):  # a TorchScript module takes no new attributes
            opened.net.num_classes = k  # PixelModel.num_classes reads it
    model_classes = (read_classes(classes) if isinstance(classes, str | Path) else classes) or opened.classes
    if model_classes is not None and len(model_classes) != k:
        raise PupilError(f"{len(model_classes)} class names for a model with {k} outputs")
    index, how = map_classes(test.classes, model_classes, opened.wnids, k, class_map)
    names = test.classes if index is not None or model_classes is None else model_classes
    pre.channels = channels
    run = source_run(
        opened, pre, out, name, names, index, how, split, channels, val_size, seed, input_shape=list(test.shape)
    )
    run.max_memory = budget
    return run


def _keep_shape(flags: Preprocess, found: Preprocess) -> Preprocess:
    """Flags over what a model file says of its input shape alone (an ONNX graph's side and channels)."""
    p = Preprocess(**{**asdict(found), **flags.given()})
    p.source = "flags" + (f" and {found.source}" if found.crop or found.channels else "")
    return p


def _probe(model: nn.Module, test: ImageDataset, what: str) -> int:
    """The model's number of outputs, from a forward pass over two test images; one line for a model whose
    output is not (N, K) logits or that fails on the data's shape."""
    return _count_outputs(model, test.images[:2].float() / 255, what, "test images")


def _count_outputs(model: nn.Module, x: torch.Tensor, what: str, images: str) -> int:
    """The number of outputs ``model`` gives for pixels ``x`` (N, C, H, W) (``images`` says what they are), or
    one line for a model that fails on them or returns anything but finite (N, K) logits."""
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as e:  # the user's model: whatever it raises on this input is the message
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise PupilError(
            f"{what} failed on a batch of {images} of shape {tuple(x.shape)}: {first} "
            "(check --img-size, --crop and the channel count)"
        ) from None
    if isinstance(out, tuple | list) or not isinstance(out, torch.Tensor) or out.ndim != 2 or len(out) != len(x):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PupilError(
            f"{what} returned {shape} for {len(x)} images; pupil audits classifiers that return (N, K) logits"
        )
    if not torch.isfinite(out).all():
        raise PupilError(f"{what} returned NaN or infinite outputs on {images}; check its weights and preprocessing")
    return int(out.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Serving a source (``pupil serve``): an audited one re-opened as audited, or one opened bare, without data

FILE_KINDS = ("onnx", "torchscript", "export")  # kinds whose file is the model, weights included
OPTION_FLAGS = {"weights": "--weights", "pretrained": "--pretrained", "classes": "--classes"}


def served_name(kind: str, target: str) -> str:
    """The name ``pupil audit`` gives the folder of an audit of ``kind:target`` (under audits/), and ``pupil serve``
    a bare one: ``onnx:models/net.onnx`` -> ``onnx-net``, so that a model keeps its name once it is audited."""
    name = f"{kind}-{Path(target).stem if kind in FILE_KINDS else target}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "model"


def option_flags(options: dict[str, Any]) -> list[str]:
    """The command-line flags a source's options stand for (``weights`` -> ``--weights``, ``preprocess``'s
    ``img_size`` -> ``--img-size``), for the ones that are set."""
    flags = [OPTION_FLAGS.get(k, f"--{k}") for k, v in options.items() if k != "preprocess" and v]
    return flags + [f"--{k.replace('_', '-')}" for k, v in (options.get("preprocess") or {}).items() if v is not None]


def audit_command(spec: str, options: dict[str, Any] | None = None, out: Path | None = None, data: str = "DATA") -> str:
    """The ``pupil audit`` command that audits ``spec`` with ``options`` (as ``open_bare`` takes them)."""
    options, q = options or {}, shlex.quote
    words = ["pupil audit", q(spec), f"--data {data if data == 'DATA' else q(str(data))}"]
    if options.get("weights"):
        words.append(f"--weights {q(str(options['weights']))}")
    if options.get("pretrained"):
        words.append("--pretrained")
    if isinstance(options.get("classes"), str | Path):
        words.append(f"--classes {q(str(options['classes']))}")
    for k, v in (options.get("preprocess") or {}).items():
        if v is not None:
            words.append(f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list | tuple) else v}")
    if out is not None:
        words.append(f"--out {q(str(out))}")
    return " ".join(words)


def _no_data(split: str) -> ImageDataset:
    raise PupilError("a model opened to serve has no data: audit it with `pupil audit MODEL --data DATA`")


def _in_channels(net: nn.Module) -> int | None:
    """The channels the first 2-D convolution takes (1 or 3), if the network has one (TorchScript keeps the
    module's ``original_name`` and its ``in_channels``)."""
    convs = (m for m in net.modules() if isinstance(m, nn.Conv2d) or getattr(m, "original_name", None) == "Conv2d")
    channels = getattr(next(convs, None), "in_channels", None)
    return channels if channels in (1, 3) else None


def open_bare(
    spec: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    classes: str | Path | list[str] | None = None,
    preprocess: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> Run:
    """Open the model source ``spec`` to serve it unaudited, without data.

    The preprocessing is what the model or the flags state, completed and refused as the audit does (a model
    that says nothing of its normalisation needs --mean and --std or --input-range); with no images to take it
    from, the input size must be known too (the model's, or --img-size). The channels are the model's (its
    preprocessing, ONNX graph or first convolution), else one per --mean value. The number of outputs comes from a
    forward pass on two black images; the class names from the model (ImageNet's), from ``classes`` (a file, one
    name a line, or a list), else the output indices "0".."K-1", with a note. ``source`` in the Run's info says
    ``audited: False``."""
    flags = Preprocess.from_flags(preprocess)
    device = device or torch.device("cpu")
    opened = open_source(spec, weights=weights, pretrained=pretrained, device=device)
    what = f"{opened.kind}:{opened.name}"
    known = opened.preprocess.mean is not None
    pre = (flags.over(opened.preprocess) if known else _keep_shape(flags, opened.preprocess)).complete(what)
    if pre.crop is None:
        raise PupilError(
            f"{what} does not say its input size and, unaudited, there are no images to take it from: pass --img-size"
        )
    pre.fit()  # a --resize below the crop fails here
    channels = pre.channels or _in_channels(opened.net) or len(pre.mean)
    if channels not in (1, 3):
        raise PupilError(f"{what}: give --mean and --std one value per channel (1 or 3), not {len(pre.mean)}")
    pre.channels = channels
    mean, std = pre.pixel_stats(channels)
    shape = [channels, pre.crop, pre.crop]
    k = _count_outputs(PixelModel(opened.net, mean, std).eval(), torch.zeros(2, *shape), what, "black images")
    if not isinstance(getattr(opened.net, "num_classes", None), int):
        with contextlib.suppress(AttributeError, RuntimeError):  # a TorchScript module takes no new attributes
            opened.net.num_classes = k
    if isinstance(classes, str | Path):
        names, how = read_classes(classes), f"--classes {classes}"
    elif classes:
        names, how = [str(c) for c in classes], "given"
        if len(set(names)) != len(names):
            raise PupilError("the class names list a class twice")
    else:  # the model's own (ImageNet's descriptions repeat two: crane and maillot)
        names, how = opened.classes, "the model's classes"
    if names is None:
        names, how = [str(i) for i in range(k)], "the output indices (the model names no classes)"
        opened.notes.append(f"the classes are the output indices 0..{k - 1}: pass --classes FILE to name them")
    elif len(names) != k:
        raise PupilError(f"{len(names)} class names for a model with {k} outputs")
    name = served_name(opened.kind, opened.target)
    run = source_run(opened, pre, Path(name), "none", names, None, how, _no_data, channels, 0, 0, input_shape=shape)
    run.info["data"]["input_shape"] = shape
    run.info["source"]["audited"] = False
    run.model.to(device)
    return run


def open_audited(folder: str | Path, device: torch.device | None = None) -> Run:
    """Re-open the model source that ``pupil audit`` audited into ``folder``, as its results.json records it
    (``run.source``): the same file or published weights, checked against the recorded sha256 before anything
    runs (a TorchScript file is code), the same preprocessing, classes and class index. The audited rules are then
    the folder's to read (``pupil.serve.models``).

    Refused in one line that says what to do: weights that changed or are gone, a module handed to
    ``pupil.audit`` from Python, random weights, and records from before pupil kept all that re-opening needs
    (``target`` for ``py:``, ``pretrained``, the ``input_shape`` of data fed at its own size)."""
    from pupil.results import load_results

    folder = Path(folder)
    results = load_results(folder)
    record = results["run"]
    src = record.get("source")
    if not isinstance(src, dict) or not isinstance(src.get("kind"), str):
        raise PupilError(
            f"{folder} has results.json but no run.json, and records no model source: it is neither a "
            "run directory nor an audit of a model source"
        )
    kind = src["kind"]
    if kind == "module":
        raise PupilError(
            f"{folder} audits an nn.Module handed to pupil.audit from Python, which pupil cannot re-open: save it "
            "(a state dict for py:, or ONNX or TorchScript), audit that source and serve its audit"
        )
    if kind not in KINDS:
        raise PupilError(f"{folder} audits a {kind} model, which pupil serve cannot re-open")
    file = _audited_file(folder, src)
    pretrained = bool(src.get("pretrained"))
    if kind in FILE_KINDS:
        target = str(file)
    elif kind == "py":
        target = src.get("target") or f"MODULE:{src.get('name')}"
    else:
        target = src.get("target") or src.get("name")
    spec = f"{kind}:{target}"
    again = "audit it again: `" + _again(spec, src, record["dataset"], file, folder) + "`"
    if kind == "py" and not src.get("target"):
        raise PupilError(f"{folder} was audited before pupil recorded the module of py: models; {again}")
    if kind in ("timm", "torchvision") and file is None:
        if "pretrained" not in src:
            raise PupilError(
                f"{folder} was audited before pupil recorded whether the weights were --pretrained; "
                f"{again.replace(' --data', ' --pretrained --data')}"
            )
        if not pretrained:
            raise PupilError(
                f"{folder} audits {spec} with random weights (neither --weights nor --pretrained): there is "
                "nothing to serve; audit it with --weights FILE or --pretrained"
            )
    recorded = src.get("weights_sha256")
    if not recorded:
        raise PupilError(f"{folder} records no hash of the audited weights, so they cannot be checked; {again}")
    if file is not None and not sha256_file(file).startswith(recorded):
        raise PupilError(
            f"{file} changed since {folder} was audited (sha256 {sha256_file(file)[:12]}, audited {recorded}): {again}"
        )
    device = device or torch.device("cpu")
    opened = open_source(spec, weights=file if kind not in FILE_KINDS else None, pretrained=pretrained, device=device)
    if file is None and (found := weights_hash(opened)) != recorded:
        raise PupilError(
            f"the weights of {spec} (sha256 {found}) are not the ones {folder} audited ({recorded}): {again}"
        )
    recorded_pre = src.get("preprocess") or {}
    pre = Preprocess(**{f.name: recorded_pre[f.name] for f in fields(Preprocess) if f.name in recorded_pre})
    channels = pre.channels or (record["model"].get("in_chans"))
    shape = src.get("input_shape") or ([channels, pre.crop, pre.crop] if pre.crop else None)
    if not shape or pre.mean is None or channels not in (1, 3):
        raise PupilError(f"{folder} does not record the input its audit fed the model; {again}")
    classes, index = record["classes"], src.get("class_index")
    how = src.get("classes_from") or "the audit's classes"
    run = source_run(
        opened,
        pre,
        folder,
        record["dataset"],
        classes,
        index,
        how,
        _no_data,
        channels,
        0,
        0,
        input_shape=list(shape),
        weights_sha256=recorded,
    )
    if index is None and not isinstance(getattr(opened.net, "num_classes", None), int):
        with contextlib.suppress(AttributeError, RuntimeError):  # a TorchScript module takes no new attributes
            opened.net.num_classes = len(classes)
    run.info["data"]["input_shape"] = list(shape)
    run.info["source"]["audited"] = True
    run.model.to(device)
    return run


def _audited_file(folder: Path, src: dict[str, Any]) -> Path | None:
    """The weights (or model) file the audit read: by its absolute path, else (records from before pupil kept
    it) as given, from where the audit ran; None for published weights or a py: factory's own. Refused when
    it is gone."""
    given = src.get("weights_path") or src.get("weights")
    if given is None:
        if src["kind"] in FILE_KINDS:
            raise PupilError(f"{folder} does not record the {src['kind']} file it audited: audit the file again")
        return None
    path = Path(given)
    if not path.is_file():
        raise PupilError(
            f"the weights {given} that {folder} audited are gone: restore them, or audit the model again and serve "
            "the new audit"
        )
    return path


def _again(spec: str, src: dict[str, Any], data: str, file: Path | None, folder: Path) -> str:
    """The command that audits ``spec`` again into ``folder`` as it was audited (the preprocessing flags when
    the flags gave it)."""
    options: dict[str, Any] = {"weights": file if src["kind"] not in FILE_KINDS else None}
    options["pretrained"] = src.get("pretrained")
    pre = src.get("preprocess") or {}
    if str(pre.get("source", "")).startswith("flags"):
        keys = ("crop", "resize", "interpolation", "mean", "std", "input_range")
        options["preprocess"] = {k: pre.get(k) for k in keys}
    return audit_command(spec, options, folder, data)
