import torch
import torch.nn.functional as F

from pupil.data.transforms import AugmentConfig, BatchAugment, random_crop, random_erase, random_flip


def test_random_crop_matches_a_per_image_loop():
    x = torch.rand(6, 2, 5, 7)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (6,), generator=g)
    dx = torch.randint(0, 5, (6,), generator=g)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 7])


def test_flip_flips_about_half_and_keeps_the_rest():
    x = torch.rand(200, 1, 3, 4)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped | kept).all() and 70 < flipped.sum() < 130


def test_erase_replaces_one_rectangle_within_bounds():
    x = torch.zeros(50, 1, 16, 16)
    out = random_erase(x, 1.0, torch.Generator().manual_seed(2))
    frac = (out != 0).float().mean((1, 2, 3))
    assert (frac > 0).all() and (frac <= 0.40).all()


def test_augment_is_deterministic_under_a_seed_and_stays_in_range():
    aug = BatchAugment(AugmentConfig(crop_pad=2, flip=True, rotate=10, color_jitter=0.3, erase_prob=0.5))
    x = torch.rand(8, 3, 12, 12)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
