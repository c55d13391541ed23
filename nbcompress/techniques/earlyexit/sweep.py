"""The threshold sweep: every exit's output for every sample from one pass, and what the early-exit
forward decides (accuracy, average FLOPs, share per exit) at any threshold without rerunning it;
the step's per-exit table, sweep table, plot and notes."""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader

from ...core import CompressionResult, StepContext
from ...errors import BadInput
from ...options import is_number
from .blocks import _head_text
from .model import EarlyExitModel, confidence

__all__ = ["threshold_sweep", "SWEEP_THRESHOLDS", "describe_exits"]

SWEEP_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)


def _check_thresholds(grid: Sequence[Any]) -> None:
    for p in grid:
        if not is_number(p) or not 0 < float(p) <= 1:
            raise BadInput(f"each of the thresholds must be a probability in (0, 1], got {p!r}")


class _Sweep:
    """Every exit's output for every sample of a loader (one pass), and the FLOPs of each path:
    what the early-exit forward decides at any threshold, without rerunning it."""

    def __init__(self, ee: EarlyExitModel, loader: DataLoader, device=None):
        from ...batches import head
        from ...train import split_batch, to_device

        if device is None:
            device = next((t.device for t in ee.parameters()), torch.device("cpu"))
        self.ee = ee
        was = ee.training
        ee.eval()
        parts: list[tuple] = []
        labelled = 0
        first = None
        try:
            with torch.no_grad():
                for batch in loader:
                    x, y = split_batch(batch)
                    x = to_device(x, device)
                    if first is None:
                        first = head(x, 1)
                    parts.append(_per_sample(ee.forward_all(x), x, y, ee.token_mask(x)))
                    labelled += y is not None
                if first is None:
                    raise BadInput("the loader yielded no batches")
                self.backbone_flops, self.head_flops, full = ee.segment_flops(first)
                self.cum = [b + sum(self.head_flops[:k + 1])
                            for k, b in enumerate(self.backbone_flops)] + \
                    [full + sum(self.head_flops)]
                self.full_flops = int(full) or 1
        finally:
            ee.train(was)
        self.conf = torch.cat([p[0] for p in parts], dim=1)                        # (E, N)
        self.same = torch.cat([p[1] for p in parts], dim=1)                        # (E+1, N)
        self.right = torch.cat([p[2] for p in parts], dim=1) \
            if labelled == len(parts) else None                                    # (E+1, N)
        self.n = self.same.shape[1]
        self.alone = [float(r.mean()) for r in self.right] if self.right is not None else \
            [float("nan")] * len(self.same)

    def exits_at(self, threshold: float) -> torch.Tensor:
        """Index of the exit each sample takes (len(exits) = the final output)."""
        leave = torch.cat([self.conf >= threshold, torch.ones(1, self.n, dtype=torch.bool)])
        return leave.float().argmax(dim=0)

    def table(self, thresholds: Sequence[float] | None = None) -> pd.DataFrame:
        given = list(thresholds or SWEEP_THRESHOLDS)
        _check_thresholds(given)
        if not 0 < self.ee.threshold <= 1:
            raise BadInput(f"the model's threshold must be a probability in (0, 1], got "
                           f"{self.ee.threshold:g}")
        grid = sorted({float(t) for t in given} | {float(self.ee.threshold)})
        cost = torch.tensor(self.cum, dtype=torch.float64)
        rows = []
        for t in grid:
            where = self.exits_at(t)
            ar = torch.arange(self.n)
            avg = float(cost[where].mean())
            row = {"threshold": t,
                   "accuracy": float(self.right[where, ar].mean()) if self.right is not None
                   else float("nan"),
                   "agreement": float(self.same[where, ar].mean()),
                   "avg_flops": avg,
                   "flops_fraction": avg / self.full_flops}
            for k, label in enumerate(self.ee.exit_labels):
                row[f"share {label}"] = float((where == k).float().mean())
            row["current"] = t == float(self.ee.threshold)
            rows.append(row)
        return pd.DataFrame(rows)


    def subsets(self, thresholds: Sequence[float] | None = None,
                max_exhaustive: int = 10) -> pd.DataFrame:
        """Every subset of the exits (all of them up to ``max_exhaustive`` exits, else those of
        at most three) at every threshold, as if the model had only those heads: ``exits``
        (indices into the heads), ``threshold``, ``accuracy``, ``avg_flops`` (per sample, the
        kept heads included), ``flops_fraction`` (of the network without exits). The empty
        subset is the network alone."""
        import itertools

        grid = sorted({float(t) for t in (thresholds or SWEEP_THRESHOLDS)})
        _check_thresholds(grid)
        if self.right is None:
            raise BadInput("choosing exits needs labelled evaluation data")
        E = len(self.head_flops)
        sizes = range(E + 1) if E <= max_exhaustive else range(min(E, 3) + 1)
        subsets = [c for r in sizes for c in itertools.combinations(range(E), r)]
        right, same = self.right, self.same                                    # (E+1, N)
        ar = torch.arange(self.n)
        rows = []
        for t in grid:
            leave = self.conf >= t                                             # (E, N)
            for S in subsets:
                if not S and t != grid[0]:
                    continue                   # the network alone: once
                heads = [self.head_flops[k] for k in S]
                cost = torch.tensor([self.backbone_flops[k] + sum(heads[:j + 1])
                                     for j, k in enumerate(S)] + [self.full_flops + sum(heads)],
                                    dtype=torch.float64)
                if S:
                    first = torch.cat([leave[list(S)], torch.ones(1, self.n, dtype=torch.bool)]
                                      ).float().argmax(dim=0)
                else:
                    first = torch.zeros(self.n, dtype=torch.long)
                where = torch.tensor(list(S) + [E])[first]
                avg = float(cost[first].mean())
                rows.append({"exits": S, "threshold": t,
                             "accuracy": float(right[where, ar].mean()),
                             "agreement": float(same[where, ar].mean()), "avg_flops": avg,
                             "flops_fraction": avg / self.full_flops})
        return pd.DataFrame(rows)


