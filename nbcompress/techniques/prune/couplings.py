"""What ties channels together beyond torch-pruning's plain dependency groups, for structured
pruning of real CNNs (timm / torchvision):

- **grouped convolutions and GroupNorm** (``groups`` / ``num_groups`` > 1, depthwise aside): a
  group's channels form ``G`` equal blocks; every block must lose the same channel positions so
  the layer keeps ``G`` groups of equal width (torch-pruning's ``in_channel_groups`` /
  ``out_channel_groups`` rule). :func:`channel_blocks` gives ``G`` for a dependency group,
  :func:`block_problem` says (in words) when a concrete removal breaks it;
- **parameters outside a registered layer** (ConvNeXt's layer-scale ``gamma``, timm's
  ``GlobalResponseNorm`` scale and bias): one non-singleton dimension is the channel dimension;
  they are handed to torch-pruning as ``unwrapped_parameters`` pruned along that dimension
  (:func:`unwrapped_parameters`); a parameter with two or more is not a per-channel vector and
  structured pruning refuses the layer that owns it (``channels.unsupported_layer``);
- **extra per-channel tensors of registered layers** (timm's ``ScaledStdConv2d.gain``): removed
  with the layer's output channels (:func:`follow_extras`);
- **ops whose channel bookkeeping is the model's own code**: a split / chunk by a stored width
  (res2net, CSP), a slice that cuts channels (DPN), a channel shuffle (ShuffleNet's view to 5-D,
  transpose, view back), a concat or reshape torch-pruning fails to map: such an op is *opaque*:
  tracing goes on (:func:`tolerant_reshapes`), propagation stops there (:func:`cut_opaque`) and
  any group whose channels reach it is left whole (:func:`opaque_in`), with a note;
- **confused dimensions**: a group that would hand a layer channel indices beyond its own
  (MLP-Mixer's token MLP after a transpose) is left whole (:func:`index_problem`).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

__all__ = ["channel_blocks", "block_problem", "unwrapped_parameters", "follow_extras",
           "extras_of", "tolerant_reshapes", "recording_reshapes", "mappings_frozen",
           "all_groups", "cut_opaque", "opaque_in",
           "index_problem", "is_depthwise"]

_STANDARD = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and \
        m.groups == m.out_channels


def _groups_of(m) -> int:
    """Channel blocks a layer imposes on the channels it owns (1: none)."""
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not is_depthwise(m):
        return m.groups
    if isinstance(m, nn.GroupNorm) and m.num_groups > 1:
        return m.num_groups
    return 1


def channel_blocks(group) -> int:
    """The number of equal blocks the root channels of a dependency group form: the least common
    multiple of the groups of its grouped convolutions and GroupNorms (1: free channels)."""
    g = 1
    for item in group:
        m = item.dep.target.module
        if isinstance(m, nn.Module):
            g = g * _groups_of(m) // math.gcd(g, _groups_of(m))
    return g


def block_problem(DG, group) -> str | None:
    """Why removing this concrete pruning group would break a grouped layer's structure (unequal
    blocks), or None when every grouped member loses the same positions in each block."""
    for item in group:
        m = item.dep.target.module
        g = _groups_of(m) if isinstance(m, nn.Module) else 1
        if g == 1:
            continue
        out = DG.is_out_channel_pruning_fn(item.dep.handler)
        n = (m.out_channels if out else m.in_channels) if isinstance(
            m, nn.modules.conv._ConvNd) else m.num_channels
        if n % g:
            return f"{n} channels in {g} groups"
        w = n // g
        blocks = [set() for _ in range(g)]
        for i in item.idxs:
            blocks[int(i) // w].add(int(i) % w)
        if any(b != blocks[0] for b in blocks) or len(blocks[0]) >= w:
            return f"unequal removal over its {g} groups"
    return None


def unwrapped_parameters(model: nn.Module, DG_cls) -> list[tuple[nn.Parameter, int]]:
    """(parameter, channel dim) for every parameter owned by a module torch-pruning has no
    pruner for, when it is a per-channel vector (one non-singleton dimension)."""
    out = []
    for m in model.modules():
        if _registered(m, DG_cls):
            continue
        for p in m._parameters.values():
            if p is None:
                continue
            dims = [i for i, s in enumerate(p.shape) if s > 1]
            if len(dims) == 1:
                out.append((p, dims[0]))
    return out


def _registered(m: nn.Module, DG_cls) -> bool:
    from torch_pruning import ops
    from torch_pruning.pruner import function as tpf

    t = ops.module2type(m)
    return t in tpf.PrunerBox and t != ops.OPTYPE.PARAMETER and t != ops.OPTYPE.ELEMENTWISE


def extras(m: nn.Module) -> dict[str, torch.Tensor]:
    """Per-channel tensors of a registered layer beyond its standard ones (ScaledStdConv's gain)."""
    out = {}
    for store in (m._parameters, m._buffers):
        for k, v in store.items():
            if k not in _STANDARD and isinstance(v, torch.Tensor) and v.dim() >= 1:
                out[k] = v
    return out


def follow_extras(before: dict, group) -> None:
    """After ``group.prune()``: cut each pruned layer's extra tensors (``before``: layer ->
    (its channel count before, {name: tensor})) to the channels its weight kept along dim 0."""
    for key, n0 in before.items():
        if isinstance(key, tuple):
            _follow_sizes(key[0], n0, getattr(key[0], key[1]).numel())
    for item in group:
        m = item.dep.target.module
        if not isinstance(m, nn.Module) or m not in before:
            continue
        n0, tensors = before[m]
        keep = sorted(set(range(n0)) - {int(i) for i in item.idxs})
        for k, v in tensors.items():
            if v.shape[0] != n0:
                continue
            new = v.detach()[torch.as_tensor(keep, dtype=torch.long, device=v.device)]
            if k in m._parameters:
                m._parameters[k] = nn.Parameter(new, requires_grad=v.requires_grad)
            else:
                m._buffers[k] = new


def extras_of(DG, group) -> dict:
    """``before`` for :func:`follow_extras`: the out-channel members with extra tensors, and the
    modules owning an unwrapped parameter (key: (module, name), value: its channel count)."""
    from torch_pruning import ops

    out = {}
    for item in group:
        p = item.dep.target.module
        if item.dep.target.type == ops.OPTYPE.PARAMETER and p in DG._param_to_name:
            path = DG._param_to_name[p].split(".")
            owner = DG.model.get_submodule(".".join(path[:-1]))
            out[(owner, path[-1])] = p.shape[item.dep.target.pruning_dim]
    for item in group:
        m = item.dep.target.module
        if not isinstance(m, nn.Module) or not DG.is_out_channel_pruning_fn(item.dep.handler):
            continue
        ex = extras(m)
        if ex:
            n = DG.get_out_channels(m)
            if n is not None:
                out[m] = (n, ex)
    return out


_MAPPINGS = ("update_reshape_index_mapping", "update_concat_index_mapping",
             "update_split_index_mapping", "update_slice_index_mapping",
             "update_expand_index_mapping", "update_unbind_index_mapping")


_SIZE_NAMES = ("dim", "channels", "num_channels", "num_features", "chs", "out_chs")


def _follow_sizes(module: nn.Module, n0: int, n1: int) -> None:
    """A module that owns a per-channel parameter and keeps its size in plain attributes (timm's
    ``Scale`` views its scale as ``self.shape = (dim, 1, 1)``): those follow ``n0 -> n1``."""
    if n0 == n1:
        return
    for k, v in list(vars(module).items()):
        if k.startswith("_"):
            continue
        if isinstance(v, tuple) and v.count(n0) == 1 and all(
                isinstance(x, int) and (x == n0 or x == 1) for x in v):
            setattr(module, k, tuple(n1 if x == n0 else x for x in v))
        elif isinstance(v, int) and not isinstance(v, bool) and v == n0 and k in _SIZE_NAMES:
            setattr(module, k, n1)


@contextlib.contextmanager
def tolerant_reshapes():
    """torch-pruning's index mappings of a reshape, concat, split or slice infer channel counts
    that come out 0 or None on some models (a shuffle's reshape, DPN's concat); while this is
    active such an op is marked opaque (groups through it stay whole) instead of raising."""
    from torch_pruning.dependency import index_mapping as im

    origs = {k: getattr(im, k) for k in _MAPPINGS if hasattr(im, k)}

    def tolerant(orig):
        def safe(graph, node):
            if _shuffle_reshape(node):      # torch-pruning would map it as a flatten: wrong
                node._nbc_opaque = True
                return
            try:
                orig(graph, node)
            except (ZeroDivisionError, TypeError, IndexError, ValueError):
                node._nbc_opaque = True
        return safe

    for k, f in origs.items():
        setattr(im, k, tolerant(f))
    try:
        yield
    finally:
        for k, f in origs.items():
            setattr(im, k, f)


@contextlib.contextmanager
def mappings_frozen():
    """torch-pruning recomputes every index mapping of the graph for each group it builds (on
    DenseNet most of the time); while the graph does not change (listing groups, dry-run counts)
    once is enough."""
    from torch_pruning.dependency import index_mapping as im

    orig = im.update_index_mapping
    im.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        im.update_index_mapping = orig


def all_groups(DG, ignored: list, root_types: tuple):
    """torch-pruning's ``get_all_groups``, one root at a time: yields ``(root, group, None)``, or
    ``(root, None, error)`` for a root whose group torch-pruning cannot build (the rest still
    come)."""
    visited = set()
    ignored = list(ignored) + list(DG.IGNORED_LAYERS_IN_TRACING)
    with tolerant_reshapes():
        from torch_pruning.dependency import index_mapping as im
        im.update_index_mapping(DG)
    for m in list(DG.module2node):
        if m in ignored or not isinstance(m, root_types) or m in visited:
            continue
        pruner = DG.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        try:
            with mappings_frozen():
                group = DG.get_pruning_group(m, pruner.prune_out_channels,
                                             list(range(pruner.get_out_channels(m))))
        except Exception as e:  # noqa: BLE001 - this group stays whole, the others go on
            yield m, None, e
            continue
        ok = True
        for item in group:
            if DG.is_out_channel_pruning_fn(item.dep.handler):
                visited.add(item.dep.target.module)
                ok = ok and item.dep.target.module not in ignored
        if ok:
            yield m, group, None


_TRACING: dict = {}


class _ReshapeShapes(torch.overrides.TorchFunctionMode):
    """Records the output shape of every view / reshape while the graph is traced (autograd keeps
    only the input's)."""

    def __init__(self):
        super().__init__()
        self.shapes: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        gf = getattr(out, "grad_fn", None) if isinstance(out, torch.Tensor) else None
        if gf is not None and ("View" in gf.name() or "Reshape" in gf.name()):
            self.shapes[gf] = tuple(out.shape)
        return out


@contextlib.contextmanager
def recording_reshapes(graph_holder: list):
    """While tracing: remember reshape output shapes; afterwards ``graph_holder[0]`` (the built
    dependency graph) gets them on its nodes (``_nbc_out``)."""
    global _TRACING
    mode = _ReshapeShapes()
    _TRACING = mode.shapes           # read by the index mappings during the build
    try:
        with mode:
            yield
    finally:
        _TRACING = {}
    if graph_holder:
        for node in graph_holder[0].module2node.values():
            if node.grad_fn in mode.shapes:
                node._nbc_out = mode.shapes[node.grad_fn]


def _rank5(node) -> bool:
    """A reshape from or to five or more dimensions: it splits or merges the channel dimension
    (a channel shuffle, selective-kernel attention, an attention head split)."""
    from torch_pruning import ops

    gf = node.grad_fn
    size = getattr(gf, "_saved_self_sizes", None) or getattr(gf, "_saved_self_sym_sizes", None)
    out = getattr(node, "_nbc_out", None) or _TRACING.get(gf)
    return node.type == ops.OPTYPE.RESHAPE and (
        (size is not None and len(size) >= 5) or (out is not None and len(out) >= 5))


def _shuffle_reshape(node, depth: int = 4) -> bool:
    """A reshape that takes a 5-D tensor back to 4-D, or one whose output reaches such a reshape
    through element-wise ops only (a transpose, a copy): both halves of a channel shuffle."""
    from torch_pruning import ops

    if node.type != ops.OPTYPE.RESHAPE:
        return False
    if _rank5(node):
        return True
    stack, seen = [(o, 0) for o in node.outputs], set()
    while stack:
        n, d = stack.pop()
        if n in seen or d > depth:
            continue
        seen.add(n)
        if _rank5(n):
            return True
        if n.type == ops.OPTYPE.ELEMENTWISE:
            stack.extend((o, d + 1) for o in n.outputs)
    return False


def _opaque(node) -> bool:
    """An op whose channel bookkeeping the model's own code fixes, so pruning through it would
    break or silently misalign channels: a split / chunk (sizes are the model's attributes,
    res2net's ``width``, CSP's half), a slice that cuts channels (DPN), a reshape that splits the
    channel dimension (a shuffle's 5-D view) or one torch-pruning failed to map. A slice that keeps
    everything (GhostNet's ``[:, :out_chs]`` of an even concat) is harmless."""
    if getattr(node, "_nbc_opaque", False):
        return True
    from torch_pruning import ops

    gf = node.grad_fn
    if node.type == ops.OPTYPE.SPLIT:
        return True
    if node.type == ops.OPTYPE.SLICE or (gf is not None and "slicebackward" in
                                         gf.name().lower()):
        size = getattr(gf, "_saved_self_sym_sizes", None)
        dim, start = getattr(gf, "_saved_dim", None), getattr(gf, "_saved_start", None)
        end, step = getattr(gf, "_saved_end", None), getattr(gf, "_saved_step", 1)
        if size is None or dim is None:
            return True
        n = int(size[dim])
        return not (start in (0, None) and (end is None or int(end) >= n) and step == 1)
    return _shuffle_reshape(node)


def cut_opaque(DG) -> int:
    """Stop dependency propagation at opaque ops (a group reaching one is left whole anyway; on
    DPN's unmapped dense concatenations propagating through them grows groups without end)."""
    n = 0
    for node in DG.module2node.values():
        if _opaque(node):
            node.dependencies = []
            n += 1
    return n


def opaque_in(DG, group) -> bool:
    """Whether a dependency group's channels pass through an opaque op."""
    for item in group:
        for node in (item.dep.source, item.dep.target):
            if _opaque(node):
                return True
    return False


def index_problem(DG, group) -> str | None:
    """The first member of a full dependency group that would receive channel indices beyond its
    own channels (a dimension the graph confused with the channels, e.g. MLP-Mixer's tokens after
    a transpose), in words, or None."""
    for item in group:
        m = item.dep.target.module
        if not isinstance(m, nn.Module) or not item.idxs:
            continue
        out = DG.is_out_channel_pruning_fn(item.dep.handler)
        try:
            n = DG.get_out_channels(m) if out else DG.get_in_channels(m)
        except Exception:  # noqa: BLE001 - a layer without a channel count
            continue
        if n is not None and max(int(i) for i in item.idxs) >= n:
            return f"{type(m).__name__} with {n} {'output' if out else 'input'} channels"
    return None
