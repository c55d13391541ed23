"""The distillation losses (Hinton, Vinyals & Dean 2015)::

    alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T
changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core import BadInput
from ...tokens import task_loss, token_kd_loss

__all__ = ["soft_target_loss", "soft_target_loss_from_probs", "distillation_loss",
           "token_distillation_loss", "looks_like_probs"]


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     T: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    Both arguments are raw class scores ``(N, C)`` (any extra trailing dims are treated as more
    positions: the class dim is dim 1, as in ``F.cross_entropy``). Computed in float32 whatever the
    autocast dtype; gradients flow into ``student_logits`` only (the teacher is detached).
    """
    _check_T(T)
    s, t = _as_nc(student_logits), _as_nc(teacher_logits.detach())
    _check_same_shape(s, t)
    log_q = F.log_softmax(s.float() / T, dim=1)
    log_p = F.log_softmax(t.float() / T, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True) / s.shape[0]
    return kl * (T * T)


def soft_target_loss_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                                T: float = 4.0) -> torch.Tensor:
    """As :func:`soft_target_loss`, with the teacher given as probabilities already softened at
    temperature ``T`` (e.g. an ensemble's averaged ``softmax(t_k / T)``)."""
    _check_T(T)
    s, p = _as_nc(student_logits), _as_nc(teacher_probs.detach())
    _check_same_shape(s, p)
    log_q = F.log_softmax(s.float() / T, dim=1)
    kl = F.kl_div(log_q, p.float(), reduction="sum") / s.shape[0]
    return kl * (T * T)


def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor, targets, T: float = 4.0,
                      alpha: float = 0.9, *, teacher_is_probs: bool | None = None) -> torch.Tensor:
    """``alpha * soft_target_loss + (1 - alpha) * cross_entropy(student, targets)``.

    ``teacher``: the teacher's logits, or its probabilities softened at ``T`` (averaged over an
    ensemble). ``teacher_is_probs``: say which; ``None`` decides from the values (non-negative,
    each row summing to 1 within 1e-3: probabilities). ``targets``: class indices ``(N,)`` or
    soft / one-hot labels ``(N, C)``; may be ``None`` only when ``alpha == 1`` (soft targets only,
    unlabelled transfer data).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise BadInput(f"alpha must be in [0, 1], got {alpha}")
    if teacher_is_probs is None:
        teacher_is_probs = looks_like_probs(teacher)
    if alpha > 0:
        soft = (soft_target_loss_from_probs if teacher_is_probs else soft_target_loss)(
            student_logits, teacher, T)
    else:
        _check_T(T)
        soft = None
    if alpha == 1.0:
        return soft
    if targets is None:
        raise BadInput("hard-label term needs targets: pass labels, or alpha=1 (soft targets "
                         "only) for unlabelled data")
    hard = task_loss(student_logits, None, targets)      # (soft / one-hot labels as floats)
    if soft is None:
        return hard
    return alpha * soft + (1.0 - alpha) * hard


def token_distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor, x, targets,
                            T: float = 4.0, alpha: float = 0.9, *,
                            teacher_is_probs: bool = False) -> torch.Tensor:
    """A language model's distillation loss: ``alpha`` times the token-level soft-target loss
    (KL over the vocabulary at each position, averaged over the positions not ignored; see
    :func:`nbcompress.tokens.token_kd_loss`) plus ``1 - alpha`` times the token cross-entropy
    against ``targets`` (``[batch, seq]`` ids, shifted when they are the inputs, ``-100``
    ignored). ``x``: the batch's inputs (its ``input_ids`` tell whether labels are shifted, its
    ``attention_mask`` which positions count when there are no labels)."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise BadInput(f"alpha must be in [0, 1], got {alpha}")
    _check_T(T)
    soft = token_kd_loss(student_logits, teacher, x, targets, T,
                         teacher_is_probs=teacher_is_probs) if alpha > 0 else None
    if alpha == 1.0:
        return soft
    if targets is None:
        raise BadInput("hard-label term needs targets: pass labels, or alpha=1 (soft targets "
                       "only) for unlabelled data")
    hard = task_loss(student_logits, x, targets)
    return hard if soft is None else alpha * soft + (1.0 - alpha) * hard


def looks_like_probs(x: torch.Tensor, tol: float = 1e-3) -> bool:
    """Whether ``x`` (N, C, ...) holds probabilities over dim 1: non-negative, rows summing to 1."""
    x = x.detach()
    if x.numel() == 0 or x.dim() < 2:
        return False
    if bool((x < 0).any()):
        return False
    return bool(((x.float().sum(dim=1) - 1.0).abs() <= tol).all())


def _check_T(T) -> None:
    if not isinstance(T, (int, float)) or isinstance(T, bool) or not T > 0 or T != T or T == float("inf"):
        raise BadInput(f"temperature T must be a positive finite number, got {T!r}")


def _as_nc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, d1, ...) -> (N * d1 * ..., C): class dim 1 as in F.cross_entropy."""
    if x.dim() < 2:
        raise BadInput(f"expected class scores of shape (N, C), got shape {tuple(x.shape)}")
    if x.dim() > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x


def _check_same_shape(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape != t.shape:
        raise BadInput(f"student scores have shape {tuple(s.shape)} but the teacher's have "
                         f"{tuple(t.shape)}")
