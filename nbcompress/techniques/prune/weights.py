"""Weight pruning: zero single weights of Linear/Conv layers (global or per layer) by an
importance criterion (magnitude by default). The zeros are permanent (plain tensors, no masks or
hooks left behind); ``nbcompress.save`` stores them compactly, so packed bytes and sparse FLOPs
fall. Dense hardware does not run it faster.

The selection is exact: the k lowest scores over all selected weights, with one ``kthvalue`` for
small models and a sampled bracket + refine for large ones (never one concatenated copy).
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import nn

from ...core import FieldError
from ...layers import is_conv1d, layer_bar, param_owners
from .importance import Importance, MagnitudeImportance, get_importance

__all__ = ["weight_targets", "prune_weights_"]

_PRUNABLE_WEIGHTS = (nn.Linear, nn.modules.conv._ConvNd)
_EXACT_LIMIT = 1 << 21          # up to this many scores: one exact kthvalue; beyond: sample + refine
_CHUNK = 1 << 20                # scores handled at a time in the passes over a large layer
_MAGNITUDE = (MagnitudeImportance,)


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



def _float_weight(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, nn.Parameter) and w.is_floating_point()


def _prunable(m: nn.Module) -> bool:
    """Linear and Conv layers (subclasses included) and transformers' ``Conv1D`` (GPT-2's
    attention and MLP: a Linear with its weight stored ``[in, out]``)."""
    return isinstance(m, _PRUNABLE_WEIGHTS) or is_conv1d(m)


def weight_targets(model: nn.Module, layers: str | None = None,
                   notes: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs weight pruning works on: Linear, Conv and ``Conv1D`` layers with
    a float weight, whose name matches the ``layers`` regular expression (``re.search``) when
    given. A weight tied to a module that is not one of them (GPT-2's ``lm_head`` and its input
    embedding) is left whole, named in ``notes``: pruning it through the head would zero part of
    the embedding. A weight shared by several selected layers is pruned once, as one tensor."""
    pat = re.compile(layers) if layers else None
    out = []
    owners = param_owners(model)
    mods = dict(model.named_modules(remove_duplicate=False))
    seen: set[int] = set()
    tied = []
    for name, m in model.named_modules():
        if _prunable(m) and _float_weight(m) and m.weight.numel() > 0:
            if pat is None or pat.search(name):
                if id(m.weight) in seen:
                    continue
                others = [o for o in owners.get(id(m.weight), ())
                          if not _prunable(mods.get(o.rpartition(".")[0], m))]
                if others:
                    tied.append(f"{name} (tied to {sorted(others)[0]})")
                    continue
                seen.add(id(m.weight))
                out.append((name, m))
    if tied and notes is not None:
        notes.append("left whole, its weight is tied to a layer that is not pruned: "
                     + ", ".join(tied))
    return out


def _nonzero(t: torch.Tensor) -> int:
    """Nonzero entries of ``t``, kept per tensor (:data:`nbcompress.fingerprint.MEMO`, the
    counts ``measure`` uses): counted once while the tensor keeps its values, and what the step
    counts, the measurement after it reuses."""
    from ...counting import _tensor_counts

    return _tensor_counts(t)[1]


def _sparsity(t: torch.Tensor) -> float:
    return 1.0 - _nonzero(t) / t.numel() if t.numel() else 0.0



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
            raise FieldError(f"{{importance={self.importance.name!r}}} gave scores of shape "
                             f"{tuple(s.shape)} for layer {self.name!r} of shape {tuple(w.shape)}")
        if not (isinstance(self.importance, _MAGNITUDE) and self.importance.p == 1
                and s.dtype in (torch.bfloat16, torch.float16)):
            s = s.float()         # |w| of a bf16 weight is exact in bf16: no fp32 copy
        s = s.reshape(-1)
        if not isinstance(self.importance, _MAGNITUDE):
            s = torch.where(w.reshape(-1) == 0, torch.full_like(s, -1.0), s)
        if self._cache:
            self._value = s
        return s

    def chunks(self):
        """The flat scores in pieces of ``_CHUNK``, in order: views of the scores, or for a plain
        magnitude not kept between passes computed piece by piece (no whole-layer temporary at
        the step's peak)."""
        imp = self.importance
        if self._value is None and isinstance(imp, _MAGNITUDE) and \
                type(imp).elementwise is MagnitudeImportance.elementwise and \
                self.module.weight.is_contiguous():
            w = self.module.weight.detach().view(-1)
            for i in range(0, self.numel, _CHUNK):
                s = w[i:i + _CHUNK].abs()
                if imp.p != 1:
                    s = s.pow(imp.p)
                if not (imp.p == 1 and s.dtype in (torch.bfloat16, torch.float16)):
                    s = s.float()
                yield s
            return
        s = self()
        for i in range(0, s.numel(), _CHUNK):
            yield s[i:i + _CHUNK]


