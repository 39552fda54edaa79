"""Precise BN: recompute batch-norm statistics with the final weights (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021). ``loop.recompute_bn`` runs it after the last step, inside the run's time budget."""

from __future__ import annotations

import torch
from torch import nn

from pupil.runtime import autocast, to_input
from pupil.training.state import TrainState, stream_seed


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def precise_bn_pending(state: TrainState) -> bool:
    """Whether the run asks for precise BN, its model has batch norm, and it has not been done yet."""
    return bool(state.cfg.train.precise_bn) and not state.bn_recomputed and bool(batch_norms(state.deployed))


@torch.no_grad()
def precise_bn(state: TrainState) -> int:
    """Recompute the deployed model's batch-norm statistics with its final weights.

    Running averages with momentum 0.1 lag the weights; after a short or high-learning-rate run they can
    describe weights from many steps back, and the model then collapses in eval mode (measured: an
    EfficientNet-B0 after 26 steps scored 54% in train mode and 10% in eval mode). Each layer's statistics
    become the average of its batch statistics over ``cfg.train.precise_bn`` batches of un-augmented
    training images (a seeded sample), with every other layer in eval mode. A Ctrl-C is taken between
    batches (``state.interrupt``); on any exception the old statistics are put back. Returns the number of
    images used (0 when the model has no batch norm).
    """
    cfg, model, ds, device = state.cfg, state.deployed, state.train_ds, state.device
    bns = batch_norms(model)
    if not bns or not cfg.train.precise_bn:
        return 0
    bs = cfg.data.batch_size
    seed = stream_seed(cfg.train.seed, "precise_bn")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    idx = order[: min(cfg.train.precise_bn, len(ds) // bs) * bs]  # full batches only: each has the same weight
    saved = [(m.momentum, {k: v.clone() for k, v in m.named_buffers()}) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        for chunk in idx.split(bs):
            with autocast(device, state.dtype):
                model(to_input(ds.images[chunk], device, state.channels_last))
            state.interrupt.check()
    except BaseException:
        for m, (_, buffers) in zip(bns, saved, strict=True):
            for k, v in m.named_buffers():
                v.copy_(buffers[k])
        raise
    finally:
        for m, (momentum, _) in zip(bns, saved, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(idx)
