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
                      forward_batch, logits_of, output_layers, peek_batch, split_batch, to_device)
from .core import BadInput, model_device, resolve_device
from .evaluation import EVAL_METRICS, _first_forward, eval_record, evaluate, evaluation
from .options import is_int, is_number
from .tokens import check_targets, task_loss

# the batch helpers are importable from here too (they were defined here first)
__all__ = ["to_device", "split_batch", "evaluate", "evaluation", "eval_record", "EVAL_METRICS",
           "fit", "make_optimizer", "forward_batch",
           "logits_of", "eval_mode", "peek_batch", "check_loader_runs", "first_line",
           "output_layers"]

OPTIMIZERS = ("adam", "adamw", "sgd")
_POSTFIX_EVERY = 10     # steps between progress-bar loss updates (each one syncs a CUDA device)

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
        grad_clip: float | None = None, seed: int | None = None,
        processes: int | None = None, launcher: str | None = None,
        carry: Iterable[torch.Tensor] = ()) -> list[dict]:
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
    - ``processes``: train data-parallel on this many forked workers (see
      :mod:`nbcompress.distributed`; default 1, or what the step's ``processes=`` asked for).
      Each worker reads its shard of the loader's dataset at the loader's batch size, so a step
      sees ``processes x batch_size`` samples. ``launcher``: "none" (torch.multiprocessing) or
      "accelerate" (Hugging Face Accelerate's ``notebook_launcher``; with ``processes=1`` it runs
      the one worker under the launcher, as the same loop). The model's tensors (and the
      optimized parameters, and the tensors in ``carry`` that ``loss_fn`` updates) are copied
      back from rank 0 when every worker finished; ``.grad`` stays as it was, and a ready
      ``optimizer`` object keeps its state in the kernel (its workers' copies did the steps).
      ``after_step`` runs in every worker, ``on_epoch_end`` and ``eval_loader`` in rank 0's:
      what they change there stays there (a ``True`` from ``on_epoch_end`` stops every worker).

    An exception or ``KeyboardInterrupt`` (also one raised inside ``loss_fn``) propagates
    unchanged; the model's train/eval mode is restored and the progress bar closed either way.
    Parameters keep whatever the finished steps wrote; ``.grad`` holds the last step's gradients
    (None for parameters left out of ``params``). On several processes the model is unchanged
    by a failure or interrupt: nothing is copied back.
    """
    from . import distributed

    _validate(model, loader, epochs, lr, optimizer, weight_decay, momentum, loss_fn, after_step,
              on_epoch_end, eval_loader, scheduler, grad_clip, seed, amp)
    req = distributed.current()
    if processes is None:
        processes = req.processes if req is not None else 1
    if launcher is None:
        launcher = req.launcher if req is not None else "none"
    dev = model_device(model) if device is None else resolve_device(device)
    distributed.check_request(processes, launcher, dev)
    several = processes > 1 or launcher != "none"
    if several and processes > 1:
        why = distributed.unshardable(loader)
        if why:
            raise BadInput(why)
    if model_device(model) != dev and not (several and dev.type == "cuda"):
        model.to(dev)       # (several processes on CUDA: each worker moves it to its own GPU)

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
    if isinstance(scheduler, str) and steps_per_epoch is None:
        raise BadInput("scheduler='cosine' needs a loader with a length (len(loader))")
    run = _Run(model, opt, opt_params, trained, params_subset, epochs, loss_fn, after_step,
               on_epoch_end, eval_loader, scheduler, grad_clip, seed, amp, progress, desc)
    if several:
        records = _fit_workers(run, loader, processes, launcher, dev, list(carry))
        if req is not None:
            req.runs.append(distributed.describe_run(processes, launcher, dev,
                                                     distributed.batch_size_of(loader),
                                                     run.uses_ddp))
        return records
    return run.epochs_on(model, loader, dev)


class _Run:
    """One training run's settings, and its epochs on one process (the worker's or the
    kernel's): :func:`fit` on one process is ``epochs_on(model, loader, device)``."""

    def __init__(self, model, opt, opt_params, trained, params_subset, epochs, loss_fn,
                 after_step, on_epoch_end, eval_loader, scheduler, grad_clip, seed, amp,
                 progress, desc):
        self.model, self.opt, self.opt_params, self.trained = model, opt, opt_params, trained
        self.params_subset, self.epochs, self.loss_fn = params_subset, epochs, loss_fn
        self.after_step, self.on_epoch_end, self.eval_loader = after_step, on_epoch_end, eval_loader
        self.scheduler, self.grad_clip, self.seed, self.amp = scheduler, grad_clip, seed, amp
        self.progress, self.desc = progress, desc

    @property
    def uses_ddp(self) -> bool:
        """DistributedDataParallel can sync the gradients only when the loss is the model's own
        forward and every trained parameter is the model's."""
        own = {id(p) for p in self.model.parameters()}
        return self.loss_fn is None and all(id(p) in own for p in self.opt_params)

    def _scheduler(self, steps_per_epoch):
        scheduler, opt = self.scheduler, self.opt
        total_steps = steps_per_epoch * self.epochs if steps_per_epoch is not None else None
        if scheduler is None:
            return None
        if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            return scheduler
        if isinstance(scheduler, str):
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        return scheduler(opt, total_steps)

    def epochs_on(self, model: nn.Module, loader: DataLoader, dev: torch.device, *,
                  fwd: nn.Module | None = None, sync: Callable[[], None] | None = None,
                  rank: int = 0, world: int = 1,
                  tick: Callable[[int], None] | None = None) -> list[dict]:
        """The epochs. ``fwd``: what the default loss runs the batch through (a DDP wrapper of
        ``model``); ``sync()``: after each backward (gradients averaged over the workers);
        ``rank`` / ``world``: this worker of how many (rank 0 evaluates, keeps the records and
        decides an early stop for all); ``tick(steps)``: after each step, the steps done so far
        (a worker tells the kernel's progress bar; it shows none itself)."""
        import torch.distributed as dist

        fwd = model if fwd is None else fwd
        opt, opt_params, loss_fn, after_step = self.opt, self.opt_params, self.loss_fn, self.after_step
        grad_clip, epochs, desc = self.grad_clip, self.epochs, self.desc
        progress = self.progress and tick is None
        done = 0
        steps_per_epoch = _loader_len(loader)
        sched = self._scheduler(steps_per_epoch)
        sampler = getattr(loader, "sampler", None)
        autocast, scaler = _amp_setup(self.amp, dev)
        history: list[dict] = []
        was_training = model.training
        bar = None
        seed = None if self.seed is None else int(self.seed) + rank
        try:
            # training works even when called under torch.no_grad() / inference_mode() (a notebook
            # cell inside a `with torch.no_grad():` block, an evaluation helper)
            with _seed_scope(seed, dev), torch.inference_mode(False), torch.enable_grad():
                for epoch in range(1, epochs + 1):
                    if hasattr(sampler, "set_epoch"):
                        sampler.set_epoch(epoch)
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
                                    scores = logits_of(_first_forward(fwd, x, "the training loader"))
                                    check_targets(scores, x, y, "the training loader's labels")
                                else:
                                    scores = logits_of(forward_batch(fwd, x))
                                loss = task_loss(scores, x, y)
                            else:
                                loss = loss_fn(model, batch)
                        if n_steps == 0:
                            _check_loss(loss)
                        opt.zero_grad(set_to_none=True)
                        if self.params_subset:   # grads of parameters not trained must not pile up
                            model.zero_grad(set_to_none=True)
                        if scaler is not None:
                            scaler.scale(loss).backward()
                            if sync is not None:
                                sync()
                            if grad_clip is not None:
                                scaler.unscale_(opt)
                                torch.nn.utils.clip_grad_norm_(opt_params, grad_clip)
                            scaler.step(opt)
                            scaler.update()
                        else:
                            loss.backward()
                            if sync is not None:
                                sync()
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
                        if tick is not None:
                            done += 1
                            tick(done)
                        if progress and n_steps % _POSTFIX_EVERY == 0:
                            bar.set_postfix(loss=f"{loss_sum.item() / n_steps:.4f}", refresh=False)
                    if n_steps == 0:
                        raise BadInput("the training loader yielded no batches")
                    mean_loss = loss_sum.item() / n_steps
                    if world > 1:       # the epoch's loss over every worker's steps
                        both = torch.tensor([loss_sum.item(), float(n_steps)], dtype=torch.float64)
                        dist.all_reduce(both)
                        mean_loss = float(both[0] / both[1])
                    seconds = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    bar.close()
                    record = {"epoch": epoch, "loss": mean_loss, "seconds": seconds,
                              "lr": float(opt.param_groups[0]["lr"])}
                    stop = False
                    if rank == 0:
                        if self.eval_loader is not None:
                            record.update(eval_record(model, self.eval_loader, device=dev))
                        history.append(record)
                        stop = self.on_epoch_end is not None and \
                            self.on_epoch_end(epoch, record) is True
                    if world > 1:       # rank 0's early stop holds for every worker
                        flag = torch.tensor([1 if stop else 0])
                        dist.broadcast(flag, 0)
                        stop = bool(flag.item())
                    if stop:
                        break
        finally:
            if bar is not None:
                bar.close()
            if self.params_subset:
                for p in model.parameters():
                    if id(p) not in self.trained:
                        p.grad = None
            model.train(was_training)
        return history


def _fit_workers(run: _Run, loader: DataLoader, processes: int, launcher: str,
                 dev: torch.device, carry: list) -> list[dict]:
    """:func:`fit` on ``processes`` forked workers (see :mod:`nbcompress.distributed`)."""
    from . import distributed

    model = run.model
    tensors, seen = [], set()
    for t in [*model.parameters(), *model.buffers(), *run.opt_params, *carry]:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            tensors.append(t)
    use_ddp = run.uses_ddp

    def work(rank: int, world: int):
        from torch.nn.parallel import DistributedDataParallel

        wdev = torch.device("cuda", rank) if dev.type == "cuda" else dev
        if model_device(model) != wdev:
            model.to(wdev)
        part = loader if world == 1 else distributed.shard_loader(loader, rank, world,
                                                                   run.seed or 0)
        fwd, sync = model, None
        if use_ddp:
            # static_graph: parameters the forward never uses (an unused head) are allowed,
            # without find_unused_parameters' traversal of the graph at every step
            fwd = DistributedDataParallel(model, device_ids=[rank] if wdev.type == "cuda" else None,
                                          static_graph=True)
        else:
            params = run.opt_params
            sync = lambda: distributed.average_gradients(params, world)  # noqa: E731

        def tick(done: int) -> None:
            if rank == 0:
                steps[0] = done

        records = run.epochs_on(model, part, wdev, fwd=fwd, sync=sync, rank=rank, world=world,
                                tick=tick)
        if rank != 0:
            return None
        return {"records": records, "tensors": [t.detach().cpu() for t in tensors]}

    steps = torch.zeros(1, dtype=torch.int64).share_memory_()   # rank 0's steps, for the bar
    total = run.epochs * (distributed.steps_hint(loader, processes) if processes > 1
                          else _loader_len(loader))
    with distributed.progress_bar(steps, total, f"{run.desc} ({processes} process"
                                  f"{'es' if processes != 1 else ''})", run.progress):
        out = distributed.launch(work, processes, launcher, dev)
    with torch.no_grad():
        for t, v in zip(tensors, out["tensors"]):
            t.copy_(v.to(t.device))
    return out["records"]


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise BadInput(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise BadInput(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise BadInput("the loss does not depend on any trainable parameter (no grad); was it "
                       "computed under torch.no_grad, or are all parameters frozen?")
