"""Slimmable networks: one set of weights that runs at several widths (issue 17).

``plan.py``: the channels as dependency groups (the graph structured pruning uses), reordered
most important first, and what each width keeps of every tensor; ``model.py``:
:class:`SlimmableNet`, which runs at any trained width by slicing its tensors and cuts one width
out as a plain network (:meth:`~SlimmableNet.at_width`); ``training.py``: sandwich-rule training
with in-place distillation and per-width BatchNorm statistics; ``config.py``: the step and its
options; ``verbs.py``: the Python verb :func:`slim`.
"""
from __future__ import annotations

from ...core import register_technique
from .config import SlimConfig, parse_widths, width_table
from .model import SlimmableNet
from .plan import plan_widths
from .verbs import slim

__all__ = ["SlimConfig", "SlimmableNet", "slim", "plan_widths", "parse_widths", "width_table"]

register_technique(SlimConfig)
