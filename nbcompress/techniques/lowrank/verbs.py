"""The Python verb of ``%lowrank``."""
from __future__ import annotations

from typing import Any

from torch import nn

from ...core import compress
from .config import LowRankConfig

__all__ = ["lowrank"]


def lowrank(model: nn.Module, *, evaluator: Any = None, example_input: Any = None,
            device: Any = None, **options) -> nn.Module:
    """Return a factorised copy of ``model`` (the model passed in is not changed).

    ``options`` are :class:`LowRankConfig` fields: ``rank``, ``ratio``, ``energy``,
    ``target_params``, ``layers``, ``conv``, ``finetune``, ``epochs``, ``lr``, ``seed``,
    ``progress``. For the per-layer report call ``compress(model, LowRankConfig(...))``.
    """
    LowRankConfig.check_options(options, "lowrank", exclude={"device"})
    config = LowRankConfig(device=device, **options)
    return compress(model, config, evaluator=evaluator, example_input=example_input,
                    device=device).model
