"""The "what changed" view (pupil.report.changes) on synthetic audits written directly (results.json and per-image
files, no model): each figure and interval against the paired tests' draws or a naive loop, the exemplars against a
direct argmax comparison, the flags at their exact thresholds, missing checks, refused pairs, and the compare page."""

import base64
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from pupil.errors import PupilError
from pupil.metrics import ece as ece_of
from pupil.ood import auroc as ood_auroc
from pupil.report import changes as ch
from pupil.report import paired as pt
from pupil.report.compare import compare
from pupil.results import PNG_URI_PREFIX, SCHEMA_VERSION, validate, write_per_image

B = 150  # bootstrap replicates: under paired.CHUNK, so one (B, n) draw from the seeded generator replays them
K4 = [f"class{k}" for k in range(4)]  # the synthetic dataset's classes (512 test images, 16 x 16 grey)


def _audit(n: int, **changed) -> dict:
    audit = {"split": "test", "n": n, "budget": "quick", "seed": 0, "device": "cpu", "threads": 1}
    audit |= {"precision": "fp32", "tta": False}
    audit["data"] = {"dataset": "synthetic", "fingerprint": None, "matches_training": None}
    return audit | changed


def _section(check: str, summary: dict, metrics: dict | None = None, config: dict | None = None) -> dict:
    value = next(v for v in summary.values() if isinstance(v, int | float))
    return {
        "title": check,
        "config": config or {},
        "runtime_s": 0.0,
        "headline": {"label": f"{check} headline", "value": value, "higher_is_better": True},
        "summary": summary,
        "metrics": metrics or {},
    }


def _accuracy(z: torch.Tensor, y: torch.Tensor) -> dict:
    top1 = (z.argmax(1) == y).double().mean().item()
    summary = {"top1": top1, "top1_ci95": [top1, top1], "top5": None, "macro_f1": top1}
    return _section("accuracy", summary | {"macro_f1_ci95": [top1, top1], "worst_classes": []})


def _calibration(z: torch.Tensor, y: torch.Tensor, t: float | None) -> dict:
    correct = z.argmax(1) == y
    after = None if t is None else ece_of((z.double() / t).softmax(1).amax(1), correct)
    summary = {"ece": ece_of(z.double().softmax(1).amax(1), correct), "ece_after_temperature": after, "temperature": t}
    return _section("calibration", summary, config={"n_bins": 15})


def _corruption(correct: torch.Tensor, names: list[str]) -> dict:
    """The corruption section of per-image (C, S, n) bools: each cell's accuracy, as the check writes it."""
    acc = {c: correct[i].double().mean(1).tolist() for i, c in enumerate(names)}
    mean = correct.double().mean().item()
    summary = {"mean_corrupted_top1": mean, "clean_top1": 1.0, "mce": None, "relative_mce": None}
    return _section("corruption", summary, {"corruptions": names, "accuracy": acc})


def _others(latency: float = 2.0, eps: float = 0.1, gap: float = 0.05, size_scale: float = 1.0) -> dict:
    """The checks the view reads from summaries only."""
    return {
        "adversarial": _section("adversarial", {"robust_top1": 0.3, "eps": eps, "norm": "linf", "clean_top1": 0.9}),
        "uncertainty": _section(
            "uncertainty", {"deferral_threshold": 0.7, "target_accuracy": 0.99, "deferred": 0.2, "aurc": 0.01}
        ),
        "fairness": _section(
            "fairness",
            {"accuracy_gap": gap, "accuracy_gap_ci95": [0, 0.1], "attribute": "brightness", "attribute_kind": "proxy"},
        ),
        "efficiency": _section(
            "efficiency",
            {"params": int(1000 * size_scale), "flops": 10, "latency_ms_p50": latency, "throughput_img_s": 500.0},
        ),
        "energy": _section(
            "energy", {"energy_j_per_1000_images": 3.0, "energy_kwh": 1e-6, "emissions_kg_co2eq": 1e-7, "images": 10}
        ),
    }


