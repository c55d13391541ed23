"""Early exits: dynamic computation with small classifier heads inside a network.

A head (a small average-pool + linear classifier) is attached after some of the network's blocks
(``blocks.py``: the model as a chain of blocks, where the exits go). At inference each sample
leaves at the first exit whose top softmax probability reaches the threshold (``model.py``:
:class:`EarlyExitModel`, with honest average FLOPs). The heads are trained on the network's own
final output (distillation) with the backbone frozen, or jointly with the backbone
(``training.py``); ``sweep.py`` gives accuracy and average FLOPs as the threshold sweeps;
``config.py`` is the step and its options, ``verbs.py`` the Python verb :func:`early_exit`.
"""
from __future__ import annotations

from ...core import register_technique
from .blocks import list_blocks
from .config import EarlyExitConfig
from .demo import demo_config, sequential_cnn
from .model import DEFAULT_THRESHOLD, EarlyExitModel
from .sweep import SWEEP_THRESHOLDS, threshold_sweep
from .verbs import early_exit

__all__ = ["EarlyExitConfig", "EarlyExitModel", "early_exit", "threshold_sweep",
           "list_blocks", "sequential_cnn", "demo_config", "DEFAULT_THRESHOLD", "SWEEP_THRESHOLDS"]

register_technique(EarlyExitConfig, demo=demo_config, pipeline="model_arch")
