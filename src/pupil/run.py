"""A run directory, read back: ``run.json`` and ``model.safetensors`` give a model that takes [0, 1] pixels.

Loading never unpickles: weights come from safetensors and the architecture is rebuilt by name from
the registry with the keyword arguments recorded in ``run.json``. A compressed run (``pupil compress``) loads its
deployed artefact instead (``pupil.compress.export.load_artefact``).
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pupil.errors import PupilError
from pupil.io import read_json

if TYPE_CHECKING:
    from pupil.config import Config
    from pupil.data import ImageDataset
    from pupil.models import PixelModel

REQUIRED_INFO = ("model", "data", "config", "status")
LOCK_FILE = ".pupil.lock"
# Everything pupil writes in a run directory; ``--overwrite`` removes these and nothing else.
RUN_FILES = (
    "run.json",
    "model.safetensors",
    "model.onnx",  # pupil compress's artefacts (pupil.compress.export.ARTEFACTS)
    "model.torchscript.pt",
    "model.pt2",
    "checkpoint.pt",
    "metrics.jsonl",
    "results.json",
    "report.html",
    "model_card.md",
    "bad_images.json",
    LOCK_FILE,
)
RUN_DIRS = ("audit",)


def is_run_file(path: Path) -> bool:
    """Whether pupil wrote ``path`` (a direct child of a run directory), including half-written temporaries."""
    name = path.name
    if path.is_dir() and not path.is_symlink():
        return name in RUN_DIRS
    if name in RUN_FILES or (name.startswith("eval_") and name.endswith(".json")):
        return True
    # io.atomic_write's temporaries: ".<final name>.<random>.tmp"
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> bool:
    """Check that ``run_dir`` may take a new run and create it; returns whether it was created now.

    A folder that holds anything pupil did not write is refused, with or without ``overwrite``: pupil never
    deletes or mixes itself into a user's files. An earlier run there needs ``overwrite``; the caller then
    removes it with ``clear_run_files`` once it holds the run's lock.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise PupilError(f"{run_dir} exists and is not a folder")
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        return True
    entries = sorted(run_dir.iterdir())
    if foreign := [p.name for p in entries if not is_run_file(p)]:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PupilError(
            f"{run_dir} holds files pupil did not write ({shown}); pupil will not train into it or remove them: "
            "choose another --name or --out"
        )
    if not overwrite and any(p.name in ("run.json", "checkpoint.pt") for p in entries):
        raise PupilError(f"run directory {run_dir} exists; use --resume {run_dir}, --overwrite or --name")
    return False


def clear_run_files(run_dir: Path) -> None:
    """Remove exactly what ``is_run_file`` recognises (the lock file stays: its holder is the caller)."""
    for p in sorted(run_dir.iterdir()):
        if p.name == LOCK_FILE or not is_run_file(p):
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def remove_if_empty(run_dir: Path) -> None:
    """Remove a run folder that this process created and that holds nothing but pupil's lock file."""
    if run_dir.is_dir() and all(p.name == LOCK_FILE for p in run_dir.iterdir()):
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        run_dir.rmdir()


