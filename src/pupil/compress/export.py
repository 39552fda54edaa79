"""A run's model as a deployed artefact: ONNX (for ONNX Runtime), TorchScript, a ``torch.export`` archive, or
safetensors in fp32, fp16 or bf16; and the artefact read back as a model that takes [0, 1] pixels.

What is exported is the pixel-space model without test-time augmentation: the run's normalisation sits inside the
graph, so an ONNX or TorchScript file takes [0, 1] pixels on its own and a deployment cannot forget the mean and
std. Flip TTA stays outside the file: ``Deployed``, the wrapper ``pupil.load_run`` returns, averages over the image
and its mirror in one batched call exactly as ``PixelModel(tta=True)`` does, so that the audit's checks that look
at one view at a time (the uncertainty check's TTA source) still see the network alone.

ONNX goes through the torch.export-based exporter (torch 2.9's default; the TorchScript-based one is deprecated).
On the zoo's CNNs both exporters gave the same graph after the new one's optimisation (convolutions with batch norm
folded in, one Sub and one Div for the normalisation), and every tiny variant in the registry exported with both;
the new one takes seconds instead of tenths of a second, which a one-off export affords. The program is captured
with ``torch.export`` first and converted second, so that a failure names the layer: a capture failure by the
module whose ``forward`` raised, a conversion failure by the module the untranslatable operator came from.

bf16 and fp16 artefacts run in that precision (weights and activations), not under autocast; they are offered only
where the hardware computes in it natively (``native_dtype``). On a CPU, bf16 needs AVX512-BF16 or AMX and fp16
needs AMX-FP16: AVX512-FP16 alone measured slower than fp32 in PyTorch's convolutions.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pupil.errors import PupilError
from pupil.extras import require
from pupil.io import sha256_file
from pupil.models.contract import PixelModel

FORMATS = ("onnx", "torchscript", "pt2", "safetensors")
ARTEFACTS = {
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
    "pt2": "model.pt2",
    "safetensors": "model.safetensors",
}
OPSET = 18
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# Modules


class Deployed(PixelModel):
    """A ``PixelModel`` whose network is a deployed artefact that normalises its input itself.

    ``normalize`` is the identity because the artefact takes [0, 1] pixels; ``mean`` and ``std`` still hold the
    run's statistics (the certify check reports its noise in normalised units from them). Flip TTA is done here,
    as in ``PixelModel``: one call on (images, mirrors), logits averaged.
    """

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Fixed(nn.Module):
    """A network whose precision is part of the artefact: ``float()`` and ``half()`` leave it as it is.

    The efficiency check counts FLOPs on ``model.net.float()``, which would otherwise turn a bf16 artefact into an
    fp32 model for every check after it.
    """

    def float(self) -> Fixed:
        return self

    def half(self) -> Fixed:
        return self


class Cast(Fixed):
    """A registered network kept in ``dtype``: input cast in, logits cast back to float32. Keeps the feature
    contract and the Grad-CAM layer, so every check of the audit runs on it."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net = net.to(dtype)
        self.dtype = dtype
        self.num_classes = net.num_classes
        for attr in ("num_features", "feature_grid", "num_prefix_tokens"):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))
        if isinstance(getattr(net, "gradcam_layer", None), str):
            self.gradcam_layer = f"net.{net.gradcam_layer}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.dtype)).float()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x.to(self.dtype)).float()  # feature statistics are computed in float32

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(x.to(self.dtype), pre_logits=pre_logits).float()


