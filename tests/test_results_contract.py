"""results.json is a contract: every registered check writes a summary with the keys ``SUMMARY_KEYS`` names, and
every reader outside the audit (compare, the model card, predict) finds the keys ``CONSUMED`` says it reads. The
audit runs every check once on the smoke run with tiny settings; a results.json of schema 1.x is refused."""

import json
import re

import numpy as np
import pytest
import torch

from pupil.audit import CHECKS, run_audit
from pupil.cli import _deferral_threshold
from pupil.config import build
from pupil.errors import PupilError
from pupil.report.compare import row
from pupil.report.plots import decode_png
from pupil.report.render import model_card
from pupil.results import (
    CONSUMED,
    SCHEMA_VERSION,
    SUMMARY_KEYS,
    load_results,
    png_data_uri,
    schema,
    section_problem,
)
from pupil.training.loop import fit
from tests.conftest import ROOT

# Each check as small as its settings allow: the whole audit takes a few seconds on two cores.
TINY = {
    "accuracy": {"n_bootstrap": 50},
    "efficiency": {"latency_repeats": 3, "warmup": 1, "throughput_batch": 16, "throughput_repeats": 1},
    "corruption": {"n": 32, "corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5]},
    "adversarial": {"n": 32, "steps": 2, "epsilons": [0, 0.1]},
    "certify": {"images": 8, "n0": 10, "n": 50},
    "ood": {"n_id": 64, "n_ood": 32, "n_fit": 64, "knn_k": 5},
    "uncertainty": {"n": 64, "mc_samples": 2, "tta_samples": 2},
    "conformal": {"n": 64, "corruptions": ["contrast"]},
    "explain": {"n": 4, "steps": 2, "lime_samples": 8, "shap_samples": 8, "ig_steps": 4, "examples": 1},
    "fairness": {"n_boot": 10, "slices": 3, "slice_examples": 1},
    "retrieval": {"n_queries": 64, "corruptions": ["contrast"], "n_corrupt": 16, "latency_queries": 10, "worst": 1},
}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    run = fit(build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(root), "name": "smoke"}), progress=False).dir
    names = CHECKS.names()
    results = run_audit(run, names, budget="quick", device="cpu", settings={n: TINY[n] for n in names if n in TINY})
    return run, results


def test_every_check_declares_its_summary_and_every_consumed_key_is_required():
    assert set(CHECKS.names()) <= set(SUMMARY_KEYS), "add the new check's summary keys to SUMMARY_KEYS"
    for reader, checks in CONSUMED.items():
        for check, keys in checks.items():
            assert set(keys) <= set(SUMMARY_KEYS[check]), f"{reader} reads {check} keys that no summary must have"
    assert SCHEMA_VERSION.startswith("2.") and "^2" in schema()["properties"]["schema_version"]["pattern"]


def test_every_check_writes_the_summary_its_readers_need(audited):
    run, results = audited
    assert results["schema_version"] == SCHEMA_VERSION and set(results["checks"]) == set(CHECKS.names())
    assert load_results(run) == json.loads(json.dumps(results))
    for name, section in results["checks"].items():
        assert list(section["summary"]) == list(SUMMARY_KEYS[name]), name
    for reader, checks in CONSUMED.items():
        for check, keys in checks.items():
            missing = set(keys) - set(results["checks"][check]["summary"])
            assert not missing, f"{reader} reads {sorted(missing)} from the {check} summary, which lacks them"


def test_summaries_copy_the_checks_figures(audited):
    _, results = audited
    c = results["checks"]
    s = {name: section["summary"] for name, section in c.items()}
    head = {name: section["headline"]["value"] for name, section in c.items()}
    assert s["accuracy"]["top1"] == head["accuracy"] == c["accuracy"]["metrics"]["top1"]
    assert s["accuracy"]["top1_ci95"] == c["accuracy"]["headline"]["ci95"]
    assert s["accuracy"]["top5"] is None  # the smoke run has 4 classes
    recalls = sorted(r[3] for r in c["accuracy"]["tables"]["per_class"]["rows"])[:3]
    assert [recall for _, recall in s["accuracy"]["worst_classes"]] == recalls
    assert s["calibration"]["ece"] == head["calibration"]
    assert s["calibration"]["temperature"] == c["calibration"]["metrics"]["temperature"]
    assert s["efficiency"]["latency_ms_p50"] == head["efficiency"]
    assert s["energy"]["energy_j_per_1000_images"] == head["energy"]
    assert s["corruption"]["mean_corrupted_top1"] == head["corruption"] and s["corruption"]["mce"] is None
    assert s["adversarial"]["robust_top1"] == head["adversarial"] and s["adversarial"]["eps"] == 0.1
    assert s["certify"]["certified_top1"] == head["certify"] and s["certify"]["radius"] == 0.5
    assert s["ood"]["mean_auroc"] == head["ood"] and s["ood"]["score"] == "msp"
    assert s["uncertainty"]["deferred"] == head["uncertainty"]
    assert s["explain"]["insertion_deletion_gap"] == head["explain"]
    assert s["fairness"]["accuracy_gap"] == head["fairness"] and s["fairness"]["attribute_kind"] == "proxy"


