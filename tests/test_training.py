import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import pupil
from pupil.config import build
from pupil.errors import PupilError
from pupil.io import read_jsonl
from pupil.training.loop import Interrupted, evaluate, fit


def smoke(tmp_path, recipe, name, **over):
    return build(recipe, dict(out=str(tmp_path), name=name, **over))


def test_tiny_run_learns_and_writes_a_complete_run_dir(tmp_path, smoke_recipe):
    run = fit(smoke(tmp_path, smoke_recipe, "r"), progress=False)
    files = {p.name for p in run.dir.iterdir()}
    assert {"run.json", "model.safetensors", "checkpoint.pt", "metrics.jsonl"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    info = json.loads((run.dir / "run.json").read_text())
    assert info["status"] == "finished" and info["config"]["train"]["epochs"] == 3
    assert info["data"]["classes"] == ["class0", "class1", "class2", "class3"]
    rows = read_jsonl(run.dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    test = pupil.data.load("synthetic", "test")
    assert evaluate(run.model, test)["top1"] > 0.6  # chance is 0.25


def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tmp_path, smoke_recipe):
    straight = fit(smoke(tmp_path, smoke_recipe, "straight", ema_decay=0.9, mixup=0.2), progress=False)

    def stop(state):
        if state["step"] == 11:  # mid-way through epoch 2 (7 steps per epoch)
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="pupil train --resume"):
        fit(smoke(tmp_path, smoke_recipe, "killed", ema_decay=0.9, mixup=0.2), progress=False, on_step=stop)
    info = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert info["status"] == "interrupted"
    resumed = fit(resume=tmp_path / "killed", progress=False)
    a = load_file(straight.dir / "model.safetensors")
    b = load_file(resumed.dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary()["last"]["val_top1"] == straight.summary()["last"]["val_top1"]


def test_resume_from_an_epoch_checkpoint_after_a_hard_kill(tmp_path, smoke_recipe):
    # A SIGKILL during step 9 leaves exactly what is on disk at that moment: epoch 1's checkpoint and a
    # run.json saying "running". Snapshot that, let the run finish, then resume the snapshot.
    def snapshot(state):
        if state["step"] == 9:
            shutil.copytree(state["run_dir"], tmp_path / "killed")

    straight = fit(smoke(tmp_path, smoke_recipe, "s"), progress=False, on_step=snapshot)
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "running"
    resumed = fit(resume=tmp_path / "killed", progress=False)
    a, b = load_file(straight.dir / "model.safetensors"), load_file(resumed.dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(read_jsonl(resumed.dir / "metrics.jsonl")) == 3


def test_existing_run_dir_is_not_overwritten_by_accident(tmp_path, smoke_recipe):
    fit(smoke(tmp_path, smoke_recipe, "x", epochs=0.5), progress=False)
    with pytest.raises(PupilError, match="exists; use --resume"):
        fit(smoke(tmp_path, smoke_recipe, "x", epochs=0.5), progress=False)
    fit(smoke(tmp_path, smoke_recipe, "x", epochs=0.5), progress=False, overwrite=True)
    with pytest.raises(PupilError, match="already finished"):
        fit(resume=tmp_path / "x", progress=False)


def test_adamw_cosine_clip_and_augmentations_run(tmp_path, smoke_recipe):
    cfg = smoke(
        tmp_path,
        smoke_recipe,
        "a",
        opt="adamw",
        lr=3e-3,
        sched="cosine",
        clip_grad=1.0,
        rotate=10.0,
        erase_prob=0.5,
        cutmix=1.0,
        model="vit_tiny",
        epochs=1.0,
        drop_path_rate=0.1,
        tta=True,
    )
    run = fit(cfg, progress=False)
    assert run.model.tta and run.info["model"]["name"] == "vit_tiny"


def test_recipe_errors_are_clear(tmp_path, smoke_recipe):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: fast}\n")
    with pytest.raises(PupilError, match="config field lr"):
        build(bad)
    bad.write_text("optimiser: {}\n")
    with pytest.raises(PupilError, match="unknown section 'optimiser'"):
        build(bad)
    with pytest.raises(PupilError, match="unknown optimizer"):
        build(smoke_recipe, {"opt": "rmsprop"})
    with pytest.raises(PupilError, match="does not exist"):
        build(tmp_path / "nope.yaml")


def test_training_steps_never_run_with_tta(tmp_path, smoke_recipe):
    seen = []

    def spy(state):
        seen.append(state["model"].tta)

    run = fit(smoke(tmp_path, smoke_recipe, "t", tta=True, epochs=2.0), progress=False, on_step=spy)
    assert seen and not any(seen) and run.model.tta


@pytest.mark.parametrize("kind,student", [("soft", "resnet_tiny"), ("hard", "deit_tiny")])
def test_distillation_from_a_teacher_run(tmp_path, smoke_recipe, kind, student):
    teacher = fit(smoke(tmp_path, smoke_recipe, "teacher", epochs=1.0), progress=False)
    cfg = smoke(tmp_path, smoke_recipe, "student", task="distill", teacher=str(teacher.dir), distill_kind=kind,
                model=student, epochs=1.0)  # fmt: skip
    run = fit(cfg, progress=False)
    assert run.info["config"]["train"]["teacher"] == str(teacher.dir)


def test_distillation_task_losses_match_their_definitions():
    from pupil.models import PixelModel
    from pupil.training.tasks import DistillationTask

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    teacher = PixelModel(lin, [0.0], [1.0])
    student_net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    student = PixelModel(student_net, [0.0], [1.0])
    x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    task = DistillationTask(teacher, "soft", alpha=1.0, tau=2.0)
    s, t = student(x), teacher(x)
    p_t = (t / 2).softmax(1)
    expected = (p_t * (p_t.log() - (s / 2).log_softmax(1))).sum(1).mean() * 4
    assert task(student, x, y)["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    hard = DistillationTask(teacher, "hard", alpha=1.0)
    assert hard(student, x, y)["loss"].item() == pytest.approx(F.cross_entropy(s, t.argmax(1)).item(), rel=1e-5)
    with pytest.raises(PupilError, match="unknown distillation kind"):
        DistillationTask(teacher, "warm")


def test_distill_without_teacher_is_a_clear_error(tmp_path, smoke_recipe):
    with pytest.raises(PupilError, match="needs --teacher"):
        fit(smoke(tmp_path, smoke_recipe, "nt", task="distill"), progress=False)
