import dataclasses

import pytest
import torch

from pupil.config import TASK_CONFIGS, AdversarialConfig, build, from_dict, task_fields
from pupil.errors import PupilError
from pupil.training.loop import fit
from pupil.training.tasks import TASKS, AdversarialTask, NoiseTask


def tiny_model():
    from pupil.models import create
    from pupil.models.contract import PixelModel

    torch.manual_seed(0)
    return PixelModel(create("resnet_test", num_classes=4, in_chans=1, img_size=16), [0.5], [0.25])


def test_adversarial_task_trains_on_worst_case_inputs():
    model = tiny_model().train()
    x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 4, (8,))
    clean = torch.nn.functional.cross_entropy(model(x), y)
    out = AdversarialTask(epsilon=0.1, steps=3, alpha=0.05)(model, x, y)
    assert out["loss"] > clean  # the attack found inputs with a higher loss
    assert all(p.grad is None for p in model.parameters())  # the attack left no parameter gradients
    out["loss"].backward()
    assert any(p.grad is not None for p in model.parameters())


def test_adversarial_task_accepts_soft_targets_and_zero_epsilon():
    model = tiny_model().train()
    x, y = torch.rand(4, 1, 16, 16), torch.eye(4)
    out = AdversarialTask(epsilon=0.0, steps=1, alpha=0.0)(model, x, y)
    assert torch.isfinite(out["loss"])


def test_noise_task_adds_gaussian_noise():
    seen = []
    model = tiny_model()
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.full((64, 1, 16, 16), 0.5)
    NoiseTask(sigma=0.25)(model, x, torch.zeros(64, dtype=torch.long))
    noise = seen[0] - x
    assert noise.std().item() == pytest.approx(0.25, rel=0.05) and noise.mean().abs() < 0.01


@pytest.mark.parametrize("over", [{"task": "adversarial", "adv_attack": "fgsm"}, {"task": "noise", "sigma": 0.5}])
def test_robust_tasks_train_from_a_recipe(tmp_path, smoke_recipe, over):
    run = fit(build(smoke_recipe, {"out": str(tmp_path), "name": "r", "epochs": 1, **over}), progress=False)
    assert run.info["config"]["train"]["task"] == over["task"]


def test_bad_robust_settings_are_refused(smoke_recipe):
    with pytest.raises(PupilError, match="unknown adversarial attack"):
        build(smoke_recipe, {"adv_attack": "cw"})
    with pytest.raises(PupilError, match="non-negative"):
        build(smoke_recipe, {"sigma": -1.0})


def test_run_json_records_only_the_chosen_methods_settings(tmp_path, smoke_recipe):
    over = {"out": str(tmp_path), "name": "a", "epochs": 0.5, "task": "adversarial", "adv_steps": 2}
    adv = fit(build(smoke_recipe, over), progress=False)
    cfg = adv.info["config"]
    assert cfg["task"] == {"adv_attack": "pgd", "epsilon": 0.1, "adv_steps": 2, "adv_alpha": 0.0}
    assert not {"sigma", "teacher", "epsilon"} & set(cfg["train"])
    plain = build(smoke_recipe, {"out": str(tmp_path), "name": "c"}).to_dict()
    assert plain["task"] is None and not set(task_fields()) & set(plain["train"])


def test_a_setting_of_another_method_is_refused_unless_at_its_default(smoke_recipe):
    with pytest.raises(PupilError, match="^--sigma is a setting of the noise task, not of adversarial$"):
        build(smoke_recipe, {"task": "adversarial", "sigma": 0.5})
    assert build(smoke_recipe, {"task": "adversarial", "sigma": 0.25}).task == AdversarialConfig()


def test_recipes_set_method_settings_in_task_or_in_train(tmp_path):
    new = tmp_path / "new.yaml"
    new.write_text("train: {task: adversarial}\ntask: {adv_attack: fgsm, epsilon: 0.05}\n")
    old = tmp_path / "old.yaml"
    old.write_text("train: {task: adversarial, adv_attack: fgsm, epsilon: 0.05}\n")
    assert build(new).task == build(old).task == AdversarialConfig(adv_attack="fgsm", epsilon=0.05)
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {sigmaa: 0.5}\n")
    with pytest.raises(PupilError, match="unknown field.*sigmaa"):
        build(bad)


def test_old_run_json_with_every_method_field_in_train_round_trips(smoke_recipe):
    cfg = build(smoke_recipe, {"task": "noise", "sigma": 0.5})
    old = cfg.to_dict()
    old["train"] |= {f.name: getattr(c(), f.name) for c in TASK_CONFIGS.values() for f in dataclasses.fields(c)}
    old["train"]["sigma"] = 0.5
    del old["task"]
    assert from_dict(old) == cfg and from_dict(cfg.to_dict()) == cfg


def test_each_task_names_its_config_class():
    for name in TASKS.names():
        assert TASKS.get(name).Config is TASK_CONFIGS.get(name)
