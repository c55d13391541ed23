"""The one training and evaluation loop every technique reuses.

Fine-tuning after pruning, distillation, quantization-aware training and lottery-ticket rewinds all
call :func:`fit`; every accuracy the dashboard shows for a DataLoader comes from :func:`evaluate`.
Both work on the model's own device (the caller places the model) and move data batch by batch
with :func:`to_device`, so the same code runs on CPU and CUDA.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .batches import (_check_loader, _loader_len, check_loader_runs, eval_mode, first_line,
                      forward_batch, logits_of, output_layers, peek_batch, run_error, split_batch,
                      to_device)
from .core import BadInput, model_device, resolve_device
from .options import is_int, is_number
from .tokens import check_targets, is_token_task, task_loss, token_counts

# the batch helpers are importable from here too (they were defined here first)
__all__ = ["to_device", "split_batch", "evaluate", "evaluation", "eval_record", "fit", "make_optimizer", "forward_batch",
           "logits_of", "eval_mode", "peek_batch", "check_loader_runs", "first_line",
           "output_layers"]

OPTIMIZERS = ("adam", "adamw", "sgd")
_POSTFIX_EVERY = 10     # steps between progress-bar loss updates (each one syncs a CUDA device)


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


# ------------------------------------------------------------------------------------ training

def make_optimizer(optimizer: Any, params: Any, *, lr: float = 1e-3, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """An optimizer from a name ("adam", "adamw", "sgd"), a ready ``torch.optim.Optimizer``
    (returned as it is) or a callable ``f(params) -> Optimizer``."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        raise BadInput(f"unknown optimizer {optimizer!r} (use {', '.join(OPTIMIZERS)}, a "
                       f"torch.optim.Optimizer or a callable f(params) -> Optimizer)")
    if callable(optimizer):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise BadInput(f"the optimizer callable returned a {type(opt).__name__}, not a "
                           f"torch.optim.Optimizer")
        return opt
    raise BadInput(f"optimizer must be one of {', '.join(OPTIMIZERS)}, a torch.optim.Optimizer or "
                   f"a callable f(params) -> Optimizer; got {type(optimizer).__name__}")


def _validate(model, loader, epochs, lr, optimizer, weight_decay, momentum, loss_fn, after_step,
              on_epoch_end, eval_loader, scheduler, grad_clip, seed, amp) -> None:
    if not isinstance(model, nn.Module):
        raise BadInput(f"expected a torch.nn.Module to train, got {type(model).__name__}")
    _check_loader(loader, "the training loader")
    if not is_int(epochs) or epochs < 1:
        raise BadInput(f"epochs must be a positive int, got {epochs!r}")
    if not is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise BadInput(f"lr must be a positive number, got {lr!r}")
    if not is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise BadInput(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if not is_number(momentum) or not 0 <= momentum < 1:
        raise BadInput(f"momentum must be in [0, 1), got {momentum!r}")
    if isinstance(optimizer, str) and optimizer.lower() not in OPTIMIZERS:
        raise BadInput(f"unknown optimizer {optimizer!r} (use {', '.join(OPTIMIZERS)}, a "
                       f"torch.optim.Optimizer or a callable f(params) -> Optimizer)")
    if not (isinstance(optimizer, (str, torch.optim.Optimizer)) or callable(optimizer)):
        raise BadInput(f"optimizer must be one of {', '.join(OPTIMIZERS)}, a torch.optim.Optimizer "
                       f"or a callable f(params) -> Optimizer; got {type(optimizer).__name__}")
    for name, fn in (("loss_fn", loss_fn), ("after_step", after_step),
                     ("on_epoch_end", on_epoch_end)):
        if fn is not None and not callable(fn):
            raise BadInput(f"{name} must be callable, got {type(fn).__name__}")
    if eval_loader is not None:
        _check_loader(eval_loader, "eval_loader")
    if scheduler is not None:
        if isinstance(scheduler, str):
            if scheduler.lower() != "cosine":
                raise BadInput(f"unknown scheduler {scheduler!r} (use 'cosine', a callable "
                               f"f(optimizer, total_steps) -> scheduler, or None)")
        elif not (callable(scheduler)
                  or isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)):
            raise BadInput(f"scheduler must be 'cosine', a callable f(optimizer, total_steps) or "
                           f"None; got {type(scheduler).__name__}")
    if grad_clip is not None and (not is_number(grad_clip) or grad_clip <= 0):
        raise BadInput(f"grad_clip must be a positive number or None, got {grad_clip!r}")
    if seed is not None and not is_int(seed):
        raise BadInput(f"seed must be an int or None, got {seed!r}")
    if amp is not None and not isinstance(amp, bool):
        raise BadInput(f"amp must be True, False or None (automatic), got {amp!r}")


