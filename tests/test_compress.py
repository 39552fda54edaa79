"""pupil compress: export and int8 artefacts written as run directories that load like any run.

A tiny resnet_test run on the synthetic gratings (16x16, 4 classes, 64 validation images) is compressed into each
format; every artefact is checked against the PyTorch model it came from (the reference), the run.json contract
against the files, and the refusals and the all-or-nothing directory against their promises.
"""

import hashlib
import json
import shutil
import sys

import pytest
import torch
from torch import nn

import pupil
from pupil.compress import compress_run
from pupil.compress.export import Deployed, Pixels, export_onnx
from pupil.compress.quantize import parse_int8
from pupil.config import build
from pupil.errors import PupilError
from pupil.run import load_run
from pupil.runtime import cpu_has_fast_bf16
from pupil.training.loop import fit
from tests.conftest import ROOT

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "base", "epochs": 1})
    return fit(cfg, progress=False).dir


@pytest.fixture(scope="module")
def onnx_run(base, tmp_path_factory):
    return compress_run(base, "export", tmp_path_factory.mktemp("o") / "onnx", fmt="onnx", progress=False)


@pytest.fixture(scope="module")
def int8_run(base, tmp_path_factory):
    return compress_run(base, "int8:qdq", tmp_path_factory.mktemp("q") / "int8", progress=False)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logits(model, x):
    with torch.inference_mode():
        return model(x)


def val_pixels(run):
    return run.split("val").images.float() / 255


def test_onnx_artefact_matches_pytorch_and_takes_pixels(base, onnx_run):
    ref = load_run(base)
    assert isinstance(onnx_run.model, Deployed) and type(onnx_run.model.net).__name__ == "OnnxNet"
    x = torch.cat([val_pixels(ref), torch.rand(5, 1, 16, 16)])  # validation images and arbitrary pixels, 69 in all
    assert torch.allclose(logits(onnx_run.model, x), logits(ref.model, x), atol=1e-4)
    # the normalisation is inside the graph: the session itself takes [0, 1] pixels
    raw = torch.from_numpy(onnx_run.model.net.session.run(None, {"pixels": x[:3].numpy()})[0])
    assert torch.allclose(raw, logits(ref.model, x[:3]), atol=1e-4)
    assert onnx_run.model.net.session.get_inputs()[0].shape[0] == "batch"


def test_the_run_json_contract(base, onnx_run):
    ref = json.loads((base / "run.json").read_text())
    info = json.loads((onnx_run.dir / "run.json").read_text())
    for key in ("data", "config", "tta"):
        assert info[key] == ref[key], key
    assert {k: v for k, v in info["model"].items() if k != "params"} == {
        k: v for k, v in ref["model"].items() if k != "params"
    }
    c = info["compressed"]
    assert c["base"]["weights_sha256"] == sha256(base / "model.safetensors")
    assert c["base"]["path"] == str(base.resolve()) and c["base"]["name"] == "base"
    artefact = onnx_run.dir / c["artefact"]
    assert artefact.name == "model.onnx" and c["format"] == "onnx" and c["sha256"] == sha256(artefact)
    assert c["bytes"] == artefact.stat().st_size and c["normalisation"] == "inside the artefact"
    assert c["check"]["top1_agreement"] == 1.0 and c["check"]["max_abs_logit_diff"] < 1e-4
    assert c["check"]["images"] == 64 and c["check"]["split"] == "val"
    assert info["versions"]["onnxruntime"] and info["versions"]["torch"] == torch.__version__
    s = info["source"]
    assert s["gradients"] is False and s["features"] is False and s["weights_sha256"] == c["sha256"][:12]
    assert sorted(p.name for p in onnx_run.dir.iterdir()) == ["model.onnx", "run.json"]  # no scratch files
    assert onnx_run.weights_file == artefact