def write_run(
    d: Path,
    y: torch.Tensor,
    z: torch.Tensor,
    classes: list[str],
    *,
    temperature: float | None = 1.5,
    corruption: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None,
    ood: dict[str, torch.Tensor] | None = None,
    others: dict | None = None,
    audit: dict | None = None,
    info: dict | None = None,
    model_bytes: int | None = None,
    per_image: bool = True,
) -> Path:
    """A run directory holding a results.json (accuracy + calibration, and the sections given) and the per-image
    files of its accuracy, corruption and ood checks; ``info`` becomes run.json."""
    d.mkdir(parents=True, exist_ok=True)
    audit = audit or _audit(len(y))
    checks = {"accuracy": _accuracy(z, y), "calibration": _calibration(z, y, temperature)}
    tensors = {"accuracy": {"logits": z.float(), "targets": y}}
    if corruption is not None:
        index, correct, names = corruption
        checks["corruption"] = _corruption(correct, names)
        tensors["corruption"] = {"index": index, "correct": correct, "severities": torch.tensor([1, 5])}
    if ood is not None:
        aurocs = [ood_auroc(ood["id"], v) for k, v in ood.items() if k.startswith("ood:")]
        scores = {"mean_auroc": sum(aurocs) / len(aurocs), "mean_fpr95": 0.5, "score": "msp", "best_score": "msp"}
        checks["ood"] = _section("ood", scores)
        tensors["ood"] = ood
    checks |= others or {}
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": "2025-01-01T00:00:00+00:00",
        "run": {"dir": str(d), "name": d.name, "model": {"name": "lenet5", "num_classes": len(classes)}},
        "audit": audit,
        "checks": checks,
    }
    results["run"] |= {"dataset": "synthetic", "classes": classes}
    validate(results)
    (d / "results.json").write_text(json.dumps(results))
    if per_image:
        for check, t in tensors.items():
            write_per_image(d, check, t, audit)
    if info is not None:
        (d / "run.json").write_text(json.dumps(info))
    if model_bytes is not None:
        (d / "model.safetensors").write_bytes(b"\0" * model_bytes)
    return d


def synthetic_info(**extra) -> dict:
    """run.json of a run on the registered synthetic dataset, whose test split ``load_run(...).split`` rebuilds."""
    return {
        "schema": 1,
        "status": "finished",
        "model": {"name": "lenet5", "num_classes": 4, "in_chans": 1, "img_size": 16},
        "data": {"dataset": "synthetic", "data_dir": None, "classes": K4, "input_shape": [1, 16, 16]},
        "config": {"data": {"val_size": 64}, "train": {"seed": 0}},
        **extra,
    }


def _logits(y: torch.Tensor, k: int, signal: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(y), k, generator=g) + signal * torch.nn.functional.one_hot(y, k)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """BASE and a perturbed NEW on the synthetic test split's labels, with accuracy, calibration, corruption and ood
    per-image files; NEW is a compressed copy of BASE."""
    root = tmp_path_factory.mktemp("changes")
    y = torch.arange(512) % 4  # the synthetic test split's labels
    z0 = _logits(y, 4, 2.5, 0)
    z1 = z0 + 1.2 * torch.randn(512, 4, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    index = torch.randperm(512, generator=g)[:96].sort().values
    names = ["gaussian_noise", "contrast", "fog"]
    c0 = torch.rand(3, 2, 96, generator=g) < torch.tensor([0.8, 0.6, 0.4])[:, None, None]
    c1 = c0 & (torch.rand(3, 2, 96, generator=g) > torch.tensor([0.02, 0.2, 0.05])[:, None, None])
    ood0 = {"index": index, "id": torch.rand(96, generator=g).double() + 0.3, "ood:noise": torch.rand(40).double()}
    ood1 = {k: v + 0.05 * torch.randn(len(v), generator=g).double() if k != "index" else v for k, v in ood0.items()}
    base = write_run(
        root / "base", y, z0, K4, corruption=(index, c0, names), ood=ood0, others=_others(), model_bytes=4000
    )
    sha = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    compressed = {  # as pupil compress writes it (abridged)
        "base": {"name": "base", "path": str(base.resolve()), "weights_sha256": sha},
        "method": "int8",
        "format": "onnx",
        "artefact": "model.onnx",
        "settings": {"per_channel": True},
    }
    info = synthetic_info(compressed=compressed)
    new = write_run(
        root / "new",
        y,
        z1,
        K4,
        temperature=0.8,
        corruption=(index, c1, names),
        ood=ood1,
        others=_others(1.0),
        info=info,
    )
    (new / "model.onnx").write_bytes(b"\0" * 1000)
    (base / "run.json").write_text(json.dumps(synthetic_info()))
    return {"root": root, "base": base, "new": new, "y": y, "z0": z0, "z1": z1, "c0": c0, "c1": c1, "ood": (ood0, ood1)}


def _draws(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, n, (B, n), generator=torch.Generator().manual_seed(seed))


def _naive_ci(base: list[float], new: list[float]) -> list[float]:
    d = np.array(new) - np.array(base)
    d = d[~np.isnan(d)]
    return np.quantile(d, [0.025, 0.975]).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Statistics against naive loops


def test_recall_of_each_resample_matches_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0] * 30 + [1] * 20 + [2] * 2 + [3] * 0 + [4] * 8)
    correct = torch.rand(len(y), generator=g) < 0.7
    idx = torch.randint(0, len(y), (25, len(y)), generator=g)
    got = ch.recall(y, correct, 5, idx)
    for r, i in enumerate(idx):
        for k in range(5):
            mine = y[i] == k
            if mine.sum() == 0:
                assert got[r, k].isnan(), (r, k)
            else:
                assert got[r, k].item() == pytest.approx(correct[i][mine].double().mean().item())