def _kth_smallest(scores: list[_Scores], numels: list[int], k: int,
                  seed: int = 0, tick: Callable[[], object] = lambda: None) -> tuple[float, int]:
    """(t, below): the k-th smallest score over all tensors (1-based) and how many scores are
    strictly below it. Small inputs: one exact ``kthvalue``. Large ones are never concatenated:
    a random sample brackets the k-th value, one pass per tensor counts what lies below the
    bracket and keeps what lies inside it, and ``kthvalue`` runs on that small remainder
    (widening the bracket in the rare case the sample missed); ``scores`` give theirs whole
    (``f()``) or, in those passes, piece by piece (``f.chunks()``). Scores may be bf16 (exact for
    magnitudes); the candidates are compared as they are. ``tick()`` after each tensor's pass."""
    total = sum(numels)
    if total <= _EXACT_LIMIT:
        allv = torch.cat([f().float() for f in scores]).cpu()
        t = torch.kthvalue(allv, k).values
        return float(t), int(torch.count_nonzero(allv < t))
    g = torch.Generator().manual_seed(seed)
    m = 1 << 17
    sample = []
    for f, n in zip(scores, numels):
        take = max(1, int(round(m * n / total)))
        idx = torch.randint(n, (take,), generator=g).sort().values
        at = 0
        for c in f.chunks():
            sel = idx[(idx >= at) & (idx < at + c.numel())] - at
            sample.append(c[sel.to(c.device)].float().cpu())
            at += c.numel()
        tick()
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
            for c in f.chunks():
                below += int(torch.count_nonzero(c < lo))
                cands.append(c[(c >= lo) & (c <= hi)].float().cpu())
            tick()
        c = torch.cat(cands)
        if below < k <= below + c.numel():
            t = torch.kthvalue(c, k - below).values
            return float(t), below + int(torch.count_nonzero(c < t))
        if lo == -math.inf and hi == math.inf:   # cannot happen: everything is a candidate
            raise RuntimeError("selection failed")
        d *= 4


def _apply_threshold(items: list[_Scores], k: int, seed: int, bar=None) -> None:
    """Zero the ``k`` lowest-scoring weights over ``items`` exactly (ties at the threshold are
    taken in order). ``bar``: a progress bar advanced per tensor pass (three passes over the
    tensors when they are many: sample, bracket, apply)."""
    if k <= 0:
        return
    tick = bar.update if bar is not None else (lambda: None)
    t, below = _kth_smallest(items, [it.numel for it in items], k, seed, tick)
    need_eq = k - below
    for it in items:
        w = it.module.weight
        flat = w.detach().view(-1) if w.is_contiguous() else None
        at, drops = 0, []
        for c in it.chunks():
            drop = c < t
            if need_eq > 0:
                eq = c == t
                n_eq = int(torch.count_nonzero(eq))
                if n_eq:
                    take = min(need_eq, n_eq)
                    if take < n_eq:
                        pos = eq.nonzero().flatten()[:take]
                        eq = torch.zeros_like(eq)
                        eq[pos] = True
                    drop |= eq
                    need_eq -= take
            if flat is not None:       # zeroed piece by piece: +0.0, never -0.0
                with torch.no_grad():
                    flat[at:at + c.numel()].masked_fill_(drop, 0.0)
                at += c.numel()
            else:
                drops.append(drop)
        if flat is None:            # (a weight that is not one flat view: zeroed at once)
            with torch.no_grad():
                w.masked_fill_(torch.cat(drops).view(w.shape), 0.0)   # +0.0, never -0.0
        tick()


