"""The slimmable network: one set of weights that runs at several widths.

:class:`SlimmableNet` holds the user's network (``net``, channels ordered most important first),
the widths it was trained for, what each width keeps of every tensor (``spec``, from
:mod:`.plan`), each width's own BatchNorm statistics (re-estimated per width after training), and
the width it runs at. Its forward runs ``net`` with every sliced tensor replaced by its leading
rows / columns (``torch.func.functional_call``): a narrower width really computes a smaller dense
network (fewer FLOPs, less time), while the stored weights stay those of the full width, so
switching width is free. :meth:`SlimmableNet.at_width` cuts out one width as a plain network of
the user's own class (what ``nbcompress.save(model, f, width=W)`` writes).
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Any

import torch
from torch import nn

from ...errors import BadInput
from .plan import width_key

__all__ = ["SlimmableNet", "WidthStats"]

#: SlimmableNet -> (key, the plain network at its width): inference without autograd runs the
#: narrower network itself instead of slicing on every call; rebuilt when the width, a tensor's
#: values (version counter) or its storage (a move between devices) change. Not part of the
#: module: not saved, not copied, not counted.
_PLAIN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class WidthStats(nn.Module):
    """One width's BatchNorm statistics: buffers ``t0, t1, ...`` for the state names in
    ``names`` (``layer.running_mean``...), each as long as that width's BatchNorm."""

    def __init__(self, names: list[str], tensors: list[torch.Tensor]):
        super().__init__()
        self.names = list(names)
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"t{i}") for i, n in enumerate(self.names)}


