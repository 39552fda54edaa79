"""int8: post-training static quantization calibrated on the validation split (never the test split).

Two back ends, both measured by ``benchmarks/compress.py`` against the fastest fp32 PyTorch form of the same model:

- ONNX Runtime's ``quantize_static`` on the exported fp32 graph: activation ranges by min/max over the calibration
  images, uint8 activations and per-channel int8 weights (U8S8), in the QDQ format (QuantizeLinear/DequantizeLinear
  pairs that the runtime fuses into integer kernels). Variants, as the method's options (``int8:keep_ends,...``):
  ``qoperator`` (QLinearConv and friends instead of QDQ pairs), ``reduce_range`` (7-bit weights, for CPUs without
  VNNI), ``u8u8`` (unsigned weights too), ``keep_ends`` (the first and the last layer stay fp32: a one- or
  three-channel first convolution and the classifier gain little from int8 and lose the most accuracy to it),
  ``per_tensor`` (one weight scale per layer) and ``dynamic`` (weights only, activations quantized on the fly per
  batch, no calibration: for the linear-heavy transformer families).
- torchao's PT2E flow (``int8:torchao``; ``torch.ao.quantization`` is deprecated and torchao is its successor) with
  the x86 Inductor quantizer: the program is captured with ``torch.export``, observed on the calibration images,
  converted, and saved as a ``torch.export`` archive that Inductor compiles (with weight freezing) when loaded.

Which is the default is a measurement (``DEFAULT``; the numbers are in README's Compression section), recorded in
every compressed run's ``run.json`` with the int8/fp32 speed ratio measured while compressing.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pupil.compress.export import _require_torchao, export_program, quiet
from pupil.errors import PupilError
from pupil.extras import require

OPTIONS = {
    "qdq": "QDQ format, per-channel U8S8, every layer int8 (ONNX Runtime's recommended setting)",
    "qoperator": "QOperator format (QLinearConv, QLinearMatMul) instead of QDQ pairs",
    "reduce_range": "7-bit weights, for CPUs without VNNI",
    "u8u8": "unsigned int8 weights as well as activations",
    "keep_ends": "the first and the last quantizable layer stay fp32",
    "per_tensor": "one weight scale per layer instead of one per output channel",
    "dynamic": "dynamic quantization: int8 weights, activations quantized per batch, no calibration",
    "torchao": "torchao PT2E with the x86 Inductor quantizer, saved as a torch.export archive",
}
DEFAULT = ("keep_ends",)
"""The options plain ``int8`` means (chosen from benchmarks/compress.py's measurements)."""


@dataclass
class Int8:
    """One int8 setting, parsed from ``int8[:OPTION,...]``."""

    backend: str = "onnxruntime"
    quant_format: str = "qdq"
    per_channel: bool = True
    reduce_range: bool = False
    weights: str = "s8"
    activations: str = "u8"
    keep_ends: bool = False
    dynamic: bool = False
    options: list[str] = field(default_factory=list)

    @property
    def fmt(self) -> str:
        return "pt2" if self.backend == "torchao" else "onnx"

    def record(self) -> dict[str, Any]:
        return asdict(self)


def parse_int8(spec: str) -> Int8:
    """``int8`` (the ``DEFAULT`` options), or ``int8:OPTION[,OPTION...]`` with options from ``OPTIONS``."""
    _, _, rest = spec.partition(":")
    options = [o.strip() for o in rest.split(",") if o.strip()] if rest else list(DEFAULT)
    if unknown := [o for o in options if o not in OPTIONS]:
        raise PupilError(f"unknown int8 option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    s = Int8(options=options)
    for o in options:
        if o == "qoperator":
            s.quant_format = "qoperator"
        elif o == "reduce_range":
            s.reduce_range = True
        elif o == "u8u8":
            s.weights = "u8"
        elif o == "keep_ends":
            s.keep_ends = True
        elif o == "per_tensor":
            s.per_channel = False
        elif o == "dynamic":
            s.dynamic, s.activations = True, "dynamic"
        elif o == "torchao":
            s.backend, s.weights, s.activations = "torchao", "s8", "u8"
    if s.backend == "torchao" and len(options) > 1:
        raise PupilError("int8:torchao takes no other option (the others are ONNX Runtime's)")
    if s.dynamic and (s.quant_format == "qoperator" or s.keep_ends):
        raise PupilError("int8:dynamic quantizes MatMul and Gemm weights only; it takes no qoperator or keep_ends")
    return s


def end_layers(path: Path) -> dict[str, str]:
    """The first and the last Conv/Gemm/MatMul node of an ONNX graph (its nodes are in execution order), by node
    name, each with the PyTorch layer it came from (the exporter's ``name_scopes`` metadata) where recorded."""
    import ast

    import onnx

    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    out = {}
    for n in [nodes[0], nodes[-1]][: min(2, len(nodes))] if nodes else []:
        meta = {p.key: p.value for p in n.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        layer = scopes[-2].removeprefix("net.") if len(scopes) >= 2 else ""  # [..., module, aten op]
        out[n.name] = f"{n.name} ({layer})" if layer else n.name
    return out


def quantize_onnx(fp32: Path, out: Path, calib: torch.Tensor, s: Int8, work: Path) -> dict[str, Any]:
    """Quantize the fp32 ONNX graph at ``fp32`` into ``out``, calibrated on ``calib`` ([0, 1] pixels, N x C x H x W).
    ``work`` takes the shape-inferred intermediate graph. Returns what was done: the layers kept in fp32, the
    calibration method and image count, onnxruntime's version."""
    require(["onnxruntime", "onnx"], "int8 quantization with ONNX Runtime", "onnx")
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        """The calibration images in batches of 64, as ONNX Runtime's calibrator asks for them."""

        def __init__(self) -> None:
            self.batches = iter(calib.split(64))

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch.float().contiguous().numpy()}

    pre = work / "prepared.onnx"
    with quiet():  # symbolic shape inference and ONNX Runtime's basic optimisations, as the quantizer recommends
        quant_pre_process(str(fp32), str(pre))
    kept = end_layers(pre) if s.keep_ends else {}
    weight = QuantType.QUInt8 if s.weights == "u8" else QuantType.QInt8
    try:
        with quiet():
            if s.dynamic:
                quantize_dynamic(
                    str(pre), str(out), weight_type=weight, per_channel=s.per_channel, reduce_range=s.reduce_range
                )
            else:
                quantize_static(
                    str(pre),
                    str(out),
                    Reader(),
                    quant_format=QuantFormat.QOperator if s.quant_format == "qoperator" else QuantFormat.QDQ,
                    per_channel=s.per_channel,
                    reduce_range=s.reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=weight,
                    nodes_to_exclude=list(kept),
                    calibrate_method=CalibrationMethod.MinMax,
                )
    except Exception as e:  # onnxruntime's quantizer raises plain Exceptions on graphs it cannot handle
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise PupilError(f"ONNX Runtime could not quantize the exported model: {first}") from None
    return {
        "onnxruntime": onnxruntime.__version__,
        "fp32_layers": list(kept.values()),
        "calibration_method": None if s.dynamic else "minmax",
        "calibration_images": 0 if s.dynamic else len(calib),
    }


def quantize_torchao(model: nn.Module, calib: torch.Tensor, example: torch.Tensor, what: str):
    """torchao PT2E int8 of ``model`` (takes [0, 1] pixels) with the x86 Inductor quantizer, observed on ``calib``.
    Returns the converted program (``torch.export.save`` writes it) and a record."""
    _require_torchao("int8:torchao")
    import torchao
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    cl = torch.channels_last  # the x86 int8 convolutions work in channels-last
    model = copy.deepcopy(model).eval().to(memory_format=cl)
    program = export_program(model, example.clone().contiguous(memory_format=cl), what)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    try:
        with quiet():
            prepared = prepare_pt2e(program.module(), quantizer)
            with torch.no_grad():
                for chunk in calib.split(64):
                    prepared(chunk.float().contiguous(memory_format=cl))
            converted = convert_pt2e(prepared)
    except Exception as e:  # torchao's passes on the user's graph
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise PupilError(f"torchao could not quantize {what}: {first}") from None
    # example.clone(): torch.export stores its example inputs, and a view would drag the whole split along
    final = export_program(converted, example.clone().contiguous(memory_format=cl), what)
    return final, {
        "torchao": torchao.__version__,
        "calibration_method": "the x86 Inductor quantizer's default observers",
        "fp32_layers": [],
    }
