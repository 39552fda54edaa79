"""The audit's forward pass with the weights in channels-last memory format (as ``make_context`` now does)
against the inputs alone in channels-last (as before), side by side in one invocation.

The deployed form of the default recipe's model (vgg_small, flip TTA, Fashion-MNIST's 1x28x28) runs through
``predict_logits`` over the same uint8 images at batch 256, in fp32 and, where the CPU runs bf16 natively, in
bf16; the two forms alternate, and the median of the repeats is reported. Random weights: speed does not depend
on what the weights learned. The logits of the two forms are compared too (they must agree).

    python benchmarks/audit_forward.py [--repeats 5] [--n 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pupil.data import ImageDataset
from pupil.models import PixelModel, create
from pupil.predict import predict_logits
from pupil.runtime import cpu_has_fast_bf16, setup_threads

ROOT = Path(__file__).resolve().parents[1]


def measure(model, ds, dtype, repeats: int) -> tuple[list[float], torch.Tensor]:
    predict_logits(model, ds.subset(list(range(256))), 256, "cpu", dtype, True)  # warm-up
    rates, logits = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = predict_logits(model, ds, 256, "cpu", dtype, True)
        rates.append(len(ds) / (time.perf_counter() - t0))
    return rates, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--model", default="vgg_small")
    args = ap.parse_args()
    threads = setup_threads(0)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(
        torch.randint(0, 256, (args.n, 1, 28, 28), dtype=torch.uint8, generator=g),
        torch.zeros(args.n),
        [str(k) for k in range(10)],
    )
    net = create(args.model, num_classes=10, in_chans=1, img_size=28)
    before = PixelModel(net, [0.286], [0.353], tta=True).eval()  # weights contiguous, inputs channels-last
    after = PixelModel(create(args.model, num_classes=10, in_chans=1, img_size=28), [0.286], [0.353], tta=True)
    after.load_state_dict(before.state_dict())
    after = after.eval().to(memory_format=torch.channels_last)  # what make_context does now
    precisions = {"fp32": None} | ({"bf16": torch.bfloat16} if cpu_has_fast_bf16() else {})
    out = {"model": args.model, "batch": 256, "n": args.n, "threads": threads, "tta": True, "results": {}}
    for name, dtype in precisions.items():
        runs = {"inputs channels-last (before)": [], "weights and inputs channels-last (now)": []}
        logits = {}
        for _ in range(args.repeats):  # alternate, so that load on the machine hits both sides alike
            for side, model in zip(runs, (before, after), strict=True):
                r, logits[side] = measure(model, ds, dtype, 1)
                runs[side] += r
        a, b = logits.values()
        med = {side: statistics.median(r) for side, r in runs.items()}
        out["results"][name] = {
            "img_per_s": med,
            "runs": runs,
            "speedup": med["weights and inputs channels-last (now)"] / med["inputs channels-last (before)"],
            "max_abs_logit_diff": float((a - b).abs().max()),
            "same_argmax": float((a.argmax(1) == b.argmax(1)).float().mean()),
        }
        print(name, {k: round(v) for k, v in med.items()}, f"x{out['results'][name]['speedup']:.2f}")
    path = ROOT / "benchmarks" / "results" / "audit_forward.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
