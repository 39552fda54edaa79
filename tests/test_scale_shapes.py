"""Every check on the shapes real users bring: 3x224x224 colour photographs, and 1,000-class models. The models
are tiny and the settings the contract test's TINY ones, so each audit takes seconds to a minute."""

import numpy as np
import torch
from PIL import Image
from torch import nn

import pupil
from pupil.audit import CHECKS
from tests.test_results_contract import TINY

SETTINGS = {n: TINY[n] for n in CHECKS.names() if n in TINY}


class Tiny(nn.Module):
    """A small CNN with the feature contract (so every check's feature paths run) and k outputs."""

    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 5, stride=4, padding=2)
        self.body = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, k)
        self.num_features, self.num_classes, self.gradcam_layer = 16, k, "body"

    def forward_features(self, x):
        return self.body(self.stem(x).relu()).relu()

    def forward_head(self, x, pre_logits=False):
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_every_check_runs_on_224_px_colour_photographs(tmp_path):
    rng = np.random.default_rng(0)
    for k, name in enumerate(["red", "green", "blue"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(16):
            w, h = rng.integers(230, 320, 2)
            a = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
            a[..., k] += 120
            Image.fromarray(a).save(tmp_path / "data" / name / f"{i}.jpg", quality=90)
    pre = {"mean": "0.5,0.5,0.5", "std": "0.25,0.25,0.25", "resize": 232, "crop": 224}
    r = pupil.audit(
        Tiny(3), str(tmp_path / "data"), out=tmp_path / "a", preprocess=pre, settings=SETTINGS, device="cpu"
    )
    # A folder of images has no training split, the retrieval check's gallery: it is left out with a note.
    assert set(r["checks"]) == set(CHECKS.names()) - {"retrieval"}
    assert any("retrieval check" in n and "training split" in n for n in r["audit"]["notes"])
    assert r["run"]["model"]["img_size"] == 224 and r["audit"]["data"]["conversions"]["cropped"] == 48
    eff = r["checks"]["efficiency"]["summary"]
    assert eff["flops"] > 0 and r["checks"]["efficiency"]["metrics"]["input_shape"] == [3, 224, 224]
    certify = r["checks"]["certify"]
    assert certify["metrics"]["input_shape"] == [3, 224, 224] and certify["metrics"]["sigma_normalised"] == [1.0] * 3
    assert any("in the model's pixel space" in n for n in certify["notes"])
    ood = r["checks"]["ood"]["metrics"]
    assert ood  # the OOD sets (grey 28 px digits, noise) were brought to the model's 3x224x224 input


def test_every_check_runs_on_a_1000_class_model(tmp_path):
    class Thousand(torch.utils.data.Dataset):
        classes = [f"c{i:03d}" for i in range(1000)]

        def __len__(self):
            return 3000

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return (torch.rand(3, 16, 16, generator=g) * 255).to(torch.uint8), i % 1000

    r = pupil.audit(
        Tiny(1000),
        Thousand(),
        out=tmp_path / "a",
        preprocess={"mean": "0.5", "std": "0.25"},
        settings=SETTINGS,
        device="cpu",
        val_size=1000,
    )
    assert set(r["checks"]) == set(CHECKS.names()) - {"retrieval"} and r["run"]["model"]["num_classes"] == 1000
    assert len(r["checks"]["accuracy"]["tables"]["per_class"]["rows"]) == 1000
