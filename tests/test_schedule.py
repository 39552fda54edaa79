import math

import pytest

from pupil.training.schedule import lr_factor


def naive(step, total, warmup, kind, lo):
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    return {
        "cosine": lo + (1 - lo) * (1 + math.cos(math.pi * t)) / 2,
        "onecycle": lo + (1 - lo) * (1 - t),
        "constant": 1.0,
    }[kind]


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "constant"])
def test_schedules_match_a_naive_reference(kind):
    for step in range(100):
        assert lr_factor(step, 100, 10, kind, 0.05) == pytest.approx(naive(step, 100, 10, kind, 0.05))


def test_warmup_peaks_at_one_and_decay_ends_at_min():
    assert lr_factor(9, 100, 10, "cosine") == 1.0
    assert lr_factor(100, 100, 10, "onecycle", 0.1) == pytest.approx(0.1)
