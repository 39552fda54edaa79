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


def test_combine_merges_separate_measurements(tmp_path):
    import json

    def part(name, rows, minutes=5.0):
        path = tmp_path / name
        path.write_text(json.dumps({"minutes_per_model": minutes, "threads": 1, "rows": rows}))
        return str(path)

    row = dict(params=1, flops=10, train_img_s=1.0, latency_ms_b1=1.0, throughput_b256=1.0, model="m")
    a = part(
        "a.json",
        [dict(row, family="LeNet", year=1998, test_top1=0.5), dict(row, family="ViT", year=2021, test_top1=0.1)],
    )
    b = part("b.json", [dict(row, family="ViT", year=2021, test_top1=0.7)])
    out = tmp_path / "journey.json"
    script = str(ROOT / "benchmarks/journey.py")
    res = subprocess.run([sys.executable, script, "--combine", a, b, "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [(r["family"], r["test_top1"]) for r in data["rows"]] == [("LeNet", 0.5), ("ViT", 0.7)]  # later file wins
    assert data["complete"] is False and out.with_suffix(".png").exists()
    c = part("c.json", [], minutes=2.0)
    res = subprocess.run([sys.executable, script, "--combine", c, "--out", str(out)], capture_output=True, text=True)
    assert res.returncode != 0 and "2.0 minutes per model" in res.stderr
    d = part("d.json", [], minutes=5.0)
    json_d = json.loads((tmp_path / "d.json").read_text())
    (tmp_path / "d.json").write_text(json.dumps(dict(json_d, threads=2)))
    res = subprocess.run([sys.executable, script, "--combine", a, d, "--out", str(out)], capture_output=True, text=True)
    assert res.returncode != 0 and "2 threads, not 1" in res.stderr
