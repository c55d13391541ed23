"""Importance criteria for pruning: small interchangeable classes, in the Torch-Pruning style.

Each criterion answers two questions with one object:

- ``weight_scores(name, module)``: a score per single weight of ``module.weight`` (weight pruning
  removes the lowest);
- ``channel_scores(group, names)``: a score per channel of a Torch-Pruning dependency group (all
  the layers coupled to one set of channels: a conv's outputs, its BatchNorm, the next layer's
  inputs, residual partners). Structured pruning removes the lowest channels.

Criteria that need data (``needs_data``) see it once in ``prepare(model, loader, ...)`` and keep
what they measured keyed by *module name*, so the same object scores a model and its copies.
New criteria subclass :class:`Importance`; nothing in the pruner changes.

=============  ================================================================================
``l1``         ``|w|`` (magnitude; per channel: the group's summed ``|w|``)
``l2``         ``w**2`` (per channel: the group's squared L2 norm, Torch-Pruning's default)
``taylor``     first-order Taylor ``|g * w|`` with ``g`` the loss gradient, averaged over batches
               (Molchanov et al. 2017/2019)
``hessian``    second-order, Optimal Brain Damage: ``0.5 * H_ii * w**2`` with the Hessian
               diagonal approximated by the empirical Fisher (mean per-sample ``g**2``)
``activation`` structured only: how strongly a channel fires on data, mean ``|a|`` of what the
               next layer receives (``kind="apoz"``: 1 - average percentage of zeros)
``bn``         structured only: BatchNorm scale ``|gamma|`` (network slimming, Liu et al. 2017)
``random``     uniform random scores (a control)
=============  ================================================================================
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ...core import BadInput
from ...train import logits_of
from .criteria import (BNScaleImportance, Importance, L1Importance, L2Importance,
                       MagnitudeImportance, RandomImportance)
from .measured import ActivationImportance, HessianImportance, TaylorImportance

__all__ = ["Importance", "MagnitudeImportance", "L1Importance", "L2Importance",
           "TaylorImportance", "HessianImportance", "ActivationImportance", "BNScaleImportance",
           "RandomImportance", "IMPORTANCES", "get_importance", "logits_of"]


IMPORTANCES: dict[str, Any] = {
    "l1": L1Importance,
    "l2": L2Importance,
    "taylor": TaylorImportance,
    "hessian": HessianImportance,
    "activation": ActivationImportance,
    "bn": BNScaleImportance,
    "random": RandomImportance,
}


def get_importance(spec: str | Importance, *, seed: int = 0) -> Importance:
    """An :class:`Importance` from a name in :data:`IMPORTANCES` (or the object itself)."""
    if isinstance(spec, Importance):
        return spec
    if not isinstance(spec, str) or spec.lower() not in IMPORTANCES:
        raise BadInput(f"unknown importance {spec!r} (use {', '.join(IMPORTANCES)})")
    cls = IMPORTANCES[spec.lower()]
    return cls(seed=seed) if cls is RandomImportance else cls()


def normalized(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean, so groups of different scale can be ranked together."""
    m = float(scores.float().mean())
    if not math.isfinite(m) or m <= 0:
        return scores.float()
    return scores.float() / m
