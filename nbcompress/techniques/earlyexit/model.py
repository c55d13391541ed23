"""The early-exit model: a chain of blocks with small classifier heads after some of them.

At inference each sample leaves at the first exit whose top softmax probability reaches the
threshold; only the samples that stay go on through the rest of the network, so an easy input
costs a few layers and a hard one the whole network.

FLOPs are honest: an :class:`EarlyExitModel` tells :func:`nbcompress.measure` (through
``nbc_flops``) the FLOPs of the example input's forward as the evaluation data takes it: the cost
of each path (up to an exit, heads on the way included; or the whole network and every head),
counted on the example input as the network's own FLOPs are, weighted by the share of samples
that left at each exit in the real batched early-exit run: the same basis as the dense count of
the network before.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...counting import flop_mode

__all__ = ["EarlyExitModel", "DEFAULT_THRESHOLD", "confidence", "first_confident"]

DEFAULT_THRESHOLD = 0.95


def confidence(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample, the top softmax probability of its scores: ``(N, classes)`` class scores, or
    for ``(N, seq, vocab)`` token scores the least confident token's (positions ``mask`` drops,
    where given and ``(N, seq)``, do not count): a sequence leaves an exit only when every one of
    its tokens would."""
    p = torch.softmax(logits.float(), dim=-1 if logits.dim() == 3 else 1).amax(
        dim=-1 if logits.dim() == 3 else 1)
    if p.dim() == 1:
        return p
    if mask is not None and tuple(mask.shape) == tuple(p.shape):
        p = p.masked_fill(~mask.to(p.device).bool(), 1.0)
    return p.reshape(p.shape[0], -1).amin(dim=1)


def call_batch(args: tuple, kwargs: dict) -> Any:
    """The one batch a forward was called with, as an exit forward reads it: its single
    positional argument, or its keyword inputs as a mapping (labels left out: exits score the
    inputs); None when it was called with several positional arguments or with both kinds."""
    x = kwargs if not args else (args[0] if len(args) == 1 and not kwargs else None)
    if isinstance(x, Mapping):
        x = {k: v for k, v in x.items() if k not in ("labels", "label")}
    return x


def first_confident(outs: Sequence[torch.Tensor], threshold: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The rule an early-exit forward follows, computed from every exit's scores (``outs``, the
    final output last): per sample, the scores of the first exit whose :func:`confidence`
    (token scores: over the positions ``mask`` keeps) reaches ``threshold``, else the final
    output's."""
    result = outs[-1]
    for logits in reversed(outs[:-1]):
        take = (confidence(logits, mask) >= threshold).reshape((-1,) + (1,) * (logits.dim() - 1))
        result = torch.where(take, logits.to(result.dtype), result)
    return result


