"""Knowledge distillation: train a small student from a large teacher's (or an ensemble's) outputs.

The loss (Hinton, Vinyals & Dean 2015)::

    alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

``losses`` (the loss functions), ``students`` (a small MLP student), ``config`` (DistillConfig:
the options, the checks), ``train_loop`` (the run), ``adapters`` (feature hints), ``bias`` (the
class-bias raise, the per-class table), ``teachers`` (a model is not its own teacher),
``probe`` (running models on a batch without side effects), ``verbs`` (``distill``), ``demo``.
"""
from __future__ import annotations

from ...core import register_technique
from .bias import choose_bias_raise
from .config import DistillConfig
from .demo import demo_config
from .losses import distillation_loss, looks_like_probs, soft_target_loss, soft_target_loss_from_probs
from .students import MLPStudent, mlp_student
from .teachers import check_teachers_apart, shared_parameters
from .verbs import distill

__all__ = ["soft_target_loss", "soft_target_loss_from_probs", "distillation_loss", "looks_like_probs",
           "DistillConfig", "distill", "choose_bias_raise", "MLPStudent", "mlp_student",
           "demo_config", "check_teachers_apart", "shared_parameters"]

register_technique(DistillConfig, demo=demo_config, pipeline="model")
