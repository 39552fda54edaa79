import dataclasses
import json
import math

import pytest

from pupil.audit import CHECKS, run_audit
from pupil.audit.common import at_least, validate_settings
from pupil.cli import _parse_settings, main
from pupil.errors import PupilError
from pupil.registry import Registry
from pupil.results import load_results
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("settings")
    recipe = str(ROOT / "recipes/smoke/synthetic.yaml")
    assert main(["train", recipe, "--out", str(out), "--epochs", "1", "--no-progress", "--name", "t"]) == 0
    return out / "t"


@pytest.mark.parametrize(
    "setting,message",
    [
        ("calibration.n_bins=abc", "calibration.n_bins must be an integer >= 2, not 'abc'"),
        ("calibration.n_bins=-1", "calibration.n_bins must be an integer >= 2, not -1"),
        ("calibration.n_bins=0", "calibration.n_bins must be an integer >= 2, not 0"),
        ("calibration.n_bins=2.5", "calibration.n_bins must be an integer >= 2, not 2.5"),
        ("calibration.fit_split=test", "calibration.fit_split must be val (the temperature is never fitted"),
        ("certify.sigma=.nan", "certify.sigma must be a finite number > 0, not nan"),
        ("adversarial.norm=l3", "adversarial.norm must be one of linf, l2, not 'l3'"),
        ("accuracy.ordered=1", "accuracy.ordered must be true or false, not 1"),
        ("energy.country=XYZ", "energy.country must be one of the"),
        ("ood.scores=msp,entropy", "ood.scores must be a list of names from msp, max_logit"),
        ("ood.scores=msp,entropy", "(unknown OOD score 'entropy')"),
        ("corruption.severities=[1,7]", "corruption.severities must be a list of integers from 1 to 5, not [1, 7]"),
    ],
)
def test_a_bad_setting_is_one_line_naming_what_is_allowed(tiny_run, capsys, setting, message):
    check = setting.split(".")[0]
    assert main(["audit", str(tiny_run), "--checks", check, "--device", "cpu", "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", sorted(CHECKS.names()))
def test_every_check_validates_every_setting(name):
    check = CHECKS.get(name)()
    for budget in ("quick", "full"):
        cfg = check.config(budget)
        assert check.config(budget, dataclasses.asdict(cfg)) == cfg  # a config's own values are valid settings
    for field in dataclasses.fields(check.Config):
        with pytest.raises(PupilError, match=rf"^{name}\.{field.name} must be .*, not \{{'a': 1\}}$"):
            check.config("quick", {field.name: {"a": 1}})  # a mapping is no setting's type


@dataclasses.dataclass
class Example:
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    label: str = "a"
    limit: int | None = None
    sizes: list[int] = dataclasses.field(default_factory=list)
    pair: tuple[float, ...] = (0.0, 1.0)

    def __post_init__(self):
        validate_settings(self, "example", count=at_least(1), limit=at_least(0))


def test_types_follow_the_hints():
    e = Example(count=3, rate=2, label=5, limit=None, sizes=[1, 2], pair=[1, 2.5])
    assert e.count == 3 and type(e.rate) is float and e.rate == 2.0  # an int is taken for a float
    assert e.label == "5" and e.pair == (1.0, 2.5) and e.sizes == [1, 2]
    assert Example(sizes="1, 2,,").sizes == [1, 2] and Example(sizes=3).sizes == [3]  # a comma string, a lone number
    assert Example(rate="1e-3").rate == 0.001  # YAML 1.1 reads 1e-3 as a string
    bad = {
        "count": (True, "an integer >= 1, not true"),
        "rate": (math.inf, "a finite number, not inf"),
        "flag": ("yes", "true or false, not 'yes'"),
        "label": (None, "a string, not null"),
        "limit": (-1, "an integer >= 0 or null, not -1"),
        "sizes": ([1, 2.0], r"a list of integers, not [1, 2.0] \(item 2.0 is not an integer\)"),
        "pair": ("0,x", r"a list of finite numbers, not '0,x' \(item 'x' is not a finite number\)"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(PupilError, match=f"^example.{field} must be {message}$".replace("[", r"\[")):
            Example(**{field: value})


def test_a_list_setting_takes_a_comma_string_or_a_list():
    check = CHECKS.get("adversarial")()
    from_text = check.config("full", {"epsilons": "0.1, 0.05,"})  # --set adversarial.epsilons=0.1,0.05, older callers
    from_yaml = check.config("full", {"epsilons": [0.1, 0.05]})  # --set adversarial.epsilons=[0.1,0.05]
    assert from_text == from_yaml and from_text.epsilons == [0.1, 0.05]
    assert dataclasses.asdict(from_text)["epsilons"] == [0.1, 0.05]  # results.json records a list
    text, listed = (_parse_settings([f"adversarial.epsilons={v}"])["adversarial"] for v in ("0.1,0.05", "[0.1, 0.05]"))
    assert check.config("full", text) == check.config("full", listed) == from_yaml  # both --set spellings
    corruption = CHECKS.get("corruption")()
    assert corruption.config("full", {"severities": "1,3"}).severities == [1, 3]
    assert corruption.config("full", {"severities": 3}).severities == [3]  # YAML reads severities=3 as a number
    with pytest.raises(PupilError, match=r"corruption\.severities .*, not '1,x' \(item 'x' is not an integer\)$"):
        corruption.config("full", {"severities": "1,x"})
    with pytest.raises(PupilError, match=r"corruption\.corruptions .*, not 'fog,rain' \(unknown corruption 'rain'\)$"):
        corruption.config("full", {"corruptions": "fog,rain"})
    with pytest.raises(PupilError, match=r"adversarial\.epsilons .*, not '0,-1' \(epsilon -1\.0 is not >= 0\)$"):
        check.config("full", {"epsilons": "0,-1"})


def test_settings_are_checked_before_the_run_is_loaded(tmp_path):
    with pytest.raises(PupilError, match="uncertainty.n must be an integer >= 0, not -5"):
        run_audit(tmp_path / "missing", ["uncertainty"], settings={"uncertainty": {"n": -5}})
    with pytest.raises(PupilError, match="unknown check 'calibraton'.*choose one of accuracy, calibration, efficiency"):
        run_audit(tmp_path / "missing", ["accuracy"], settings={"calibraton": {"n_bins": 5}})


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(
        PupilError, match=r"^unknown check 'foo'.*; choose one of accuracy, calibration, efficiency, energy, "
    ):
        CHECKS.get("foo")
    models = Registry("model")
    for i in range(20):
        models.register(f"net{i}")(object)
    with pytest.raises(PupilError, match=r"^unknown model 'xyz'; `pupil models` lists them$"):
        models.get("xyz")


def test_positive_from_must_be_a_class_index(tiny_run):
    with pytest.raises(PupilError, match="accuracy.positive_from must be a class index from 1 to 3, not 4"):
        run_audit(tiny_run, ["accuracy"], device="cpu", settings={"accuracy": {"positive_from": 4}})


def test_a_corrupt_earlier_section_is_dropped_and_reported(tiny_run):
    path = tiny_run / "results.json"
    run_audit(tiny_run, ["accuracy", "calibration"], device="cpu")
    results = json.loads(path.read_text())
    del results["checks"]["calibration"]["headline"]  # hand-edited, or from an older schema
    results["checks"]["garbage"] = "not a section"
    path.write_text(json.dumps(results))
    out = run_audit(tiny_run, ["accuracy"], device="cpu")
    assert set(out["checks"]) == {"accuracy"}
    dropped = {d["check"]: d["reason"] for d in out["audit"]["dropped_sections"]}
    assert set(dropped) == {"calibration", "garbage"}
    assert "headline" in dropped["calibration"] and "--checks calibration" in dropped["calibration"]
    assert load_results(tiny_run) == out
    run_audit(tiny_run, ["calibration"], device="cpu")  # re-running the check restores its section ...
    out = run_audit(tiny_run, ["accuracy"], device="cpu")  # ... which later audits keep
    assert set(out["checks"]) == {"accuracy", "calibration"} and "dropped_sections" not in out["audit"]


def test_an_earlier_results_file_that_is_not_json_is_replaced_with_a_note(tiny_run):
    path = tiny_run / "results.json"
    path.write_text('{"checks": {')
    out = run_audit(tiny_run, ["accuracy"], device="cpu")
    assert any("not valid JSON" in n and "replaced" in n for n in out["audit"]["notes"])
    assert load_results(tiny_run)["checks"].keys() == {"accuracy"}
