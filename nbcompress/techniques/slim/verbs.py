"""The Python verb: ``nbcompress.slim(model, loader, widths=..., width=...)``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...core import compress
from .config import SlimConfig
from .model import SlimmableNet

__all__ = ["slim"]


def slim(model: nn.Module, loader: DataLoader | None = None, *, evaluator: Any = None,
         device: str | torch.device | None = None, progress: bool = False,
         **options) -> SlimmableNet:
    """Make ``model`` slimmable (a copy; the caller's model is unchanged): train it on ``loader``
    to run at every width in ``widths`` and return the :class:`SlimmableNet`. On a
    :class:`SlimmableNet`, ``slim(sn, width=W)`` returns a copy that runs at width ``W``.

    ``options``: the fields of :class:`SlimConfig` (``widths``, ``width``, ``epochs``, ``lr``,
    ``importance``, ``samples``, ``T``, ``calib``, ``seed``). ``evaluator``: a loader or callable
    for the per-width accuracy table kept in the step's result (see :func:`compress`).
    """
    SlimConfig.check_options(options, "slim", exclude={"data", "progress"})
    config = SlimConfig(data=loader, progress=progress, **options)
    return compress(model, config, evaluator=evaluator, device=device).model
