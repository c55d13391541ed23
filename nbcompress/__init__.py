"""nbcompress: neural-network compression as IPython magics.

In a notebook: ``%load_ext nbcompress``, then ``%nbcompress``, ``%prune``, ``%quantize``,
``%lowrank``, ``%distill``, ``%earlyexit``, ``%slim``, ``%budget``, ``%undo``/``%redo``, ``%compress_history``, ``%export``. The same techniques are
plain functions here (``nbcompress.prune(model, 0.5)``) and undoable steps through
:class:`History`.
"""
from __future__ import annotations

from .core import BadInput, CompressionResult, NBCompressError, StepConfig, StepContext, compress
from .history import History
from .workspace import Workspace
from .metrics import Metrics, measure
from .storage import load, save
from .train import evaluate, fit
from .core import TECHNIQUES
from .deploy import ExportReport, export
from .techniques.distill import DistillConfig, distill
from .techniques.earlyexit import EarlyExitConfig, early_exit
from .techniques.lowrank import LowRankConfig, lowrank
from .techniques.prune import PruneConfig, prune, sensitivity
from .techniques.quantize import QuantizeConfig, quantize
from .techniques.slim import SlimConfig, SlimmableNet, slim
from .techniques.budget import BudgetConfig, choose

__version__ = "0.1.0"

__all__ = [
    "BadInput", "CompressionResult", "NBCompressError", "StepConfig", "StepContext", "compress",
    "History", "Workspace", "Metrics", "measure", "save", "load", "evaluate", "fit",
    "PruneConfig", "prune", "sensitivity", "QuantizeConfig", "quantize", "DistillConfig", "distill",
    "LowRankConfig", "lowrank", "EarlyExitConfig", "early_exit", "SlimConfig",
    "SlimmableNet", "slim", "BudgetConfig", "choose", "TECHNIQUES",
    "export", "ExportReport",
    "load_ipython_extension", "unload_ipython_extension",
]


def load_ipython_extension(ipython):
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)
