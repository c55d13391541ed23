"""The pruning step: ``steps`` rounds to the final amount, each round prune -> (evaluate) ->
fine-tune with the zeros kept. One round loop serves both kinds: a :class:`_WeightRounds` or a
:class:`_ChannelRounds` says what one round removes and what its row of the rounds table shows."""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ...core import BadInput, CompressionResult, FieldError, StepContext
from ...train import forward_batch as _forward
from ...tokens import task_loss
from ...train import output_layers
from .channels import ChannelPruner, _check_runs, _shared_layer
from .heads import is_transformer
from .units import HeadPruner, structured_pruner
from .common import _evaluate, _example, _finetune, _importance_for, _pct, recalibrate_bn
from .importance import logits_of
from ...layers import as_linear, is_conv1d
from .learned import THRESHOLD, learn_sparsity, learnable
from .semisparse import to_semi_sparse
from .weights import (_layer_sparsities, _nonzero, _smallest_amount, _sparsity, _zero_masks,
                      parse_pattern, pattern_fits, prune_n_m_, prune_weights_, weight_targets)


def _run_prune(cfg, model: nn.Module, ctx: StepContext) -> CompressionResult:
    """The step. Per-tensor counts are taken once per tensor version (``MEMO.trusting``: every
    change the step makes is in place, which bumps the tensor's version, or makes new tensors)."""
    from ...fingerprint import MEMO

    with MEMO.trusting():
        return _rounds(cfg, model, ctx)


def _rounds(cfg, model: nn.Module, ctx: StepContext) -> CompressionResult:
    import pandas as pd

    imp = _importance_for(cfg)
    data = cfg.data if cfg.data is not None else cfg.finetune
    notes: list[str] = []
    example = _example(cfg, ctx)
    if cfg.structured:
        _check_structured(model, example)
    rows: list[dict] = []
    layer_rows: list[dict] = []
    measure = cfg.steps > 1 or cfg.finetune is not None
    acc0 = _evaluate(ctx, model) if measure else None
    if cfg.sparsity_reg > 0:
        rows.append(_sparsity_reg(cfg, model, ctx, notes))

    kind = (_ChannelRounds if cfg.structured else _PatternRounds if cfg.pattern
            else _LearnedRounds if cfg.learned else _WeightRounds)
    rounds = kind(cfg, model, ctx, imp, example, data, notes)
    for k in range(cfg.steps):
        if imp.needs_data:
            imp.prepare(model, data, device=ctx.device, batches=cfg.importance_batches)
        layer_rows, masks = rounds.prune(k)
        model = rounds.model                 # (a layer may have been replaced in it)
        acc_p = _evaluate(ctx, model) if measure else None
        hist = []
        if cfg.finetune is not None:
            hist = _finetune(cfg, model, ctx, masks, f"fine-tune {k + 1}/{cfg.steps}", k + 1)
        rows.append({"round": k + 1, "stage": "prune" + (" + fine-tune" if hist else ""),
                     **rounds.stats(), "accuracy_pruned": acc_p,
                     "accuracy": _evaluate(ctx, model) if hist else acc_p,
                     "loss": hist[-1]["loss"] if hist else None})
    notes.insert(0, rounds.summary(layer_rows))

    result = CompressionResult(model=model, layers=layer_rows, notes=notes)
    result.tables.update(getattr(rounds, "tables", {}))
    if len(rows) > 1 or cfg.finetune is not None:
        df = pd.DataFrame(rows)
        df = df.dropna(axis=1, how="all")
        result.tables["rounds"] = df
        result.extra["accuracy_before"] = acc0
        result.extra["accuracy_after"] = rows[-1].get("accuracy")
        result.extra["rounds"] = cfg.steps
        if cfg.finetune is not None:
            accs = [r.get("accuracy") for r in rows if r.get("accuracy") is not None]
            if accs and acc0 is not None:
                notes.append(f"fine-tuned {cfg.epochs} epoch(s) after each of {cfg.steps} "
                             f"round(s): accuracy {_pct(acc0)} -> {_pct(accs[-1])}")
    if cfg.target_flops is not None or cfg.target_params is not None:
        result.extra["target"] = ("flops", cfg.target_flops) if cfg.target_flops is not None \
            else ("params", cfg.target_params)
    return result


