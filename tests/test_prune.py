"""``pupil compress --method prune:RATIO`` and ``distill:STUDENT``: pruning reaches its FLOPs target by an independent
count, removes only what it says, still classifies after its fine-tune within its budget; distillation builds the
right config and a loadable run; every refusal is one PupilError line."""

import copy
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pupil
from pupil.compress.distill import distill_config, distill_run
from pupil.compress.prune import prune_net, prune_run, rebuild_kwargs, recalibrate_bn
from pupil.config import build
from pupil.errors import PupilError
from pupil.models import create
from pupil.models.stats import count_flops
from pupil.predict import evaluate
from pupil.run import load_run
from pupil.training.loop import fit

pytest.importorskip("torch_pruning")


SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke" / "synthetic.yaml"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A small trained run (resnet_test on the synthetic gratings, flip TTA on), fp32 so it matches on any CPU."""
    out = tmp_path_factory.mktemp("runs")
    return fit(build(SMOKE, dict(out=str(out), name="teacher", precision="fp32", tta=True, epochs=4.0)), progress=False)


def lenet_flops(c1: int, c3: int, f5: int, f6: int, classes: int = 10) -> int:
    """LeNet-5's FLOPs on a 28x28 image by hand: 2 x (multiply-adds of each convolution and linear layer)."""
    conv1 = c1 * 1 * 5 * 5 * 28 * 28  # padded by 2: 28x28 outputs
    conv2 = c3 * c1 * 5 * 5 * 10 * 10  # 14x14 after pooling -> 10x10
    return 2 * (conv1 + conv2 + c3 * 5 * 5 * f5 + f5 * f6 + f6 * classes)


def model_info(name: str) -> dict:
    """run.json's ``model`` section for ``name`` at its default size on 28x28 grey images of 10 classes."""
    return {"name": name, "kwargs": {}, "num_classes": 10, "in_chans": 1, "img_size": 28}


# ---------------------------------------------------------------------------------------------------------------
# Pruning the network


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_lenet_reaches_the_flops_ratio_by_a_hand_count(ratio):
    net = create("lenet5", num_classes=10, in_chans=1, img_size=28)
    pruned, rec = prune_net(net, ratio, (1, 28, 28), name="lenet5")
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    hand = lenet_flops(convs[0].out_channels, convs[1].out_channels, linears[0].out_features, linears[1].out_features)
    assert rec["flops_before"] == lenet_flops(6, 16, 120, 84) == 833_040
    assert rec["flops_after"] == hand
    assert ratio <= rec["achieved_ratio"] == pytest.approx(1 - hand / 833_040)
    assert rec["achieved_ratio"] <= ratio + 0.1  # one of C1's six maps carries ~10% of the FLOPs (C3's inputs)
    assert rec["params_after"] == sum(p.numel() for p in pruned.parameters()) < rec["params_before"]
    assert linears[-1].out_features == 10  # the classifier keeps its classes
    assert sum(p.numel() for p in net.parameters()) == rec["params_before"]  # the input network is left alone
    widths = [convs[0].out_channels, convs[1].out_channels, linears[0].out_features, linears[1].out_features]
    assert rebuild_kwargs(
        {"name": "lenet5", "kwargs": {}, "num_classes": 10, "in_chans": 1, "img_size": 28}, pruned
    ) == {"widths": widths}


