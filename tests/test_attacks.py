"""FGSM and PGD against torchattacks on the same model, plus the bounds every attack must keep.

Batches of 8 keep the mean-loss gradient of torchattacks an exact power-of-two multiple of our summed-loss
gradient, so the two agree bit for bit rather than only in sign "almost everywhere".
"""

import pytest
import torch
import torchattacks

from pupil.errors import PupilError
from pupil.models import PixelModel, create
from pupil.robust import fgsm, pgd


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = create("resnet_test", num_classes=4, in_chans=1, img_size=16)
    return PixelModel(net, [0.5], [0.25]).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 1, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def l2(t):
    return t.flatten(1).norm(dim=1)


def test_fgsm_matches_torchattacks(model, batch):
    x, y = batch
    ours = fgsm(model, x, y, 0.05)
    theirs = torchattacks.FGSM(model, eps=0.05)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm, cls, eps", [("linf", torchattacks.PGD, 0.03), ("l2", torchattacks.PGDL2, 0.5)])
def test_pgd_matches_torchattacks_without_random_start(model, batch, norm, cls, eps):
    x, y = batch
    ours = pgd(model, x, y, eps, eps / 4, 7, norm, random_start=False)
    theirs = cls(model, eps=eps, alpha=eps / 4, steps=7, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm, cls, eps", [("linf", torchattacks.PGD, 0.03), ("l2", torchattacks.PGDL2, 0.5)])
def test_pgd_random_start_matches_torchattacks_from_the_same_seed(model, batch, norm, cls, eps):
    # Our random start draws the same numbers in the same order as torchattacks from the global generator.
    x, y = batch
    torch.manual_seed(5)
    ours = pgd(model, x, y, eps, eps / 4, 5, norm)
    torch.manual_seed(5)
    theirs = cls(model, eps=eps, alpha=eps / 4, steps=5)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_pgd_random_start_with_generator_is_reproducible_and_random(model, batch):
    x, y = batch
    a = pgd(model, x, y, 0.05, 0.01, 0, generator=torch.Generator().manual_seed(3))
    b = pgd(model, x, y, 0.05, 0.01, 0, generator=torch.Generator().manual_seed(3))
    c = pgd(model, x, y, 0.05, 0.01, 0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Zero steps leave the uniform start: it fills the L-inf ball (up to clipping at 0 and 1).
    inside = (x > 0.05) & (x < 0.95)
    assert (a - x)[inside].abs().max() > 0.045


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_perturbation_stays_in_the_ball_and_the_box(model, batch, norm, eps):
    x, y = batch
    x = x.clone()
    x[0] = 0.0  # images at the edges of the box
    x[1] = 1.0
    for adv in (fgsm(model, x, y, eps, norm), pgd(model, x, y, eps, eps / 3, 6, norm)):
        assert adv.min() >= 0 and adv.max() <= 1
        size = (adv - x).abs().flatten(1).amax(1) if norm == "linf" else l2(adv - x)
        assert (size <= eps * (1 + 1e-5)).all()


def test_l2_fgsm_is_one_full_pgd_step(model, batch):
    x, y = batch
    torch.testing.assert_close(fgsm(model, x, y, 0.7, "l2"), pgd(model, x, y, 0.7, 0.7, 1, "l2", random_start=False))


def test_attacks_raise_the_loss(model, batch):
    x, y = batch
    loss = torch.nn.functional.cross_entropy

    def ce(img):
        with torch.no_grad():
            return loss(model(img), y).item()

    clean = ce(x)
    assert ce(fgsm(model, x, y, 0.05)) > clean
    assert ce(pgd(model, x, y, 0.05, 0.01, 10)) > ce(fgsm(model, x, y, 0.05)) * 0.99


def test_no_parameter_grads_and_train_mode_is_kept(model, batch):
    x, y = batch
    net = create("resnet_test", num_classes=4, in_chans=1, img_size=16)
    m = PixelModel(net, [0.5], [0.25]).train()
    pgd(m, x, y, 0.05, 0.01, 2)
    fgsm(m, x, y, 0.05)
    assert m.training
    assert all(p.grad is None for p in m.parameters())


def test_zero_eps_returns_the_clean_images(model, batch):
    x, y = batch
    assert torch.equal(pgd(model, x, y, 0.0, 0.0, 3), x)
    assert torch.equal(fgsm(model, x, y, 0.0), x)


def test_bad_arguments(model, batch):
    x, y = batch
    with pytest.raises(PupilError, match="norm"):
        pgd(model, x, y, 0.1, 0.01, 2, norm="l1")
    with pytest.raises(PupilError, match="epsilon"):
        fgsm(model, x, y, -0.1)


def test_early_stop_is_never_weaker_and_keeps_the_bounds(model, batch):
    x, y = batch
    eps = 0.2
    full = pgd(model, x, y, eps, eps / 4, 10, generator=torch.Generator().manual_seed(0))
    early = pgd(model, x, y, eps, eps / 4, 10, generator=torch.Generator().manual_seed(0), early_stop=True)
    with torch.no_grad():
        fooled_full, fooled_early = model(full).argmax(1) != y, model(early).argmax(1) != y
    assert fooled_early.sum() >= fooled_full.sum() > 0
    assert (early - x).abs().max() <= eps + 1e-6 and early.min() >= 0 and early.max() <= 1