def _check_structured(model: nn.Module, example) -> None:
    if example is None:
        raise BadInput("--structured traces the model: give an example input (--eval LOADER, "
                       "--data LOADER or %nbcompress NAME --input-shape ...)")
    if is_transformer(model):       # heads / FFN: the pruner leaves layers run twice whole
        return
    shared = _shared_layer(model, example)
    if shared is not None:
        name, typ, calls = shared
        raise FieldError(f"{{structured}} cannot handle layer {name!r} ({typ}): forward calls it "
                         f"{calls} times (shared weights), so its channels cannot be removed for "
                         f"one use only (prune single weights instead: leave out {{structured}})")


def _sparsity_reg(cfg, model: nn.Module, ctx: StepContext, notes: list) -> dict:
    """Network slimming's first stage: fine-tune with an L1 penalty on the BatchNorm scales."""
    lam = float(cfg.sparsity_reg)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.weight is not None]

    def reg_loss(mdl, batch):
        from ...train import split_batch

        x, y = split_batch(batch)
        loss = task_loss(logits_of(_forward(mdl, x)), x, y)
        return loss + lam * sum(b.weight.abs().sum() for b in bns)

    _finetune(cfg, model, ctx, None, "sparsity-reg", round_no=1000, loss_fn=reg_loss)
    small = sum(int((b.weight.detach().abs() < 1e-2).sum()) for b in bns)
    total = sum(b.weight.numel() for b in bns)
    notes.append(f"trained {cfg.epochs} epoch(s) with L1 {lam:g} on BatchNorm scales first: "
                 f"{small}/{total} scales below 0.01")
    return {"round": 0, "stage": "sparsity-reg", "accuracy_pruned": None,
            "accuracy": _evaluate(ctx, model)}


class _WeightRounds:
    """Weights: round k takes the selected layers from their sparsity at the start to the final
    one on a geometric schedule of the fraction kept."""

    def __init__(self, cfg, model, ctx, imp, example, data, notes):
        self.cfg, self.model, self.imp = cfg, model, imp
        targets = self._take(weight_targets(model, cfg.layers, notes), ctx)
        self.final = _weight_final_sparsity(cfg, model, ctx, targets, example, imp, data)
        if self.final <= self.start:
            notes.append(f"the selected layers are already {self.start:.1%} sparse (asked for "
                         f"{self.final:.1%}): no weight removed")
        self.outputs = output_layers(model, targets, example)
        self.out_rate = cfg.output_rate if cfg.output_rate is not None else 1.0

    def _take(self, targets, ctx, keep=None, notes=None, why: str = ""):
        """Select ``targets`` (those ``keep`` accepts; the others named in ``notes`` as left
        whole, ``why``) and record where their sparsity starts. Returns the selection."""
        if keep is not None:
            left = [name for name, mod in targets if not keep(mod)]
            if left:
                notes.append(f"{why}: {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}")
            targets = [(name, mod) for name, mod in targets if keep(mod)]
        self.targets = targets
        self.n_sel = sum(m.weight.numel() for _, m in targets)
        self.progress = ctx.progress
        nz0 = {n: _nonzero(m.weight) for n, m in targets}
        self.start_layers = {n: 1.0 - nz0[n] / m.weight.numel() for n, m in targets}
        self.start = sum(m.weight.numel() - nz0[n] for n, m in targets) / self.n_sel
        return targets

    def _started(self, layer_rows: list[dict]) -> float:
        """The layer rows' sparsity before the step (not the last round's), and the selected
        layers' sparsity now."""
        for r in layer_rows:
            r["sparsity_before"] = self.start_layers[r["layer"]]
        return 1 - self._nonzero() / self.n_sel

    def prune(self, k: int):
        cfg, start, final = self.cfg, self.start, self.final
        keep_k = (1 - start) * ((1 - final) / (1 - start)) ** ((k + 1) / cfg.steps) \
            if final > start else 1 - start
        s_k = 1 - keep_k
        if cfg.resolved_scope == "layer" and self.out_rate != 1.0:
            spars = _layer_sparsities(self.targets, self.outputs, s_k, self.out_rate)
            rows = prune_weights_(self.model, spars, importance=self.imp, targets=self.targets,
                                  seed=cfg.seed + k, progress=self.progress)
        else:
            rows = prune_weights_(self.model, s_k, importance=self.imp, scope=cfg.resolved_scope,
                                  targets=self.targets, seed=cfg.seed + k, progress=self.progress)
        # the masks (one byte per weight) keep the zeros through fine-tuning: only then
        return rows, _zero_masks(self.targets) if cfg.finetune is not None else []

    def _nonzero(self) -> int:
        return sum(_nonzero(m.weight) for _, m in self.targets)

    def stats(self) -> dict:
        return {"sparsity": 1 - self._nonzero() / self.n_sel}

    def summary(self, layer_rows: list[dict]) -> str:
        sp = self._started(layer_rows)
        return (f"weights ({self.imp.name}, {self.cfg.resolved_scope} scope): {sp:.1%} of "
                f"{self.n_sel:,} weights in {len(self.targets)} layers are zero")


