"""A PNG grid of samples, one row per class, for ``pupil data show``."""

from __future__ import annotations

from pathlib import Path

import torch

from pupil.data.datasets import ImageDataset
from pupil.io import atomic_write


def sample_grid(ds: ImageDataset, out: Path, per_class: int = 8, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(seed)
    k = len(ds.classes)
    fig, axes = plt.subplots(k, per_class, figsize=(per_class * 0.9 + 1.6, k * 0.9 + 0.3), squeeze=False)
    for c, name in enumerate(ds.classes):
        members = (ds.targets == c).nonzero().squeeze(1)
        pick = members[torch.randperm(len(members), generator=g)[:per_class]]
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(pick):
                img = ds.images[pick[j]].permute(1, 2, 0).numpy()
                ax.imshow(img.squeeze(2) if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255)
        axes[c][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    suffix = Path(out).suffix or ".png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=suffix[1:], dpi=80))
    plt.close(fig)
    return Path(out)
