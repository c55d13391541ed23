"""Where a network's widths come from: its channels as torch-pruning dependency groups (the same
graph structured pruning uses, :class:`~nbcompress.techniques.prune.channels.ChannelPruner`), each
group's channels reordered so the first ``k`` are the ``k`` most important, and, for each width,
how many leading entries of every tensor the narrower network keeps (``{tensor name: [rows] or
[rows, columns]}``). Coupled layers (a residual add, a BatchNorm after its conv, a Linear after a
flatten) move together, because a group hands each of its layers the same channels.

A width keeps ``max(1, round(width x C))`` channels of each group of ``C``; the layers whose
outputs are the model's outputs keep theirs. What cannot be cut to a prefix is refused with the
layer and the reason: a layer the width would change that is not a plain Conv / Linear /
BatchNorm (grouped or depthwise convolutions, LayerNorm, GroupNorm, a transposed convolution),
or channels that reach another layer in the middle of its input (a concat).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import BadInput

__all__ = ["SlicePlan", "plan_widths", "width_key", "channels_at", "residual_blocks"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def width_key(width: float) -> str:
    """The text a width is stored under (``0.5`` -> ``"0.5"``)."""
    return f"{float(width):g}"


def channels_at(width: float, channels: int) -> int:
    """Channels a group of ``channels`` keeps at ``width``."""
    return max(1, min(channels, int(math.floor(width * channels + 0.5))))


@dataclass
class SlicePlan:
    """The result of :func:`plan_widths`: ``spec[width_key][tensor name] = [rows]`` or ``[rows,
    cols]`` (the leading entries kept), one row per group (``groups``), and notes."""

    spec: dict = field(default_factory=dict)
    groups: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _why_not(m: nn.Module) -> str | None:
    if isinstance(m, _CONV):
        if m.groups > 1:
            kind = "depthwise" if m.groups == m.out_channels else "grouped"
            return (f"a {kind} convolution (groups={m.groups}): its groups would have to follow "
                    f"the width")
        return None
    if isinstance(m, (nn.Linear,) + _BN):
        return None
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution"
    if any(p is not None for p in m._parameters.values()):
        return "a layer whose parameters a narrower width would have to cut (only Conv, Linear " \
               "and BatchNorm are sliced)"
    return None


def _items(DG, names, gi, idxs):
    """(module name, module, "out" | "in", mapped indices) of the layers with parameters a
    removal of ``idxs`` from group ``gi`` touches, each (module, side) once."""
    group = DG.get_pruning_group(gi.root, gi.handler, idxs=list(idxs))
    out, seen = [], set()
    for it in group:
        m = it.dep.target.module
        if not isinstance(m, nn.Module) or m not in names:
            continue
        if not any(p is not None for p in m._parameters.values()):
            continue
        side = "out" if DG.is_out_channel_pruning_fn(it.dep.handler) or isinstance(m, _BN) \
            else "in"
        if (m, side) in seen:
            continue
        seen.add((m, side))
        out.append((names[m], m, side, [int(i) for i in it.idxs]))
    return out


def _dim(m: nn.Module, side: str) -> int:
    if isinstance(m, _BN):
        return m.num_features
    return m.weight.shape[0 if side == "out" else 1]


def _permute_(m: nn.Module, side: str, mapped: list[int]) -> None:
    """Put the channels at positions ``sorted(mapped)`` of the layer's ``side`` in the order
    ``mapped`` gives (the other positions, e.g. the rest of a concat, stay)."""
    d = _dim(m, side)
    full = torch.arange(d)
    full[torch.as_tensor(sorted(mapped))] = torch.as_tensor(mapped)
    idx = full.to(m.weight.device if m.weight is not None else "cpu")
    with torch.no_grad():
        if side == "in" and not isinstance(m, _BN):
            m.weight.data = m.weight.data.index_select(1, idx).contiguous()
            return
        for k in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, k, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == d:
                t.data = t.data.index_select(0, idx).contiguous()


def plan_widths(model: nn.Module, example_input: Any, widths: list[float], *,
                importance: str = "l1", seed: int = 0, reorder: bool = True) -> SlicePlan:
    """Reorder ``model``'s channels in place (most important first, per dependency group) and
    say what each width keeps. Raises :class:`BadInput` naming the layer a width cannot slice."""
    from ..prune.channels import ChannelPruner
    from ..prune.importance import get_importance

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            raise BadInput(f"cannot slim layer '{name}' (ConvTranspose): a transposed "
                           f"convolution is not sliced")
    cp = ChannelPruner(model, example_input, get_importance(importance, seed=seed), round_to=1)
    names = cp.names
    plan = SlicePlan()
    if not cp.groups:
        raise BadInput("cannot slim this model: it has no channels a narrower width could drop "
                       "(no Conv / Linear whose outputs feed another layer)")
    scores = cp.scores() if reorder else {}
    for gi in cp.groups:
        everything = _items(cp.DG, names, gi, range(gi.channels))
        for n, m, side, mapped in everything:
            why = _why_not(m)
            if why:
                raise BadInput(f"cannot slim layer '{n}' ({type(m).__name__}): {why}")
            if mapped and (max(mapped) >= _dim(m, side) or len(set(mapped)) != len(mapped)):
                raise BadInput(f"cannot slim layer '{n}' ({type(m).__name__}): the dependency "
                               f"graph maps the channels of '{gi.name}' outside its "
                               f"{'inputs' if side == 'in' else 'outputs'} (channels joined "
                               f"by a concat, as in DenseNet or Inception)")
        s = scores.get(gi.name)
        if s is not None:
            perm = [int(i) for i in torch.argsort(s, descending=True, stable=True)]
            if perm != list(range(gi.channels)):
                for n, m, side, mapped in _items(cp.DG, names, gi, perm):
                    _permute_(m, side, mapped)
        plan.groups.append({"group": gi.name, "layers": ", ".join(gi.members), "channels":
                            gi.channels})
    plan.notes += list(cp.notes)
    for w in widths:
        key = width_key(w)
        keep: dict[str, dict[str, int]] = {}
        for gi in cp.groups:
            k = channels_at(w, gi.channels)
            tail = range(k, gi.channels)
            if not tail:
                continue
            for n, m, side, mapped in _items(cp.DG, names, gi, tail):
                d = _dim(m, side)
                if sorted(mapped) != list(range(d - len(mapped), d)):
                    raise BadInput(f"cannot slim layer '{n}' ({type(m).__name__}): the channels "
                                   f"of '{gi.name}' reach it in the middle of its input (a "
                                   f"concat?), not as its last channels")
                keep.setdefault(n, {})[side] = d - len(mapped)
        spec: dict[str, list[int]] = {}
        mods = dict(model.named_modules())
        for n, sides in keep.items():
            m = mods[n]
            prefix = f"{n}." if n else ""
            if isinstance(m, _BN):
                for t in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, t, None) is not None:
                        spec[prefix + t] = [sides["out"]]
                continue
            rows = sides.get("out", m.weight.shape[0])
            cols = sides.get("in", m.weight.shape[1])
            spec[prefix + "weight"] = [rows, cols]
            if m.bias is not None and "out" in sides:
                spec[prefix + "bias"] = [rows]
        plan.spec[key] = spec
    return plan


def _adds_its_input(m: nn.Module) -> bool:
    """Whether ``m``'s forward (traced with torch.fx) adds its own input to something: a
    residual block ``x + f(x)``."""
    import operator

    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(m).graph
    except Exception:  # noqa: BLE001 - not traceable: not a block we can tell is residual
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    adds = (operator.add, operator.iadd, torch.add)
    for n in graph.nodes:
        if (n.op == "call_function" and n.target in adds) or \
                (n.op == "call_method" and n.target in ("add", "add_")):
            if inputs[0] in n.args:
                return True
    return False


def residual_blocks(model: nn.Module, example_input: Any) -> list[str]:
    """The innermost sub-modules of ``model`` that are residual blocks with an identity
    shortcut: their forward adds their own input (``x + f(x)``, found by tracing it) and their
    output has their input's shape, so leaving one out (its output := its input) still runs."""
    from ...batches import eval_mode, forward_batch

    shapes: dict[str, tuple] = {}
    handles = []
    for name, m in model.named_modules():
        if not name or not any(isinstance(c, _CONV + (nn.Linear,)) for c in m.modules()):
            continue

        def hook(mod, args, out, _n=name):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) \
                    and len(args) == 1:
                shapes.setdefault(_n, (tuple(args[0].shape), tuple(out.shape)))
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(model):
            forward_batch(model, example_input)
    finally:
        for h in handles:
            h.remove()
    found = [name for name, m in model.named_modules()
             if name in shapes and shapes[name][0] == shapes[name][1] and _adds_its_input(m)]
    # the innermost: a stage of several blocks is not one block
    return [f for f in found if not any(g.startswith(f + ".") for g in found)]
