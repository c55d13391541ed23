"""Sequence outputs: language models, whose scores are ``[batch, seq, vocab]`` and whose labels
are ``[batch, seq]`` token ids (``-100`` marks a position to ignore, as in PyTorch's
``cross_entropy`` and Hugging Face's collators).

One rule decides how labels line up with the scores, so fit, evaluate and distillation agree:

- labels equal to the input ids (wherever they are not ``-100``) are the Hugging Face causal-LM
  convention (``labels = input_ids``, the model shifts): the scores at position ``t`` predict
  the label at ``t + 1``, so the last position's scores and the first label are dropped;
- any other ``[batch, seq]`` labels are already aligned with the scores (a plain LM trained on
  ``(x, y)`` with ``y`` the next tokens, or a masked LM's labels).

Every loss here is computed from the logits (a model's own ``.loss`` is not used), in float32,
averaged over the positions that are not ignored.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .core import BadInput, FieldError

__all__ = ["IGNORE_INDEX", "token_ids", "is_token_task", "check_targets", "aligned", "task_loss",
           "token_counts", "token_kd_loss"]

IGNORE_INDEX = -100


def token_ids(x: Any) -> torch.Tensor | None:
    """The token ids among a batch's inputs: an integer tensor, a dict's ``input_ids``, or the
    first item of a tuple / list of inputs; None when there are none."""
    if isinstance(x, Mapping):
        x = x.get("input_ids")
    elif isinstance(x, (tuple, list)) and x:
        x = x[0]
    if isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() \
            and x.dtype != torch.bool:
        return x
    return None


def is_token_task(scores: torch.Tensor, x: Any, y: Any) -> bool:
    """Whether ``scores`` are a language model's ``[batch, seq, vocab]`` token scores: 3-d, and
    the labels (or, unlabelled, the input ids) are ``[batch, seq]`` integers."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        return False
    if isinstance(y, torch.Tensor):
        return not y.is_floating_point() and tuple(y.shape) == tuple(scores.shape[:2])
    ids = token_ids(x)
    return y is None and ids is not None and tuple(ids.shape) == tuple(scores.shape[:2])


def check_targets(scores: torch.Tensor, x: Any, y: torch.Tensor, where: str = "the labels") -> None:
    """A one-line :class:`BadInput` when the labels cannot go with the scores: the wrong shape,
    or (tokens) ids outside the vocabulary. Class labels' values are checked where the classes
    are counted (:func:`~nbcompress.batches.check_loader_runs`, :func:`~nbcompress.train.evaluate`)."""
    shape, lab = tuple(scores.shape), tuple(y.shape)
    error = FieldError if "{" in where else BadInput      # a field template: '{finetune}'
    if is_token_task(scores, x, y):
        vocab = shape[-1]
        wrong = (y >= vocab) | ((y < 0) & (y != IGNORE_INDEX))
        if bool(wrong.any()):
            raise error(f"{where} have token id {int(y[wrong][0])}, but the model scores a "
                           f"vocabulary of {vocab} (ids 0..{vocab - 1}, {IGNORE_INDEX} to ignore "
                           f"a position)")
        return
    if scores.dim() == 3 and not y.is_floating_point() and lab != (shape[0], shape[2]):
        raise error(f"{where} have shape {lab}, but the model's token scores have shape "
                       f"{shape}: token labels are [batch, seq] = {shape[:2]} ({IGNORE_INDEX} "
                       f"for ignored positions)")
    if scores.dim() < 2:
        return
    want = (shape[0],) + shape[2:]
    if lab in (want, shape):
        return
    raise error(f"{where} have shape {lab}, but the model's scores have shape {shape}: "
                   f"class labels are {want} (or one-hot / soft labels {shape})")


def _shifts(x: Any, y: torch.Tensor) -> bool:
    """Labels equal to the input ids where not ignored: the causal-LM convention (shift by one)."""
    ids = token_ids(x)
    if ids is None or ids.shape != y.shape or y.shape[1] < 2:
        return False
    return bool(((y == ids.to(y.device)) | (y == IGNORE_INDEX)).all())


def aligned(scores: torch.Tensor, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                    bool]:
    """``(scores, labels, shifted)`` lined up position by position (see the module's rule):
    with ``shifted`` the scores lose their last position and the labels their first."""
    if _shifts(x, y):
        return scores[:, :-1], y[:, 1:], True
    return scores, y, False


def task_loss(scores: torch.Tensor, x: Any, y: torch.Tensor) -> torch.Tensor:
    """The default training loss: cross-entropy of class scores against class (or soft) labels,
    or token-level cross-entropy of a language model's scores (shifted when the labels are the
    inputs, ``-100`` ignored), in float32. Shapes are not checked here (see :func:`check_targets`,
    run once on a loader's first batch)."""
    if not is_token_task(scores, x, y):
        soft = y.is_floating_point() or y.shape == scores.shape     # one-hot / soft labels
        return F.cross_entropy(scores.float(), y.float() if soft else y)
    s, t, _ = aligned(scores, x, y)
    s = s.reshape(-1, s.shape[-1]).float()
    t = t.reshape(-1)
    n = (t != IGNORE_INDEX).sum().clamp_min(1)
    return F.cross_entropy(s, t, ignore_index=IGNORE_INDEX, reduction="sum") / n


def token_counts(scores: torch.Tensor, x: Any, y: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor, torch.Tensor]:
    """``(summed negative log-likelihood, correct next-token predictions, counted tokens)`` of
    one batch, as tensors on the scores' device (no host sync)."""
    s, t, _ = aligned(scores, x, y)
    s = s.reshape(-1, s.shape[-1]).float()
    t = t.reshape(-1)
    keep = t != IGNORE_INDEX
    nll = F.cross_entropy(s, t, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((s.argmax(dim=-1) == t) & keep).sum()
    return nll, correct, keep.sum()


def token_kd_loss(student: torch.Tensor, teacher: torch.Tensor, x: Any, y: Any, T: float = 4.0,
                  *, teacher_is_probs: bool = False) -> torch.Tensor:
    """Token-level distillation: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the
    vocabulary at each position, averaged over the positions that count: those whose (aligned)
    label is not ``-100``, else those the ``attention_mask`` keeps, else all. ``teacher``: its
    ``[batch, seq, vocab]`` logits, or probabilities already softened at ``T``."""
    if student.shape != teacher.shape:
        raise BadInput(f"the student's token scores have shape {tuple(student.shape)} but the "
                       f"teacher's have {tuple(teacher.shape)}: they must score the same "
                       f"vocabulary on the same sequences")
    keep = None
    if isinstance(y, torch.Tensor) and is_token_task(student, x, y):
        s, t_lab, shifted = aligned(student, x, y)
        teacher = teacher[:, :-1] if shifted else teacher
        student, keep = s, t_lab != IGNORE_INDEX
    elif isinstance(x, Mapping) and isinstance(x.get("attention_mask"), torch.Tensor) \
            and tuple(x["attention_mask"].shape) == tuple(student.shape[:2]):
        keep = x["attention_mask"].to(student.device).bool()
    log_q = F.log_softmax(student.float() / T, dim=-1)
    if teacher_is_probs:
        p = teacher.detach().float()
        kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1)
    else:
        log_p = F.log_softmax(teacher.detach().float() / T, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if keep is None:
        return kl.mean() * (T * T)
    return (kl * keep).sum() / keep.sum().clamp_min(1) * (T * T)