def test_the_readers_work_from_the_summaries(audited):
    run, results = audited
    r = row(results, str(run))
    for key in ("params", "flops", "top1", "top1_ci", "macro_f1", "ece", "latency_ms", "throughput"):
        assert r[key] is not None, key
    card = model_card(results, None)
    assert "Macro-F1 " in card and "Lowest recall: " in card and "Temperature scaling (T = " in card
    threshold = results["checks"]["uncertainty"]["summary"]["deferral_threshold"]
    if threshold is None:
        with pytest.raises(PupilError, match="no confidence threshold"):
            _deferral_threshold(str(run), "auto")
    else:
        assert _deferral_threshold(str(run), "auto") == threshold


def _example_images(checks: dict) -> list[str]:
    """Every example image the checks store in their curves (the fields $defs/png_uri lists)."""
    c = {name: section.get("curves", {}) for name, section in checks.items()}
    corruption = c["corruption"]["examples"]
    return [
        corruption["clean"],
        *corruption["corrupted"].values(),
        *(e[k] for e in c["adversarial"]["examples"] for k in ("clean", "adversarial", "perturbation")),
        *(it[k] for it in c["explain"]["examples"]["items"] for k in ("image", "saliency")),
        *(im for s in c["fairness"]["slice_examples"] for im in s["images"]),
    ]


def test_every_example_image_is_a_png_data_uri(audited):
    _, results = audited
    images = _example_images(results["checks"])
    assert len(images) >= 12  # 3 corruption, 3 per adversarial example, 2 per explain item, 1 per slice
    pattern = schema()["$defs"]["png_uri"]["pattern"]
    for uri in images:
        assert re.match(pattern, uri), uri[:40]
        img = decode_png(uri)
        assert img.dtype == np.uint8 and img.shape[:2] == (16, 16) and img.ndim == 2  # the smoke data: grey 16x16


def test_png_data_uri_keeps_uint8_and_rounds_floats_and_area_downscales():
    rgb = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert (decode_png(png_data_uri(rgb)) == rgb.permute(1, 2, 0).numpy()).all()
    grey = torch.tensor([[-0.5, 0.0, 0.6 / 255], [0.6, 1.0, 2.0]])  # clamped to [0, 1], then rounded to 0..255
    assert decode_png(png_data_uri(grey[None])).tolist() == [[0, 0, 1], [153, 255, 255]]
    assert (decode_png(png_data_uri(grey)) == decode_png(png_data_uri(grey[None]))).all()  # (H, W) as (1, H, W)
    big = torch.arange(4, dtype=torch.uint8).repeat_interleave(2).view(1, 1, 8).expand(1, 4, 8)  # 4 x 8
    assert decode_png(png_data_uri(big, max_side=4)).tolist() == [[0, 1, 2, 3]] * 2  # means of 2 x 2 blocks
    assert decode_png(png_data_uri(big, max_side=8)).shape == (4, 8)  # fits: left as it is


def test_a_missing_summary_key_is_refused(audited, tmp_path):
    run, _ = audited
    data = json.loads((run / "results.json").read_text())
    del data["checks"]["uncertainty"]["summary"]["deferral_threshold"]
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(PupilError, match=r"checks/uncertainty/summary: 'deferral_threshold' is a required$"):
        load_results(tmp_path)
    section = data["checks"]["uncertainty"]  # an earlier audit's section like this one is dropped, not kept
    assert section_problem(section, "uncertainty") == "summary: 'deferral_threshold' is a required"
    assert section_problem(section) is None  # without the name only the schema is checked


def _as_1x(data: dict) -> dict:
    """A 2.x results dict as schema 1.0 wrote it: no summaries."""
    for section in data["checks"].values():
        del section["summary"]
    return {**data, "schema_version": "1.0"}