class _PatternRounds(_WeightRounds):
    """N:M (``pattern``): one round takes every layer that fits to the pattern; with 2:4 the plain
    ``nn.Linear`` layers become :class:`~.semisparse.SemiSparseLinear`, whose inference forward
    runs on NVIDIA's sparse tensor cores where there are some."""

    def __init__(self, cfg, model, ctx, imp, example, data, notes):
        self.cfg, self.model, self.imp, self.notes = cfg, model, imp, notes
        self.n, self.m = parse_pattern(cfg.pattern)
        self._take(weight_targets(model, cfg.layers, notes), ctx,
                   lambda mod: pattern_fits(mod, self.m), notes,
                   f"left whole, their inputs per output channel are not a multiple of {self.m}")
        self.kernels: list[str] = []
        self.conv1d = 0

    def prune(self, k: int):
        rows = prune_n_m_(self.targets, self.n, self.m, importance=self.imp, seed=self.cfg.seed,
                          progress=self.progress)
        if (self.n, self.m) == (2, 4):
            from ..quantize.common import replace   # (here: importing quantize at load time
            #                                          would register it before prune)
            for i, (name, mod) in enumerate(self.targets):
                if is_conv1d(mod):          # GPT-2's Conv1D: the Linear it is, then 2:4 kernels
                    lin = as_linear(mod)
                    self.model = replace(self.model, name, lin)
                    self.targets[i] = (name, lin)
                    self.conv1d += 1
            self.kernels = [name for name, mod in self.targets if to_semi_sparse(mod)]
        return rows, _zero_masks(self.targets) if self.cfg.finetune is not None else []

    def summary(self, layer_rows: list[dict]) -> str:
        sp = self._started(layer_rows)
        if self.kernels:
            self.notes.append(
                f"2:4: {len(self.kernels)} Linear layer(s) run their inference forward on NVIDIA "
                f"sparse tensor cores (compute capability 8.0+, through "
                f"torch.sparse.to_sparse_semi_structured); on the CPU and while training they run "
                f"dense, and the zeros are packed when saved"
                + (f" ({self.conv1d} transformers Conv1D layers became the nn.Linear they are)"
                   if self.conv1d else ""))
        return (f"weights ({self.imp.name}, {self.cfg.pattern} pattern): {sp:.1%} of "
                f"{self.n_sel:,} weights in {len(self.targets)} layers are zero")


