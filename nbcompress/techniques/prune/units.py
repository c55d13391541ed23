"""Structured pruning of transformers with :class:`ChannelPruner`'s interface (``groups``,
``scores``, ``plan``, ``counts``, ``search``, ``apply``): its groups are attention blocks (unit: a
whole head) and FFNs (unit: a neuron) from :func:`heads.find_blocks`, not torch-pruning dependency
groups. The hidden size is kept, so embeddings, norms, the classifier and convolutions are left
whole (named in ``notes``). Blocks that must keep the same heads (T5's stack shares layer 0's
position bias) form one group. :func:`structured_pruner` picks this pruner or ChannelPruner.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import FieldError
from ...train import eval_mode as _eval_mode
from ...train import first_line
from ...train import forward_batch as _forward
from .channels import ChannelPruner
from .criteria import BNScaleImportance, RandomImportance
from .heads import Block, find_blocks, is_transformer, slice_block
from .importance import Importance, normalized
from .measured import ActivationImportance
from .weights import _smallest_amount

__all__ = ["HeadPruner", "structured_pruner", "transformer_layers"]


def structured_pruner(model: nn.Module, example: Any, importance: Importance, *,
                      layers: str | None = None, round_to: int = 8, scope: str = "layer"):
    """The structured pruner for ``model``: heads and FFN neurons for a transformer, channels
    (torch-pruning's dependency graph) otherwise."""
    cls = HeadPruner if is_transformer(model) else ChannelPruner
    return cls(model, example, importance, layers=layers, round_to=round_to, scope=scope)


def transformer_layers(model: nn.Module) -> list[str]:
    """Names of the attention blocks and FFN layers :class:`HeadPruner` may prune (for checks
    before any work: no forward)."""
    return [n for b in find_blocks(model)[0] for n in [b.name, *b.layers]]


@torch.no_grad()
def _probe(b: Block, captured: tuple | None) -> str | None:
    """Why block ``b`` cannot lose a unit (its forward fails on a copy with one unit fewer, run
    on the inputs it saw in the trace), or None. Blocks that cannot be run alone (coupled T5
    blocks share a position bias; a copy that fails whole) are left to the step's run check."""
    if captured is None or b.couple is not None or b.units < 2:
        return None
    memo: dict = {}
    try:
        work = copy.deepcopy(b.module, memo)
        with _eval_mode(work):
            work(*copy.deepcopy(captured[0]), **copy.deepcopy(captured[1]))
    except Exception:  # noqa: BLE001 - cannot be judged alone
        return None
    probe = Block(b.name, work, b.unit, b.units,
                  [dataclasses.replace(s, module=memo[id(s.module)]) for s in b.slices
                   if id(s.module) in memo],
                  [(memo[id(m)], a, k) for m, a, k in b.attrs if id(m) in memo])
    slice_block(probe, torch.arange(1, b.units))
    try:
        with _eval_mode(work):
            work(*copy.deepcopy(captured[0]), **copy.deepcopy(captured[1]))
    except Exception as e:  # noqa: BLE001 - its forward reads the old size somewhere
        return f"its forward fails with fewer {b.unit}s: {first_line(e)[:90]}"
    return None


@dataclass
class _UnitGroup:
    name: str
    channels: int                # units now: heads or neurons
    blocks: list
    unit: str                    # "head" | "neuron"
    members: tuple


class HeadPruner:
    """Heads and FFN neurons of a transformer as groups, with ChannelPruner's interface and policy
    (the amount per group, rounding, the parameter / FLOP search). Heads are whole (rounded to 1,
    at least one kept per block); FFN neurons are rounded to ``round_to`` (1 below 2x)."""

    def __init__(self, model: nn.Module, example_input: Any, importance: Importance, *,
                 layers: str | None = None, round_to: int = 8, scope: str = "layer"):
        self.model, self.example_input, self.importance = model, example_input, importance
        self.round_to = max(1, int(round_to))
        self.scope = scope
        self.names = {m: n for n, m in model.named_modules()}
        blocks, whole = find_blocks(model)
        self.notes: list[str] = [f"left whole: {w}" for w in whole]
        calls, self._inside, inputs = self._trace(blocks)
        used = []
        for b in blocks:
            bad = [n for n in b.layers if calls and calls.get(n, 0) != 1]
            why = f"layer {bad[0]} runs {calls.get(bad[0], 0)} times in one forward" if bad \
                else _probe(b, inputs.get(b.module))
            if why:
                self.notes.append(f"left whole: {b.name} ({why})")
            else:
                used.append(b)
        pat = re.compile(layers) if layers else None
        self.groups: list[_UnitGroup] = []
        by_key: dict[str, list[Block]] = {}
        for b in used:
            by_key.setdefault(b.couple or b.name, []).append(b)
        for key, bs in by_key.items():
            members = tuple(n for b in bs for n in [b.name, *b.layers])
            if pat is not None and not any(pat.search(n) for n in members):
                continue
            if len({b.units for b in bs}) != 1:
                self.notes.append(f"left whole: {bs[0].name} (coupled blocks with different "
                                  f"head counts)")
                continue
            name = bs[0].name + (f" (+{len(bs) - 1} sharing its heads)" if len(bs) > 1 else "")
            self.groups.append(_UnitGroup(name, bs[0].units, bs, bs[0].unit, members))
        self.notes.append(self._whole_note(blocks))
        if self.groups and getattr(model, "config", None) is not None:
            self.notes.append("model.config keeps the sizes it was built with: the forward reads "
                              "head and FFN sizes from the pruned modules, which hold the new ones")
        self._scores: dict[str, torch.Tensor] | None = None
        self._base_counts = None

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    # ------------------------------------------------------------------ facts
    def _trace(self, blocks: list[Block]):
        """One forward of the example: how often each sliced layer runs, and the FLOPs inside
        each attention module that are not in a leaf layer (the attention itself: it scales with
        the heads kept)."""
        calls: dict[str, int] = {}
        inside: dict[str, int] = {}
        inputs: dict[nn.Module, tuple | None] = {}
        self._traced_flops = None
        if self.example_input is None:
            return calls, inside, inputs
        from torch.utils.flop_counter import FlopCounterMode

        from ...counting import ATTENTION_FORMULAS

        counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS)
        handles, starts = [], {}
        layer_names = {n for b in blocks for n in b.layers}
        heads = {b.name for b in blocks if b.unit == "head"}
        for n in layer_names | heads:
            m = self._module(n)

            def pre(mod, args, _n=n):
                calls[_n] = calls.get(_n, 0) + 1
                starts.setdefault(_n, []).append(counter.get_total_flops())

            def post(mod, args, out, _n=n):
                inside[_n] = inside.get(_n, 0) + counter.get_total_flops() - starts[_n].pop()

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

        def keep_inputs(mod, args, kwargs):         # a block's first inputs, for _probe
            if mod not in inputs:
                try:
                    inputs[mod] = copy.deepcopy((args, kwargs))
                except Exception:  # noqa: BLE001 - not copyable: not probed
                    inputs[mod] = None

        for b in blocks:
            handles.append(b.module.register_forward_pre_hook(keep_inputs, with_kwargs=True))
        try:
            try:
                with torch.no_grad(), _eval_mode(self.model), counter:
                    _forward(self.model, self.example_input)
                self._traced_flops = counter.get_total_flops()
            except Exception:  # noqa: BLE001 - FLOPs not countable: count calls only
                calls.clear(), inside.clear(), inputs.clear()
                with torch.no_grad(), _eval_mode(self.model):
                    _forward(self.model, self.example_input)
        except Exception as e:  # noqa: BLE001 - one line for the user
            raise FieldError(f"{{structured}}: the model does not run on the example input "
                             f"({type(e).__name__}: {first_line(e)})") from None
        finally:
            for h in handles:
                h.remove()
        core = {}
        for b in blocks:
            if b.unit == "head" and b.name in inside:
                own = sum(inside.get(n, 0) for n in b.layers if n.startswith(b.name + "."))
                core[b.name] = max(0, inside[b.name] - own)
        return calls, {**{n: inside[n] for n in layer_names if n in inside}, **core}, inputs

    def _whole_note(self, blocks: list[Block]) -> str:
        sliced = {s.module for b in blocks for s in b.slices}
        kinds = {"embedding": [], "norm": [], "conv": [], "other layer": []}
        for n, m in self.model.named_modules():
            if m in sliced or not any(p is not None for p in m._parameters.values()):
                continue
            if isinstance(m, nn.Embedding):
                kinds["embedding"].append(n)
            elif isinstance(m, nn.modules.conv._ConvNd):
                kinds["conv"].append(n)
            elif "Norm" in type(m).__name__:
                kinds["norm"].append(n)
            elif not any(n.startswith(b.name + ".") or n == b.name for b in blocks):
                kinds["other layer"].append(n or "(model)")
        parts = []
        for k, ns in kinds.items():
            if ns:
                shown = ", ".join(ns[:3]) + (", ..." if len(ns) > 3 else "")
                parts.append(f"{len(ns)} {k}{'s' if len(ns) > 1 else ''} ({shown})")
        return ("the hidden size is kept: left whole " + "; ".join(parts)) if parts else \
            "the hidden size is kept"

    # ------------------------------------------------------------------ policy
    def scores(self) -> dict[str, torch.Tensor]:
        """One score per head / neuron: the criterion's score of each weight the unit owns (Q/K/V
        rows, output-projection columns; up/down projection rows/columns), summed per unit and
        averaged over the layers (and coupled blocks)."""
        if self._scores is None:
            out = {}
            for gi in self.groups:
                s = self._unit_scores(gi)
                if s is not None and s.numel() == gi.channels:
                    out[gi.name] = s.float().cpu()
            self._scores = out
        return self._scores

    @torch.no_grad()
    def _unit_scores(self, gi: _UnitGroup) -> torch.Tensor | None:
        imp, n = self.importance, gi.channels
        if isinstance(imp, RandomImportance):
            return torch.rand(n, generator=imp.generator)
        if isinstance(imp, BNScaleImportance):
            return None
        contribs = []
        for b in gi.blocks:
            for s in b.slices:
                if s.role not in ("out", "in") or s.param != "weight":
                    continue
                if isinstance(imp, ActivationImportance):      # what the next layer reads
                    st = imp.stats.get(s.name) if s.role == "in" else None
                    if st is None or not isinstance(s.module, nn.Linear):
                        continue
                    el = st.reshape(1, -1).expand(s.module.out_features, -1)
                else:
                    try:
                        el = imp.elementwise(s.name, s.module, "weight")
                    except NotImplementedError:
                        return None
                if el is not None:
                    contribs.append(s.per_unit(el.detach().float().cpu(), n))
        if not contribs:
            return None
        return torch.stack(contribs).mean(0)

    def _keep(self, gi: _UnitGroup, keep: float, base: int) -> int:
        r = 1 if gi.unit == "head" or base < 2 * self.round_to else self.round_to
        k = max(r, int(math.floor(keep / r + 0.5 + 1e-9)) * r)
        return max(1, min(gi.channels, k))

    def plan(self, amount: float, base_channels: dict[str, int] | None = None) -> dict[str, list[int]]:
        """{group: units to remove} so each keeps ``1 - amount`` of its base units (at least one
        head; neurons rounded to ``round_to``); global scope ranks all units together."""
        scores = self.scores()
        base = {gi.name: (base_channels or {}).get(gi.name, gi.channels) for gi in self.groups}
        live = [gi for gi in self.groups if gi.name in scores]
        keep: dict[str, float] = {gi.name: base[gi.name] * (1 - amount) for gi in live}
        if self.scope == "global" and live:
            flat = torch.cat([normalized(scores[gi.name]) for gi in live])
            owner = torch.cat([torch.full((gi.channels,), i, dtype=torch.long)
                               for i, gi in enumerate(live)])
            order = torch.argsort(flat, descending=True, stable=True)
            counts = torch.bincount(owner[order[:int(round(sum(keep.values())))]],
                                    minlength=len(live))
            keep = {gi.name: float(counts[i]) for i, gi in enumerate(live)}
        out = {}
        for gi in live:
            n_drop = gi.channels - self._keep(gi, keep[gi.name], base[gi.name])
            if n_drop > 0:
                order = torch.argsort(scores[gi.name], stable=True)
                out[gi.name] = sorted(int(i) for i in order[:n_drop])
        return out

    def counts(self, plan: dict[str, list[int]]) -> tuple[int, int | None]:
        """(parameters, FLOPs) after ``plan``, without pruning: each unit's slices are removed;
        a dense layer's FLOPs scale with the fraction of outputs / inputs it keeps, the attention
        itself with the heads kept."""
        params, flops, _ = self._base()
        info = {gi.name: gi for gi in self.groups}
        for name, idxs in plan.items():
            gi = info[name]
            frac = len(idxs) / gi.channels
            for b in gi.blocks:
                for s in b.slices:
                    params -= int(round(getattr(s.module, s.param).numel() * frac))
                if flops is not None:
                    for n in [b.name] if b.unit == "head" else []:
                        flops -= int(round(self._inside.get(n, 0) * frac))
                    for n in dict.fromkeys(s.name for s in b.slices if s.role in ("out", "in")):
                        flops -= int(round(self._inside.get(n, 0) * frac))
        return params, flops

    def _base(self):
        if self._base_counts is None:
            from ...metrics import count_flops, count_params

            params, _ = count_params(self.model)
            flops, self._traced_flops = self._traced_flops, None     # the model as traced
            if flops is None and self.example_input is not None:
                try:
                    flops = count_flops(self.model, self.example_input)[0]
                except Exception:  # noqa: BLE001 - FLOPs unknown: params still count
                    flops = None
            self._base_counts = (params, flops, {})
        return self._base_counts

    def search(self, metric: str, target: float, base_channels: dict[str, int] | None = None,
               max_amount: float = 0.99) -> float:
        """The smallest amount whose plan keeps ``metric`` ("params" | "flops") at or below
        ``target`` (an absolute count), by bisection on the dry-run counts."""
        idx = 0 if metric == "params" else 1
        now = self._base()[idx]
        if now is None:
            raise FieldError("{target_flops} needs FLOPs of the model: give an example input")
        if now <= target:
            return 0.0

        def value(a):
            return self.counts(self.plan(a, base_channels))[idx]

        if value(max_amount) > target:
            raise FieldError(f"{{target_{metric}}} cannot be reached: removing as many heads and "
                             f"FFN neurons as possible keeps {value(max_amount) / now:.1%} of the "
                             f"{metric} (embeddings, norms and the classifier stay whole)")
        return _smallest_amount(value, target, max_amount)

    def apply(self, plan: dict[str, list[int]]) -> list[dict]:
        """Remove the planned heads / neurons. One row per group."""
        rows = []
        for gi in self.groups:
            idxs = plan.get(gi.name) or []
            before = gi.channels
            if idxs:
                keep = torch.tensor(sorted(set(range(before)) - set(idxs)), dtype=torch.long)
                for b in gi.blocks:
                    slice_block(b, keep)
                gi.channels = int(keep.numel())
            b0 = gi.blocks[0]
            typ = type(b0.module if gi.unit == "head" else b0.slices[0].module).__name__
            rows.append({"layer": gi.name, "type": typ,
                         "unit": gi.unit, "coupled": ", ".join(
                             n for n in gi.members if n != gi.blocks[0].name)[:60],
                         "blocks": len(gi.blocks),
                         "channels_before": before, "channels": before - len(idxs),
                         "kept": (before - len(idxs)) / before})
        self._scores = None
        self._base_counts = None
        return rows
