import numpy as np
import pytest
import torch
from PIL import Image

from pupil.cli import main
from pupil.models.pretrained import LITE0_DEPTHS, efficientnet_lite0_imagenet, lite0_key


def test_key_map_names_timm_blocks():
    assert lite0_key("_conv_stem.weight") == "conv_stem.weight"
    assert lite0_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"  # depthwise-separable
    assert lite0_key("_blocks.3._expand_conv.weight") == "blocks.2.0.conv_pw.weight"
    assert lite0_key(f"_blocks.{sum(LITE0_DEPTHS) - 1}._bn2.bias") == "blocks.6.0.bn3.bias"
    with pytest.raises(KeyError):
        lite0_key("_unknown.weight")


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0_imagenet()  # load_state_dict is strict: every tensor is mapped


@pytest.mark.parametrize(
    "photo,labels", [("chelsea", {"Egyptian cat", "tabby, tabby cat", "tiger cat"}), ("coffee", {"espresso", "cup"})]
)
def test_shipped_imagenet_weights_recognise_photos(lite0, photo, labels):
    from skimage import data

    model, classes, side = lite0
    img = torch.from_numpy(getattr(data, photo)()).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(img, size=(side, side), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = model(x).softmax(1)[0].topk(5)
    assert classes[top.indices[0]] in labels and top.values[0] > 0.5


def test_predict_with_the_shipped_weights(tmp_path, capsys):
    from skimage import data

    path = tmp_path / "cat.png"
    Image.fromarray(np.asarray(data.chelsea())).save(path)
    assert main(["predict", "efficientnet_lite0.imagenet", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cat" in out.splitlines()[1]


def test_grey_adaptation_computes_the_rgb_stem_on_repeated_channels(lite0):
    from pupil.models.pretrained import pretrained_net

    net, mean, std = pretrained_net("timm:efficientnet_lite0", 10, in_chans=1)
    assert (mean, std) == ([0.5], [0.5]) and net.num_classes == 10
    x = torch.rand(2, 1, 64, 64)
    net.eval()
    with torch.no_grad():
        rgb = lite0[0].net.forward_features((x.repeat(1, 3, 1, 1) - 0.5) / 0.5)
        grey = net.forward_features((x - 0.5) / 0.5)
    assert torch.allclose(rgb, grey, atol=1e-4)


def test_fine_tune_from_shipped_weights_and_reload(tmp_path, smoke_recipe):
    from pupil.config import build
    from pupil.run import load_run
    from pupil.training.loop import fit

    over = {"out": str(tmp_path), "name": "ft", "model": "timm:efficientnet_lite0", "pretrained": True}
    over.update(img_size=32, epochs=0.25, batch_size=32, val_size=32)
    run = fit(build(smoke_recipe, over), progress=False)
    info = run.summary()
    loaded = load_run(run.dir, device="cpu")
    assert loaded.model.mean.flatten().tolist() == [0.5]  # the pretrained normalisation, not the data's
    assert info["total_steps"] > 0


def test_pretrained_refuses_models_without_weights(tmp_path, smoke_recipe):
    from pupil.config import build
    from pupil.errors import PupilError
    from pupil.training.loop import fit

    with pytest.raises(PupilError, match="no pretrained weights for 'resnet_test'"):
        fit(build(smoke_recipe, {"out": str(tmp_path), "pretrained": True}), progress=False)
