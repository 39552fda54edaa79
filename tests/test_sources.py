"""Auditing models pupil did not train: model sources, preprocessing, classes and class maps, the Python API, and
the one-line refusals. Models are tiny and the data is a generated colour folder, so each audit takes seconds."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import pupil
from pupil.errors import PupilError
from pupil.sources import Preprocess, map_classes, read_state
from tests.conftest import ROOT, needs_fmnist

CHEAP = "accuracy,calibration"


class TinyNet(nn.Module):
    """A small CNN over normalised input with `k` outputs."""

    def __init__(self, k: int = 3, c: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(c, 8, 3, padding=1)
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def tiny_net(k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(k)


def colour_folder(root: Path, per_class: int) -> Path:
    """Three colour classes of ``per_class`` images each in ``root``, 40x30 RGB PNGs: red, green or blue dominant."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir()
        for i in range(per_class):
            a = rng.integers(0, 90, (30, 40, 3), dtype=np.uint8)
            a[..., k] = rng.integers(150, 256, (30, 40), dtype=np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("colours"), 12)


def audit(tmp_path, model, data, **kw):
    kw.setdefault("checks", CHEAP)
    kw.setdefault("device", "cpu")
    return pupil.audit(model, data, out=tmp_path / "audit", **kw)


def test_pupil_audit_takes_a_module_after_the_audit_package_was_imported(tmp_path, folder):
    import pupil.audit as package  # binds pupil.audit to the package: it must still be callable

    assert pupil.audit is package
    r = audit(tmp_path, tiny_net(), str(folder), preprocess={"mean": "0.5", "std": "0.25", "img_size": 24})
    src = r["run"]["source"]
    assert src["kind"] == "module" and src["preprocess"]["crop"] == 24 and src["preprocess"]["resize"] == 24
    assert r["audit"]["precision"] == "fp32" and r["run"]["classes"] == ["blue", "green", "red"]
    assert r["audit"]["data"]["conversions"]["resized"] > 0 and r["audit"]["data"]["conversions"]["cropped"] > 0
    assert {p.name for p in (tmp_path / "audit").iterdir()} >= {"results.json", "report.html", "model_card.md"}
    # 36 images, 10% (round(3.6) = 4) held out for validation, class-stratified: the rest is the test split
    assert r["audit"]["n"] == 32


