"""Resume state and weights on disk.

``checkpoint.pt`` holds only tensors, numbers and strings, and is read with ``weights_only=True``
so that loading a run never unpickles code. ``model.safetensors`` holds the weights alone.
Both are written to a temporary name and renamed.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from pupil.errors import PupilError
from pupil.io import atomic_write


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],  # the cached normal that beta/gamma draws use
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], *state["numpy_gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise PupilError(f"no resume state at {path}: the run never finished an epoch or was not trained by pupil")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise PupilError(f"corrupt checkpoint {path}: {type(e).__name__}") from None
        # torch's message suggests retrying with weights_only=False, which would run whatever code the file
        # carries; pupil never does that, so the message must not suggest it either.
        raise PupilError(
            f"refusing to load {path}: it holds Python objects other than tensors and numbers, so pupil did "
            "not write it (loading it could run code)"
        ) from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PupilError(f"corrupt checkpoint {path}: {first}") from None


def save_weights(path: Path, model: torch.nn.Module) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