class SlimmableNet(nn.Module):
    """A network trained to run at several widths, and depths (see the module's docstring).

    ``widths``: the trained widths, ascending, the last 1.0; ``width``: the one it runs at;
    ``spec``: ``{width text: {tensor name: [rows] | [rows, cols] | [n0, n1, ...]}}`` (the
    leading entries kept along the first dims: a class token ``[1, 1, k]``); ``depths``: the trained
    fractions of the residual blocks ``blocks`` kept ([1.0] without depth training), ``depth``
    the one it runs at, ``drops``: ``{depth text: [block names skipped]}``; ``stats``: a
    WidthStats per configuration below full width and depth (the full one's are ``net``'s own
    buffers)."""

    def __init__(self, net: nn.Module, widths: list[float], spec: dict, width: float = 1.0, *,
                 blocks: list[str] | None = None, depths: list[float] | None = None,
                 drops: dict | None = None, depth: float = 1.0):
        super().__init__()
        self.net = net
        self.widths = sorted(float(w) for w in widths)
        self.spec = {k: {n: [int(x) for x in v] for n, v in s.items()} for k, s in spec.items()}
        self.width = float(width)
        self.blocks = list(blocks or [])
        self.depths = sorted(float(d) for d in (depths or [1.0]))
        self.drops = {k: list(v) for k, v in (drops or {}).items()}
        self.depth = float(depth)
        self.stats = nn.ModuleDict()

    # ------------------------------------------------------------------ depth
    def check_depth(self, depth: float) -> float:
        return _trained(depth, self.depths, "depth")

    def skipped(self, depth: float | None = None) -> list[str]:
        """The residual blocks skipped at ``depth`` (default the current one)."""
        depth = self.depth if depth is None else depth
        if depth >= 1.0:
            return []
        return list(self.drops.get(width_key(depth), []))

    @contextlib.contextmanager
    def skipping(self, names: list[str]):
        """Inside, each named block of ``net`` returns its input: a residual block x + f(x)
        without f (its work really left out)."""
        mods = [self.net.get_submodule(n) for n in names]
        for m in mods:
            m.forward = _identity
        try:
            yield
        finally:
            for m in mods:
                m.__dict__.pop("forward", None)

    # ------------------------------------------------------------------ widths
    def check_width(self, width: float) -> float:
        return _trained(width, self.widths, "width")

    def _stats_key(self, width: float, depth: float | None = None) -> str:
        depth = self.depth if depth is None else depth
        key = "w" + width_key(width).replace(".", "_")
        return key if depth >= 1.0 else key + "_d" + width_key(depth).replace(".", "_")

    def sliced(self, width: float | None = None, *, own_stats: bool = True,
               depth: float | None = None) -> dict:
        """``{tensor name: leading slice}`` for ``width`` (views of ``net``'s tensors), with the
        BatchNorm statistics of that configuration (``width``, ``depth``) when ``own_stats`` and
        it has its own."""
        width = self.width if width is None else width
        key = self._stats_key(width, depth)
        stats = self.stats[key].as_dict() if own_stats and key in self.stats else {}
        spec = self.spec.get(width_key(width)) or {}
        if not spec:
            return dict(stats)
        state = dict(self.net.named_parameters())
        state.update(self.net.named_buffers())
        out = {}
        for name, keep in spec.items():
            if name in stats:
                out[name] = stats[name]
                continue
            out[name] = state[name][tuple(slice(0, k) for k in keep)]
        for name, t in stats.items():
            out.setdefault(name, t)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        full = self.width >= 1.0 and self.depth >= 1.0
        if full:
            return self.net(*args, **kwargs)
        if not self.training and not torch.is_grad_enabled():
            return self._plain()(*args, **kwargs)
        sliced = self.sliced()
        with self.skipping(self.skipped()):
            return self.run_with(sliced, *args, **kwargs)

    def run_with(self, tensors: dict, *args: Any, **kwargs: Any) -> Any:
        """``net``'s forward with the named tensors in place of its own (slices, a
        configuration's BatchNorm statistics), each sliced layer's sizes (a depthwise conv's
        ``groups``, a LayerNorm's ``normalized_shape``...) set to match for the call; none
        given: ``net`` as it is."""
        if not tensors:
            return self.net(*args, **kwargs)
        with _sized(self.net, tensors):
            return torch.func.functional_call(self.net, tensors, args, kwargs, strict=False,
                                              tie_weights=False)

    def _plain(self) -> nn.Module:
        key = (self.width, self.depth,
               *((id(t), t.data_ptr(), t._version) for t in self.parameters()),
               *((id(t), t.data_ptr(), t._version) for t in self.buffers()))
        got = _PLAIN.get(self)
        if got is None or got[0] != key:
            net = self.at_width(self.width, self.depth).eval()
            for p in net.parameters():
                p.requires_grad_(False)
            got = _PLAIN[self] = (key, net)
        return got[1]

    def set_stats(self, width: float, stats: dict[str, torch.Tensor],
                  depth: float = 1.0) -> None:
        """Keep ``stats`` (BatchNorm running mean / var at ``width`` and ``depth``) as that
        configuration's own."""
        if width >= 1.0 and depth >= 1.0:
            with torch.no_grad():
                for n, t in stats.items():
                    self.net.get_buffer(n).copy_(t)
            return
        names = sorted(stats)
        self.stats[self._stats_key(width, depth)] = WidthStats(
            names, [stats[n].detach().clone() for n in names])

    # ------------------------------------------------------------------ one width, plain
    def at_width(self, width: float | None = None, depth: float | None = None) -> nn.Module:
        """A plain copy of the network at ``width`` and ``depth`` (default the current ones):
        every sliced tensor cut to its leading entries, the layers' sizes set to match, the
        skipped residual blocks replaced by ``nn.Identity``, that configuration's BatchNorm
        statistics in place."""
        width = self.check_width(self.width if width is None else width)
        depth = self.check_depth(self.depth if depth is None else depth)
        net = copy.deepcopy(self.net)
        for name in self.skipped(depth):
            owner, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(owner) if owner else net, leaf, nn.Identity())
        if width >= 1.0 and depth >= 1.0:
            return net
        cut = {n: t.detach().clone().contiguous()
               for n, t in self.sliced(width, depth=depth).items()}
        for name, t in cut.items():
            owner, _, leaf = name.rpartition(".")
            try:
                m = net.get_submodule(owner) if owner else net
            except AttributeError:          # inside a skipped block: gone
                continue
            if leaf in m._parameters:
                m._parameters[leaf] = nn.Parameter(t, requires_grad=m._parameters[leaf]
                                                   .requires_grad)
            else:
                m._buffers[leaf] = t
        for m in net.modules():
            _fit_sizes(m)
        return net

    def channels(self, width: float | None = None) -> list[dict]:
        """Per sliced layer, its output channels at ``width`` against the full width."""
        width = self.width if width is None else width
        spec = self.spec.get(width_key(width), {})
        rows = []
        for name, m in self.net.named_modules():
            w = getattr(m, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() < 1:
                continue
            keep = spec.get(f"{name}.weight")
            rows.append({"layer": name, "type": type(m).__name__, "channels": keep[0] if keep
                         else w.shape[0], "of": w.shape[0]})
        return rows

    def extra_repr(self) -> str:
        text = f"width={self.width:g}, widths={[round(w, 4) for w in self.widths]}"
        if self.blocks:
            text += f", depth={self.depth:g}, depths={[round(d, 4) for d in self.depths]}"
        return text


def _trained(value: float, trained: list[float], what: str) -> float:
    """``value`` as the trained one it equals; BadInput listing them when it is not one."""
    value = float(value)
    for v in trained:
        if abs(value - v) < 1e-9:
            return v
    raise BadInput(f"{what} {value:g} was not trained (trained: "
                   f"{', '.join(f'{v:g}' for v in trained)})")


def _identity(x, *args, **kwargs):
    return x


#: the size attributes :func:`_fit_sizes` may set
_SIZES = ("in_channels", "out_channels", "groups", "in_features", "out_features",
          "num_features", "normalized_shape", "num_groups", "num_channels", "embedding_dim")


def _fit_sizes(m: nn.Module, w: torch.Tensor | None = None) -> None:
    """A sliced layer's size attributes set from its weight ``w`` (default its own): a
    depthwise convolution (groups == in == out channels) runs with one group per channel kept, a
    LayerNorm over the kept channels, a GroupNorm with the whole groups kept (``num_groups``
    1 stays 1)."""
    w = getattr(m, "weight", None) if w is None else w
    if not isinstance(w, torch.Tensor):
        return
    if isinstance(m, nn.modules.conv._ConvNd):
        if 1 < m.groups == m.in_channels == m.out_channels and w.shape[1] == 1:
            m.groups = w.shape[0]
        m.out_channels = w.shape[0]
        m.in_channels = w.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape[0], w.shape[1]
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.num_features = w.shape[0]
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = w.shape[1]
    elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        m.normalized_shape = (w.shape[0],)
    elif isinstance(m, nn.GroupNorm):
        if m.num_groups > 1:
            m.num_groups = w.shape[0] * m.num_groups // m.num_channels
        m.num_channels = w.shape[0]


@contextlib.contextmanager
def _sized(net: nn.Module, tensors: dict):
    """Inside, every layer of ``net`` whose weight ``tensors`` replaces with a smaller one has
    its size attributes fitted to it (:func:`_fit_sizes`); restored on the way out."""
    saved = []
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        if leaf != "weight":
            continue
        m = net.get_submodule(owner) if owner else net
        own = m._parameters.get("weight")
        if own is None or own.shape == t.shape:
            continue
        saved.append((m, {k: m.__dict__[k] for k in _SIZES if k in m.__dict__}))
        _fit_sizes(m, t)
    try:
        yield
    finally:
        for m, attrs in saved:
            m.__dict__.update(attrs)
