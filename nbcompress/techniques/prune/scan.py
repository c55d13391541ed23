"""Sensitivity scans: prune each layer alone at several amounts, evaluate, return the table and
a plot (``nbcompress.report.plots.sensitivity_png``); the model is not changed."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...core import BadInput, CompressionResult, StepContext
from .units import structured_pruner
from .common import _evaluate, _example, _importance_for, _pct, recalibrate_bn
from .weights import prune_weights_, weight_targets


def _run_sensitivity(cfg, model: nn.Module, ctx: StepContext) -> CompressionResult:
    import pandas as pd

    if ctx.evaluator is None:
        raise BadInput("--sensitivity evaluates every pruned variant: give --eval LOADER")
    imp = _importance_for(cfg)
    data = cfg.data if cfg.data is not None else cfg.finetune
    if imp.needs_data:
        imp.prepare(model, data, device=ctx.device, batches=cfg.importance_batches)
    base_acc = _evaluate(ctx, model)
    amounts = sorted(float(a) for a in cfg.amounts)
    rows = []
    if cfg.structured:
        example = _example(cfg, ctx)
        if example is None:
            raise BadInput("--structured traces the model: give an example input (--eval LOADER)")
        cp = structured_pruner(model, example, imp, layers=cfg.layers, round_to=cfg.round_to)
        names = [gi.name for gi in cp.groups if gi.name in cp.scores()]
        if not names:
            raise BadInput("no channel group to scan")
        for name in names:
            for a in amounts:
                work = copy.deepcopy(model)
                wcp = structured_pruner(work, example, imp, layers=None, round_to=cfg.round_to)
                wcp.groups = [gi for gi in wcp.groups if gi.name == name]
                wcp._scores = {name: cp.scores()[name]}
                plan = wcp.plan(a)
                info = wcp.apply(plan)
                if cfg.recalibrate_bn and cfg.data is not None:
                    recalibrate_bn(work, cfg.data, ctx.device, cfg.importance_batches)
                acc = _evaluate(ctx, work)
                rows.append({"layer": name, "type": info[0]["type"], "amount": a,
                             "channels": info[0]["channels"], "accuracy": acc,
                             "drop_points": 100 * (base_acc - acc)})
                del work
    else:
        targets = weight_targets(model, cfg.layers)
        for name, m in targets:
            saved = m.weight.detach().clone()
            for a in amounts:
                prune_weights_(model, a, importance=imp, scope="layer", targets=[(name, m)],
                               seed=cfg.seed)
                acc = _evaluate(ctx, model)
                rows.append({"layer": name, "type": type(m).__name__, "amount": a,
                             "weights": m.weight.numel(), "accuracy": acc,
                             "drop_points": 100 * (base_acc - acc)})
                with torch.no_grad():
                    m.weight.copy_(saved)
    df = pd.DataFrame(rows)
    result = CompressionResult(model=model, changes_model=False)
    result.tables["sensitivity"] = df
    result.extra["baseline_accuracy"] = base_acc
    result.extra["amounts"] = ", ".join(f"{a:g}" for a in amounts)
    top = max(amounts)
    at_top = df[df["amount"] == top].sort_values("drop_points")
    robust, fragile = at_top.iloc[0], at_top.iloc[-1]
    result.notes.append(f"sensitivity of {df['layer'].nunique()} layer(s) "
                        f"({'channels' if cfg.structured else 'weights'}, {imp.name}) at "
                        f"{', '.join(f'{a:g}' for a in amounts)}; baseline {_pct(base_acc)}")
    result.notes.append(f"at {top:g}: most robust {robust['layer']} "
                        f"({robust['drop_points']:+.2f} pts drop), most sensitive "
                        f"{fragile['layer']} ({fragile['drop_points']:+.2f} pts drop)")
    result.layers = [{"layer": r["layer"], **{f"acc@{a:g}": f"{100 * float(v):.2f}%"
                                              for a, v in zip(g["amount"], g["accuracy"])}}
                     for r, g in ((g.iloc[0], g) for _, g in df.groupby("layer", sort=False))]
    from ...report.plots import sensitivity_png

    png = sensitivity_png(df, base_acc)
    if png is not None:
        result.figures["sensitivity"] = png
    return result

