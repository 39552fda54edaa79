"""Model families (one module each), the registry and the contract.

Families register themselves when imported; the imports below are the complete list.
"""

from pupil.models import (  # noqa: F401  (registers the families)
    alexnet,
    coatnet,
    convnext,
    densenet,
    efficientnet,
    googlenet,
    lenet,
    mobilenet,
    resnet,
    shufflenet,
    swin,
    vgg,
    vit,
)
from pupil.models.contract import PixelModel, check_contract, gradcam_module
from pupil.models.embedding import EmbeddingNet, PixelEmbedder
from pupil.models.registry import MODELS, create

__all__ = ["MODELS", "EmbeddingNet", "PixelEmbedder", "PixelModel", "check_contract", "create", "gradcam_module"]
