import inspect
from collections import defaultdict

import pytest
import torch

from pupil.models import MODELS, PixelModel, check_contract, create
from pupil.models.stats import count_flops

FAMILIES = defaultdict(list)
for _e in MODELS:
    FAMILIES[_e.meta["family"]].append(_e)
TEST_SIZES = [e.name for e in MODELS if e.meta.get("test")]


def test_every_family_has_exactly_one_test_size_and_a_paper():
    for family, entries in FAMILIES.items():
        assert sum(e.meta.get("test", False) for e in entries) == 1, family
        for e in entries:
            assert e.meta["paper"] and 1980 < e.meta["year"] < 2030


def test_test_sizes_end_in_test_and_no_name_ends_in_tiny():
    # vit_tiny, swin_tiny, convnext_tiny... are the papers' and timm's names of other, real models.
    assert [e.name for e in MODELS if e.name.endswith("_tiny")] == []
    for family, entries in FAMILIES.items():
        named = [e for e in entries if e.name.endswith("_test")]
        assert len(named) == 1 and named[0].meta["test"], family  # the one size flagged for the tests


@pytest.mark.parametrize("name", TEST_SIZES)
@pytest.mark.parametrize("in_chans,img_size", [(1, 28), (3, 32)])
def test_contract_on_test_sizes(name, in_chans, img_size):
    check_contract(create(name, num_classes=7, in_chans=in_chans, img_size=img_size), in_chans, img_size)


@pytest.mark.parametrize("name", [e.name for e in MODELS if not e.meta.get("test")])
def test_full_sizes_build_and_run(name):
    net = create(name, num_classes=10, in_chans=1, img_size=28).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_timm_model_by_name_keeps_the_contract():
    check_contract(create("timm:resnet10t", num_classes=5, in_chans=1, img_size=32), 1, 32)
    vit = create("timm:vit_tiny_patch16_224", num_classes=4, in_chans=3, img_size=32)
    assert vit.feature_grid == (2, 2)
    check_contract(vit, 3, 32)


def test_unknown_models_are_user_errors():
    from pupil.errors import PupilError

    with pytest.raises(PupilError, match="unknown model"):
        create("resnet999")
    with pytest.raises(PupilError, match="unknown timm model"):
        create("timm:not_a_model")


@pytest.mark.parametrize("name", TEST_SIZES)
def test_families_take_the_loops_arguments_and_refuse_others_by_name(name):
    from pupil.errors import PupilError

    create(name, num_classes=3, in_chans=1, img_size=28, drop_rate=0.1)  # the training loop always passes it
    with pytest.raises(PupilError, match=rf"^model {name} has no argument 'widht'; it takes .*drop_rate"):
        create(name, num_classes=3, in_chans=1, img_size=28, widht=3)


def test_constructor_signatures_are_the_truth():
    for e in MODELS:
        kinds = [p.kind for p in inspect.signature(e.obj).parameters.values()]
        assert inspect.Parameter.VAR_KEYWORD not in kinds, e.name


def test_drop_path_is_refused_where_the_model_has_none():
    from pupil.errors import PupilError

    takes = "widths, drop_rate, embed_dim"
    with pytest.raises(PupilError, match=f"^model lenet5 has no argument 'drop_path_rate'; it takes {takes}$"):
        create("lenet5", drop_rate=0.0, drop_path_rate=0.1)
    with pytest.raises(PupilError, match="^model shufflenetv2_test has no argument 'drop_path_rate'"):
        create("shufflenetv2_test", drop_path_rate=0.1)


def test_timm_model_arguments_are_checked():
    from pupil.errors import PupilError

    create("timm:resnet10t", num_classes=3, in_chans=1, img_size=32, drop_rate=0.1, drop_path_rate=0.1)
    # resnet10t takes no img_size (retried without it), vit does: neither may turn a typo into a TypeError.
    for name in ("timm:resnet10t", "timm:vit_tiny_patch16_224"):
        with pytest.raises(PupilError, match=rf"^model {name} has no argument 'widht'; \w+ takes .*drop_rate"):
            create(name, num_classes=3, in_chans=1, img_size=32, widht=3)


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained", "pretrained_cfg_overlay", "cache_dir"])
def test_timm_model_arguments_never_load_files(tmp_path, key):
    from pupil.errors import PupilError

    net = create("timm:resnet10t", num_classes=3, in_chans=1, img_size=32)
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    value = {
        "checkpoint_path": str(tmp_path / "weights.pth"),
        "pretrained": True,
        "pretrained_cfg_overlay": {"file": str(tmp_path / "weights.pth")},
        "cache_dir": str(tmp_path),
    }[key]
    with pytest.raises(PupilError, match=rf"^model timm:resnet10t: argument '{key}' would load files or weights"):
        create("timm:resnet10t", num_classes=3, in_chans=1, img_size=32, **{key: value})


def test_lenet5_matches_the_paper_parameter_count():
    # C1 156 + C3 2,416 (full, no connection table) + F5 48,120 + F6 10,164 + a 10-way linear output 850.
    net = create("lenet5", num_classes=10, in_chans=1, img_size=28)
    assert sum(p.numel() for p in net.parameters()) == 61706


def test_resnet20_has_the_papers_size():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters.
    net = create("resnet20", num_classes=10, in_chans=3, img_size=32)
    assert abs(sum(p.numel() for p in net.parameters()) - 0.27e6) < 0.01e6


def test_flops_of_a_linear_layer():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    assert count_flops(lin, (3, 1, 3, 4)) == 2 * 12 * 5


def test_pixel_model_normalises_and_flip_tta_averages():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
    net.num_classes = 2
    m = PixelModel(net, [0.5], [0.25])
    x = torch.rand(3, 1, 2, 4)
    assert torch.allclose(m(x), net((x - 0.5) / 0.25))
    m.tta = True
    expected = (net((x - 0.5) / 0.25) + net((x.flip(3) - 0.5) / 0.25)) / 2
    assert torch.allclose(m(x), expected, atol=1e-6)
