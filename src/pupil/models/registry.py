"""The model registry and ``create``: one name -> one builder plus its sizes and paper."""

from __future__ import annotations

from typing import Any

from torch import nn

from pupil.errors import PupilError
from pupil.registry import Registry

MODELS = Registry("model")


def check_name(name: str) -> None:
    """Raise PupilError for an unknown model name before any data is loaded."""
    if name.startswith("timm:"):
        import timm

        if not timm.is_model(name[5:]):
            raise PupilError(f"unknown timm model {name[5:]!r} (timm.list_models() lists them)")
    else:
        MODELS.entry(name)


def create(name: str, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, **kwargs: Any) -> nn.Module:
    """Build a registered model, or any timm model as ``timm:<name>``.

    Keyword arguments override the named size's defaults (``widths=(32, 64, 128)``, ``drop_rate``...).
    """
    if name.startswith("timm:"):
        from pupil.models.timm import create_timm

        check_name(name)
        return create_timm(name[5:], num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    entry = MODELS.entry(name)
    args = dict(entry.meta.get("defaults", {}))
    args.update(kwargs)
    return entry.obj(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **args)
