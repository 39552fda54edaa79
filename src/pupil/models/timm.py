"""Any timm model by name (``timm:<name>``), with the dataset's channels, classes and, where the
architecture accepts it, image size. timm models already keep pupil's contract
(``forward_features``/``forward_head``/``reset_classifier``/``num_features``); this adds the
Grad-CAM layer name from timm's ``feature_info``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pupil.errors import PupilError


def create_timm(name: str, num_classes: int, in_chans: int, img_size: int, pretrained: bool = False, **kwargs: Any):
    import timm

    args = dict(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs)
    try:
        try:
            model = timm.create_model(name, img_size=img_size, **args)
        except TypeError:  # the architecture has no img_size argument (most CNNs)
            model = timm.create_model(name, **args)
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
