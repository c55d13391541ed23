"""Structured pruning: remove whole output neurons / conv channels and keep every coupled layer
consistent (BatchNorm, residual adds, concatenation, the next layer's inputs, flatten into Linear)
with the dependency graph of ``torch-pruning``. The result is a smaller dense network that really
runs faster. Channel counts are rounded to multiples of ``round_to`` (default 8: odd widths run
slowly on CPU vector units and GPU tensor cores). The classifier's outputs (any layer whose
channels reach the model output) are never removed.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import BadInput, FieldError
from ...train import eval_mode as _eval_mode
from ...train import first_line
from ...train import forward_batch as _forward
from . import couplings as cpl
from .importance import Importance, normalized
from .weights import _PRUNABLE_WEIGHTS, _smallest_amount

__all__ = ["ChannelPruner", "unsupported_layer"]

_STRUCTURED_OK = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                  nn.ConvTranspose2d, nn.ConvTranspose3d, nn.modules.batchnorm._BatchNorm,
                  nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)


def unsupported_layer(model: nn.Module) -> tuple[str, str, str] | None:
    """(name, type, why) of the first layer structured pruning cannot handle, or None. Layer types
    match as subclasses (timm's ``Linear``, ``BatchNormAct2d``, ``ScaledStdConv2d`` are theirs);
    grouped convolutions and GroupNorm keep their groups; a parameter of another module is pruned
    with its channels when it holds one value per channel (layer scale, GlobalResponseNorm)."""
    for name, m in model.named_modules():
        own_params = [p for p in m._parameters.values() if p is not None]
        why = None
        if getattr(m, "_nbc_weight_buffers", None) or hasattr(m, "nbc_count") or \
                type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
            why = "a compressed/quantized layer"
        elif own_params and any(not p.is_floating_point() for p in own_params):
            why = "a layer with non-float parameters"
        elif own_params and not isinstance(m, _STRUCTURED_OK):
            bad = [(k, tuple(p.shape)) for k, p in m._parameters.items()
                   if p is not None and sum(s > 1 for s in p.shape) > 1]
            if bad:
                why = (f"a layer type torch-pruning cannot shrink consistently here (its "
                       f"parameter {bad[0][0]!r} of shape {bad[0][1]} is not one value per "
                       f"channel)")
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
    blocks: int = 1          # equal blocks (grouped conv / GroupNorm) that lose the same positions


class ChannelPruner:
    """The channels of a model, as torch-pruning dependency groups, and a policy over them.

    Build it on the model to prune (it traces ``example_input`` once), then ``scores()`` ->
    ``plan(amount)`` -> ``counts(plan)`` (parameters and FLOPs after, without pruning) ->
    ``apply(plan)``. The dependency graph keeps coupled layers consistent; the policy here decides
    how many channels each group keeps (rounded to ``round_to``) and which.
    """

    def __init__(self, model: nn.Module, example_input: Any, importance: Importance, *,
                 layers: str | None = None, round_to: int = 8, scope: str = "layer"):
        self.model = model
        self.example_input = example_input
        self.importance = importance
        self.round_to = max(1, int(round_to))
        self.scope = scope
        try:
            self.DG = _trace(model, example_input, train=False)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - tracing failed: one line for the user
            raise FieldError(f"{{structured}} could not trace the model on the example input: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        self._left: dict[str, list[str]] = {}   # why -> groups left whole (see ``notes``)
        unreached = _train_only_layers(model, self.DG)
        if unreached and isinstance(example_input, torch.Tensor):
            # layers only the training forward reaches (GoogLeNet's / Inception's auxiliary
            # classifiers): their input channels are coupled only in that graph, and pruning
            # without them would leave a model that fails to train
            try:
                self.DG = _trace(model, example_input, train=True)
            except Exception as e:  # noqa: BLE001 - it does not train on this input at all
                for n in unreached:
                    self._leave(n, f"only the training forward runs them, and it fails on the "
                                   f"example input ({first_line(e)}): the pruned model runs in "
                                   f"evaluation mode only", verb="did not trace")
        cpl.cut_opaque(self.DG)
        self.names = {m: n for n, m in model.named_modules()}
        pat = re.compile(layers) if layers else None
        self.output_modules = self._output_modules()
        self.groups: list[_GroupInfo] = []
        for root, g, err in cpl.all_groups(self.DG, list(self.output_modules),
                                           (nn.modules.conv._ConvNd, nn.Linear)):
            if root not in self.names:
                continue
            if g is None:
                self._leave(self.names[root], f"the dependency graph cannot follow their "
                                              f"channels ({first_line(err)})")
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
            blocks = cpl.channel_blocks(g)
            why = ("their channels reach a split, slice, shuffle or concat whose sizes the "
                   "model's own code fixes" if cpl.opaque_in(self.DG, g) else
                   f"{c} channels in {blocks} groups" if c % blocks or c // blocks < 2 else None)
            bad = None if why else cpl.index_problem(self.DG, g)
            if why or bad:
                self._leave(name, why or f"the graph couples them with a {bad}")
                continue
            self.groups.append(_GroupInfo(name, root, g[0].dep.handler, c, g, members, blocks))
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

    def _step(self, base: int, blocks: int = 1) -> int:
        """Channels per block move in steps that keep the total a multiple of ``round_to``."""
        r = self.round_to // math.gcd(self.round_to, blocks)
        return r if base // blocks >= 2 * r else 1

    def _round(self, keep: float, base: int, current: int, blocks: int = 1) -> int:
        r = self._step(base, blocks)
        k = max(r, int(math.floor(keep / blocks / r + 0.5 + 1e-9)) * r)  # half up, noise aside
        return max(1, min(current // blocks, k)) * blocks

    def _block_scores(self, gi: _GroupInfo, s: torch.Tensor) -> torch.Tensor:
        """Scores of a grouped layer's channels averaged over its blocks, one per channel again:
        the same position in every block ranks the same (torch-pruning's rule)."""
        if gi.blocks == 1:
            return s
        return s.view(gi.blocks, -1).mean(0).repeat(gi.blocks)

    def _pick(self, gi: _GroupInfo, s: torch.Tensor, n_drop: int) -> list[int]:
        """The ``n_drop`` lowest channels; in a grouped layer the same positions of each block."""
        if gi.blocks == 1:
            return sorted(int(i) for i in torch.argsort(s, stable=True)[:n_drop])
        w = gi.channels // gi.blocks
        pos = torch.argsort(s.view(gi.blocks, w).mean(0), stable=True)[:n_drop // gi.blocks]
        return sorted(int(p) + j * w for j in range(gi.blocks) for p in pos)

    def plan(self, amount: float, base_channels: dict[str, int] | None = None) -> dict[str, list[int]]:
        """{group name: channel indices to remove} so each group keeps ``(1 - amount)`` of its base
        channels (``base_channels``: counts the amount refers to, default the current ones)."""
        scores = self.scores()
        base = {gi.name: (base_channels or {}).get(gi.name, gi.channels) for gi in self.groups}
        keep: dict[str, int] = {}
        live = [gi for gi in self.groups if gi.name in scores]
        if self.scope == "global" and live:
            total_keep = sum(base[gi.name] * (1 - amount) for gi in live)
            flat = torch.cat([normalized(self._block_scores(gi, scores[gi.name]))
                              for gi in live])
            owner = torch.cat([torch.full((gi.channels,), i, dtype=torch.long)
                               for i, gi in enumerate(live)])
            order = torch.argsort(flat, descending=True, stable=True)
            kk = int(round(total_keep))
            counts = torch.bincount(owner[order[:kk]], minlength=len(live))
            for i, gi in enumerate(live):
                keep[gi.name] = self._round(float(counts[i]), base[gi.name], gi.channels,
                                            gi.blocks)
        else:
            for gi in live:
                keep[gi.name] = self._round(base[gi.name] * (1 - amount), base[gi.name],
                                            gi.channels, gi.blocks)
        out = {}
        for gi in live:
            n_drop = gi.channels - keep[gi.name]
            if n_drop > 0:
                out[gi.name] = self._pick(gi, scores[gi.name], n_drop)
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
            with cpl.mappings_frozen():
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
            if cpl.is_depthwise(m):          # depthwise: in and out are the same channels
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

    def _capped(self, gi: _GroupInfo, idxs: list[int], scores) -> tuple[list[int], Any]:
        """``idxs``, or fewer of the lowest channels when removing all of them would leave a
        coupled layer (a split branch, a GhostNet half) with no channel; [] and a note when no
        amount works or a grouped layer would lose unequal blocks. With the pruning group."""
        n0, why = len(idxs), ""
        while idxs:
            with cpl.tolerant_reshapes():
                g = self.DG.get_pruning_group(gi.root, gi.handler, list(idxs))
            why = cpl.block_problem(self.DG, g)
            if why is None and not self.DG.check_pruning_group(g):
                why = "a coupled layer would keep no channel"
            if why is None:
                if len(idxs) < n0:
                    self._leave(gi.name, "capped: removing more would leave a coupled layer "
                                         "with no channel", "removed fewer channels of")
                return idxs, g
            if why.startswith("unequal") or gi.name not in scores:
                break
            n = len(idxs) // 2 // gi.blocks * gi.blocks
            idxs = self._pick(gi, scores[gi.name], n) if n else []
        self._leave(gi.name, f"removing channels would break a coupled layer ({why})")
        return [], None

    def _leave(self, name: str, why: str, verb: str = "left whole") -> None:
        self._left.setdefault(f"{verb}\0{why}", []).append(name)

    @property
    def notes(self) -> list[str]:
        """One line per reason: the channel groups left whole (or capped), the first few named."""
        out = []
        for key, names in self._left.items():
            verb, why = key.split("\0")
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            what = "layer(s)" if verb == "did not trace" else "channel group(s)"
            out.append(f"{{structured}} {verb} {len(names)} {what}, "
                       f"{', '.join(repr(n) for n in names[:3])}{more}: {why}")
        return out

    def _base(self):
        if self._base_counts is None:
            from ...metrics import count_flops, count_params

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
            raise FieldError("{target_flops} needs FLOPs of the model: give an example input")
        if now <= target:
            return 0.0
        if value(max_amount) > target:
            best = value(max_amount)
            base = self._base()[idx]
            raise FieldError(f"{{target_{metric}}} cannot be reached: removing as many channels "
                             f"as possible keeps {best / base:.1%} of the {metric}")
        return _smallest_amount(value, target, max_amount)

    def apply(self, plan: dict[str, list[int]]) -> list[dict]:
        """Remove the planned channels. One row per group: its layers and channels before/after."""
        rows = []
        scores = self.scores()
        for gi in self.groups:
            idxs = plan.get(gi.name)
            before = gi.channels
            if idxs:
                idxs, g = self._capped(gi, idxs, scores)
            if idxs:
                extras = cpl.extras_of(self.DG, g)
                g.prune()
                cpl.follow_extras(extras, g)
            after = before - len(idxs or [])
            rows.append({"layer": gi.name, "type": type(gi.root).__name__,
                         "coupled": ", ".join(n for n in gi.members if n != gi.name)[:60],
                         "channels_before": before, "channels": after, "kept": after / before})
        self._scores = None
        self._base_counts = None
        return rows



def _trace(model: nn.Module, example_input: Any, *, train: bool):
    """torch-pruning's dependency graph of ``model`` traced on ``example_input``, in eval mode or
    (``train``) in training mode on the example doubled to a batch of two (BatchNorm needs more
    than one value per channel), every buffer (BatchNorm's running statistics) restored after."""
    import torch_pruning as tp

    built: list = []
    saved = {n: b.detach().clone() for n, b in model.named_buffers()} if train else {}
    x = torch.cat([example_input, example_input]) if train else example_input
    try:        # (_eval_mode puts the model's own mode back; _train_forward trains inside it)
        with torch.enable_grad(), _eval_mode(model), contextlib.redirect_stdout(io.StringIO()), \
                cpl.recording_reshapes(built), cpl.tolerant_reshapes(), \
                torch.random.fork_rng(devices=[]):
            built.append(tp.DependencyGraph().build_dependency(
                model, example_inputs=x, verbose=False, forward_fn=_train_forward if train else None,
                unwrapped_parameters=cpl.unwrapped_parameters(model, tp.DependencyGraph)))
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
    return built[0]


def _train_forward(model: nn.Module, x):
    """torch-pruning traces in eval mode (its ``_trace`` calls ``model.eval()``): back to
    training mode for the call itself."""
    model.train()
    return _forward(model, x)


def _train_only_layers(model: nn.Module, DG) -> list[str]:
    """Conv / Linear layers the graph traced in eval mode never reached."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m not in DG.module2node]


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
        raise FieldError(f"{{structured}} cannot handle {what} ({first_line(e)}); its channels "
                         f"are probably reshaped or split in a way the dependency graph cannot "
                         f"follow. Nothing was changed") from None
    finally:
        for h in handles:
            h.remove()