def _per_sample(outs: list[torch.Tensor], x: Any, y: Any, mask: torch.Tensor | None):
    """``(confidence (E, n), agreement with the final output (E+1, n), correct (E+1, n) or
    None)`` of one batch's outputs per sample. Class scores: 0 / 1; token scores: the share of a
    sample's tokens (those ``mask`` keeps; with labels, those not ignored, lined up as
    :mod:`nbcompress.tokens` says), and its least confident token's confidence."""
    from ...tokens import IGNORE_INDEX, aligned, is_token_task

    outs = [o.float() for o in outs]
    conf = torch.stack([confidence(o, mask).cpu() for o in outs[:-1]]) if len(outs) > 1 \
        else torch.zeros(0, outs[-1].shape[0])
    if outs[-1].dim() == 3:
        preds = [o.argmax(dim=-1) for o in outs]
        keep = torch.ones_like(preds[-1], dtype=torch.bool) if mask is None or \
            tuple(mask.shape) != tuple(preds[-1].shape) else mask.to(preds[-1].device).bool()
        n_keep = keep.sum(1).clamp_min(1)
        same = torch.stack([((p == preds[-1]) & keep).sum(1) / n_keep for p in preds]).cpu()
        right = None
        if isinstance(y, torch.Tensor) and is_token_task(outs[-1], x, y):
            cols = []
            for o in outs:
                s, t, _ = aligned(o, x, y.to(o.device))
                ok = t != IGNORE_INDEX
                cols.append(((s.argmax(dim=-1) == t) & ok).sum(1) / ok.sum(1).clamp_min(1))
            right = torch.stack(cols).cpu()
        return conf, same.float(), right
    preds = torch.stack([o.argmax(dim=1) for o in outs]).cpu()                  # (E+1, n)
    same = (preds == preds[-1]).float()
    right = None
    if isinstance(y, torch.Tensor):
        y = y.cpu()
        right = (preds == (y.argmax(dim=1) if y.dim() == 2 else y)).float()
    return conf, same, right


def exit_choices(sw: "_Sweep", thresholds: Sequence[float] | None = None) -> pd.DataFrame:
    """Every choice of exits x threshold (:meth:`_Sweep.subsets`) sorted by FLOPs, with a
    ``label`` and ``pareto`` (no other choice is at least as accurate for fewer FLOPs)."""
    df = sw.subsets(thresholds)
    df["label"] = [exits_label(sw.ee, S, t) for S, t in zip(df["exits"], df["threshold"])]
    return pareto_front(df)


