"""pupil serve over models pupil did not train: the folder of an audited model source, re-opened as audited (its
weights checked by hash, the audit's temperature and thresholds applied, uploads decoded with the audit's resize
and centre crop); a bare ONNX source served unaudited; and the one-line refusals.

One `py:` model with a weights file is audited (calibration, ood, uncertainty, with tiny settings) on a generated
folder of non-square colour images, whose decoding needs a resize and a crop."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import pupil
from pupil.data.images import Fit, read_images
from pupil.errors import PupilError
from pupil.serve.models import load_served, open_upload, to_pixels
from tests.test_sources import colour_folder

pytest.importorskip("fastapi")

CPU = torch.device("cpu")
CHECKS = "calibration,ood,uncertainty,conformal"
TINY = {
    "conformal": {"n": 64, "corruptions": ["contrast"]},
    "ood": {"n_id": 64, "n_ood": 32, "n_fit": 64, "sets": ["noise", "uniform"], "scores": ["msp", "energy"]},
    "uncertainty": {"n": 64, "sources": ["softmax"], "target_accuracy": 0.9},
}
MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
PRE = {"mean": "0.4,0.45,0.5", "std": "0.2,0.25,0.3", "resize": 28, "crop": 24, "interpolation": "bicubic"}


class TinyNet(nn.Module):
    """A small CNN over normalised colour input with 3 outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def tiny_net(seed: int = 0) -> nn.Module:
    """The `py:` factory: seeded, so its weights (and their state-dict hash) are the same at every call."""
    torch.manual_seed(seed)
    return TinyNet()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("colours"), 16)


@pytest.fixture(scope="module")
def audited(tmp_path_factory, folder) -> tuple[Path, Path, nn.Module]:
    """The audit folder of `py:tests.test_serve_sources:tiny_net --weights w.safetensors`, its weights file and the
    network with those weights."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("source")
    net = tiny_net(1).eval()
    save_file(net.state_dict(), root / "w.safetensors")
    pupil.audit(
        "py:tests.test_serve_sources:tiny_net",
        str(folder),
        checks=CHECKS,
        settings=TINY,
        weights=root / "w.safetensors",
        preprocess=PRE,
        out=root / "audit",
        device="cpu",
        val_size=0.25,
    )
    return root / "audit", root / "w.safetensors", net


@pytest.fixture(scope="module")
def served(audited):
    return load_served(audited[0], CPU, warm_batch=4)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory, folder) -> list[Path]:
    """A PNG of the folder (40x30), a JPEG large enough to be drafted (300x200), and a JPEG stored 200x300 with an
    EXIF rotation that views it 300x200."""
    root = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    big[:, :150, 0] = 230  # a red left half: a crop in the wrong place shows
    Image.fromarray(big).save(root / "big.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(np.ascontiguousarray(big.transpose(1, 0, 2))).save(root / "rotated.jpg", exif=exif, quality=90)
    return [folder / "red" / "0.png", root / "big.jpg", root / "rotated.jpg"]


def _multipart(paths: list[Path]) -> list:
    return [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def _refused(match: str, *args, **kwargs) -> str:
    """load_served(*args, **kwargs) raises one PupilError line matching ``match``; returns the message."""
    with pytest.raises(PupilError, match=match) as e:
        load_served(*args, **kwargs)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# An audited source


def test_an_audit_folder_is_served_with_its_audited_rules(audited, served):
    from pupil.results import load_results, read_per_image

    audit, weights, _ = audited
    results = load_results(audit)
    src = results["run"]["source"]
    assert src["target"] == "tests.test_serve_sources:tiny_net" and src["pretrained"] is False
    assert src["weights_path"] == str(weights.resolve()) and src["input_shape"] == [3, 24, 24]
    checks = results["checks"]
    assert served.temperature == checks["calibration"]["summary"]["temperature"] != 1.0 and served.temperature_audited
    assert served.deferral_threshold == checks["uncertainty"]["summary"]["deferral_threshold"] is not None
    assert (
        served.conformal is not None and served.conformal.temperature == checks["conformal"]["summary"]["temperature"]
    )
    ids = read_per_image(audit, "ood", results["audit"])["id"]
    t = served.ood.threshold
    assert (ids >= t).double().mean() >= 0.95 and (ids > t).double().mean() < 0.95  # the 95%-TPR threshold
    # the version is the recorded hash, which is the weights file's
    assert served.version == src["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    assert served.name == "audit" and served.classes == ["blue", "green", "red"]
    assert served.report == audit / "report.html" and served.describe()["report"] == "/v1/models/audit/report"
    assert served.fit == Fit(28, 24, "bicubic") and (served.mode, served.side) == ("RGB", 24)
    assert served.source["audited"] and served.source["spec"] == "py:tests.test_serve_sources:tiny_net"
    assert not any("not audited" in n for n in served.notes)


def test_uploads_are_decoded_as_the_audit_decoded_its_data(served, uploads, folder, tmp_path):
    """Resize of the shorter side with the model's interpolation, centre crop: the service's pixels equal
    read_images' (what the audit's folder loader calls) for a PNG, a drafted JPEG and an EXIF-rotated one, and the
    whole folder decodes to the audit's own test split; a plain square resize would not."""
    from pupil.sources import open_audit

    for path in uploads:
        want = read_images([path], mode="RGB", fit=served.fit).images[0].numpy()
        got = served.decode(open_upload(path.read_bytes()))
        assert got.shape == (3, 24, 24) and np.array_equal(got, want), path.name
        assert np.array_equal(to_pixels(open_upload(path.read_bytes()), "RGB", 24, served.fit), want)
        assert not np.array_equal(to_pixels(open_upload(path.read_bytes()), "RGB", 24), want), path.name
    run = open_audit("py:tests.test_serve_sources:tiny_net", str(folder), out=tmp_path, preprocess=PRE, val_size=0)
    split = run.split("test").images.numpy()
    files = sorted(folder.glob("*/*.png"))
    ours = [served.decode(open_upload(p.read_bytes())) for p in files]
    assert len(split) == len(files) and sorted(a.tobytes() for a in split) == sorted(a.tobytes() for a in ours)


