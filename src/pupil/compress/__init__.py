"""``pupil compress``: a run's model exported, quantized or pruned, written as a run directory of its own whose model
is the deployed artefact, so that ``pupil audit`` and ``pupil compare`` treat it like any run.

The new directory keeps the base run's ``data``, ``config``, ``tta`` and ``model`` sections (so ``run.split()``
carves the very same validation and test images, and the paired comparison with the base is valid), and adds:

- ``compressed``: the base run (name, path, weights sha256), the method and its settings, the artefact (file,
  format, dtype, sha256, bytes), the calibration split and size, the versions of torch and onnxruntime, the
  check of the artefact against the base model on the validation split (top-1 of both, agreement, largest logit
  difference) and, for int8 through ONNX Runtime, its speed against the fp32 ONNX graph measured while compressing;
- ``source``: what the audit needs to know about a model it did not see trained (as ``pupil.sources`` records it
  for ``onnx:FILE``): whether gradients flow through it (not through an ONNX Runtime session or a compiled int8
  program: the adversarial, explain and OOD checks then take their gradient-free paths), whether it keeps the
  feature contract, and notes that reach the card.

The directory is built in a hidden temporary sibling and renamed into place when complete: it appears whole or not
at all. An existing ``out`` is refused unless ``overwrite``, and even then only when it holds nothing but files pupil
writes (``pupil.run.is_run_file``); the old directory is removed only once the new one is in place.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from pupil.errors import PupilError
from pupil.run import Run

CALIB_SIZE = 512
"""Validation images int8 calibration observes by default (ONNX Runtime's and torchao's observers settle well
before that on the zoo's CNNs)."""


def compress_run(
    run_dir: str | Path,
    method: str,
    out: str | Path,
    *,
    fmt: str | None = None,
    calib_size: int = CALIB_SIZE,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    max_minutes: float = 5.0,
    seed: int = 0,
    progress: bool = True,
) -> Run:
    """Compress the run at ``run_dir`` with ``method`` into the run directory ``out`` and return it, loaded.

    ``method``: ``export`` (no compression; give ``fmt``), ``bf16`` or ``fp16`` (the network in that precision,
    where the hardware runs it natively), ``int8`` or ``int8:OPTION,...`` (``pupil.compress.quantize.OPTIONS``),
    or ``prune:RATIO`` (``pupil.compress.prune``; ``max_minutes`` is its fine-tune budget). ``fmt``: ``onnx``,
    ``torchscript``, ``pt2`` or ``safetensors`` (default: onnx for export, int8 and prune; safetensors for bf16 and
    fp16; pt2 for int8:torchao).
    ``calib_size``: validation images that int8 calibrates on (never test images). ``device``: where pruning
    fine-tunes and where the loaded result runs; export and quantization run on the CPU.

    Raises PupilError (one line) for an unknown method, option or format, a combination that does not exist (bf16
    ONNX), a precision the hardware does not run natively, a missing onnxruntime, torchao or torch-pruning, a run
    without a validation split to calibrate on, a model that cannot be exported (naming the layer), an ``out``
    that exists without ``overwrite`` or that holds files pupil did not write.
    """
    from pupil.compress.export import Job, check_out, publish, steps
    from pupil.run import load_run, read_info
    from pupil.runtime import resolve_device

    run_dir, out = Path(run_dir), Path(out)
    job = Job.parse(method, fmt, calib_size)
    check_out(out, overwrite, run_dir)
    dev = resolve_device(str(device))
    job.check_environment(dev)
    info = read_info(run_dir)
    if "compressed" in info:
        base = info["compressed"]["base"]["path"]
        raise PupilError(f"{run_dir} is already a compressed run (of {base}); compress its base run instead")
    base = load_run(run_dir, device="cpu")
    val = job.validation(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with steps(progress) as step:
            job.build(base, val, tmp, dev, step, max_minutes=max_minutes, seed=seed, progress=progress)
        publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_run(out, device=dev)
