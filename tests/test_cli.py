import json
import subprocess
import sys

import pytest

from pupil.cli import main
from tests.conftest import ROOT


def test_train_eval_end_to_end(tmp_path, capsys):
    recipe = str(ROOT / "recipes/smoke/synthetic.yaml")
    assert main(["train", recipe, "--out", str(tmp_path), "--epochs", "2", "--no-progress", "--lr", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "run directory:" in out
    run = tmp_path / "synthetic"
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["optim"]["lr"] == 0.05 and info["config"]["train"]["epochs"] == 2
    assert main(["eval", str(run), "--split", "test", "--device", "cpu"]) == 0
    result = json.loads((run / "eval_test.json").read_text())
    assert 0 <= result["top1"] <= 1 and result["n"] == 512 and result["split"] == "test"


def test_generated_flags_cover_the_config(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--lr", "--epochs", "--model", "--dataset", "--device", "--ema-decay", "--flip / --no-flip"):
        assert flag in text


def test_models_lists_families_with_flops(capsys):
    assert main(["models", "--family", "resnet", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    r20 = next(r for r in rows if r["name"] == "resnet20")
    assert r20["year"] == 2016 and r20["params"] > 2e5 and r20["flops"] > 1e7


def test_data_show_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["data", "show", "synthetic", "--out", str(out), "--per-class", "3"]) == 0
    assert out.stat().st_size > 1000 and "class0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--dataset", "synthetic", "--model", "resnet999", "--no-progress"], "unknown model 'resnet999'"),
        (["train", "--dataset", "nope", "--no-progress"], "unknown dataset 'nope'"),
        (["eval", "/nonexistent/run"], "does not exist"),
        (["train", "--dataset", "synthetic", "--device", "cuda:7", "--no-progress"], "CUDA is not available"),
        (["train", "missing.yaml"], "recipe missing.yaml does not exist"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "pupil", "models", "--family", "lenet"], capture_output=True, text=True)
    assert res.returncode == 0 and "lenet5" in res.stdout


def test_predict_prints_top_labels_for_image_files(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    recipe = str(ROOT / "recipes/smoke/synthetic.yaml")
    assert main(["train", recipe, "--out", str(tmp_path), "--epochs", "1", "--no-progress"]) == 0
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8), "RGB").save(img)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "synthetic"), str(img), "--top", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("x.png") and len(lines) == 3 and lines[1].strip().startswith("class")
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main(["predict", str(tmp_path / "synthetic"), str(tmp_path / "bad.png")]) == 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    recipe = str(ROOT / "recipes/smoke/synthetic.yaml")
    assert main(["train", recipe, "--out", str(out), "--epochs", "1", "--no-progress", "--name", "t"]) == 0
    return out / "t"


def _image(path, size=(16, 16)):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8), "L").save(path)
    return path


def test_explain_writes_an_overlay(tiny_run, tmp_path, capsys):
    img, out = _image(tmp_path / "x.png"), tmp_path / "overlay.png"
    assert main(["explain", str(tiny_run), str(img), "--out", str(out), "--device", "cpu", "--target", "class1"]) == 0
    assert out.stat().st_size > 1000 and "map for class1" in capsys.readouterr().out.replace("\n", " ")
    assert main(["explain", str(tiny_run), str(img), "--method", "magic"]) == 2
    assert "unknown explanation method" in capsys.readouterr().err
    assert main(["explain", str(tiny_run), str(img), "--target", "class99"]) == 2


def test_data_corrupt_writes_an_imagenet_c_tree(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["data", "corrupt", "synthetic", "--out", str(out), "--n", "6", "--corruptions", "fog,glass_blur"]
    assert main([*argv, "--severities", "1,5"]) == 0
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 2 * 2 * 6 and {p.parts[-4] for p in pngs} == {"fog", "glass_blur"}
    assert main(["data", "corrupt", "synthetic", "--out", str(out), "--corruptions", "rain"]) == 2
    assert "unknown corruption 'rain'" in capsys.readouterr().err


def test_audit_shortcut_flags_need_their_check(tiny_run, capsys):
    assert main(["audit", str(tiny_run), "--checks", "accuracy", "--ood", "mnist-5k"]) == 2
    assert "--ood is a setting of the ood check" in capsys.readouterr().err


def test_predict_defers_below_a_confidence_or_ood_score(tiny_run, tmp_path, capsys):
    img = _image(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["predict", str(tiny_run), str(img), "--defer-below", "1.0", "--device", "cpu"]) == 0
    assert "deferred (confidence" in capsys.readouterr().out
    assert main(["predict", str(tiny_run), str(img), "--defer-below", "0", "--device", "cpu"]) == 2
    assert main(["predict", str(tiny_run), str(img), "--ood-below", "1e9", "--ood-score", "max_logit"]) == 0
    assert "looks out of distribution" in capsys.readouterr().out
    assert main(["predict", str(tiny_run), str(img), "--ood-below", "0", "--ood-score", "knn"]) == 2
    assert "cannot be computed per image" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(img), "--defer-below", "auto"]) == 2
    assert "needs an audit" in capsys.readouterr().err


def test_help_and_import_do_not_load_torch():
    # `pupil --help` and `import pupil` stay fast: torch and timm load on first use of a command or attribute.
    code = (
        "import sys, pupil, pupil.cli; assert 'torch' not in sys.modules and 'timm' not in sys.modules; pupil.data.load"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import pupil

        pupil.nope  # noqa: B018


def test_the_audit_shortcut_flags_are_the_ones_the_checks_declare():
    import dataclasses

    import typer

    from pupil.audit import CHECKS
    from pupil.cli import app, audit_shortcuts

    declared = audit_shortcuts()
    assert declared == {
        "ood": ("ood", "extra"),
        "groups": ("fairness", "groups"),
        "members": ("uncertainty", "members"),
        "baseline": ("corruption", "baseline"),
    }
    options = {p.name for p in typer.main.get_command(app).commands["audit"].params}
    assert set(declared) <= options  # every declared flag exists on `pupil audit`
    for flag, (check, field) in declared.items():  # and sets a real setting of its check
        assert field in {f.name for f in dataclasses.fields(CHECKS.get(check).Config)}, flag
