import pytest

from pupil.errors import PupilError
from pupil.registry import Registry


def test_register_get_and_duplicate():
    reg = Registry("thing")

    @reg.register("a", year=2000)
    def a():
        return 1

    assert reg.get("a") is a
    assert reg.entry("a").meta == {"year": 2000}
    assert "a" in reg and len(reg) == 1 and reg.names() == ["a"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(a)


def test_unknown_name_is_a_user_error():
    reg = Registry("model")
    reg.register("resnet20")(object)
    with pytest.raises(PupilError, match="unknown model 'resnet99'.*resnet20"):
        reg.get("resnet99")