def test_predictions_are_the_models_softmax_on_the_audits_pixels(audited, served, uploads):
    from fastapi.testclient import TestClient

    from pupil.serve.app import Settings, create_app

    _, _, net = audited
    x = read_images(uploads, mode="RGB", fit=Fit(28, 24, "bicubic")).images.float() / 255
    with torch.no_grad():
        logits = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).double()
    probs = (logits / served.temperature).softmax(1)
    with TestClient(create_app([served], Settings(max_images=8))) as c:
        body = c.post("/v1/models/audit/predict?top=3", files=_multipart(uploads)).json()
        assert body["version"] == served.version and body["calibration"]["temperature"] == served.temperature
        for p, row in zip(body["predictions"], probs, strict=True):
            got = {t["index"]: t["probability"] for t in p["top"]}
            assert got == pytest.approx(dict(enumerate(row.tolist())), abs=1e-6)
        assert c.get("/v1/models/audit/report").status_code == 200


def test_changed_or_missing_weights_are_refused(audited):
    audit, weights, _ = audited
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-4] + bytes(4))  # the same size, other numbers
        message = _refused("changed since", audit, CPU)
        assert "audit it again: `pupil audit py:tests.test_serve_sources:tiny_net --data" in message
        assert "--weights" in message and "--mean 0.4,0.45,0.5" in message
        weights.unlink()
        _refused("are gone", audit, CPU)
    finally:
        weights.write_bytes(original)
    unset = {"weights": None, "pretrained": False, "classes": None, "preprocess": {"img_size": None, "mean": None}}
    assert load_served(audit, CPU, source=unset).version == hashlib.sha256(original).hexdigest()[:12]


def test_a_factorys_own_weights_are_checked_by_their_state_dict_hash(tmp_path, folder, monkeypatch):
    """A `py:` model without a weights file: the audit records the hash of its state dict, which the served model
    must match; a factory that now builds other weights is refused."""
    pupil.audit(
        "py:tests.test_serve_sources:tiny_net",
        str(folder),
        checks="calibration",
        preprocess=PRE,
        out=tmp_path / "own",
        device="cpu",
    )
    from pupil.sources import open_source, weights_hash

    served = load_served(tmp_path / "own", CPU)
    assert served.version == weights_hash(open_source("py:tests.test_serve_sources:tiny_net"))
    monkeypatch.setattr("tests.test_serve_sources.tiny_net", lambda: TinyNet())  # unseeded: other weights
    _refused("are not the ones .* audited", tmp_path / "own", CPU)


def _edited(audited, tmp_path: Path, **source) -> Path:
    """A copy of the audit folder whose recorded source has ``source``'s keys changed (None: removed)."""
    dest = tmp_path / "edited"
    shutil.copytree(audited[0], dest)
    results = json.loads((dest / "results.json").read_text())
    recorded = results["run"]["source"]
    for k, v in source.items():
        if v is None:
            recorded.pop(k, None)
        else:
            recorded[k] = v
    (dest / "results.json").write_text(json.dumps(results))
    return dest


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"target": None}, r"before pupil recorded the module of py: models; audit it again: `pupil audit py:MODULE"),
        ({"kind": "module"}, "nn.Module handed to pupil.audit from Python"),
        ({"kind": "timm", "target": "test_resnet", "weights": None, "weights_path": None}, "random weights"),
        (
            {"kind": "timm", "target": "test_resnet", "weights": None, "weights_path": None, "pretrained": None},
            "before pupil recorded whether the weights were --pretrained; audit it again: `pupil audit timm:test_resnet"
            " --pretrained",
        ),
        ({"weights_path": None, "weights": "nowhere/w.safetensors"}, "the weights nowhere/w.safetensors .* are gone"),
        ({"weights_sha256": None}, "records no hash"),
    ],
)
def test_records_that_cannot_be_reopened_are_refused_in_one_line(audited, tmp_path, edit, match):
    _refused(match, _edited(audited, tmp_path, **edit), CPU)


