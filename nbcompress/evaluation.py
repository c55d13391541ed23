"""Evaluation: the numbers every accuracy on the dashboard comes from (:func:`evaluate` for a
DataLoader), used by :mod:`nbcompress.train`'s loop for its per-epoch records."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .batches import _check_loader, _loader_len, forward_batch, logits_of, run_error, split_batch, to_device
from .core import BadInput, model_device, resolve_device
from .tokens import check_targets, is_token_task, token_counts

__all__ = ["EVAL_METRICS", "evaluate", "evaluation", "eval_record"]

# --------------------------------------------------------------------------------- evaluation

EVAL_METRICS = ("auto", "accuracy", "perplexity", "token_accuracy")


def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device | None = None,
             progress: bool = False, metric: str = "auto") -> float:
    """One number for ``model`` on a labelled ``loader`` (see :func:`evaluation` for all of them).

    ``metric``: ``"auto"`` (top-1 accuracy of a classifier, as a fraction in [0, 1]; perplexity
    of a language model, whose scores are ``[batch, seq, vocab]`` with ``[batch, seq]`` labels),
    ``"accuracy"`` (top-1 of class scores; a language model is refused, not scored per token by
    mistake), ``"perplexity"`` or ``"token_accuracy"`` (language models only)."""
    if metric not in EVAL_METRICS:
        raise BadInput(f"metric must be one of {', '.join(EVAL_METRICS)}, got {metric!r}")
    res = evaluation(model, loader, device, progress, metric=metric)
    if metric == "auto":
        return res["perplexity"] if "perplexity" in res else res["accuracy"]
    return res[metric]


def evaluation(model: nn.Module, loader: DataLoader, device: str | torch.device | None = None,
               progress: bool = False, *, metric: str = "auto") -> dict:
    """What ``model`` scores on a labelled ``loader``: ``{"accuracy"}`` (top-1, a fraction) for
    class scores; for a language model (``[batch, seq, vocab]`` scores, ``[batch, seq]`` labels,
    see :mod:`nbcompress.tokens` for how labels line up) ``{"perplexity", "token_accuracy",
    "loss", "tokens"}``: exp of the mean next-token negative log-likelihood over the tokens not
    ignored (``-100``), the share of them predicted top-1, that mean, and their count.

    Runs in eval mode without autograd on ``device`` (default: the model's device; the model is
    not moved), batch by batch, and restores the model's train/eval mode afterwards. Targets may be
    class indices or one-hot / soft labels (argmax taken). A ``metric`` that does not fit the
    model's scores (``"accuracy"`` of a language model) is refused on the first batch.

    Autograd is off with ``torch.no_grad`` rather than ``torch.inference_mode``: a module that
    caches or re-binds a buffer during forward (observers, lazily built masks) would otherwise keep
    an inference tensor that a later :func:`fit` cannot train through; the speed is the same.
    """
    if not isinstance(model, nn.Module):
        raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
    _check_loader(loader, "the evaluation loader")
    if metric not in EVAL_METRICS:
        raise BadInput(f"metric must be one of {', '.join(EVAL_METRICS)}, got {metric!r}")
    dev = model_device(model) if device is None else resolve_device(device)
    was_training = model.training
    total = 0
    tokens = None           # decided on the first batch
    bar = tqdm(total=_loader_len(loader), desc="eval", disable=not progress, leave=False)
    model.eval()
    try:
        with torch.no_grad():
            correct_t = torch.zeros((), dtype=torch.long, device=dev)
            nll_t = torch.zeros((), dtype=torch.float64, device=dev)
            count_t = torch.zeros((), dtype=torch.long, device=dev)
            lo_t = hi_t = classes = None
            for batch in loader:
                x, y = split_batch(batch)
                if y is None:
                    raise BadInput("the evaluation loader yields no labels: accuracy needs "
                                   "(inputs, labels) batches")
                x = to_device(x, dev)
                y = to_device(y, dev)
                if tokens is None:
                    scores = logits_of(_first_forward(model, x, "the evaluation loader"))
                    tokens = _check_first(scores, x, y, metric)
                else:
                    scores = logits_of(forward_batch(model, x))
                if tokens:
                    nll, c, n = token_counts(scores, x, y)
                    nll_t += nll.double()
                    correct_t += c
                    count_t += n
                    bar.update(1)
                    continue
                pred = scores.argmax(dim=1)
                if y.dim() == scores.dim() and y.shape == scores.shape:   # one-hot / soft labels
                    y = y.argmax(dim=1)
                if pred.shape != y.shape:
                    raise BadInput(f"the model's predictions have shape {tuple(pred.shape)} but "
                                   f"the labels have shape {tuple(y.shape)}")
                correct_t += (pred == y).sum()
                if y.numel() and not y.is_floating_point():   # checked at the end: no sync here
                    lo_t = torch.minimum(lo_t, y.min()) if lo_t is not None else y.min()
                    hi_t = torch.maximum(hi_t, y.max()) if hi_t is not None else y.max()
                    classes = scores.shape[1] if scores.dim() > 1 else None
                total += y.numel()
                bar.update(1)
            if tokens:
                return _token_result(float(nll_t), int(correct_t), int(count_t))
            correct = int(correct_t.item())
            if hi_t is not None and classes is not None:
                lo, hi = int(lo_t), int(hi_t)
                if lo < 0 or hi >= classes:
                    raise BadInput(f"the evaluation loader has label {hi if hi >= classes else lo}"
                                   f", but the model scores {classes} classes (labels 0.."
                                   f"{classes - 1}): the accuracy would be meaningless")
    finally:
        bar.close()
        model.train(was_training)
    if total == 0:
        raise BadInput("the evaluation loader yielded no samples")
    return {"accuracy": correct / total}


def _first_forward(model: nn.Module, x: Any, what: str) -> Any:
    """The first batch's forward: a model that cannot take the loader's inputs is one line."""
    try:
        return forward_batch(model, x)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - the data does not fit the model: a user error
        raise run_error(model, x, e, what) from None


def _check_first(scores: torch.Tensor, x: Any, y: torch.Tensor, metric: str) -> bool:
    """Whether the evaluation is per token; a metric that does not fit the scores refused."""
    check_targets(scores, x, y, "the evaluation loader's labels")
    tokens = is_token_task(scores, x, y)
    if tokens and metric == "accuracy":
        raise BadInput(f"top-1 accuracy scores class predictions, but the model's scores "
                       f"{tuple(scores.shape)} are a language model's [batch, seq, vocab]: use "
                       f"metric='perplexity' (or 'auto') or 'token_accuracy'")
    if not tokens and metric in ("perplexity", "token_accuracy"):
        raise BadInput(f"{metric} needs a language model's [batch, seq, vocab] scores with "
                       f"[batch, seq] token labels; the model's scores have shape "
                       f"{tuple(scores.shape)} and the labels {tuple(y.shape)}")
    return tokens


def _token_result(nll: float, correct: int, n: int) -> dict:
    if n == 0:
        raise BadInput("the evaluation loader's labels are all -100 (ignored): no token to score")
    loss = nll / n
    return {"perplexity": math.exp(loss) if loss < 700 else math.inf,
            "token_accuracy": correct / n, "loss": loss, "tokens": n}


def eval_record(model: nn.Module, loader: DataLoader, device: Any = None) -> dict:
    """The numbers an epoch record or a report shows for ``loader``: ``{"accuracy"}``, or for a
    language model ``{"perplexity", "token_accuracy"}``."""
    res = evaluation(model, loader, device)
    return {k: res[k] for k in ("perplexity", "token_accuracy")} if "perplexity" in res else res