class EarlyExitModel(nn.Module):
    """A chain of blocks (``backbone``, an ``nn.Sequential``) with classifier ``heads`` after some
    of them.

    - ``exit_after[k]``: index in ``backbone`` of the block head ``k`` reads (the exit sits after
      it); ``exit_names[k]``: that block's name in the original model.
    - ``threshold``: a sample leaves at the first exit whose max softmax probability is
      ``>= threshold``; samples that leave are removed from the running batch.
    - ``exit_counts``: samples that left at each exit (the last entry: the final output), counted
      over every eval-mode forward since :meth:`reset_exit_counts`.

    In training mode the whole backbone runs and the final output is returned (for ordinary
    fine-tuning of the backbone); :meth:`forward_all` gives every exit's output.
    """

    def __init__(self, backbone: nn.Sequential | None = None, heads: nn.ModuleList | None = None,
                 exit_after: Sequence[int] = (), threshold: float = DEFAULT_THRESHOLD,
                 exit_names: Sequence[str] = (), block_names: Sequence[str] = (),
                 num_classes: int = 0):
        super().__init__()
        self.backbone = backbone if backbone is not None else nn.Sequential()
        self.heads = heads if heads is not None else nn.ModuleList()
        self.exit_after = tuple(int(i) for i in exit_after)
        self.threshold = float(threshold)
        self.exit_names = tuple(str(n) for n in exit_names)
        self.block_names = tuple(str(n) for n in block_names)
        self.num_classes = int(num_classes)
        self.exit_counts = (0,) * (len(self.exit_after) + 1)

    # ---------------------------------------------------------------------- structure
    @property
    def exit_labels(self) -> tuple[str, ...]:
        """``"after <name>"`` for each exit, then ``"final"``."""
        return tuple(f"after {n}" for n in self.exit_names) + ("final",)

    def segments(self) -> list[tuple[int, int]]:
        """``[start, stop)`` block ranges: one per exit, then the rest up to the final output."""
        bounds, start = [], 0
        for i in self.exit_after:
            bounds.append((start, i + 1))
            start = i + 1
        bounds.append((start, self._n_blocks()))
        return bounds

    def _n_blocks(self) -> int:
        """How many blocks the exits are placed among (``exit_after`` indexes them)."""
        return len(self.backbone)

    def _run(self, blocks: list, h: Any, seg: tuple[int, int]) -> Any:
        for i in range(*seg):
            h = blocks[i](h)
        return h

    def reset_exit_counts(self) -> None:
        self.exit_counts = (0,) * (len(self.exit_after) + 1)

    def exit_shares(self) -> dict[str, float]:
        """Fraction of samples that left at each exit since the last reset (empty if none)."""
        n = sum(self.exit_counts)
        return {k: c / n for k, c in zip(self.exit_labels, self.exit_counts)} if n else {}

    # ---------------------------------------------------------------------- forward
    def exit_features(self, x: Any) -> tuple[list[Any], torch.Tensor]:
        """(what each head reads, the final output's scores) of one backbone pass."""
        feats, h = [], x
        for i, m in enumerate(self.backbone):
            h = m(h)
            if i in self.exit_after:
                feats.append(h)
        return feats, h

    def forward_all(self, x: Any) -> list[torch.Tensor]:
        """Every exit's class scores for every sample, then the final output's."""
        feats, final = self.exit_features(x)
        return [hd(f) for hd, f in zip(self.heads, feats)] + [final]

    def token_mask(self, x: Any) -> torch.Tensor | None:
        """The ``(N, seq)`` mask of the positions that count in token scores (None: all)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self.backbone)
        segs = self.segments()
        if self.training or not len(self.heads) or not isinstance(x, torch.Tensor) or not len(x):
            return self._run(blocks, x, (0, len(blocks)))
        n = x.shape[0]
        counts = list(self.exit_counts)
        out = None
        idx = None          # positions (in the input batch) of the samples still running
        h = x
        for k, seg in enumerate(segs[:-1]):
            h = self._run(blocks, h, seg)
            logits = self.heads[k](h)
            if out is None:
                out = logits.new_empty((n,) + tuple(logits.shape[1:]))
            done = confidence(logits) >= self.threshold
            n_done = int(done.sum())
            if n_done:
                rows = done.nonzero().squeeze(1)
                out[rows if idx is None else idx[rows]] = logits[rows].to(out.dtype)
                counts[k] += n_done
            if n_done == len(done):
                self.exit_counts = tuple(counts)
                return out
            if n_done:
                stay = (~done).nonzero().squeeze(1)
                idx = stay if idx is None else idx[stay]
                h = h[stay]
        final = self._run(blocks, h, segs[-1])
        counts[-1] += final.shape[0]
        self.exit_counts = tuple(counts)
        if idx is None:
            return final
        out[idx] = final.to(out.dtype)
        return out

    # ---------------------------------------------------------------------- costs
    def keep_exits(self, keep: Sequence[int]) -> "EarlyExitModel":
        """A model with only the exits ``keep`` (indices into ``heads``), sharing this one's
        backbone and heads (its threshold, names and classes as here)."""
        keep = sorted(int(k) for k in keep)
        out = type(self)(self.backbone, nn.ModuleList(self.heads[k] for k in keep),
                         [self.exit_after[k] for k in keep], self.threshold,
                         [self.exit_names[k] for k in keep], self.block_names,
                         self.num_classes, **self._extra())
        out.train(self.training)
        return out

    def _extra(self) -> dict:
        """Constructor arguments a subclass adds (see :meth:`keep_exits`)."""
        return {}

    def segment_flops(self, example_input: torch.Tensor) -> tuple[list[int], list[int], int]:
        """``(backbone, heads, full)``: FLOPs (``torch.utils.flop_counter``) of one forward of
        ``example_input`` through the backbone up to each exit's block, of each head on its own,
        and of the whole backbone."""
        blocks = list(self.backbone)
        cum, backbone, heads, h = 0, [], [], example_input
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                for k, seg in enumerate(self.segments()):
                    with flop_mode() as c:
                        h = self._run(blocks, h, seg)
                    cum += c.get_total_flops()
                    if k < len(self.heads):
                        backbone.append(int(cum))
                        with flop_mode() as c:
                            self.heads[k](h)
                        heads.append(int(c.get_total_flops()))
        finally:
            self.train(was)
        return backbone, heads, int(cum)

    def path_flops(self, example_input: torch.Tensor) -> list[int]:
        """FLOPs (``torch.utils.flop_counter``) of one forward of ``example_input`` for a batch
        that leaves at exit ``k`` (heads before it included), and last for one that runs to the
        final output (every head on the way included)."""
        backbone, heads, full = self.segment_flops(example_input)
        return [b + sum(heads[:k + 1]) for k, b in enumerate(backbone)] + [full + sum(heads)]

    def nbc_flops(self, example_input: Any, evaluator: Any):
        """The metrics hook (see :func:`nbcompress.metrics.measure`): the FLOPs of the example
        input's forward as the evaluator's samples take it: each path's count on the example input
        (the backbone up to an exit and the heads on the way, or the whole network and every head;
        :meth:`path_flops`, counted as the network's own FLOPs are), weighted by the share of
        samples that left at each exit in the real batched early-exit run over the evaluator's data.
        The same basis as the network's count before (a cost a forward pays once, like a weight
        product a model computes per call, counts once as it does there); details: the shares.
        ``None`` when the evaluator is not a DataLoader (then the example input's own forward is
        counted)."""
        from ...batches import batch_size, forward_batch
        from ...train import split_batch, to_device

        if not isinstance(evaluator, DataLoader) or batch_size(example_input) is None:
            return None
        dev = next((t.device for t in self.parameters()), torch.device("cpu"))
        was, saved = self.training, self.exit_counts
        self.eval()
        self.reset_exit_counts()
        n = 0
        try:
            with torch.no_grad():
                for batch in evaluator:
                    x, _ = split_batch(batch)
                    x = to_device(x, dev)
                    forward_batch(self, x)
                    n += batch_size(x)
            counts = self.exit_counts
        finally:
            self.exit_counts = saved
            self.train(was)
        if not n:
            return None
        counts = list(counts)
        counts[-1] += n - sum(counts)     # (no heads: the forward counts nothing; all went on)
        paths = self.path_flops(to_device(example_input, dev))
        details = {f"share {k}": cnt / n for k, cnt in zip(self.exit_labels, counts)}
        return int(round(sum(c * p for c, p in zip(counts, paths)) / n)), details

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}, exits={list(self.exit_names)}"
