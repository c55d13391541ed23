"""Pruning: remove what matters least.

Two kinds, one config (:class:`PruneConfig`), one verb (:func:`prune`):

- **weight pruning** zeroes single weights of Linear/Conv layers (global or per layer), by an
  importance criterion (:mod:`nbcompress.importance`: magnitude by default). The zeros are
  permanent (plain tensors, no masks or hooks left behind); ``nbcompress.save`` stores them
  compactly, so packed bytes and sparse FLOPs fall. Dense hardware does not run it faster.
- **structured pruning** (``structured=True``) removes whole output neurons / conv channels and
  keeps every coupled layer consistent (BatchNorm, residual adds, concatenation, the next layer's
  inputs, flatten into Linear) with the dependency graph of ``torch-pruning``. The result is a
  smaller dense network that really runs faster. Channel counts are rounded to multiples of
  ``round_to`` (default 8: odd widths run slowly on CPU vector units and GPU tensor cores).
  The classifier's outputs (any layer whose channels reach the model output) are never removed.

Around both: ``steps`` rounds to the final amount with fine-tuning between rounds (``finetune``
loader, the shared :func:`nbcompress.train.fit`; pruned weights stay zero through an
``after_step`` hook), ``target_flops`` / ``target_params`` (search the amount that keeps that
fraction), ``lottery`` (iterative magnitude pruning with rewinding to the initial weights, the
ticket compared with the dense model and with a random re-initialisation of the same mask), and
``sensitivity`` (prune each layer alone at several amounts, evaluate, return the table and a plot;
the model is not changed).

``AMOUNT`` is the fraction removed: for weights, the sparsity the selected layers have after the
step (zeros already there count, so ``prune(m, 0.5)`` twice is one step of work); with
``structured``, the fraction of each group's channels removed (``scope="global"``: of all
channels, ranked together on normalised scores).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .core import (BadInput, CompressionResult, StepConfig, StepContext, compress, model_device,
                   register_technique, resolve_device)
from .importance import (IMPORTANCES, Importance, MagnitudeImportance, get_importance, logits_of,
                         normalized)
from .train import check_loader_runs, first_line, output_layers, peek_batch
from .train import eval_mode as _eval_mode
from .train import forward_batch as _forward

__all__ = ["PruneConfig", "prune", "sensitivity", "prune_weights_", "ChannelPruner",
           "weight_targets", "recalibrate_bn", "demo_config"]

_PRUNABLE_WEIGHTS = (nn.Linear, nn.modules.conv._ConvNd)
_STRUCTURED_OK = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                  nn.ConvTranspose2d, nn.ConvTranspose3d, nn.modules.batchnorm._BatchNorm,
                  nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)
_EXACT_LIMIT = 1 << 21          # up to this many scores: one exact kthvalue; beyond: sample + refine
_DEFAULT_AMOUNTS = (0.1, 0.3, 0.5, 0.7, 0.9)


# ===================================================================================== helpers

def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_loader(v: Any) -> bool:
    return isinstance(v, torch.utils.data.DataLoader)






def _example_from_loader(loader) -> torch.Tensor | None:
    if not _is_loader(loader):
        return None
    batch = peek_batch(loader)      # leaves a shuffled loader's order as it was
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return x[:1].clone() if isinstance(x, torch.Tensor) else None


def _smallest_amount(value: Callable[[float], float], target: float, hi: float) -> float:
    """The smallest amount in [0, hi] (to 1e-4) whose ``value`` (falling as the amount grows) is
    at most ``target``; the caller has checked that ``value(hi)`` reaches it."""
    lo = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if value(mid) <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return hi


def _shared_layer(model: nn.Module, example: Any) -> tuple[str, str, int] | None:
    """(name, type, calls) of the first layer with weights that one forward calls more than once
    (shared weights: structured pruning cannot shrink it for one use and not the other)."""
    counts: dict[nn.Module, int] = {}
    names = {}
    handles = []
    for name, m in model.named_modules():
        if any(p is not None for p in m._parameters.values()):
            names[m] = name or "(model)"
            handles.append(m.register_forward_hook(
                lambda mod, args, out: counts.__setitem__(mod, counts.get(mod, 0) + 1)))
    try:
        with torch.no_grad(), _eval_mode(model):
            _forward(model, example)
    except Exception:  # noqa: BLE001 - tracing reports a model that does not run
        return None
    finally:
        for h in handles:
            h.remove()
    for m, n in counts.items():
        if n > 1:
            return names[m], type(m).__name__, n
    return None


def _float_weight(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, nn.Parameter) and w.is_floating_point()


def weight_targets(model: nn.Module, layers: str | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs weight pruning works on: Linear and Conv layers with a float
    weight, whose name matches the ``layers`` regular expression (``re.search``) when given."""
    pat = re.compile(layers) if layers else None
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _PRUNABLE_WEIGHTS) and _float_weight(m) and m.weight.numel() > 0:
            if pat is None or pat.search(name):
                out.append((name, m))
    return out


def _sparsity(t: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(t)) / t.numel() if t.numel() else 0.0


# ============================================================================ weight pruning

class _Scores:
    """Lazily computed importance scores of one weight tensor. Already-zero weights score below
    everything (they are pruned already), so ``amount`` is the sparsity after the step."""

    def __init__(self, name: str, module: nn.Module, importance: Importance, cache: bool):
        self.name, self.module, self.importance = name, module, importance
        self.numel = module.weight.numel()
        self._cache = cache
        self._value: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self._value is not None:
            return self._value
        w = self.module.weight.detach()
        s = self.importance.weight_scores(self.name, self.module)
        if s.shape != w.shape:
            raise BadInput(f"--importance {self.importance.name} gave scores of shape "
                           f"{tuple(s.shape)} for layer {self.name!r} of shape {tuple(w.shape)}")
        s = s.float().reshape(-1)
        if not isinstance(self.importance, _MAGNITUDE):
            s = torch.where(w.reshape(-1) == 0, torch.full_like(s, -1.0), s)
        if self._cache:
            self._value = s
        return s


