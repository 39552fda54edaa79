"""A served model: a run directory loaded once, with what its audit measured, and uploads decoded to its input.

What the audit stored (results.json's summaries, read through ``pupil.results.consumed(results, "serve", ...)``,
and the per-image files beside it) becomes four rules applied to every prediction, all vectorised over a batch's
logits (B, K):

- **Probabilities** are softmax(logits / T) with the temperature the calibration check fitted on the validation
  split (Guo et al. 2017); T = 1, flagged as not audited, when the check did not run or had no validation split.
- **Deferral**: an image goes to a human when its plain softmax confidence (T = 1, what the uncertainty check
  fitted its threshold on) is below the uncertainty check's ``deferral_threshold``, or when it looks out of
  distribution.
- **OOD**: the ood check's headline score (msp, max_logit or energy: higher = more in-distribution) with the
  threshold at 95% TPR on the audit's in-distribution test images: the 5th percentile of their scores, read from
  the check's per-image file. 95% of test images score at or above it, and the check's ``mean_fpr95`` is the
  share of its OOD images that also do, so the flag is the operating point the audit's FPR@95TPR describes.
- **Conformal sets** at a coverage level (0.95 unless the request asks another) from the conformal check's
  stored validation logits (``pupil.conformal.calibrate``, once per level, cached); randomized sets draw u from a
  hash of the decoded pixels (``uniforms_for``), so an image gets the same set as ``pupil predict --conformal``
  gives it, in any batch.

Uploads are decoded as ``pupil.data.images.read_images`` decodes files (the same steps, in the same order, on
bytes instead of a path), so the service and ``pupil predict`` see the same pixels; the header is read first, so
that an image over the pixel limit is refused before a byte of it is decoded.

The forward pass runs the model as the audit ran it: fp32, and channels-last (weights and inputs) for a run whose
runtime says so, which matches ``pupil predict``'s contiguous pass to float rounding and took 0.44 instead of 0.73
ms of CPU per image for vgg_small with flip TTA on one thread. A model without PyTorch parameters (an ONNX Runtime
session: ``pupil.sources``' ``onnx:``, or a run ``pupil compress`` deployed for ONNX Runtime) is served too: its
logits give the OOD score and the deferral as any model's do, its explanations are occlusion maps, and its session
gets the server's threads without spinning (``serving_session``).
"""

from __future__ import annotations

import io
import math
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pupil.errors import PupilError
from pupil.io import sha256_file

if TYPE_CHECKING:
    from pupil.data.images import Fit
    from pupil.run import Run

DEFAULT_LEVEL = 0.95
OOD_TPR = 0.95  # the share of in-distribution test images the OOD threshold keeps
LOGIT_SCORES = ("msp", "max_logit", "energy")  # OOD scores computed from the logits alone
FROZEN_RTOL = 1e-4  # frozen vs eager logits: BatchNorm folded into the convolutions rounds a little differently
MAX_PIXELS = 4096 * 4096  # our own limit on an upload's decoded size, below PIL's decompression-bomb limit
EXPLAIN_METHODS = ("gradcam", "gradcam++", "occlusion", "integrated_gradients")  # fast enough for a request
GRADIENT_METHODS = ("gradcam", "gradcam++", "integrated_gradients")  # those that need gradients through the model
CACHED_LEVELS = 32  # conformal calibrations kept per model (one per coverage level asked for)