def test_resnet_flops_agree_with_torch_prunings_counter_and_channels_are_multiples():
    import torch_pruning as tp

    net = create("resnet20", num_classes=10, in_chans=1, img_size=28)
    pruned, rec = prune_net(net, 0.5, (1, 28, 28), name="resnet20")
    x = torch.zeros(1, 1, 28, 28)
    # torch-pruning's counter also counts BN, ReLU and pooling; convolutions and linears dominate it.
    macs0, _ = tp.utils.count_ops_and_params(net, x)
    macs1, _ = tp.utils.count_ops_and_params(pruned, x)
    assert 1 - macs1 / macs0 == pytest.approx(rec["achieved_ratio"], abs=0.02)
    assert 0.5 <= rec["achieved_ratio"] <= 0.55
    m = rec["channel_multiple"]
    convs = {n: c for n, c in pruned.named_modules() if isinstance(c, nn.Conv2d)}
    assert rec["channels"] and all(v["after"] % m == 0 and v["after"] < v["before"] for v in rec["channels"].values())
    assert all(convs[n].out_channels == v["after"] for n, v in rec["channels"].items())
    # The contract still holds on the smaller network: features, pooled features of the new width, logits.
    feats = pruned.forward_features(torch.rand(3, 1, 28, 28))
    assert pruned.forward_head(feats, pre_logits=True).shape == (3, pruned.num_features)
    assert pruned.num_features == pruned.head.in_features < net.num_features
    assert pruned(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert (
        rebuild_kwargs({"name": "resnet20", "kwargs": {}, "num_classes": 10, "in_chans": 1, "img_size": 28}, pruned)
        is None
    )


def test_pruning_removes_the_dead_channels_first_and_keeps_the_function():
    # Zero 3 of every 4 channels of each convolution (weights, batch norm and the next layer's inputs): they carry
    # nothing, their importance is 0, so the pruned network must compute exactly the same logits.
    torch.manual_seed(0)
    net = create("vgg_test", num_classes=10, in_chans=1, img_size=28).eval()
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.features if isinstance(m, nn.BatchNorm2d)]
    consumers = [*convs[1:], net.head]
    with torch.no_grad():
        for conv, bn, nxt in zip(convs, bns, consumers, strict=True):
            dead = torch.arange(conv.out_channels) % 4 != 0
            conv.weight[dead] = 0
            bn.weight[dead], bn.bias[dead], bn.running_mean[dead] = 0.0, 0.0, 0.0
            nxt.weight[:, dead] = 0
            bn.weight[~dead] = 1 + torch.rand(int((~dead).sum()))
    x = torch.rand(8, 1, 28, 28)
    pruned, rec = prune_net(net, 0.5, (1, 28, 28), name="vgg_test")
    assert all(v["after"] >= v["before"] // 4 for v in rec["channels"].values())
    torch.testing.assert_close(pruned.eval()(x), net(x), rtol=1e-5, atol=1e-5)


def test_vit_prunes_around_its_attention_and_leaves_qkv_whole():
    net = create("vit_test", num_classes=10, in_chans=1, img_size=28)
    pruned, rec = prune_net(net, 0.3, (1, 28, 28), name="vit_test")
    assert rec["achieved_ratio"] >= 0.3
    assert {"blocks.0.attn.qkv", "blocks.1.attn.qkv"} <= set(rec["left_whole"])  # timm fixes head_dim in its reshape
    assert not any("qkv" in k for k in rec["channels"]) and any(".mlp.fc1" in k for k in rec["channels"])
    assert all(b.attn.qkv.out_features == 96 for b in pruned.blocks)
    assert pruned(torch.rand(2, 1, 28, 28)).shape == (2, 10)


class FixedGroups(nn.Module):
    """A network whose forward pass needs exactly 8 channels (a hard-coded reshape): nothing can be pruned."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.conv(x).view(b, 2, 4, h, w).sum(1)  # (B, 4, H, W): pairs of channels summed
        return self.head(x.mean((2, 3)))


def test_a_network_that_cannot_be_pruned_is_refused_naming_the_layer():
    with pytest.raises(PupilError, match=r"cannot prune fixed cleanly: pruning layer conv fails"):
        prune_net(FixedGroups(), 0.5, (1, 8, 8), name="fixed")


class PartlyFixed(FixedGroups):
    """``FixedGroups`` after a prunable first convolution: only that one's channels can go."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return super().forward(torch.relu(self.first(x)))


def test_a_ratio_beyond_what_can_be_pruned_is_refused():
    _, rec = prune_net(PartlyFixed(), 0.5, (1, 8, 8), name="partly")
    assert list(rec["left_whole"]) == ["conv"] and list(rec["channels"]) == ["first"]
    with pytest.raises(PupilError, match=r"can remove at most \d+% of the FLOPs of partly, not 95%"):
        prune_net(PartlyFixed(), 0.95, (1, 8, 8), name="partly")


def test_bn_recalibration_matches_torch_update_bn():
    from torch.optim.swa_utils import update_bn

    from pupil.models import PixelModel
    from pupil.runtime import to_input

    torch.manual_seed(0)
    ds = pupil.data.load("synthetic", "train")
    model = PixelModel(create("resnet_test", num_classes=4, in_chans=1, img_size=16), [0.5], [0.25], tta=True)
    reference = copy.deepcopy(model)
    reference.tta = False  # recalibration sees the images as training does, without their mirrors
    n = recalibrate_bn(model, ds, batches=3, batch_size=32, device=torch.device("cpu"), dtype=None, seed=7)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(7))[:96]
    update_bn([to_input(ds.images[c], torch.device("cpu"), True) for c in idx.split(32)], reference)
    assert n == 96 and model.tta and not model.training
    bns = [(a, b) for a, b in zip(model.modules(), reference.modules(), strict=True) if isinstance(a, nn.BatchNorm2d)]
    assert bns
    for a, b in bns:
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert a.momentum == b.momentum == 0.1


