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


def test_budget_refit_shrinks_a_schedule_when_the_machine_slows_down():
    from pupil.training.schedule import fit_budget, refit_budget

    # 20 probe steps took 2 s (0.1 s/step): a 1-minute budget fits 600 of the asked 10,000 steps
    assert fit_budget(10_000, 500, 2.0, 1.0) == (600, 120)
    # at step 300 the run has used 45 s (0.15 s/step: slower): 15 s left fit 100 more steps, not 300
    assert refit_budget(300, 600, 120, 45.0, 1.0) == (400, 120)
    # as fast as promised: nothing changes; faster: the schedule under way is never lengthened
    assert refit_budget(300, 600, 120, 30.0, 1.0) == (600, 120)
    assert refit_budget(300, 600, 120, 10.0, 1.0) == (600, 120)
    # out of time: the run ends at the next step
    assert refit_budget(300, 600, 120, 75.0, 1.0) == (301, 120)
    # precise BN's reserve counts: 40 batches at 0.35 of a 0.15 s step take 2.1 of the 15 s left: 86 steps fit
    assert refit_budget(300, 600, 120, 45.0, 1.0, bn_batches=40) == (386, 120)
    # before warm-up has ended, warm-up shrinks with the total
    assert refit_budget(50, 600, 120, 15.0, 1.0) == (200, 40)
