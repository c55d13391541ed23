"""What the pruning steps share: the importance object of a config, an example input, evaluation,
the fine-tune between rounds (pruned weights stay zero), BatchNorm recalibration."""
from __future__ import annotations

import torch
from torch import nn

from ...core import StepContext
from ...train import forward_batch as _forward
from ...batches import example_of, peek_batch
from ...metrics import is_loader
from .importance import Importance, get_importance
from .weights import _mask_hook

__all__ = ["recalibrate_bn"]


def _example_from_loader(loader) -> torch.Tensor | None:
    if not is_loader(loader):
        return None
    return example_of(peek_batch(loader))      # leaves a shuffled loader's order as it was


def _importance_for(cfg) -> Importance:
    spec = cfg.importance if cfg.importance is not None else cfg.importance_name
    return get_importance(spec, seed=cfg.seed)


def _example(cfg, ctx: StepContext):
    from ...train import to_device

    x = ctx.example_input
    if x is None:
        for src in (cfg.data, cfg.finetune, ctx.evaluator):
            x = _example_from_loader(src)
            if x is not None:
                break
    return to_device(x, ctx.device) if x is not None else None


def _evaluate(ctx: StepContext, model: nn.Module) -> float | None:
    if ctx.evaluator is None:
        return None
    return ctx.evaluate(model)


def _finetune(cfg, model: nn.Module, ctx: StepContext, masks, desc: str,
              round_no: int = 0, loss_fn=None) -> list[dict]:
    from ...train import fit

    return fit(model, cfg.finetune, epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer,
               device=ctx.device, progress=ctx.progress, desc=desc,
               after_step=_mask_hook(masks) if masks else None, scheduler=cfg.scheduler,
               seed=cfg.seed + round_no, loss_fn=loss_fn)


def _keep_schedule(keep_final: float, steps: int) -> list[float]:
    """Fraction kept after each of ``steps`` rounds: a geometric schedule (every round removes
    the same fraction of what is left), ending exactly at ``keep_final``."""
    return [keep_final ** ((k + 1) / steps) for k in range(steps)]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def recalibrate_bn(model: nn.Module, loader, device, batches: int = 8) -> bool:
    """Re-estimate BatchNorm running statistics on ``batches`` batches of ``loader`` (forward
    passes only, no training). After channels are removed, each layer sees inputs with fewer
    channels and the recorded statistics no longer fit: this is most of the one-shot accuracy
    loss of structured pruning, and it costs a few forward passes to undo. Returns whether there
    was any BatchNorm to recalibrate."""
    from ...train import split_batch, to_device

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    if not bns or not is_loader(loader):
        return False
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in bns}
    was = model.training
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None            # a cumulative average over the batches seen
        model.train()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= batches:
                    break
                x, _ = split_batch(to_device(batch, device))
                _forward(model, x)
                n += 1
    except BaseException:
        for m, (mom, mean, var) in saved.items():
            m.momentum = mom
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise
    finally:
        model.train(was)
    for m, (mom, mean, var) in saved.items():
        m.momentum = mom
        if n == 0:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return n > 0

