"""The bf16 autocast path, forced on whatever the CPU: training, precise BN, prediction and PGD against fp32.

``precision: auto`` turns bf16 on only where the CPU runs it natively (AVX512-BF16 or AMX), and the tests that
compare with an fp32 reference pin ``precision="fp32"``, so without this file an AVX2-only machine would never
run the bf16 path and an AVX512-BF16 one would never check it. On AVX2 bf16 is emulated (about ten times
slower), hence the smoke recipe's 16x16 gratings, ``resnet_test`` and a few dozen test images.

bf16 keeps 8 significant bits (spacing 2**-8, 0.4% relative), so tolerances here are about 2% where the fp32
tests use 1e-4; the errors measured on an AVX512-BF16 CPU and on the emulated path are 2.5 to 10 times
smaller than these. Each test also checks that bf16 really ran: forward hooks record the dtype of layer outputs,
torch.bfloat16 under autocast, so a bf16 request that were silently dropped fails here instead of passing
with fp32 numbers.
"""

import copy
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import pupil
from pupil.config import build
from pupil.data import ImageDataset
from pupil.io import read_jsonl
from pupil.predict import evaluate, predict_logits
from pupil.robust import pgd
from pupil.runtime import autocast, resolve_precision, to_input
from pupil.training.loop import fit
from tests.conftest import ROOT

CPU = torch.device("cpu")
BF16 = torch.bfloat16
N_TEST = 48  # test images for prediction and attacks
PRECISE_BN = 3  # batches of 64


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@contextmanager
def output_dtypes(model: nn.Module):
    """Collects the dtype of every Conv2d and Linear output computed inside the block."""
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype)) for m in layers(model)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def smoke(out, name, **over):
    return build(ROOT / "recipes/smoke/synthetic.yaml", dict(out=str(out), name=name, precise_bn=PRECISE_BN, **over))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The smoke run (3 epochs, then precise BN) in fp32 and in bf16, with what bf16's layers were fed.

    ``seen["train"]``: conv and linear output dtypes of the training steps after the first;
    ``seen["precise_bn"]``: batch-norm input dtypes during the precise-BN pass (batch norms in train mode
    after the last step).
    """
    out = tmp_path_factory.mktemp("bf16")
    fp32 = fit(smoke(out, "fp32", precision="fp32"), progress=False)
    seen: dict[str, list[torch.dtype]] = {"train": [], "precise_bn": []}

    def watch(state):
        if state.step != 1:
            return
        for m in layers(state.model):
            m.register_forward_hook(lambda mod, args, o: seen["train"].append(o.dtype) if mod.training else None)
        for m in state.model.modules():
            if isinstance(m, nn.BatchNorm2d):

                def pre(mod, args):
                    if mod.training and state.step == state.total_steps:
                        seen["precise_bn"].append(args[0].dtype)

                m.register_forward_pre_hook(pre)

    bf16 = fit(smoke(out, "bf16", precision="bf16"), progress=False, on_step=watch)
    return fp32, bf16, seen


@pytest.fixture(scope="module")
def test_set():
    ds = pupil.data.load("synthetic", "test")
    return ImageDataset(ds.images[:N_TEST], ds.targets[:N_TEST], ds.classes)


def test_precision_names_resolve_on_any_cpu(monkeypatch):
    import pupil.runtime as runtime

    assert resolve_precision("bf16", CPU) is BF16 and resolve_precision("fp32", CPU) is None
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", CPU) is BF16
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", CPU) is None


def test_bf16_training_runs_in_bf16_and_follows_fp32(runs):
    fp32, bf16, seen = runs
    assert seen["train"] and set(seen["train"]) == {BF16}
    assert fp32.info["runtime"]["precision"] == "fp32" and bf16.info["runtime"]["precision"] == "torch.bfloat16"
    a, b = read_jsonl(fp32.dir / "metrics.jsonl"), read_jsonl(bf16.dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    epochs = [(ra, rb) for ra, rb in zip(a, b) if "train_loss" in ra]  # the last row is the precise-BN pass
    assert len(epochs) == 3
    for ra, rb in epochs:
        assert rb["train_loss"] != ra["train_loss"]  # bf16's rounding shows: this was not fp32 again
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=0.02)
    for ra, rb in zip(a, b):
        if "val_top1" in ra:
            assert rb["val_top1"] == pytest.approx(ra["val_top1"], abs=0.05)  # 64 images: up to 3 flips
    assert bf16.summary()["best_val_top1"] > 0.6  # chance is 0.25


def test_precise_bn_under_bf16_matches_torch_update_bn(runs):
    """torch's update_bn in fp32 over the same seeded sample is the reference, as in test_training."""
    bf16, seen = runs[1], runs[2]
    assert len(seen["precise_bn"]) >= PRECISE_BN and set(seen["precise_bn"]) == {BF16}
    assert read_jsonl(bf16.dir / "metrics.jsonl")[-1]["precise_bn_images"] == PRECISE_BN * 64
    train = pupil.data.load("synthetic", "train", val_size=64, seed=0)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[: PRECISE_BN * 64]
    ref = copy.deepcopy(bf16.model)
    update_bn([to_input(train.images[c], CPU, False) for c in idx.split(64)], ref)
    ours = dict(bf16.model.named_buffers())
    checked = 0
    for name, buf in ref.named_buffers():
        if "running_mean" in name:
            # Means near zero carry the rounding of the layer's input in absolute terms: their tolerance is a
            # fraction of the layer's spread (its mean running std), not of each channel's own mean.
            spread = ref.get_buffer(name.replace("running_mean", "running_var")).sqrt().mean()
            torch.testing.assert_close(ours[name], buf, rtol=0.02, atol=0.01 * spread.item(), msg=name)
            checked += 1
        elif "running_var" in name:
            torch.testing.assert_close(ours[name], buf, rtol=0.02, atol=0.0, msg=name)
            checked += 1
    assert checked >= 8  # resnet_test's batch norms, means and variances


