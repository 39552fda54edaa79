"""A run directory, read back: ``run.json`` and ``model.safetensors`` give a model that takes [0, 1] pixels.

Loading never unpickles: weights come from safetensors and the architecture is rebuilt by name from
the registry with the keyword arguments recorded in ``run.json``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pupil.errors import PupilError
from pupil.io import read_json

REQUIRED_INFO = ("model", "data", "config", "status")


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

        Raises PupilError when the data's classes or image shape disagree with what the run was trained on.
        """
        from pupil.data import load

        d, cfg = self.info["data"], self.info["config"]
        ds = load(
            d["dataset"],
            split,
            data_dir=data_dir or d.get("data_dir"),
            val_size=cfg["data"]["val_size"],
            seed=cfg["train"]["seed"],
            img_size=cfg["data"].get("img_size"),
        )
        if ds.classes != self.classes:
            raise PupilError(f"the {split} split's classes {ds.classes} do not match the run's {self.classes}")
        if list(ds.shape) != d["input_shape"]:
            raise PupilError(f"the {split} images are {list(ds.shape)} but the run was trained on {d['input_shape']}")
        return ds


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

    Raises PupilError naming the problem when a file is missing or corrupt, or when the weights do
    not fit the architecture or class list that run.json records.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pupil.models import PixelModel, create

    run_dir = Path(path)
    info = read_info(run_dir)
    run = Run(run_dir, info)
    if not load_model:
        return run
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise PupilError(f"{run_dir} has no model.safetensors (the run never finished an epoch)")
    m, d = info["model"], info["data"]
    if len(d["classes"]) != m["num_classes"]:
        raise PupilError(f"{run_dir}/run.json lists {len(d['classes'])} classes but the model has {m['num_classes']}")
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
    net.load_state_dict(state)
    model = PixelModel(net, d["mean"], d["std"], tta=info.get("tta", False)).to(device).eval()
    run.model = model
    return run
