"""Where a network's widths come from: its channels as torch-pruning dependency groups (the same
graph structured pruning uses, :class:`~nbcompress.techniques.prune.channels.ChannelPruner`), each
group's channels reordered so the first ``k`` are the ``k`` most important, and, for each width,
how many leading entries of every tensor the narrower network keeps (``{tensor name: [rows] or
[rows, columns]}``). Coupled layers (a residual add, a BatchNorm after its conv, a Linear after a
flatten) move together, because a group hands each of its layers the same channels.

A width keeps ``max(1, round(width x C))`` channels of each group of ``C``; the layers whose
outputs are the model's outputs keep theirs. Besides Conv / Linear / BatchNorm, a width cuts:

- a **depthwise convolution** (``groups == in_channels == out_channels``): its weight's rows, and
  it runs with ``groups`` = the channels kept (its in and out channels are one group's);
- a **LayerNorm** over the channels (``normalized_shape == (C,)``, ConvNeXt's ``LayerNorm2d``
  too): its weight and bias, normalising over the kept channels (the narrower network is its own
  network, trained by the sandwich rule);
- a **GroupNorm** of ``G`` groups of ``s`` channels: whole groups (the channels kept round to a
  multiple of ``s``, at least one group; ``G == 1``: any number, one group). Its channels are
  reordered group by group (the groups by their mean importance, then the channels inside each),
  so every group keeps its channels and the full network computes what it did;
- an **Embedding**: its columns (the embedding dim);
- a **per-channel parameter** of another module (ConvNeXt's layer scale, a ViT's class token and
  position embedding): along its channel dim.

The layer sizes (``groups``, ``normalized_shape``, ``num_groups``) follow the tensors
(``model._fit_sizes``). What cannot be cut to a prefix is refused with the layer and the reason:
a grouped convolution (a prefix keeps whole groups only if the conv's input and output channels,
two dependency groups, are ranked by one shared block order), a depthwise convolution with a
channel multiplier, a LayerNorm over more than the channels, a norm without weights, a transposed
convolution, another layer with parameters, or channels that reach another layer in the middle of
its input (a concat).
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
_NORM = _BN + (nn.LayerNorm, nn.GroupNorm)      # one value per channel: cut along dim 0
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_depthwise(m: nn.Module) -> bool:
    """A depthwise convolution with channel multiplier 1 (its in and out channels coupled)."""
    return isinstance(m, _CONV) and 1 < m.groups == m.in_channels == m.out_channels


class _Param:
    """A per-channel parameter of a module torch-pruning has no pruner for (ConvNeXt's layer
    scale), cut along ``dim``."""

    def __init__(self, tensor: torch.Tensor, dim: int):
        self.tensor, self.dim = tensor, int(dim)


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


def _why_not(m) -> str | None:
    if isinstance(m, _Param):
        return None
    if isinstance(m, _CONV):
        if m.groups == 1 or is_depthwise(m):
            return None
        if m.groups == m.in_channels:
            return (f"a depthwise convolution with channel multiplier "
                    f"{m.out_channels // m.groups}: a prefix of its outputs is not whole groups")
        return (f"a grouped convolution (groups={m.groups}): a prefix keeps whole groups only if "
                f"its input and output channels (two dependency groups) follow one shared order "
                f"of groups")
    if isinstance(m, (nn.Linear,) + _BN):
        return None
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        if getattr(m, "weight", None) is None:
            return "a norm without weights: its size could not follow the width"
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
            return (f"a LayerNorm over more than the channels (normalized_shape="
                    f"{tuple(m.normalized_shape)})")
        return None
    if isinstance(m, nn.Embedding):
        return None
    if isinstance(m, nn.MultiheadAttention):
        return (f"attention over {m.num_heads} heads: its embedding dim is num_heads x head_dim "
                f"inside one fused in_proj weight, which a prefix of the channels cuts across")
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution"
    if any(p is not None for p in m._parameters.values()):
        return "a layer whose parameters a narrower width would have to cut (only Conv, Linear, " \
               "BatchNorm, LayerNorm, GroupNorm, Embedding and per-channel parameters are sliced)"
    return None


def _items(DG, names, gi, idxs):
    """(name, layer, "out" | "in", mapped indices) of the layers with parameters a removal of
    ``idxs`` from group ``gi`` touches, each (layer, side) once; a per-channel parameter of
    another module comes as (its full name, :class:`_Param`, "out", indices)."""
    from torch_pruning import ops

    group = DG.get_pruning_group(gi.root, gi.handler, idxs=list(idxs))
    out, seen = [], set()
    for it in group:
        m = it.dep.target.module
        if it.dep.target.type == ops.OPTYPE.PARAMETER and m in DG._param_to_name:
            if id(m) in seen:
                continue
            seen.add(id(m))
            out.append((DG._param_to_name[m], _Param(m, it.dep.target.pruning_dim), "out",
                        [int(i) for i in it.idxs]))
            continue
        if not isinstance(m, nn.Module) or m not in names:
            continue
        if not any(p is not None for p in m._parameters.values()) and \
                not isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            continue
        side = "out" if DG.is_out_channel_pruning_fn(it.dep.handler) or isinstance(m, _NORM) \
            else "in"
        if (id(m), side) in seen:
            continue
        seen.add((id(m), side))
        out.append((names[m], m, side, [int(i) for i in it.idxs]))
    return out


def _dim(m, side: str) -> int:
    if isinstance(m, _Param):
        return m.tensor.shape[m.dim]
    if isinstance(m, _NORM):
        return m.weight.shape[0]
    if isinstance(m, nn.Embedding):
        return m.weight.shape[1]
    return m.weight.shape[0 if side == "out" or is_depthwise(m) else 1]


def _permute_(m, side: str, mapped: list[int]) -> None:
    """Put the channels at positions ``sorted(mapped)`` of the layer's ``side`` in the order
    ``mapped`` gives (the other positions, e.g. the rest of a concat, stay)."""
    d = _dim(m, side)
    full = torch.arange(d)
    full[torch.as_tensor(sorted(mapped))] = torch.as_tensor(mapped)
    with torch.no_grad():
        if isinstance(m, _Param):
            m.tensor.data = m.tensor.data.index_select(
                m.dim, full.to(m.tensor.device)).contiguous()
            return
        idx = full.to(m.weight.device if m.weight is not None else "cpu")
        if (side == "in" and not isinstance(m, _NORM)) or isinstance(m, nn.Embedding):
            m.weight.data = m.weight.data.index_select(1, idx).contiguous()
            return
        for k in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, k, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == d:
                t.data = t.data.index_select(0, idx).contiguous()


#: autograd ops of a product of two activations: attention (q k^T, softmax(.) v)
_ATTENTION = ("ScaledDotProduct", "Bmm", "Baddbmm", "Einsum")


def _reaches_attention(DG, gi) -> bool:
    """Whether the group's channels reach an attention product: they are num_heads x head_dim,
    and a reorder or a prefix would move channels between heads."""
    from torch_pruning import ops

    for it in DG.get_pruning_group(gi.root, gi.handler, idxs=[0]):
        t = it.dep.target
        if t.type == ops.OPTYPE.ELEMENTWISE and any(a in repr(t.module) for a in _ATTENTION):
            return True
    return False


def _group_size(everything, channels: int) -> int:
    """Channels per GroupNorm group in a dependency group (1: free channels); BadInput when its
    GroupNorms split the channels differently."""
    sizes = {(n, m.weight.shape[0] // m.num_groups) for n, m, _, _ in everything
             if isinstance(m, nn.GroupNorm) and m.num_groups > 1}
    if len({s for _, s in sizes}) > 1:
        n, _ = sorted(sizes)[0]
        listed = ", ".join(sorted(f"{a}: {b}" for a, b in sizes))
        raise BadInput(f"cannot slim layer '{n}' (GroupNorm): the GroupNorms of these channels "
                       f"have groups of different sizes ({listed})")
    return next(iter(sizes))[1] if sizes else 1


def _order(s: torch.Tensor, size: int) -> list[int]:
    """Channels most important first; with groups of ``size`` (GroupNorm) whole groups by
    their mean score, then the channels inside each, so each group keeps its channels."""
    if size == 1:
        return [int(i) for i in torch.argsort(s, descending=True, stable=True)]
    blocks = s.view(-1, size)
    out = []
    for b in torch.argsort(blocks.mean(1), descending=True, stable=True).tolist():
        out += [b * size + int(i) for i in torch.argsort(blocks[b], descending=True,
                                                          stable=True)]
    return out


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
    sizes: dict[str, int] = {}
    groups, heads = [], []
    for gi in cp.groups:
        if _reaches_attention(cp.DG, gi):
            heads.append(gi.name)
            continue
        groups.append(gi)
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
        sizes[gi.name] = size = _group_size(everything, gi.channels)
        s = scores.get(gi.name)
        if s is not None:
            perm = _order(s, size)
            if perm != list(range(gi.channels)):
                for n, m, side, mapped in _items(cp.DG, names, gi, perm):
                    _permute_(m, side, mapped)
        plan.groups.append({"group": gi.name, "layers": ", ".join(gi.members), "channels":
                            gi.channels})
    plan.notes += list(cp.notes)
    if heads:
        plan.notes.append(f"left whole {len(heads)} channel group(s) that reach attention heads, "
                          f"{', '.join(repr(h) for h in heads[:3])}"
                          f"{f' and {len(heads) - 3} more' if len(heads) > 3 else ''}: a "
                          f"prefix of the channels would cut across the heads")
    if not groups:
        raise BadInput("cannot slim this model: its only channels a narrower width could drop "
                       "are attention heads")
    mods = dict(model.named_modules())
    for w in widths:
        key = width_key(w)
        keep: dict[str, dict[str, int]] = {}
        params: dict[str, tuple[_Param, int]] = {}
        for gi in groups:
            size = sizes[gi.name]
            k = size * channels_at(w, gi.channels // size)
            tail = range(k, gi.channels)
            if not tail:
                continue
            for n, m, side, mapped in _items(cp.DG, names, gi, tail):
                d = _dim(m, side)
                if sorted(mapped) != list(range(d - len(mapped), d)):
                    raise BadInput(f"cannot slim layer '{n}' ({type(m).__name__}): the channels "
                                   f"of '{gi.name}' reach it in the middle of its input (a "
                                   f"concat?), not as its last channels")
                if isinstance(m, _Param):
                    params[n] = (m, d - len(mapped))
                else:
                    keep.setdefault(n, {})[side] = d - len(mapped)
        spec: dict[str, list[int]] = {}
        for n, sides in keep.items():
            m = mods[n]
            prefix = f"{n}." if n else ""
            if isinstance(m, _NORM):
                for t in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, t, None) is not None:
                        spec[prefix + t] = [sides["out"]]
                continue
            if isinstance(m, nn.Embedding):          # [tokens, dim]: its columns
                spec[prefix + "weight"] = [m.weight.shape[0], sides["out"]]
                continue
            rows = sides.get("out", m.weight.shape[0])
            if is_depthwise(m):
                spec[prefix + "weight"] = [rows]          # [C, 1, k, k]: its rows only
            else:
                spec[prefix + "weight"] = [rows, sides.get("in", m.weight.shape[1])]
            if m.bias is not None and "out" in sides:
                spec[prefix + "bias"] = [rows]
        for n, (p, k) in params.items():
            # leading entries along its channel dim, whole along the dims before it
            spec[n] = [p.tensor.shape[i] for i in range(p.dim)] + [k]
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