def test_the_audit_matches_a_plain_loop_with_the_stated_preprocessing(tmp_path, folder):
    """Top-1 equals what the model scores when the images are prepared by hand with torchvision."""
    from torchvision.transforms.v2 import functional as F

    net = tiny_net()
    pre = {"mean": "0.4,0.45,0.5", "std": "0.2,0.25,0.3", "resize": 28, "crop": 24, "interpolation": "bicubic"}
    r = audit(tmp_path, net, str(folder), preprocess=pre, val_size=0)
    classes = sorted(p.name for p in folder.iterdir())
    correct = 0
    for k, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            im = F.center_crop(F.resize(Image.open(f), 28, F.InterpolationMode.BICUBIC), 24)
            x = F.pil_to_tensor(im).float()[None] / 255
            x = (x - torch.tensor([0.4, 0.45, 0.5]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
            with torch.no_grad():
                correct += int(net(x).argmax(1).item() == k)
    assert r["audit"]["n"] == 36 and r["checks"]["accuracy"]["summary"]["top1"] == pytest.approx(correct / 36)


def test_input_range_0_255_scales_mean_and_std(tmp_path, folder):
    """mean/std in 0-255 units give the same logits as the same statistics in 0-1 units."""
    a = audit(tmp_path / "a", tiny_net(), str(folder), preprocess={"mean": "127.5", "std": "63.75", "img_size": 24})
    b = audit(
        tmp_path / "b",
        tiny_net(),
        str(folder),
        preprocess={"mean": "127.5", "std": "63.75", "img_size": 24, "input_range": "0-255"},
    )
    c = audit(tmp_path / "c", tiny_net(), str(folder), preprocess={"mean": "0.5", "std": "0.25", "img_size": 24})
    assert b["checks"]["calibration"]["summary"]["ece"] == pytest.approx(c["checks"]["calibration"]["summary"]["ece"])
    assert a["checks"]["calibration"]["summary"]["ece"] != pytest.approx(c["checks"]["calibration"]["summary"]["ece"])


def test_timm_weights_bring_their_preprocessing_and_class_count(tmp_path, folder):
    import timm
    from safetensors.torch import save_file

    net = timm.create_model("test_resnet", num_classes=3)
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    r = audit(tmp_path, "timm:test_resnet", str(folder), weights=tmp_path / "w.safetensors")
    pre = r["run"]["source"]["preprocess"]
    cfg = timm.data.resolve_data_config({}, model=net)
    assert pre["source"] == "timm pretrained_cfg" and pre["crop"] == cfg["input_size"][1]
    assert pre["resize"] == int(cfg["input_size"][1] / cfg["crop_pct"]) and pre["mean"] == list(cfg["mean"])
    assert r["run"]["model"]["num_classes"] == 3 and r["run"]["source"]["features"]
    # flags override the weights' preprocessing, and the record says so
    r = audit(
        tmp_path / "b", "timm:test_resnet", str(folder), weights=tmp_path / "w.safetensors", preprocess={"img_size": 32}
    )
    assert (
        r["run"]["source"]["preprocess"]["crop"] == 32
        and "overridden by flags" in r["run"]["source"]["preprocess"]["source"]
    )


def test_torchvision_classes_and_class_map_auto(tmp_path):
    """A 1,000-class torchvision model on a folder of two ImageNet classes named by WordNet id: the class map picks
    its two outputs, the accuracy check says so and also gives top-1 over all 1,000 classes."""
    import torchvision

    root = tmp_path / "inet"
    for wnid in ("n01440764", "n02102040"):  # tench, English springer
        (root / wnid).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(root / wnid / f"{i}.png")
    torch.manual_seed(0)
    net = torchvision.models.get_model("mobilenet_v3_small", num_classes=1000)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    kw = dict(weights=tmp_path / "w.pth", val_size=0)
    with pytest.raises(PupilError, match="--class-map auto"):
        audit(tmp_path / "a", "torchvision:mobilenet_v3_small", str(root), **kw)
    r = audit(tmp_path / "b", "torchvision:mobilenet_v3_small", str(root), class_map="auto", checks="accuracy", **kw)
    src, acc = r["run"]["source"], r["checks"]["accuracy"]
    assert src["class_index"] == [0, 217] and src["preprocess"]["crop"] == 224 and src["preprocess"]["resize"] == 256
    assert "restricted to the 2 mapped classes" in acc["metrics"]["protocol"]
    with torch.no_grad():  # the restricted and the full top-1 by hand
        from torchvision.transforms.v2 import functional as F

        xs, ys = [], []
        for k, wnid in enumerate(("n01440764", "n02102040")):
            for f in sorted((root / wnid).iterdir()):
                x = F.center_crop(F.resize(F.pil_to_tensor(Image.open(f)), 256, antialias=True), 224).float() / 255
                xs.append(F.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
                ys.append(k)
        out = net.eval()(torch.stack(xs))
    y = torch.tensor(ys)
    assert acc["summary"]["top1"] == pytest.approx((out[:, [0, 217]].argmax(1) == y).double().mean().item())
    assert acc["metrics"]["top1_all_classes"] == pytest.approx(
        (out.argmax(1) == torch.tensor([0, 217])[y]).double().mean().item()
    )


def test_class_maps():
    desc = ["tench, Tinca tinca", "English springer, English springer spaniel", "goldfish"]
    assert map_classes(["goldfish", "tench"], desc, None, 3, "auto") == (
        [2, 0],
        "mapped automatically by WordNet id or name",
    )
    assert map_classes(["English_springer"], desc, None, 3, "auto")[0] == [1]
    assert map_classes(["a", "b", "c"], None, None, 3, None)[0] is None
    with pytest.raises(PupilError, match="no model class for dog"):
        map_classes(["dog"], desc, None, 3, "auto")
    with pytest.raises(PupilError, match="has 3 outputs but the data has 2 classes"):
        map_classes(["a", "b"], None, None, 3, None)


def test_class_map_file(tmp_path):
    desc = ["tench, Tinca tinca", "English springer, English springer spaniel", "goldfish"]
    f = tmp_path / "map.csv"
    f.write_text("data_class,model_class\nfish,2\ndog,English springer, English springer spaniel\n")
    assert map_classes(["dog", "fish"], desc, None, 3, str(f))[0] == [1, 2]
    f.write_text("fish,7\n")
    with pytest.raises(PupilError, match="row 1: the model has no class '7'"):
        map_classes(["fish"], desc, None, 3, str(f))


def test_a_model_that_says_nothing_of_its_input_is_refused(tmp_path, folder):
    ts = tmp_path / "m.ts"
    torch.jit.trace(tiny_net().eval(), torch.rand(1, 3, 24, 24)).save(str(ts))
    with pytest.raises(PupilError, match="does not say how it expects its input: pass --mean and --std"):
        audit(tmp_path, f"torchscript:{ts}", str(folder))
    assert not (tmp_path / "audit").exists()  # nothing half-written
    r = audit(tmp_path, f"torchscript:{ts}", str(folder), preprocess={"input_range": "0-1", "img_size": 24})
    assert r["run"]["source"]["preprocess"]["mean"] == [0.0]


@pytest.mark.parametrize(
    "factory, message",
    [
        ("raises", r"py:tests.test_sources:raises: raises\(\) raised ValueError: no weights here"),
        ("not_a_module", "returned int, not a torch nn.Module"),
        ("four_d", r"returned \(2, 3, 24, 24\) for 2 images; pupil audits classifiers that return \(N, K\) logits"),
        ("nan_out", "NaN or infinite outputs"),
    ],
)
def test_bad_py_models_get_one_line(tmp_path, folder, factory, message):
    with pytest.raises(PupilError, match=message):
        audit(
            tmp_path,
            f"py:tests.test_sources:{factory}",
            str(folder),
            preprocess={"mean": "0.5", "std": "0.2", "img_size": 24},
        )
    assert not (tmp_path / "audit").exists()


def raises():
    raise ValueError("no weights here")


def not_a_module():
    return 3


def four_d():
    return nn.Conv2d(3, 3, 1)


class _Nan(TinyNet):
    def forward(self, x):
        return super().forward(x) * float("nan")


def nan_out():
    return _Nan()


def test_weights_are_read_without_unpickling_code(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Preprocess()}, bad)
    with pytest.raises(PupilError, match="weights only, no pickled code"):
        read_state(bad)
    nested = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module.fc.weight": torch.ones(2, 2)}, "epoch": 3}, nested)
    assert list(read_state(nested)) == ["fc.weight"]


def test_a_mismatched_class_count_is_refused(tmp_path, folder):
    with pytest.raises(PupilError, match="the model has 5 outputs but the data has 3 classes"):
        audit(tmp_path, tiny_net(5), str(folder), preprocess={"mean": "0.5", "std": "0.2", "img_size": 24})


def test_a_torch_dataset_is_audited(tmp_path):
    class Squares(torch.utils.data.Dataset):
        classes = ["dark", "light"]

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.full((1, 8, 8), 0.1 if i % 2 == 0 else 0.9), i % 2

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.stack([-torch.ones(64), torch.ones(64)]))
        net[1].bias.zero_()
    r = audit(tmp_path, net, Squares(), preprocess={"mean": "0.5", "std": "0.5"}, checks="accuracy", val_size=0)
    assert r["checks"]["accuracy"]["summary"]["top1"] == 1.0 and r["run"]["classes"] == ["dark", "light"]


def test_audit_precision_is_recorded_and_bf16_on_request(tmp_path, folder):
    pre = {"mean": "0.5", "std": "0.25", "img_size": 24}
    r = audit(tmp_path, tiny_net(), str(folder), preprocess=pre, precision="bf16", checks="accuracy")
    assert r["audit"]["precision"] == "torch.bfloat16"
    with pytest.raises(PupilError, match="precision must be one of fp32, bf16, auto"):
        audit(tmp_path / "b", tiny_net(), str(folder), preprocess=pre, precision="fp16")


def test_cli_refuses_in_one_line(tmp_path, folder):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "pupil", "audit", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
        )

    for args, message in [
        (["nope:thing", "--data", str(folder)], "is neither a run directory nor a model source"),
        (["onnx:" + str(tmp_path / "missing.onnx"), "--data", str(folder)], "does not exist"),
        (["timm:no_such_net", "--data", str(folder)], "timm has no model 'no_such_net'"),
        (["py:tests.test_sources:tiny_net", "--data", str(folder)], "pass --mean and --std"),
    ]:
        res = cli(*args, "--out", str(tmp_path / "o"))
        assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert not (tmp_path / "o").exists()


