"""Training the exit heads: distilled from the network's own final output with the backbone frozen
(each head's pooled input cached once when it fits in memory), or jointly with the backbone."""
from __future__ import annotations

import copy
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ...core import StepContext
from ...errors import FieldError
from .model import EarlyExitModel

__all__ = ["train_heads", "CACHE_BYTES"]

CACHE_BYTES = 1 << 30      # largest cache of pooled head inputs kept for frozen-backbone training


def train_heads(cfg, ee: EarlyExitModel, ctx: StepContext) -> list[dict]:
    """Train ``ee``'s heads (and with ``cfg.joint`` its backbone) as ``cfg`` (an
    :class:`EarlyExitConfig`) says; the per-epoch records of :func:`nbcompress.fit`."""
    from ...batches import forward_batch, logits_of
    from ...train import fit, split_batch
    from ..distill.losses import distillation_loss, token_distillation_loss

    alpha, T = float(cfg.alpha), float(cfg.T)

    def kd(o, teacher, y, x, a=alpha):
        """distillation's own loss: ``a`` x the soft targets + (1 - a) x the labels' loss
        (per token for token scores)."""
        if o.dim() == 3:
            return token_distillation_loss(o, teacher, x, y, T, a)
        return distillation_loss(o, teacher, y, T, a, teacher_is_probs=False)

    def head_loss(outs, teacher, y, x=None):
        return sum(kd(o, teacher, y, x) for o in outs)

    if not cfg.joint:
        backbone = ee.backbone
        wanted = [(p, p.requires_grad) for p in backbone.parameters()]
        backbone.requires_grad_(False)
        try:
            cached = None if getattr(ee, "tokens", False) else \
                _cached_features(ee, cfg.data, ctx.device, ctx.progress)
            if cached is not None:
                # the heads' parameter-free front (pooling) ran once; train only the rest
                tails = nn.ModuleList(hd[_front_len(hd):] for hd in ee.heads)
                E = len(tails)

                def cached_loss(tails, batch):
                    y = batch[E + 1] if len(batch) > E + 1 else None
                    return head_loss([t(f) for t, f in zip(tails, batch[:E])], batch[E], y)

                g = torch.Generator()
                g.manual_seed(cfg.seed)
                loader = DataLoader(cached, batch_size=cfg.data.batch_size or 64,
                                    shuffle=True, generator=g)
                return fit(tails, loader, epochs=cfg.epochs, lr=cfg.lr,
                           loss_fn=cached_loss, device=ctx.device, progress=ctx.progress,
                           desc="exit heads", seed=cfg.seed, scheduler="cosine")

            def frozen_loss(heads, batch):
                x, y = split_batch(batch)
                backbone.eval()      # frozen: BatchNorm statistics stay as they are
                with torch.no_grad():
                    feats, h = ee.exit_features(x)
                return head_loss([hd(f) for hd, f in zip(heads, feats)], h, y, x)

            return fit(ee.heads, cfg.data, epochs=cfg.epochs, lr=cfg.lr,
                       loss_fn=frozen_loss, device=ctx.device, progress=ctx.progress,
                       desc="exit heads", seed=cfg.seed, scheduler="cosine")
        finally:
            for p, r in wanted:
                p.requires_grad_(r)
            backbone.eval()

    teacher = copy.deepcopy(ee.backbone).eval().requires_grad_(False)

    def joint_loss(model, batch):
        x, y = split_batch(batch)
        with torch.no_grad():
            t = logits_of(forward_batch(teacher, x))
        outs = model.forward_all(x)
        final = outs[-1]
        # labelled: the labels' loss; unlabelled: the final output keeps to the original's
        own = kd(final, t, y, x, 0.0 if y is not None else 1.0)
        return own + head_loss(outs[:-1], t, y, x)

    return fit(ee, cfg.data, epochs=cfg.epochs, lr=cfg.lr, loss_fn=joint_loss,
               device=ctx.device, progress=ctx.progress, desc="early exits (joint)",
               seed=cfg.seed, scheduler="cosine")


def _front_len(head: nn.Sequential) -> int:
    """How many of a head's first layers hold no parameters (pooling, flatten)."""
    for i, m in enumerate(head):
        if any(True for _ in m.parameters()):
            return i
    return len(head)


def _cached_features(ee: EarlyExitModel, loader: DataLoader, device, progress: bool):
    """One pass of the frozen backbone over ``loader``: a TensorDataset (on the CPU) of each head's
    pooled input, the final output (the distillation target) and the labels if any; ``None`` when
    that would take more than ``CACHE_BYTES`` (then the backbone runs every epoch)."""
    from tqdm.auto import tqdm

    from ...train import split_batch, to_device

    fronts = [hd[:_front_len(hd)] for hd in ee.heads]
    cols: list[list[torch.Tensor]] = [[] for _ in range(len(fronts) + 2)]
    labelled = None
    try:
        n_batches = len(loader)
    except TypeError:
        return None
    ee.eval()
    with torch.no_grad(), tqdm(total=n_batches, desc="exit features", disable=not progress,
                               leave=False) as bar:
        for b, batch in enumerate(loader):
            x, y = split_batch(to_device(batch, device))
            feats, h = ee.exit_features(x)
            row = [f(t).float().cpu() for f, t in zip(fronts, feats)] + [h.float().cpu()]
            if labelled is None:
                labelled = y is not None
                per_batch = sum(t.numel() * t.element_size() for t in row)
                if per_batch * n_batches > CACHE_BYTES:
                    return None
            if labelled != (y is not None):
                raise FieldError("{data} yields labels in some batches and not in others")
            for c, t in zip(cols, row):
                c.append(t)
            if labelled:
                cols[-1].append(y.cpu())
            bar.update(1)
    if labelled is None:
        raise FieldError("{data} yielded no batches")
    return TensorDataset(*(torch.cat(c) for c in (cols if labelled else cols[:-1])))