class Pixels(nn.Module):
    """What is exported: [0, 1] pixels (float32) -> normalised -> the network in ``dtype`` -> float32 logits."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.net = net.to(dtype)
        self.dtype = dtype
        self.register_buffer("mean", mean.detach().clone().float().view(1, -1, 1, 1))
        self.register_buffer("std", std.detach().clone().float().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.dtype == torch.float32:
            return self.net(x)
        return self.net(x.to(self.dtype)).float()


class Scripted(Fixed):
    """A loaded TorchScript artefact (takes pixels); ``num_classes`` is known from run.json."""

    def __init__(self, module: nn.Module, num_classes: int):
        super().__init__()
        self.module = module
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class Compiled(Fixed):
    """A ``torch.export`` archive's module, compiled by Inductor on first use (with weight freezing, which the
    x86 int8 kernels need) and recompiled per input shape: dynamic shapes with freezing failed on torch 2.14's
    quantized convolutions (a stride assertion), static ones did not. No gradients flow through it."""

    def __init__(self, module: nn.Module, num_classes: int, channels_last: bool = True):
        super().__init__()
        self.module = module
        self.num_classes = num_classes
        self.channels_last = channels_last
        self._compiled: Any = None

    def train(self, mode: bool = True) -> Compiled:
        # an exported program's module refuses train() and eval(); it is in eval mode for good
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor

        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.detach().float().contiguous(memory_format=layout)
        first = self._compiled is None
        if first:
            self._compiled = torch.compile(self.module, dynamic=False)
        # The first call compiles (Inductor logs its toolchain search), a new shape recompiles (the int8 lowering
        # warns about its own tensor copies): neither is the user's business.
        with quiet() if first else warnings.catch_warnings(), inductor.patch(freezing=True), torch.no_grad():
            warnings.simplefilter("ignore")
            return self._compiled(x)


# ---------------------------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters: torch.onnx prints its steps on stdout, torch.export prints graphs on stderr and logs
    warnings, TorchScript warns that it is deprecated. A failure is turned into one line by the caller."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def failing_layer(exc: BaseException, model: nn.Module) -> str:
    """Where in ``model`` an export failed, from the exception's tracebacks: the deepest of the model's modules
    whose ``forward`` was running, or the module an untranslatable FX node came from; '' when neither is found."""
    names = {id(m): n for n, m in model.named_modules()}
    where = ""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            local = tb.tb_frame.f_locals
            node = local.get("node")
            if isinstance(node, torch.fx.Node) and node.meta.get("nn_module_stack"):
                path, kind = list(node.meta["nn_module_stack"].values())[-1]
                op = getattr(node.target, "__name__", str(node.target))
                where = f"layer {_layer_name(path)} ({str(kind).rsplit('.', 1)[-1]}) uses {op}"
            elif id(local.get("self")) in names:
                module = local["self"]
                line = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
                where = f"layer {_layer_name(names[id(module)])} ({type(module).__name__}, {line})"
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return where


def _layer_name(path: str) -> str:
    # Pixels wraps the run's network as ``net``; the user knows the layers by the network's own names.
    path = re.sub(r"^(L\['self'\]\.|L__self___)", "", str(path)).removeprefix("net.")
    return path if path and path != "net" else "the network's own forward"


def _first_line(exc: BaseException) -> str:
    """The exception's own summary: torch.onnx's errors open with boilerplate, their cause says what failed."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    return f"{type(root).__name__}: {text[:200]}"


def export_program(model: nn.Module, example: torch.Tensor, what: str) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (in eval mode already: a converted int8 graph refuses ``eval()``) with a dynamic
    batch axis; one line naming the layer when it fails."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with quiet():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # the model's own code: whatever it raises under capture is the reason
        where = failing_layer(e, model)
        raise PupilError(
            f"{what} cannot be exported: torch.export failed{' in ' + where if where else ''}: {_first_line(e)}"
        ) from None


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor, what: str) -> None:
    """Write ``model`` (takes [0, 1] pixels, float32) as ONNX at opset ``OPSET``: input ``pixels`` (N, C, H, W)
    with a dynamic batch axis, output ``logits``, weights inside the file."""
    require(["onnx", "onnxscript"], "ONNX export", "onnx")
    import onnx

    program = export_program(model, example, what)
    try:
        with quiet():
            torch.onnx.export(
                program,
                (example,),
                str(path),
                input_names=["pixels"],
                output_names=["logits"],
                opset_version=OPSET,
                external_data=False,
                dynamo=True,
            )
    except Exception as e:  # torch.onnx's ConversionError and friends: an operator without an ONNX translation
        where = failing_layer(e, model)
        raise PupilError(
            f"{what} cannot be exported to ONNX{': ' + where if where else ''} ({_first_line(e)})"
        ) from None
    graph = onnx.load(str(path))
    for value in (graph.graph.input[0], graph.graph.output[0]):  # the exporter names the axis s0, s31...
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(graph, str(path))


