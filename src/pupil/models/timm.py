"""Any timm model by name (``timm:<name>``), with the dataset's channels, classes and, where the
architecture accepts it, image size. timm models already keep pupil's contract
(``forward_features``/``forward_head``/``reset_classifier``/``num_features``); this adds the
Grad-CAM layer name from timm's ``feature_info``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from pupil.errors import PupilError
from pupil.models.registry import arguments, no_arguments

# timm.create_model arguments that load weights or read files: a checkpoint, the hub cache, a pretrained config
# (which may name a local file), timm's pruned-model definitions. Model arguments come from --model-args and
# run.json, which must never make pupil load a file; pretrained weights come only from the ``pretrained`` flag
# (``pupil.models.pretrained``), which is the explicit ``pretrained`` parameter below.
LOADING_ARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_model_args",
        "pretrained_strict",
        "checkpoint_path",
        "cache_dir",
        "pruned",
    }
)


def create_timm(
    name: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    pretrained: bool = False,
    model_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """timm model ``name`` with pupil's contract; ``model_args`` are the user's (``--model-args``, run.json).

    Raises:
        PupilError: for a model argument the architecture does not take, one that would load a file or
            weights (``LOADING_ARGS``), or pretrained weights that cannot be fetched.
    """
    import timm

    model_args = dict(model_args or {})
    if loading := sorted(set(model_args) & LOADING_ARGS):
        raise PupilError(
            f"model timm:{name}: argument {loading[0]!r} would load files or weights, which model arguments "
            "may not do; pretrained weights come only from --pretrained"
        )
    args = dict(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **model_args)
    try:
        model = _build(timm, name, img_size, args)
    except TypeError as e:
        # "ResNet.__init__() got an unexpected keyword argument 'widht'"; any other TypeError is a bug here.
        m = re.search(r"(\w+)(?:\.__init__)?\(\) got an unexpected keyword argument '(\w+)'", str(e))
        if m is None or m.group(2) not in model_args:
            raise
        builder, refused = m.groups()
        raise PupilError(f"model timm:{name} has {no_arguments([refused])}{_takes(timm, name, builder)}") from None
    except (RuntimeError, OSError) as e:  # offline, the hub raises OSError (LocalEntryNotFoundError)
        if pretrained:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PupilError(f"could not load pretrained weights for {name!r} (no network?): {first}") from None
        raise
    model.gradcam_layer = _last_feature_module(model)
    if hasattr(model, "patch_embed") and hasattr(model.patch_embed, "grid_size"):
        model.feature_grid = tuple(model.patch_embed.grid_size)
        model.num_prefix_tokens = getattr(model, "num_prefix_tokens", 1)
    return model


def _build(timm: Any, name: str, img_size: int, args: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, img_size=img_size, **args)
    except TypeError as e:
        # Only the architecture lacking img_size (most CNNs) means "retry without it"; a TypeError about
        # another argument (a typo in the model arguments) must not be retried into a different error.
        if "'img_size'" not in str(e):
            raise
    return timm.create_model(name, **args)


def _takes(timm: Any, name: str, builder: str) -> str:
    """``; ResNet takes block, layers, ...``: the arguments of the class (or function) that refused one."""
    try:
        module = sys.modules[timm.models.model_entrypoint(name).__module__]
    except (RuntimeError, KeyError):  # the message must not fail on the way to the user
        return ""
    obj = getattr(module, builder, None)
    if obj is None:
        return ""
    return f"; {builder} takes {', '.join(a for a in arguments(obj) if a != 'pretrained')}"


def _last_feature_module(model: nn.Module) -> str:
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        try:
            model.get_submodule(last)
            return last
        except AttributeError:
            pass
    # Fall back to the last module with parameters before the head.
    names = [n for n, m in model.named_modules() if n and not n.startswith(("head", "fc", "classifier"))]
    return names[-1]
