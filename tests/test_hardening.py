"""Issue 11: no data loss, no silent corruption, no tracebacks. Each test reproduces a reported case."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, features
from safetensors.torch import load_file

from pupil.cli import main
from pupil.config import build
from pupil.data import load
from pupil.data.images import read_images
from pupil.errors import Interrupted, PupilError
from pupil.training.loop import fit
from tests.conftest import ROOT

RECIPE = str(ROOT / "recipes/smoke/synthetic.yaml")


def _png(path, size=(16, 16), mode="L", seed=0):
    rng = np.random.default_rng(seed)
    shape = size[::-1] + ((len(mode),) if mode in ("RGB", "RGBA", "CMYK") else ())
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture
def messy(tmp_path):
    """A messy folder of real image files: 16-bit, CMYK, RGBA, palette, WebP, corrupt, empty and junk files."""
    root = tmp_path / "messy"
    for c in ("coat", "shirt"):
        for i in range(4):
            _png(root / c / f"{i}.png", seed=i + 10 * len(c))
    a16 = (np.arange(16 * 16).reshape(16, 16) * 250).astype(np.uint16)
    Image.fromarray(a16).save(root / "coat" / "deep.png")  # I;16
    cmyk = np.random.default_rng(1).integers(0, 255, (16, 16, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(root / "coat" / "print.jpg")
    _png(root / "shirt" / "alpha.png", mode="RGBA")
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").convert("P").save(root / "shirt" / "palette.gif")
    if features.check("webp"):
        _png(root / "shirt" / "x.png").rename(root / "shirt" / "tmp.png")
        Image.open(root / "shirt" / "tmp.png").save(root / "shirt" / "web.webp")
        (root / "shirt" / "tmp.png").unlink()
    (root / "coat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "shirt" / "empty.jpg").write_bytes(b"")
    (root / "shirt" / "notes.txt").write_text("not an image")
    (root / "coat" / ".DS_Store").write_bytes(b"\0\0junk")
    return root


# 1. --overwrite never deletes what pupil did not write --------------------------------------------------------


def test_name_dotdot_with_overwrite_deletes_nothing(tmp_path, capsys):
    parent = tmp_path / "sb" / "parent"
    (parent / "inner").mkdir(parents=True)
    (parent / "run.json").write_text("{}")
    (parent / "keep.txt").write_text("mine")
    argv = ["train", RECIPE, "--out", str(parent / "inner"), "--name", "..", "--overwrite", "--no-progress"]
    assert main(argv) == 2
    assert "plain folder name" in capsys.readouterr().err
    assert (parent / "keep.txt").read_text() == "mine" and (parent / "inner").is_dir()


def test_absolute_name_with_overwrite_deletes_nothing(tmp_path, capsys):
    victim = tmp_path / "some" / "dir"
    victim.mkdir(parents=True)
    (victim / "run.json").write_text("{}")
    (victim / "thesis.tex").write_text("\\documentclass{book}")
    argv = ["train", RECIPE, "--out", str(tmp_path / "runs"), "--name", str(victim), "--overwrite", "--no-progress"]
    assert main(argv) == 2
    assert "plain folder name" in capsys.readouterr().err
    assert (victim / "thesis.tex").exists() and (victim / "run.json").exists()


@pytest.mark.parametrize("name", ["a/b", "..", ".", ".hidden", "~x", "-x", "a\\b", "tab\tname"])
def test_run_names_must_be_plain(name, tmp_path):
    with pytest.raises(PupilError, match="plain folder name"):
        build(RECIPE, {"out": str(tmp_path), "name": name})


def test_overwrite_removes_only_pupils_files(tmp_path):
    cfg = build(RECIPE, {"out": str(tmp_path), "name": "r", "epochs": 0.3})
    run = fit(cfg, progress=False).dir
    (run / "results.json").write_text("{}")
    (run / "eval_test.json").write_text("{}")
    (run / "audit").mkdir()
    (run / "audit" / "shard0.jsonl").write_text("")
    (run / "thesis.tex").write_text("mine")
    with pytest.raises(PupilError, match=r"holds files pupil did not write \(thesis\.tex\)"):
        fit(cfg, progress=False, overwrite=True)
    assert (run / "thesis.tex").read_text() == "mine" and (run / "run.json").exists()
    (run / "thesis.tex").unlink()
    fit(cfg, progress=False, overwrite=True)
    assert not (run / "results.json").exists() and not (run / "audit").exists()
    assert not (run / "eval_test.json").exists() and (run / "run.json").exists()


def test_a_folder_of_user_files_is_never_trained_into(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "data.csv").write_text("x")
    with pytest.raises(PupilError, match="did not write"):
        fit(build(RECIPE, {"out": str(tmp_path), "name": "r"}), progress=False)
    assert (tmp_path / "r" / "data.csv").read_text() == "x"


# 2. bit depth is rescaled, never clipped ---------------------------------------------------------------------


def test_16bit_png_is_rescaled_as_computed_by_hand(tmp_path):
    v = np.array([[0, 257, 32768, 65535, 1000, 40000]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    dec = read_images([tmp_path / "deep.png"])
    # round(v * 255 / 65535): 1000 -> 3.89 -> 4, 32768 -> 127.502 -> 128, 40000 -> 155.65 -> 156
    assert dec.images.flatten().tolist() == [0, 1, 128, 255, 4, 156]
    assert dec.conversions["rescaled_16bit"] == 1
    assert read_images([tmp_path / "deep.png"], mode="RGB").images.shape == (1, 3, 1, 6)


def test_32bit_and_float_images_are_rescaled(tmp_path):
    Image.fromarray(np.array([[0, 1000, 65535]], np.int32), "I").save(tmp_path / "i16.tif")
    Image.fromarray(np.array([[0, 100, 255]], np.int32), "I").save(tmp_path / "i8.tif")
    Image.fromarray(np.array([[-100, 0, 300]], np.int32), "I").save(tmp_path / "iwide.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f01.tif")
    Image.fromarray(np.array([[-1.0, 0.0, 3.0]], np.float32), "F").save(tmp_path / "fwide.tif")
    Image.fromarray(np.array([[0.0, np.nan, 1.0]], np.float32), "F").save(tmp_path / "fnan.tif")
    got = {p: read_images([tmp_path / p]).images.flatten().tolist() for p in ("i16.tif", "i8.tif", "iwide.tif")}
    assert got == {"i16.tif": [0, 4, 255], "i8.tif": [0, 100, 255], "iwide.tif": [0, 64, 255]}
    assert read_images([tmp_path / "f01.tif"]).images.flatten().tolist() == [0, 128, 255]  # 127.5 rounds to even
    assert read_images([tmp_path / "fwide.tif"]).images.flatten().tolist() == [0, 64, 255]
    with pytest.raises(PupilError, match="fnan.tif: non-finite pixel values"):
        read_images([tmp_path / "fnan.tif"])


def test_alpha_cmyk_and_exif_rotation_are_counted(tmp_path):
    _png(tmp_path / "a.png", mode="RGBA")
    Image.fromarray(np.zeros((16, 16, 4), np.uint8), "CMYK").save(tmp_path / "c.jpg")
    im = Image.fromarray(np.zeros((10, 16), np.uint8), "L")  # 16 wide, 10 high, stored rotated
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": viewed 10 wide, 16 high
    im.save(tmp_path / "r.jpg", exif=exif)
    dec = read_images([tmp_path / "a.png", tmp_path / "c.jpg", tmp_path / "r.jpg"], mode="RGB", img_size=16)
    conv = {k: v for k, v in dec.conversions.items() if v}
    assert conv == {"alpha_dropped": 1, "converted_mode": 3, "exif_rotated": 1, "resized": 1}


# 3. manifests: no label becomes a class by accident -----------------------------------------------------------


def _manifest(tmp_path, rows):
    for c in ("coat", "shirt"):
        for i in range(4):
            _png(tmp_path / c / f"{i}.png", seed=i)
    lines = ["path,label"] + [f"{c}/{i}.png,{c}" for c in ("coat", "shirt") for i in range(4)] + rows
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


def test_a_single_unknown_label_is_refused_by_name(tmp_path):
    _png(tmp_path / "u.png")
    m = _manifest(tmp_path, ["u.png,Unicorn"])
    with pytest.raises(PupilError, match=r"fewer than 2 images \(--min-per-class\): Unicorn \(1\)"):
        load(str(m), "train")
    assert load(str(m), "all", min_per_class=1).classes == ["Unicorn", "coat", "shirt"]


def test_a_file_listed_twice_with_two_labels_is_refused(tmp_path):
    m = _manifest(tmp_path, ["coat/1.png,shirt"])
    with pytest.raises(PupilError, match=r"m\.csv:10: coat/1\.png is listed again with label 'shirt'; line 3 says"):
        load(str(m), "all")
    m = _manifest(tmp_path, ["coat/1.png,coat"])  # the same label twice: counted once
    ds = load(str(m), "all")
    assert len(ds) == 8 and ds.meta["duplicate_rows"] == 1


def test_inferred_classes_are_printed_before_training(tmp_path, capsys):
    m = _manifest(tmp_path, [])
    argv = ["train", RECIPE, "--dataset", str(m), "--out", str(tmp_path / "runs"), "--val-size", "0"]
    assert main([*argv, "--batch-size", "2", "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 classes, inferred from the manifest's labels: coat, shirt" in out
    assert out.index("inferred") < out.index("trained ")


# 4. usage errors: the usage line and exit 2, never a traceback ------------------------------------------------

COMMANDS = [
    "train", "eval", "predict", "explain", "models", "audit", "report", "compare", "serve", "data show", "data corrupt"
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option_prints_usage_and_exits_2(command, capsys):
    argv = [*command.split(), "x", "--bogus-option"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Usage: pupil " in err and "No such option" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["eval"],
        ["audit", "r", "--seed", "abc"],
        ["bogus-cmd"],
        ["data", "bogus"],
        ["predict"],
        ["train", "--seed", "x"],
    ],
)
def test_missing_arguments_bad_types_and_unknown_commands_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Usage: pupil" in err and "Traceback" not in err


def test_usage_errors_from_the_installed_entry_point():
    res = subprocess.run([sys.executable, "-m", "pupil", "audit", "r", "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "Usage: pupil audit" in res.stderr and "Traceback" not in res.stderr


# 5. a messy folder: fail lists every bad file at once, skip trains and reports them ---------------------------


def test_messy_folder_fails_with_every_bad_file_listed(messy):
    with pytest.raises(PupilError) as e:
        load(str(messy), "all")
    msg = str(e.value)
    assert msg.startswith("2 of ") and "--on-bad-image skip" in msg.splitlines()[0]
    assert "broken.png: not an image file PIL can read" in msg and "empty.jpg: empty file" in msg


def test_messy_folder_trains_with_skip_and_writes_the_report(messy, tmp_path, capsys):
    argv = ["train", RECIPE, "--dataset", str(messy), "--out", str(tmp_path), "--name", "m", "--on-bad-image", "skip"]
    assert main([*argv, "--val-size", "2", "--batch-size", "4", "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 image file(s) that cannot be used" in out and "ignored 2 file(s)" in out  # notes.txt, .DS_Store
    report = json.loads((tmp_path / "m" / "bad_images.json").read_text())
    assert sorted(os.path.basename(b["path"]) for b in report) == ["broken.png", "empty.jpg"]
    info = json.loads((tmp_path / "m" / "run.json").read_text())
    assert info["data"]["bad_images"] == 2
    conv = info["data"]["conversions"]  # counted over the training split (the val images are held out)
    assert conv["rescaled_16bit"] + conv["alpha_dropped"] >= 1


def test_manifest_rows_for_missing_files_are_bad_images(tmp_path):
    m = _manifest(tmp_path, ["gone.png,coat"])
    with pytest.raises(PupilError, match="gone.png: missing file"):
        load(str(m), "all")
    ds = load(str(m), "all", on_bad_image="skip")
    assert len(ds) == 8 and ds.meta["bad_images"][0]["reason"] == "missing file"


# 6. a real SIGINT or SIGTERM anywhere in a step resumes bit-exactly ---------------------------------------------

SIGINT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pupil.config import build
    from pupil.errors import Interrupted
    from pupil.training.loop import fit

    recipe, out, where, at, signame = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    fired = []

    def kill(*_):
        if not fired:
            fired.append(1)
            os.kill(os.getpid(), getattr(signal, signame))  # a real signal, delivered in the middle of the step

    def on_step(state):
        if state.step == at - 1:  # arm the hook for the next step
            if where == "forward":
                state.model.register_forward_hook(kill)
            else:  # after the weights moved, before the step counter and the EMA did
                state.opt.register_step_post_hook(kill)

    cfg = build(recipe, dict(out=out, name="killed", threads=1, precision="fp32", ema_decay=0.9, mixup=0.2))
    try:
        fit(cfg, progress=False, on_step=on_step)
    except Interrupted as e:
        print(e)
        sys.exit(130)
    """
)


