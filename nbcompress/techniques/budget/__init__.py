"""``%budget``: the most accurate configuration a trained network offers within a FLOPs budget
(issue 17, part 3): a slimmable network's widths (``%slim``) or an early-exit model's thresholds
(``%earlyexit``), each measured on the evaluation data; the choice is a history step and every
candidate is shown (table, plot, which are on the Pareto front)."""
from __future__ import annotations

from ...core import register_technique
from .config import BudgetConfig, candidates, pick
from .verbs import choose

__all__ = ["BudgetConfig", "candidates", "pick", "choose"]

register_technique(BudgetConfig)