def export_torchscript(model: nn.Module, path: Path, example: torch.Tensor, what: str) -> None:
    """Trace ``model`` into a TorchScript archive (deprecated by PyTorch, still what many C++ deployments load)."""
    try:
        with quiet(), torch.no_grad():
            traced = torch.jit.trace(model.eval(), (example,), check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as e:  # tracing runs the model's own code
        where = failing_layer(e, model)
        raise PupilError(
            f"{what} cannot be traced to TorchScript{' in ' + where if where else ''}: {_first_line(e)}"
        ) from None


def save_weights(net: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """The network's state dict in ``dtype`` (floating tensors only; integer buffers stay) as safetensors."""
    from safetensors.torch import save_file

    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in net.state_dict().items()
    }
    save_file(state, str(path))


# ---------------------------------------------------------------------------------------------------------------
# Hardware


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def native_dtype(dtype: str, device: torch.device) -> str | None:
    """None when ``device`` computes in ``dtype`` natively, else the reason it does not (one clause)."""
    if dtype == "fp32":
        return None
    if device.type == "cuda":
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            return f"{torch.cuda.get_device_name(device)} has no native bf16"
        return None
    flags = cpu_flags()
    if dtype == "bf16" and not {"avx512_bf16", "amx_bf16"} & flags:
        return "this CPU has neither AVX512-BF16 nor AMX-BF16, so bf16 would be emulated (about 10x slower than fp32)"
    if dtype == "fp16" and "amx_fp16" not in flags:
        return "this CPU has no AMX-FP16, and PyTorch's fp16 convolutions measured slower than fp32 without it"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Reading an artefact back


def session_options(threads: int | None = None):
    """ONNX Runtime settings for a deployed model: every graph optimisation (constant folding, Conv+Relu and QDQ
    fusions, layout transforms), ``threads`` intra-op threads (default: torch's, which pupil's ``--threads`` and
    ``runtime.setup_threads`` set, so the efficiency check compares like with like), one inter-op thread and
    sequential execution (the zoo's graphs are chains; parallel branches gain nothing on two cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: no "removing initializer" chatter on stderr
    return opts


def onnx_net(path: Path, device: torch.device, threads: int | None = None) -> nn.Module:
    """``pupil.sources.OnnxNet`` over ``path`` with ``session_options(threads)``."""
    from pupil.sources import OnnxNet

    return OnnxNet(path, device, session_options(threads))  # checks the input layout and counts the initializers


def load_artefact(run_dir: Path, info: dict[str, Any], device: torch.device) -> tuple[PixelModel, Path]:
    """The model of a compressed run (``run.json`` has a ``compressed`` section) and its artefact's path.

    Raises PupilError when the artefact is missing, its sha256 differs from the one recorded, or its format is
    unknown.
    """
    c, m, d = info["compressed"], info["model"], info["data"]
    fmt, path = c.get("format"), run_dir / str(c.get("artefact"))
    if fmt not in FORMATS:
        raise PupilError(f"{run_dir}/run.json: unknown artefact format {fmt!r}; known: {', '.join(FORMATS)}")
    if not path.is_file():
        raise PupilError(f"{run_dir} has no {path.name}, the compressed model its run.json names")
    if c.get("sha256") and sha256_file(path) != c["sha256"]:
        raise PupilError(f"{path} changed since it was written (its sha256 differs from run.json's)")
    tta, k = bool(info.get("tta", False)), m["num_classes"]
    if fmt == "onnx":
        net = onnx_net(path, device)
        net.num_classes = k
        return Deployed(net, d["mean"], d["std"], tta).eval(), path
    if fmt == "torchscript":
        try:
            with quiet():
                module = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as e:
            raise PupilError(f"{path} is not a TorchScript archive: {str(e).splitlines()[0][:200]}") from None
        return Deployed(Scripted(module, k), d["mean"], d["std"], tta).eval(), path
    if fmt == "pt2":
        if c.get("kind") == "int8":  # torchao registers the quantized operators the archive calls
            _require_torchao("loading an int8 torch.export archive")
        try:
            with quiet():
                module = torch.export.load(str(path)).module()
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise PupilError(f"{path} is not a torch.export archive: {str(e).splitlines()[0][:200]}") from None
        return Deployed(Compiled(module, k), d["mean"], d["std"], tta).eval(), path
    return _load_weights(info, path, device), path


def _load_weights(info: dict[str, Any], path: Path, device: torch.device) -> PixelModel:
    """A safetensors artefact: the registered network rebuilt by name, its weights loaded, kept in their dtype."""
    from pupil.run import rebuild_net

    net = rebuild_net(info, path, f"{path.parent}/run.json")
    d = info["data"]
    dtype = DTYPES[info["compressed"].get("dtype", "fp32")]
    net = Cast(net, dtype) if dtype != torch.float32 else net
    return PixelModel(net, d["mean"], d["std"], tta=info.get("tta", False)).to(device).eval()


def _require_torchao(purpose: str) -> None:
    try:
        with quiet():  # torchao 0.18 logs a deprecation warning about its own enum on import
            import torchao  # noqa: F401
    except ImportError:
        raise PupilError(f"{purpose} needs torchao: pip install torchao") from None


# ---------------------------------------------------------------------------------------------------------------
# The compressed run directory

KINDS = ("export", "bf16", "fp16", "int8", "prune")
FORMATS_OF = {
    "export": FORMATS,
    "bf16": ("safetensors", "torchscript"),
    "fp16": ("safetensors", "torchscript"),
    "int8": ("onnx", "pt2"),
    "prune": ("onnx", "torchscript", "pt2"),
}
WHY_NOT = {
    "onnx": "ONNX Runtime's CPU provider has no bf16 or fp16 convolution kernels",
    "pt2": "a torch.export archive is offered for fp32 and int8:torchao",
    "safetensors": "a pruned network no longer has the registered architecture's shapes",
    "torchscript": "int8 comes as ONNX (ONNX Runtime) or as a torch.export archive (int8:torchao)",
}


@dataclass
class Job:
    """What ``compress_run`` was asked to do, checked before any work: the method, its settings and the format."""

    method: str
    kind: str
    fmt: str
    dtype: str = "fp32"
    int8: Any = None
    ratio: float | None = None
    calib_size: int = 512

    @classmethod
    def parse(cls, method: str, fmt: str | None, calib_size: int) -> Job:
        """One line for an unknown method, option or format, or a combination that does not exist."""
        if not isinstance(method, str) or not method.strip():
            raise PupilError(
                f"the method must be one of {', '.join(KINDS)} (int8:OPTIONS, prune:RATIO), not {method!r}"
            )
        method = method.strip()
        kind, _, arg = method.partition(":")
        if kind not in KINDS:
            hint = " (distillation trains a new run: pupil.compress.distill)" if kind == "distill" else ""
            raise PupilError(
                f"unknown compression method {method!r}{hint}; choose export, bf16, fp16, int8[:OPTIONS] or prune:RATIO"
            )
        if fmt is not None and fmt not in FORMATS:
            raise PupilError(f"unknown format {fmt!r}; choose {', '.join(FORMATS)}")
        if isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1:
            raise PupilError(f"the calibration size must be a positive number of images, not {calib_size!r}")
        job = cls(method, kind, fmt or "onnx", calib_size=calib_size)
        if kind in ("export", "bf16", "fp16") and arg:
            raise PupilError(f"{kind} takes no options, not {arg!r}")
        if kind in ("bf16", "fp16"):
            job.dtype, job.fmt = kind, fmt or "safetensors"
        elif kind == "int8":
            from pupil.compress.quantize import parse_int8

            job.int8 = parse_int8(method)
            job.fmt = fmt or job.int8.fmt
            if job.fmt != job.int8.fmt:
                raise PupilError(f"{method} writes {job.int8.fmt}, not {job.fmt}: drop --format or choose the other")
        elif kind == "prune":
            try:
                job.ratio = float(arg)
            except ValueError:
                raise PupilError(
                    f"prune:RATIO needs the share of FLOPs to remove, e.g. prune:0.5, not {method!r}"
                ) from None
            if not 0 < job.ratio < 1:
                raise PupilError(f"the prune ratio is the share of FLOPs to remove and must lie in (0, 1), not {arg}")
        if job.fmt not in FORMATS_OF[kind]:
            raise PupilError(f"{kind} cannot be written as {job.fmt}: {WHY_NOT[job.fmt]}")
        return job

    def check_environment(self, device: torch.device) -> None:
        """One line for a missing package or a precision the hardware does not run natively."""
        if self.fmt == "onnx":
            require(["onnx", "onnxscript", "onnxruntime"], f"{self.method} as ONNX", "onnx")
        if self.int8 is not None and self.int8.backend == "torchao":
            _require_torchao(self.method)
        if self.kind == "prune":
            from pupil.compress.prune import require_torch_pruning

            require_torch_pruning()
        if self.dtype != "fp32" and (why := native_dtype(self.dtype, device)):
            raise PupilError(f"{self.dtype} is not offered here: {why}")

    def validation(self, base: Any):
        """The base run's validation split; int8 refuses a run without one (it never calibrates on test images)."""
        if base.info["config"]["data"].get("val_size"):
            return base.split("val")
        if self.kind == "int8" and not self.int8.dynamic:
            raise PupilError(
                f"{base.dir} was trained with val_size 0: it has no validation split for int8 to calibrate on, and "
                "pupil never calibrates on the test split; retrain it with --val-size"
            )
        return None

    def build(self, base: Any, val: Any, tmp: Path, device: torch.device, step, **kw: Any) -> dict[str, Any]:
        """Write the artefact and run.json into ``tmp``, load them back and check them against the base model."""
        from pupil.io import write_json
        from pupil.run import load_run

        check = val if val is not None else base.split("train")
        example = next(iter(check.images.split(2))).float() / 255  # two images: a batch of one would be baked in
        what = f"{base.info['model']['name']} ({base.dir})"
        net, record = base.model.net, {}
        if self.kind == "prune":
            step("pruning and fine-tuning")
            from pupil.compress.prune import prune_run

            pruned, record = prune_run(
                base, self.ratio, device=device, max_minutes=kw["max_minutes"], seed=kw["seed"], progress=kw["progress"]
            )
            record = {"prune": record}
            net = pruned.net
        net = copy.deepcopy(net).float().cpu().eval()
        pixels = Pixels(copy.deepcopy(net), base.model.mean, base.model.std, DTYPES[self.dtype]).eval()
        artefact, calib = tmp / ARTEFACTS[self.fmt], None
        if self.kind == "int8" and not self.int8.dynamic:
            calib = calibration_images(val, self.calib_size, kw["seed"])
        step(f"writing {artefact.name}")
        if self.int8 is not None and self.int8.backend == "torchao":
            from pupil.compress.quantize import quantize_torchao

            program, record = quantize_torchao(pixels, calib, example, what)
            with quiet():  # the archive writer warns about weight groups it cannot tell apart on the CPU
                torch.export.save(program, str(artefact))
        elif self.int8 is not None:
            from pupil.compress.quantize import quantize_onnx

            export_onnx(pixels, tmp / "fp32.onnx", example, what)
            step("calibrating and quantizing")
            record = quantize_onnx(tmp / "fp32.onnx", artefact, calib if calib is not None else example, self.int8, tmp)
        elif self.fmt == "onnx":
            export_onnx(pixels, artefact, example, what)
        elif self.fmt == "torchscript":
            export_torchscript(pixels, artefact, example, what)
        elif self.fmt == "pt2":
            program = export_program(pixels, example, what)
            with quiet():
                torch.export.save(program, str(artefact))
        else:
            save_weights(net, artefact, DTYPES[self.dtype])
        info = compressed_info(base, self, artefact, record, net, calib)
        write_json(tmp / "run.json", info)
        step("checking the artefact against the base model")
        deployed = load_run(tmp)
        c = info["compressed"]
        c["check"] = agreement(base.model, deployed.model, check, calib is not None)
        if self.fmt == "onnx" and self.int8 is not None:
            c["speed_vs_fp32_onnx"] = speed_ratio(tmp / "fp32.onnx", artefact, check)
            c["notes"].append(_speed_note(c["speed_vs_fp32_onnx"]))
        for scratch in ("fp32.onnx", "prepared.onnx"):
            (tmp / scratch).unlink(missing_ok=True)
        info["source"]["notes"] = c["notes"]
        write_json(tmp / "run.json", info)
        return info


def calibration_images(val: Any, n: int, seed: int) -> torch.Tensor:
    """``n`` validation images (a seeded random subset, in order) as [0, 1] floats (N, C, H, W)."""
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    sub = val.subset(idx)
    return torch.cat(list(sub.images.split(256))).float() / 255


def compressed_info(
    base: Any, job: Job, artefact: Path, record: dict[str, Any], net: nn.Module, calib: torch.Tensor | None
) -> dict[str, Any]:
    """run.json of the compressed run: the base run's data, config, tta and model sections, plus ``compressed``
    and ``source`` (module docstring of ``pupil.compress``)."""
    from pupil.run import environment

    i = base.info
    fmt, tta = job.fmt, bool(i.get("tta", False))
    outside_torch = fmt == "onnx" or (job.int8 is not None and job.int8.backend == "torchao") or fmt == "pt2"
    versions = environment()
    for module in ("onnxruntime", "onnx", "torchao"):
        if (v := _version(module)) is not None:
            versions[module] = v
    precision = "int8" if job.kind == "int8" else job.dtype
    notes = [f"compressed model: {job.method} of run {base.name}, deployed as {artefact.name} ({fmt}, {precision})"]
    if outside_torch:
        how = "an ONNX Runtime session" if fmt == "onnx" else "a compiled torch.export program"
        notes.append(f"the model runs as {how}: no gradients flow, so the audit's checks take gradient-free paths")
    if tta:
        notes.append("flip TTA is applied by pupil around the artefact (image and mirror in one call), not inside it")
    if record.get("fp32_layers"):
        notes.append(f"layers kept in fp32: {', '.join(record['fp32_layers'])}")
    mean, std = i["data"]["mean"], i["data"]["std"]
    inside = fmt != "safetensors"
    return {
        "schema": 1,
        "status": "finished",
        "model": {**i["model"], "params": sum(p.numel() for p in net.parameters())},
        "data": i["data"],
        "tta": tta,
        "config": i["config"],
        "seed": i.get("seed", 0),
        "runtime": {
            "device": "cpu",
            "precision": precision,
            "threads": torch.get_num_threads(),
            "channels_last": bool(not inside and i["runtime"].get("channels_last")),
        },
        "versions": versions,
        "compressed": {
            "base": {
                "name": base.name,
                "path": str(base.dir.resolve()),
                "weights_sha256": sha256_file(base.weights_file) if base.weights_file else None,
            },
            "method": job.method,
            "kind": job.kind,
            "settings": job.int8.record() if job.int8 is not None else ({"ratio": job.ratio} if job.ratio else {}),
            "artefact": artefact.name,
            "format": fmt,
            "dtype": precision if precision != "int8" else "fp32",
            "sha256": sha256_file(artefact),
            "bytes": artefact.stat().st_size,
            "normalisation": "inside the artefact" if inside else "in pupil's PixelModel wrapper",
            "tta": "flip, by pupil's wrapper around the artefact" if tta else None,
            "calibration": {"split": "val", "images": len(calib)} if calib is not None else None,
            **record,
            "notes": notes,
        },
        "source": {
            "kind": "compressed",
            "name": f"{job.method} of {base.name}",
            "weights": artefact.name,
            "weights_sha256": sha256_file(artefact)[:12],
            "preprocess": {
                "crop": i["model"].get("img_size"),
                "channels": i["model"].get("in_chans"),
                "input_range": "0-1",
                "mean": mean,
                "std": std,
                "source": f"the base run {base.name} (normalisation {'inside the artefact' if inside else 'in pupil'})",
            },
            "classes_from": f"the base run {base.name}",
            "class_index": None,
            "gradients": not outside_torch,
            "features": fmt == "safetensors",
            "gradcam": fmt == "safetensors",
            "notes": notes,
        },
    }


def _version(module: str) -> str | None:
    import importlib
    import sys

    if module not in sys.modules:  # only what this process used: importing torchao just to name it costs seconds
        return None
    return getattr(importlib.import_module(module), "__version__", None)


@torch.inference_mode()
def agreement(base: nn.Module, deployed: nn.Module, ds: Any, calibrated: bool) -> dict[str, Any]:
    """The deployed model against the base model (PyTorch, fp32) on ``ds``: top-1 of both, the share of images
    on which their top-1 agrees, and the largest absolute logit difference."""
    from pupil.predict import predict_logits

    a = predict_logits(base, ds, batch_size=256)
    b = predict_logits(deployed, ds, batch_size=256)
    y = ds.targets
    top_a, top_b = (a.argmax(1) == y).float().mean().item(), (b.argmax(1) == y).float().mean().item()
    return {
        "split": ds.meta.get("split", "val"),
        "images": len(y),
        "top1_base": top_a,
        "top1_compressed": top_b,
        "top1_change": top_b - top_a,
        "top1_agreement": (a.argmax(1) == b.argmax(1)).float().mean().item(),
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "includes_calibration_images": calibrated,
    }


def speed_ratio(fp32: Path, int8: Path, ds: Any, repeats: int = 30) -> dict[str, Any]:
    """Batch-1 latency and batch-256 throughput of the int8 ONNX graph against the fp32 one, same session settings,
    interleaved so that a busy machine slows both alike. A quick figure; ``benchmarks/compress.py`` measures."""
    import time

    import numpy as np

    images = next(iter(ds.images.split(256))).float().div(255).numpy()
    big = np.ascontiguousarray(np.resize(images, (256, *images.shape[1:])))
    one = np.ascontiguousarray(images[:1])
    sessions = {k: onnx_net(p, torch.device("cpu")).session for k, p in (("fp32", fp32), ("int8", int8))}
    times: dict[str, dict[int, list[float]]] = {k: {1: [], 256: []} for k in sessions}
    for _ in range(3):
        for s in sessions.values():
            s.run(None, {"pixels": big})
    for r in range(repeats):
        for k, s in sessions.items():
            for x, reps in ((one, 10), (big, 1 if r % 3 == 0 else 0)):
                for _ in range(reps):
                    t0 = time.perf_counter()
                    s.run(None, {"pixels": x})
                    times[k][len(x)].append(time.perf_counter() - t0)
    lat = {k: float(np.median(v[1])) * 1e3 for k, v in times.items()}
    thr = {k: 256 / float(np.median(v[256])) for k, v in times.items()}
    return {
        "threads": torch.get_num_threads(),
        "batch1_latency_ms": lat,
        "batch256_img_s": thr,
        "batch1_speedup": lat["fp32"] / lat["int8"],
        "batch256_speedup": thr["int8"] / thr["fp32"],
    }


def _speed_note(s: dict[str, Any]) -> str:
    def say(x: float) -> str:
        return f"{x:.2f}x as fast as" if x >= 1 else f"slower than ({x:.2f}x)"

    return (
        f"int8 in ONNX Runtime ran {say(s['batch256_speedup'])} fp32 in ONNX Runtime at batch 256 and "
        f"{say(s['batch1_speedup'])} it at batch 1 ({s['threads']} thread(s); measured while compressing, so a "
        "busy machine blurs it: benchmarks/compress.py measures it properly)"
    )


@contextlib.contextmanager
def steps(progress: bool) -> Iterator[Any]:
    """A spinner naming the current step of the compression (rich), or nothing when ``progress`` is off."""
    if not progress:
        yield lambda text: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("compressing", total=None)
        yield lambda text: bar.update(task, description=text)


def check_out(out: Path, overwrite: bool, base: Path) -> None:
    """Refuse an ``out`` that is the base run, a file, a folder with files pupil did not write, or an earlier run
    without ``overwrite``; before any work is done."""
    from pupil.run import is_run_file

    if out.exists() and base.exists() and out.resolve() == base.resolve():
        raise PupilError(f"--out {out} is the base run itself; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise PupilError(f"{out} exists and is not a folder")
    entries = list(out.iterdir())
    if foreign := sorted(p.name for p in entries if not is_run_file(p)):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PupilError(
            f"{out} holds files pupil did not write ({shown}); pupil will not replace it: choose another --out"
        )
    if entries and not overwrite:
        raise PupilError(f"{out} exists; use --overwrite to replace it or choose another --out")


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished directory ``tmp`` to ``out``; an earlier run there (checked again now) is moved aside
    first and removed once the new one is in place."""
    import os
    import shutil

    from pupil.run import run_lock

    mask = os.umask(0)  # mkdtemp made the folder 0700 (and some writers make files 0600): give them the modes
    os.umask(mask)  # that a plain mkdir and open() give
    os.chmod(tmp, 0o777 & ~mask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~mask)
    check_out(out, overwrite, tmp)
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    with run_lock(out, "being replaced by pupil compress"):
        out.rename(old / out.name)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