def test_corruption_accuracy_of_each_resample_matches_indexing():
    g = torch.Generator().manual_seed(4)
    acc = torch.rand(6, 40, generator=g).double()
    idx = torch.randint(0, 40, (12, 40), generator=g)
    assert torch.allclose(ch.corruption_accuracy(acc, idx), acc[:, idx].mean(-1).T)


def test_interval_leaves_out_undefined_replicates():
    boot = torch.tensor([[0.5, 0.6], [float("nan"), 0.2], [0.4, 0.3], [0.5, 0.5]], dtype=torch.float64)
    assert ch.interval(boot) == pytest.approx(pt.bootstrap_summary(boot[[0, 2, 3]])["ci95"])
    assert ch.interval(torch.full((4, 2), float("nan"), dtype=torch.float64)) is None


# ---------------------------------------------------------------------------------------------------------------
# The figures: the paired tests' draws, a naive loop over the same draws, the summaries


def test_figures_match_the_paired_tests_and_a_naive_loop(pair):
    view = ch.changes(pair["base"], [pair["new"]], n_bootstrap=B, seed=0)
    (c,) = view["comparisons"]
    rows = {r["figure"]: r for r in c["figures"]}
    assert c["title"] == "what compression changed" and c["compressed"]["method"] == "int8" and c["notes"] == []
    paired = {r["figure"]: r for r in pt.paired(pair["base"], pair["new"], n_bootstrap=B, seed=0)["figures"]}
    for figure in ("accuracy.top1", "calibration.ece", "corruption.mean_corrupted_top1", "ood.mean_auroc"):
        assert rows[figure]["ci95"] == pytest.approx(paired[figure]["ci95"], abs=1e-12), figure
        assert rows[figure]["difference"] == pytest.approx(paired[figure]["difference"], abs=1e-9), figure

    y, z0, z1 = pair["y"], pair["z0"].double(), pair["z1"].double()
    draws = _draws(len(y))
    c0, c1 = z0.argmax(1) == y, z1.argmax(1) == y
    # ECE after temperature scaling: each run's own temperature (1.5 and 0.8), 15 bins, on every draw
    conf = [(z0 / 1.5).softmax(1).amax(1), (z1 / 0.8).softmax(1).amax(1)]
    after = [[ece_of(conf[m][i], (c0, c1)[m][i]) for i in draws] for m in (0, 1)]
    assert rows["calibration.ece_after_temperature"]["ci95"] == pytest.approx(_naive_ci(*after))
    # per-class recall: the point estimates and each class's interval over the same draws
    assert [r["class"] for r in c["per_class"]] == K4
    for k, r in enumerate(c["per_class"]):
        mine = y == k
        assert r["support"] == int(mine.sum())
        assert r["base"] == pytest.approx(c0[mine].double().mean().item())
        assert r["new"] == pytest.approx(c1[mine].double().mean().item())
        assert r["difference"] == pytest.approx(r["new"] - r["base"])
        per_draw = [[corr[i][y[i] == k].double().mean().item() for i in draws] for corr in (c0, c1)]
        assert r["ci95"] == pytest.approx(_naive_ci(*per_draw))
    # the worst corruption: the lowest mean over severities on each side, and its interval over the corruption draws
    a = [pair["c0"].double().mean(1), pair["c1"].double().mean(1)]  # (C, n)
    worst = rows["corruption.worst"]
    assert worst["corruptions"] == ["fog", "fog"] and worst["base"] == pytest.approx(a[0].mean(1).min().item())
    cdraws = _draws(a[0].shape[1])
    naive = [[m[:, i].mean(1).min().item() for i in cdraws] for m in a]
    assert worst["ci95"] == pytest.approx(_naive_ci(*naive))
    assert "largest drop: contrast" in worst["detail"]
    # every interval holds its point estimate
    for r in [*c["figures"], *c["per_class"]]:
        if r["ci95"] is not None:
            assert r["ci95"][0] <= r["difference"] <= r["ci95"][1], r.get("figure", r.get("class"))


