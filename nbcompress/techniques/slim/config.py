"""The slim step: train a network to run at several widths, or (on a slimmable network) switch
the width it runs at. Options declared once; ``run`` does one or the other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
from torch import nn

from ...core import CompressionResult, StepConfig, StepContext
from ...errors import FieldError
from ...options import is_given, is_number, option, options_of
from .model import SlimmableNet
from .plan import plan_widths

__all__ = ["SlimConfig", "parse_widths"]

DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)
WEIGHT_IMPORTANCES = ("l1", "l2", "bn", "random")


def parse_widths(value: Any, field: str = "widths") -> list[float]:
    """``"0.25,0.5,1"`` / ``[0.25, 0.5, 1]`` -> sorted unique floats in (0, 1], 1 included."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    out = []
    for p in parts:
        try:
            w = float(p)
        except (TypeError, ValueError):
            raise FieldError(f"{{{field}}} must be numbers in (0, 1], got {p!r}") from None
        if not 0 < w <= 1:
            raise FieldError(f"each of {{{field}}} must be in (0, 1], got {w:g}")
        out.append(w)
    out = sorted(set(out) | {1.0})
    if len(out) < 2:
        raise FieldError(f"{{{field}}} needs at least one {field[:-1]} below 1 (e.g. "
                         f"{'0.25,0.5,0.75,1' if field == 'widths' else '0.5,1'})")
    return out