class _LearnedRounds(_WeightRounds):
    """``learned``: one round of sparse variational dropout training (:mod:`.learned`) decides
    which weights go: those it found to be noise, or, with an amount, the least needed ones over
    all layers; the fine-tune after it keeps them zero."""

    def __init__(self, cfg, model, ctx, imp, example, data, notes):
        self.cfg, self.model, self.ctx, self.notes = cfg, model, ctx, notes
        self._take(weight_targets(model, cfg.layers, notes), ctx, learnable, notes,
                   "left as they are (no learned dropout for them)")
        self.imp = None
        self.tables = {}

    def prune(self, k: int):
        cfg = self.cfg
        self.imp, learning = learn_sparsity(cfg, self.model, self.ctx, self.targets, self.notes)
        if learning:
            self.tables["learning"] = pd.DataFrame(learning)
        if cfg.amount is not None:
            rows = prune_weights_(self.model, cfg.amount, importance=self.imp, scope="global",
                                  targets=self.targets, seed=cfg.seed, progress=self.progress)
        else:
            rows = []
            for name, mod in self.targets:
                before = _sparsity(mod.weight)
                with torch.no_grad():
                    mod.weight.masked_fill_(self.imp.log_alphas[name] >= THRESHOLD, 0.0)
                rows.append({"layer": name, "type": type(mod).__name__,
                             "weights": mod.weight.numel(), "sparsity_before": before,
                             "sparsity": _sparsity(mod.weight)})
        return rows, _zero_masks(self.targets) if cfg.finetune is not None else []

    def summary(self, layer_rows: list[dict]) -> str:
        sp = self._started(layer_rows)
        how = (f"the {self.cfg.amount:.1%} with the highest log alpha" if self.cfg.amount
               is not None else f"every weight with log alpha >= {THRESHOLD:g}")
        return (f"weights (learned: sparse variational dropout, {how} dropped): {sp:.1%} of "
                f"{self.n_sel:,} weights in {len(self.targets)} layers are zero")


class _ChannelRounds:
    """Channels: round k removes channels until each group (or, with a target, the model's FLOPs
    or parameters) is at its share of the final amount; the dependency graph is built anew each
    round, on the model as the last round left it."""

    def __init__(self, cfg, model, ctx, imp, example, data, notes):
        self.cfg, self.model, self.ctx, self.imp = cfg, model, ctx, imp
        self.example, self.data, self.notes = example, data, notes
        self.base_channels: dict[str, int] | None = None
        self.base_params = self.base_flops = None
        self.amount = None

    def _first(self, cp: ChannelPruner) -> None:
        self.base_channels = {gi.name: gi.channels for gi in cp.groups}
        self.base_params, self.base_flops, _ = cp._base()
        if not cp.scores():
            raise FieldError(f"{{importance={self.imp.name!r}}} has no score for any channel "
                             f"group")
        skipped = [gi.name for gi in cp.groups if gi.name not in cp.scores()]
        if skipped:
            self.notes.append(f"no {self.imp.name} score for {', '.join(skipped)}: left as is")

    def prune(self, k: int):
        cfg, model = self.cfg, self.model
        cp = structured_pruner(model, self.example, self.imp, layers=cfg.layers,
                               round_to=cfg.round_to, scope=cfg.resolved_scope)
        outside = f" or is outside {{layers}} {cfg.layers!r}" if cfg.layers else ""
        if not cp.groups and isinstance(cp, HeadPruner):
            whole = [n for n in cp.notes if n.startswith("left whole")]
            raise FieldError("no attention head or FFN neuron to prune" + (outside or "")
                             + (f" ({whole[0]})" if whole else ""))
        if not cp.groups:
            raise FieldError("no channels to prune: every Linear/Conv layer feeds the output"
                             + outside)
        if self.base_channels is None:
            if isinstance(cp, HeadPruner):
                self.notes.extend(cp.notes)
            self._first(cp)
        frac = (k + 1) / cfg.steps
        if cfg.target_flops is not None or cfg.target_params is not None:
            metric = "flops" if cfg.target_flops is not None else "params"
            keep_final = cfg.target_flops if metric == "flops" else cfg.target_params
            base = self.base_flops if metric == "flops" else self.base_params
            if base is None:
                raise FieldError("{target_flops} needs the model's FLOPs: give an example input")
            amount = cp.search(metric, base * keep_final ** frac, self.base_channels)
        else:
            amount = 1 - (1 - cfg.amount) ** frac
        self.amount = amount
        rows = cp.apply(cp.plan(amount, self.base_channels))
        self.notes.extend(n for n in cp.notes if n not in self.notes)   # groups left whole
        _check_runs(model, self.example)
        if cfg.recalibrate_bn and self.data is not None and \
                recalibrate_bn(model, self.data, self.ctx.device, cfg.importance_batches) and k == 0:
            self.notes.append(f"BatchNorm statistics re-estimated on {cfg.importance_batches} "
                              f"batches after each pruning round (no training)")
        return rows, _zero_masks(weight_targets(model))

    def stats(self) -> dict:
        from ...metrics import count_params

        return {"amount": self.amount, "params": count_params(self.model)[0]}

    def summary(self, layer_rows: list[dict]) -> str:
        first = self.base_channels or {}
        for r in layer_rows:       # the channels the step started from, not the last round's
            r["channels_before"] = first.get(r["layer"], r["channels_before"])
            r["kept"] = r["channels"] / r["channels_before"]
        head = f"structured ({self.imp.name}, {self.cfg.resolved_scope} scope, round to " \
               f"{self.cfg.round_to}"
        by_unit: dict[str, list[dict]] = {}
        for r in layer_rows:
            by_unit.setdefault(r.get("unit", "channel"), []).append(r)
        parts = []
        for unit, rs in by_unit.items():
            now, was = sum(r["channels"] for r in rs), sum(r["channels_before"] for r in rs)
            what = {"head": "attention blocks", "neuron": "FFNs"}.get(unit, "groups")
            blocks = sum(r.get("blocks", 1) for r in rs)
            parts.append(f"{now:,} of {was:,} {unit}s ({now / max(1, was):.1%}) in {blocks} "
                         f"{what}" if unit != "channel" else
                         f"{now / max(1, was):.1%} of the channels of {len(rs)} groups kept")
        if "head" in by_unit or "neuron" in by_unit:
            head += ", heads whole"
        return head + "): " + "; ".join(parts) + (" kept" if "channel" not in by_unit else "")