@pytest.mark.parametrize(
    "where,at,signame", [("forward", 10, "SIGINT"), ("optimizer", 12, "SIGINT"), ("forward", 11, "SIGTERM")]
)
def test_real_signal_mid_step_resumes_exactly(where, at, signame, tmp_path):
    over = dict(out=str(tmp_path), name="s", threads=1, precision="fp32", ema_decay=0.9, mixup=0.2)
    straight = fit(build(RECIPE, over), progress=False)
    script = tmp_path / "kill.py"
    script.write_text(SIGINT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, str(script), RECIPE, str(tmp_path), where, str(at), signame],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 130, res.stderr[-2000:]
    assert f"interrupted at step {at}" in res.stdout
    resumed = fit(resume=tmp_path / "killed", progress=False)
    a, b = load_file(straight.dir / "model.safetensors"), load_file(resumed.dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


TERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import pupil.compress.export as export
    from pupil.cli import main

    build = export.Job.build

    def held(self, *args, **kwargs):  # the artefact is written into the hidden folder; then the job is killed
        build(self, *args, **kwargs)
        print("built", flush=True)
        time.sleep(120)

    export.Job.build = held
    sys.exit(main(["compress", sys.argv[1], "--method", "export", "--format", "onnx", "--out", sys.argv[2]]))
    """
)


def test_sigterm_during_compress_leaves_nothing_behind(tiny_run, tmp_path):
    """A scheduler's SIGTERM runs the same clean-up as Ctrl-C: the half-built hidden folder is removed, no --out
    appears, and the command says so with status 143."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    script, out = tmp_path / "term.py", tmp_path / "out" / "c"
    script.write_text(TERM_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tiny_run), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout.readline().strip() == b"built", proc.stderr.read()[-2000:]
        assert [p.name[:3] for p in out.parent.iterdir()] == [".c."]  # the hidden folder exists now
        proc.terminate()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    assert code == 143 and "pupil: terminated" in err, err[-2000:]
    assert list(out.parent.iterdir()) == []


# 7. two audits of one run: the second is told, nothing is lost ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard")
    return fit(build(RECIPE, {"out": str(out), "name": "t", "epochs": 1}), progress=False).dir


def test_a_second_audit_of_a_busy_run_is_refused(tiny_run, capsys):
    from pupil.run import run_lock

    with run_lock(tiny_run, "auditing"):
        assert main(["audit", str(tiny_run), "--checks", "accuracy", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()} is auditing it" in err and len(err.strip().splitlines()) == 1
    assert main(["audit", str(tiny_run), "--checks", "accuracy", "--device", "cpu"]) == 0  # free again


def test_training_into_a_run_being_audited_is_refused(tiny_run):
    from pupil.run import run_lock

    cfg = build(RECIPE, {"out": str(tiny_run.parent), "name": "t", "epochs": 1})
    with run_lock(tiny_run, "auditing"), pytest.raises(PupilError, match="is busy"):
        fit(cfg, progress=False, overwrite=True)
    assert (tiny_run / "model.safetensors").exists()  # nothing was removed while the lock was held


# 8. decompression bombs: one line naming the file --------------------------------------------------------------


@pytest.mark.parametrize("side", [30, 40])  # 900 px: over the limit (a warning in PIL); 1600 px: over twice
def test_decompression_bombs_are_refused_by_name(side, tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 750)
    bomb = _png(tmp_path / "bomb.png", size=(side, side))
    assert main(["predict", str(tiny_run), str(bomb), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bomb.png: over PIL's decompression-bomb limit of 750 pixels" in err
    folder = tmp_path / "f"
    for c in ("a", "b"):
        for i in range(2):
            _png(folder / c / f"{i}.png", size=(8, 8))
    bomb.rename(folder / "a" / "bomb.png")
    assert main(["data", "show", str(folder), "--out", str(tmp_path / "g.png")]) == 2
    assert "bomb.png: over PIL's decompression-bomb limit" in capsys.readouterr().err
    argv = ["train", RECIPE, "--dataset", str(folder), "--out", str(tmp_path), "--val-size", "0", "--no-progress"]
    assert main(argv) == 2 and "bomb.png: over PIL's" in capsys.readouterr().err


def test_big_jpegs_are_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    Image.fromarray(np.full((1200, 1600, 3), 128, np.uint8)).save(tmp_path / "big.jpg")
    asked = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile, "draft", lambda im, mode, size: asked.append(size) or draft(im, mode, size)
    )
    seen = []
    load_ = JpegImagePlugin.JpegImageFile.load
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda im: seen.append(im.size) or load_(im))
    x = read_images([tmp_path / "big.jpg"], img_size=28, mode="RGB").images
    assert asked == [(28, 28)] and seen[-1] == (200, 150)  # decoded at 1/8 scale, not 1600x1200
    assert x.shape == (1, 3, 28, 28) and abs(int(x.float().mean()) - 128) <= 2


# 10. data paths: absolute, fingerprinted, refused when changed -------------------------------------------------


def _folder(root, n=6):
    for c in ("a", "b"):
        for i in range(n):
            _png(root / c / f"{i}.png", size=(8, 8), seed=i + (c == "b") * 50)


def test_relative_dataset_path_works_from_elsewhere_and_changes_are_refused(tmp_path, monkeypatch, capsys):
    _folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    argv = ["train", RECIPE, "--dataset", "data", "--out", "runs", "--name", "r", "--val-size", "2"]
    assert main([*argv, "--batch-size", "2", "--epochs", "1", "--no-progress"]) == 0
    run = tmp_path / "runs" / "r"
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["data"]["dataset"] == str(tmp_path / "data")
    assert info["data"]["fingerprint"]["files"] == 12
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    assert json.loads((run / "eval_test.json").read_text())["n"] == 2  # the 20% test carve: one image a class
    _png(tmp_path / "data" / "a" / "new.png", size=(8, 8))
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu"]) == 2
    assert "changed since the run was trained (13 files" in capsys.readouterr().err
    assert main(["eval", str(run), "--device", "cpu", "--data-dir", str(tmp_path / "data")]) == 0


def test_a_relative_path_recorded_by_an_older_pupil_is_named(tiny_run, tmp_path, monkeypatch, capsys):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run.json").read_text())
    info["data"]["dataset"] = "my_images"
    (run / "run.json").write_text(json.dumps(info))
    assert main(["eval", str(run), "--device", "cpu"]) == 2
    assert "the run's data my_images is not there" in capsys.readouterr().err


# 12. smaller defects ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_learning_rate_is_refused(value, tmp_path, capsys):
    assert main(["train", RECIPE, "--out", str(tmp_path), "--lr", value, "--no-progress"]) == 2
    assert f"config field lr must be a finite number, not {float(value)!r}" in capsys.readouterr().err
    assert not (tmp_path / "synthetic").exists()


def test_a_diverging_run_is_marked_failed(tmp_path):
    cfg = build(RECIPE, {"out": str(tmp_path), "name": "d", "lr": 1e30, "opt": "sgd", "label_smoothing": 0.0})
    with pytest.raises(PupilError, match="training loss became"):
        fit(cfg, progress=False)
    info = json.loads((tmp_path / "d" / "run.json").read_text())
    assert info["status"] == "failed" and "training loss became" in info["history"]["error"]


def test_resume_restarts_a_run_killed_before_its_first_checkpoint(tmp_path):
    import shutil

    def snapshot(state):
        if state.step == 2:
            shutil.copytree(state.run_dir, tmp_path / "early")

    straight = fit(build(RECIPE, {"out": str(tmp_path), "name": "s"}), progress=False, on_step=snapshot)
    assert not (tmp_path / "early" / "checkpoint.pt").exists()
    resumed = fit(resume=tmp_path / "early", progress=False)
    a, b = load_file(straight.dir / "model.safetensors"), load_file(resumed.dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "over", [{"dataset": "/nonexistent/folder"}, {"device": "cuda:7"}, {"model_args": {"widths": [1]}}]
)
def test_no_empty_run_folder_is_left_after_an_error(over, tmp_path):
    with pytest.raises((PupilError, Exception)):
        fit(build(RECIPE, {"out": str(tmp_path), "name": "e", **over}), progress=False)
    assert not (tmp_path / "e").exists()


def test_top_must_be_positive(tiny_run, tmp_path, capsys):
    img = _png(tmp_path / "x.png")
    assert main(["predict", str(tiny_run), str(img), "--top", "0"]) == 2
    assert "--top must be at least 1" in capsys.readouterr().err


def test_a_malicious_checkpoint_is_refused_without_suggesting_weights_only_false(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "evil"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run.json").read_text())
    info["status"] = "interrupted"
    (run / "run.json").write_text(json.dumps(info))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"step": Evil()}, run / "checkpoint.pt")
    with pytest.raises(PupilError) as e:
        fit(resume=run, progress=False)
    assert "refusing to load" in str(e.value) and "weights_only" not in str(e.value)
    assert not marker.exists()


def test_explain_and_data_show_never_replace_a_users_file(tiny_run, tmp_path, monkeypatch, capsys):
    img = _png(tmp_path / "x.png")
    (tmp_path / "x_gradcam.png").write_text("my own file")
    assert main(["explain", str(tiny_run), str(img), "--device", "cpu"]) == 2
    assert (tmp_path / "x_gradcam.png").read_text() == "my own file"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic_train.png").write_text("mine too")
    assert main(["data", "show", "synthetic"]) == 2
    assert (tmp_path / "synthetic_train.png").read_text() == "mine too"
    assert "already exists; pass --out" in capsys.readouterr().err


def test_interrupted_is_a_pupil_error_with_the_resume_command():
    assert issubclass(Interrupted, PupilError)


@pytest.mark.parametrize(
    "over,message",
    [
        ({"model_args": {"num_classes": 3}}, "may not set num_classes: it comes from the dataset"),
        ({"model_args": {"drop_rate": 0.5}}, "may not set drop_rate: it comes from --drop-rate"),
        ({"model_args": {"widths": [8]}, "pretrained": True}, "cannot change a pretrained architecture"),
    ],
)
def test_model_args_cannot_shadow_what_pupil_fills_in(over, message, tmp_path):
    with pytest.raises(PupilError, match=message):
        build(RECIPE, {"out": str(tmp_path), **over})


def test_the_card_records_which_data_was_audited(tmp_path):
    from pupil.audit import run_audit
    from pupil.report.render import render_run

    _folder(tmp_path / "data")
    over = {"out": str(tmp_path), "name": "r", "dataset": str(tmp_path / "data"), "val_size": 2, "batch_size": 2}
    run = fit(build(RECIPE, {**over, "epochs": 1}), progress=False).dir
    res = run_audit(run, ["accuracy"], device="cpu")
    d = res["audit"]["data"]
    assert d["dataset"] == str(tmp_path / "data") and d["matches_training"] is True and d["fingerprint"]["files"] == 12
    _png(tmp_path / "data" / "b" / "extra.png", size=(8, 8))
    res = run_audit(run, ["accuracy"], device="cpu", data_dir=str(tmp_path / "data"))
    assert res["audit"]["data"]["matches_training"] is False and res["audit"]["data"]["data_dir"]
    html, card = render_run(run)
    assert "NOT the data the run was trained on" in card.read_text()
    assert "not the data the run was trained on" in html.read_text()


def test_an_unknown_energy_country_is_refused_before_training(tmp_path):
    cfg = build(RECIPE, {"out": str(tmp_path), "name": "c", "track_energy": True, "energy_country": "XYZ"})
    with pytest.raises(PupilError, match="energy_country must be an ISO 3166 alpha-3 code.*not 'XYZ'"):
        fit(cfg, progress=False)
    assert not (tmp_path / "c").exists()


def test_written_files_get_the_usual_permissions(tmp_path):
    """atomic_write's temporary file is 0600 (mkstemp); the file it becomes is as readable as open() makes it."""
    import os

    from pupil.io import write_text

    mask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
