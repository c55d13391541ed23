"""The base :class:`Importance` (a score per weight, reduced per channel over a torch-pruning
dependency group) and the criteria that need no data: magnitude (l1, l2), BatchNorm scale, random.
"""
from __future__ import annotations

import torch
from torch import nn

from ...core import FieldError

__all__ = ["Importance", "MagnitudeImportance", "L1Importance", "L2Importance",
           "BNScaleImportance", "RandomImportance"]


def group_layers(group, names: dict):
    """``(item, layer, kind, idxs)`` for each member of a torch-pruning dependency group that is a
    named layer whose channels a score can be read from (``kind``: "out", "in" or "norm")."""
    for item in group:
        dep, idxs = item.dep, item.idxs
        layer = dep.target.module
        if not isinstance(layer, nn.Module) or layer not in names:
            continue
        kind = _dep_kind(dep, layer)
        if kind is not None:
            yield item, layer, kind, idxs


def _batches(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


class Importance:
    """Base class. Subclasses give ``elementwise`` (a score per parameter element) and inherit the
    group reduction, or override ``channel_scores`` / ``weight_scores`` directly."""

    name = "importance"
    needs_data = False       # prepare() must see a loader
    needs_labels = False     # ... of (inputs, labels) batches
    structured_only = False  # no per-weight score

    def __init__(self, *, normalize: str | None = "mean"):
        self.normalize = normalize

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ----------------------------------------------------------------------- data
    def prepare(self, model: nn.Module, loader, *, device: torch.device, batches: int = 8) -> None:
        """Look at data (criteria with ``needs_data``); the default needs none."""

    # ----------------------------------------------------------------------- scores
    def elementwise(self, module_name: str, module: nn.Module, param: str) -> torch.Tensor | None:
        """A non-negative score per element of ``module.<param>`` (or None: no opinion)."""
        raise NotImplementedError

    def weight_scores(self, module_name: str, module: nn.Module) -> torch.Tensor:
        if self.structured_only:
            raise FieldError(f"{{importance={self.name!r}}} scores channels, not single "
                             f"weights: use it with {{structured}}")
        s = self.elementwise(module_name, module, "weight")
        if s is None:
            raise FieldError(f"{{importance={self.name!r}}} has no score for layer "
                             f"{module_name!r}")
        return s

    @torch.no_grad()
    def channel_scores(self, group, names: dict) -> torch.Tensor | None:
        """One score per root channel of a dependency group: each coupled layer's elementwise
        scores summed over what a channel owns there (a conv's output filter, the next layer's
        input slice, a norm's scale), then averaged over the layers."""
        contribs = []
        for item, layer, kind, idxs in group_layers(group, names):
            s = self.elementwise(names[layer], layer, "weight")
            if s is None:
                continue
            s = _per_channel(s, layer, kind)
            if s is None or (idxs and max(idxs) >= s.numel()):
                continue          # a channel index this layer's weight does not map (split, cat)
            contribs.append((s[torch.as_tensor(idxs, dtype=torch.long, device=s.device)],
                             item.root_idxs))
        return self._reduce(group, contribs)

    def _reduce(self, group, contribs) -> torch.Tensor | None:
        """Average each root channel's scores over the layers that gave one."""
        if not contribs:
            return None
        n_root = len(group[0].idxs)
        dev = contribs[0][0].device
        total = torch.zeros(n_root, dtype=torch.float64, device=dev)
        count = torch.zeros(n_root, dtype=torch.float64, device=dev)
        for s, root_idxs in contribs:
            if root_idxs is None or any(r is None for r in root_idxs):
                continue
            r = torch.as_tensor(list(root_idxs), dtype=torch.long, device=dev)
            v = torch.zeros(n_root, dtype=torch.float64, device=dev)
            v.scatter_add_(0, r, s.to(torch.float64))
            hit = torch.zeros(n_root, dtype=torch.float64, device=dev)
            hit.scatter_(0, r, 1.0)
            total += v
            count += hit
        if not bool((count > 0).any()):
            return None
        out = (total / count.clamp(min=1)).float()
        return out.cpu()


def _dep_kind(dep, layer) -> str | None:
    """'out' (the layer's output channels), 'in' (its input channels) or 'norm' for a dependency
    on a layer whose weights a channel owns."""
    from torch_pruning.pruner import function as tpf

    fn = dep.handler
    if fn in (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels,
              tpf.prune_depthwise_conv_out_channels):
        return "out"
    if fn in (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels,
              tpf.prune_depthwise_conv_in_channels):
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == layer.out_channels > 1:
            return None          # depthwise: its input channels are its output channels
        return "in"
    if fn in (tpf.prune_batchnorm_out_channels, tpf.prune_layernorm_out_channels,
              tpf.prune_instancenorm_out_channels, tpf.prune_prelu_out_channels,
              tpf.prune_groupnorm_out_channels):
        if getattr(layer, "weight", None) is None:
            return None
        return "norm"
    return None


def _per_channel(s: torch.Tensor, layer: nn.Module, kind: str) -> torch.Tensor | None:
    transposed = bool(getattr(layer, "transposed", False))
    if kind == "out":
        if transposed:
            s = s.transpose(0, 1)
        return s.flatten(1).sum(1)
    if kind == "in":
        if transposed:
            return s.flatten(1).sum(1)
        g = getattr(layer, "groups", 1)
        if g > 1:     # grouped conv: input c is column c % (in/g) of the rows of group c // (in/g)
            return s.unflatten(0, (g, -1)).flatten(3).sum((1, 3)).flatten()
        return s.transpose(0, 1).flatten(1).sum(1)
    if s.dim() == 1:         # norm scale / PReLU slope
        return s if s.numel() > 1 else None
    return None


# ------------------------------------------------------------------------------- criteria


class MagnitudeImportance(Importance):
    """``|w| ** p``: ``p=1`` is L1 (magnitude), ``p=2`` the squared L2 norm."""

    def __init__(self, p: int = 1, **kw):
        super().__init__(**kw)
        self.p = p
        self.name = "l1" if p == 1 else "l2" if p == 2 else f"l{p}"

    def __repr__(self) -> str:
        return f"MagnitudeImportance(p={self.p})"

    def elementwise(self, module_name, module, param):
        w = getattr(module, param, None)
        if not isinstance(w, torch.Tensor):
            return None
        w = w.detach()
        return w.abs() if self.p == 1 else w.abs().pow(self.p)


class L1Importance(MagnitudeImportance):
    def __init__(self, **kw):
        super().__init__(p=1, **kw)


class L2Importance(MagnitudeImportance):
    def __init__(self, **kw):
        super().__init__(p=2, **kw)



class BNScaleImportance(Importance):
    """BatchNorm scale ``|gamma|`` of the channel (network slimming). Groups without BatchNorm get
    no score and are left alone. Structured only."""

    name = "bn"
    structured_only = True

    @torch.no_grad()
    def channel_scores(self, group, names):
        contribs = []
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer = dep.target.module
            if not isinstance(layer, nn.modules.batchnorm._BatchNorm) or layer.weight is None:
                continue
            w = layer.weight.detach().abs()
            contribs.append((w[torch.as_tensor(idxs, dtype=torch.long, device=w.device)],
                             item.root_idxs))
        return self._reduce(group, contribs)


class RandomImportance(Importance):
    """Uniform random scores from a seeded generator: the control every criterion should beat."""

    name = "random"

    def __init__(self, seed: int = 0, **kw):
        super().__init__(**kw)
        self.generator = torch.Generator().manual_seed(int(seed))

    def elementwise(self, module_name, module, param):
        w = getattr(module, param, None)
        if not isinstance(w, torch.Tensor):
            return None
        return torch.rand(w.shape, generator=self.generator).to(w.device)

    def channel_scores(self, group, names):
        return torch.rand(len(group[0].idxs), generator=self.generator)
