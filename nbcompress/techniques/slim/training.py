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

import functools
import random
from typing import Any

import torch
from torch import nn

from ...batches import forward_batch, logits_of, split_batch, to_device
from ...tokens import task_loss, token_kd_loss
from .model import SlimmableNet
from .plan import channels_at, width_key

__all__ = ["sandwich_loss", "recalibrate", "order_blocks", "choose_drops", "train_slimmable"]

_BN = nn.modules.batchnorm._BatchNorm


def sandwich_loss(widths: list[float], *, T: float = 1.0, samples: int = 2, seed: int = 0,
                  blocks: list[str] | None = None, depths: list[float] | None = None):
    """``loss_fn(model, batch)`` for :func:`nbcompress.train.fit` on a :class:`SlimmableNet`.
    With ``blocks`` and ``depths`` below 1, each narrower pass (and one more at full width)
    draws a trained depth ``d``. While the model has no blocks chosen for ``d`` yet
    (``model.drops``), each residual block is skipped with probability ``1 - d`` (layer
    dropping); once they are chosen (:func:`train_slimmable` does it half-way), exactly those
    are skipped, so the configurations that will run are the ones trained."""
    depths = [d for d in (depths or [1.0])]
    drop = 1.0 - min(depths)
    ws = sorted(widths)
    full, small, middle = ws[-1], ws[0], ws[1:-1]
    rng = random.Random(seed)
    blocks = list(blocks or [])

    def loss_fn(model: SlimmableNet, batch: Any) -> torch.Tensor:
        x, y = split_batch(batch)
        try:
            model.width = full
            teacher = logits_of(forward_batch(model, x))
            loss = task_loss(teacher, x, y)
            soft = teacher.detach()
            chosen = middle if len(middle) <= samples else rng.sample(middle, samples)
            passes = ([small] if small < full else []) + list(chosen)
            if drop > 0 and blocks:
                passes.append(full)               # the full width with blocks dropped
            for i, w in enumerate(passes):
                model.width = w
                d = min(depths) if i == len(passes) - 1 and w == full else rng.choice(depths)
                with model.skipping(_skips(model, d)):
                    out = logits_of(forward_batch(model, x))
                loss = loss + token_kd_loss(out, soft, x, y, T)
        finally:
            model.width = full
        return loss

    def _skips(model: SlimmableNet, d: float) -> list[str]:
        if d >= 1 or not blocks:
            return []
        chosen = model.drops.get(width_key(d))
        if chosen is not None:
            return list(chosen)
        return [b for b in blocks if rng.random() < 1.0 - d]

    return loss_fn


def choose_drops(sn: SlimmableNet, loader: Any, device: Any) -> list[str]:
    """Choose the blocks each trained depth leaves out (:func:`order_blocks`, the first ``n``
    of the order for a depth that keeps ``len(blocks) - n``) and set ``sn.drops``; the order."""
    order = order_blocks(sn, loader, device)
    n = len(sn.blocks)
    sn.drops = {width_key(d): order[:n - channels_at(d, n)] for d in sn.depths if d < 1}
    return order


@torch.no_grad()
def recalibrate(sn: SlimmableNet, loader: Any, device: Any, max_samples: int = 2000) -> None:
    """Re-estimate the BatchNorm running statistics of every trained configuration (width x
    depth) on up to ``max_samples`` samples of ``loader`` and keep them per configuration."""
    bns = [(n, m) for n, m in sn.net.named_modules() if isinstance(m, _BN)
           and m.track_running_stats]
    if not bns:
        return
    modes = {m: m.training for m in sn.modules()}
    momenta = {m: m.momentum for _, m in bns}
    width0, depth0 = sn.width, sn.depth
    try:
        sn.eval()
        for _, m in bns:
            m.train()
            m.momentum = None                      # cumulative average over the batches seen
        for w in sn.widths:
            for d in sn.depths:
                _calibrate_one(sn, bns, w, d, loader, device, max_samples)
    finally:
        sn.width, sn.depth = width0, depth0
        for _, m in bns:
            m.momentum = momenta[m]
        for m, t in modes.items():
            m.training = t