def _kth_smallest(scores: list[Callable[[], torch.Tensor]], numels: list[int], k: int,
                  seed: int = 0) -> tuple[float, int]:
    """(t, below): the k-th smallest score over all tensors (1-based) and how many scores are
    strictly below it. Small inputs: one exact ``kthvalue``. Large ones are never concatenated:
    a random sample brackets the k-th value, one pass per tensor counts what lies below the
    bracket and keeps what lies inside it, and ``kthvalue`` runs on that small remainder
    (widening the bracket in the rare case the sample missed)."""
    total = sum(numels)
    if total <= _EXACT_LIMIT:
        allv = torch.cat([f() for f in scores])
        t = torch.kthvalue(allv.cpu(), k).values
        return float(t), int(torch.count_nonzero(allv.cpu() < t))
    g = torch.Generator().manual_seed(seed)
    m = 1 << 17
    sample = []
    for f, n in zip(scores, numels):
        take = max(1, int(round(m * n / total)))
        idx = torch.randint(n, (take,), generator=g)
        s = f()
        sample.append(s[idx.to(s.device)].cpu())
    sample = torch.cat(sample).sort().values
    ms = sample.numel()
    q = k / total
    centre = q * ms
    d = 4.0 * math.sqrt(max(ms * q * (1 - q), 1.0)) + 16
    while True:
        lo_i, hi_i = int(centre - d), int(centre + d)
        lo = float(sample[lo_i]) if lo_i >= 0 else -math.inf
        hi = float(sample[hi_i]) if hi_i < ms else math.inf
        below = 0
        cands = []
        for f in scores:
            s = f()
            below += int(torch.count_nonzero(s < lo))
            cands.append(s[(s >= lo) & (s <= hi)].cpu())
        c = torch.cat(cands)
        if below < k <= below + c.numel():
            t = torch.kthvalue(c, k - below).values
            return float(t), below + int(torch.count_nonzero(c < t))
        if lo == -math.inf and hi == math.inf:   # cannot happen: everything is a candidate
            raise RuntimeError("selection failed")
        d *= 4


def _apply_threshold(items: list[_Scores], k: int, seed: int) -> None:
    """Zero the ``k`` lowest-scoring weights over ``items`` exactly (ties at the threshold are
    taken in order)."""
    if k <= 0:
        return
    t, below = _kth_smallest(items, [it.numel for it in items], k, seed)
    need_eq = k - below
    for it in items:
        s = it()
        drop = s < t
        if need_eq > 0:
            eq = s == t
            n_eq = int(torch.count_nonzero(eq))
            if n_eq:
                take = min(need_eq, n_eq)
                if take < n_eq:
                    pos = eq.nonzero().flatten()[:take]
                    eq = torch.zeros_like(eq)
                    eq[pos] = True
                drop |= eq
                need_eq -= take
        w = it.module.weight
        with torch.no_grad():
            w.masked_fill_(drop.view(w.shape), 0.0)   # +0.0, never -0.0


def prune_weights_(model: nn.Module, sparsity: float | dict[str, float], *,
                   importance: str | Importance = "l1", scope: str = "global",
                   layers: str | None = None, targets: list | None = None,
                   seed: int = 0) -> list[dict]:
    """Zero weights of ``model`` in place until the selected layers reach ``sparsity`` (a float,
    or ``{layer name: sparsity}`` for per-layer targets). Returns one row per layer touched.

    ``scope="global"``: one threshold over all selected weights (one selection, no
    concatenation for large models); ``"layer"``: each layer to the same sparsity.
    """
    imp = get_importance(importance, seed=seed)
    if targets is None:
        targets = weight_targets(model, layers)
    if not targets:
        raise BadInput("no Linear/Conv layers with float weights to prune"
                       + (f" match --layers {layers!r}" if layers else ""))
    before = {n: _sparsity(m.weight) for n, m in targets}
    total = sum(m.weight.numel() for _, m in targets)
    cache = total <= (1 << 26)
    items = [_Scores(n, m, imp, cache) for n, m in targets]
    if isinstance(sparsity, dict):
        for it in items:
            s = sparsity.get(it.name)
            if s is None:
                continue
            k = int(round(s * it.numel))
            if k > round(before[it.name] * it.numel):
                _apply_threshold([it], k, seed)
    elif scope == "layer":
        for it in items:
            k = int(round(sparsity * it.numel))
            if k > round(before[it.name] * it.numel):
                _apply_threshold([it], k, seed)
    else:
        k = int(round(sparsity * total))
        zeros = sum(round(before[it.name] * it.numel) for it in items)
        if k > zeros:
            _apply_threshold(items, k, seed)
    rows = []
    for n, m in targets:
        after = _sparsity(m.weight)
        rows.append({"layer": n, "type": type(m).__name__, "weights": m.weight.numel(),
                     "sparsity_before": before[n], "sparsity": after})
    return rows


_MAGNITUDE = (MagnitudeImportance,)


