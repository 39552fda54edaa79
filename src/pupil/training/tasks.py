"""Training methods as objects: each maps a batch to ``{"loss", "logits"}``; the loop never branches
on the method (timm's ``task/``). A task is built from the resolved config with ``from_config``; a method
with settings names their dataclass as ``Config`` (``pupil.config.TASK_CONFIGS``), and reads them from ``cfg.task``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pupil.config import METRIC_LOSSES, AdversarialConfig, DistillConfig, MetricConfig, NoiseConfig
from pupil.errors import PupilError
from pupil.registry import Registry

TASKS = Registry("task")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy for hard labels (with smoothing) or soft targets (mixup/cutmix, smoothing already mixed in)."""
    if y.ndim == 2:
        return torch.sum(-y * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


@TASKS.register("classification")
class ClassificationTask:
    """Cross-entropy with label smoothing; soft targets (from mixup/cutmix) are handled too."""

    Config = None

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, **_: Any) -> ClassificationTask:
        return cls(cfg.optim.label_smoothing)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(x)
        return {"loss": cross_entropy(logits, y, self.label_smoothing), "logits": logits}


@TASKS.register("distill")
class DistillationTask:
    """Knowledge distillation from a trained teacher run.

    ``soft``: KL divergence between temperature-softened teacher and student distributions, scaled by tau^2
    (Hinton, Vinyals & Dean 2015). ``hard``: cross-entropy against the teacher's argmax (Touvron et al. 2021).
    The loss is (1 - alpha) * label loss + alpha * distillation loss. A student with a distillation token
    (DeiT) trains its class head on the labels and its distillation head on the teacher, as in DeiT.
    """

    Config = DistillConfig

    def __init__(
        self, teacher: nn.Module, kind: str = "soft", alpha: float = 0.5, tau: float = 3.0, label_smoothing: float = 0.0
    ):
        if kind not in ("soft", "hard"):
            raise PupilError(f"unknown distillation kind {kind!r}; choose soft or hard")
        self.teacher, self.kind, self.alpha, self.tau = teacher.eval(), kind, alpha, tau
        self.label_smoothing = label_smoothing
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, classes: list[str], shape: tuple, **_: Any):
        from pupil.run import load_run

        t: DistillConfig = cfg.task
        if not t.teacher:
            raise PupilError("--task distill needs --teacher RUN_DIR (a trained run with the same classes)")
        run = load_run(t.teacher, device=device)
        if run.classes != classes:
            raise PupilError(f"teacher {t.teacher} was trained on classes {run.classes}, the student on {classes}")
        if list(run.info["data"]["input_shape"]) != list(shape):
            raise PupilError(f"teacher {t.teacher} takes {run.info['data']['input_shape']} images, not {list(shape)}")
        return cls(run.model, t.distill_kind, t.distill_alpha, t.distill_tau, cfg.optim.label_smoothing)

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.kind == "hard":
            return F.cross_entropy(student.float(), teacher.argmax(1))
        log_p = F.log_softmax(student.float() / self.tau, dim=1)
        log_q = F.log_softmax(teacher.float() / self.tau, dim=1)
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * self.tau**2

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        net = model.net
        if getattr(net, "distilled", False):  # DeiT: separate heads for labels and teacher
            cls_logits, dist_logits = net.forward_distill_heads(net.forward_features(model.normalize(x)))
            logits = (cls_logits + dist_logits) / 2
        else:
            logits = cls_logits = dist_logits = model(x)
        label_loss = cross_entropy(cls_logits, y, self.label_smoothing)
        loss = (1 - self.alpha) * label_loss + self.alpha * self.distill_loss(dist_logits, teacher_logits)
        return {"loss": loss, "logits": logits}


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices from hard labels or from mixup/cutmix soft targets (their argmax)."""
    return y.argmax(1) if y.ndim == 2 else y


@TASKS.register("adversarial")
class AdversarialTask:
    """Adversarial training: the loss on L-inf adversarial examples found for the current weights.

    ``pgd``: PGD with a random start (Madry et al. 2018). ``fgsm``: one step of size 1.25 epsilon from a
    uniform random start ("fast is better than free", Wong, Rice & Kolter 2020). The attack runs with the
    model in training mode, as both papers do, so batch-norm statistics also see adversarial batches.
    """

    Config = AdversarialConfig

    def __init__(self, epsilon: float, steps: int, alpha: float, label_smoothing: float = 0.0):
        self.epsilon, self.steps, self.alpha = epsilon, steps, alpha
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, **_: Any) -> AdversarialTask:
        t: AdversarialConfig = cfg.task
        steps = 1 if t.adv_attack == "fgsm" else t.adv_steps
        alpha = t.adv_alpha or (1.25 * t.epsilon if t.adv_attack == "fgsm" else 2.5 * t.epsilon / steps)
        return cls(t.epsilon, steps, alpha, cfg.optim.label_smoothing)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        from pupil.robust.attacks import pgd

        if self.epsilon > 0:
            x = pgd(model, x, hard_labels(y), self.epsilon, self.alpha, self.steps, norm="linf", random_start=True)
        logits = model(x)
        return {"loss": cross_entropy(logits, y, self.label_smoothing), "logits": logits}


@TASKS.register("noise")
class NoiseTask:
    """Gaussian noise augmentation, N(0, sigma^2) added to the pixels and not clipped, so that the base
    classifier is accurate under the noise that randomized smoothing certifies with (Cohen et al. 2019)."""

    Config = NoiseConfig

    def __init__(self, sigma: float, label_smoothing: float = 0.0):
        self.sigma, self.label_smoothing = sigma, label_smoothing

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, **_: Any) -> NoiseTask:
        return cls(cfg.task.sigma, cfg.optim.label_smoothing)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(x + self.sigma * torch.randn_like(x))
        return {"loss": cross_entropy(logits, y, self.label_smoothing), "logits": logits}


@TASKS.register("metric")
class MetricTask:
    """Metric learning: a loss of pytorch-metric-learning on the L2-normalised embedding of an embedding network
    (``pupil.models.embedding``; ``--task metric`` gives the model its ``embed_dim``).

    ``arcface`` (additive angular margin, Deng et al. 2019) and ``proxyanchor`` (Kim et al. 2020) learn one proxy
    per class. Their proxies are the network's cosine classifier (``net.head.weight``, (C, D)), handed to the
    loss at each step with ``torch.func.functional_call`` in place of the loss's own parameter (never used): the
    optimizer, built from the network's parameters, trains them, and model.safetensors keeps them. The class
    logits are then the nearest-proxy classifier of the embedding. ``multisimilarity`` (Wang et al. 2019) weighs
    the pairs that MultiSimilarityMiner picks in the batch; the cosine classifier then learns by cross-entropy on
    detached embeddings, reading the embedding without shaping it.

    In every case the logit scale learns by cross-entropy on detached cosines, which fits a temperature and
    nothing else; label smoothing is not applied to it (it would make the logits under-confident on purpose).
    The returned ``loss`` is the metric loss plus that cross-entropy, ``logits`` the cosine logits.
    """

    Config = MetricConfig

    def __init__(self, settings: MetricConfig, num_classes: int, embed_dim: int):
        from pytorch_metric_learning import losses, miners

        self.kind = settings.metric_loss
        self.miner = None
        if METRIC_LOSSES[self.kind] is None:
            self.loss = losses.MultiSimilarityLoss(
                alpha=settings.ms_alpha, beta=settings.ms_beta, base=settings.ms_base
            )
            if settings.miner:
                self.miner = miners.MultiSimilarityMiner(epsilon=settings.miner_epsilon)
        else:
            margin, scale = settings.margin_and_scale()
            if self.kind == "arcface":
                self.loss = losses.ArcFaceLoss(num_classes, embed_dim, margin=margin, scale=scale)
            else:
                self.loss = losses.ProxyAnchorLoss(num_classes, embed_dim, margin=margin, alpha=scale)

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, classes: list[str], **_: Any) -> MetricTask:
        from pupil.extras import require

        require(("pytorch_metric_learning",), "--task metric", extra="search")
        return cls(cfg.task, len(classes), cfg.model.model_args["embed_dim"])

    def metric_loss(self, embedding: torch.Tensor, y: torch.Tensor, proxies: torch.Tensor | None) -> torch.Tensor:
        """The chosen loss of embeddings (B, D) with labels (B,), the proxy losses on ``proxies`` (C, D)."""
        if self.kind == "arcface":  # pytorch-metric-learning keeps ArcFace's class weights as (D, C)
            return torch.func.functional_call(self.loss, {"W": proxies.t()}, (embedding, y))
        if self.kind == "proxyanchor":
            return torch.func.functional_call(self.loss, {"proxies": proxies}, (embedding, y))
        pairs = self.miner(embedding, y) if self.miner is not None else None
        return self.loss(embedding, y, pairs)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        net = model.net
        if not hasattr(net, "embedding_dim"):
            raise PupilError("--task metric needs a model with an embedding head (model_args embed_dim)")
        embedding = net.forward_head(net.forward_features(model.normalize(x)), pre_logits=True)  # (B, D)
        with torch.autocast(x.device.type, enabled=False):  # the losses' exponentials in float32
            embedding = embedding.float()
            loss = self.metric_loss(embedding, y, net.head.weight)
            pair_loss = METRIC_LOSSES[self.kind] is None
            # (B, C); the proxy losses own the proxies, so the classifier's cross-entropy fits the scale alone
            cosine = net.head.cosine(embedding.detach())
            logits = net.head.log_scale.exp() * (cosine if pair_loss else cosine.detach())
            loss = loss + F.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits}

    def validate(self, model: nn.Module, ds: Any, **predict_args: Any) -> dict[str, float]:
        """Leave-one-out Recall@1 and MAP@R of ``ds``'s embeddings (``predict_args`` as for ``predict_logits``),
        the figures to select a metric run's epoch by."""
        from pupil.models import PixelEmbedder
        from pupil.predict import predict_logits

        embeddings = predict_logits(PixelEmbedder(model), ds, **predict_args)
        return retrieval_scores(embeddings, ds.targets)