def _calibrate_one(sn, bns, w, d, loader, device, max_samples) -> None:
    for _, m in bns:
        m.reset_running_stats()
    spec = sn.spec.get(f"{w:g}", {}) if w < 1 else {}
    skipped = sn.skipped(d)
    own = {}
    if w < 1 or d < 1:
        for name, m in bns:
            if any(name == b or name.startswith(b + ".") for b in skipped):
                continue                           # inside a skipped block: never runs
            for stat, fill in (("running_mean", 0.0), ("running_var", 1.0)):
                key = f"{name}.{stat}" if name else stat
                n = spec[key][0] if key in spec else m.num_features
                own[key] = torch.full((n,), fill, device=m.running_mean.device,
                                      dtype=m.running_mean.dtype)
    seen = 0
    with sn.skipping(skipped):
        for batch in loader:
            x, _ = split_batch(batch)
            x = to_device(x, device)
            if not own:
                sn.width, sn.depth = 1.0, 1.0
                forward_batch(sn, x)
            else:
                sliced = sn.sliced(w, own_stats=False, depth=1.0)
                sliced.update(own)
                forward_batch(functools.partial(sn.run_with, sliced), x)
            seen += _batch_size(x)
            if seen >= max_samples:
                break
    if own:
        sn.set_stats(w, own, depth=d)


@torch.no_grad()
def order_blocks(sn: SlimmableNet, loader: Any, device: Any, batches: int = 4) -> list[str]:
    """The residual blocks in the order they are best dropped: greedily, the block whose
    removal (with those before it) changes the full width's output least (KL divergence on
    ``batches`` training batches, BatchNorm on each batch's own statistics)."""
    import torch.nn.functional as F

    xs = []
    for batch in loader:
        xs.append(to_device(split_batch(batch)[0], device))
        if len(xs) >= batches:
            break
    bns = [m for m in sn.net.modules() if isinstance(m, _BN)]
    modes = {m: m.training for m in sn.modules()}
    momenta = {m: m.momentum for m in bns}
    width0, depth0 = sn.width, sn.depth
    try:
        sn.eval()
        sn.width, sn.depth = 1.0, 1.0
        for m in bns:
            m.train()
            m.momentum = 0.0                       # batch statistics; running ones untouched
        ref = [F.log_softmax(logits_of(forward_batch(sn, x)).float(), -1) for x in xs]
        order: list[str] = []
        left = list(sn.blocks)
        while left:
            cost = {}
            for b in left:
                with sn.skipping(order + [b]):
                    cost[b] = sum(float(F.kl_div(F.log_softmax(logits_of(forward_batch(
                        sn, x)).float(), -1), r, log_target=True, reduction="batchmean"))
                        for x, r in zip(xs, ref))
            best = min(left, key=lambda b: cost[b])
            order.append(best)
            left.remove(best)
        return order
    finally:
        sn.width, sn.depth = width0, depth0
        for m in bns:
            m.momentum = momenta[m]
        for m, t in modes.items():
            m.training = t


def _batch_size(x: Any) -> int:
    from ...batches import batch_size

    return batch_size(x) or 1


def train_slimmable(sn: SlimmableNet, loader: Any, *, epochs: int, lr: float, T: float,
                    samples: int, seed: int, device: Any, progress: bool) -> list[dict]:
    """Sandwich training; with depths, layer dropping for the first half of the epochs, then
    the blocks each depth leaves out are chosen (:func:`choose_drops`) and the rest of the
    epochs train exactly those configurations (after one epoch alone they are chosen after
    training)."""
    from ...train import fit

    switch = epochs // 2 if len(sn.depths) > 1 and sn.blocks and epochs > 1 else None

    def on_epoch_end(epoch: int, record: dict):
        if epoch == switch:
            choose_drops(sn, loader, device)
            sn.train()

    sn.drops = {}
    sn.train()
    records = fit(sn, loader, epochs=epochs, lr=lr, loss_fn=sandwich_loss(sn.widths, T=T,
                                                                          samples=samples,
                                                                          seed=seed,
                                                                          blocks=sn.blocks,
                                                                          depths=sn.depths),
                  scheduler="cosine", seed=seed, device=device, progress=progress, desc="slim",
                  on_epoch_end=on_epoch_end)
    if len(sn.depths) > 1 and sn.blocks and not sn.drops:
        choose_drops(sn, loader, device)
    sn.eval()
    return records
