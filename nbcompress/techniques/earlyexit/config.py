"""The early-exit step: its options (declared once), the checks the declarations cannot say, and
``run`` (attach and train heads, or on an :class:`EarlyExitModel` change only its threshold)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...core import CompressionResult, StepConfig, StepContext
from ...errors import FieldError
from ...options import is_given, option, options_of
from .blocks import HEAD_KINDS, Plan, _head_text, make_head, plan_exits
from .hooked import HookedExitModel, make_hooked_head
from .model import DEFAULT_THRESHOLD, EarlyExitModel
from .sweep import _Sweep, choose_exits, describe_exits
from .training import train_heads

__all__ = ["EarlyExitConfig"]


@dataclass
class EarlyExitConfig(StepConfig):
    """Early exits: classifier heads after some blocks; an easy input leaves early.

    Attaches a small head (average-pool to at most 4x4 + linear) after each chosen block of the
    model, trains the heads on the data (distilled from the network's own final output, backbone
    frozen unless joint) and gives an EarlyExitModel. At inference each sample leaves at the
    first exit whose max softmax probability reaches the threshold; the rest of the batch goes
    on. The model must be an nn.Sequential or a module whose forward runs its sub-modules once
    each in order (checked on a batch; a ModuleList it loops over counts as its members, and a
    flatten, F.relu or pooling between blocks becomes a block of its own). On an EarlyExitModel
    only the threshold changes.

    The dashboard's FLOPs are the average FLOPs actually spent per sample on the evaluation data
    (same basis as the network before); the step shows the share of samples per exit and a plot
    of accuracy vs average FLOPs as the threshold sweeps.

    With --target-flops F the exits are chosen for you: a head after every candidate block, then
    the subset of exits and the threshold that agree most with the full network on the
    evaluation data within F of the FLOPs, then the most accurate (every subset is scored from
    one pass; agreement is the less noisy measure on a few hundred samples, see
    :func:`~nbcompress.techniques.earlyexit.sweep.pick_exits`); the other heads are dropped.
    """

    technique: ClassVar[str] = "earlyexit"
    trains_with: ClassVar[str | None] = "data"
    model_help: ClassVar[str] = ("the variable holding the model (rebound to the early-exit "
                                 "model)")
    summary: ClassVar[str] = "early-exit heads: an easy input leaves after a few blocks"
    examples: ClassVar[tuple] = (
        "%earlyexit cnn --data train_loader --exits 2,5 --threshold 0.9",
        "%earlyexit cnn --data train_loader --every 1 --epochs 5",
        "%earlyexit cnn --threshold 0.97      # later: only the threshold (undoable)",
        "%earlyexit net --data train_loader --target-flops 0.5 --head conv --eval val_loader",
        "%earlyexit bert --data train_dl --eval val_dl --epochs 3   # a transformers model: "
        "dict batches, exits after its layers",
    )

    data: Any = option(None, kind="loader", help="DataLoader the exit heads are trained on "
                       "(needed to attach exits)")
    exits: Any = option(None, kind="str", metavar="LAYER[,LAYER...]", accepts=(list, tuple, int),
                        conflicts="every",
                        help="module names, as model.named_modules() gives them, an exit sits "
                             "after (for an nn.Sequential its indices: --exits 2,5)")
    every: int | None = option(None, kind="int", range="[1, inf)", metavar="K",
                               help="an exit after every K-th block with weights (default 1), "
                                    "moved past the norm/activation/pool blocks after it, never "
                                    "just before the classifier; a model whose top level is only "
                                    "features + classifier has its nn.Sequential stages opened "
                                    "(default: K giving about four exits)")
    threshold: float | None = option(None, kind="float", range="(0, 1]", metavar="P",
                                     help="leave at the first exit whose max softmax probability "
                                          f"is >= P, in (0, 1] (default {DEFAULT_THRESHOLD:g}); "
                                          "on an early-exit model only the threshold changes")
    epochs: int = option(5, kind="int", range="[1, inf)", help="head training epochs")
    lr: float = option(1e-2, kind="float", range="(0, inf)",
                       help="learning rate of the cosine schedule; use less with --joint")
    joint: bool = option(False, kind="bool",
                         help="train the backbone with the heads (default: backbone frozen)")
    T: float = option(4.0, kind="float", range="(0, inf)", short="-T", flag="--temperature",
                      metavar="TEMP", help="distillation temperature")
    alpha: float = option(1.0, kind="float", range="[0, 1]",
                          help="weight of distillation from the final output vs the labels, in "
                               "[0, 1] (default 1: distillation only)")
    head_pool: int = option(4, kind="int", range="[1, inf)", metavar="S",
                            help="heads average-pool each spatial dim to at most S")
    head: str = option("pool", kind="choice", choices=HEAD_KINDS,
                       help="pool: average-pool + linear; conv: a 3x3 conv + BatchNorm + ReLU "
                            "first (stronger, costs more FLOPs, counted)")
    target_flops: float | None = option(
        None, kind="fraction", conflicts="threshold", metavar="F",
        help="choose the exits and threshold for you: every candidate exit gets a head, then "
             "the choice of exits and threshold whose average FLOPs on the evaluation data "
             "(--eval) stay within this fraction of the network's and whose predictions agree "
             "most with the full network's (then the most accurate) is kept; "
             "without --exits/--every the candidates are after every block with weights, "
             "nn.Sequential blocks opened")
    seed: int = option(0, kind="int", help="seed for head init and training")

    # ------------------------------------------------------------------ checks
    def validate(self, model: nn.Module) -> None:
        if isinstance(model, EarlyExitModel):
            given = [f.name for f, _ in options_of(self)
                     if f.name != "threshold" and is_given(self, f)]
            if given:
                raise FieldError(
                    f"the model already has early exits ({', '.join(model.exit_names)}): only "
                    f"{{threshold}} can change now, not {', '.join('{' + g + '}' for g in given)}"
                    f" (%undo to get the plain network back)")
            if self.threshold is None:
                raise FieldError("the model already has early exits: give {threshold=P} to "
                                 "change its threshold")
            return
        if self.data is None:
            raise FieldError("{data=LOADER} is needed to train the exit heads")
        self.plan(model)

    def plan(self, model: nn.Module) -> Plan:
        """Where the exits go (checked on a batch of ``data``); with ``target_flops`` and no
        ``exits`` / ``every``, the candidates after every block with weights, Sequentials
        opened."""
        auto = self.target_flops is not None and self.exits is None and self.every is None
        plan = plan_exits(model, self.data, self.exits, self.every, self.alpha, open_all=auto)
        if plan.hooked is not None and plan.hooked["pairs"] and self.head != "pool":
            raise FieldError(f"{{head={self.head}}}: the heads on {type(model).__name__}'s "
                             f"layers are LayerNorm + linear over its tokens (--head pool)")
        return plan

    # ------------------------------------------------------------------ run
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        if isinstance(model, EarlyExitModel):
            return self._retune(model, ctx)
        from ...metrics import is_loader

        if self.target_flops is not None and not is_loader(ctx.evaluator):
            raise FieldError("{target_flops} chooses the exits on the evaluation data: give "
                             "an evaluation loader (--eval LOADER, or evaluator= in Python; "
                             "labelled, held out from {data})")
        plan = self.plan(model)
        if self.alpha < 1:                 # the heads train on the labels: they must be classes
            from ...batches import check_loader_runs

            check_loader_runs(model, self.data, "{data}", ctx.device)
        threshold = self.threshold if self.threshold is not None else DEFAULT_THRESHOLD
        hooked = plan.hooked
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if hooked is not None and hooked["pairs"]:
                out_emb = model.get_output_embeddings() \
                    if hasattr(model, "get_output_embeddings") else None
                heads = nn.ModuleList(make_hooked_head(f, plan.num_classes, hooked["tokens"],
                                                       out_emb) for f in plan.features)
            else:
                heads = nn.ModuleList(make_head(f, plan.num_classes, self.head_pool, self.head,
                                                last)
                                      for f, last in zip(plan.features, plan.channels_last))
        if hooked is not None:
            dt = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                      torch.float32)
            ee = HookedExitModel(model, heads.to(ctx.device).to(dt), plan.positions, threshold,
                                 plan.names, [n for n, _ in plan.blocks], plan.num_classes,
                                 **hooked)
        else:
            backbone = nn.Sequential(*(m for _, m in plan.blocks))
            ee = EarlyExitModel(backbone, heads.to(ctx.device), plan.positions, threshold,
                                plan.names, [n for n, _ in plan.blocks], plan.num_classes)
        ee.train(model.training)
        records = train_heads(self, ee, ctx)
        ee.eval()
        chosen = None
        if self.target_flops is not None:
            sw = _Sweep(ee, ctx.evaluator, ctx.device)
            row, chosen = choose_exits(sw, float(self.target_flops))
            candidates = len(ee.heads)
            ee = ee.keep_exits(row["exits"])
            ee.threshold = float(row["threshold"]) if len(row["exits"]) else DEFAULT_THRESHOLD
            ee.eval()
        notes = [f"exits after {', '.join(plan.names)} of {len(plan.blocks)} blocks; heads "
                 f"({_head_text(ee.heads[0])}) trained {self.epochs} epoch"
                 f"{'s' if self.epochs != 1 else ''} "
                 f"{'jointly with the backbone' if self.joint else 'with the backbone frozen'}, "
                 f"distilled from the final output (T={self.T:g}"
                 f"{f', alpha={self.alpha:g}' if self.alpha < 1 else ''})"]
        if plan.left_out:
            notes.append(f"{', '.join(plan.left_out)} left out: the model's forward runs "
                         f"{'it' if len(plan.left_out) == 1 else 'them'} only in training "
                         f"(auxiliary classifiers), not when it answers")
        if chosen is not None:
            notes.append(
                f"--target-flops {self.target_flops:g}: of {candidates} candidate exits and "
                f"{chosen['threshold'].nunique()} thresholds ({len(chosen)} choices), "
                f"{row['label']} agrees most with the full network within the budget on "
                f"the evaluation data ({100 * row['agreement']:.2f}% of its predictions): "
                f"{100 * row['accuracy']:.2f}% at {row['flops_fraction']:.1%} of the FLOPs")
        result = CompressionResult(ee, extra={"head_loss": [round(r["loss"], 4) for r in records]})
        if chosen is not None:
            front = chosen[chosen["pareto"] | (chosen.index == row.name)].copy()
            front["exits"] = [", ".join(plan.names[k] for k in S) or "(none)"
                              for S in front["exits"]]
            front["chosen"] = front.index == row.name
            result.tables["exit choices (Pareto front)"] = front.reset_index(drop=True)
            result.extra.update({"chosen_exits": list(ee.exit_names),
                                 "candidate_exits": list(plan.names)})
        describe_exits(ee, ctx, result, notes)
        return result

    def _retune(self, ee: EarlyExitModel, ctx: StepContext) -> CompressionResult:
        old = ee.threshold
        ee.threshold = float(self.threshold)
        notes = [f"threshold {old:g} -> {ee.threshold:g} (weights unchanged)"]
        result = CompressionResult(ee)
        describe_exits(ee, ctx, result, notes)
        return result