@contextmanager
def run_lock(run_dir: Path, doing: str):
    """Hold an exclusive lock on ``run_dir`` while ``doing`` (training, auditing); a second pupil process
    that wants the same run gets a clear error instead of racing the first one's writes. The lock is an
    ``flock`` on ``.pupil.lock``, released by the system when a process dies, so it never goes stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (documented in the README)
        yield
        return
    path = run_dir / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise PupilError(f"{run_dir} is busy: {holder}; wait for it to finish") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} is {doing} it since {time.strftime('%H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def environment() -> dict[str, str]:
    """Versions that matter for reproducing a run."""
    import numpy
    import timm
    import torchvision

    from pupil import __version__

    return {
        "pupil": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
    }


@dataclass
class Run:
    """A trained run: its directory, its ``run.json`` (``info``) and, when loaded, its wrapped model."""

    dir: Path
    info: dict[str, Any]
    model: torch.nn.Module | None = field(default=None, repr=False)
    splits: Callable[[str], ImageDataset] | None = field(default=None, repr=False)
    """For a model pupil did not train (``pupil.sources``): its data, split and decoded to the model's input."""
    weights_file: Path | None = None
    max_memory: int | None = None
    """Bytes a split may take decoded; a larger folder or manifest is streamed (``pupil.data.images.LazyImages``)."""

    @property
    def classes(self) -> list[str]:
        return self.info["data"]["classes"]

    @property
    def name(self) -> str:
        return self.dir.name

    def summary(self) -> dict[str, Any]:
        return self.info.get("history", {})

    def split(self, split: str, data_dir: str | None = None):
        """A split of the run's dataset, carved exactly as in training (same val size and seed).

        ``data_dir`` points at the data on purpose: the folder of a registered dataset's files, or the image
        folder or CSV manifest itself. Without it the data must be what the run was trained on: its
        fingerprint (file count, names and sizes) is compared with the one in run.json.

        Raises PupilError when the data changed, or its classes or image shape disagree with the run's.
        """
        from pupil.data import DATASETS, load

        if self.splits is not None:
            return self.splits(split)
        d, cfg = self.info["data"], self.info["config"]
        name, folder = d["dataset"], d.get("data_dir")
        if data_dir:
            name, folder = (name, data_dir) if name in DATASETS else (data_dir, folder)
        elif name not in DATASETS and not Path(name).exists():
            raise PupilError(
                f"the run's data {name} is not there (from {Path.cwd()}); pass --data-dir with its new location"
            )
        ds = load(
            name,
            split,
            data_dir=folder,
            val_size=cfg["data"]["val_size"],
            seed=cfg["train"]["seed"],
            img_size=cfg["data"].get("img_size"),
            on_bad_image=cfg["data"].get("on_bad_image", "fail"),
            min_per_class=cfg["data"].get("min_per_class", 1),
            max_memory=self.max_memory,
        )
        recorded, found = d.get("fingerprint"), ds.meta.get("fingerprint")
        ds.meta["matches_training"] = None if recorded is None or found is None else recorded == found
        if ds.meta["matches_training"] is False and not data_dir:
            raise PupilError(
                f"the data at {name} changed since the run was trained ({found['files']} files, fingerprint "
                f"{found['sha256']}; run.json records {recorded['files']} files, {recorded['sha256']}); "
                "pass --data-dir to use it anyway"
            )
        if ds.classes != self.classes:
            raise PupilError(f"the {split} split's classes {ds.classes} do not match the run's {self.classes}")
        if list(ds.shape) != d["input_shape"]:
            raise PupilError(f"the {split} images are {list(ds.shape)} but the run was trained on {d['input_shape']}")
        return ds


def run_info(
    cfg: Config,
    status: str,
    history: dict[str, Any],
    *,
    train: ImageDataset,
    val: ImageDataset | None,
    model: PixelModel,
    device: torch.device,
    dtype: torch.dtype | None,
    threads: int,
    channels_last: bool,
) -> dict[str, Any]:
    """run.json's content for a run in ``status`` (running, interrupted, failed or finished); ``read_info`` and
    ``load_run`` read it back. ``history`` is the training summary (``Run.summary``); ``model`` is the trained
    ``PixelModel`` (its net's parameters are counted, its normalisation recorded)."""
    return {
        "schema": 1,
        "status": status,
        "model": {
            "name": cfg.model.model,
            "kwargs": dict(cfg.model.model_args, drop_rate=cfg.model.drop_rate),
            "num_classes": len(train.classes),
            "in_chans": train.shape[0],
            "img_size": train.shape[1],
            "params": sum(p.numel() for p in model.net.parameters()),
        },
        "data": {
            "dataset": cfg.data.dataset,
            "data_dir": cfg.data.data_dir,
            "classes": train.classes,
            "input_shape": list(train.shape),
            "mean": model.mean.flatten().tolist(),
            "std": model.std.flatten().tolist(),
            "train_size": len(train),
            "val_size": len(val) if val is not None else 0,
            "conversions": train.meta.get("conversions", {}),
            "fingerprint": train.meta.get("fingerprint"),
            "classes_from": train.meta.get("classes_from", "the dataset"),
            "bad_images": len(train.meta.get("bad_images", [])),
        },
        "tta": cfg.train.tta,
        "config": cfg.to_dict(),
        "seed": cfg.train.seed,
        "runtime": {
            "device": str(device),
            "precision": str(dtype or "fp32"),
            "threads": threads,
            "channels_last": channels_last,
        },
        "versions": environment(),
        "history": history,
    }


