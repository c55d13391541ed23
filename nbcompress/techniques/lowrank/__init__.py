"""Low-rank factorisation and depthwise-separable layers: the ``%lowrank`` technique.

Architecture design compresses by changing the form of a layer: a Linear becomes two Linears
through ``r`` units (truncated SVD); a ``k x k`` Conv2d becomes an SVD pair, a Tucker-2 triple or
a depthwise-separable pair (``conv``), each a :class:`LowRank` (an ``nn.Sequential`` of
standard layers whose ``weight``, ``bias`` and shape attributes are the original's, so model code
reading ``self.qkv.weight`` keeps running). Linear subclasses computing the same and transformers'
``Conv1D`` are factorised as Linears; a weight tied to another module is kept whole.

Ranks come from one of ``rank`` (absolute), ``ratio`` (a fraction of each layer's full rank),
``energy`` (the share of squared singular values kept) or ``target_params`` (a parameter budget for
the whole model, allocated across layers by their singular values: the largest singular values of
all layers are kept, each measured by its share of its own layer's energy, down to the lowest share
whose model fits the budget; flat spectra keep many components, steep ones few). A layer whose
factorised form would not be smaller is kept as it is and named in the notes. The classifier (the
layer whose output is the model's output, found as structured pruning finds it) is kept whole
unless ``layers`` selects it, and the notes say so.

Files: ``config.py`` (the options, their checks, ``run``), ``candidates.py`` (which layers),
``plans.py`` (per-layer plans, rank allocation, ``target_params``), ``factorize.py`` (the SVD,
Tucker-2 and separable factorisations, reconstruction error; large layers without a full SVD),
``layer.py`` (:class:`LowRank`), ``batchnorm.py`` (BatchNorm
statistics re-estimated), ``verbs.py`` (:func:`lowrank`), ``demo.py``.
"""
from __future__ import annotations

from ...batches import output_layers
from ...core import register_technique
from .batchnorm import recalibrate_batchnorm
from .config import CONV_MODES, LowRankConfig
from .demo import demo_config
from .layer import LowRank
from .factorize import (effective_weight, relative_error, separable_factorize_conv,
                        svd_factorize_conv, svd_factorize_linear, tucker_factorize_conv,
                        tucker_ranks_limit)
from .verbs import lowrank

__all__ = [
    "LowRankConfig", "LowRank", "lowrank", "demo_config", "CONV_MODES",
    "svd_factorize_linear", "svd_factorize_conv", "tucker_factorize_conv",
    "separable_factorize_conv", "tucker_ranks_limit", "effective_weight", "relative_error",
    "recalibrate_batchnorm", "output_layers",
]

register_technique(LowRankConfig, demo=demo_config, pipeline="model_arch")