def test_predict_and_evaluate_in_bf16_agree_with_fp32(runs, test_set):
    model = runs[0].model
    ref = predict_logits(model, test_set, dtype=None)
    with output_dtypes(model) as seen:
        low = predict_logits(model, test_set, dtype=BF16)
    assert seen and set(seen) == {BF16}
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    assert (low - ref).abs().max() <= 0.02 * ref.abs().max()  # a few bf16 spacings of the largest logit
    assert (low.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    e32, e16 = evaluate(model, test_set), evaluate(model, test_set, dtype=BF16)
    assert e16["top1"] == pytest.approx(e32["top1"], abs=2 / N_TEST)
    assert e16["loss"] == pytest.approx(e32["loss"], rel=0.02)


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_pgd_under_bf16_keeps_its_bounds_and_succeeds_as_often_as_fp32(runs, test_set, norm, eps):
    # The audit's adversarial check runs PGD inside autocast with the run's precision; these budgets flip
    # about half to two thirds of the correctly classified images, where a weaker attack would show.
    model = runs[0].model.eval()
    x, y = test_set.images.float().div(255), test_set.targets
    with torch.no_grad():
        correct = model(x).argmax(1) == y

    def attack(dtype):
        with autocast(CPU, dtype), output_dtypes(model) as seen:
            adv = pgd(model, x, y, eps, eps / 4, 10, norm, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # success is judged in fp32 both times
            flipped = (model(adv).argmax(1) != y)[correct].float().mean().item()
        return adv, flipped, set(seen)

    adv32, flipped32, seen32 = attack(None)
    adv16, flipped16, seen16 = attack(BF16)
    assert seen32 == {torch.float32} and seen16 == {BF16}
    assert adv16.dtype == torch.float32 and not torch.equal(adv16, adv32)
    assert adv16.min() >= 0 and adv16.max() <= 1
    delta = (adv16 - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()
    assert correct.sum() >= 20 and flipped32 > 0.3  # enough images, and a budget where bf16 could lose strength
    assert flipped16 == pytest.approx(flipped32, abs=0.1)


def test_the_audit_computes_in_fp32_unless_asked_whatever_the_run_trained_in(runs):
    from pupil.audit.common import make_context

    fp32, bf16, _ = runs
    assert make_context(fp32.dir, "cpu", "quick", 0).dtype is None
    assert make_context(bf16.dir, "cpu", "quick", 0).dtype is None  # the model as given
    assert make_context(fp32.dir, "cpu", "quick", 0, precision="bf16").dtype is BF16