def read_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not run_dir.is_dir():
        raise PupilError(f"run directory {run_dir} does not exist")
    info = read_json(path, f"{run_dir} is not a run directory: run.json is missing")
    if not isinstance(info, dict) or (missing := [k for k in REQUIRED_INFO if k not in info]):
        raise PupilError(f"corrupt {path}: missing {', '.join(missing) if isinstance(info, dict) else 'everything'}")
    return info


def load_run(path: str | Path, device: str | torch.device = "cpu", load_model: bool = True) -> Run:
    """Read a run directory; with ``load_model`` rebuild the model and load its weights.

    A run that ``pupil compress`` wrote (run.json has a ``compressed`` section) gets its deployed artefact instead:
    an ONNX Runtime session, a TorchScript or torch.export program, or the network in bf16 (``pupil.compress``).

    Raises PupilError naming the problem when a file is missing or corrupt, or when the weights do
    not fit the architecture or class list that run.json records.
    """
    from pupil.models import PixelModel

    run_dir = Path(path)
    info = read_info(run_dir)
    run = Run(run_dir, info)
    if not load_model:
        return run
    if "compressed" in info:  # pupil compress's output: the model is the deployed artefact
        from pupil.compress.export import load_artefact

        run.model, run.weights_file = load_artefact(run_dir, info, torch.device(device))
        return run
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise PupilError(f"{run_dir} has no model.safetensors (the run never finished an epoch)")
    m, d = info["model"], info["data"]
    if len(d["classes"]) != m["num_classes"]:
        raise PupilError(f"{run_dir}/run.json lists {len(d['classes'])} classes but the model has {m['num_classes']}")
    net = rebuild_net(info, weights, f"{run_dir}/run.json")
    run.weights_file = weights
    run.model = PixelModel(net, d["mean"], d["std"], tta=info.get("tta", False)).to(device).eval()
    return run


def rebuild_net(info: dict[str, Any], weights: Path, where: str) -> torch.nn.Module:
    """The registered network ``info["model"]`` names, built with its recorded arguments, with the tensors of the
    safetensors file ``weights`` loaded (floating-point ones as fp32, whatever dtype they were stored in).

    Raises PupilError naming the problem: model kwargs that clash with the recorded shape (``where`` names the file
    that records them), a corrupt file, a tensor missing, of another shape (a different class list), or extra."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pupil.models import create

    m = info["model"]
    if clash := {"num_classes", "in_chans", "img_size"} & set(m.get("kwargs", {})):
        raise PupilError(f"{where}: model kwargs may not set {', '.join(sorted(clash))}")
    net = create(
        m["name"], num_classes=m["num_classes"], in_chans=m["in_chans"], img_size=m["img_size"], **m.get("kwargs", {})
    )
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise PupilError(f"corrupt weights {weights}: {e}") from None
    expected = net.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise PupilError(f"{weights} lacks the tensor {key} that {m['name']} needs")
        if state[key].shape != value.shape:
            raise PupilError(
                f"{weights}: {key} has shape {tuple(state[key].shape)} but {m['name']} with "
                f"{m['num_classes']} classes needs {tuple(value.shape)} (does the class list match the checkpoint?)"
            )
    if extra := set(state) - set(expected):
        raise PupilError(f"{weights} holds tensors that {m['name']} does not have: {', '.join(sorted(extra)[:3])}")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net
