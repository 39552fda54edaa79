"""Efficiency: parameters, FLOPs (``torch.utils.flop_counter``), size on disk, latency at batch 1
(p50/p95 over timed repeats after warm-up), throughput at a large batch, peak memory, and the threads
used. Figures are for the deployed model, flip TTA included when the run uses it.

FLOPs are counted on PyTorch's operators, so a model run outside them (an ONNX Runtime session, which gives no
gradients) or one the counter cannot trace has none recorded (None), with a note; likewise the parameter count
of a network without PyTorch parameters (unless it states a ``param_count``) and the size of a weights file
that is not there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pupil.audit.common import CHECKS, AuditContext, Check, at_least, figure, headline, validate_settings
from pupil.models.stats import count_flops, count_params
from pupil.runtime import autocast


def timed(fn, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of ``fn()`` for each repeat, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_memory_bytes(fn, device: torch.device) -> tuple[int, str]:
    """Peak bytes allocated by tensors during ``fn()``: CUDA's allocator counter, or on the CPU the running
    sum of the profiler's per-operator allocations and frees."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    # Kineto logs profiler stages and a "gpuGetDeviceCount failed" line on CPU-only machines; 6 silences it.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = peak = 0
    for e in events:
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak, "torch.profiler self_cpu_memory_usage running sum"


@dataclass
class EfficiencyConfig:
    latency_repeats: int = 200
    """Timed batch-1 forward passes (after warm-up)."""
    warmup: int = 20
    """Untimed passes before timing."""
    throughput_batch: int = 256
    """Batch size for throughput."""
    throughput_repeats: int = 20
    """Timed large-batch passes."""

    def __post_init__(self):
        once = at_least(1)
        validate_settings(
            self, "efficiency", latency_repeats=once, warmup=at_least(0), throughput_batch=once, throughput_repeats=once
        )


@CHECKS.register("efficiency")
class Efficiency(Check):
    name, title, Config = "efficiency", "Efficiency", EfficiencyConfig
    quick = {"latency_repeats": 50, "warmup": 5, "throughput_repeats": 5}

    def run(self, ctx: AuditContext, cfg: EfficiencyConfig) -> dict:
        model, dev = ctx.model.eval(), ctx.device
        shape = tuple(ctx.test.shape)
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        one = ctx.test.images[:1].to(dev).float().div(255).contiguous(memory_format=fmt)
        batch = ctx.batch(cfg.throughput_batch)  # bounded by the image size, as every pass of the audit is
        reps = (batch + len(ctx.test) - 1) // len(ctx.test)
        big = ctx.test.images[:batch].repeat(reps, 1, 1, 1)[:batch]
        big = big.to(dev).float().div(255).contiguous(memory_format=fmt)

        def forward(x):
            def go():
                with torch.inference_mode(), autocast(dev, ctx.dtype):
                    model(x)

            return go

        lat = torch.tensor(timed(forward(one), cfg.latency_repeats, cfg.warmup, dev)) * 1000
        thr = timed(forward(big), cfg.throughput_repeats, max(1, cfg.warmup // 5), dev)
        peak, peak_method = peak_memory_bytes(forward(big), dev)
        notes: list[str] = []
        net_flops = _flops(ctx, shape, notes)
        params = _params(model.net, notes)
        weights, size = _weights(ctx, notes)
        if not ctx.gradients:
            notes.append(
                "peak memory counts the tensors PyTorch allocates; a model run outside PyTorch (no gradients) "
                "allocates its own working memory, which is not counted"
            )
        metrics = {
            "params": params,
            "flops_network": net_flops,
            "flops_per_image": net_flops * (2 if model.tta else 1) if net_flops is not None else None,
            "size_on_disk_bytes": size,
            "weights_file": str(weights),
            "latency_ms": {
                "p50": lat.quantile(0.5).item(),
                "p95": lat.quantile(0.95).item(),
                "mean": lat.mean().item(),
                "min": lat.min().item(),
            },
            "throughput_img_s": batch / (sum(thr) / len(thr)),
            "throughput_batch": batch,
            "peak_memory_bytes": peak,
            "peak_memory_method": f"batch {batch}, {peak_method}",
            "threads": torch.get_num_threads(),
            "input_shape": list(ctx.test.shape),
            "device": str(dev),
            "precision": str(ctx.dtype or "fp32"),
            "tta": model.tta,
        }
        return {
            "headline": headline("latency p50, batch 1", metrics["latency_ms"]["p50"], False, "ms"),
            "summary": {
                "params": metrics["params"],
                "flops": metrics["flops_per_image"],  # per image as deployed: doubled under flip TTA
                "latency_ms_p50": metrics["latency_ms"]["p50"],
                "throughput_img_s": metrics["throughput_img_s"],
            },
            "metrics": metrics,
            "curves": {"latency_ms": lat.tolist()},
            "figures": [
                figure(
                    "Batch-1 latency", "histogram", "latency_ms", bins=30, xlabel="batch-1 latency (ms)", ylabel="runs"
                )
            ],
            "notes": notes,
        }


def _flops(ctx: AuditContext, shape: tuple[int, ...], notes: list[str]) -> int | None:
    """Forward FLOPs of one image through ``model.net`` (without TTA), or None with a note saying why."""
    if not ctx.gradients:
        notes.append(
            "FLOPs not counted: the model gives no gradients, so it runs outside PyTorch's operators (an ONNX "
            "Runtime session) where torch.utils.flop_counter cannot see them"
        )
        return None
    model = ctx.model
    try:
        flops = count_flops(model.net.float().cpu(), (1, *shape))
    # RuntimeError includes NotImplementedError (a torch.export module refuses .eval()) and TorchScript's errors.
    except (RuntimeError, TypeError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no message'}"
        notes.append(f"FLOPs not counted: torch.utils.flop_counter failed on this model ({why})")
        return None
    finally:
        model.to(ctx.device)
    if not flops:
        notes.append(
            "FLOPs not counted: torch.utils.flop_counter saw no matrix multiplication or convolution in the "
            "model's forward pass (its operators run outside PyTorch)"
        )
        return None
    return flops


def _params(net: torch.nn.Module, notes: list[str]) -> int | None:
    """The network's parameter count: its PyTorch parameters, else the ``param_count`` it states (an ONNX
    session's initializers), else None with a note."""
    if n := count_params(net):
        return n
    stated = getattr(net, "param_count", None)
    if isinstance(stated, int) and not isinstance(stated, bool):
        notes.append("parameters: the count the model file states (its ONNX initializers), not PyTorch parameters")
        return stated
    notes.append("parameters not counted: the network has no PyTorch parameters and states no param_count")
    return None


def _weights(ctx: AuditContext, notes: list[str]) -> tuple[Path, int | None]:
    """The model's weights file (the source's file, or the run's model.safetensors) and its size in bytes, or None
    with a note when it is not there."""
    path = Path(getattr(ctx.run, "weights_file", None) or ctx.run.dir / "model.safetensors")
    if path.is_file():
        return path, path.stat().st_size
    notes.append(f"size on disk not measured: there is no weights file at {path}")
    return path, None
