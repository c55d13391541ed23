"""Bits per layer under a byte budget (``budget_bytes``, modes cluster and uniform).

For every selected layer and every bit width from the maximum (``bits``, default 8) down to 2,
the layer alone is coded at that width and we record two things:

* its **bytes** in the file ``nbcompress.save`` would write (the storage's own per-tensor
  packing, Huffman included when asked for, on the layer alone);
* its **cost**: the rise of the task loss on a few batches of the ``qat`` data with only that
  layer coded (every other layer float). Without data, the layer's relative weight error times
  its share of the weights stands in, and the notes say so.

Then every layer starts at the maximum, and the layer whose next step down adds the least cost
per byte saved is lowered, until the estimated file (the bytes of everything else, header and
biases included, plus each layer's bytes) fits the budget. A budget that even 2 bits everywhere
cannot meet is refused before any layer changes. This is the greedy knapsack of HAQ-style mixed
precision with a measured sensitivity in place of a learned policy.
"""
from __future__ import annotations

import copy
import io

import torch
from torch import nn

from ...batches import forward_batch, split_batch, to_device
from ...core import FieldError
from ...tokens import task_loss

__all__ = ["choose_bits"]

MIN_BITS = 2
_BATCHES = 4


def _coded(cfg, mode: str, m: nn.Module, w: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """``m``'s weight ``w`` coded at ``bits`` (as the float weight it stands for) and the bytes
    that weight takes in the file; the codes are computed once for both."""
    from ...storage import breakdown
    from .common import mark
    from .lowbit import _dequant, _shared_weight, _weight_layer, kmeans_cluster, uniform_quantize

    if mode == "cluster":
        c, i = kmeans_cluster(w, bits)
        q = _shared_weight(c, i).to(w.dtype).reshape(w.shape)
        layer = copy.deepcopy(m)
        with torch.no_grad():
            layer.weight.copy_(q)
        layer.nbc_bits = bits
    else:
        codes, scale, zp = uniform_quantize(w, bits, per_channel=cfg.per_channel,
                                            symmetric=cfg.symmetric)
        q = _dequant(codes, scale, zp, cfg.per_channel).to(w.dtype)
        layer = _weight_layer(m, codes, scale, zp, bits, cfg.per_channel, cfg.symmetric)
    mark(layer, cfg)
    rows = breakdown(nn.Sequential(layer), huffman=cfg.huffman)
    return q, sum(r["bytes"] for r in rows if r["name"] != "0.bias")


def choose_bits(cfg, model: nn.Module, ctx, targets: list[tuple[str, nn.Module]], mode: str,
                notes: list[str]) -> dict[str, int]:
    """``{layer name: bits}`` within ``cfg.budget_bytes`` (see the module docstring)."""
    from ...storage import breakdown, save

    top = cfg.bits or 8
    widths = list(range(top, MIN_BITS - 1, -1))
    names = [n for n, _ in targets]
    rows = {r["name"]: r["bytes"] for r in breakdown(model, huffman=cfg.huffman)}
    now = save(model, io.BytesIO(), huffman=cfg.huffman)
    fixed = now - sum(rows.get(f"{n}.weight" if n else "weight", 0) for n in names)

    batches = _batches(cfg, ctx)
    base = _loss(model, batches) if batches else None
    total_w = sum(m.weight.numel() for _, m in targets)
    size: dict[str, dict[int, int]] = {}
    cost: dict[str, dict[int, float]] = {}
    for name, m in targets:
        w = m.weight.detach().clone()
        size[name], cost[name] = {}, {}
        for b in widths:
            q, size[name][b] = _coded(cfg, mode, m, w, b)
            if base is not None:
                with torch.no_grad():
                    m.weight.copy_(q)
                try:
                    cost[name][b] = _loss(model, batches) - base
                finally:
                    with torch.no_grad():
                        m.weight.copy_(w)
            else:
                err = float((q - w).float().norm() / w.float().norm().clamp(min=1e-12))
                cost[name][b] = err * err * w.numel() / total_w
        worst = -float("inf")                # cost never falls as bits fall (noise on a few batches)
        for b in sorted(widths, reverse=True):
            worst = max(worst, cost[name][b])
            cost[name][b] = worst

    def estimate(bits: dict[str, int]) -> int:
        return fixed + sum(size[n][bits[n]] for n in names)

    floor = estimate({n: MIN_BITS for n in names})
    if floor > cfg.budget_bytes:
        raise FieldError(f"{{budget_bytes={cfg.budget_bytes}}} cannot be met: with {MIN_BITS} "
                         f"bits in every layer the file would be about {floor:,} bytes, "
                         f"{fixed:,} of them for what this step does not code (header, biases, "
                         f"other tensors); prune first, or give a larger budget")
    bits = {n: top for n in names}
    while estimate(bits) > cfg.budget_bytes:
        best, best_ratio = None, float("inf")
        for n in names:
            b = bits[n]
            if b <= MIN_BITS:
                continue
            saved = size[n][b] - size[n][b - 1]
            ratio = (cost[n][b - 1] - cost[n][b]) / max(saved, 1e-9) if saved > 0 else float("inf")
            if saved > 0 and ratio < best_ratio:
                best, best_ratio = n, ratio
        if best is None:                     # nothing left saves bytes: lower the widest layer
            best = max((n for n in names if bits[n] > MIN_BITS), key=lambda n: bits[n])
        bits[best] -= 1
    how = (f"loss rise on {len(batches)} batch(es) of {{qat}}" if base is not None else
           "relative weight error (no data: give {qat} for measured sensitivity)")
    notes.append(f"bits per layer for a {cfg.budget_bytes:,}-byte budget (sensitivity: "
                 f"{how.replace('{qat}', 'qat')}): "
                 + ", ".join(f"{n or '(model)'} {bits[n]}" for n in names)
                 + f"; file estimated at {estimate(bits):,} bytes before any fine-tuning")
    return bits


def _batches(cfg, ctx) -> list:
    if cfg.qat is None:
        return []
    out = []
    for batch in cfg.qat:
        out.append(to_device(batch, ctx.device))
        if len(out) >= _BATCHES:
            break
    return out


@torch.no_grad()
def _loss(model: nn.Module, batches: list) -> float:
    was = model.training
    model.eval()
    try:
        total = 0.0
        from ..prune.importance import logits_of

        for batch in batches:
            x, y = split_batch(batch)
            total += float(task_loss(logits_of(forward_batch(model, x)), x, y))
        return total / len(batches)
    finally:
        model.train(was)
