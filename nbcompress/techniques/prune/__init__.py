"""Pruning: remove what matters least.

Two kinds, one config (:class:`PruneConfig`), one verb (:func:`prune`):

- **weight pruning** zeroes single weights of Linear/Conv layers (global or per layer), by an
  importance criterion (:mod:`.importance`: magnitude by default). The zeros are
  permanent (plain tensors, no masks or hooks left behind); ``nbcompress.save`` stores them
  compactly, so packed bytes and sparse FLOPs fall. Dense hardware does not run it faster.
- **structured pruning** (``structured=True``) removes whole output neurons / conv channels and
  keeps every coupled layer consistent (BatchNorm, residual adds, concatenation, the next layer's
  inputs, flatten into Linear) with the dependency graph of ``torch-pruning``. The result is a
  smaller dense network that really runs faster. Channel counts are rounded to multiples of
  ``round_to`` (default 8: odd widths run slowly on CPU vector units and GPU tensor cores).
  The classifier's outputs (any layer whose channels reach the model output) are never removed.

Around both: ``steps`` rounds to the final amount with fine-tuning between rounds (``finetune``
loader, the shared :func:`nbcompress.train.fit`; pruned weights stay zero through an
``after_step`` hook), ``target_flops`` / ``target_params`` (search the amount that keeps that
fraction), ``lottery`` (iterative magnitude pruning with rewinding to the initial weights, the
ticket compared with the dense model and with a random re-initialisation of the same mask), and
``sensitivity`` (prune each layer alone at several amounts, evaluate, return the table and a plot;
the model is not changed).

``AMOUNT`` is the fraction removed: for weights, the sparsity the selected layers have after the
step (zeros already there count, so ``prune(m, 0.5)`` twice is one step of work); with
``structured``, the fraction of each group's channels removed (``scope="global"``: of all
channels, ranked together on normalised scores).

The package: ``config`` (the options and their checks), ``weights`` (exact selection of single
weights), ``channels`` (torch-pruning groups and the channel policy), ``rounds`` (the round loop of
one step), ``lottery``, ``scan`` (sensitivity), ``importance`` (the criteria), ``verbs``.
"""
from __future__ import annotations

from ...core import register_technique
from .channels import ChannelPruner
from .common import recalibrate_bn
from .config import PruneConfig
from .demo import demo_config
from .verbs import prune, sensitivity
from .weights import prune_weights_, weight_targets

__all__ = ["PruneConfig", "prune", "sensitivity", "prune_weights_", "ChannelPruner",
           "weight_targets", "recalibrate_bn", "demo_config"]

register_technique(PruneConfig, demo=demo_config, pipeline="model")