def test_summary_figures_and_size_on_disk(pair):
    (c,) = ch.changes(pair["base"], [pair["new"]], n_bootstrap=B)["comparisons"]
    rows = {r["figure"]: r for r in c["figures"]}
    assert rows["efficiency.latency_ms_p50"]["difference"] == pytest.approx(-1.0)
    assert rows["efficiency.latency_ms_p50"]["ci95"] is None
    size = rows["model.size_on_disk"]  # BASE's model.safetensors against the artefact that NEW's run.json names
    assert (size["base"], size["new"], size["files"]) == (4000, 1000, ["model.safetensors", "model.onnx"])
    assert ch.text_row(size)["difference"] == "-2.93 KiB (×0.25)" and ch.text_row(size)["direction"] == "better"
    assert rows["adversarial.robust_top1"]["label"] == "adversarial headline"  # the check's own words for its attack
    assert rows["uncertainty.deferred"]["detail"] == "target accuracy 0.99"
    top = ch.text_row(rows["accuracy.top1"])
    assert top["difference"].endswith(" pt") and top["ci95"].startswith("[")
    same = {**rows["calibration.ece"], "difference": -1e-12, "ci95": [-1e-12, 0.0]}  # float noise is no drop
    assert ch.text_row(same)["difference"] == "+0.00 pt" and ch.text_row(same)["direction"] == ""
    # Every figure of the card is in the table or listed as missing, never dropped.
    assert {r["figure"] for r in c["figures"]} | {m["figure"] for m in c["missing"]} == set(ch.FIGURES)


# ---------------------------------------------------------------------------------------------------------------
# The compression-identified exemplars


