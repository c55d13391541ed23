"""The Python verb: ``nbcompress.distill(student, teachers, loader, **options)``."""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from ...core import compress
from .config import DistillConfig

__all__ = ["distill"]


def distill(student: nn.Module, teachers: Any, loader: DataLoader, *, evaluator: Any = None,
            device: Any = None, **options) -> nn.Module:
    """Train a copy of ``student`` from ``teachers`` on ``loader``; returns the trained student
    (the argument itself is not changed). ``options`` are :class:`DistillConfig` fields
    (``epochs``, ``T``, ``alpha``, ``soft_only``, ``features``, ``bias_adjust``, ...)."""
    DistillConfig.check_options(options, "distill", exclude={"teachers", "loader", "device"})
    config = DistillConfig(teachers=teachers, loader=loader, device=device, **options)
    return compress(student, config, evaluator=evaluator, device=device).model
