"""Seconds per image of the full ImageNet-C suite (19 corruptions x 5 severities) through pupil (batched torch)
against imagecorruptions 1.1.2 (the reference, one image at a time), on the same real photos, in one invocation,
with the damage each side does (PSNR against the clean image) recorded next to the timings.

Two sizes: 200 crops of 32x32 and 16 images of 224x224 (scikit-image's photographs). Both sides run with the
reference's absolute pixel lengths (pupil's ``scale=1``). The reference stops a (corruption, severity) cell once it
has spent ``--budget`` seconds (after at least one image) and its seconds per image are taken over the images it
did; at 224x224 its glass blur (seconds per image) therefore runs on one image per severity. pupil always does the
whole batch. Both sides use one thread. The two shims imagecorruptions needs with NumPy 2 and current scikit-image
are applied by ``tests.test_corruptions.reference()`` (see there). Writes benchmarks/results/corruptions.json.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/corruptions.py
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.test_corruptions holds the shimmed reference and the agreement table

from pupil.data.corruptions import CORRUPTIONS, corrupt  # noqa: E402
from pupil.io import write_json  # noqa: E402
from tests.test_corruptions import agreement  # noqa: E402

GOALS = {"overall": 50.0, "glass_blur": 100.0}  # speed-ups asked for


def photos(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` uint8 (size, size, 3) images: random crops of scikit-image's colour photographs, each first resized
    so that its short side is 4 x size for small sizes (crops show parts of a scene) or 1.5 x size otherwise."""
    import skimage.data
    from PIL import Image

    names = ["chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field"]
    short = 4 * size if size <= 64 else 3 * size // 2
    scaled = []
    for k in names:
        img = Image.fromarray(getattr(skimage.data, k)())
        f = short / min(img.size)
        scaled.append(np.array(img.resize((round(img.width * f), round(img.height * f)), Image.BILINEAR)))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = scaled[i % len(scaled)]
        y, x = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
        out.append(np.ascontiguousarray(a[y : y + size, x : x + size]))
    return out


def summarise(rows: list[dict]) -> dict:
    """Per corruption: mean seconds per image over the severities, both sides, and the speed-up; overall: the time
    for one image's whole suite (sum over corruptions and severities), both sides, and its ratio."""
    per = {}
    for name in CORRUPTIONS:
        cells = [r for r in rows if r["corruption"] == name]
        ours = float(np.mean([r["s_per_image_pupil"] for r in cells]))
        ref = float(np.mean([r["s_per_image_reference"] for r in cells]))
        per[name] = {
            "s_per_image_pupil": ours,
            "s_per_image_reference": ref,
            "speedup": ref / ours,
            "reference_images": [r["draws"] for r in cells],
            "max_abs_delta_db": max(abs(r["delta_db"]) for r in cells),
        }
    ours = sum(r["s_per_image_pupil"] for r in rows)
    ref = sum(r["s_per_image_reference"] for r in rows)
    return {
        "suite_s_per_image_pupil": ours,
        "suite_s_per_image_reference": ref,
        "overall_speedup": ref / ours,
        "glass_blur_speedup": per["glass_blur"]["speedup"],
        "goals_met": {
            "overall >= 50x": ref / ours >= GOALS["overall"],
            "glass_blur >= 100x": per["glass_blur"]["speedup"] >= GOALS["glass_blur"],
        },
        "per_corruption": per,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=200, help="32x32 images")
    ap.add_argument("--large", type=int, default=16, help="224x224 images")
    ap.add_argument("--budget", type=float, default=2.0, help="reference seconds per (corruption, severity) cell")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "corruptions.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    corrupt(torch.rand(2, 3, 32, 32), "frost", 1)  # warm-up (first-call allocations), untimed
    sizes = {32: photos(args.small, 32), 224: photos(args.large, 224)}
    report: dict = {
        "benchmark": "corruptions",
        "command": "OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/corruptions.py",
        "hardware": {"cpu": _cpu(), "threads": torch.get_num_threads()},
        "versions": _versions(),
        "method": (
            "same images through both; pupil batched (one call per corruption and severity), the reference one "
            f"image at a time, stopping a cell after {args.budget} s (at least one image); seconds per image over "
            "the images each side did; scale=1 (the reference's absolute pixel lengths)"
        ),
        "sizes": {},
        "fidelity": {},
    }
    for size, images in sizes.items():
        rows = agreement(images, seeds=(0,), reference_budget_s=args.budget)
        report["sizes"][str(size)] = {"images": len(images), **summarise(rows)}
        report["fidelity"][str(size)] = rows
        print_size(size, len(images), report["sizes"][str(size)])
    report["total_s"] = time.perf_counter() - t_start
    write_json(args.out, report)
    print(f"total {report['total_s']:.0f} s; wrote {args.out}")


def print_size(size: int, n: int, s: dict) -> None:
    print(f"\n{size}x{size}, {n} images: ms per image (mean over severities), reference images per severity")
    print(f"{'corruption':18s} {'pupil':>9s} {'reference':>10s} {'speed-up':>9s} {'max|dPSNR|':>11s}  ref images")
    for name, p in s["per_corruption"].items():
        print(
            f"{name:18s} {p['s_per_image_pupil'] * 1e3:9.3f} {p['s_per_image_reference'] * 1e3:10.2f} "
            f"{p['speedup']:8.0f}x {p['max_abs_delta_db']:10.2f}  {p['reference_images']}"
        )
    print(
        f"whole suite per image: pupil {s['suite_s_per_image_pupil'] * 1e3:.1f} ms, reference "
        f"{s['suite_s_per_image_reference']:.2f} s, {s['overall_speedup']:.0f}x; "
        f"glass blur {s['glass_blur_speedup']:.0f}x"
    )


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "scikit-image", "opencv-python", "imagecorruptions", "pillow", "scipy"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "absent"
    return out


if __name__ == "__main__":
    main()
