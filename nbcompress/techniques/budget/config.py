"""The budget step: measure every configuration the model was trained for, keep those within the
FLOPs (or latency) budget, take the most accurate (the cheaper one on a tie) and switch the
model to it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
from torch import nn

from ...core import CompressionResult, StepConfig, StepContext
from ...errors import BadInput, FieldError
from ...options import option
from ..earlyexit.model import EarlyExitModel
from ..earlyexit.sweep import _Sweep, exit_choices, exits_label, pareto_front, pick_exits
from ..slim.config import _example, width_table
from ..slim.model import SlimmableNet

__all__ = ["BudgetConfig", "candidates", "pick"]


def candidates(model: nn.Module, ctx: StepContext, latency: bool = False) -> pd.DataFrame:
    """One row per configuration the model was trained for: ``setting`` (the width or the
    threshold), ``flops_fraction`` (of the full network), ``accuracy`` on the evaluator, and
    ``pareto`` (no other row is at least as accurate for fewer FLOPs). With ``latency``:
    ``latency_fraction``, the measured latency of a forward of the first evaluation batch over
    the full network's: every configuration of a slimmable network; for an early-exit model the
    choices on the FLOPs Pareto front and the network alone (NaN for the others)."""
    from ...metrics import is_loader

    if isinstance(model, SlimmableNet):
        t = width_table(model, ctx, _example(ctx))
        if t is None:
            raise BadInput("%budget needs an evaluation loader (--eval) to measure each width")
        df = pd.DataFrame({"kind": "width", "setting": t["width"],
                           "depth": t["depth"] if "depth" in t else 1.0, "flops": t["flops"],
                           "flops_fraction": t["flops_fraction"], "latency_ms": t["latency_ms"],
                           "accuracy": t["accuracy"]})
        df["label"] = [f"width {w:g}" + (f", depth {d:g}" if d < 1 else "")
                       for w, d in zip(df["setting"], df["depth"])]
        if latency:
            df["latency_ms"] = _slim_latencies(model, df, ctx)
            full = df[(df["setting"] >= 1) & (df["depth"] >= 1)]["latency_ms"]
            df["latency_fraction"] = df["latency_ms"] / float(full.iloc[0])
    elif isinstance(model, EarlyExitModel):
        if not is_loader(ctx.evaluator):
            raise BadInput("%budget needs an evaluation loader (--eval) to sweep the thresholds")
        t = exit_choices(_Sweep(model, ctx.evaluator, ctx.device))
        df = pd.DataFrame({"kind": "exits", "setting": t["threshold"], "subset": t["exits"],
                           "flops": t["avg_flops"], "flops_fraction": t["flops_fraction"],
                           "accuracy": t["accuracy"], "agreement": t["agreement"],
                           "label": t["label"], "pareto": t["pareto"]})
        if latency:
            df["latency_ms"] = _exit_latencies(model, df, ctx)
            df["latency_fraction"] = df["latency_ms"] / float(
                df[df["subset"].map(len) == 0]["latency_ms"].iloc[0])
    else:
        raise BadInput(f"%budget chooses among what a network was trained for: the widths of a "
                       f"slimmable network (%slim) or the thresholds of an early-exit model "
                       f"(%earlyexit); this model is a {type(model).__name__}")
    if df["accuracy"].isna().all():
        raise BadInput("%budget needs an evaluator that reports an accuracy (a labelled loader "
                       "or a callable returning one)")
    return pareto_front(df)


def _first_batch(ctx: StepContext):
    from ...train import split_batch, to_device

    return to_device(split_batch(next(iter(ctx.evaluator)))[0], ctx.device)


def _slim_latencies(sn: SlimmableNet, df: pd.DataFrame, ctx: StepContext) -> list[float]:
    """Milliseconds of a forward of the first evaluation batch at each configuration (a batch,
    not one example: at batch 1 a small network's time is mostly fixed overhead)."""
    from ...latency import measure_latency
    from ...metrics import is_loader

    if not is_loader(ctx.evaluator):
        raise BadInput("%budget --latency times the configurations on a batch of the "
                       "evaluation loader (--eval)")
    x = _first_batch(ctx)
    current, out = (sn.width, sn.depth), []
    try:
        for w, d in zip(df["setting"], df["depth"]):
            sn.width, sn.depth = float(w), float(d)
            out.append(measure_latency(sn, x, runs=10, warmup=2, max_seconds=0.5))
    finally:
        sn.width, sn.depth = current
    return out


def _exit_latencies(ee: EarlyExitModel, df: pd.DataFrame, ctx: StepContext) -> list[float]:
    """Milliseconds of the batched early-exit forward of the first evaluation batch for the
    choices on the Pareto front and for the network alone; NaN for the others."""
    from ...latency import measure_latency

    x = _first_batch(ctx)
    out = []
    for S, t, front in zip(df["subset"], df["setting"], df["pareto"]):
        if not front and len(S):
            out.append(float("nan"))
            continue
        m = ee.keep_exits(S)
        if len(S):
            m.threshold = float(t)
        out.append(measure_latency(m, x, runs=10, warmup=2, max_seconds=0.5))
    return out


def pick(table: pd.DataFrame, budget: float, column: str = "flops_fraction") -> int:
    """Index of the most accurate row within ``budget`` (of ``column``: a fraction of the full
    network's FLOPs, or ``latency_fraction``), the cheaper on a tie; BadInput naming the
    cheapest configuration when none fits."""
    fits = table[table[column] <= budget + 1e-9]
    if fits.empty:
        c = table.loc[table[column].idxmin()]
        what = "FLOPs" if column == "flops_fraction" else "latency"
        raise BadInput(f"no configuration fits {budget:.1%} of the {what}: the cheapest is "
                       f"{_label(c)} at {c[column]:.1%}")
    top = fits["accuracy"].max()
    return int(fits[fits["accuracy"] >= top - 1e-12][column].idxmin())


def _label(row) -> str:
    return str(row["label"])


@dataclass
class BudgetConfig(StepConfig):
    """Choose the most accurate configuration within a FLOPs budget.

    Measures every configuration the model was trained for on the evaluation data (--eval, or
    the one set with %nbcompress): a slimmable network's widths (and depths), or an early-exit
    model's exits and thresholds (every subset of its exits at every threshold; average FLOPs
    actually spent per sample). Keeps those within --flops (a fraction of the full network's
    FLOPs), switches the model to the most accurate (the cheaper on a tie; for exits, the one
    that agrees most with the full network first, the less noisy measure) and shows every
    candidate with the Pareto front. Exits not chosen are dropped. Undo goes back to the
    previous choice.
    """

    technique: ClassVar[str] = "budget"
    model_help: ClassVar[str] = "the variable holding a slimmable or early-exit model"
    summary: ClassVar[str] = "the most accurate width / depth / exits within a FLOPs budget"
    examples: ClassVar[tuple] = (
        "%budget net --flops 0.3 --eval test_loader     # battery low: at most 30% of the FLOPs",
        "%budget net --flops 1                          # back to the most accurate",
        "%budget net --latency 0.5                      # half the measured latency",
    )

    flops: float | None = option(None, kind="float", range="(0, 1]", metavar="F",
                                 conflicts="latency",
                                 help="at most this fraction of the full network's FLOPs, in "
                                      "(0, 1]")
    latency: float | None = option(None, kind="float", range="(0, 1]", metavar="L",
                                   help="at most this fraction of the full network's measured "
                                        "latency on a batch of the evaluation data, in (0, 1] "
                                        "(early exits: the choices on the FLOPs Pareto front "
                                        "are timed)")

    def validate(self, model: nn.Module) -> None:
        if self.flops is None and self.latency is None:
            raise FieldError("give {flops=F}: the budget, as a fraction of the full network's "
                             "FLOPs (e.g. 0.3), or {latency=L}, a fraction of its latency")
        if not isinstance(model, (SlimmableNet, EarlyExitModel)):
            raise FieldError(f"there is nothing to choose in a {type(model).__name__}: a "
                             f"budget chooses among the widths of a slimmable network (%slim, "
                             f"nbcompress.slim) or the thresholds of an early-exit model "
                             f"(%earlyexit, nbcompress.early_exit)")

    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        by_latency = self.latency is not None
        budget = float(self.latency if by_latency else self.flops)
        column = "latency_fraction" if by_latency else "flops_fraction"
        table = candidates(model, ctx, latency=by_latency)
        i = (pick_exits if isinstance(model, EarlyExitModel) else pick)(table, budget, column)
        row = table.loc[i]
        if isinstance(model, SlimmableNet):
            old = f"width {model.width:g}" + (f", depth {model.depth:g}" if model.depth < 1
                                              else "")
            model.width = model.check_width(float(row["setting"]))
            model.depth = model.check_depth(float(row["depth"]))
        else:
            old = exits_label(model, range(len(model.heads)), model.threshold)
            S = tuple(row["subset"])
            if S != tuple(range(len(model.heads))):
                model = model.keep_exits(S)          # the other heads go (%undo brings them)
            if S:
                model.threshold = float(row["setting"])
        table["chosen"] = [j == i for j in range(len(table))]
        how = ("the one that agrees most with the full network (then the most accurate)"
               if isinstance(model, EarlyExitModel) else "the most accurate")
        spent = f"{row['flops_fraction']:.1%} of the FLOPs" + (
            f" and {row['latency_fraction']:.1%} of the latency" if by_latency else "")
        note = (f"{old} -> {_label(row)}: {100 * row['accuracy']:.2f}% at {spent}, {how} of "
                f"{int((table[column] <= budget + 1e-9).sum())} configurations within "
                f"{budget:.0%} of the {'latency' if by_latency else 'FLOPs'} (of "
                f"{int(table[column].notna().sum())}"
                + (" with a measured latency" if by_latency and len(table) > table[column]
                   .notna().sum() else "") + ")")
        if "subset" in table:
            table = table.drop(columns=["subset"])    # the label names the exits
        result = CompressionResult(model, notes=[note],
                                   extra={"chosen": float(row["setting"]), "kind": row["kind"],
                                          "depth": float(row.get("depth", 1.0)),
                                          "flops_fraction": float(row["flops_fraction"])})
        result.tables["candidates"] = table
        from ...report.plots import budget_plot_png

        result.figures["candidates"] = budget_plot_png(table, budget, column)
        return result