@dataclass
class SlimConfig(StepConfig):
    """Slimmable network: one set of weights that runs at several widths.

    Trains the model so that it runs at every width in --widths (each Conv / Linear keeping the
    first fraction of its channels): channels are first reordered by importance through the
    dependency graph structured pruning uses (coupled layers and residual adds move together),
    then trained with the sandwich rule (full width on the labels; smallest and other widths
    distilled in place from the full width), and each width's BatchNorm statistics are
    re-estimated after training and kept. On a slimmable model, --width W switches the width it
    runs at (cheap, undoable): FLOPs and latency are those of the narrower dense network; the
    size stays that of all widths' weights.
    """

    technique: ClassVar[str] = "slim"
    trains_with: ClassVar[str | None] = "data"
    model_help: ClassVar[str] = "the variable holding the model (rebound to the slimmable network)"
    summary: ClassVar[str] = ("slimmable network: one set of weights runs at several widths "
                              "(and depths: residual blocks left out)")
    examples: ClassVar[tuple] = (
        "%slim net --widths 0.25,0.5,0.75,1 --data train_loader --epochs 5",
        "%slim net --width 0.5          # later: run at half width (undoable)",
    )

    data: Any = option(None, kind="loader", help="DataLoader the widths are trained on (needed "
                       "to make a model slimmable)")
    widths: Any = option(None, kind="str", metavar="W[,W...]", accepts=(list, tuple, float, int),
                         help="the widths to train, each in (0, 1]; 1 is always included "
                              "(default 0.25,0.5,0.75,1)")
    width: float | None = option(None, kind="float", range="(0, 1]", metavar="W",
                                 help="the width to run at: one of the trained widths (after "
                                      "training, default 1)")
    depths: Any = option(None, kind="str", metavar="D[,D...]", accepts=(list, tuple, float, int),
                         help="also train for depth: the fractions of the residual blocks "
                              "(x + f(x)) kept, e.g. 0.5,1; blocks are dropped at random in "
                              "training (layer dropping) and the ones each depth leaves out "
                              "are chosen on the data after training")
    depth: float | None = option(None, kind="float", range="(0, 1]", metavar="D",
                                 help="the depth to run at: one of the trained depths")
    epochs: int = option(5, kind="int", range="[1, inf)", help="training epochs")
    lr: float = option(1e-3, kind="float", range="(0, inf)", help="learning rate (Adam, cosine)")
    importance: str = option("l1", kind="choice", choices=WEIGHT_IMPORTANCES,
                             help="how channels are ranked before training (the first k of a "
                                  "layer are its k most important)")
    samples: int = option(2, kind="int", range="[0, inf)", metavar="N",
                          help="widths between the smallest and the full one trained each step "
                               "(sandwich rule; all of them when there are at most N)")
    T: float = option(1.0, kind="float", range="(0, inf)", short="-T", flag="--temperature",
                      metavar="TEMP", help="temperature of the in-place distillation")
    calib: int = option(2000, kind="int", range="[1, inf)", metavar="N",
                        help="training samples each width's BatchNorm statistics are "
                             "re-estimated on")
    seed: int = option(0, kind="int", help="seed for training")

    # ------------------------------------------------------------------ checks
    def validate(self, model: nn.Module) -> None:
        if isinstance(model, SlimmableNet):
            given = [f.name for f, _ in options_of(self)
                     if f.name not in ("width", "depth", "device", "progress")
                     and is_given(self, f)]
            if given:
                raise FieldError(
                    f"the model is already slimmable (widths "
                    f"{', '.join(f'{w:g}' for w in model.widths)}): only {{width}} and {{depth}} "
                    f"can change now, not {', '.join('{' + g + '}' for g in given)} (%undo to "
                    f"get the plain network back)")
            if self.width is None and self.depth is None:
                raise FieldError("the model is already slimmable: give {width=W} (or "
                                 "{depth=D}) to choose what it runs at")
            for field, value, trained in (("width", self.width, model.widths),
                                          ("depth", self.depth, model.depths)):
                if value is not None and not any(abs(value - v) < 1e-9 for v in trained):
                    raise FieldError(f"{{{field}}} {value:g} was not trained (trained: "
                                     f"{', '.join(f'{v:g}' for v in trained)})")
            return
        if self.data is None:
            raise FieldError("{data=LOADER} is needed to make the model slimmable (train its "
                             "widths)" + (", before {width} can choose one"
                                          if self.width is not None else ""))
        ws = parse_widths(DEFAULT_WIDTHS if self.widths is None else self.widths)
        if self.width is not None and not any(abs(self.width - w) < 1e-9 for w in ws):
            raise FieldError(f"{{width}} {self.width:g} is not among the widths to train "
                             f"({', '.join(f'{w:g}' for w in ws)})")
        ds = [1.0] if self.depths is None else parse_widths(self.depths, "depths")
        if self.depth is not None and not any(abs(self.depth - d) < 1e-9 for d in ds):
            raise FieldError(f"{{depth}} {self.depth:g} is not among the depths to train "
                             f"({', '.join(f'{d:g}' for d in ds)})"
                             + ("; give {depths}" if self.depths is None else ""))

    # ------------------------------------------------------------------ run
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        if isinstance(model, SlimmableNet):
            return self._switch(model, ctx)
        from ...batches import (check_loader_runs, example_of, head, peek_batch, split_batch,
                                to_device)
        from .plan import residual_blocks
        from .training import recalibrate, train_slimmable

        widths = parse_widths(DEFAULT_WIDTHS if self.widths is None else self.widths)
        check_loader_runs(model, self.data, "{data}", ctx.device)
        first_x, first_y = split_batch(peek_batch(self.data, "{data}"))
        if first_y is None:
            raise FieldError("{data} yields no labels: the full width trains on them (the "
                             "narrower widths learn from the full width)")
        example = ctx.example_input
        if example is None:
            example = head(example_of(first_x), 1)
        example = to_device(example, ctx.device)
        depths = [1.0] if self.depths is None else parse_widths(self.depths, "depths")
        blocks = residual_blocks(model, example) if len(depths) > 1 else []
        if len(depths) > 1 and not blocks:
            raise FieldError("{depths} needs residual blocks to leave out (a module whose "
                             "forward adds its own input, x + f(x), and keeps its shape); this "
                             "model has none")
        plan = plan_widths(model, example, widths, importance=self.importance, seed=self.seed)
        sn = SlimmableNet(model, widths, plan.spec, blocks=blocks, depths=depths)
        sn.train(model.training)
        records = train_slimmable(sn, self.data, epochs=self.epochs, lr=self.lr, T=self.T,
                                  samples=self.samples, seed=self.seed, device=ctx.device,
                                  progress=self.progress)
        recalibrate(sn, self.data, ctx.device, self.calib)
        sn.width = 1.0 if self.width is None else sn.check_width(self.width)
        sn.depth = 1.0 if self.depth is None else sn.check_depth(self.depth)
        notes = [f"trained widths {', '.join(f'{w:g}' for w in widths)} for {self.epochs} "
                 f"epoch{'s' if self.epochs != 1 else ''} (sandwich rule, in-place "
                 f"distillation at T={self.T:g}); channels ranked by {self.importance} first; "
                 f"BatchNorm statistics re-estimated per width on {self.calib} samples",
                 f"runs at width {sn.width:g}; the size counts every width's weights (they are "
                 f"all kept, so switching is free)"] + list(plan.notes)
        if blocks:
            left = "; ".join(f"depth {k}: {', '.join(v)}" for k, v in sn.drops.items())
            how = ("for the first half of the epochs each narrower pass drew a depth d and "
                   "dropped each block with probability 1 - d; then the blocks to leave out were "
                   "chosen (least change to the full output) and trained as chosen"
                   if self.epochs > 1 else
                   "each narrower pass drew a depth d and dropped each block with probability "
                   "1 - d; the blocks to leave out were chosen after training (least change to "
                   "the full output)")
            notes.append(f"depths {', '.join(f'{d:g}' for d in depths)} over {len(blocks)} "
                         f"residual blocks ({', '.join(blocks)}): {how}; left out at {left}")
        result = CompressionResult(sn, extra={"loss": [round(r["loss"], 4) for r in records],
                                              "width": sn.width, "widths": widths,
                                              "depth": sn.depth, "depths": depths})
        self._describe(sn, ctx, result, notes, example)
        return result

    def _switch(self, sn: SlimmableNet, ctx: StepContext) -> CompressionResult:
        old = (sn.width, sn.depth)
        if self.width is not None:
            sn.width = sn.check_width(self.width)
        if self.depth is not None:
            sn.depth = sn.check_depth(self.depth)
        result = CompressionResult(sn, extra={"width": sn.width, "depth": sn.depth})
        moved = [f"{what} {a:g} -> {b:g}" for what, a, b, given in
                 (("width", old[0], sn.width, self.width is not None),
                  ("depth", old[1], sn.depth, self.depth is not None)) if given]
        skipped = sn.skipped()
        self._describe(sn, ctx, result, [", ".join(moved) + " (weights unchanged)"
                                         + (f"; blocks left out: {', '.join(skipped)}"
                                            if skipped else "")], _example(ctx))
        return result

    def _describe(self, sn: SlimmableNet, ctx: StepContext, result: CompressionResult,
                  notes: list[str], example: Any) -> None:
        """Channels per layer at the current width, and accuracy / FLOPs / latency per width."""
        result.layers = [dict(r, kept=r["channels"] / r["of"]) for r in sn.channels()]
        rows = width_table(sn, ctx, example)
        if rows is not None:
            result.tables["widths"] = rows
            from ...report.plots import widths_plot_png

            result.figures["accuracy vs FLOPs per width"] = widths_plot_png(rows)
        result.notes += notes


