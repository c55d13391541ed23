"""``PruneConfig``: what ``%prune`` / :func:`nbcompress.prune` do, as data; every option declared
once (kind, default, help, range, what it needs and excludes), the checks no declaration can say
in :meth:`PruneConfig.validate`, and ``run`` dispatching to the step."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ...core import BadInput, CompressionResult, FieldError, StepConfig, StepContext
from ...options import option
from ...train import check_loader_runs
from .channels import unsupported_layer
from .heads import is_transformer
from .importance import IMPORTANCES, Importance
from .lottery import _run_lottery
from .rounds import _run_prune
from .scan import _run_sensitivity
from .units import transformer_layers
from .weights import _layer_list, _rows_view, parse_pattern, pattern_fits, weight_targets

__all__ = ["PruneConfig", "DEFAULT_AMOUNTS"]

DEFAULT_AMOUNTS = (0.1, 0.3, 0.5, 0.7, 0.9)
_TARGETS = ("target_flops", "target_params")


def _pattern_message(value) -> str | None:
    """The option check of ``pattern``: its message when the text is not N:M."""
    try:
        parse_pattern(value)
    except FieldError as e:
        return e.template
    return None


@dataclass
class PruneConfig(StepConfig):
    """Prune a model and rebind the name to the result (``%undo`` goes back).

    Weight pruning zeroes the least important single weights (high sparsity; smaller when saved
    with ``nbcompress.save``, no faster on dense hardware). ``--structured`` removes whole
    channels/neurons with torch-pruning's dependency graph: a smaller network that really runs
    faster; on a transformer it removes whole attention heads and FFN neurons and keeps the hidden
    size (embeddings, norms and the classifier stay whole). The classifier's outputs are never
    removed. Returns the step's report; per-round,
    lottery and sensitivity tables are in ``report.result.tables``.
    """

    technique: ClassVar[str] = "prune"
    trains_with: ClassVar[str | None] = "finetune"
    summary: ClassVar[str] = "weight or channel pruning"
    examples: ClassVar[tuple] = (
        "%prune model 0.9                                  # 90% sparse, global magnitude",
        "%prune model 0.95 --steps 5 --finetune train_loader --epochs 2",
        "%prune cnn 0.5 --structured --finetune train_loader --epochs 3",
        "%prune cnn --structured --target-flops 0.5 --importance taylor --data train_loader",
        "%prune model 0.94 --lottery --steps 12 --finetune train_loader --epochs 10",
        "%prune model --sensitivity",
    )

    amount: float | None = option(
        None, kind="fraction", positional=True, conflicts=_TARGETS,
        help="fraction to remove, 0 < AMOUNT < 1 (or 90%): of the weights (their sparsity after "
             "the step) or, with --structured, of the channels/neurons (transformers: of the "
             "attention heads and FFN neurons of each block, at least one head kept)")
    structured: bool = option(
        False, kind="bool",
        help="remove whole channels/neurons (a smaller dense network) instead of single weights; "
             "coupled layers (BatchNorm, residual adds, next layers) follow; on a transformer "
             "whole attention heads and FFN neurons")
    importance: Any = option(
        None, kind="choice", choices=tuple(IMPORTANCES), accepts=(Importance,),
        help="what to keep: l1 (default for weights), l2 (default for channels), taylor, hessian "
             "(OBD), activation, bn (BatchNorm scale), random; in Python also an Importance")
    scope: str | None = option(
        None, kind="choice", choices=("global", "layer"),
        help="rank all layers together (default for weights) or prune each layer by the same "
             "amount (default for channels and --lottery)")
    pattern: str | None = option(
        None, kind="str", metavar="N:M", check=_pattern_message,
        conflicts=("structured", "lottery", "sensitivity") + _TARGETS,
        help="semi-structured: keep N of every M consecutive weights of each output channel "
             "(2:4 runs on NVIDIA sparse tensor cores, Ampere and newer; AMOUNT is then 1 - N/M "
             "and may be left out)")
    learned: bool = option(
        False, kind="bool", requires="finetune",
        conflicts=("structured", "pattern", "lottery", "sensitivity", "importance") + _TARGETS,
        help="learn which weights to drop (sparse variational dropout, Molchanov 2017) by "
             "training on --finetune for --learn-epochs; without AMOUNT the weights it finds to "
             "be noise go, with AMOUNT that fraction; then the --epochs fine-tune")
    learn_epochs: int = option(10, kind="int", range="[1, inf)", requires="learned", metavar="E",
                               help="epochs of variational dropout training")
    kl_weight: float = option(1.0, kind="float", range="(0, inf)", requires="learned",
                              metavar="W", help="weight of the KL term (more: sparser)")
    layers: str | None = option(
        None, kind="regex",
        help="only layers whose name matches this regular expression (re.search)")
    steps: int = option(
        1, kind="int", range="[1, inf)",
        help="prune in N rounds to the final amount, fine-tuning between rounds")
    finetune: Any = option(
        None, kind="loader",
        help="DataLoader to fine-tune on after each round (pruned weights stay zero)")
    epochs: int = option(1, kind="int", range="[1, inf)", requires="finetune", metavar="E",
                         help="fine-tuning epochs per round")
    lr: float = option(1e-3, kind="float", range="(0, inf)", requires="finetune", metavar="LR",
                       help="fine-tuning learning rate (Adam, cosine)")
    optimizer: Any = option("adam", magic=False,
                            help="fine-tuning optimizer: adam, adamw, sgd (see nbcompress.train.fit)")
    scheduler: str | None = option("cosine", kind="choice", choices=("cosine",), magic=False,
                                   help="learning-rate schedule of the fine-tune: cosine or None")
    data: Any = option(
        None, kind="loader",
        help="data for taylor/hessian/activation importance (default: the --finetune loader)")
    importance_batches: int = option(8, kind="int", range="[1, inf)", magic=False,
                                     help="batches of data the importance and BatchNorm "
                                          "recalibration look at")
    lottery: bool = option(
        False, kind="bool",
        help="lottery ticket: iterative magnitude pruning rewound to the initial weights "
             "(recorded by %nbcompress NAME --remember-init), compared with the dense model and "
             "with a random re-initialisation of the same mask")
    sensitivity: bool = option(
        False, kind="bool",
        help="prune each layer alone at several amounts and evaluate; the model is not changed")
    amounts: tuple = option(DEFAULT_AMOUNTS, kind="fractions", range="(0, 1)", metavar="LIST",
                            requires="sensitivity", help="amounts for --sensitivity")
    target_flops: float | None = option(
        None, kind="fraction", conflicts="target_params",
        help="keep this fraction of the FLOPs (the amount is searched for)")
    target_params: float | None = option(
        None, kind="fraction", metavar="P",
        help="keep this fraction of the (nonzero) parameters (the amount is searched for)")
    round_to: int = option(
        8, kind="int", range="[1, inf)", metavar="K",
        help="structured: keep channel counts multiples of K (default 8, fast on CPU and GPU; "
             "layers narrower than 2K use 1); FFN neurons too, attention heads are whole")
    sparsity_reg: float = option(
        0.0, kind="float", range="[0, inf)", metavar="L",
        help="with --importance bn: fine-tune with an L1 penalty L on BatchNorm scales before "
             "pruning (network slimming)")
    recalibrate_bn: bool = option(
        True, kind="bool", magic=False,
        help="after structured pruning, re-estimate BatchNorm statistics on a few batches of "
             "data / finetune (forward passes only) before fine-tuning")
    output_rate: float | None = option(
        None, kind="float", range="(0, 1]", magic=False,
        help="the classifier layer is pruned at this fraction of the others' per-round rate "
             "(weights, scope layer; default 0.5 for lottery as in Frankle & Carbin, else 1)")
    seed: int = option(0, kind="int", metavar="SEED",
                       help="seed for random importance and fine-tuning")

    # ------------------------------------------------------------------ derived
    @property
    def importance_name(self) -> str:
        if isinstance(self.importance, Importance):
            return self.importance.name
        if self.importance is None:
            return "l2" if self.structured else "l1"
        return str(self.importance).lower()

    @property
    def resolved_scope(self) -> str:
        if self.scope is not None:
            return self.scope
        return "layer" if (self.structured or self.lottery) else "global"

    # ------------------------------------------------------------------ validation
    def validate(self, model: nn.Module) -> None:
        """What the declarations cannot say: which options make one step together, and what the
        model must have for them."""
        targets = [t for t in _TARGETS if getattr(self, t) is not None]
        if self.amount is not None and self.sensitivity:
            raise FieldError("{sensitivity} scans its own amounts ({amounts}): leave out {amount}")
        if self.learned and self.steps != 1:
            raise FieldError("{learned} learns the sparsity in one training run: leave out "
                             "{steps} (use {learn_epochs} for a longer one)")
        if self.pattern is not None:
            self._validate_pattern(model)
        elif self.amount is None and not targets and not self.sensitivity and not self.learned:
            raise FieldError("give {amount} (the fraction to remove, e.g. 0.5), {target_flops=F} "
                             "or {target_params=P}")
        if self.sensitivity and targets:
            raise FieldError("{sensitivity} does not take {target_flops}/{target_params}")
        self._validate_importance(model)
        if self.lottery:
            if self.structured:
                raise FieldError("{lottery} finds a sparse subnetwork of weights; it does not "
                                 "combine with {structured}")
            if self.sensitivity:
                raise FieldError("{lottery} and {sensitivity} are different steps: give one")
            if self.finetune is None:
                raise FieldError("{lottery} retrains the ticket after every round: give "
                                 "{finetune=LOADER} (and {epochs})")
            if targets:
                raise FieldError("{lottery} takes {amount} (the final sparsity), not a target")
        if self.sensitivity and (self.finetune is not None or self.steps != 1):
            raise FieldError("{sensitivity} only measures (the model is not changed): leave out "
                             "{finetune} and {steps}")
        if self.sparsity_reg > 0:
            if not self.structured or self.importance_name != "bn":
                raise FieldError("{sparsity_reg} pushes BatchNorm scales to zero before pruning: "
                                 "use it with {structured} {importance='bn'}")
            if self.finetune is None:
                raise FieldError("{sparsity_reg} trains with the penalty first: give "
                                 "{finetune=LOADER}")
        self._validate_layers(model)

    def _validate_pattern(self, model: nn.Module) -> None:
        n, m = parse_pattern(self.pattern)
        implied = 1 - n / m
        if self.amount is not None and abs(self.amount - implied) > 1e-9:
            raise FieldError(f"{{pattern}} {self.pattern} removes {implied:.4g} of the weights "
                             f"({m - n} of every {m}): leave out {{amount}} or give {implied:.4g}")
        if self.steps != 1:
            raise FieldError(f"{{pattern}} {self.pattern} is reached in one step: leave out "
                             f"{{steps}}")
        targets = weight_targets(model, self.layers)
        if targets and not any(pattern_fits(mod, m) for _, mod in targets):
            name, mod = targets[0]
            raise FieldError(f"{{pattern}} {self.pattern} needs layers whose inputs per output "
                             f"channel are a multiple of {m}; none is (e.g. {name!r}: "
                             f"{_rows_view(mod, mod.weight).shape[1]})")

    def _validate_importance(self, model: nn.Module) -> None:
        spec = self.importance if self.importance is not None else self.importance_name
        imp_cls = type(spec) if isinstance(spec, Importance) else IMPORTANCES[spec.lower()]
        named = f"{{importance={self.importance_name!r}}}"
        if imp_cls.structured_only and not self.structured:
            raise FieldError(f"{named} ranks channels: use it with {{structured}}")
        if self.importance_name == "bn" and not any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise FieldError(f"{named} ranks channels by BatchNorm scale, but "
                             f"{type(model).__name__} has no BatchNorm layer")
        if imp_cls.needs_data and self.data is None and self.finetune is None:
            raise FieldError(f"{named} measures on data: give {{data=LOADER}} (or "
                             f"{{finetune=LOADER}})")

    def _validate_layers(self, model: nn.Module) -> None:
        """There is something to prune (and ``layers`` selects some of it)."""
        no_match = FieldError(f"{{layers}} {self.layers!r} matches no Linear/Conv layer "
                              f"(layers: {_layer_list(model)})")
        if self.structured and is_transformer(model):
            names = transformer_layers(model)
            if not names:
                raise BadInput(f"{type(model).__name__} has attention but no attention block or "
                               f"FFN whose heads / neurons can be removed (plain Linear layers)")
            if self.layers is not None and not any(re.search(self.layers, n) for n in names):
                shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise FieldError(f"{{layers}} {self.layers!r} matches no attention block or FFN "
                                 f"layer (they are: {shown})")
        elif self.structured:
            bad = unsupported_layer(model)
            if bad is not None:
                name, typ, why = bad
                raise FieldError(f"{{structured}} cannot handle layer {name!r} ({typ}): {why}")
            convs = [n for n, m in model.named_modules()
                     if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
            if not convs:
                raise BadInput(f"{type(model).__name__} has no Linear or Conv layer to prune")
            if self.layers is not None and not any(re.search(self.layers, n) for n in convs):
                raise no_match
        elif not weight_targets(model, self.layers):
            if self.layers is not None and weight_targets(model):
                raise no_match
            raise BadInput(f"{type(model).__name__} has no Linear/Conv layer with float weights "
                           f"to prune")

    # ------------------------------------------------------------------ run
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        check_loader_runs(model, self.finetune, "{finetune}", ctx.device)
        check_loader_runs(model, self.data, "{data}", ctx.device,       # labels: only for losses
                          labels=self.importance_name in ("taylor", "hessian"))
        if self.sensitivity:
            return _run_sensitivity(self, model, ctx)
        if self.lottery:
            return _run_lottery(self, model, ctx)
        return _run_prune(self, model, ctx)