def test_exemplars_match_a_direct_argmax_comparison_and_show_the_test_images(pair):
    (c,) = ch.changes(pair["base"], [pair["new"]], n_bootstrap=B)["comparisons"]
    ex = c["exemplars"]
    y, p0, p1 = pair["y"], pair["z0"].argmax(1), pair["z1"].argmax(1)
    differ = p0 != p1
    assert ex["count"] == int(differ.sum()) > 48 and ex["rate"] == pytest.approx(differ.double().mean().item())
    naive = {k: Counter() for k in K4}
    for t, b, n in zip(y.tolist(), p0.tolist(), p1.tolist()):
        if b != n:
            naive[K4[t]]["differ"] += 1
            naive[K4[t]]["lost" if b == t else "gained" if n == t else "both_wrong"] += 1
    for r in ex["by_class"]:
        assert (r["differ"], r["lost"], r["gained"], r["both_wrong"]) == tuple(
            naive[r["class"]][k] for k in ("differ", "lost", "gained", "both_wrong")
        )
    assert ex["lost"] + ex["gained"] + ex["both_wrong"] == ex["count"]
    triples = Counter((K4[t], K4[b], K4[n]) for t, b, n in zip(y.tolist(), p0.tolist(), p1.tolist()) if b != n)
    assert [(t["true"], t["base"], t["new"], t["count"]) for t in ex["top_confusions"]][:3] == [
        (*k, v) for k, v in sorted(triples.items(), key=lambda kv: (-kv[1], [K4.index(x) for x in kv[0]]))[:3]
    ]

    from pupil.run import load_run

    images = load_run(pair["base"], load_model=False).split("test").images
    gallery = ex["gallery"]
    assert len(gallery) == ch.GALLERY and "first 48 of" in ex["gallery_note"]
    confidence = pair["z0"].double().softmax(1).amax(1)
    order = {"lost": 0, "gained": 1, "both_wrong": 2}
    keys = [(order[g["kind"]], -confidence[g["index"]].item()) for g in gallery]
    assert keys == sorted(keys)  # NEW's losses first, then by BASE's confidence
    for g in gallery[:5]:
        i = g["index"]
        assert differ[i] and (g["true"], g["base"], g["new"]) == (K4[y[i]], K4[p0[i]], K4[p1[i]])
        png = Image.open(io.BytesIO(base64.b64decode(g["uri"].removeprefix(PNG_URI_PREFIX))))
        assert np.array_equal(np.asarray(png), images[i, 0].numpy())  # 16 x 16: no downscaling


def test_unreachable_images_omit_the_gallery_and_keep_the_counts(pair, tmp_path):
    y, z0, z1 = pair["y"], pair["z0"], pair["z1"]
    base, new = write_run(tmp_path / "b", y, z0, K4), write_run(tmp_path / "n", y, z1, K4)  # no run.json
    (c,) = ch.changes(base, [new], n_bootstrap=B)["comparisons"]
    assert c["title"] == "what changed" and c["compressed"] is None
    assert c["exemplars"]["count"] == int((z0.argmax(1) != z1.argmax(1)).sum())
    assert c["exemplars"]["gallery"] == [] and "not reachable" in c["exemplars"]["gallery_note"]


# ---------------------------------------------------------------------------------------------------------------
# Flags at their exact thresholds


def _flag_runs(root: Path, base_wrong: dict[int, int], new_wrong: dict[int, int], corr: tuple[int, int]) -> tuple:
    """1,000 test images, 10 classes of 100; ``*_wrong`` maps class -> images of it misclassified; ``corr`` the
    images (of 500) each side gets wrong under its single corruption, so that its accuracy moves 0.2 pt per image."""
    y = torch.arange(1000) % 10
    dirs = []
    for name, wrong, bad in (("base", base_wrong, corr[0]), ("new", new_wrong, corr[1])):
        pred = y.clone()
        for k, count in wrong.items():
            pred[(y == k).nonzero().flatten()[:count]] = (k + 1) % 10
        z = 4 * torch.nn.functional.one_hot(pred, 10).float()
        correct = (torch.arange(500) >= bad)[None, None].expand(1, 2, 500).clone()
        corruption = (torch.arange(500), correct, ["fog"])
        dirs.append(write_run(root / name, y, z, [f"c{k}" for k in range(10)], corruption=corruption))
    (c,) = ch.changes(*dirs[:1], dirs[1:], n_bootstrap=100)["comparisons"]
    return c, {f["flag"] for f in c["flags"]}


@pytest.mark.parametrize(
    ("new_wrong", "expected"),
    [
        ({0: 12, 1: 12, 2: 1}, set()),  # top-1 exactly -0.5 pt, two classes exactly -2 pt: kept, no hidden loss
        ({0: 13, 1: 12}, {"hidden_class_loss"}),  # top-1 exactly -0.5 pt, class 0 -3 pt
        ({0: 13, 1: 13}, {"top1_loss"}),  # top-1 -0.6 pt: a visible loss, so not a hidden one
        ({0: 10, 1: 10}, set()),  # unchanged
    ],
)
def test_class_flags_fire_exactly_past_their_thresholds(tmp_path, new_wrong, expected):
    base_wrong = {0: 10, 1: 10}
    c, flags = _flag_runs(tmp_path, base_wrong, new_wrong, (0, 0))
    assert flags == expected
    lost = [r["class"] for r in c["per_class"] if r["flag"]]
    assert lost == [f"c{k}" for k, v in new_wrong.items() if v - base_wrong.get(k, 0) > 2]
    top = next(r for r in c["figures"] if r["figure"] == "accuracy.top1")
    assert bool(top["flag"]) == ("top1_loss" in expected)