def prune_weights_(model: nn.Module, sparsity: float | dict[str, float], *,
                   importance: str | Importance = "l1", scope: str = "global",
                   layers: str | None = None, targets: list | None = None,
                   seed: int = 0, progress: bool = False) -> list[dict]:
    """Zero weights of ``model`` in place until the selected layers reach ``sparsity`` (a float,
    or ``{layer name: sparsity}`` for per-layer targets). Returns one row per layer touched.

    ``scope="global"``: one threshold over all selected weights (one selection, no
    concatenation for large models); ``"layer"``: each layer to the same sparsity.
    ``progress``: a per-layer bar for large models (:func:`nbcompress.layers.layer_bar`).
    """
    imp = get_importance(importance, seed=seed)
    if targets is None:
        targets = weight_targets(model, layers)
    if not targets:
        raise FieldError("no Linear/Conv layers with float weights to prune"
                         + (f" match {{layers}} {layers!r}" if layers else ""))
    before = {n: _sparsity(m.weight) for n, m in targets}
    total = sum(m.weight.numel() for _, m in targets)
    # scores kept between the passes only when they cost more to compute again than to hold:
    # a magnitude is recomputed (one abs per pass) rather than held beside the weights (a
    # second copy of them at the step's peak)
    cache = total <= (1 << 26) and not isinstance(imp, _MAGNITUDE)
    items = [_Scores(n, m, imp, cache) for n, m in targets]
    one_global = not isinstance(sparsity, dict) and scope != "layer"
    passes = 3 if one_global and total > _EXACT_LIMIT else 1
    with layer_bar(passes * len(items), "prune (weights)", progress, total) as bar:
        if isinstance(sparsity, dict):
            for it in items:
                s = sparsity.get(it.name)
                if s is None:
                    continue
                k = int(round(s * it.numel))
                if k > round(before[it.name] * it.numel):
                    _apply_threshold([it], k, seed)
                bar.update()
        elif scope == "layer":
            for it in items:
                k = int(round(sparsity * it.numel))
                if k > round(before[it.name] * it.numel):
                    _apply_threshold([it], k, seed)
                bar.update()
        else:
            k = int(round(sparsity * total))
            zeros = sum(round(before[it.name] * it.numel) for it in items)
            if k > zeros:
                _apply_threshold(items, k, seed, bar if passes == 3 else None)
    rows = []
    for n, m in targets:
        after = _sparsity(m.weight)
        rows.append({"layer": n, "type": type(m).__name__, "weights": m.weight.numel(),
                     "sparsity_before": before[n], "sparsity": after})
    return rows



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



def _layer_list(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, m in model.named_modules() if _prunable(m)]
    more = f", … ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more



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



def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): keep N of every M consecutive weights (0 < N < M <= 64)."""
    n, sep, m = str(text).strip().partition(":")
    try:
        n_i, m_i = int(n), int(m)
    except ValueError:
        n_i = m_i = -1
    if not sep or not 0 < n_i < m_i <= 64:
        raise FieldError(f"{{pattern}} must be N:M with 0 < N < M <= 64 (keep N of every M "
                         f"consecutive weights, e.g. 2:4), got {text!r}")
    return n_i, m_i


def _rows_view(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like ``m.weight``) as [output channel, that channel's inputs]: the layout in
    which N:M groups run along the inputs (GPT-2's ``Conv1D`` stores its weight [in, out])."""
    return t.t() if is_conv1d(m) else t.reshape(t.shape[0], -1)


def pattern_fits(m: nn.Module, group: int) -> bool:
    """Whether each output channel's inputs split into whole groups of ``group``."""
    return _rows_view(m, m.weight).shape[1] % group == 0


def prune_n_m_(targets: list[tuple[str, nn.Module]], n: int, m: int, *,
               importance: str | Importance = "l1", seed: int = 0,
               progress: bool = False) -> list[dict]:
    """Semi-structured N:M pruning in place: in every group of ``m`` consecutive inputs of an
    output channel, the ``n`` most important weights stay and the others become zero (2:4 is
    what NVIDIA's sparse tensor cores run). ``targets`` must fit (:func:`pattern_fits`). Returns
    one row per layer, as :func:`prune_weights_` does."""
    imp = get_importance(importance, seed=seed)
    rows = []
    total = sum(mod.weight.numel() for _, mod in targets)
    with layer_bar(len(targets), f"prune ({n}:{m})", progress, total) as bar:
        for name, mod in targets:
            w = mod.weight
            before = _sparsity(w)
            s = _Scores(name, mod, imp, cache=False)().reshape(w.shape)
            groups = _rows_view(mod, s).contiguous().reshape(-1, m)
            drop = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
            drop.scatter_(1, groups.topk(m - n, dim=1, largest=False).indices, True)
            drop = drop.reshape(_rows_view(mod, w).shape)
            with torch.no_grad():
                w.masked_fill_((drop.t() if is_conv1d(mod) else drop).reshape(w.shape), 0.0)
            del s, groups, drop
            rows.append({"layer": name, "type": type(mod).__name__, "weights": w.numel(),
                         "sparsity_before": before, "sparsity": _sparsity(w)})
            bar.update()
    return rows
