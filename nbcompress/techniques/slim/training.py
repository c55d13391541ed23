"""Training a slimmable network, and its BatchNorm statistics per width.

Each step follows the sandwich rule of universally slimmable networks (Yu & Huang 2019): the full
width learns from the labels, the smallest width and up to ``samples`` other trained widths learn
from the full width's own output (in-place distillation, ``T``), and one backward pass sums them.
It runs through the one fit loop (:func:`nbcompress.train.fit`, ``loss_fn``).

BatchNorm: during training each width normalises with its batch's statistics; afterwards every
trained width's running statistics are re-estimated on up to ``calib`` training samples at that
width (cumulative averages) and kept per width (:meth:`SlimmableNet.set_stats`). Re-estimating
after training (as US-Nets do) is exact for the final weights, where statistics tracked during
training would lag behind them; keeping them per width (switchable BN) makes switching free.
"""
from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from ...batches import forward_batch, logits_of, split_batch, to_device
from ...tokens import task_loss, token_kd_loss
from .model import SlimmableNet

__all__ = ["sandwich_loss", "recalibrate", "train_slimmable"]

_BN = nn.modules.batchnorm._BatchNorm


def sandwich_loss(widths: list[float], *, T: float = 1.0, samples: int = 2, seed: int = 0):
    """``loss_fn(model, batch)`` for :func:`nbcompress.train.fit` on a :class:`SlimmableNet`."""
    ws = sorted(widths)
    full, small, middle = ws[-1], ws[0], ws[1:-1]
    rng = random.Random(seed)

    def loss_fn(model: SlimmableNet, batch: Any) -> torch.Tensor:
        x, y = split_batch(batch)
        try:
            model.width = full
            teacher = logits_of(forward_batch(model, x))
            loss = task_loss(teacher, x, y)
            soft = teacher.detach()
            chosen = middle if len(middle) <= samples else rng.sample(middle, samples)
            for w in ([small] if small < full else []) + list(chosen):
                model.width = w
                out = logits_of(forward_batch(model, x))
                loss = loss + token_kd_loss(out, soft, x, y, T)
        finally:
            model.width = full
        return loss

    return loss_fn


@torch.no_grad()
def recalibrate(sn: SlimmableNet, loader: Any, device: Any, max_samples: int = 2000) -> None:
    """Re-estimate every trained width's BatchNorm running statistics on up to ``max_samples``
    samples of ``loader`` and keep them per width."""
    bns = [(n, m) for n, m in sn.net.named_modules() if isinstance(m, _BN)
           and m.track_running_stats]
    if not bns:
        return
    modes = {m: m.training for m in sn.modules()}
    momenta = {m: m.momentum for _, m in bns}
    width0 = sn.width
    try:
        sn.eval()
        for _, m in bns:
            m.train()
            m.momentum = None                      # cumulative average over the batches seen
        for w in sn.widths:
            for _, m in bns:
                m.reset_running_stats()
            spec = sn.spec.get(f"{w:g}", {}) if w < 1 else {}
            own = {}
            for name, m in bns:
                for stat, fill in (("running_mean", 0.0), ("running_var", 1.0)):
                    key = f"{name}.{stat}" if name else stat
                    if key in spec:
                        own[key] = torch.full((spec[key][0],), fill, device=m.running_mean.device,
                                              dtype=m.running_mean.dtype)
            seen = 0
            for batch in loader:
                x, _ = split_batch(batch)
                x = to_device(x, device)
                if w >= 1:
                    sn.width = w
                    forward_batch(sn, x)
                else:
                    sliced = sn.sliced(w, own_stats=False)
                    sliced.update(own)
                    fn = (lambda *a, **k: torch.func.functional_call(sn.net, sliced, a, k,
                                                                      strict=False,
                                                                      tie_weights=False))
                    forward_batch(_Call(fn), x)
                seen += _batch_size(x)
                if seen >= max_samples:
                    break
            if w < 1:
                sn.set_stats(w, own)
    finally:
        sn.width = width0
        for _, m in bns:
            m.momentum = momenta[m]
        for m, t in modes.items():
            m.training = t


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *a, **k):
        return self.fn(*a, **k)


def _batch_size(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    if isinstance(x, dict):
        return next((int(v.shape[0]) for v in x.values() if isinstance(v, torch.Tensor)), 1)
    if isinstance(x, (tuple, list)) and x:
        return _batch_size(x[0])
    return 1


def train_slimmable(sn: SlimmableNet, loader: Any, *, epochs: int, lr: float, T: float,
                    samples: int, seed: int, device: Any, progress: bool) -> list[dict]:
    from ...train import fit

    sn.train()
    records = fit(sn, loader, epochs=epochs, lr=lr, loss_fn=sandwich_loss(sn.widths, T=T,
                                                                          samples=samples,
                                                                          seed=seed),
                  scheduler="cosine", seed=seed, device=device, progress=progress, desc="slim")
    sn.eval()
    return records
