"""After training: raise one class's output bias (a class missing from the transfer data) as far
as accuracy on the other classes allows, and the per-class accuracy table."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from ...batches import forward_batch, logits_of, split_batch, to_device
from ...core import model_device
from .probe import capture, eval_mode, head, peek_batch, teacher_signal

__all__ = ["choose_bias_raise", "output_bias_layer", "adjust_bias", "per_class", "per_class_table"]


def choose_bias_raise(logits: torch.Tensor, refs: torch.Tensor, cls: int,
                      tolerance: float = 0.005) -> tuple[float, float, float, int]:
    """The largest raise ``b`` of class ``cls``'s score that keeps top-1 accuracy on the examples
    whose reference label is *not* ``cls`` within ``tolerance`` of its value at ``b = 0``.

    Examples of ``cls`` are dropped first, so the choice never uses that class. Raising one
    class's score can only turn predictions into ``cls`` (always wrong here), so accuracy falls
    monotonically with ``b`` and the answer is exact: a correct example flips once ``b`` passes
    its margin ``max_other - score_cls``; we allow ``floor(tolerance * n)`` flips.
    Returns ``(b, accuracy_before, accuracy_after, n)``.
    """
    keep = refs != cls
    s, r = logits[keep].float(), refs[keep]
    n = int(r.numel())
    if n == 0:
        return 0.0, float("nan"), float("nan"), 0
    pred = s.argmax(1)
    correct = pred == r
    acc0 = correct.float().mean().item()
    others = s.clone()
    others[:, cls] = -float("inf")
    margin = (others.max(1).values - s[:, cls])[correct]
    k = int(math.floor(tolerance * n + 1e-9))
    if margin.numel() == 0:
        b = 0.0
    else:
        m = torch.sort(margin).values
        if k >= m.numel():
            b = float(m[-1].item())           # every correct example may flip: stop at the last
        else:
            edge = float(m[k].item())
            b = max(0.0, edge - 1e-4 * max(1.0, abs(edge)))
    adj = s.clone()
    adj[:, cls] += b
    acc1 = (adj.argmax(1) == r).float().mean().item()
    return b, acc0, acc1, n


def output_bias_layer(model: nn.Module, x: Any):
    """(name, module) of the layer whose output *is* the model's class scores and that has a
    bias: the one a class-bias adjustment changes. None if there is none."""
    cands = {n: m for n, m in model.named_modules()
             if isinstance(getattr(m, "bias", None), torch.Tensor) and m.bias.dim() == 1
             and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Bilinear))}
    outs: dict[str, torch.Tensor] = {}
    with eval_mode(model), torch.no_grad(), capture(cands, list(cands)) as store:
        scores = logits_of(model(to_device(x, model_device(model))))
        outs = dict(store)
    for n, t in outs.items():
        if t is scores and cands[n].bias.shape[0] == scores.shape[1]:
            return n, cands[n]
    return None


def adjust_bias(model: nn.Module, loader: DataLoader, teachers: list, c: int, tolerance: float,
                dev, labelled: bool) -> dict:
    """Raise class ``c``'s output bias in place by :func:`choose_bias_raise` on ``loader``
    (reference labels: the loader's, else the teachers' predictions)."""
    with eval_mode(model), torch.no_grad():
        x0, _ = split_batch(peek_batch(loader))
        layer_name, layer = output_bias_layer(model, to_device(head(x0, 2), dev))
        logits, refs = [], []
        for batch in loader:
            x, y = split_batch(to_device(batch, dev))
            s = logits_of(forward_batch(model, x)).float()
            if labelled and y is not None:
                ref = y.argmax(1) if y.dim() == 2 else y
            else:
                ref = teacher_signal(teachers, x, 1.0).argmax(1)
            logits.append(s)
            refs.append(ref)
        logits, refs = torch.cat(logits), torch.cat(refs)
        b, acc0, acc1, n = choose_bias_raise(logits, refs, c, tolerance)
        layer.bias[c] += b
    return {"raise": b, "acc_before": acc0, "acc_after": acc1, "n": n, "layer": layer_name,
            "ref": "the labels" if labelled else "the teacher's predictions"}


def model_fn(model: nn.Module):
    def fn(x):
        with eval_mode(model), torch.no_grad():
            return logits_of(forward_batch(model, x))
    return fn


def per_class(fn, loader: DataLoader, dev) -> dict[int, tuple[int, int]]:
    """{class: (correct, count)} of ``fn(x) -> scores`` on a labelled loader."""
    correct: dict[int, int] = {}
    count: dict[int, int] = {}
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(to_device(batch, dev))
            if y is None:
                return {}
            if y.dim() == 2:
                y = y.argmax(1)
            pred = fn(x).argmax(1)
            for c in torch.unique(y).tolist():
                sel = y == c
                count[c] = count.get(c, 0) + int(sel.sum().item())
                correct[c] = correct.get(c, 0) + int((pred[sel] == c).sum().item())
    return {c: (correct[c], count[c]) for c in sorted(count)}


def per_class_table(columns: dict[str, dict]) -> pd.DataFrame:
    """One row a class: its test count and each model's accuracy (fraction) on it."""
    first = next(iter(columns.values()))
    rows = []
    for c in sorted(first):
        row = {"class": c, "n": first[c][1]}
        for label, d in columns.items():
            ok, n = d.get(c, (0, 0))
            row[label] = ok / n if n else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