def _amp_setup(amp: bool | None, device: torch.device):
    """(autocast context factory, GradScaler or None).

    ``amp=None``: mixed precision on CUDA only (bf16 where supported, else fp16 with a gradient
    scaler); ``amp=True`` on CPU: bf16 autocast; ``amp=False``: full precision."""
    use = (device.type == "cuda") if amp is None else amp
    if not use:
        return contextlib.nullcontext, None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


def _param_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _seed_scope(seed: int | None, device: torch.device):
    """Seed torch for the duration of the run, restoring the global RNG state afterwards."""
    if seed is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    cuda = device.type == "cuda"
    idx = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    stack.enter_context(torch.random.fork_rng(devices=[idx] if cuda else []))
    torch.random.default_generator.manual_seed(int(seed))
    if cuda:
        with torch.cuda.device(idx):
            torch.cuda.manual_seed(int(seed))
    return stack


def fit(model: nn.Module, loader: DataLoader, *, epochs: int = 1, lr: float = 1e-3,
        optimizer: Any = "adam", weight_decay: float = 0.0, momentum: float = 0.9,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        params: Iterable | None = None, device: str | torch.device | None = None,
        amp: bool | None = None, progress: bool = True, desc: str = "fit",
        after_step: Callable[[nn.Module], Any] | None = None,
        on_epoch_end: Callable[[int, dict], Any] | None = None,
        eval_loader: DataLoader | None = None, scheduler: Any = None,
        grad_clip: float | None = None, seed: int | None = None) -> list[dict]:
    """Train ``model`` in place; one record per epoch: ``{"epoch", "loss", "seconds", "lr"}`` plus
    ``"accuracy"`` (on ``eval_loader``) when one is given (a language model's: ``"perplexity"``
    and ``"token_accuracy"``).

    - ``loader``: a DataLoader; batches are moved to the device one at a time.
    - ``optimizer``: "adam" | "adamw" | "sgd" (``lr``, ``weight_decay``, ``momentum`` apply), a
      ready ``torch.optim.Optimizer`` (used as it is; ``lr`` is then ignored) or a callable
      ``f(params) -> Optimizer``.
    - ``loss_fn``: default cross-entropy of ``model(x)`` against ``y`` (a language model's
      ``[batch, seq, vocab]`` scores: per token, shifted when the labels are the inputs, ``-100``
      ignored; see :mod:`nbcompress.tokens`); otherwise
      ``loss_fn(model, batch) -> scalar tensor`` with ``batch`` already on the device (so
      unlabelled batches and teacher models work).
    - ``params``: the parameters (or param groups) to optimise; default all that require grad.
    - ``device``: default the model's device; if given and different, the model is moved there.
    - ``amp``: None = mixed precision on CUDA only; True forces it (bf16 autocast on CPU); False
      turns it off.
    - ``after_step(model)``: after every optimizer step, under ``no_grad`` (re-apply masks, clip).
    - ``on_epoch_end(epoch, record)``: after each epoch (``epoch`` counts from 1, as in the
      record); returning ``True`` stops training early.
    - ``scheduler``: None, "cosine" (cosine annealing over all steps), a callable
      ``f(optimizer, total_steps) -> scheduler`` or a ready LR scheduler; stepped every step.
    - ``grad_clip``: max global gradient norm. ``seed``: seeds torch for the run (the global RNG
      state is restored afterwards; shuffling order is the loader's own generator).

    An exception or ``KeyboardInterrupt`` (also one raised inside ``loss_fn``) propagates
    unchanged; the model's train/eval mode is restored and the progress bar closed either way.
    Parameters keep whatever the finished steps wrote; ``.grad`` holds the last step's gradients
    (None for parameters left out of ``params``).
    """
    _validate(model, loader, epochs, lr, optimizer, weight_decay, momentum, loss_fn, after_step,
              on_epoch_end, eval_loader, scheduler, grad_clip, seed, amp)
    dev = model_device(model) if device is None else resolve_device(device)
    if model_device(model) != dev:
        model.to(dev)

    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
    if not isinstance(optimizer, torch.optim.Optimizer) and not params:
        raise BadInput("there are no parameters to train (none require grad)")
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    opt_params = _param_tensors(opt)
    trained = {id(p) for p in opt_params}
    params_subset = any(p.requires_grad and id(p) not in trained for p in model.parameters())

    steps_per_epoch = _loader_len(loader)
    if steps_per_epoch == 0:
        raise BadInput("the training loader is empty")
    total_steps = steps_per_epoch * epochs if steps_per_epoch is not None else None
    if scheduler is None:
        sched = None
    elif isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        sched = scheduler
    elif isinstance(scheduler, str):
        if total_steps is None:
            raise BadInput("scheduler='cosine' needs a loader with a length (len(loader))")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = scheduler(opt, total_steps)

    autocast, scaler = _amp_setup(amp, dev)
    history: list[dict] = []
    was_training = model.training
    bar = None
    try:
        # training works even when called under torch.no_grad() / inference_mode() (a notebook
        # cell inside a `with torch.no_grad():` block, an evaluation helper)
        with _seed_scope(seed, dev), torch.inference_mode(False), torch.enable_grad():
            for epoch in range(1, epochs + 1):
                model.train()
                bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch}/{epochs}",
                           disable=not progress, leave=False)
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), dtype=torch.float32, device=dev)  # no float64 on MPS
                n_steps = 0
                for batch in loader:
                    batch = to_device(batch, dev)
                    with autocast():
                        if loss_fn is None:
                            x, y = split_batch(batch)
                            if y is None:
                                raise BadInput("the training loader yields no labels; pass "
                                               "loss_fn(model, batch) to train on unlabelled data")
                            if n_steps == 0:
                                scores = logits_of(_first_forward(model, x, "the training loader"))
                                check_targets(scores, x, y, "the training loader's labels")
                            else:
                                scores = logits_of(forward_batch(model, x))
                            loss = task_loss(scores, x, y)
                        else:
                            loss = loss_fn(model, batch)
                    if n_steps == 0:
                        _check_loss(loss)
                    opt.zero_grad(set_to_none=True)
                    if params_subset:       # grads of parameters not trained must not pile up
                        model.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        if grad_clip is not None:
                            scaler.unscale_(opt)
                            torch.nn.utils.clip_grad_norm_(opt_params, grad_clip)
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        if grad_clip is not None:
                            torch.nn.utils.clip_grad_norm_(opt_params, grad_clip)
                        opt.step()
                    if sched is not None:
                        sched.step()
                    if after_step is not None:
                        with torch.no_grad():
                            after_step(model)
                    loss_sum += loss.detach().float()
                    n_steps += 1
                    bar.update(1)
                    if progress and n_steps % _POSTFIX_EVERY == 0:
                        bar.set_postfix(loss=f"{loss_sum.item() / n_steps:.4f}", refresh=False)
                if n_steps == 0:
                    raise BadInput("the training loader yielded no batches")
                mean_loss = loss_sum.item() / n_steps
                seconds = time.perf_counter() - t0
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                bar.close()
                record = {"epoch": epoch, "loss": mean_loss, "seconds": seconds,
                          "lr": float(opt.param_groups[0]["lr"])}
                if eval_loader is not None:
                    record.update(eval_record(model, eval_loader, device=dev))
                history.append(record)
                if on_epoch_end is not None and on_epoch_end(epoch, record) is True:
                    break
    finally:
        if bar is not None:
            bar.close()
        if params_subset:
            for p in model.parameters():
                if id(p) not in trained:
                    p.grad = None
        model.train(was_training)
    return history


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise BadInput(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise BadInput(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise BadInput("the loss does not depend on any trainable parameter (no grad); was it "
                       "computed under torch.no_grad, or are all parameters frozen?")