def test_the_splits_are_the_base_runs(base, onnx_run):
    ref = load_run(base, load_model=False)
    for split in ("val", "test"):
        a, b = ref.split(split), onnx_run.split(split)
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_torchscript_artefact_matches_pytorch(base, tmp_path):
    run = compress_run(base, "export", tmp_path / "ts", fmt="torchscript", progress=False)
    ref = load_run(base)
    x = torch.rand(7, 1, 16, 16)
    assert (tmp_path / "ts" / "model.torchscript.pt").is_file()
    assert torch.allclose(logits(run.model, x), logits(ref.model, x), atol=1e-5)
    assert run.info["source"]["gradients"] is True  # TorchScript runs PyTorch's operators: gradients flow
    x.requires_grad_(True)
    run.model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_flip_tta_is_honoured_as_pixelmodel_does(base, tmp_path):
    tta = tmp_path / "tta_base"
    shutil.copytree(base, tta)
    info = json.loads((tta / "run.json").read_text())
    (tta / "run.json").write_text(json.dumps({**info, "tta": True}))
    ref = load_run(tta)
    run = compress_run(tta, "export", tmp_path / "out", fmt="onnx", progress=False)
    x = torch.rand(6, 1, 16, 16)
    assert run.model.tta and ref.model.tta
    by_hand = (
        logits(ref.model.net, ref.model.normalize(x)) + logits(ref.model.net, ref.model.normalize(x.flip(3)))
    ) / 2
    assert torch.allclose(logits(run.model, x), by_hand, atol=1e-4)
    assert torch.allclose(
        logits(run.model.net, x.flip(3)), logits(ref.model.net, ref.model.normalize(x.flip(3))), atol=1e-4
    )