def _example(ctx: StepContext) -> Any:
    """The step's example input, else the first sample of the evaluation loader, else None."""
    from ...batches import example_of, head, peek_batch, to_device
    from ...metrics import is_loader

    if ctx.example_input is not None:
        return ctx.example_input
    if is_loader(ctx.evaluator):
        return to_device(head(example_of(peek_batch(ctx.evaluator, "the evaluator")), 1),
                         ctx.device)
    return None


def width_table(sn: SlimmableNet, ctx: StepContext, example: Any = None) -> pd.DataFrame | None:
    """One row per trained width: FLOPs (and their share of the full width's), latency (ms, one
    forward of the example) and the evaluator's accuracy; None without an example input."""
    from ...batches import head
    from ...counting import count_flops
    from ...latency import measure_latency

    example = ctx.example_input if example is None else example
    if example is None:
        return None
    example = head(example, 1)
    rows = []
    current = (sn.width, sn.depth)
    try:
        for d in sn.depths:
            for w in sn.widths:
                sn.width, sn.depth = w, d
                flops = count_flops(sn, example)[0]
                ms = measure_latency(sn, example, runs=10, warmup=2, max_seconds=0.5)
                acc = ctx.evaluate(sn) if ctx.evaluator is not None else None
                row = {"width": w, "depth": d, "flops": flops, "latency_ms": ms,
                       "accuracy": acc if is_number(acc) else None,
                       "current": abs(w - current[0]) < 1e-9 and abs(d - current[1]) < 1e-9}
                if not sn.blocks:
                    row.pop("depth")
                rows.append(row)
    finally:
        sn.width, sn.depth = current
    df = pd.DataFrame(rows)
    full = float(df["flops"].max()) or 1.0
    df.insert(3 if sn.blocks else 2, "flops_fraction", df["flops"] / full)
    return df
