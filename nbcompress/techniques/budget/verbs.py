"""The Python verb: ``nbcompress.choose(model, flops=0.3, evaluator=test_loader)``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core import compress
from .config import BudgetConfig

__all__ = ["choose"]


def choose(model: nn.Module, *, flops: float | None = None, latency: float | None = None,
           evaluator: Any, device: str | torch.device | None = None) -> nn.Module:
    """A copy of ``model`` (a slimmable network or an early-exit model) switched to its most
    accurate configuration (width and depth, or exits and threshold) within ``flops``, a
    fraction of the full network's FLOPs, or ``latency``, a fraction of its measured latency,
    measured on ``evaluator`` (a labelled DataLoader). The caller's model is unchanged. The
    step's table of every candidate: ``compress(model, BudgetConfig(flops=F),
    evaluator=...).tables["candidates"]``."""
    return compress(model, BudgetConfig(flops=flops, latency=latency, progress=False),
                    evaluator=evaluator, device=device).model