# ---------------------------------------------------------------------------------------------------------------
# Pruning a run, with its fine-tune


def test_prune_run_recovers_accuracy_and_keeps_the_deployed_form(teacher):
    run = load_run(teacher.dir)
    model, rec = prune_run(run, 0.5, max_minutes=0.12, device="cpu", progress=False, precision="fp32")
    test = pupil.data.load("synthetic", "test")
    assert model.tta is True and model.num_classes == 4
    assert rec["achieved_ratio"] >= 0.5 and rec["flops_after"] == count_flops(model.net, (1, 1, 16, 16))
    top1 = rec["val_top1"]
    assert top1["fine_tuned"] >= top1["pruned"]  # the pruned weights themselves are a candidate
    assert top1["fine_tuned"] > 0.5  # chance is 0.25
    assert evaluate(model, test)["top1"] > 0.5  # and on images neither split saw
    ft = rec["fine_tune"]
    assert ft["steps"] > 0 and ft["epochs"] == pytest.approx(
        ft["steps"] / (run.info["data"]["train_size"] // 64), abs=1e-3
    )
    assert ft["history"] and max(h["val_top1"] for h in ft["history"]) <= top1["fine_tuned"] + 1e-9
    assert rec["torch_pruning"] and rec["val_top1"]["before"] == pytest.approx(teacher.summary()["last"]["val_top1"])
    json.dumps(rec)  # the record goes into run.json as is


def test_the_fine_tune_stops_at_its_budget(teacher):
    run = load_run(teacher.dir)
    budget = 0.02  # 1.2 s: a few steps, far short of one epoch under contention
    _, rec = prune_run(run, 0.5, max_minutes=budget, device="cpu", progress=False, precision="fp32", distill=False)
    ft = rec["fine_tune"]
    # The loop checks the clock before every step and keeps one validation's time in hand; the slack covers one
    # step and one validation of this tiny model on a busy machine.
    assert ft["minutes"] <= budget + 0.25
    assert ft["budget_minutes"] == budget and ft["loss"].startswith("cross-entropy")


@pytest.mark.parametrize("ratio", [0, 1, -0.2, 1.5, True, "0.5"])
def test_a_ratio_outside_zero_one_is_refused(teacher, ratio):
    with pytest.raises(PupilError, match=r"must lie in \(0, 1\)"):
        prune_run(load_run(teacher.dir), ratio, device="cpu", progress=False)


def test_a_run_without_validation_split_is_refused(teacher):
    run = load_run(teacher.dir)
    info = json.loads(json.dumps(run.info))
    info["data"]["val_size"] = 0
    with pytest.raises(PupilError, match="no validation split.*--val-size"):
        prune_run(dataclasses.replace(run, info=info), 0.5, device="cpu", progress=False)


def test_missing_torch_pruning_is_one_line(teacher, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning now raises ImportError
    with pytest.raises(PupilError, match="torch-pruning") as e:
        prune_run(load_run(teacher.dir), 0.5, device="cpu", progress=False)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Distillation


def test_distill_config_keeps_the_teachers_recipe_and_swaps_the_model(teacher, tmp_path):
    cfg = distill_config(teacher.dir, "lenet5", tmp_path / "students" / "lenet", max_minutes=2.0, epochs=3.0)
    saved = teacher.info["config"]
    assert cfg.train.task == "distill" and cfg.task.teacher == str(teacher.dir.resolve())
    assert cfg.model.model == "lenet5" and cfg.model.model_args == {} and not cfg.model.pretrained
    assert cfg.train.name == "lenet" and cfg.train.out == str(tmp_path / "students")
    assert (cfg.train.max_minutes, cfg.train.epochs) == (2.0, 3.0)
    assert dataclasses.asdict(cfg.data) == saved["data"] and dataclasses.asdict(cfg.optim) == saved["optim"]
    assert (cfg.train.seed, cfg.train.tta, cfg.train.precision) == (0, True, "fp32")
    over = distill_config(teacher.dir, "lenet5", tmp_path / "x", overrides={"distill_alpha": 0.9, "lr": 0.05})
    assert (over.task.distill_alpha, over.optim.lr, over.train.epochs) == (0.9, 0.05, saved["train"]["epochs"])


def test_distill_config_refusals(teacher, tmp_path, monkeypatch):
    with pytest.raises(PupilError, match=r"unknown model 'resnet2O' \(did you mean .*resnet20"):
        distill_config(teacher.dir, "resnet2O", tmp_path / "s")
    with pytest.raises(PupilError, match="student vit_mini_p7 cannot take the teacher's 1x16x16 images"):
        distill_config(teacher.dir, "vit_mini_p7", tmp_path / "s")
    with pytest.raises(PupilError, match="teacher is set by the distillation itself"):
        distill_config(teacher.dir, "lenet5", tmp_path / "s", overrides={"teacher": "elsewhere"})
    with pytest.raises(PupilError, match="unknown config field 'nope'"):
        distill_config(teacher.dir, "lenet5", tmp_path / "s", overrides={"nope": 1})
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(teacher.dir / "run.json", bare / "run.json")
    with pytest.raises(PupilError, match="has no model.safetensors"):
        distill_config(bare, "lenet5", tmp_path / "s")
    import pupil.models

    three = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))  # a model that ignores the class count it is given
    monkeypatch.setattr(pupil.models, "create", lambda *a, **k: three)
    with pytest.raises(PupilError, match=r"gives \(3,\) outputs, not the 4 classes"):
        distill_config(teacher.dir, "lenet5", tmp_path / "s")


def test_distill_run_writes_a_loadable_run_that_names_its_teacher(teacher, tmp_path):
    out = distill_run(teacher.dir, "lenet5_test", tmp_path / "student", epochs=1.0, progress=False)
    run = load_run(out)
    assert out == tmp_path / "student" and (out / "model.safetensors").exists()
    assert run.info["status"] == "finished" and run.info["model"]["name"] == "lenet5_test"
    assert run.info["config"]["train"]["task"] == "distill"
    assert run.info["config"]["task"]["teacher"] == str(teacher.dir.resolve())
    assert run.model(torch.rand(2, 1, 16, 16)).shape == (2, 4)
    with pytest.raises(PupilError, match="exists"):  # a finished run is not trained over without overwrite
        distill_run(teacher.dir, "lenet5_test", out, epochs=1.0, progress=False)