class BadUpload(Exception):
    """An upload the service refuses: ``status`` (400, 413 or 415) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------------------------
# Decoding uploads


def open_upload(data: bytes, max_pixels: int = MAX_PIXELS):
    """The upload opened by PIL, header only (no pixels decoded yet); refused when it is not an image or would
    decode to more than ``max_pixels`` pixels (ours) or past PIL's decompression-bomb limit."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadUpload(400, "the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadUpload(
            413, f"refused: over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
        ) from None
    except UnidentifiedImageError:
        raise BadUpload(
            415, "not an image: PIL cannot identify the data (send PNG, JPEG, WebP, GIF, BMP or TIFF)"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadUpload(400, f"unreadable image ({e})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise BadUpload(413, f"refused: the image is {w}x{h} pixels, over this server's limit of {max_pixels:,}")
    return im


def to_pixels(im, mode: str, side: int, fit: Fit | None = None) -> np.ndarray:
    """Decode an opened upload to ``mode`` ("L" or "RGB") at ``side`` x ``side``: (C, H, W) uint8, C-contiguous.

    The steps of ``pupil.data.images._decode``, in its order: JPEG draft, EXIF rotation, bit depth rescaled,
    alpha dropped, mode converted, then a bilinear resize with ``reducing_gap=3`` (pupil's own runs) or, with a
    ``fit`` (a model source, as the audit decoded its data), the shorter side resized with the model's
    interpolation and the centre ``side`` x ``side`` cut out."""
    from PIL import Image, ImageOps

    from pupil.data.images import ALPHA_MODES, _Bad, _exif_orientation, _fit, _to_8bit

    size, conv = (side, side), _Uncounted()
    with im:
        try:
            if fit:
                w, h = im.size
                rotated = _exif_orientation(im) in (5, 6, 7, 8)
                if rotated:
                    w, h = h, w  # the size as viewed
                size = fit.resized_size(w, h)
            if im.format == "JPEG":  # drafted as _decode drafts: to the stored orientation of the resized size
                im.draft(mode, size[::-1] if fit and rotated else size)
            im.load()
            if _exif_orientation(im) != 1:
                im = ImageOps.exif_transpose(im)
            im = _to_8bit(im, conv)
            if im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA") if im.mode == "P" else im
            if im.mode != mode:
                im = im.convert(mode)
            if fit:
                im = _fit(im, fit, size, (w, h), conv)
            elif im.size != size:
                im = im.resize(size, Image.BILINEAR, reducing_gap=3.0)
            a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            raise BadUpload(400, f"corrupt or truncated image ({e})") from None
        except _Bad as e:  # non-finite pixels
            raise BadUpload(400, f"unusable image ({e})") from None
    return np.array(a[None] if a.ndim == 2 else a.transpose(2, 0, 1), order="C")  # owned and writable


class _Uncounted(dict):
    """A conversions counter that counts nothing (the service reports no conversions)."""

    def __missing__(self, key: str) -> int:
        return 0


# ---------------------------------------------------------------------------------------------------------------
# The rules the audit measured


@dataclass(frozen=True)
class OodRule:
    """Which OOD score is computed and the threshold below which an image is flagged (None: never flagged)."""

    score: str
    threshold: float | None
    how: str
    """Where the threshold came from, in words."""
    fpr95: float | None = None
    """The audit's mean FPR at 95% TPR for this score (the share of its OOD images this threshold lets through)."""


def ood_rule(run_dir: Path, results: dict[str, Any] | None) -> OodRule:
    """The OOD score and threshold from the ood check (see the module docstring); energy without a threshold when
    the check did not run, its headline score needs more than logits, or its per-image file is missing."""
    from pupil.results import consumed, read_per_image

    summary = consumed(results, "serve", "ood") if results else None
    if summary is None:
        return OodRule("energy", None, "no threshold: the run was not audited with the ood check")
    score = summary["score"]
    if score not in LOGIT_SCORES:
        return OodRule("energy", None, f"no threshold: the audit's headline score {score} needs more than logits")
    stored = read_per_image(run_dir, "ood", results["audit"])
    if stored is None or "id" not in stored or not len(stored["id"]):
        return OodRule(score, None, "no threshold: the ood check's per-image file is missing or from another audit")
    ids = stored["id"].double().sort().values
    k = math.floor((1 - OOD_TPR) * len(ids) + 1e-9)  # count(ids >= ids[k]) >= n - k >= 0.95 n
    how = (
        f"{OOD_TPR:.0%} TPR: the 5th percentile of the {score} scores of the audit's {len(ids)} in-distribution "
        "test images"
    )
    return OodRule(score, ids[k].item(), how, summary["mean_fpr95"])


def ood_scores(logits: torch.Tensor, score: str) -> torch.Tensor:
    """Per-image OOD score (B,) float64 from logits, as ``pupil.ood`` computes it (higher = in-distribution)."""
    from pupil.ood import energy, max_logit, msp

    return {"msp": msp, "max_logit": max_logit, "energy": energy}[score](logits)


@dataclass
class Conformal:
    """The conformal check's stored validation logits, and a Calibration per coverage level, made on first use."""

    score: str
    temperature: float
    randomized: bool
    seed: int
    stored: dict[str, torch.Tensor] = field(repr=False)
    cache: dict[float, Any] = field(default_factory=dict, repr=False)
    described: dict[float, dict[str, Any]] = field(default_factory=dict, repr=False)

    def at(self, level: float):
        """The ``pupil.conformal.Calibration`` at coverage ``level`` (what ``sets_for_run`` computes)."""
        from pupil.conformal import calibrate

        if level not in self.cache:
            if len(self.cache) >= CACHED_LEVELS:
                oldest = next(iter(self.cache))
                del self.cache[oldest]
                self.described.pop(oldest, None)
            s = self.stored
            u = s["val_u"] if self.randomized else None
            targets = s["val_targets"].long()
            mask = s["calibration_mask"]
            self.cache[level] = calibrate(s["val_logits"], targets, mask, self.temperature, level, self.score, u)
        return self.cache[level]

    def describe(self, level: float) -> dict[str, Any]:
        """What the sets at ``level`` were calibrated with (an infinite threshold, too few images, is None); made
        once per level (every answer carries it), so never to be changed by a caller."""
        if level not in self.described:
            d = self.at(level).describe()
            if not math.isfinite(d["threshold"]):
                d["threshold"] = None
            self.described[level] = d
        return self.described[level]


def conformal_state(run_dir: Path, results: dict[str, Any] | None, k: int, notes: list[str]) -> Conformal | None:
    from pupil.results import consumed, read_per_image

    summary = consumed(results, "serve", "conformal") if results else None
    if summary is None:
        return None
    stored = read_per_image(run_dir, "conformal", results["audit"])
    if stored is None or not {"val_logits", "val_targets", "calibration_mask", "val_u"} <= set(stored):
        notes.append("conformal sets off: the conformal check's per-image file is missing or from another audit")
        return None
    if stored["val_logits"].shape[1] != k:
        raise PupilError(f"{run_dir}: the conformal audit calibrated {stored['val_logits'].shape[1]}-class logits")
    seed = results["audit"]["seed"]
    c = Conformal(summary["score"], float(summary["temperature"]), bool(summary["randomized"]), seed, stored)
    c.at(DEFAULT_LEVEL)  # a broken calibration fails at startup, not on the first request
    return c


# ---------------------------------------------------------------------------------------------------------------
# The served model


@dataclass
class Served:
    """One model behind the service: the wrapped network (takes [0, 1] pixels) and the rules its audit fitted."""

    name: str
    version: str
    """The first 12 hex digits of the weights file's sha256 (for a model source: the one its audit recorded)."""
    run_dir: Path | None
    """The run directory or audit folder (its results.json, per-image files, report.html); None for a model
    source served unaudited."""
    model: nn.Module = field(repr=False)
    classes: list[str]
    mode: str
    """"L" or "RGB": what uploads are converted to."""
    side: int
    device: torch.device
    temperature: float
    temperature_audited: bool
    ood: OodRule
    deferral_threshold: float | None
    target_accuracy: float | None
    conformal: Conformal | None
    explain_method: str
    notes: list[str]
    gradients: bool = True
    """Whether gradients flow through the model (not through an ONNX Runtime session): Grad-CAM and Integrated
    Gradients need them; occlusion does not."""
    channels_last: bool = False
    """Inputs in channels-last memory order, as the weights are (the run's runtime setting, as the audit runs it)."""
    fit: Fit | None = None
    """A model source's resize and centre crop, with which uploads are decoded as its audit decoded the data;
    None: a plain resize to ``side`` x ``side`` (pupil's runs, trained on images of one size)."""
    source: dict[str, Any] | None = None
    """For a model pupil did not train: ``spec`` (``kind:target``), ``audited``, ``preprocess``; None for a run."""
    frozen: tuple[nn.Module, Any] | None = field(default=None, repr=False)
    """(module, graph): ``frozen_forward``'s graph of a module's forward pass from uint8 pixels, which ``logits``
    runs while ``model`` is that module; None: the eager model (on a GPU, for an ONNX Runtime session, or where
    tracing failed)."""

    @property
    def report(self) -> Path | None:
        """The run's report card, when it is a plain file inside the run directory."""
        if self.run_dir is None:
            return None
        path = self.run_dir / "report.html"
        if not path.is_file() or path.is_symlink():
            return None
        return path

    def decode(self, im) -> np.ndarray:
        """An opened upload (``open_upload``) decoded to this model's input, (C, H, W) uint8 (``to_pixels``)."""
        return to_pixels(im, self.mode, self.side, self.fit)

    # -- inference (called from the one inference thread) ------------------------------------------------------

    def logits(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 logits (B, K) on the CPU, in fp32 as ``pupil predict`` and the audit compute
        them (channels-last where the audit used it: the same figures to float rounding, about 1.6 times faster
        for vgg_small on one CPU thread). Through ``frozen`` where there is one: the same logits to float rounding."""
        if self.frozen is not None and self.frozen[0] is self.model:  # a model swapped in later runs eagerly
            with torch.inference_mode():
                return self.frozen[1](torch.from_numpy(pixels))
        x = torch.from_numpy(pixels).to(self.device).float().div_(255)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(x).float().cpu()

    def answer(self, logits: torch.Tensor, keys: list[bytes], top: list[int], levels: list[float | None]) -> list:
        """Per-image answers for logits (B, K): the top classes with temperature-scaled probabilities, the OOD
        score and flag, the deferral decision and its reasons, the conformal set at each image's level. ``keys``
        are the decoded pixels' bytes (the draws of randomized sets); ``top`` and ``levels`` are per image."""
        probs = (logits.double() / self.temperature).softmax(1)  # (B, K)
        confidence = logits.float().softmax(1).amax(1)  # (B,) plain softmax, what the deferral threshold was fit on
        values, index = probs.topk(min(max(top), probs.shape[1]), dim=1)
        ood = ood_scores(logits, self.ood.score)
        flagged = ood < self.ood.threshold if self.ood.threshold is not None else None
        sets = self._sets(logits, keys, levels)
        rows = zip(values.tolist(), index.tolist(), confidence.tolist(), ood.tolist(), strict=True)
        out = []
        for i, (v, idx, conf, score) in enumerate(rows):
            reasons = []
            if self.deferral_threshold is not None and conf < self.deferral_threshold:
                reasons.append(
                    f"softmax confidence {conf:.2%} (before temperature scaling) is below the audited threshold "
                    f"{self.deferral_threshold:.2%}"
                )
            is_ood = None if flagged is None else bool(flagged[i])
            if is_ood:
                reasons.append(
                    f"{self.ood.score} score {score:.4g} is below {self.ood.threshold:.4g}: out of distribution"
                )
            out.append(
                {
                    "top": [
                        {"label": self.classes[c], "index": c, "probability": p}
                        for p, c in zip(v[: top[i]], idx[: top[i]])
                    ],
                    "ood": {"score": score, "flagged": is_ood},
                    "deferral": {"deferred": bool(reasons), "reasons": reasons, "confidence": conf},
                    "conformal": sets[i],
                }
            )
        return out

    def _sets(self, logits: torch.Tensor, keys: list[bytes], levels: list[float | None]) -> list:
        """Each image's conformal set ({"set": labels, "indices": ...}) at its level, or None; one calibration and
        one vectorised pass per distinct level in the batch."""
        from pupil.conformal import set_lists, softmax, uniforms_for

        out: list[dict | None] = [None] * len(levels)
        if self.conformal is None:
            return out
        for level in {lv for lv in levels if lv is not None}:
            rows = [i for i, lv in enumerate(levels) if lv == level]
            cal = self.conformal.at(level)
            z = logits[rows]
            u = uniforms_for([keys[i] for i in rows], self.conformal.seed) if cal.randomized else None
            for i, s in zip(rows, set_lists(softmax(z, cal.temperature), cal.sizes(z, u)), strict=True):
                out[i] = {"set": [self.classes[c] for c in s], "indices": s}
        return out

    def conformal_info(self, level: float) -> dict[str, Any]:
        """What the sets at ``level`` were calibrated with (``Conformal.describe``)."""
        return self.conformal.describe(level)

    def explain(self, pixels: np.ndarray, method: str, target: int | None) -> tuple[bytes, int, int]:
        """An overlay PNG of ``method``'s map for one image (C, H, W) uint8, the predicted class and the explained
        one (``target``, or the prediction)."""
        from pupil.explain import explain_image, overlay_png

        image = torch.from_numpy(pixels)
        if self.gradients:
            sal, pred, _ = explain_image(self.model, image, method, target=target)
        else:
            sal, pred = self._explain_opaque(image, method, target)
        with tempfile.TemporaryDirectory() as tmp:
            path = overlay_png(image, sal, Path(tmp) / "overlay.png")
            return path.read_bytes(), pred, pred if target is None else target

    def _explain_opaque(self, image: torch.Tensor, method: str, target: int | None) -> tuple[torch.Tensor, int]:
        """``explain_image`` for a model without parameters (an ONNX Runtime session), which it cannot place on a
        device: the same steps on the served device."""
        from pupil.explain.methods import method as attribution

        x = image.float().div(255)[None].to(self.device)  # (1, C, H, W)
        with torch.no_grad():
            pred = int(self.model(x).float().argmax(1)[0])
        t = pred if target is None else target
        return attribution(method)(self.model, x, torch.tensor([t], device=self.device))[0].cpu(), pred

    # -- description -------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The model's entry in ``GET /v1/models``."""
        c = self.conformal
        return {
            "name": self.name,
            "version": self.version,
            "classes": self.classes,
            "input": {"channels": 1 if self.mode == "L" else 3, "size": self.side},
            "report": f"/v1/models/{self.name}/report" if self.report else None,
            "calibration": {"temperature": self.temperature, "audited": self.temperature_audited},
            "ood": {
                "score": self.ood.score,
                "threshold": self.ood.threshold,
                "how": self.ood.how,
                "fpr95": self.ood.fpr95,
            },
            "deferral": {"threshold": self.deferral_threshold, "target_accuracy": self.target_accuracy},
            "conformal": None
            if c is None
            else {"default_level": DEFAULT_LEVEL, "score": c.score, "randomized": c.randomized},
            "explain": self.explain_method,
            "source": self.source,
            "notes": self.notes,
        }


def weights_version(path: Path) -> str:
    """The first 12 hex digits of the sha256 of the weights file."""
    return sha256_file(path)[:12]


SOURCE_OPTIONS = {"weights", "pretrained", "classes", "preprocess"}  # load_served's ``source``: the audit's flags


def load_served(
    path: str | Path | Run,
    device: torch.device,
    warm_batch: int = 1,
    threads: int = 1,
    source: dict[str, Any] | None = None,
) -> Served:
    """Load a model to serve, with the rules its audit measured; warm it up with a forward pass at batch sizes 1
    and ``warm_batch`` and one answer. Raises PupilError in one line on any problem.

    ``path`` is one of
    - a run directory;
    - an audit folder of a model source (``pupil audit timm:x --data D`` writes ``audits/timm-x``): the source is
      re-opened as audited, its weights checked against the recorded sha256 (``pupil.sources.open_audited``);
    - a model source (``onnx:model.onnx``, ``timm:NAME``, ...), served unaudited: T = 1, no OOD threshold, no
      deferral (``pupil.sources.open_bare``). ``source`` then holds what the audit's flags would say:
      ``weights`` (a file), ``pretrained`` (bool), ``classes`` (a file, one name a line, or a list) and
      ``preprocess`` (``img_size``, ``resize``, ``crop``, ``interpolation``, ``mean``, ``std``,
      ``input_range``), all optional and refused for a run directory or an audit folder, which bring their own;
    - a ``Run`` already opened (``pupil.sources.open_audit`` gives one for a model pupil did not train).

    ``threads``: what an ONNX Runtime session may use (torch's are set by the caller)."""
    from pupil.results import consumed, load_results
    from pupil.sources import KINDS

    run, run_dir = open_served(path, device, source)
    info = run.info
    src = info.get("source")
    if src is not None and src.get("kind") not in (*KINDS, "module"):
        src = None  # a run that pupil compress deployed is a run: decoded, versioned and noted as one
    shape = info["data"].get("input_shape")
    if shape is None and run.model is not None:  # a source opened for the audit: the input the model was probed at
        m = info["model"]
        shape = [m.get("in_chans"), m.get("img_size"), m.get("img_size")]
    where = run_dir if run_dir is not None else _spec(src)
    if not shape or len(shape) != 3 or shape[0] not in (1, 3) or shape[1] != shape[2]:
        raise PupilError(f"{where}: cannot serve a model whose input shape is {shape} (need 1 or 3 x N x N)")
    c, side, _ = shape
    notes: list[str] = []
    results = None
    if run_dir is not None and (run_dir / "results.json").is_file():
        results = load_results(run_dir)
        if results["run"].get("classes") not in (None, run.classes):
            raise PupilError(f"{run_dir}/results.json audits other classes than run.json lists: audit the run again")
        newer = run.weights_file and run.weights_file.stat().st_mtime > (run_dir / "results.json").stat().st_mtime
        if newer and not (src or {}).get("audited"):  # a re-opened source's weights were checked by their hash
            notes.append("the weights are newer than results.json: the audited rules may not fit them")
    elif src is not None:
        command = audit_command_for(src, source)
        notes.append(f"not audited: probabilities use T = 1, no OOD threshold, no deferral; `{command}` measures them")
    else:
        notes.append(f"not audited: run `pupil audit {run_dir}` for calibrated probabilities and thresholds")
    cal = consumed(results, "serve", "calibration") if results else None
    temperature = cal["temperature"] if cal else None
    if cal is not None and temperature is None:
        notes.append("the calibration check fitted no temperature (no validation split): probabilities use T = 1")
    soft = consumed(results, "serve", "uncertainty") if results else None
    if soft is not None and soft["deferral_threshold"] is None:
        notes.append(f"the audit found no confidence threshold reaching {soft['target_accuracy']:.0%} accuracy")
    notes += [n for n in (src or {}).get("notes", []) if results is None]  # an audit's are on its card
    net = run.model.net
    # A model whose weights are no PyTorch parameters (an ONNX Runtime session) gives no gradients: it is explained
    # by occlusion, and its OOD score and deferral use its logits alone (as for every served model).
    gradients = (info.get("source") or {}).get("gradients", True) and any(True for _ in run.model.parameters())
    gradcam = gradients and isinstance(getattr(net, "gradcam_layer", None), str)
    channels_last = gradients and bool((info.get("runtime") or {}).get("channels_last"))
    if channels_last:  # the weights too: channels-last inputs alone gain little
        run.model.to(memory_format=torch.channels_last)
    for module in run.model.modules():
        serving_session(module, threads)
    graph = None
    if gradients and torch.device(device).type == "cpu":
        graph = frozen_forward(run.model.eval(), channels_last, (c, side, side), sorted({1, max(1, warm_batch)}))
    if src is not None and src.get("weights_sha256"):  # what the audit recorded (a file's or a state dict's)
        version = src["weights_sha256"]
    else:
        version = weights_version(run.weights_file) if run.weights_file else "unversioned"
    served = Served(
        name=run.name,
        version=version,
        run_dir=run_dir,
        model=run.model.eval(),
        classes=list(run.classes),
        mode="L" if c == 1 else "RGB",
        side=side,
        device=torch.device(device),
        temperature=float(temperature) if temperature else 1.0,
        temperature_audited=bool(temperature),
        ood=ood_rule(run_dir, results),
        deferral_threshold=soft["deferral_threshold"] if soft else None,
        target_accuracy=soft["target_accuracy"] if soft else None,
        conformal=conformal_state(run_dir, results, len(run.classes), notes),
        explain_method="gradcam" if gradcam else "occlusion",
        notes=notes,
        gradients=gradients,
        channels_last=channels_last,
        fit=source_fit(src, side),
        frozen=None if graph is None else (run.model, graph),
        source=None
        if src is None
        else {
            "spec": _spec(src),
            "audited": results is not None,
            "preprocess": src.get("preprocess"),
        },
    )
    warm_up(served, warm_batch)
    return served


def open_served(
    path: str | Path | Run, device: torch.device, source: dict[str, Any] | None = None
) -> tuple[Run, Path | None]:
    """The Run to serve for ``load_served``'s ``path`` and the folder its audit is in (None: a model source served
    bare). A string of the form ``kind:target`` that names no existing path is a model source, as for
    ``pupil audit``."""
    from pupil.run import Run, load_run
    from pupil.sources import open_audited, open_bare

    options = dict(source or {})  # the command line passes every flag, unset ones as None or False
    if isinstance(options.get("preprocess"), dict):
        options["preprocess"] = {k: v for k, v in options["preprocess"].items() if v is not None}
    options = {k: v for k, v in options.items() if v not in (None, False, "", [], {})}
    if unknown := sorted(set(options) - SOURCE_OPTIONS):
        raise PupilError(f"unknown source option(s) {', '.join(unknown)}; known: {', '.join(sorted(SOURCE_OPTIONS))}")
    text = str(path) if isinstance(path, str | Path) else None
    if text is not None and re.match(r"^\w+:", text) and not Path(text).exists():
        return open_bare(text, device=torch.device(device), **options), None
    if options:
        from pupil.sources import option_flags

        raise PupilError(
            f"{' '.join(option_flags(options))} describe a model source given as kind:target; "
            f"{text or 'a Run'} brings its own (its run.json or the source its audit recorded)"
        )
    if isinstance(path, Run):
        return path, Path(path.dir)
    folder = Path(path)
    if folder.is_dir() and not (folder / "run.json").exists() and (folder / "results.json").is_file():
        return open_audited(folder, torch.device(device)), folder
    return load_run(folder, device=device), folder


def source_fit(src: dict[str, Any] | None, side: int) -> Fit | None:
    """The resize and centre crop the audit decoded a source's data with (``Preprocess.fit``), or None for a run
    or a source fed its data at the images' own size."""
    from pupil.sources import Preprocess

    if src is None:
        return None
    pre = src.get("preprocess") or {}
    fit = Preprocess(crop=pre.get("crop"), resize=pre.get("resize"), interpolation=pre.get("interpolation")).fit()
    if fit is not None and fit.crop != side:
        raise PupilError(f"the recorded crop {fit.crop} is not the model's input size {side}")
    return fit


def _spec(src: dict[str, Any] | None) -> str:
    """``kind:target`` of a source record (from the file or the name where a record from before pupil kept the
    target lacks it)."""
    if src is None:
        return ""
    kind = src.get("kind")
    if kind == "module":
        return f"nn.Module {src.get('name')}"
    target = src.get("target") or (src.get("weights") if kind in ("onnx", "torchscript", "export") else src.get("name"))
    return f"{kind}:{target}"


def audit_command_for(src: dict[str, Any], options: dict[str, Any] | None) -> str:
    """The ``pupil audit`` command for a source served bare with ``options``."""
    from pupil.sources import audit_command

    return audit_command(_spec(src), options)


def serving_session(module: nn.Module, threads: int) -> None:
    """Give an ONNX Runtime session inside ``module`` (``pupil.sources.OnnxNet``: ``.session``) ``threads`` threads
    that sleep when idle, its other settings kept. ONNX Runtime's defaults (a thread per core, spinning between
    runs) suit a process that does nothing else; here the event loop needs a core, which a spinning pool would
    take between batches."""
    session, path = getattr(module, "session", None), getattr(module, "path", None)
    if session is None or not isinstance(path, str | Path) or not Path(path).is_file():
        return
    import onnxruntime as ort

    options = session.get_session_options()
    options.intra_op_num_threads = max(1, threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    module.session = ort.InferenceSession(str(path), options, providers=session.get_providers())


class _PixelsIn(nn.Module):
    """uint8 (B, C, H, W) -> fp32 logits, the steps of ``Served.logits`` in one module (so that they trace)."""

    def __init__(self, model: nn.Module, channels_last: bool):
        super().__init__()
        self.model, self.channels_last = model, channels_last

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().div(255)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


def frozen_forward(model: nn.Module, channels_last: bool, shape: tuple[int, int, int], batches: list[int]):
    """``model``'s forward pass from uint8 pixels, traced and frozen (``torch.jit.freeze``: BatchNorm folded into
    the convolutions, oneDNN's fused kernels), or None where that fails or its logits differ from eager ones
    beyond float rounding at any of ``batches`` (images of ``shape`` (C, H, W), fixed random pixels).

    Why: an eager forward pass returns to Python between every operator, and each return has to take the
    interpreter lock back; while the event loop holds it (answering, reading requests) that wait lasts up to the
    switch interval, so the forward pass and the loop ran one after the other instead of on two cores. The frozen
    graph releases the lock once for the whole pass (and is about 1.15 times faster on one thread for vgg_small).
    ``torch.jit`` is deprecated but has no successor that runs a whole CPU graph without Python between operators
    short of compiling one (torch.compile's C++ wrapper, AOTInductor), which takes minutes at startup."""
    rng = np.random.default_rng(0)
    probes = [torch.from_numpy(rng.integers(0, 256, (b, *shape), dtype=np.uint8)) for b in batches]
    module = _PixelsIn(model, channels_last).eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the deprecation notice, and TracerWarnings that the check below covers
            frozen = torch.jit.freeze(torch.jit.trace(module, probes[0], check_trace=False))
            for x in probes:
                want, got = module(x), frozen(x)
                scale = max(1.0, float(want.abs().amax()))
                if got.shape != want.shape or not torch.allclose(got, want, rtol=FROZEN_RTOL, atol=FROZEN_RTOL * scale):
                    return None
    except Exception:  # a model tracing cannot follow: served eagerly
        return None
    return frozen


def warm_up(served: Served, batch: int) -> None:
    """One forward pass at batch size 1 and at ``batch``, and one answer, so the first request pays no set-up
    (allocator, kernels, lazy imports); a model that fails here fails startup."""
    c = 1 if served.mode == "L" else 3
    try:
        for b in sorted({1, max(1, batch)}):
            logits = served.logits(np.zeros((b, c, served.side, served.side), np.uint8))
        if logits.ndim != 2 or logits.shape[1] != len(served.classes):
            raise PupilError(f"gives logits of shape {tuple(logits.shape)} for {len(served.classes)} classes")
        served.answer(logits[:1], [b"warm-up"], [1], [DEFAULT_LEVEL if served.conformal else None])
    except Exception as e:  # whatever the model raises becomes one line
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        where = served.run_dir if served.run_dir is not None else (served.source or {}).get("spec")
        raise PupilError(f"model {served.name} ({where}) failed its warm-up: {first}") from None