def _weight_final_sparsity(cfg, model, ctx, targets, example, imp, data) -> float:
    """The sparsity of the selected layers the step ends at: ``amount``, or the one that reaches
    ``target_params`` (nonzero parameters kept) / ``target_flops`` (sparse FLOPs kept)."""
    from ...metrics import count_flops, count_params

    if cfg.amount is not None:
        return float(cfg.amount)
    n_sel = sum(m.weight.numel() for _, m in targets)
    if cfg.target_params is not None:
        _, nz = count_params(model)
        nz_sel = sum(_nonzero(m.weight) for _, m in targets)
        want_nz = cfg.target_params * nz
        nz_sel_after = want_nz - (nz - nz_sel)
        if nz_sel_after < 1:
            raise FieldError(f"{{target_params={cfg.target_params:g}}} cannot be reached by "
                             f"pruning the selected weights: the other parameters alone are "
                             f"{(nz - nz_sel) / nz:.1%} of the nonzero ones")
        return min(1.0 - 1.0 / n_sel, 1 - nz_sel_after / n_sel)
    # target_flops on sparse FLOPs: scale by density; bisection on a scratch copy of the weights
    if example is None:
        raise BadInput("--target-flops needs an example input (--eval LOADER or --data LOADER)")
    flops, sparse, per_leaf = count_flops(model, example)
    want = cfg.target_flops * sparse
    fixed = sparse - sum(per_leaf.get(n, 0) * (1 - _sparsity(m.weight)) for n, m in targets)
    if imp.needs_data:
        imp.prepare(model, data, device=ctx.device, batches=cfg.importance_batches)
    saved = {n: m.weight.detach().clone() for n, m in targets}

    def sparse_flops_at(s):
        prune_weights_(model, s, importance=imp, scope=cfg.resolved_scope, targets=targets,
                       seed=cfg.seed)
        val = fixed + sum(per_leaf.get(n, 0) * (1 - _sparsity(m.weight)) for n, m in targets)
        with torch.no_grad():
            for n, m in targets:
                m.weight.copy_(saved[n])
        return val

    if sparse_flops_at(0.999) > want:
        raise FieldError(f"{{target_flops={cfg.target_flops:g}}} cannot be reached by pruning "
                         f"the selected weights (layers without weights to prune keep their "
                         f"FLOPs)")
    return _smallest_amount(sparse_flops_at, want, 0.999)

