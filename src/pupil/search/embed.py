"""Embeddings for visual search: one L2-normalised vector per image, from any run that keeps the feature contract.

A classification run embeds through its penultimate features (``net.forward_head(net.forward_features(x),
pre_logits=True)``, the pooled vector the classifier's last layer reads); a metric-learning run (``--task metric``)
keeps the same contract, and there ``forward_head(..., pre_logits=True)`` is the learned embedding of 64-128
dimensions; such a net says so by setting ``embedding_dim``. Either way the vector is L2-normalised here, so that
inner product, cosine similarity and Euclidean distance all rank the same way (``|a - b|^2 = 2 - 2 a.b``).

The wrapper's flip TTA is not applied: an embedding of a flip average would be a different function from the one
a single query image gets. A model without the contract (ONNX, TorchScript sources) cannot embed and is refused in
one line. Every embedding records which kind it is, its dimension, and the run's name and weights hash (the first
12 hex digits of the weights file's sha256, the version string ``pupil serve`` reports), so that an index never
answers a query embedded by another model.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pupil.data.images import CONVERSIONS, convert_channels
from pupil.errors import PupilError
from pupil.io import sha256_file
from pupil.runtime import resolve_device

if TYPE_CHECKING:
    from pupil.data import ImageDataset
    from pupil.data.images import LazyImages
    from pupil.run import Run

EMBEDDINGS = ("penultimate", "metric")
CONTRACT = ("forward_features", "forward_head")


@dataclass(frozen=True)
class EmbeddingInfo:
    """What produced a set of embeddings: an index records it and refuses queries from anything else."""

    kind: str
    """penultimate (a classifier's pooled pre-logit features) or metric (a metric-learned embedding head)."""
    dim: int
    """Length of each vector."""
    run: str
    """The run's name (its directory's name)."""
    weights_sha256: str
    """First 12 hex digits of the sha256 of the run's weights file (``pupil serve``'s version string)."""
    input_shape: tuple[int, int, int]
    """(C, H, W) the model takes; query images are converted to it."""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_shape": list(self.input_shape)}


def weights_sha256(run: Run) -> str:
    """The run's weights hash: as ``pupil.serve.models.weights_version`` computes it from the weights file, as
    ``pupil.sources`` recorded it for a model pupil did not train, else a hash of the state dict."""
    recorded = (run.info.get("source") or {}).get("weights_sha256")
    if recorded:
        return recorded
    if run.weights_file is not None and run.weights_file.is_file():
        return sha256_file(run.weights_file)[:12]
    h = hashlib.sha256()
    state = run.model.net.state_dict()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:12]


def feature_net(run: Run) -> torch.nn.Module:
    """The run's network, checked for the feature contract; raises PupilError in one line when it lacks it."""
    if run.model is None:
        raise PupilError(f"run {run.name} was read without its model; load it with load_run(path)")
    net = getattr(run.model, "net", None)
    source = run.info.get("source") or {}
    if net is None or source.get("features") is False or not all(callable(getattr(net, a, None)) for a in CONTRACT):
        kind = f" ({source['kind']} model)" if source.get("kind") else ""
        raise PupilError(
            f"{run.name}{kind} cannot embed images: search needs a PyTorch model with the feature contract "
            "(forward_features, forward_head(pre_logits=True)); ONNX and TorchScript models do not keep it"
        )
    return net


def input_shape(run: Run) -> tuple[int, int, int]:
    shape = run.info["data"].get("input_shape")
    if not shape:  # a source opened from elsewhere records its channels and crop
        m = run.info["model"]
        shape = [m["in_chans"], m["img_size"], m["img_size"]]
    return tuple(int(s) for s in shape)


def embedding_info(run: Run) -> EmbeddingInfo:
    """Kind, dimension and identity of the run's embeddings (no forward pass)."""
    net = feature_net(run)
    metric = isinstance(getattr(net, "embedding_dim", None), int)
    dim = int(net.embedding_dim if metric else net.num_features)
    return EmbeddingInfo("metric" if metric else "penultimate", dim, run.name, weights_sha256(run), input_shape(run))


class Embedder:
    """A run's model set up once to embed batches: ``embedder(x)`` takes uint8 (N, C, H, W) or float [0, 1]
    images of the run's input shape and gives float32 (N, D) unit vectors; ``embed`` takes any size or number
    of images, converting them first (counted in ``conversions``)."""

    def __init__(self, run: Run, device: str | torch.device = "auto", batch_size: int = 256):
        self.net = feature_net(run).eval()
        self.info = embedding_info(run)
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = run.model.to(self.device).eval()
        self.channels_last = bool((run.info.get("runtime") or {}).get("channels_last"))
        self.batch_size = max(1, batch_size)
        self.conversions = dict.fromkeys(CONVERSIONS, 0)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z = self.net.forward_head(self.net.forward_features(self.model.normalize(x)), pre_logits=True)
        if z.ndim != 2 or z.shape[1] != self.info.dim:
            raise PupilError(
                f"{self.info.run} gave embeddings of shape {tuple(z.shape)}, not (N, {self.info.dim}) "
                f"({'embedding_dim' if self.info.kind == 'metric' else 'num_features'} says {self.info.dim})"
            )
        z = F.normalize(z.float(), dim=1)
        if not torch.isfinite(z).all():
            raise PupilError(f"{self.info.run} produced non-finite embeddings")
        return z.cpu().numpy()

    def fit(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) converted to the run's channels and size, as the loaders convert files:
        channels first (grey repeated, RGB to luma), then a bilinear, antialiased resize; each is counted."""
        c, h, w = self.info.input_shape
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise PupilError(f"images must be uint8 (N, C, H, W), not {images.dtype} {tuple(images.shape)}")
        x = convert_channels(images, c, self.conversions)
        if tuple(x.shape[-2:]) != (h, w):
            from torchvision.transforms.v2 import functional as TF

            self.conversions["resized"] += len(x)
            x = TF.resize(x, [h, w], antialias=True)
        return x

    def embed(self, images: torch.Tensor | LazyImages | ImageDataset, progress: bool = False) -> np.ndarray:
        """Unit vectors (N, D) float32 for every image, in order, ``batch_size`` at a time."""
        from pupil.data import ImageDataset

        pixels = images.images if isinstance(images, ImageDataset) else images
        out = np.empty((len(pixels), self.info.dim), np.float32)
        done = 0
        with _bar(progress, len(pixels), f"embedding with {self.info.run}") as advance:
            for chunk in pixels.split(self.batch_size):
                z = self(self.fit(chunk))
                out[done : done + len(z)] = z
                done += len(z)
                advance(len(z))
        return out


def embed(
    run: Run,
    images: torch.Tensor | LazyImages | ImageDataset,
    *,
    batch: int = 256,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> np.ndarray:
    """L2-normalised embeddings float32 (N, D) of uint8 images (N, C, H, W) or a dataset, through the run's
    penultimate features or its metric embedding (``embedding_info(run)`` says which, with the dim and the run's
    name and weights hash). Images of another size or channel count are converted to the run's input.

    Raises PupilError (one line) for a model without the feature contract (ONNX, TorchScript)."""
    return Embedder(run, device, batch).embed(images, progress)


class _bar:
    """A rich progress bar over ``total`` images, or nothing when ``show`` is false; yields ``advance(n)``."""

    def __init__(self, show: bool, total: int, what: str):
        self.show, self.total, self.what, self.progress = show, total, what, None

    def __enter__(self):
        if not self.show:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
        )
        self.progress.start()
        task = self.progress.add_task(self.what, total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False
