"""The model registry and ``create``: one name -> one builder plus its sizes and paper."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from pupil.errors import PupilError
from pupil.registry import Registry

MODELS = Registry("model")
# Filled in by ``create`` from the dataset, never from --model-args.
DATASET_ARGS = ("num_classes", "in_chans", "img_size")
# Taken by every model: wraps it in an embedding network (``create``).
EMBED_ARG = "embed_dim"


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

    Keyword arguments override the named size's defaults (``widths=(32, 64, 128)``, ``drop_rate``...); one the
    model does not take is a PupilError naming it, so a typo in ``--model-args`` or run.json cannot pass silently.
    ``embed_dim=D``, which every model takes, wraps the model in an embedding network of D dimensions with a
    cosine classifier (``pupil.models.embedding``; what ``--task metric`` trains).
    """
    embed_dim = kwargs.pop(EMBED_ARG, None)
    if embed_dim is not None:
        from pupil.models.embedding import EmbeddingNet, check_embed_dim

        check_embed_dim(embed_dim)
    if name.startswith("timm:"):
        from pupil.models.timm import create_timm

        check_name(name)
        net = create_timm(name[5:], num_classes=num_classes, in_chans=in_chans, img_size=img_size, model_args=kwargs)
    else:
        entry = MODELS.entry(name)
        takes = arguments(entry.obj)
        if unknown := [k for k in kwargs if k not in takes]:
            raise PupilError(f"model {name} has {no_arguments(unknown)}; it takes {', '.join([*takes, EMBED_ARG])}")
        args = dict(entry.meta.get("defaults", {}))
        args.update(kwargs)
        net = entry.obj(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **args)
    return net if embed_dim is None else EmbeddingNet(net, embed_dim, num_classes)


def arguments(builder: Any) -> list[str]:
    """The keyword arguments a model's constructor takes beyond what ``create`` fills in from the dataset."""
    params = inspect.signature(builder).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in named and p.name not in DATASET_ARGS]


def no_arguments(unknown: list[str]) -> str:
    """``no argument 'widht'`` or ``no arguments 'a', 'b'``, for the refusal messages."""
    return f"no argument{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}"