def test_a_1x_results_file_is_refused_in_one_line(audited, tmp_path):
    run, _ = audited
    (tmp_path / "results.json").write_text(json.dumps(_as_1x(json.loads((run / "results.json").read_text()))))
    with pytest.raises(PupilError) as e:
        load_results(tmp_path)
    msg = f"{tmp_path / 'results.json'} was written by an older pupil (schema 1.0); run pupil audit {tmp_path} again"
    assert str(e.value) == msg
    with pytest.raises(PupilError, match=r"older pupil \(schema 1\.0\); run pupil audit"):
        _deferral_threshold(str(tmp_path), "auto")


def test_an_audit_over_a_1x_results_file_replaces_it_with_a_note(audited):
    run, _ = audited
    path = run / "results.json"
    path.write_text(json.dumps(_as_1x(json.loads(path.read_text()))))
    out = run_audit(run, ["calibration"], device="cpu")
    assert set(out["checks"]) == {"calibration"} and "dropped_sections" not in out["audit"]
    (note,) = out["audit"]["notes"]
    assert note.startswith("the earlier results.json was written by an older pupil (schema 1.0); it was replaced")
    assert "without its accuracy, adversarial," in note and "--checks accuracy,adversarial," in note
    assert load_results(run) == out


def test_every_figure_of_every_check_is_drawn(audited):
    """Each check names its figures by kind; the report draws every one of them from the curves they point at."""
    from pupil.report.render import section

    _, results = audited
    for name, s in results["checks"].items():
        drawn = section(name, s)["figures"]
        assert len(drawn) == len(s.get("figures", [])), name
        for fig in drawn:
            assert "could not be drawn" not in fig["caption"], (name, fig["caption"])
            assert decode_png(fig["uri"]).ndim == 3, (name, fig["caption"])
    assert {"line", "bars", "histogram", "drawer"} <= {
        f["kind"] for s in results["checks"].values() for f in s.get("figures", [])
    }


def test_generic_kinds_draw_what_the_old_check_specific_code_drew(audited):
    """A figure that moved from a check-named function to a generic kind is drawn pixel for pixel by the same code."""
    from pupil.report.plots import bars, draw, histogram, line_curves

    _, results = audited
    s = results["checks"]["adversarial"]
    ra = s["curves"]["robust_accuracy"]
    line = draw(s["figures"][0], s)
    assert (
        decode_png(line).tolist()
        == decode_png(
            line_curves(ra["epsilon"], {"FGSM": ra["fgsm"], "PGD": ra["pgd"]}, "ε (linf)", "accuracy")
        ).tolist()
    )
    s = results["checks"]["efficiency"]
    assert draw(s["figures"][0], s) == histogram(s["curves"]["latency_ms"], 30, "batch-1 latency (ms)", "runs")
    s = results["checks"]["accuracy"]
    rows = s["tables"]["per_class"]["rows"]
    assert draw(s["figures"][1], s) == bars([r[0] for r in rows], [r[4] for r in rows], "F1 per class", (0, 1))


def test_a_new_check_gets_its_figures_without_report_code(audited):
    """A section the report has never heard of is drawn from its figure specs alone; a bad spec costs its figure,
    with the reason in the caption, not the report."""
    from pupil.audit.common import figure
    from pupil.report.plots import decode_png as png
    from pupil.report.render import section

    _, results = audited
    s = {
        **results["checks"]["efficiency"],
        "curves": {"sweep": {"k": [1, 2, 3], "hit": [0.2, 0.5, 0.9]}, "values": [1.0, 2.0, 2.5], "pics": {}},
        "figures": [
            figure("recall at k", "line", "sweep", x="k", series={"hit": "recall"}),
            figure("spread", "histogram", "values", bins=5),
            figure("missing", "line", "nowhere", x="k", series={}),
            {"caption": "odd", "kind": "drawer", "drawer": "no_such_drawer"},
        ],
    }
    drawn = section("retrieval_v0", s)["figures"]
    assert [png(f["uri"]).ndim for f in drawn[:2]] == [3, 3]
    assert drawn[2]["caption"].startswith("missing: could not be drawn") and drawn[2]["uri"] == ""
    assert "no_such_drawer" in drawn[3]["caption"]
    with pytest.raises(ValueError, match="unknown figure kind"):
        figure("x", "pie")


def test_a_2_0_section_without_figures_says_how_to_get_them(audited):
    from pupil.report.render import section

    _, results = audited
    s = {k: v for k, v in results["checks"]["calibration"].items() if k != "figures"}
    out = section("calibration", s)
    assert out["figures"] == [] and any("pupil audit --checks calibration" in n for n in out["notes"])
