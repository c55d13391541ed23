"""BatchNorm statistics re-estimated after factorising (``data`` / ``finetune`` batches).

``techniques/prune`` has a sibling, ``recalibrate_bn``, for channels removed by structured
pruning: the same cumulative average, but it puts the whole model in training mode (dropout
active while the statistics are gathered), returns whether anything was done rather than the
batch count, and defaults to 8 batches; the two are kept apart for now."""
from __future__ import annotations

import torch
from torch import nn

from ...batches import forward_batch, split_batch, to_device
from ...core import model_device

__all__ = ["recalibrate_batchnorm"]


def recalibrate_batchnorm(model: nn.Module, loader, device=None, batches: int = 20) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` from up to
    ``batches`` batches of ``loader`` (the inputs only; no gradients, no weight changes).

    A factorised layer computes slightly different activations, so the statistics the BatchNorm
    layers after it learned no longer fit; re-estimating them (a cumulative average over the
    batches, with only the BatchNorm layers in training mode) recovers most of the accuracy lost
    before any fine-tuning. Returns the number of batches used (0: no BatchNorm layer, or an
    empty loader, and nothing changed)."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    device = torch.device(device) if device is not None else model_device(model)
    modes = {m: m.training for m in model.modules()}
    saved = {bn: (bn.momentum, {k: v.clone() for k, v in bn.state_dict().items()}) for bn in bns}
    n = 0
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None              # cumulative moving average over the batches
        model.eval()
        for bn in bns:
            bn.train()
        with torch.no_grad():
            for batch in loader:
                if n >= batches:
                    break
                x, _ = split_batch(batch)
                x = to_device(x, device)
                forward_batch(model, x)
                n += 1
    finally:
        for bn, (momentum, state) in saved.items():
            bn.momentum = momentum
            if n == 0:
                bn.load_state_dict(state)
        for m, training in modes.items():
            m.train(training)
    return n
