"""Resize-shorter-side-and-centre-crop (``Fit``) and channel conversion, checked against torchvision and PIL."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pupil.data import load
from pupil.data.images import CONVERSIONS, Fit, convert_channels, fit_tensor, read_images
from pupil.errors import PupilError

SIZES = [(301, 217), (500, 375), (70, 200), (217, 301), (90, 90)]  # (width, height); 70 < 80: upsampled


def _reference(im: Image.Image, fit: Fit) -> torch.Tensor:
    """torchvision's ImageNet evaluation transform on a PIL image, as uint8 (C, H, W)."""
    out = F.center_crop(F.resize(im, fit.resize, InterpolationMode(fit.interpolation)), fit.crop)
    return F.pil_to_tensor(out)


def _noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8), mode)


def _nonzero(conv: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in conv.items() if v}


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
def test_fit_equals_torchvision_on_pil_files(tmp_path, interpolation):
    fit = Fit(resize=80, crop=67, interpolation=interpolation)  # odd crop: the anchor rounds half to even
    paths = []
    for i, (w, h) in enumerate(SIZES):
        _noise(w, h, i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    dec = read_images(paths, fit=fit)
    ref = torch.stack([_reference(Image.open(p), fit) for p in paths])
    assert dec.images.shape == (5, 3, 67, 67) and torch.equal(dec.images, ref)
    # every size changes; only 64x200 has a shorter side below 80
    assert _nonzero(dec.conversions) == {"resized": 5, "cropped": 5, "upsampled": 1}


def test_fit_through_the_folder_loader_with_grey_and_rotated_jpeg(tmp_path):
    fit = Fit(48, 40, "bicubic")
    files = {}
    for c, sizes in {"cat": [(301, 217), (64, 200)], "dog": [(500, 375), (40, 41)]}.items():
        (tmp_path / c).mkdir()
        for i, (w, h) in enumerate(sizes):
            files[tmp_path / c / f"{i}.png"] = _noise(w, h, 10 * len(files), "L" if i else "RGB")
            files[tmp_path / c / f"{i}.png"].save(tmp_path / c / f"{i}.png")
    im = _noise(70, 50, 99)  # 70 wide, 50 high, stored rotated: viewed 50 wide, 70 high
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "dog" / "2.jpg", exif=exif)  # under twice the resize: decoded at full scale

    ds = load(str(tmp_path), "all", fit=fit, channels=3)
    viewed = [Image.open(p) for p in sorted(files)] + [ImageOps.exif_transpose(Image.open(tmp_path / "dog" / "2.jpg"))]
    ref = torch.stack([_reference(v.convert("RGB"), fit) for v in viewed])
    assert ds.shape == (3, 40, 40) and torch.equal(ds.images, ref)
    assert ds.meta["conversions"].keys() == set(CONVERSIONS)
    conv = _nonzero(ds.meta["conversions"])
    assert conv == {"converted_mode": 2, "exif_rotated": 1, "resized": 5, "cropped": 5, "upsampled": 1}