@pytest.mark.parametrize(("bad", "flagged"), [(15, False), (16, True)])  # 3.0 pt and 3.2 pt of corruption accuracy
def test_corruption_flag_fires_past_three_points(tmp_path, bad, flagged):
    _, flags = _flag_runs(tmp_path, {}, {}, (0, bad))
    assert ("corruption_loss" in flags) == flagged


# ---------------------------------------------------------------------------------------------------------------
# Missing checks, refused pairs


def test_missing_checks_are_listed_with_the_command_that_runs_them(pair, tmp_path):
    y, z0, z1 = pair["y"], pair["z0"], pair["z1"]
    base = write_run(tmp_path / "b", y, z0, K4, temperature=None, others=_others(eps=0.1))
    others = _others(eps=0.05)
    del others["energy"]
    new = write_run(tmp_path / "n", y, z1, K4, others=others, per_image=False)  # its per-image files never written
    (c,) = ch.changes(base, [new], n_bootstrap=B)["comparisons"]
    missing = {m["figure"]: m for m in c["missing"]}
    assert missing["energy.energy_j_per_1000_images"]["commands"] == [f"`pupil audit {new} --checks energy`"]
    assert missing["ood.mean_auroc"]["reason"] == "the ood check ran on neither run"
    assert missing["ood.mean_auroc"]["commands"] == [f"`pupil audit {d} --checks ood`" for d in (base, new)]
    assert "no temperature was fitted" in missing["calibration.ece_after_temperature"]["reason"]
    assert missing["model.size_on_disk"]["reason"].startswith("no model file at")
    for part in ch.PARTS:  # per-image data missing on NEW: per-class recall and exemplars, with the command
        assert missing[part]["commands"] == [f"`pupil audit {new} --checks accuracy`"]
    rows = {r["figure"]: r for r in c["figures"]}
    assert rows["accuracy.top1"]["ci95"] is None and rows["accuracy.top1"]["difference"] is not None
    assert rows["adversarial.robust_top1"]["difference"] is None
    assert "eps 0.1 vs 0.05" in rows["adversarial.robust_top1"]["detail"]
    assert (
        any("without an interval" in n for n in c["notes"]) and c["per_class"] == [] and "count" not in c["exemplars"]
    )
    assert set(rows) | set(missing) == set(ch.ORDER)  # nothing silently dropped


def test_mismatched_audits_are_refused(pair, tmp_path):
    y, z0 = pair["y"], pair["z0"]
    other_seed = write_run(tmp_path / "seed", y, z0, K4, audit=_audit(512, seed=1))
    with pytest.raises(PupilError, match=r"different images or settings \(seed 0 vs 1\).*--seed 0"):
        ch.changes(pair["base"], [other_seed])
    relabelled = write_run(tmp_path / "classes", y, z0, list(reversed(K4)))
    with pytest.raises(PupilError, match="different classes"):
        ch.changes(pair["base"], [relabelled])
    shifted = write_run(tmp_path / "labels", (y + 1) % 4, z0, K4)
    with pytest.raises(PupilError, match="different test labels"):
        ch.changes(pair["base"], [shifted])
    view = ch.changes(pair["base"], [other_seed, pair["new"]], n_bootstrap=B, skip_mismatched=True)
    assert [c["new"]["name"] for c in view["comparisons"]] == ["new"]
    assert view["refused"][0]["new"] == str(other_seed) and "seed 0 vs 1" in view["refused"][0]["reason"]


