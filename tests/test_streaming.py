"""Streaming: a folder whose decoded images exceed the memory budget stays in its files (LazyImages) and every
check runs on it with the same figures as on the decoded set. Budgets here are a few kilobytes, so tiny data
streams."""

import numpy as np
import pytest
import torch
from PIL import Image

from pupil.audit import CHECKS, run_audit
from pupil.config import build
from pupil.data import load
from pupil.data.images import LazyImages, memory_budget, read_images
from pupil.errors import PupilError
from pupil.training.loop import fit
from tests.conftest import ROOT
from tests.test_results_contract import TINY

# Timing and energy figures differ between any two runs; every other headline must be identical.
TIMED_KEYS = {"retrieval": ("qps", "latency_ms_p50", "latency_ms_p99")}  # timings beside figures
TIMED = {"efficiency", "energy"}


def write_folder(root, split, n):
    ds = load("synthetic", split if split == "test" else "train", n=n)
    for c in ds.classes:
        (root / split / c).mkdir(parents=True)
    for i, (x, y) in enumerate(zip(ds.images, ds.targets, strict=True)):
        Image.fromarray(x[0].numpy()).save(root / split / ds.classes[y] / f"{i:04d}.png")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_folder(root / "data", "train", 384)
    write_folder(root / "data", "test", 160)
    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "r", "dataset": str(root / "data")})
    return fit(cfg, progress=False).dir


def test_a_folder_over_the_budget_streams_with_the_same_pixels_and_counts(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (mode, size) in enumerate([("RGB", (30, 20)), ("L", (20, 20)), ("RGBA", (25, 40)), ("I;16", (20, 20))]):
        a = rng.integers(
            0,
            255 if mode != "I;16" else 65535,
            (size[1], size[0], *([4] if mode == "RGBA" else [3] if mode == "RGB" else [])),
        )
        im = Image.fromarray(a.astype(np.uint16 if mode == "I;16" else np.uint8))  # PIL infers the mode
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    whole = read_images(paths, img_size=16, mode="RGB")
    lazy = read_images(paths, img_size=16, mode="RGB", max_bytes=1000)
    assert isinstance(lazy.images, LazyImages) and not isinstance(whole.images, LazyImages)
    assert lazy.conversions == whole.conversions
    assert torch.equal(lazy.images[:], whole.images) and torch.equal(
        torch.cat(list(lazy.images.split(3))), whole.images
    )
    assert lazy.images.shape == whole.images.shape and torch.equal(
        lazy.images[torch.tensor([3, 1])], whole.images[[3, 1]]
    )
    assert torch.equal(lazy.images.subset([2, 0])[:], whole.images[[2, 0]])
    with pytest.raises(PupilError, match="less than one 3x16x16 image"):
        read_images(paths, img_size=16, mode="RGB", max_bytes=100)


def test_a_file_that_fails_mid_stream_is_refused_or_skipped(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        noise = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(paths[-1], quality=95)  # noise: the scan data dwarfs the header
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) * 3 // 4])  # a truncated JPEG: its header reads, its pixels do not
    lazy = read_images(paths, max_bytes=20000)
    with pytest.raises(PupilError, match=r"1.jpg: corrupt or truncated .*found while streaming; --on-bad-image skip"):
        list(lazy.images.split(2))
    skipped = read_images(paths, max_bytes=20000, on_bad="skip")
    assert skipped.kept == [0, 2] and [b.path for b in skipped.bad] == [str(paths[1])] and len(skipped.images) == 2


def test_memory_budget_parses_sizes():
    assert memory_budget("512MB") == 512 << 20 and memory_budget("2g") == 2 << 30 and memory_budget(1000) == 1000
    assert memory_budget() > 0
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(PupilError, match="--max-memory"):
            memory_budget(bad)


def test_every_check_gives_the_same_figures_streamed(folder_run, monkeypatch):
    monkeypatch.setattr("pupil.audit.common.PIXELS_PER_BATCH", 32 * 16 * 16)  # batches of 32: 8 KB here
    names = CHECKS.names()
    settings = {n: TINY[n] for n in names if n in TINY}
    whole = run_audit(folder_run, names, device="cpu", settings=settings)
    streamed = run_audit(folder_run, names, device="cpu", settings=settings, max_memory=16384)
    assert whole["audit"]["data"]["streamed"] is False and streamed["audit"]["data"]["streamed"] is True
    for name in names:
        if name in TIMED:
            continue
        a, b = whole["checks"][name], streamed["checks"][name]
        assert a["headline"] == b["headline"], name
        timed = TIMED_KEYS.get(name, ())
        assert {k: v for k, v in a["summary"].items() if k not in timed} == {
            k: v for k, v in b["summary"].items() if k not in timed
        }, name


def test_training_on_a_streamed_folder_is_the_same_training(folder_run, tmp_path):
    """pupil train on a folder over the budget decodes each epoch's batches ahead in workers: the same batches in
    the same order, so the weights come out bit for bit as when the folder is decoded in memory."""
    from safetensors.torch import load_file

    data = str(folder_run.parent / "data")
    recipe = ROOT / "recipes/smoke/synthetic.yaml"
    streamed = fit(
        build(recipe, {"out": str(tmp_path), "name": "s", "dataset": data, "max_memory": "4KB"}), progress=False
    )
    whole = fit(build(recipe, {"out": str(tmp_path), "name": "w", "dataset": data}), progress=False)
    a, b = load_file(streamed.dir / "model.safetensors"), load_file(whole.dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.summary()["best_val_top1"] == whole.summary()["best_val_top1"]


def test_a_budget_below_one_batch_is_refused(folder_run):
    with pytest.raises(PupilError, match=r"--max-memory 1,000 bytes does not hold one batch of 160 images of 1x16x16"):
        run_audit(folder_run, ["accuracy"], device="cpu", max_memory=1000)
