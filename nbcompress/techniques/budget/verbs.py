"""The Python verb: ``nbcompress.choose(model, flops=0.3, evaluator=test_loader)``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core import compress
from .config import BudgetConfig

__all__ = ["choose"]


def choose(model: nn.Module, *, flops: float, evaluator: Any,
           device: str | torch.device | None = None) -> nn.Module:
    """A copy of ``model`` (a slimmable network or an early-exit model) switched to its most
    accurate configuration (width or exit threshold) within ``flops``, a fraction of the full
    network's FLOPs, measured on ``evaluator`` (a labelled DataLoader). The caller's model is
    unchanged. The step's table of every candidate: ``compress(model, BudgetConfig(flops=F),
    evaluator=...).tables["candidates"]``."""
    return compress(model, BudgetConfig(flops=flops, progress=False), evaluator=evaluator,
                    device=device).model
