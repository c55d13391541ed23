"""The Python verb: ``nbcompress.early_exit(model, loader, exits=..., threshold=...)``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...core import compress
from .config import EarlyExitConfig
from .model import EarlyExitModel

__all__ = ["early_exit"]


def early_exit(model: nn.Module, loader: DataLoader | None = None, *, evaluator: Any = None,
               device: str | torch.device | None = None, progress: bool = False,
               **options) -> EarlyExitModel:
    """Attach early-exit heads to ``model`` (a copy; the caller's model is unchanged), train them
    on ``loader`` and return the :class:`EarlyExitModel`. On an :class:`EarlyExitModel`,
    ``early_exit(ee, threshold=P)`` returns a copy with only the threshold changed.

    ``options``: the fields of :class:`EarlyExitConfig` (``exits``, ``every``, ``threshold``,
    ``epochs``, ``lr``, ``joint``, ``T``, ``alpha``, ``head_pool``, ``head``,
    ``target_flops`` (needs ``evaluator``), ``seed``). ``evaluator``: a
    loader for the threshold sweep kept in the step's result (see :func:`compress`).
    """
    EarlyExitConfig.check_options(options, "early_exit", exclude={"data", "progress"})
    config = EarlyExitConfig(data=loader, progress=progress, **options)
    return compress(model, config, evaluator=evaluator, device=device).model
