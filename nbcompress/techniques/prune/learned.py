"""Learned sparsity: sparse variational dropout (Molchanov, Ashukha & Vetrov, "Variational Dropout
Sparsifies Deep Neural Networks", ICML 2017).

Each weight ``theta`` gets a learned noise variance ``sigma^2`` (kept as ``log sigma^2``, one per
weight); ``alpha = sigma^2 / theta^2`` is its dropout rate. Training minimises the task loss plus
the KL term of the variational bound (the paper's approximation, eq. 14, divided by the number of
training samples so the task loss keeps its per-sample scale, and ramped in from 0 over the first
third of the steps), with the local reparameterisation trick: a layer's output is sampled as
``N(x theta, x^2 sigma^2)``. Weights whose ``log alpha`` grows above 3 carry only noise and are
dropped; with an ``amount`` the weights with the largest ``log alpha`` over all layers are
dropped instead, exactly that many. The layers stay the user's modules: the extra parameter and
the sampling forward are attached for the training and removed after it.

Supported layers: Linear (subclasses included), Conv1d/2d/3d and transformers' ``Conv1D``.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ...batches import forward_batch, split_batch
from ...layers import is_conv1d
from ...tokens import task_loss
from .criteria import Importance
from .importance import logits_of

__all__ = ["learnable", "learn_sparsity", "THRESHOLD"]

K1, K2, K3 = 0.63576, 1.87320, 1.48695
THRESHOLD = 3.0               # log alpha above this: the weight is noise (alpha > e^3 ~ 20)
_PARAM = "nbc_log_sigma2"


def learnable(m: nn.Module) -> bool:
    """Layers sparse variational dropout is attached to."""
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_conv1d(m)


def _apply(m: nn.Module, x: torch.Tensor, w: torch.Tensor, b):
    if is_conv1d(m):
        out = torch.addmm(b, x.reshape(-1, x.shape[-1]), w) if b is not None else \
            x.reshape(-1, x.shape[-1]) @ w
        return out.reshape(*x.shape[:-1], w.shape[-1])
    if isinstance(m, nn.Linear):
        return F.linear(x, w, b)
    return m._conv_forward(x, w, b)


def log_alpha(m: nn.Module) -> torch.Tensor:
    theta = m.weight
    return (getattr(m, _PARAM) - torch.log(theta * theta + 1e-8)).clamp(-10.0, 10.0)


def _forward(self, x):
    w = self.weight
    if not self.training:                  # evaluation: the weights that would be kept
        return _apply(self, x, w * (log_alpha(self) < THRESHOLD).to(w.dtype), self.bias)
    mu = _apply(self, x, w, self.bias)
    var = _apply(self, x * x, torch.exp(getattr(self, _PARAM)), None)
    return mu + torch.sqrt(var + 1e-8) * torch.randn_like(mu)


def _attach(mods: list[nn.Module]) -> list[nn.Parameter]:
    out = []
    for m in mods:
        w = m.weight.detach()
        p = nn.Parameter(torch.full_like(w, -10.0))           # the paper's initialisation
        m.register_parameter(_PARAM, p)
        m.forward = types.MethodType(_forward, m)
        out.append(p)
    return out


def _detach(mods: list[nn.Module]) -> None:
    for m in mods:
        if _PARAM in m._parameters:
            del m._parameters[_PARAM]
        m.__dict__.pop("forward", None)


def _kl(mods: list[nn.Module]) -> torch.Tensor:
    """The KL term (Molchanov et al. 2017, eq. 14), summed over every weight."""
    total = 0.0
    for m in mods:
        la = log_alpha(m)
        total = total + (K1 - K1 * torch.sigmoid(K2 + K3 * la)
                         + 0.5 * F.softplus(-la)).sum()
    return total


class LogAlphaImportance(Importance):
    """Scores from learned dropout rates: ``sigmoid(-log alpha)`` (high alpha: low score)."""

    name = "learned"

    def __init__(self, log_alphas: dict[str, torch.Tensor]):
        super().__init__()
        self.log_alphas = log_alphas
        self.scores = {k: torch.sigmoid(-v) for k, v in log_alphas.items()}

    def elementwise(self, module_name, module, param):
        s = self.scores.get(module_name)
        return None if s is None or param != "weight" else s


def _sparsities(targets) -> dict[str, float]:
    with torch.no_grad():
        return {n: float((log_alpha(m) >= THRESHOLD).float().mean()) for n, m in targets}


def learn_sparsity(cfg, model: nn.Module, ctx, targets: list[tuple[str, nn.Module]],
                   notes: list[str]) -> tuple[LogAlphaImportance, list[dict]]:
    """Train ``model`` with sparse variational dropout on ``cfg.finetune`` for
    ``cfg.learn_epochs``; returns an importance holding each weight's score (for
    ``prune_weights_`` when an amount is asked for) and the per-epoch table of each layer's
    learned sparsity (weights past the threshold). The noise parameters are gone after."""
    from ...train import fit

    mods = [m for _, m in targets]
    n = len(cfg.finetune.dataset) if hasattr(cfg.finetune, "dataset") and hasattr(
        cfg.finetune.dataset, "__len__") else len(cfg.finetune) * (cfg.finetune.batch_size or 1)
    ramp = max(1, (cfg.learn_epochs * len(cfg.finetune)) // 3)
    step = {"k": 0}
    table: list[dict] = []
    sigmas = _attach(mods)
    try:
        def loss_fn(mdl, batch):
            x, y = split_batch(batch)
            loss = task_loss(logits_of(forward_batch(mdl, x)), x, y)
            w = cfg.kl_weight * min(1.0, step["k"] / ramp)
            step["k"] += 1
            return loss + (w / n) * _kl(mods) if w > 0 else loss

        def on_epoch_end(epoch, record):
            table.append({"epoch": epoch, "loss": record.get("loss"), **_sparsities(targets)})

        ids = {id(p) for p in sigmas}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        fit(model, cfg.finetune, epochs=cfg.learn_epochs, lr=cfg.lr,
            params=[{"params": others}, {"params": sigmas, "lr": cfg.lr * 10}],
            loss_fn=loss_fn, device=ctx.device, progress=ctx.progress,
            desc="learn sparsity (variational dropout)", seed=cfg.seed, scheduler=None,
            on_epoch_end=on_epoch_end)
        with torch.no_grad():
            las = {name: log_alpha(m).detach() for name, m in targets}
    finally:
        _detach(mods)
    learned = sum(int((la >= THRESHOLD).sum()) for la in las.values())
    total = sum(la.numel() for la in las.values())
    notes.append(f"learned (sparse variational dropout, {cfg.learn_epochs} epoch(s), KL weight "
                 f"{cfg.kl_weight:g}): {learned / total:.1%} of {total:,} weights have "
                 f"log alpha >= {THRESHOLD:g}")
    return LogAlphaImportance(las), table
