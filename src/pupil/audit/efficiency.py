"""Efficiency: parameters, FLOPs (``torch.utils.flop_counter``), size on disk, latency at batch 1
(p50/p95 over timed repeats after warm-up), throughput at a large batch, peak memory, and the threads
used. Figures are for the deployed model, flip TTA included when the run uses it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

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
        reps = (cfg.throughput_batch + len(ctx.test) - 1) // len(ctx.test)
        big = ctx.test.images[: cfg.throughput_batch].repeat(reps, 1, 1, 1)[: cfg.throughput_batch]
        big = big.to(dev).float().div(255).contiguous(memory_format=fmt)

        def forward(x):
            def go():
                with torch.inference_mode(), autocast(dev, ctx.dtype):
                    model(x)

            return go

        lat = torch.tensor(timed(forward(one), cfg.latency_repeats, cfg.warmup, dev)) * 1000
        thr = timed(forward(big), cfg.throughput_repeats, max(1, cfg.warmup // 5), dev)
        peak, peak_method = peak_memory_bytes(forward(big), dev)
        weights = ctx.run.dir / "model.safetensors"
        net_flops = count_flops(model.net.float().cpu(), (1, *shape))
        model.to(dev)
        metrics = {
            "params": count_params(model.net),
            "flops_network": net_flops,
            "flops_per_image": net_flops * (2 if model.tta else 1),
            "size_on_disk_bytes": weights.stat().st_size,
            "latency_ms": {
                "p50": lat.quantile(0.5).item(),
                "p95": lat.quantile(0.95).item(),
                "mean": lat.mean().item(),
                "min": lat.min().item(),
            },
            "throughput_img_s": cfg.throughput_batch / (sum(thr) / len(thr)),
            "peak_memory_bytes": peak,
            "peak_memory_method": f"batch {cfg.throughput_batch}, {peak_method}",
            "threads": torch.get_num_threads(),
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
        }