@needs_fmnist
def test_a_model_trained_outside_pupil_audits_the_same_three_ways(tmp_path):
    """examples/train_outside.py saves one model as a state dict, ONNX and TorchScript: the three audits agree on
    top-1 exactly and on ECE to 1e-4 (the README's first demonstration, with the script's --tiny mode)."""
    res = subprocess.run(
        [sys.executable, "examples/train_outside.py", "--tiny", "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    pre = {"mean": "0.2860", "std": "0.3530"}
    m = tmp_path / "m"
    runs = {
        "py": audit(
            tmp_path / "py", "py:examples.outside_cnn:build", "fashion-mnist", weights=m / "model.pth", preprocess=pre
        ),
        "onnx": audit(tmp_path / "onnx", f"onnx:{m / 'model.onnx'}", "fashion-mnist", preprocess=pre),
        "ts": audit(tmp_path / "ts", f"torchscript:{m / 'model.ts'}", "fashion-mnist", preprocess=pre),
    }
    top1 = {k: r["checks"]["accuracy"]["summary"]["top1"] for k, r in runs.items()}
    ece = {k: r["checks"]["calibration"]["summary"]["ece"] for k, r in runs.items()}
    assert top1["py"] == top1["onnx"] == top1["ts"] and top1["py"] > 0.15, top1  # above chance (0.10)
    assert abs(ece["py"] - ece["onnx"]) < 1e-4 and abs(ece["py"] - ece["ts"]) < 1e-4, ece
    assert (
        runs["onnx"]["run"]["source"]["gradients"] is False
        and runs["onnx"]["run"]["source"]["preprocess"]["crop"] == 28
    )


def test_onnx_refusals(tmp_path, folder, monkeypatch):
    class NHWC(nn.Module):
        def forward(self, x):  # (N, H, W, C) in
            return x.mean((1, 2))

    path = tmp_path / "nhwc.onnx"
    torch.onnx.export(
        NHWC(), (torch.rand(1, 24, 24, 3),), str(path), input_names=["input"], dynamo=False, opset_version=17
    )
    with pytest.raises(PupilError, match="takes input 'input' as NHWC; pupil feeds NCHW"):
        audit(tmp_path, f"onnx:{path}", str(folder), preprocess={"mean": "0.5", "std": "0.2"})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    with pytest.raises(PupilError, match=r"needs onnxruntime: pip install 'pupil\[onnx\]'"):
        audit(tmp_path, f"onnx:{path}", str(folder), preprocess={"mean": "0.5", "std": "0.2"})
    assert not (tmp_path / "audit").exists()


def test_a_torch_export_program_is_audited(tmp_path, folder):
    net = tiny_net().eval()
    path = tmp_path / "m.pt2"
    torch.export.save(
        torch.export.export(net, (torch.rand(2, 3, 24, 24),), dynamic_shapes=({0: torch.export.Dim("n")},)), str(path)
    )
    pre = {"mean": "0.5", "std": "0.25", "img_size": 24}
    a = audit(tmp_path / "a", f"export:{path}", str(folder), preprocess=pre)
    b = audit(tmp_path / "b", net, str(folder), preprocess=pre)
    assert a["checks"]["accuracy"]["summary"]["top1"] == b["checks"]["accuracy"]["summary"]["top1"]
    assert a["run"]["source"]["kind"] == "export" and a["run"]["source"]["gradients"]


def test_shipped_imagenet_weights_keep_their_own_normalisation(tmp_path):
    """timm:efficientnet_lite0 --pretrained loads the weights that ship with a package; they expect (x - 0.5) / 0.5,
    not timm's ImageNet mean and std, and the audit must use theirs."""
    from pupil.sources import open_source

    opened = open_source("timm:efficientnet_lite0", pretrained=True)
    assert opened.preprocess.mean == [0.5, 0.5, 0.5] and opened.preprocess.std == [0.5, 0.5, 0.5]
    assert opened.preprocess.crop == 224 and opened.preprocess.resize == 256 and len(opened.classes) == 1000
    assert opened.wnids[281] == "n02123045" and "tabby" in opened.classes[281]


def test_classes_file_and_default_output_folder(tmp_path, folder, monkeypatch):
    """--classes names the model's outputs; with --class-map auto the data's folders are matched to them by name,
    in whatever order the model has them. Without --out the audit goes to audits/<kind>-<name>."""
    names = tmp_path / "classes.txt"
    names.write_text("green\nred\nblue\n")
    monkeypatch.chdir(tmp_path)
    r = pupil.audit(
        "py:tests.test_sources:tiny_net",
        str(folder),
        checks="accuracy",
        classes=names,
        class_map="auto",
        preprocess={"mean": "0.5", "std": "0.25", "img_size": 24},
        device="cpu",
    )
    assert r["run"]["source"]["class_index"] == [2, 0, 1]  # blue, green, red -> outputs 2, 0, 1
    assert (tmp_path / "audits" / "py-tests.test_sources_tiny_net" / "results.json").is_file()
    names.write_text("green\nred\n")
    with pytest.raises(PupilError, match="2 class names for a model with 3 outputs"):
        pupil.audit("py:tests.test_sources:tiny_net", str(folder), classes=names, preprocess={"input_range": "0-1"})
