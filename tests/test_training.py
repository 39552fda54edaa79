import copy
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
from pupil.predict import evaluate
from pupil.training.loop import Interrupted, fit


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
        if state.step == 11:  # mid-way through epoch 2 (7 steps per epoch)
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
        if state.step == 9:
            shutil.copytree(state.run_dir, tmp_path / "killed")

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
        model="vit_test",
        epochs=1.0,
        drop_path_rate=0.1,
        tta=True,
    )
    run = fit(cfg, progress=False)
    assert run.model.tta and run.info["model"]["name"] == "vit_test"


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
        seen.append(state.model.tta)

    run = fit(smoke(tmp_path, smoke_recipe, "t", tta=True, epochs=2.0), progress=False, on_step=spy)
    assert seen and not any(seen) and run.model.tta


@pytest.mark.parametrize("kind,student", [("soft", "resnet_test"), ("hard", "deit_test")])
def test_distillation_from_a_teacher_run(tmp_path, smoke_recipe, kind, student):
    teacher = fit(smoke(tmp_path, smoke_recipe, "teacher", epochs=1.0), progress=False)
    cfg = smoke(tmp_path, smoke_recipe, "student", task="distill", teacher=str(teacher.dir), distill_kind=kind,
                model=student, epochs=1.0)  # fmt: skip
    run = fit(cfg, progress=False)
    assert run.info["config"]["task"]["teacher"] == str(teacher.dir)


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


def test_precise_bn_matches_torch_update_bn(tmp_path, smoke_recipe):
    from torch.optim.swa_utils import update_bn

    from pupil.runtime import to_input

    # fp32 pinned: the reference is fp32, and precision auto means bf16 autocast on CPUs with AVX512-BF16/AMX
    # (tests/test_bf16.py checks the bf16 path against this reference within bf16's tolerance).
    run = fit(smoke(tmp_path, smoke_recipe, "pbn", precise_bn=3, precision="fp32"), progress=False)
    rows = read_jsonl(run.dir / "metrics.jsonl")
    assert rows[-1]["precise_bn_images"] == 3 * 64 and "val_top1" in rows[-1]
    assert run.summary()["last"]["precise_bn_images"] == 3 * 64
    # The reference: torch's own BN-statistics update over the same seeded sample of un-augmented images.
    train = pupil.data.load("synthetic", "train", val_size=64, seed=0)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[: 3 * 64]
    model = copy.deepcopy(run.model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(7.0)  # whatever was there must not matter
    update_bn([to_input(train.images[c], torch.device("cpu"), False) for c in idx.split(64)], model)
    ours = dict(run.model.named_buffers())
    for name, buf in model.named_buffers():
        if "running" in name:
            assert torch.allclose(buf, ours[name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("stage", ["precise_bn", "evaluate_deployed"])
def test_ctrl_c_during_precise_bn_resumes_to_the_same_weights(tmp_path, smoke_recipe, monkeypatch, stage):
    import pupil.training.loop as loop

    straight = fit(smoke(tmp_path, smoke_recipe, "straight", precise_bn=2), progress=False)
    real = getattr(loop, stage)

    def interrupted(state, *args):
        out = real(state, *args)
        if state.step == state.total_steps:  # the pass, or the validation after it (the last epoch's waits)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(loop, stage, interrupted)
    with pytest.raises(Interrupted):
        fit(smoke(tmp_path, smoke_recipe, "killed", precise_bn=2), progress=False)
    monkeypatch.setattr(loop, stage, real)
    resumed = fit(resume=tmp_path / "killed", progress=False)
    a, b = load_file(straight.dir / "model.safetensors"), load_file(resumed.dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = read_jsonl(resumed.dir / "metrics.jsonl")[-1]
    assert last["precise_bn_images"] == 2 * 64 and last["val_top1"] == straight.summary()["last"]["val_top1"]


def test_precise_bn_uses_full_batches_and_refuses_perturbed_tasks(tmp_path, smoke_recipe):
    run = fit(smoke(tmp_path, smoke_recipe, "many", precise_bn=10_000), progress=False)
    n_train = run.info["data"]["train_size"]
    assert read_jsonl(run.dir / "metrics.jsonl")[-1]["precise_bn_images"] == n_train // 64 * 64
    for task in ("noise", "adversarial"):
        with pytest.raises(PupilError, match="clean images"):
            smoke(tmp_path, smoke_recipe, "x", precise_bn=2, task=task)


def test_precise_bn_puts_the_old_statistics_back_on_an_error(tmp_path, smoke_recipe):
    from pupil.training.precise_bn import precise_bn
    from pupil.training.state import build as build_state

    state = build_state(smoke(tmp_path, smoke_recipe, "err", precise_bn=3), tmp_path / "err")
    bns = [m for m in state.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in state.model.named_buffers()}
    calls = []

    def fail_on_second_batch(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    bns[-1].register_forward_pre_hook(fail_on_second_batch)
    with pytest.raises(RuntimeError, match="boom"):
        precise_bn(state)
    after = dict(state.model.named_buffers())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.momentum == 0.1 for m in bns) and state.model.training
