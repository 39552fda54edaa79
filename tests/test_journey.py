import subprocess
import sys

from pupil.config import build
from pupil.models import MODELS
from pupil.training.loop import fit
from tests.conftest import ROOT


def test_journey_smoke_trains_every_family():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/journey.py"), "--smoke", "--dataset", "synthetic"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    families = {e.meta["family"] for e in MODELS}
    printed = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert families <= printed


def test_wall_clock_budget_shrinks_the_schedule(tmp_path):
    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(tmp_path), "epochs": 50.0, "max_minutes": 1e-4})
    run = fit(cfg, progress=False)
    assert run.summary()["total_steps"] == 21  # the 20 probe steps, then the budget is already spent