def test_a_jpeg_drafted_to_exactly_the_resize_is_still_counted_and_close(tmp_path):
    yy, xx = np.mgrid[0:160, 0:200]
    smooth = np.stack([xx * 255 // 199, yy * 255 // 159, (xx + yy) * 255 // 358], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    fit = Fit(40, 32)  # 200x160 decodes at 1/4 scale, straight to 50x40: no PIL resize is needed
    dec = read_images([tmp_path / "big.jpg"], fit=fit)
    assert _nonzero(dec.conversions) == {"resized": 1, "cropped": 1}
    diff = (dec.images[0].int() - _reference(Image.open(tmp_path / "big.jpg"), fit).int()).abs()
    assert diff.float().mean() < 3  # a reduced-scale decode is close to, not equal to, a full decode and resize


def test_fit_on_an_in_memory_dataset_equals_torchvision_and_converts_grey(tmp_path):
    base = load("digits", "test")
    fit = Fit(12, 11, "bicubic")
    ds = load("digits", "test", fit=fit, channels=3)
    ref = F.center_crop(F.resize(base.images.expand(-1, 3, -1, -1), [12], InterpolationMode.BICUBIC), [11])
    assert ds.shape == (3, 11, 11) and torch.equal(ds.images, ref) and torch.equal(ds.targets, base.targets)
    n = len(base)
    assert _nonzero(ds.meta["conversions"]) == {"grey_to_rgb": n, "resized": n, "cropped": n, "upsampled": n}
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # grey repeated before the resize


def test_fit_tensor_agrees_with_the_pil_path_within_one_level():
    x = torch.from_numpy(np.array(_noise(301, 217, 3))).permute(2, 0, 1)[None]  # (1, 3, 217, 301)
    for interpolation in ("bilinear", "bicubic"):  # nearest differs between torch and PIL by design
        fit = Fit(80, 64, interpolation)
        conv = dict.fromkeys(CONVERSIONS, 0)
        diff = (fit_tensor(x, fit, conv)[0].int() - _reference(F.to_pil_image(x[0]), fit).int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.05
        assert _nonzero(conv) == {"resized": 1, "cropped": 1}


def test_rgb_to_grey_matches_pil_for_tensors_and_files(tmp_path):
    im = _noise(33, 21, 5)
    conv = dict.fromkeys(CONVERSIONS, 0)
    grey = convert_channels(F.pil_to_tensor(im)[None], 1, conv)
    assert torch.equal(grey[0], F.pil_to_tensor(im.convert("L"))) and conv["rgb_to_grey"] == 1
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            _noise(33, 21, i + (c == "b") * 2).save(tmp_path / c / f"{i}.png")
    ds = load(str(tmp_path), "all", channels=1)
    ref = torch.stack([F.pil_to_tensor(Image.open(p).convert("L")) for p in sorted(tmp_path.glob("*/*.png"))])
    assert ds.shape == (1, 21, 33) and torch.equal(ds.images, ref) and ds.meta["conversions"]["converted_mode"] == 4


def test_without_fit_or_channels_nothing_changes(tmp_path):
    base = load("digits", "test")
    assert "conversions" not in base.meta and base.shape == (1, 8, 8)
    assert load("synthetic", "train", n=8, channels=3).shape == (3, 16, 16)  # synthetic makes its own channels
    _noise(30, 20, 0).save(tmp_path / "a.png")
    dec = read_images([tmp_path / "a.png"], img_size=16)
    ref = Image.open(tmp_path / "a.png").resize((16, 16), Image.BILINEAR, reducing_gap=3.0)
    assert torch.equal(dec.images[0], F.pil_to_tensor(ref)) and _nonzero(dec.conversions) == {"resized": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resize": 224, "crop": 256}, r"^the crop \(256\) cannot be larger than the resized shorter side \(224\)$"),
        ({"resize": 256, "crop": 224, "interpolation": "lanczos"}, r"^interpolation must be one of nearest, bil"),
        ({"resize": 0, "crop": 0}, r"^the resize size must be a positive whole number of pixels, not 0$"),
        ({"resize": 256, "crop": 22.5}, r"^the crop size must be a positive"),
    ],
)
def test_bad_fits_are_refused_in_one_line(kwargs, message):
    with pytest.raises(PupilError, match=message) as e:
        Fit(**kwargs)
    assert "\n" not in str(e.value)


def test_fit_with_img_size_or_bad_channels_is_refused(tmp_path):
    _noise(30, 20, 0).save(tmp_path / "a.png")
    with pytest.raises(PupilError, match="not both"):
        read_images([tmp_path / "a.png"], img_size=16, fit=Fit(16, 16))
    with pytest.raises(PupilError, match="not both"):
        load("digits", "test", img_size=16, fit=Fit(16, 16))
    with pytest.raises(PupilError, match="channels must be 1"):
        load("digits", "test", channels=2)


def test_files_smaller_than_the_crop_are_refused_or_skipped(tmp_path):
    """A folder that mixes in images too small for the model's crop: one line naming them, or left out and
    listed under --on-bad-image skip (blowing a thumbnail up to 224 px would audit something else)."""
    paths = []
    for i, (w, h) in enumerate([(300, 260), (120, 90), (230, 500)]):
        paths.append(tmp_path / f"{i}.png")
        _noise(w, h, i).save(paths[-1])
    fit = Fit(256, 224)
    with pytest.raises(PupilError, match=r"1.png: 120x90 is smaller than the model's 224-px crop"):
        read_images(paths, fit=fit)
    dec = read_images(paths, fit=fit, on_bad="skip")
    assert dec.kept == [0, 2] and len(dec.bad) == 1 and dec.images.shape == (2, 3, 224, 224)
