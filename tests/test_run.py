import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pupil.config import build
from pupil.errors import PupilError
from pupil.run import load_run
from pupil.training.loop import fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    from tests.conftest import ROOT

    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "base", "epochs": 0.5})
    return fit(cfg, progress=False).dir


def copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_loaded_model_takes_pixels_and_matches_training(trained):
    run = load_run(trained)
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        expected = run.model.net((x - run.model.mean) / run.model.std)
        assert torch.allclose(run.model(x), expected)


def test_missing_and_corrupt_files_are_named(trained, tmp_path):
    with pytest.raises(PupilError, match="does not exist"):
        load_run(tmp_path / "nothing")
    d = copy(trained, tmp_path / "a")
    (d / "run.json").write_text("{not json")
    with pytest.raises(PupilError, match="corrupt .*run.json"):
        load_run(d)
    d = copy(trained, tmp_path / "b")
    (d / "model.safetensors").unlink()
    with pytest.raises(PupilError, match="no model.safetensors"):
        load_run(d)
    d = copy(trained, tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(PupilError, match="corrupt weights"):
        load_run(d)
    d = copy(trained, tmp_path / "d")
    (d / "run.json").unlink()
    with pytest.raises(PupilError, match="run.json is missing"):
        load_run(d)


def test_class_list_that_disagrees_with_the_checkpoint(trained, tmp_path):
    d = copy(trained, tmp_path / "e")
    info = json.loads((d / "run.json").read_text())
    info["data"]["classes"] = info["data"]["classes"][:3]
    (d / "run.json").write_text(json.dumps(info))
    with pytest.raises(PupilError, match="lists 3 classes but the model has 4"):
        load_run(d)
    info["model"]["num_classes"] = 3
    (d / "run.json").write_text(json.dumps(info))
    with pytest.raises(PupilError, match=r"head.weight has shape \(4, 32\).*needs \(3, 32\)"):
        load_run(d)


def test_weights_with_foreign_tensors_are_refused(trained, tmp_path):
    d = copy(trained, tmp_path / "f")
    state = load_file(d / "model.safetensors")
    state["evil"] = torch.zeros(1)
    save_file(state, d / "model.safetensors")
    with pytest.raises(PupilError, match="does not have: evil"):
        load_run(d)


def test_checkpoint_is_read_without_unpickling_code(trained, tmp_path):
    import pickle

    from pupil.training.checkpoint import load_checkpoint

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"x": Boom()}, protocol=2))
    with pytest.raises(PupilError, match="refusing to load .*loading it could run code"):
        load_checkpoint(path)
