"""A small ImageNet-labelled image folder from the colour photographs that ship offline in scikit-image and
scikit-learn, for checking ImageNet-pretrained models with no network.

    python examples/imagenet_photos.py --out /tmp/imagenet_photos           # build the folder
    python examples/imagenet_photos.py --out /tmp/imagenet_photos --check   # and score EfficientNet-Lite0 on it

Layout: ``DIR/<WordNet id>/<photo>_<view>.png`` (the folder names are ImageNet-1k WordNet ids, so class
folders map onto ImageNet indices automatically) and ``DIR/class_map.csv`` (folder, imagenet_index,
description; descriptions as timm's ``ImageNetInfo`` gives them).

A photo is kept only when what it shows is one ImageNet-1k class (chosen by looking at the photo, not by
any model's output):

- skimage ``chelsea`` (a tabby cat's face) -> n02123045 "tabby, tabby cat". ImageNet's tabby / tiger cat /
  Egyptian cat classes are notoriously confused with each other, so top-5 is the fairer score for it.
- skimage ``coffee`` (an espresso in a cup on a saucer) -> n07920052 "espresso" ("cup" is in view too).
- sklearn ``china.jpg`` (the Tower of Buddhist Incense in Beijing's Summer Palace) -> n03877845 "palace".

Skipped: ``astronaut`` (a portrait; ImageNet-1k has no person or astronaut class), ``rocket`` (a Falcon 9 on
its launch pad; the nearest classes, "missile" and "projectile, missile", are weapons), ``stereo_motorcycle``
(a full-size motorcycle; ImageNet-1k only has "moped" and "motor scooter"), sklearn ``flower.jpg`` (a dahlia,
not an ImageNet-1k class), ``hubble_deep_field``, ``immunohistochemistry`` and ``retina`` (astronomy and
medical images), ``colorwheel`` and ``logo`` (not photographs), and the grey images (``camera``, ``clock``,
``coins``...), since this folder is for colour code paths.

Each photo gives 10 images: the whole photo, four overlapping corner crops of 85% of its width and height
(72% of its area) and the horizontal flips of those five. They are views of one photo, not independent
samples: read any score on this folder as "per photo, with some robustness to cropping", and count three
photos, not thirty images.

``--check`` (the shipped EfficientNet-Lite0, timm's eval preprocessing for efficientnet_lite0: shorter side
to 256 bicubic, centre crop 224) gave top-1 53.3% (16/30) and top-5 100%: espresso 10/10, palace 6/10,
tabby 0/10 (every view called "tiger cat" or "Egyptian cat", with "tabby" in the top 5); 20 s on 2 CPU cores.
"""

import argparse
import csv
import sys
from pathlib import Path

from PIL import Image

# (library, photo name, WordNet id): the photos kept, as argued in the module docstring.
PHOTOS = [
    ("skimage", "chelsea", "n02123045"),
    ("skimage", "coffee", "n07920052"),
    ("sklearn", "china.jpg", "n03877845"),
]
CROP = 0.85  # side of each corner crop, as a fraction of the photo's width and height


def load_photo(library: str, name: str) -> Image.Image:
    """One photo as an RGB PIL image, read from the package's own files (no download)."""
    if library == "skimage":
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name)).convert("RGB")


def views(photo: Image.Image) -> dict[str, Image.Image]:
    """The whole photo, its four corner crops, and the horizontal flip of each: 10 deterministic views."""
    w, h = photo.size
    cw, ch = round(CROP * w), round(CROP * h)
    out = {"full": photo}
    for name, (left, top) in {"tl": (0, 0), "tr": (w - cw, 0), "bl": (0, h - ch), "br": (w - cw, h - ch)}.items():
        out[name] = photo.crop((left, top, left + cw, top + ch))
    out.update({f"{k}_flip": v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for k, v in list(out.items())})
    return out


def build(root: Path) -> None:
    """Write the class folders and ``class_map.csv`` under ``root``."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = info.label_names()  # index -> WordNet id, in ImageNet-1k's class order
    rows = []
    for library, name, wnid in PHOTOS:
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(name).stem
        for view, image in views(load_photo(library, name)).items():
            image.save(folder / f"{stem}_{view}.png")
        index = wnids.index(wnid)
        rows.append((wnid, index, info.index_to_description(index)))
    with open(root / "class_map.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["folder", "imagenet_index", "description"])
        writer.writerows(sorted(rows))


def check(root: Path) -> None:
    """Top-1 and top-5 of the shipped EfficientNet-Lite0 on the folder, with timm's eval preprocessing."""
    import timm
    import torch
    from timm.data import create_transform

    from pupil.models.pretrained import efficientnet_lite0_imagenet

    model, classes, side = efficientnet_lite0_imagenet()  # takes [0, 1] RGB, normalises inside
    cfg = timm.create_model("efficientnet_lite0", pretrained=False).pretrained_cfg  # crop_pct 0.875, bicubic
    # Resize the shorter side to side / crop_pct (256), centre-crop side (224). With normalize=False timm returns
    # uint8 tensors (MaybePILToTensor), hence the division by 255 below.
    transform = create_transform(
        side, interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], normalize=False
    )
    with open(root / "class_map.csv") as f:
        index = {row["folder"]: int(row["imagenet_index"]) for row in csv.DictReader(f)}
    paths = sorted(root.glob("*/*.png"))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]).float() / 255  # (N, 3, 224, 224)
    y = torch.tensor([index[p.parent.name] for p in paths])
    with torch.no_grad():
        top5 = model(x).topk(5, dim=1).indices  # (N, 5)
    for p, t, pred in zip(paths, y.tolist(), top5.tolist()):
        mark = "ok" if pred[0] == t else ("top5" if t in pred else "miss")
        print(f"{mark:4} {p.parent.name}/{p.name}: {classes[pred[0]]}")
    top1, in5 = (top5[:, 0] == y).float().mean(), (top5 == y[:, None]).any(1).float().mean()
    print(f"top-1 {top1:.1%}, top-5 {in5:.1%} on {len(y)} views of {len(PHOTOS)} photos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must be new or empty)")
    parser.add_argument("--check", action="store_true", help="then score the shipped EfficientNet-Lite0 on it")
    args = parser.parse_args()
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        sys.exit(f"{args.out} exists and is not an empty folder; give a new one")
    build(args.out)
    print(f"wrote {len(PHOTOS)} classes x 10 views to {args.out}")
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