def pareto_front(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` sorted by ``flops_fraction`` (the more accurate first on a tie) and re-indexed, with
    ``pareto``: no other row is at least as accurate for fewer FLOPs."""
    df = df.sort_values(["flops_fraction", "accuracy"], ascending=[True, False])
    best, pareto = -1.0, []
    for acc in df["accuracy"]:
        pareto.append(bool(acc > best))
        best = max(best, acc)
    df["pareto"] = pareto
    return df.reset_index(drop=True)


def pick_exits(table: pd.DataFrame, budget: float, column: str = "flops_fraction") -> int:
    """Index of the choice of exits within ``budget`` (of ``column``: a fraction of the network's
    FLOPs, or ``latency_fraction``) whose predictions agree most with the full network's, then
    the most accurate, then the cheaper; :class:`BadInput` naming the cheapest when none fits
    (rows without a value in ``column`` are not candidates).

    Why agreement first: the heads learn to imitate the full network, and on a few hundred
    evaluation samples the accuracies of the cheap choices tie or differ by a sample or two, so
    "the most accurate" picks the cheapest of a noisy tie, and that one loses accuracy on new
    data (on the part-6 benchmark, 3 seeds: -0.93 / -0.53 pts on the test digits for a VGG /
    ResNet-18 against -0.27 / -0.07 for agreement first). Agreement is a paired count of the
    samples the choice changes, far less noisy."""
    known = table[table[column].notna()]
    fits = known[known[column] <= budget + 1e-9]
    if fits.empty:
        c = known.loc[known[column].idxmin()]
        what = "FLOPs" if column == "flops_fraction" else "latency"
        raise BadInput(f"no choice of exits and threshold fits {budget:.1%} of the {what} on the "
                       f"evaluation data: the cheapest ({c['label']}) spends "
                       f"{c[column]:.1%}")
    return int(fits.sort_values(["agreement", "accuracy", column],
                                ascending=[False, False, True]).index[0])


def choose_exits(sw: "_Sweep", flops: float, thresholds: Sequence[float] | None = None
                 ) -> tuple[pd.Series, pd.DataFrame]:
    """The choice of exits and threshold :func:`pick_exits` makes within ``flops``, and the table
    of every choice (:func:`exit_choices`)."""
    table = exit_choices(sw, thresholds)
    return table.loc[pick_exits(table, flops)], table


def exits_label(ee: EarlyExitModel, S, threshold: float) -> str:
    if not len(S):
        return "no exit (the network alone)"
    return f"exits after {', '.join(ee.exit_names[k] for k in S)} at threshold {threshold:g}"


def threshold_sweep(ee: EarlyExitModel, loader: DataLoader,
                    thresholds: Sequence[float] | None = None, *, device=None) -> pd.DataFrame:
    """Accuracy and average FLOPs per sample as the threshold sweeps, from one pass over
    ``loader`` that computes every exit's output for every sample.

    Columns: ``threshold``, ``accuracy`` (NaN without labels), ``agreement`` (with the full
    network's prediction), ``avg_flops`` (per sample, heads included), ``flops_fraction`` (of the
    backbone alone, i.e. the network without exits), ``share <exit>`` per exit and ``current``
    (the model's own threshold, always in the grid).
    """
    return _Sweep(ee, loader, device).table(thresholds)



def _exit_rows(ee: EarlyExitModel, sw: _Sweep | None, cur=None) -> list[dict]:
    rows = []
    for k, label in enumerate(ee.exit_labels):
        head = ee.heads[k] if k < len(ee.heads) else None
        row = {"layer": ee.exit_names[k] if head is not None else "(final)",
               "exit": str(k + 1) if head is not None else "final",
               "head": _head_text(head) if head is not None else "the network's own output",
               "params": sum(p.numel() for p in head.parameters()) if head is not None else 0}
        if sw is not None:
            row["path_flops"] = sw.cum[k]
            row["share"] = float(cur[f"share {label}"])
            if sw.right is not None:
                row["accuracy_alone"] = sw.alone[k]
        rows.append(row)
    return rows



def describe_exits(ee: EarlyExitModel, ctx: StepContext, result: CompressionResult,
                   notes: list[str]) -> None:
    """Fill the step's per-exit table, the threshold sweep (table + plot) and the notes."""
    from ...metrics import is_loader

    if not is_loader(ctx.evaluator):
        result.notes += notes + ["no evaluation loader (--eval): no threshold sweep"]
        result.layers = _exit_rows(ee, None)
        return
    loader, where = ctx.evaluator, "eval data"
    sw = _Sweep(ee, loader, ctx.device)
    sweep = sw.table()
    cur = sweep[sweep["current"]].iloc[0]
    result.layers = _exit_rows(ee, sw, cur)
    shares = ", ".join(f"{100 * cur[f'share {k}']:.0f}% {k}" for k in ee.exit_labels)
    acc = "" if sw.right is None else \
        f"; accuracy {100 * cur['accuracy']:.2f}% (full network {100 * sw.alone[-1]:.2f}%)"
    notes.append(f"threshold {ee.threshold:g} on the {where}: {shares}; on average "
                 f"{cur['flops_fraction']:.0%} of the full network's FLOPs{acc}")
    result.notes += notes
    result.tables["threshold sweep"] = sweep
    from ...report.plots import sweep_plot_png

    result.figures["accuracy vs FLOPs"] = sweep_plot_png(
        sweep, full_accuracy=sw.alone[-1] if sw.right is not None else None,
        title=f"early exits: threshold sweep on the {where}")
    result.extra.update({"threshold": ee.threshold,
                         "avg_flops_per_sample": float(cur["avg_flops"]),
                         "flops_fraction": float(cur["flops_fraction"])})