def retrieval_scores(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    chunk: int = 256,
) -> dict[str, float]:
    """Recall@1 and MAP@R of unit-length embeddings by cosine similarity (Musgrave, Belongie & Lim 2020, Sec. 3.2).

    Each query (Q, D) searches the gallery (N, D), or the other queries when no gallery is given (leave-one-out).
    With R the number of gallery items of the query's class, MAP@R is the mean over queries of
    ``(1/R) * sum_{i<=R} P(i) * rel(i)``: precision at each relevant rank among the first R. Queries without a
    relevant item are left out of the means.
    """
    leave_one_out = gallery is None
    if gallery is None or gallery_labels is None:
        gallery, gallery_labels = query, query_labels
    query, gallery = query.float(), gallery.float()
    classes = int(max(query_labels.max(), gallery_labels.max())) + 1
    relevant = torch.bincount(gallery_labels, minlength=classes)[query_labels] - int(leave_one_out)  # R, (Q,)
    depth = int(relevant.max())
    ranks = torch.arange(1, depth + 1)
    hit1, ap = [], []
    for start in range(0, len(query), chunk):
        sim = query[start : start + chunk] @ gallery.t()  # (b, N)
        b = len(sim)
        if leave_one_out:
            sim[torch.arange(b), torch.arange(start, start + b)] = -math.inf
        top = sim.topk(depth, dim=1).indices  # (b, depth), nearest first
        r = relevant[start : start + b]
        hits = (gallery_labels[top] == query_labels[start : start + b, None]) & (ranks <= r[:, None])
        precision = hits.cumsum(1) / ranks
        ap.append((precision * hits).sum(1) / r.clamp(min=1))
        hit1.append(hits[:, 0].float())
    keep = relevant > 0
    return {
        "recall_at_1": torch.cat(hit1)[keep].mean().item(),
        "map_at_r": torch.cat(ap)[keep].mean().item(),
    }
