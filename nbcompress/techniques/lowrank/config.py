"""``LowRankConfig``: the options of ``%lowrank`` / :func:`lowrank`, declared once, the checks
declarations cannot say (against the model), and ``run``: select the layers
(``candidates.py``), choose their ranks (``plans.py``), factorise them (``factorize.py``),
re-estimate BatchNorm statistics (``batchnorm.py``) and fine-tune."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ...batches import check_loader_runs, head, peek_batch, split_batch, to_device
from ...core import (BadInput, CompressionResult, FieldError, StepConfig, StepContext,
                     check_still_runs, model_device)
from ...counting import count_flops, count_params
from ...layers import as_linear, is_conv1d
from ...options import option
from ...train import fit
from .batchnorm import recalibrate_batchnorm
from .candidates import candidates, replace
from .factorize import _ksize
from .layer import LowRank
from .plans import allocate, check_target, make_plan, parse_target

__all__ = ["LowRankConfig", "CONV_MODES"]

CONV_MODES = ("svd", "tucker", "separable", "none")
_RANK_OPTIONS = ("rank", "ratio", "energy", "target_params")


@dataclass
class LowRankConfig(StepConfig):
    """Factorise the model's Linear and Conv2d layers into low-rank or depthwise-separable
    forms, and rebind the name to the result (``%undo`` goes back).

    A Linear becomes two Linears through ``r`` units (truncated SVD). A k x k Conv2d becomes
    two or three convs (``--conv``). A layer whose factorised form would not be smaller is kept
    and named in the notes, and so is the classifier (the layer producing the model's output)
    unless ``--layers`` selects it. With a loader (``--data`` or ``--finetune``) the BatchNorm
    statistics are re-estimated for the new layers, then ``--finetune`` trains with the shared
    loop. The report lists, per factorised layer, its rank, parameters and
    FLOPs before and after, the energy kept and the relative reconstruction error
    ``||W - W_hat|| / ||W||``. Returns the step's report.
    """

    technique: ClassVar[str] = "lowrank"
    trains_with: ClassVar[str | None] = "finetune"
    summary: ClassVar[str] = "low-rank (SVD, Tucker-2) and depthwise-separable layers"
    examples: ClassVar[tuple] = (
        "%lowrank model --target-params 3x --finetune train_loader --epochs 1",
        '%lowrank cnn --conv separable --layers "layer|down" --finetune train_loader --lr 1e-3',
        '%lowrank net --energy 0.8 --layers "fc[12]"',
    )

    rank: int | None = option(
        None, kind="int", range="[1, inf)", metavar="R",
        conflicts=("ratio", "energy", "target_params"),
        help="rank of every factorised layer, capped at each layer's full rank "
             "(for --conv separable: the depth multiplier; for tucker: both ranks)")
    ratio: float | None = option(
        None, kind="float", range="(0, 1]", metavar="F", conflicts=("energy", "target_params"),
        help="rank as a fraction of each layer's full rank, in (0, 1]")
    energy: float | None = option(
        None, kind="float", range="(0, 1]", metavar="E", conflicts=("target_params",),
        help="keep this share of each layer's squared singular values, in (0, 1] "
             "(the default, 0.9, when no rank option is given; separable convs then use "
             "depth multiplier 1)")
    target_params: Any = option(
        None, kind="str", accepts=(numbers.Real,), check=check_target, metavar="P",
        help="parameters of the whole model after: a count (80000), a fraction (0.33) or "
             "N times fewer (3x); ranks are allocated across layers by singular values "
             "(each kept one carries at least a threshold share of its layer's energy, "
             "the lowest threshold that fits)")
    layers: str | None = option(
        None, kind="regex", metavar="REGEX",
        help="only layers whose name matches this regular expression (re.search; "
             "quotes optional: --layers \"layer|down\"). Without it the classifier (the "
             "layer producing the model's output) is kept whole; a pattern matching it "
             "(--layers . for every layer) factorises it too")
    conv: str = option(
        "svd", kind="choice", choices=CONV_MODES, optional=False,
        help="how to factorise k x k convs: svd (k x k conv to r channels + 1x1), tucker "
             "(1x1, k x k core, 1x1), separable (depthwise + pointwise), none (leave them)")
    finetune: Any = option(
        None, kind="loader",
        help="DataLoader to fine-tune on after factorising (the shared train loop)")
    epochs: int = option(
        1, kind="int", range="[1, inf)", requires="finetune", optional=False,
        help="fine-tuning epochs (default 1)")
    lr: float = option(
        3e-4, kind="float", range="(0, inf)", requires="finetune", optional=False,
        help="fine-tuning learning rate, Adam with cosine decay (default 3e-4; heavy "
             "factorisations such as --conv separable recover better at 1e-3)")
    scheduler: str | None = option(
        "cosine", kind="choice", choices=("cosine",), magic=False,
        help="learning-rate schedule of the fine-tuning: 'cosine' decays it to 0, None keeps "
             "it constant")
    data: Any = option(
        None, kind="loader",
        help="batches to re-estimate BatchNorm statistics with after factorising "
             "(default: the --finetune loader)")
    calib_batches: int = option(
        20, kind="int", range="[1, inf)", magic=False, optional=False,
        help="how many batches of data (or finetune) re-estimate the BatchNorm statistics")
    seed: int | None = option(
        0, kind="int", magic=False,
        help="seed of the fine-tuning (shuffling, dropout); None: not seeded")

    def __post_init__(self):
        # choices are matched without case (as on the magic line): one spelling from here on
        for f in ("conv", "scheduler"):
            v = getattr(self, f)
            if isinstance(v, str):
                setattr(self, f, v.lower())

    # ------------------------------------------------------------------ checks
    def _mode(self) -> str:
        """Which rank option was given (at most one: a declared conflict), else 'default'."""
        given = [n for n in _RANK_OPTIONS if getattr(self, n) is not None]
        return given[0] if given else "default"

    def validate(self, model: nn.Module) -> None:
        """What the declarations cannot say: the layers to factorise exist, a ``rank`` is within
        some selected layer's full rank, a ``target_params`` budget is below the model's size and
        reachable at rank 1."""
        mode = self._mode()
        cands, _ = candidates(model, self.layers, self.conv, self._loader_example(model))
        plans = [make_plan(n, as_linear(m), self.conv) for n, m, _ in cands]
        if mode == "rank":
            best = max(plans, key=lambda p: p.max_full())
            if self.rank > best.max_full():
                raise FieldError(f"{{rank={self.rank}}} is above the full rank of every selected "
                                 f"layer (the largest is {best.max_full()}, {best.name})")
        if mode == "target_params":
            total = count_params(model)[0]
            target = parse_target(self.target_params, total)
            given = f"{{target_params={self.target_params!r}}}"
            if target >= total:
                raise FieldError(f"{given} asks for {target:,} parameters; the model already has "
                                 f"{total:,}")
            floor = total - sum(p.dense_params - p.min_params() for p in plans)
            if target < floor:
                raise FieldError(f"{given} ({target:,}) cannot be reached: rank 1 in every "
                                 f"selected layer still leaves {floor:,} parameters")

    def _loader_example(self, model: nn.Module, device=None) -> Any:
        """Two inputs from the first batch of ``data`` or ``finetune`` (None without a loader), on
        ``device`` (default: the model's)."""
        loader = self.data if self.data is not None else self.finetune
        if loader is None:
            return None
        try:
            x, _ = split_batch(peek_batch(loader))
        except BadInput:
            return None
        x = head(x, 2)
        return to_device(x, device if device is not None else model_device(model))

    # ------------------------------------------------------------------ the work
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        check_loader_runs(model, self.finetune, "{finetune}", ctx.device)
        check_loader_runs(model, self.data, "{data}", ctx.device, labels=False)  # BN statistics
        example = (to_device(ctx.example_input, ctx.device) if ctx.example_input is not None
                   else self._loader_example(model, ctx.device))
        cands, notes = candidates(model, self.layers, self.conv, example)
        mode = self._mode()
        if mode == "default" and self.conv == "separable":
            # multiplier 1 on a conv that reads one channel per group is a rank-1 conv (every
            # output a scaled copy of one filter response): keep it, as MobileNet keeps its stem
            single = [n for n, m, _ in cands
                      if isinstance(m, nn.Conv2d) and m.in_channels == m.groups and _ksize(m) > 1]
            if single:
                notes.append("kept " + ", ".join(single) + ": one input channel per group, so depth "
                             "multiplier 1 would leave a rank-1 conv (give {rank} or {energy} to "
                             "factorise it anyway)")
                cands = [c for c in cands if c[0] not in single]
        paths = {n: ps for n, _, ps in cands}
        x = to_device(ctx.example_input, ctx.device) if ctx.example_input is not None else None
        flops_before = count_flops(model, x)[2] if x is not None else {}
        plans = [make_plan(n, as_linear(m), self.conv) for n, m, _ in cands]
        layouts = {n: "conv1d" if is_conv1d(m) else "conv" if isinstance(m, nn.Conv2d)
                   else "linear" for n, m, _ in cands}
        value = getattr(self, mode) if mode != "default" else None
        ranks, threshold = allocate(plans, mode, value, count_params(model)[0])

        rows, skipped, replaced = [], [], {}
        extra: dict = {}
        for p in plans:
            r = ranks[p.name]
            after = p.params(r)
            if after >= p.dense_params:
                skipped.append(f"{p.name} (rank {p.rank_text(r)}: {after:,} >= {p.dense_params:,} params)")
                continue
            new = LowRank.of(p.build(r), p.module, layouts[p.name])
            for path in paths[p.name]:
                replace(model, path, new)
            replaced[p.name] = new
            err = p.error(new)
            p.release()
            rows.append({"layer": p.name, "kind": p.kind, "shape": p.shape(), "rank": p.rank_text(r),
                         "full_rank": p.rank_text(p.full()),
                         "params_before": p.dense_params, "params_after": after,
                         "flops_before": flops_before.get(p.name), "flops_after": None,
                         "energy_kept": round(max(0.0, 1.0 - err * err), 6),
                         "rel_error": round(err, 6)})
        if skipped:
            notes.append("kept dense (factorising would not save parameters): " + ", ".join(skipped))
        if not rows:
            notes.append("no layer was factorised: every selected layer would grow at these ranks")
        if x is None and example is not None and rows:  # the original ran on it above
            check_still_runs(model, None, example, self.technique)
        if x is not None and rows:
            try:                    # counting runs the model: a failure there is a refusal
                per_leaf = count_flops(model, x)[2]
            except Exception:
                check_still_runs(model, None, x, self.technique)
                raise
            for row in rows:
                pre = paths[row["layer"]][0] + "."
                row["flops_after"] = sum(v for k, v in per_leaf.items() if k.startswith(pre))
        if threshold is not None:
            notes.append(f"ranks allocated across layers by singular values: each kept component "
                         f"carries at least {100 * threshold:.3g}% of its layer's energy")
            extra["share_threshold"] = threshold
        n_1x1 = [p.name for p in plans if p.kind == "conv-svd" and self.conv in ("tucker", "separable")
                 and p.name in replaced]
        if n_1x1:
            notes.append(f"1x1 convs factorised by SVD ({{conv='{self.conv}'}} needs a spatial kernel): "
                         + ", ".join(n_1x1))
        if rows:
            extra["layers_factorised"] = len(rows)
            extra["params_saved"] = sum(r["params_before"] - r["params_after"] for r in rows)
            self._recalibrate(model, ctx, notes)
            self._finetune(model, ctx, notes, extra)
        model.eval()
        return CompressionResult(model, layers=rows, notes=notes, extra=extra)

    def _recalibrate(self, model: nn.Module, ctx: StepContext, notes: list[str]) -> None:
        """BatchNorm statistics fitted to the factorised layers (``data``, else ``finetune``)."""
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return
        calib = self.data if self.data is not None else self.finetune
        if calib is None:
            notes.append("BatchNorm statistics not re-estimated: pass {data=LOADER} (or "
                         "{finetune}) to fit them to the factorised layers")
            return
        n = recalibrate_batchnorm(model, calib, ctx.device, self.calib_batches)
        if n:
            notes.append(f"re-estimated BatchNorm statistics on {n} batch{'es' if n != 1 else ''}")

    def _finetune(self, model: nn.Module, ctx: StepContext, notes: list[str], extra: dict) -> None:
        if self.finetune is None:
            return
        if ctx.evaluator is not None:
            extra["accuracy_before_finetune"] = ctx.evaluate(model)
        hist = fit(model, self.finetune, epochs=self.epochs, lr=self.lr, device=ctx.device,
                   scheduler=self.scheduler, progress=ctx.progress, desc="lowrank fine-tune",
                   seed=self.seed)
        extra["finetune_loss"] = round(hist[-1]["loss"], 6)
        notes.append(f"fine-tuned {self.epochs} epoch{'s' if self.epochs != 1 else ''} at lr "
                     f"{self.lr:g}" + (f" ({self.scheduler} decay)" if self.scheduler else ""))