def test_int8_stays_close_to_fp32_on_validation_images(base, int8_run):
    ref = load_run(base)
    x = val_pixels(ref)
    a, b = logits(ref.model, x), logits(int8_run.model, x)
    agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
    spread = (a.max(1).values - a.min(1).values).mean().item()
    assert agree >= 0.9, agree
    assert (a - b).abs().mean().item() < 0.1 * spread  # int8 noise well below the logits' own range
    c = int8_run.info["compressed"]
    # the recorded check is what a plain recomputation gives
    y = ref.split("val").targets
    assert c["check"]["top1_compressed"] == pytest.approx((b.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert c["check"]["top1_agreement"] == pytest.approx(agree, abs=1e-6)
    assert c["calibration"] == {"split": "val", "images": 64} and c["check"]["includes_calibration_images"]
    assert c["settings"]["quant_format"] == "qdq" and c["settings"]["per_channel"] and c["fp32_layers"] == []
    assert c["speed_vs_fp32_onnx"]["batch256_speedup"] > 0 and "ONNX Runtime" in c["notes"][-1]
    assert int8_run.info["runtime"]["precision"] == "int8"


def test_the_int8_graph_is_quantized_and_keep_ends_keeps_the_ends(base, int8_run, tmp_path):
    import onnx

    ops = [n.op_type for n in onnx.load(str(int8_run.dir / "model.onnx")).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    run = compress_run(base, "int8:keep_ends", tmp_path / "ends", progress=False)
    c = run.info["compressed"]
    assert len(c["fp32_layers"]) == 2 and c["settings"]["keep_ends"]
    graph = onnx.load(str(tmp_path / "ends" / "model.onnx")).graph
    weights = {i.name: i.data_type for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    first, last = convs[0], convs[-1]
    # the first convolution and the classifier read float weights straight from initializers: not quantized
    assert (
        weights.get(first.input[1]) == onnx.TensorProto.FLOAT and weights.get(last.input[1]) == onnx.TensorProto.FLOAT
    )
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)  # the layers between are int8
    q = compress_run(base, "int8:qoperator", tmp_path / "qop", progress=False)
    qops = {n.op_type for n in onnx.load(str(tmp_path / "qop" / "model.onnx")).graph.node}
    assert "QLinearConv" in qops and q.info["compressed"]["check"]["top1_agreement"] >= 0.9


def test_parse_int8_options():
    assert parse_int8("int8").keep_ends and parse_int8("int8").quant_format == "qdq"
    s = parse_int8("int8:qoperator,reduce_range,u8u8")
    assert (s.quant_format, s.reduce_range, s.weights, s.keep_ends) == ("qoperator", True, "u8", False)
    assert parse_int8("int8:torchao").fmt == "pt2"
    for bad, message in [
        ("int8:fast", "unknown int8 option"),
        ("int8:torchao,keep_ends", "takes no other option"),
        ("int8:dynamic,keep_ends", "quantizes MatMul and Gemm"),
    ]:
        with pytest.raises(PupilError, match=message):
            parse_int8(bad)


def test_a_tampered_artefact_is_refused(onnx_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(onnx_run.dir, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PupilError, match="sha256 differs"):
        load_run(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(PupilError, match="has no model.onnx"):
        load_run(copy)


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no native bf16")
def test_bf16_artefact_runs_in_bf16(base, tmp_path):
    run = compress_run(base, "bf16", tmp_path / "bf16", progress=False)
    ref = load_run(base)
    assert next(run.model.net.parameters()).dtype == torch.bfloat16
    assert run.model.net.float() is run.model.net  # the efficiency check's .float() leaves it in bf16
    from safetensors.torch import load_file

    state = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in state.values() if v.is_floating_point())
    x = val_pixels(ref)
    a, b = logits(ref.model, x), logits(run.model, x)
    assert b.dtype == torch.float32 and (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9
    c = run.info["compressed"]
    assert c["dtype"] == "bf16" and run.info["source"]["gradients"] and run.info["source"]["features"]
    assert c["normalisation"] == "in pupil's PixelModel wrapper"


def test_refusals_are_one_line_and_leave_nothing(base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cases = [
        ("zip", None, "unknown compression method 'zip'"),
        ("distill:lenet5", None, "distillation trains a new run"),
        ("export", "tflite", "unknown format 'tflite'"),
        ("int8", "torchscript", "int8 writes onnx, not torchscript"),
        ("bf16", "onnx", "bf16 cannot be written as onnx"),
        ("prune:1.5", None, r"must lie in \(0, 1\)"),
        ("prune:half", None, "prune:RATIO needs the share"),
        ("export:fast", None, "takes no options"),
    ]
    for method, fmt, message in cases:
        with pytest.raises(PupilError, match=message):
            compress_run(base, method, out, fmt=fmt, progress=False)
        assert not out.exists()
    monkeypatch.setattr("pupil.compress.export.cpu_flags", lambda: {"avx2"})
    with pytest.raises(PupilError, match="fp16 is not offered here: this CPU has no AMX-FP16"):
        compress_run(base, "fp16", out, progress=False)
    with pytest.raises(PupilError, match="bf16 is not offered here"):
        compress_run(base, "bf16", out, progress=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    with pytest.raises(PupilError, match=r"needs onnxruntime: pip install 'pupil\[onnx\]'"):
        compress_run(base, "int8", out, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_int8_refuses_a_run_without_a_validation_split(base, tmp_path):
    novel = tmp_path / "noval"
    shutil.copytree(base, novel)
    info = json.loads((novel / "run.json").read_text())
    info["config"]["data"]["val_size"] = 0
    (novel / "run.json").write_text(json.dumps(info))
    with pytest.raises(PupilError, match="no validation split for int8 to calibrate on.*never calibrates on the test"):
        compress_run(novel, "int8", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_output_appears_whole_or_not_at_all(base, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr("pupil.compress.export.agreement", boom)  # after the artefact and run.json are written
    with pytest.raises(RuntimeError, match="killed mid-way"):
        compress_run(base, "export", tmp_path / "out", fmt="onnx", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither out nor the temporary sibling it was built in


def test_overwrite_replaces_only_what_pupil_wrote(base, onnx_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(onnx_run.dir, out)
    with pytest.raises(PupilError, match="exists; use --overwrite"):
        compress_run(base, "export", out, fmt="torchscript", progress=False)
    (out / "results.json").write_text("{}")  # an audit's output: pupil's
    run = compress_run(base, "export", out, fmt="torchscript", overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["model.torchscript.pt", "run.json"] and run.dir == out
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PupilError, match=r"holds files pupil did not write \(notes.txt\)"):
        compress_run(base, "export", out, fmt="onnx", overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.torchscript.pt").exists()
    with pytest.raises(PupilError, match="is the base run itself"):
        compress_run(base, "export", base, fmt="onnx", overwrite=True, progress=False)
    with pytest.raises(PupilError, match="already a compressed run"):
        compress_run(onnx_run.dir, "int8", tmp_path / "again", progress=False)


class Zeta(nn.Module):
    def forward(self, x):
        return torch.special.zeta(x.abs() + 1.5, torch.full_like(x, 2.0))  # no ONNX translation


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return x
        return -x


class Net(nn.Module):
    def __init__(self, odd: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.odd = odd
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.odd(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("odd, words", [(Zeta(), ["layer odd (Zeta)", "zeta"]), (Branchy(), ["layer odd (Branchy"])])
def test_an_unexportable_layer_is_named(tmp_path, odd, words):
    pixels = Pixels(Net(odd), torch.tensor([0.5]), torch.tensor([0.25])).eval()
    with pytest.raises(PupilError) as e:
        export_onnx(pixels, tmp_path / "m.onnx", torch.rand(2, 1, 8, 8), "the test model")
    line = str(e.value)
    assert line.startswith("the test model cannot be exported") and "\n" not in line
    assert all(w in line for w in words), line


def test_the_audit_measures_the_onnx_runtime_session(onnx_run):
    results = pupil.audit(str(onnx_run.dir), checks="accuracy,efficiency", device="cpu")
    eff = results["checks"]["efficiency"]
    assert eff["metrics"]["weights_file"].endswith("model.onnx")
    assert eff["metrics"]["size_on_disk_bytes"] == (onnx_run.dir / "model.onnx").stat().st_size
    assert eff["metrics"]["flops_network"] is None and any("ONNX Runtime session" in n for n in eff["notes"])
    assert results["run"]["source"]["kind"] == "compressed" and not results["run"]["source"]["gradients"]
    assert any("compressed model" in n for n in results["audit"]["notes"])
    top1 = results["checks"]["accuracy"]["summary"]["top1"]
    ref = load_run(onnx_run.info["compressed"]["base"]["path"])
    test = ref.split("test")
    assert top1 == pytest.approx(
        (logits(ref.model, test.images.float() / 255).argmax(1) == test.targets).float().mean()
    )


@pytest.mark.slow
def test_torchao_int8_loads_and_agrees(base, tmp_path):
    pytest.importorskip("torchao")
    run = compress_run(base, "int8:torchao", tmp_path / "ao", progress=False)
    ref = load_run(base)
    x = val_pixels(ref)
    a, b = logits(ref.model, x), logits(run.model, x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9
    assert run.info["compressed"]["format"] == "pt2" and run.info["source"]["gradients"] is False
    assert run.info["compressed"]["torchao"]


def test_compress_audit_compare_from_the_command_line(base, tmp_path, capsys):
    """The issue's "done means": pupil compress, pupil audit, pupil compare from the CLI; the compare view's
    compression-identified exemplars are exactly the test images whose top-1 differs between the two models."""
    from pupil.cli import main

    out = tmp_path / "int8"
    assert main(["compress", str(base), "--method", "int8:qdq", "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: int8:qdq" in said and "top-1 agrees with the base" in said
    checks = "accuracy,calibration"
    for run in (base, out):
        assert main(["audit", str(run), "--checks", checks, "--device", "cpu"]) == 0
    board_dir = tmp_path / "cmp"
    assert main(["compare", str(base), str(out), "--out", str(board_dir), "--bootstrap", "100"]) == 0
    assert "what compression changed" in capsys.readouterr().out.lower()
    view = json.loads((board_dir / "leaderboard.json").read_text())["changes"]["comparisons"][0]
    a, b = load_run(base), load_run(out)
    test = a.split("test")
    x = test.images.float() / 255
    differ = (logits(a.model, x).argmax(1) != logits(b.model, x).argmax(1)).sum().item()
    assert view["exemplars"]["count"] == differ
    # bad input: one line, status 2, nothing written
    assert main(["compress", str(base), "--method", "distill", "--out", str(tmp_path / "d")]) == 2
    assert main(["compress", str(base), "--out", str(tmp_path / "e")]) == 2
    assert main(["compress", str(base), "--method", "prune:0", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "distill:STUDENT" in err and "give --method" in err and "(0, 1)" in err
    assert not any((tmp_path / n).exists() for n in ("d", "e", "p"))
