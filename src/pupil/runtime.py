"""What training, the audit, prediction and serving all need from the machine: the device, the precision,
threads, seeds, and the conversion of uint8 batches into model input."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pupil.errors import PupilError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PupilError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PupilError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and measured ~10x slower than fp32 (benchmarks/train_fmnist.py)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISIONS = ("fp32", "bf16", "auto")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32; ``auto`` is bf16 where the device is fast at it."""
    if precision not in PRECISIONS:
        raise PupilError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return torch.bfloat16 if fast else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def seed_everything(seed: int) -> None:
    """Seed torch, numpy (timm's Mixup draws from it) and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def setup_threads(threads: int) -> int:
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1] on ``device``."""
    x = images.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
