import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pupil.data import load, stratified_split
from pupil.data.datasets import read_idx
from pupil.errors import PupilError
from tests.conftest import needs_fmnist


def write_idx(path, arr: np.ndarray, magic: int, truncate: int = 0):
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw[: len(raw) - truncate]))


def fake_fmnist(root, n_train=20, n_test=10, truncate=0):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051, truncate)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)


def test_idx_reader_checks_magic_length_and_count(tmp_path):
    fake_fmnist(tmp_path)
    x = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, 10)
    assert x.shape == (10, 28, 28)
    with pytest.raises(PupilError, match="magic"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2049)
    with pytest.raises(PupilError, match="holds 10 items, expected 60000"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, 60000)
    fake_fmnist(tmp_path, truncate=5)
    with pytest.raises(PupilError, match="truncated"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, 10)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(PupilError, match="corrupt"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, 10)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(PupilError, match="apt-get install -y dataset-fashion-mnist"):
        load("fashion-mnist", "test", data_dir=tmp_path)


@needs_fmnist
def test_real_fashion_mnist_shapes_and_balanced_val_split():
    test = load("fashion-mnist", "test")
    assert len(test) == 10000 and test.shape == (1, 28, 28) and test.classes[9] == "Ankle boot"
    train = load("fashion-mnist", "train", val_size=5000, seed=3)
    val = load("fashion-mnist", "val", val_size=5000, seed=3)
    assert len(train) == 55000 and len(val) == 5000
    assert set(val.class_counts().values()) == {500}  # stratified: Fashion-MNIST has 6,000 per class
    mean, std = load("fashion-mnist", "train").mean_std()
    assert abs(mean[0] - 0.2860) < 1e-3 and abs(std[0] - 0.3530) < 1e-3  # the published statistics


def test_stratified_split_is_seeded_disjoint_and_proportional():
    y = torch.tensor([0] * 80 + [1] * 20)
    a_rest, a_out = stratified_split(y, 0.1, seed=1)
    _, b_out = stratified_split(y, 0.1, seed=1)
    _, c_out = stratified_split(y, 0.1, seed=2)
    assert torch.equal(a_out, b_out) and not torch.equal(a_out, c_out)
    assert len(set(a_rest.tolist()) & set(a_out.tolist())) == 0 and len(a_rest) + len(a_out) == 100
    assert torch.bincount(y[a_out]).tolist() == [8, 2]


def test_mean_std_matches_numpy():
    ds = load("synthetic", "train", num_classes=3, channels=3, n=60)
    mean, std = ds.mean_std()
    x = ds.images.numpy().astype(np.float64) / 255
    assert np.allclose(mean, x.mean((0, 2, 3))) and np.allclose(std, x.std((0, 2, 3)))


def test_bundled_datasets_load():
    m = load("mnist-5k", "all")
    assert len(m) == 5000 and m.shape == (1, 28, 28)
    assert len(load("mnist-5k", "test")) == 1000
    d = load("digits", "all")
    assert len(d) == 1797 and d.shape == (1, 8, 8) and d.images.max() == 255


def make_folder(root, sizes=((12, 12),), modes=("L",)):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            size, mode = sizes[i % len(sizes)], modes[i % len(modes)]
            shape = size[::-1] + ((3,) if mode == "RGB" else ())
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_converts_mixed_modes_and_sizes(tmp_path):
    make_folder(tmp_path, sizes=((12, 12), (12, 12), (20, 16)), modes=("RGB", "RGB", "L"))
    ds = load(str(tmp_path), "all")
    assert ds.classes == ["cat", "dog"] and ds.shape == (3, 12, 12) and len(ds) == 10
    assert {k: v for k, v in ds.meta["conversions"].items() if v} == {"converted_mode": 2, "resized": 2}
    assert len(load(str(tmp_path), "train")) + len(load(str(tmp_path), "test")) == 10


def test_image_folder_refuses_corrupt_images_and_empty_classes(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "dog" / "3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(PupilError, match=r"cannot use image .*dog/3\.png: not an image"):
        load(str(tmp_path), "all")
    (tmp_path / "dog" / "3.png").unlink()
    (tmp_path / "bird").mkdir()
    with pytest.raises(PupilError, match="bird holds no images"):
        load(str(tmp_path), "all")


def test_manifest_keeps_extra_columns_and_refuses_unknown_labels(tmp_path):
    make_folder(tmp_path / "img")
    lines = ["path,label,site,split"] + [
        f"img/{c}/{i}.png,{c},{'A' if i % 2 else 'B'},{'test' if i == 0 else 'train'}"
        for c in ("cat", "dog")
        for i in range(5)
    ]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    train = load(str(tmp_path / "m.csv"), "train")
    test = load(str(tmp_path / "m.csv"), "test")
    assert len(train) == 8 and len(test) == 2 and train.classes == ["cat", "dog"]
    assert train.columns["site"][:4] == ["A", "B", "A", "B"]
    (tmp_path / "classes.txt").write_text("cat\n")
    with pytest.raises(PupilError, match=r"m\.csv:7: label 'dog' is not in the class list"):
        load(str(tmp_path / "m.csv"), "train")


def test_unknown_dataset_and_split():
    with pytest.raises(PupilError, match="unknown dataset"):
        load("imagenet-99", "train")
    with pytest.raises(PupilError, match="unknown split"):
        load("synthetic", "dev")


def test_stratified_split_holds_out_exactly_the_size_asked_with_many_classes():
    from pupil.data import stratified_split

    targets = torch.arange(3000) % 1000  # 1,000 classes of 3: every class's quota of 32 rounds to 0
    rest, held = stratified_split(targets, 32, seed=0)
    assert len(held) == 32 and len(rest) == 2968 and torch.bincount(targets[held]).max() == 1
    targets = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)  # quotas 1.33 each round to 1: one more for one class
    assert len(stratified_split(targets, 4, seed=0)[1]) == 4
    targets = torch.tensor([0] * 60 + [1] * 40)  # quotas add up already: unchanged
    held = stratified_split(targets, 10, seed=1)[1]
    assert torch.bincount(targets[held]).tolist() == [6, 4]