# ---------------------------------------------------------------------------------------------------------------
# A bare source


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, audited) -> Path:
    pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            copy.deepcopy(audited[2]).eval(),
            (torch.rand(2, 3, 24, 24),),
            str(path),
            input_names=["input"],
            dynamic_axes={"input": {0: "n"}},
            dynamo=False,
            opset_version=17,
        )
    return path


def test_an_onnx_file_is_served_bare_with_t1_and_no_thresholds(onnx_file, audited, uploads):
    from fastapi.testclient import TestClient

    from pupil.serve.app import create_app

    spec = f"onnx:{onnx_file}"
    served = load_served(spec, CPU, source={"preprocess": {"mean": "0.4,0.45,0.5", "std": "0.2,0.25,0.3"}})
    assert served.name == "onnx-net" and served.classes == ["0", "1", "2"] and served.run_dir is None
    assert served.version == hashlib.sha256(onnx_file.read_bytes()).hexdigest()[:12] and served.report is None
    rules = (served.temperature, served.temperature_audited, served.ood.threshold, served.deferral_threshold)
    assert rules == (1.0, False, None, None) and served.conformal is None
    assert served.fit == Fit(24, 24, "bilinear") and served.source["spec"] == spec and not served.source["audited"]
    assert (
        served.notes[0].startswith("not audited") and f"`pupil audit {spec} --data DATA --mean 0.4" in served.notes[0]
    )
    assert any("output indices 0..2" in n for n in served.notes)
    x = read_images(uploads, mode="RGB", fit=Fit(24, 24)).images.float() / 255
    with torch.no_grad():
        want = audited[2]((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).softmax(1)
    with TestClient(create_app([served])) as c:
        body = c.post("/v1/models/onnx-net/predict?top=3", files=_multipart(uploads)).json()
        assert body["calibration"] == {"temperature": 1.0, "audited": False} and body["version"] == served.version
        for p, row in zip(body["predictions"], want, strict=True):
            assert {t["index"]: t["probability"] for t in p["top"]} == pytest.approx(
                dict(enumerate(row.tolist())), abs=1e-5
            )
            assert p["ood"]["flagged"] is None and not p["deferral"]["deferred"]
        assert c.get("/v1/models/onnx-net/report").status_code == 404
    named = load_served(spec, CPU, source={"classes": ["r", "g", "b"], "preprocess": {"input_range": "0-1"}})
    assert named.classes == ["r", "g", "b"] and not any("output indices" in n for n in named.notes)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_bad_sources_and_flags_are_refused_in_one_line(onnx_file, audited, tmp_path):
    onnx, stats = f"onnx:{onnx_file}", {"mean": "0.5", "std": "0.25"}
    _refused("'foo:bar' is neither a run directory nor a model source", "foo:bar", CPU)
    _refused("model file .*missing.onnx does not exist", f"onnx:{tmp_path / 'missing.onnx'}", CPU)
    _refused("does not say how it expects its input: pass --mean and --std", onnx, CPU)
    _refused("unknown source option.* colour", onnx, CPU, source={"colour": True})
    _refused("unknown preprocessing setting", onnx, CPU, source={"preprocess": {"gamma": 2}})
    flags = {"weights": audited[1], "preprocess": {"img_size": 24}}
    _refused("--weights --img-size describe a model source", audited[0], CPU, source=flags)
    _refused("files hold their weights", onnx, CPU, source={"weights": audited[1]})
    both = {"weights": audited[1], "pretrained": True}
    _refused("give --pretrained or --weights, not both", "timm:test_resnet", CPU, source=both)
    _refused("2 class names for a model with 3 outputs", onnx, CPU, source={"classes": ["a", "b"], "preprocess": stats})
    _refused("smaller than the crop", onnx, CPU, source={"preprocess": {**stats, "resize": 20}})
    shape = r"failed on a batch of black images of shape \(2, 3, 32, 32\)"
    _refused(shape, onnx, CPU, source={"preprocess": {**stats, "img_size": 32}})
    script = tmp_path / "net.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.script(TinyNet()).save(str(script))
    _refused("torchscript:net does not say how it expects its input", f"torchscript:{script}", CPU)
    _refused(
        "does not say its input size .* pass --img-size", f"torchscript:{script}", CPU, source={"preprocess": stats}
    )
    # one mean for all channels: the channels are the first convolution's
    served = load_served(f"torchscript:{script}", CPU, source={"preprocess": {**stats, "img_size": 20}})
    assert (served.mode, served.side, served.fit) == ("RGB", 20, Fit(20, 20))


def test_a_timm_model_brings_its_imagenet_classes_and_its_preprocessing():
    import timm

    served = load_served("timm:test_resnet", CPU)
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("test_resnet"))
    crop = cfg["input_size"][1]
    assert served.name == "timm-test_resnet" and len(served.classes) == 1000 and "tabby" in served.classes[281]
    assert served.fit == Fit(math.floor(crop / cfg["crop_pct"]), crop, cfg["interpolation"]) and served.side == crop
    assert any("random weights" in n for n in served.notes) and served.explain_method == "gradcam"