def test_a_base_that_is_not_the_compressed_runs_base_is_noted(pair, tmp_path):
    (c,) = ch.changes(pair["base"], [pair["new"]], n_bootstrap=B)["comparisons"]
    assert c["notes"] == [] and set(c["compressed"]) == {"method", "format", "artefact", "base"}
    other = write_run(tmp_path / "other", pair["y"], pair["z0"], K4, model_bytes=10)  # other weights, same audit
    (c,) = ch.changes(other, [pair["new"]], n_bootstrap=B)["comparisons"]
    assert len(c["notes"]) == 1 and "not from the weights in" in c["notes"][0]
    # the older spelling: the base as a path, its hash beside it, "artifact"
    info = synthetic_info(compressed={"base": str(other), "base_weights_sha256": "0" * 64, "artifact": "m.bin"})
    legacy = write_run(tmp_path / "legacy", pair["y"], pair["z1"], K4, info=info)
    (legacy / "m.bin").write_bytes(b"\0" * 7)
    (c,) = ch.changes(other, [legacy], n_bootstrap=B)["comparisons"]
    assert c["compressed"]["base"] == {"path": str(other), "weights_sha256": "0" * 64}
    assert "not from the weights in" in c["notes"][0]
    assert next(r for r in c["figures"] if r["figure"] == "model.size_on_disk")["new"] == 7


# ---------------------------------------------------------------------------------------------------------------
# compare: leaderboard.json, compare.html and the terminal


def test_compare_adds_the_view_for_a_compressed_run(pair, tmp_path):
    board = compare([pair["base"], pair["new"]], tmp_path / "c", n_bootstrap=B)
    assert board["changes"]["comparisons"][0]["title"] == "what compression changed"
    saved = json.loads((tmp_path / "c" / "leaderboard.json").read_text())
    assert (
        saved["changes"]["comparisons"][0]["exemplars"]["count"]
        == board["changes"]["comparisons"][0]["exemplars"]["count"]
    )
    html = (tmp_path / "c" / "compare.html").read_text()
    assert 'id="changes-1"' in html and "What compression changed: new (int8) against base" in html
    assert html.count('alt="test image') == ch.GALLERY and "Compression-identified exemplars" in html
    console = Console(record=True, width=200)
    ch.print_changes(board["changes"], console)
    out = console.export_text()
    assert "what compression changed: new (int8) against base" in out and "per-class recall" in out
    assert f"{board['changes']['comparisons'][0]['exemplars']['count']} of 512 test images" in out

    plain = write_run(tmp_path / "plain", pair["y"], pair["z1"], K4)  # not compressed: no view unless asked
    assert "changes" not in compare([pair["base"], plain], tmp_path / "c2", n_bootstrap=B)
    other_seed = write_run(tmp_path / "seed", pair["y"], pair["z1"], K4, audit=_audit(512, seed=1))
    board = compare([pair["base"], plain, other_seed], tmp_path / "c3", n_bootstrap=B, changes=True)
    assert [c["title"] for c in board["changes"]["comparisons"]] == ["what changed"]
    assert "seed 0 vs 1" in board["changes"]["refused"][0]["reason"]
    assert 'class="warn changes-refused"' in (tmp_path / "c3" / "compare.html").read_text()


def test_robust_accuracies_of_different_attacks_are_not_differenced(pair, tmp_path):
    """A gradient-free artefact is attacked by Square Attack where the base met PGD: both figures are shown, and
    their difference is not taken (it would measure the attackers, not the compression)."""
    y, z0, z1 = pair["y"], pair["z0"], pair["z1"]
    base = write_run(tmp_path / "b", y, z0, K4, others=_others())
    others = _others()
    others["adversarial"]["headline"]["label"] = "Square Attack robust accuracy at ε=0.1 (L∞)"
    base_results = json.loads((base / "results.json").read_text())
    base_results["checks"]["adversarial"]["headline"]["label"] = "PGD robust accuracy at ε=0.1 (L∞)"
    (base / "results.json").write_text(json.dumps(base_results))
    new = write_run(tmp_path / "n", y, z1, K4, others=others)
    (c,) = ch.changes(base, [new], n_bootstrap=B)["comparisons"]
    row = {r["figure"]: r for r in c["figures"]}["adversarial.robust_top1"]
    assert row["difference"] is None and row["detail"] == "not comparable: attacked by PGD vs Square Attack"
    assert row["base"] == row["new"] == 0.3