def _zero_masks(targets: list[tuple[str, nn.Module]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, keep mask) for every selected weight that has zeros: fine-tuning keeps them zero."""
    out = []
    for _, m in targets:
        w = m.weight
        keep = w.detach() != 0
        if not bool(keep.all()):
            out.append((w, keep))
    return out


def _mask_hook(masks):
    def after_step(model):
        for w, keep in masks:
            w.masked_fill_(~keep, 0.0)   # +0.0: w * 0 would leave -0.0, which packs as a value
    return after_step


# ======================================================================== structured pruning

def unsupported_layer(model: nn.Module) -> tuple[str, str, str] | None:
    """(name, type, why) of the first layer structured pruning cannot handle, or None."""
    for name, m in model.named_modules():
        own_params = [p for p in m._parameters.values() if p is not None]
        why = None
        if getattr(m, "_nbc_weight_buffers", None) or hasattr(m, "nbc_count") or \
                type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
            why = "a compressed/quantized layer"
        elif own_params and not isinstance(m, _STRUCTURED_OK):
            why = "a layer type torch-pruning cannot shrink consistently here"
        elif isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups and \
                not (m.groups == m.in_channels == m.out_channels):
            why = f"a grouped convolution (groups={m.groups})"
        elif own_params and any(not p.is_floating_point() for p in own_params):
            why = "a layer with non-float parameters"
        if why:
            return (name or "(model)", type(m).__name__, why)
    return None


@dataclass
class _GroupInfo:
    name: str
    root: nn.Module
    handler: Any
    channels: int
    group: Any
    members: tuple


class ChannelPruner:
    """The channels of a model, as torch-pruning dependency groups, and a policy over them.

    Build it on the model to prune (it traces ``example_input`` once), then ``scores()`` ->
    ``plan(amount)`` -> ``counts(plan)`` (parameters and FLOPs after, without pruning) ->
    ``apply(plan)``. The dependency graph keeps coupled layers consistent; the policy here decides
    how many channels each group keeps (rounded to ``round_to``) and which.
    """

    def __init__(self, model: nn.Module, example_input: Any, importance: Importance, *,
                 layers: str | None = None, round_to: int = 8, scope: str = "layer"):
        import torch_pruning as tp

        self.model = model
        self.example_input = example_input
        self.importance = importance
        self.round_to = max(1, int(round_to))
        self.scope = scope
        try:
            with torch.enable_grad(), _eval_mode(model), contextlib.redirect_stdout(io.StringIO()):
                self.DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                                verbose=False)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - tracing failed: one line for the user
            raise BadInput(f"--structured could not trace the model on the example input: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        self.names = {m: n for n, m in model.named_modules()}
        pat = re.compile(layers) if layers else None
        self.output_modules = self._output_modules()
        self.groups: list[_GroupInfo] = []
        for g in self.DG.get_all_groups(ignored_layers=list(self.output_modules),
                                        root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
            root = g[0].dep.target.module
            if root not in self.names:
                continue
            members = tuple(self.names[it.dep.target.module] for it in g
                            if self.DG.is_out_channel_pruning_fn(it.dep.handler)
                            and it.dep.target.module in self.names)
            name = self.names[root]
            if pat is not None and not any(pat.search(n) for n in members):
                continue
            c = len(g[0].idxs)
            if c < 2:
                continue
            self.groups.append(_GroupInfo(name, root, g[0].dep.handler, c, g, members))
        self._scores: dict[str, torch.Tensor] | None = None
        self._base_counts: tuple[int, int | None] | None = None

    # ------------------------------------------------------------------ graph facts
    def _output_modules(self) -> set:
        """Conv/Linear layers whose channels reach the model output without passing through
        another conv/linear layer: their outputs are the classes and must stay."""
        def passes(mod):
            if isinstance(mod, nn.Linear):
                return False
            if isinstance(mod, nn.modules.conv._ConvNd):
                return mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            return True

        outs = set()
        for m, node in self.DG.module2node.items():
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            stack, seen = [node], {node}
            while stack:
                n = stack.pop()
                if not n.outputs:
                    outs.add(m)
                    break
                for o in n.outputs:
                    if o not in seen:
                        seen.add(o)
                        if passes(o.module):
                            stack.append(o)
        return outs

    # ------------------------------------------------------------------ policy
    def scores(self) -> dict[str, torch.Tensor]:
        """One importance score per channel of every group (groups the criterion has no opinion
        on, e.g. ``bn`` where there is no BatchNorm, are left out)."""
        if self._scores is None:
            out = {}
            for gi in self.groups:
                s = self.importance.channel_scores(gi.group, self.names)
                if s is not None and s.numel() == gi.channels:
                    out[gi.name] = s.float().cpu()
            self._scores = out
        return self._scores

    def _step(self, base: int) -> int:
        return self.round_to if base >= 2 * self.round_to else 1

    def _round(self, keep: float, base: int, current: int) -> int:
        r = self._step(base)
        k = max(r, int(math.floor(keep / r + 0.5 + 1e-9)) * r)   # half up, float noise aside
        return max(1, min(current, k))

    def plan(self, amount: float, base_channels: dict[str, int] | None = None) -> dict[str, list[int]]:
        """{group name: channel indices to remove} so each group keeps ``(1 - amount)`` of its base
        channels (``base_channels``: counts the amount refers to, default the current ones)."""
        scores = self.scores()
        base = {gi.name: (base_channels or {}).get(gi.name, gi.channels) for gi in self.groups}
        keep: dict[str, int] = {}
        live = [gi for gi in self.groups if gi.name in scores]
        if self.scope == "global" and live:
            total_keep = sum(base[gi.name] * (1 - amount) for gi in live)
            flat = torch.cat([normalized(scores[gi.name]) for gi in live])
            owner = torch.cat([torch.full((gi.channels,), i, dtype=torch.long)
                               for i, gi in enumerate(live)])
            order = torch.argsort(flat, descending=True, stable=True)
            kk = int(round(total_keep))
            counts = torch.bincount(owner[order[:kk]], minlength=len(live))
            for i, gi in enumerate(live):
                keep[gi.name] = self._round(float(counts[i]), base[gi.name], gi.channels)
        else:
            for gi in live:
                keep[gi.name] = self._round(base[gi.name] * (1 - amount), base[gi.name],
                                            gi.channels)
        out = {}
        for gi in live:
            n_drop = gi.channels - keep[gi.name]
            if n_drop > 0:
                order = torch.argsort(scores[gi.name], stable=True)
                out[gi.name] = sorted(int(i) for i in order[:n_drop])
        return out

    def counts(self, plan: dict[str, list[int]]) -> tuple[int, int | None]:
        """(parameters, FLOPs) the model would have after ``plan``, counted from the dependency
        groups without pruning anything (FLOPs: the measured per-layer FLOPs scaled by the
        fraction of input and output channels each conv/linear layer keeps)."""
        base_params, base_flops, per_leaf = self._base()
        out_rm: dict[nn.Module, int] = {}
        in_rm: dict[nn.Module, int] = {}
        info = {gi.name: gi for gi in self.groups}
        for name, idxs in plan.items():
            if not idxs:
                continue
            gi = info[name]
            g = self.DG.get_pruning_group(gi.root, gi.handler, list(idxs))
            for it in g:
                m = it.dep.target.module
                if not isinstance(m, nn.Module) or m not in self.names:
                    continue
                if self.DG.is_out_channel_pruning_fn(it.dep.handler):
                    out_rm[m] = out_rm.get(m, 0) + len(it.idxs)
                elif self.DG.is_in_channel_pruning_fn(it.dep.handler):
                    in_rm[m] = in_rm.get(m, 0) + len(it.idxs)
        params = base_params
        flops = base_flops
        for m in set(out_rm) | set(in_rm):
            ro, ri = self._ratios(m, out_rm.get(m, 0), in_rm.get(m, 0))
            for p in m._parameters.values():
                if p is None:
                    continue
                if p is getattr(m, "weight", None) and isinstance(m, _PRUNABLE_WEIGHTS):
                    new = p.numel() * ro * ri
                elif p.dim() >= 1 and p.shape[0] > 1:
                    new = p.numel() * ro
                else:
                    new = p.numel()
                params -= p.numel() - int(round(new))
            if flops is not None and isinstance(m, _PRUNABLE_WEIGHTS):
                f = per_leaf.get(self.names[m], 0)
                flops -= f - int(round(f * ro * ri))
        return params, flops

    def _ratios(self, m: nn.Module, orm: int, irm: int) -> tuple[float, float]:
        if isinstance(m, nn.modules.conv._ConvNd):
            o, i = m.out_channels, m.in_channels
            if m.groups > 1:                 # depthwise: in and out are the same channels
                return 1 - max(orm, irm) / o, 1.0
            return 1 - orm / o, 1 - irm / i
        if isinstance(m, nn.Linear):
            return 1 - orm / m.out_features, 1 - irm / m.in_features
        c = None
        for p in m._parameters.values():
            if p is not None and p.dim() >= 1:
                c = p.shape[0]
                break
        return (1 - orm / c if c else 1.0), 1.0

    def _base(self):
        if self._base_counts is None:
            from .metrics import count_flops, count_params

            params, _ = count_params(self.model)
            flops, per_leaf = None, {}
            if self.example_input is not None:
                try:
                    flops, _, per_leaf = count_flops(self.model, self.example_input)
                except Exception:  # noqa: BLE001 - FLOPs unknown: params still count
                    flops = None
            self._base_counts = (params, flops, per_leaf)
        return self._base_counts

    def search(self, metric: str, target: float, base_channels: dict[str, int] | None = None,
               max_amount: float = 0.99) -> float:
        """The smallest amount whose plan keeps ``metric`` ("params" | "flops") at or below
        ``target`` (an absolute count), by bisection on the dry-run counts."""
        idx = 0 if metric == "params" else 1

        def value(a):
            return self.counts(self.plan(a, base_channels))[idx]

        now = self._base()[idx]
        if now is None:
            raise BadInput("--target-flops needs FLOPs of the model: give an example input")
        if now <= target:
            return 0.0
        if value(max_amount) > target:
            best = value(max_amount)
            base = self._base()[idx]
            raise BadInput(f"--target-{metric} cannot be reached: removing as many channels as "
                           f"possible keeps {best / base:.1%} of the {metric}")
        return _smallest_amount(value, target, max_amount)

    def apply(self, plan: dict[str, list[int]]) -> list[dict]:
        """Remove the planned channels. One row per group: its layers and channels before/after."""
        rows = []
        for gi in self.groups:
            idxs = plan.get(gi.name)
            before = gi.channels
            if idxs:
                g = self.DG.get_pruning_group(gi.root, gi.handler, list(idxs))
                if not self.DG.check_pruning_group(g):
                    raise BadInput(
                        f"--structured cannot handle layer {gi.name!r} ({type(gi.root).__name__}):"
                        f" removing {len(idxs)} of its {before} channels would leave a coupled "
                        f"layer with none (its output is probably reshaped, split or shared in a "
                        f"way the dependency graph cannot follow); try --layers to leave it out")
                g.prune()
            after = before - len(idxs or [])
            rows.append({"layer": gi.name, "type": type(gi.root).__name__,
                         "coupled": ", ".join(n for n in gi.members if n != gi.name)[:60],
                         "channels_before": before, "channels": after, "kept": after / before})
        self._scores = None
        self._base_counts = None
        return rows


# ============================================================================== the config

@register_technique
@dataclass
class PruneConfig(StepConfig):
    """What ``%prune`` does, as data (the magic's flags map onto these fields one to one).

    amount: fraction removed, 0 < amount < 1 (weights: the sparsity of the selected layers after
        the step; structured: of each group's channels). Leave it out with ``target_flops`` /
        ``target_params`` (fraction of FLOPs / parameters to keep) or ``sensitivity``.
    structured: remove channels/neurons instead of single weights.
    importance: l1 | l2 | taylor | hessian | activation | bn | random, or an
        :class:`~nbcompress.importance.Importance`; default l1 for weights, l2 for channels.
    scope: "global" (rank all layers together; default for weights) or "layer" (each layer by the
        same amount; default for channels and for ``lottery``).
    layers: regular expression on layer names: only matching layers are pruned.
    steps: prune in this many rounds (geometric schedule of the amount kept) to the final amount,
        fine-tuning after every round when ``finetune`` is given.
    finetune, epochs, lr, optimizer, scheduler: the fine-tune after each round (``fit``).
    data: loader for data-driven importance (taylor, hessian, activation); default ``finetune``.
    lottery: iterative magnitude pruning with rewinding to the recorded initial weights.
    sensitivity: prune each layer alone at ``amounts``, evaluate; the model is not changed.
    round_to: structured channel counts are multiples of this (layers narrower than twice it use 1).
    sparsity_reg: L1 penalty on BatchNorm scales in a fine-tune *before* pruning (with ``bn``).
    recalibrate_bn: after structured pruning, re-estimate BatchNorm statistics on a few batches of
        ``data`` / ``finetune`` (forward passes only) before fine-tuning.
    output_rate: the classifier layer is pruned at this fraction of the others' per-round rate
        (weights, scope layer; default 0.5 for ``lottery`` as in Frankle & Carbin, else 1).
    """

    technique: ClassVar[str] = "prune"
    amount: float | None = None
    structured: bool = False
    importance: Any = None
    scope: str | None = None
    layers: str | None = None
    steps: int = 1
    finetune: Any = None
    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    scheduler: str | None = "cosine"
    data: Any = None
    importance_batches: int = 8
    lottery: bool = False
    sensitivity: bool = False
    amounts: tuple = _DEFAULT_AMOUNTS
    target_flops: float | None = None
    target_params: float | None = None
    round_to: int = 8
    sparsity_reg: float = 0.0
    recalibrate_bn: bool = True
    output_rate: float | None = None
    seed: int = 0

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
        if not isinstance(model, nn.Module):
            raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
        for flag in ("structured", "lottery", "sensitivity", "recalibrate_bn"):
            if not isinstance(getattr(self, flag), bool):
                raise BadInput(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        targets = [t for t in ("target_flops", "target_params") if getattr(self, t) is not None]
        if len(targets) > 1:
            raise BadInput("give --target-flops or --target-params, not both")
        for t in targets:
            v = getattr(self, t)
            if not _is_number(v) or not 0 < v < 1:
                raise BadInput(f"--{t.replace('_', '-')} is the fraction to keep, 0 < F < 1; "
                               f"got {v!r}")
        if self.amount is not None:
            if not _is_number(self.amount) or not 0 < self.amount < 1:
                raise BadInput(f"AMOUNT is the fraction removed and must be between 0 and 1 "
                               f"(exclusive), got {self.amount!r}")
            if targets:
                raise BadInput(f"give AMOUNT or --{targets[0].replace('_', '-')}, not both")
            if self.sensitivity:
                raise BadInput("--sensitivity scans its own amounts (--amounts): leave out AMOUNT")
        elif not targets and not self.sensitivity:
            raise BadInput("give AMOUNT (the fraction to remove, e.g. 0.5), --target-flops F or "
                           "--target-params P")
        if self.sensitivity and targets:
            raise BadInput("--sensitivity does not take --target-flops/--target-params")

        # importance
        spec = self.importance if self.importance is not None else self.importance_name
        if isinstance(spec, str) and spec.lower() not in IMPORTANCES:
            raise BadInput(f"unknown importance {spec!r} (use {', '.join(IMPORTANCES)})")
        if not isinstance(spec, (str, Importance)):
            raise BadInput(f"importance must be a name ({', '.join(IMPORTANCES)}) or an "
                           f"Importance object, got {type(spec).__name__}")
        imp_cls = type(spec) if isinstance(spec, Importance) else IMPORTANCES[spec.lower()]
        if imp_cls.structured_only and not self.structured:
            raise BadInput(f"--importance {self.importance_name} ranks channels: use it with "
                           f"--structured")
        if self.importance_name == "bn" and not any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise BadInput(f"--importance bn ranks channels by BatchNorm scale, but "
                           f"{type(model).__name__} has no BatchNorm layer")
        if self.scope not in (None, "global", "layer"):
            raise BadInput(f"--scope must be global or layer, got {self.scope!r}")

        # numbers
        for name, lo in (("steps", 1), ("epochs", 1), ("importance_batches", 1), ("round_to", 1)):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
                raise BadInput(f"--{name.replace('_', '-')} must be a whole number >= {lo}, "
                               f"got {v!r}")
        if not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise BadInput(f"--lr must be a positive number, got {self.lr!r}")
        if not _is_number(self.sparsity_reg) or self.sparsity_reg < 0 or \
                not math.isfinite(self.sparsity_reg):
            raise BadInput(f"--sparsity-reg must be a number >= 0, got {self.sparsity_reg!r}")
        if self.output_rate is not None and (not _is_number(self.output_rate)
                                             or not 0 < self.output_rate <= 1):
            raise BadInput(f"output_rate must be in (0, 1], got {self.output_rate!r}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise BadInput(f"--seed must be an int, got {self.seed!r}")
        try:
            amounts = tuple(self.amounts)
        except TypeError:
            amounts = ()
        if not amounts or any(not _is_number(a) or not 0 < a < 1 for a in amounts):
            raise BadInput(f"--amounts must be fractions between 0 and 1, got {self.amounts!r}")
        if self.scheduler not in (None, "cosine"):
            raise BadInput(f"scheduler must be 'cosine' or None, got {self.scheduler!r}")

        # loaders
        for name, flag in (("finetune", "--finetune"), ("data", "--data")):
            v = getattr(self, name)
            if v is not None and not _is_loader(v):
                raise BadInput(f"{flag} must be a DataLoader, got {type(v).__name__}")
        imp_needs_data = imp_cls.needs_data
        if imp_needs_data and self.data is None and self.finetune is None:
            raise BadInput(f"--importance {self.importance_name} measures on data: give --data "
                           f"LOADER (or --finetune LOADER)")

        # layers
        if self.layers is not None:
            if not isinstance(self.layers, str):
                raise BadInput(f"--layers must be a regular expression, got "
                               f"{type(self.layers).__name__}")
            try:
                re.compile(self.layers)
            except re.error as e:
                raise BadInput(f"--layers {self.layers!r} is not a valid regular expression: "
                               f"{e}") from None

        # combinations
        if self.lottery:
            if self.structured:
                raise BadInput("--lottery finds a sparse subnetwork of weights; it does not combine "
                               "with --structured")
            if self.sensitivity:
                raise BadInput("--lottery and --sensitivity are different steps: give one")
            if self.finetune is None:
                raise BadInput("--lottery retrains the ticket after every round: give --finetune "
                               "LOADER (and --epochs)")
            if targets:
                raise BadInput("--lottery takes AMOUNT (the final sparsity), not a target")
        if not self.sensitivity and amounts != _DEFAULT_AMOUNTS:
            raise BadInput("--amounts lists the amounts --sensitivity scans: add --sensitivity "
                           "(or leave out --amounts)")
        if self.finetune is None:
            unused = [f for f, on in (("--epochs", self.epochs != 1), ("--lr", self.lr != 1e-3))
                      if on]
            if unused:
                flags = " and ".join(unused)
                raise BadInput(f"{flags} only appl{'y' if len(unused) > 1 else 'ies'} to "
                               f"fine-tuning: give --finetune LOADER too (or leave out {flags})")
        if self.sensitivity and (self.finetune is not None or self.steps != 1):
            raise BadInput("--sensitivity only measures (the model is not changed): leave out "
                           "--finetune and --steps")
        if self.sparsity_reg > 0:
            if not self.structured or self.importance_name != "bn":
                raise BadInput("--sparsity-reg pushes BatchNorm scales to zero before pruning: use "
                               "it with --structured --importance bn")
            if self.finetune is None:
                raise BadInput("--sparsity-reg trains with the penalty first: give --finetune LOADER")

        # what there is to prune
        if self.structured:
            bad = unsupported_layer(model)
            if bad is not None:
                name, typ, why = bad
                raise BadInput(f"--structured cannot handle layer {name!r} ({typ}): {why}")
            if not any(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in model.modules()):
                raise BadInput(f"{type(model).__name__} has no Linear or Conv layer to prune")
            if self.layers is not None:
                pat = re.compile(self.layers)
                if not any(pat.search(n) for n, m in model.named_modules()
                           if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))):
                    raise BadInput(f"--layers {self.layers!r} matches no Linear/Conv layer "
                                   f"(layers: {_layer_list(model)})")
        else:
            if not weight_targets(model, self.layers):
                if self.layers is not None and weight_targets(model):
                    raise BadInput(f"--layers {self.layers!r} matches no Linear/Conv layer "
                                   f"(layers: {_layer_list(model)})")
                raise BadInput(f"{type(model).__name__} has no Linear/Conv layer with float "
                               f"weights to prune")

    # ------------------------------------------------------------------ run
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        check_loader_runs(model, self.finetune, "--finetune", ctx.device)
        check_loader_runs(model, self.data, "--data", ctx.device,       # labels: only for losses
                          labels=self.importance_name in ("taylor", "hessian"))
        if self.sensitivity:
            return _run_sensitivity(self, model, ctx)
        if self.lottery:
            return _run_lottery(self, model, ctx)
        return _run_prune(self, model, ctx)


def _layer_list(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, _PRUNABLE_WEIGHTS)]
    more = f", … ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ============================================================================ step runners

def _importance_for(cfg: PruneConfig) -> Importance:
    spec = cfg.importance if cfg.importance is not None else cfg.importance_name
    return get_importance(spec, seed=cfg.seed)


def _example(cfg: PruneConfig, ctx: StepContext):
    from .train import to_device

    x = ctx.example_input
    if x is None:
        for src in (cfg.data, cfg.finetune, ctx.evaluator):
            x = _example_from_loader(src)
            if x is not None:
                break
    return to_device(x, ctx.device) if x is not None else None


def _evaluate(ctx: StepContext, model: nn.Module) -> float | None:
    if ctx.evaluator is None:
        return None
    return ctx.evaluate(model)


def _finetune(cfg: PruneConfig, model: nn.Module, ctx: StepContext, masks, desc: str,
              round_no: int = 0, loss_fn=None) -> list[dict]:
    from .train import fit

    return fit(model, cfg.finetune, epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer,
               device=ctx.device, progress=ctx.progress, desc=desc,
               after_step=_mask_hook(masks) if masks else None, scheduler=cfg.scheduler,
               seed=cfg.seed + round_no, loss_fn=loss_fn)


def _keep_schedule(keep_final: float, steps: int) -> list[float]:
    """Fraction kept after each of ``steps`` rounds: a geometric schedule (every round removes
    the same fraction of what is left), ending exactly at ``keep_final``."""
    return [keep_final ** ((k + 1) / steps) for k in range(steps)]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _run_prune(cfg: PruneConfig, model: nn.Module, ctx: StepContext) -> CompressionResult:
    import pandas as pd

    from .metrics import count_params

    imp = _importance_for(cfg)
    data = cfg.data if cfg.data is not None else cfg.finetune
    notes: list[str] = []
    example = _example(cfg, ctx)
    if cfg.structured and example is None:
        raise BadInput("--structured traces the model: give an example input (--eval LOADER, "
                       "--data LOADER or %nbcompress NAME --input-shape ...)")
    if cfg.structured:
        shared = _shared_layer(model, example)
        if shared is not None:
            name, typ, calls = shared
            raise BadInput(f"--structured cannot handle layer {name!r} ({typ}): forward calls it "
                           f"{calls} times (shared weights), so its channels cannot be removed "
                           f"for one use only (prune single weights instead: leave out --structured)")
    scope = cfg.resolved_scope
    rows: list[dict] = []
    layer_rows: list[dict] = []
    acc0 = None
    if cfg.steps > 1 or cfg.finetune is not None:
        acc0 = _evaluate(ctx, model)

    if cfg.sparsity_reg > 0:
        lam = float(cfg.sparsity_reg)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.weight is not None]

        def reg_loss(mdl, batch):
            from .train import split_batch

            x, y = split_batch(batch)
            loss = F.cross_entropy(logits_of(_forward(mdl, x)).float(), y)
            return loss + lam * sum(b.weight.abs().sum() for b in bns)

        _finetune(cfg, model, ctx, None, "sparsity-reg", round_no=1000, loss_fn=reg_loss)
        small = sum(int((b.weight.detach().abs() < 1e-2).sum()) for b in bns)
        total = sum(b.weight.numel() for b in bns)
        notes.append(f"trained {cfg.epochs} epoch(s) with L1 {lam:g} on BatchNorm scales first: "
                     f"{small}/{total} scales below 0.01")
        rows.append({"round": 0, "stage": "sparsity-reg", "accuracy_pruned": None,
                     "accuracy": _evaluate(ctx, model)})

    if cfg.structured:
        base_channels: dict[str, int] | None = None
        base_params = base_flops = None
        first_groups: dict[str, int] = {}
        for k in range(cfg.steps):
            if imp.needs_data:
                imp.prepare(model, data, device=ctx.device, batches=cfg.importance_batches)
            cp = ChannelPruner(model, example, imp, layers=cfg.layers, round_to=cfg.round_to,
                               scope=scope)
            if not cp.groups:
                raise BadInput("no channels to prune: every Linear/Conv layer feeds the output"
                               + (f" or is outside --layers {cfg.layers!r}" if cfg.layers else ""))
            if base_channels is None:
                base_channels = {gi.name: gi.channels for gi in cp.groups}
                first_groups = dict(base_channels)
                base_params, base_flops, _ = cp._base()
                if not cp.scores():
                    raise BadInput(f"--importance {imp.name} has no score for any channel group")
                skipped = [gi.name for gi in cp.groups if gi.name not in cp.scores()]
                if skipped:
                    notes.append(f"no {imp.name} score for {', '.join(skipped)}: left as is")
            frac = (k + 1) / cfg.steps
            if cfg.target_flops is not None or cfg.target_params is not None:
                metric = "flops" if cfg.target_flops is not None else "params"
                keep_final = cfg.target_flops if metric == "flops" else cfg.target_params
                base = base_flops if metric == "flops" else base_params
                if base is None:
                    raise BadInput("--target-flops needs the model's FLOPs: give an example input")
                amount = cp.search(metric, base * keep_final ** frac, base_channels)
            else:
                amount = 1 - (1 - cfg.amount) ** frac
            plan = cp.plan(amount, base_channels)
            round_rows = cp.apply(plan)
            _check_runs(model, example)
            if cfg.recalibrate_bn and data is not None and \
                    recalibrate_bn(model, data, ctx.device, cfg.importance_batches) and k == 0:
                notes.append(f"BatchNorm statistics re-estimated on {cfg.importance_batches} "
                             f"batches after each pruning round (no training)")
            masks = _zero_masks(weight_targets(model))
            acc_p = _evaluate(ctx, model) if (cfg.finetune is not None or cfg.steps > 1) else None
            hist = []
            if cfg.finetune is not None:
                hist = _finetune(cfg, model, ctx, masks, f"fine-tune {k + 1}/{cfg.steps}", k + 1)
            rows.append({"round": k + 1, "stage": "prune" + (" + fine-tune" if hist else ""),
                         "amount": amount, "params": count_params(model)[0],
                         "accuracy_pruned": acc_p,
                         "accuracy": _evaluate(ctx, model) if hist else acc_p,
                         "loss": hist[-1]["loss"] if hist else None})
            layer_rows = round_rows
        for r in layer_rows:       # the channels the step started from, not the last round's
            r["channels_before"] = first_groups.get(r["layer"], r["channels_before"])
            r["kept"] = r["channels"] / r["channels_before"]
        kept = sum(r["channels"] for r in layer_rows) / max(1, sum(r["channels_before"]
                                                                   for r in layer_rows))
        notes.insert(0, f"structured ({imp.name}, {scope} scope, round to {cfg.round_to}): "
                        f"{kept:.1%} of the channels of {len(layer_rows)} groups kept")
    else:
        targets = weight_targets(model, cfg.layers)
        n_sel = sum(m.weight.numel() for _, m in targets)
        zeros0 = sum(m.weight.numel() - int(torch.count_nonzero(m.weight)) for _, m in targets)
        start = zeros0 / n_sel
        start_layers = {n: _sparsity(m.weight) for n, m in targets}
        final = _weight_final_sparsity(cfg, model, ctx, targets, example, imp, data)
        if final <= start:
            notes.append(f"the selected layers are already {start:.1%} sparse (asked for "
                         f"{final:.1%}): no weight removed")
        outputs = output_layers(model, targets, example)
        out_rate = cfg.output_rate if cfg.output_rate is not None else 1.0
        for k in range(cfg.steps):
            if imp.needs_data:
                imp.prepare(model, data, device=ctx.device, batches=cfg.importance_batches)
            keep_k = (1 - start) * ((1 - final) / (1 - start)) ** ((k + 1) / cfg.steps) \
                if final > start else 1 - start
            s_k = 1 - keep_k
            if scope == "layer" and out_rate != 1.0:
                spars = _layer_sparsities(targets, outputs, s_k, out_rate)
                layer_rows = prune_weights_(model, spars, importance=imp, targets=targets,
                                            seed=cfg.seed + k)
            else:
                layer_rows = prune_weights_(model, s_k, importance=imp, scope=scope,
                                            targets=targets, seed=cfg.seed + k)
            masks = _zero_masks(targets)
            acc_p = _evaluate(ctx, model) if (cfg.finetune is not None or cfg.steps > 1) else None
            hist = []
            if cfg.finetune is not None:
                hist = _finetune(cfg, model, ctx, masks, f"fine-tune {k + 1}/{cfg.steps}", k + 1)
            nz = sum(int(torch.count_nonzero(m.weight)) for _, m in targets)
            rows.append({"round": k + 1, "stage": "prune" + (" + fine-tune" if hist else ""),
                         "sparsity": 1 - nz / n_sel, "accuracy_pruned": acc_p,
                         "accuracy": _evaluate(ctx, model) if hist else acc_p,
                         "loss": hist[-1]["loss"] if hist else None})
        for r in layer_rows:       # the sparsity the step started from, not the last round's
            r["sparsity_before"] = start_layers[r["layer"]]
        sp = 1 - sum(int(torch.count_nonzero(m.weight)) for _, m in targets) / n_sel
        notes.insert(0, f"weights ({imp.name}, {scope} scope): {sp:.1%} of {n_sel:,} weights in "
                        f"{len(targets)} layers are zero")
    result = CompressionResult(model=model, layers=layer_rows, notes=notes)
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


def recalibrate_bn(model: nn.Module, loader, device, batches: int = 8) -> bool:
    """Re-estimate BatchNorm running statistics on ``batches`` batches of ``loader`` (forward
    passes only, no training). After channels are removed, each layer sees inputs with fewer
    channels and the recorded statistics no longer fit: this is most of the one-shot accuracy
    loss of structured pruning, and it costs a few forward passes to undo. Returns whether there
    was any BatchNorm to recalibrate."""
    from .train import split_batch, to_device

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    if not bns or not _is_loader(loader):
        return False
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in bns}
    was = model.training
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None            # a cumulative average over the batches seen
        model.train()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= batches:
                    break
                x, _ = split_batch(to_device(batch, device))
                _forward(model, x)
                n += 1
    except BaseException:
        for m, (mom, mean, var) in saved.items():
            m.momentum = mom
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise
    finally:
        model.train(was)
    for m, (mom, mean, var) in saved.items():
        m.momentum = mom
        if n == 0:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return n > 0


def _check_runs(model: nn.Module, example) -> None:
    """The pruned model must still run on the example; if not, name the layer where it fails:
    the innermost one whose forward raised, else the last one that ran before the failing op."""
    if example is None:
        return
    names = {m: n for n, m in model.named_modules() if n}
    open_: list[nn.Module] = []
    last: list[nn.Module] = []
    handles = []
    def enter(mod, args):
        open_.append(mod)

    def leave(mod, args, out):      # returns None: the output is left as it is
        if open_:
            open_.pop()
        last.append(mod)

    for m in names:
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad(), _eval_mode(model):
            _forward(model, example)
    except Exception as e:  # noqa: BLE001
        if open_:
            where, how = open_[-1], "fails inside it"
        elif last:
            where, how = last[-1], "fails right after it"
        else:
            where, how = None, ""
        what = (f"layer {names[where]!r} ({type(where).__name__}): the pruned model {how}"
                if where is not None else f"{type(model).__name__}: the pruned model does not run")
        raise BadInput(f"--structured cannot handle {what} ({first_line(e)}); its channels are "
                       f"probably reshaped or split in a way the dependency graph cannot follow. "
                       f"Nothing was changed") from None
    finally:
        for h in handles:
            h.remove()


def _layer_sparsities(targets, outputs: set[str], s: float, out_rate: float,
                      rounds: int = 1) -> dict[str, float]:
    """Per-layer, per-round pruning rates such that ``rounds`` rounds reach total sparsity ``s``
    when output layers are pruned at ``out_rate`` times the others' rate (with ``rounds=1`` the
    rates are the layers' sparsities)."""
    n = {name: m.weight.numel() for name, m in targets}
    total = sum(n.values())

    def overall(p):
        kept = sum(c * (1 - (p * out_rate if name in outputs else p)) ** rounds
                   for name, c in n.items())
        return 1 - kept / total

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if overall(mid) < s:
            lo = mid
        else:
            hi = mid
    p = min(hi, 1.0)
    return {name: min(0.999999, p * out_rate if name in outputs else p) for name in n}


def _weight_final_sparsity(cfg, model, ctx, targets, example, imp, data) -> float:
    """The sparsity of the selected layers the step ends at: ``amount``, or the one that reaches
    ``target_params`` (nonzero parameters kept) / ``target_flops`` (sparse FLOPs kept)."""
    from .metrics import count_flops, count_params

    if cfg.amount is not None:
        return float(cfg.amount)
    n_sel = sum(m.weight.numel() for _, m in targets)
    if cfg.target_params is not None:
        _, nz = count_params(model)
        nz_sel = sum(int(torch.count_nonzero(m.weight)) for _, m in targets)
        want_nz = cfg.target_params * nz
        nz_sel_after = want_nz - (nz - nz_sel)
        if nz_sel_after < 1:
            raise BadInput(f"--target-params {cfg.target_params:g} cannot be reached by pruning "
                           f"the selected weights: the other parameters alone are "
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
        raise BadInput(f"--target-flops {cfg.target_flops:g} cannot be reached by pruning the "
                       f"selected weights (layers without weights to prune keep their FLOPs)")
    return _smallest_amount(sparse_flops_at, want, 0.999)


# ================================================================================ lottery

def _run_lottery(cfg: PruneConfig, model: nn.Module, ctx: StepContext) -> CompressionResult:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019): prune the trained
    weights, rewind the survivors to their initial values, retrain; repeat. Then retrain the same
    mask from a random re-initialisation, the control a ticket must beat."""
    import pandas as pd

    init = ctx.init_state
    if not init:
        raise BadInput("--lottery needs the model's initial weights: register it with "
                       "%nbcompress NAME --remember-init before training (API: init_state=...)")
    state = model.state_dict()
    missing = [k for k in state if k not in init]
    if missing:
        raise BadInput(f"the recorded initial weights do not match the model (no {missing[0]!r}):"
                       f" was it changed since they were recorded?")
    for k, v in state.items():
        if tuple(init[k].shape) != tuple(v.shape):
            raise BadInput(f"the recorded initial weights do not match the model ({k}: "
                           f"{tuple(init[k].shape)} recorded, {tuple(v.shape)} now); record them "
                           f"again with %nbcompress NAME --remember-init")
    if ctx.evaluator is None:
        raise BadInput("--lottery compares the ticket with the dense model: give --eval LOADER")
    notes: list[str] = []
    targets = weight_targets(model, cfg.layers)
    n_sel = sum(m.weight.numel() for _, m in targets)
    example = _example(cfg, ctx)
    outputs = output_layers(model, targets, example)
    out_rate = cfg.output_rate if cfg.output_rate is not None else 0.5
    scope = cfg.resolved_scope

    untrained = all(torch.equal(v.detach().cpu(), init[k]) for k, v in model.state_dict().items()
                    if v.is_floating_point())
    if untrained:
        _finetune(cfg, model, ctx, _zero_masks(targets), "train dense", 0)
        notes.append(f"the weights equal the recorded initial weights, so the model was "
                     f"trained dense for {cfg.epochs} epoch(s) first (if it was trained before "
                     f"it was registered, record the true initial weights with %nbcompress NAME "
                     f"--remember-init before training)")
    dense_acc = _evaluate(ctx, model)

    def rewind(mdl, masks_by_name):
        mdl.load_state_dict({k: v for k, v in init.items()}, strict=True)
        with torch.no_grad():
            for name, m in weight_targets(mdl, cfg.layers):
                keep = masks_by_name.get(name)
                if keep is not None:
                    m.weight.masked_fill_(~keep.to(m.weight.device).bool(), 0.0)

    rows = []
    keep_sched = _keep_schedule(1 - cfg.amount, cfg.steps)
    # the per-round rate of every layer (the classifier at out_rate times it) that ends at amount
    per_round = _layer_sparsities(targets, outputs, cfg.amount, out_rate, rounds=cfg.steps)
    masks: dict[str, torch.Tensor] = {}
    for k, keep in enumerate(keep_sched):
        s_k = 1 - keep
        if scope == "layer":
            spars = {n: 1 - (1 - r) ** (k + 1) for n, r in per_round.items()}
            prune_weights_(model, spars, importance="l1", targets=targets, seed=cfg.seed + k)
        else:
            prune_weights_(model, s_k, importance="l1", scope="global", targets=targets,
                           seed=cfg.seed + k)
        masks = {n: (m.weight.detach() != 0).cpu() for n, m in targets}
        rewind(model, masks)
        hist = _finetune(cfg, model, ctx, _zero_masks(targets), f"ticket round {k + 1}/{cfg.steps}",
                         k + 1)
        acc = _evaluate(ctx, model)
        nz = sum(int(masks[n].sum()) for n, _ in targets)
        rows.append({"round": k + 1, "weights_left": nz / n_sel, "accuracy": acc,
                     "loss": hist[-1]["loss"] if hist else None})

    # control: the same final mask from a random re-initialisation (each initial tensor's values
    # shuffled: a fresh draw from the very distribution the model was initialised from)
    control = copy.deepcopy(model)
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    shuffled = {}
    params = {k for k, _ in control.named_parameters()}
    for k, v in init.items():
        if k in params and v.is_floating_point() and v.numel() > 1:
            flat = v.reshape(-1)
            shuffled[k] = flat[torch.randperm(flat.numel(), generator=g)].reshape(v.shape)
        else:
            shuffled[k] = v
    control.load_state_dict(shuffled, strict=True)
    with torch.no_grad():
        for name, m in weight_targets(control, cfg.layers):
            m.weight.masked_fill_(~masks[name].to(m.weight.device).bool(), 0.0)
    _finetune(cfg, control, ctx, _zero_masks(weight_targets(control, cfg.layers)),
              "random re-init", cfg.steps)
    rand_acc = _evaluate(ctx, control)

    ticket_acc = rows[-1]["accuracy"]
    left = rows[-1]["weights_left"]
    layer_rows = [{"layer": n, "type": type(m).__name__, "weights": m.weight.numel(),
                   "sparsity": _sparsity(m.weight)} for n, m in targets]
    result = CompressionResult(model=model, layers=layer_rows, notes=notes)
    result.extra.update({"dense_accuracy": dense_acc, "ticket_accuracy": ticket_acc,
                         "random_reinit_accuracy": rand_acc, "weights_left": left,
                         "rounds": cfg.steps, "epochs_per_round": cfg.epochs})
    result.tables["lottery rounds"] = pd.DataFrame(rows)
    result.tables["ticket vs controls"] = pd.DataFrame([
        {"model": "dense (trained)", "weights_left": 1.0, "accuracy": dense_acc},
        {"model": "winning ticket (rewound to init)", "weights_left": left, "accuracy": ticket_acc},
        {"model": "same mask, random re-init", "weights_left": left, "accuracy": rand_acc},
    ])
    result.compare = {"random re-init": control}
    notes.insert(0, f"lottery ticket: {left:.1%} of the weights after {cfg.steps} round(s) of "
                    f"{cfg.epochs} epoch(s) (rewound to the initial weights each round); accuracy "
                    f"{_pct(ticket_acc)} vs dense {_pct(dense_acc)} vs random re-init "
                    f"{_pct(rand_acc)}")
    return result


# ============================================================================ sensitivity

def _run_sensitivity(cfg: PruneConfig, model: nn.Module, ctx: StepContext) -> CompressionResult:
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
        cp = ChannelPruner(model, example, imp, layers=cfg.layers, round_to=cfg.round_to)
        names = [gi.name for gi in cp.groups if gi.name in cp.scores()]
        if not names:
            raise BadInput("no channel group to scan")
        for name in names:
            for a in amounts:
                work = copy.deepcopy(model)
                wcp = ChannelPruner(work, example, imp, layers=None, round_to=cfg.round_to)
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
    from .report.plots import sensitivity_png

    png = sensitivity_png(df, base_acc)
    if png is not None:
        result.figures["sensitivity"] = png
    return result


# ================================================================================ the verbs

def _context(model, config, *, evaluator=None, example_input=None, device=None, init_state=None,
             progress=None):
    if progress is not None:
        config.progress = bool(progress)
    return StepContext(device=resolve_device(device if device is not None else config.device),
                       origin_device=model_device(model), evaluator=evaluator,
                       example_input=example_input, progress=config.progress,
                       init_state=init_state)


def prune(model: nn.Module, amount: float | None = None, *, evaluator: Any = None,
          example_input: Any = None, device: str | None = None, init_state: dict | None = None,
          progress: bool = False, **options) -> nn.Module:
    """Return a pruned copy of ``model`` (the model itself is not changed).

    ``nbcompress.prune(model, 0.9)`` zeroes the 90% smallest weights (global magnitude);
    ``prune(model, 0.5, structured=True, finetune=train_loader, epochs=2)`` removes half the
    channels and fine-tunes. ``options`` are the fields of :class:`PruneConfig`; ``evaluator``
    (a DataLoader or callable) is needed by ``lottery``; ``init_state`` (a state dict of the
    initial weights) too.
    """
    if not isinstance(model, nn.Module):
        raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
    PruneConfig.check_options(options, "prune", exclude={"amount"})
    config = PruneConfig(amount=amount, **options)
    ctx = _context(model, config, evaluator=evaluator, example_input=example_input, device=device,
                   init_state=init_state, progress=progress)
    return compress(model, config, ctx=ctx).model


def sensitivity(model: nn.Module, evaluator: Any, *, amounts=_DEFAULT_AMOUNTS,
                structured: bool = False, example_input: Any = None, device: str | None = None,
                progress: bool = False, **options):
    """Prune each layer alone at each of ``amounts``, evaluate; return the table (a DataFrame:
    layer, type, amount, accuracy, drop_points). The model is not changed. The figure is in
    ``table.attrs["figure"]`` (PNG bytes)."""
    PruneConfig.check_options(options, "sensitivity",
                              exclude={"sensitivity", "amounts", "structured"})
    try:
        amounts = tuple(amounts)
    except TypeError:
        raise BadInput(f"amounts must be a list of fractions between 0 and 1, got "
                       f"{amounts!r}") from None
    config = PruneConfig(sensitivity=True, structured=structured, amounts=amounts, **options)
    ctx = _context(model, config, evaluator=evaluator, example_input=example_input, device=device,
                   progress=progress)
    res = compress(model, config, ctx=ctx)
    df = res.tables["sensitivity"]
    df.attrs["figure"] = res.figures.get("sensitivity")
    df.attrs["baseline_accuracy"] = res.extra.get("baseline_accuracy")
    return df


def demo_config(train_loader, test_loader) -> tuple[str, PruneConfig]:
    """The step the terminal demo runs on the trained LeNet-300-100: 90% of the weights by global
    magnitude, one epoch of fine-tuning with the zeros kept."""
    return ("prune 90% of the weights (global magnitude) + 1 epoch fine-tune",
            PruneConfig(amount=0.9, finetune=train_loader, epochs=1, lr=5e-4))
