"""Importance criteria for pruning: small interchangeable classes, in the Torch-Pruning style.

Each criterion answers two questions with one object:

- ``weight_scores(name, module)``: a score per single weight of ``module.weight`` (weight pruning
  removes the lowest);
- ``channel_scores(group, names)``: a score per channel of a Torch-Pruning dependency group (all
  the layers coupled to one set of channels: a conv's outputs, its BatchNorm, the next layer's
  inputs, residual partners). Structured pruning removes the lowest channels.

Criteria that need data (``needs_data``) see it once in ``prepare(model, loader, ...)`` and keep
what they measured keyed by *module name*, so the same object scores a model and its copies.
New criteria subclass :class:`Importance`; nothing in the pruner changes.

=============  ================================================================================
``l1``         ``|w|`` (magnitude; per channel: the group's summed ``|w|``)
``l2``         ``w**2`` (per channel: the group's squared L2 norm, Torch-Pruning's default)
``taylor``     first-order Taylor ``|g * w|`` with ``g`` the loss gradient, averaged over batches
               (Molchanov et al. 2017/2019)
``hessian``    second-order, Optimal Brain Damage: ``0.5 * H_ii * w**2`` with the Hessian
               diagonal approximated by the empirical Fisher (mean per-sample ``g**2``)
``activation`` structured only: how strongly a channel fires on data, mean ``|a|`` of what the
               next layer receives (``kind="apoz"``: 1 - average percentage of zeros)
``bn``         structured only: BatchNorm scale ``|gamma|`` (network slimming, Liu et al. 2017)
``random``     uniform random scores (a control)
=============  ================================================================================
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core import BadInput
from .train import forward_batch as _forward
from .train import logits_of

__all__ = ["Importance", "MagnitudeImportance", "L1Importance", "L2Importance",
           "TaylorImportance", "HessianImportance", "ActivationImportance", "BNScaleImportance",
           "RandomImportance", "IMPORTANCES", "get_importance", "logits_of"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


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
            raise BadInput(f"--importance {self.name} scores channels, not single weights: "
                           f"use it with --structured")
        s = self.elementwise(module_name, module, "weight")
        if s is None:
            raise BadInput(f"--importance {self.name} has no score for layer {module_name!r}")
        return s

    @torch.no_grad()
    def channel_scores(self, group, names: dict) -> torch.Tensor | None:
        """One score per root channel of a dependency group: each coupled layer's elementwise
        scores summed over what a channel owns there (a conv's output filter, the next layer's
        input slice, a norm's scale), then averaged over the layers."""
        contribs = []
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer = dep.target.module
            if not isinstance(layer, nn.Module) or layer not in names:
                continue
            kind = _dep_kind(dep, layer)
            if kind is None:
                continue
            s = self.elementwise(names[layer], layer, "weight")
            if s is None:
                continue
            s = _per_channel(s, layer, kind)
            if s is None:
                continue
            contribs.append((s[torch.as_tensor(idxs, dtype=torch.long, device=s.device)],
                             item.root_idxs))
        return self._reduce(group, contribs)

    def _reduce(self, group, contribs) -> torch.Tensor | None:
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
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1:
            return None          # depthwise: its input channels are its output channels
        return "in"
    if fn in (tpf.prune_batchnorm_out_channels, tpf.prune_layernorm_out_channels,
              tpf.prune_instancenorm_out_channels, tpf.prune_prelu_out_channels):
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


class _GradientStats(Importance):
    """Criteria built from loss gradients measured in ``prepare`` (keyed by parameter name)."""

    needs_data = True
    needs_labels = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.stats: dict[str, torch.Tensor] = {}

    def elementwise(self, module_name, module, param):
        key = f"{module_name}.{param}" if module_name else param
        w = getattr(module, param, None)
        st = self.stats.get(key)
        if st is None or not isinstance(w, torch.Tensor) or st.shape != w.shape:
            return None
        return self._score(w.detach(), st.to(w.device))

    def _score(self, w: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TaylorImportance(_GradientStats):
    """First-order Taylor: ``|g * w|`` averaged over batches (the loss change when a weight
    is removed, to first order)."""

    name = "taylor"

    def prepare(self, model, loader, *, device, batches=8):
        from .train import split_batch, to_device

        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        was = model.training
        model.eval()                 # eval: BN running statistics stay as they are
        n = 0
        try:
            with torch.enable_grad():
                for batch in _batches(loader, batches):
                    x, y = split_batch(to_device(batch, device))
                    if y is None:
                        raise BadInput("--importance taylor needs labelled batches (x, y)")
                    model.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(logits_of(_forward(model, x)).float(), y)
                    loss.backward()
                    for k, p in params.items():
                        if p.grad is not None:
                            acc[k] += (p.grad * p.detach()).abs()
                    n += 1
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was)
        if n == 0:
            raise BadInput("the importance data loader yielded no batches")
        # stored as the mean |g*w|; rescaled by the current weight at scoring time
        self.stats = {k: (v / n) for k, v in acc.items()}

    def _score(self, w, st):
        return st


class HessianImportance(_GradientStats):
    """Optimal Brain Damage: ``0.5 * H_ii * w**2`` with ``H_ii`` the empirical Fisher, the mean of
    per-sample squared gradients (computed with ``torch.func`` in chunks, or one sample at a time
    where a layer does not support it)."""

    name = "hessian"

    def __init__(self, max_samples: int = 256, **kw):
        super().__init__(**kw)
        self.max_samples = max_samples

    def prepare(self, model, loader, *, device, batches=8):
        from .train import split_batch, to_device

        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        n_params = sum(p.numel() for p in params.values())
        chunk = max(1, min(64, (1 << 26) // max(1, n_params)))
        seen = 0
        was = model.training
        model.eval()
        try:
            with torch.enable_grad():
                for batch in _batches(loader, batches):
                    x, y = split_batch(to_device(batch, device))
                    if y is None:
                        raise BadInput("--importance hessian needs labelled batches (x, y)")
                    if not isinstance(x, torch.Tensor):
                        raise BadInput("--importance hessian needs tensor inputs")
                    for i in range(0, x.shape[0], chunk):
                        if seen >= self.max_samples:
                            break
                        xs, ys = x[i:i + chunk], y[i:i + chunk]
                        xs, ys = xs[: self.max_samples - seen], ys[: self.max_samples - seen]
                        self._accumulate(model, params, fisher, xs, ys)
                        seen += xs.shape[0]
                    if seen >= self.max_samples:
                        break
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was)
        if seen == 0:
            raise BadInput("the importance data loader yielded no batches")
        self.stats = {k: v / seen for k, v in fisher.items()}

    def _accumulate(self, model, params, fisher, xs, ys):
        try:
            from torch.func import functional_call, grad, vmap

            buffers = {k: b for k, b in model.named_buffers()}
            detached = {k: p.detach() for k, p in params.items()}

            def loss_one(p, x, y):
                out = functional_call(model, ({**p}, buffers), (x.unsqueeze(0),))
                return F.cross_entropy(logits_of(out).float(), y.unsqueeze(0))

            g = vmap(grad(loss_one), in_dims=(None, 0, 0))(detached, xs, ys)
            for k, v in g.items():
                fisher[k] += v.pow(2).sum(0)
            return
        except BadInput:
            raise
        except Exception:  # noqa: BLE001 - a layer torch.func cannot batch: one sample at a time
            pass
        for j in range(xs.shape[0]):
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(logits_of(_forward(model, xs[j:j + 1])).float(), ys[j:j + 1])
            loss.backward()
            for k, p in params.items():
                if p.grad is not None:
                    fisher[k] += p.grad.pow(2)

    def _score(self, w, st):
        return 0.5 * st * w.pow(2)


class ActivationImportance(Importance):
    """How strongly a channel fires on data, measured where the next layer reads it: the mean
    ``|a|`` of each input channel of every conv/linear layer (``kind="mean"``), or the fraction of
    non-zero activations, 1 - APoZ (``kind="apoz"``, Hu et al. 2016). Structured only."""

    name = "activation"
    needs_data = True
    structured_only = True

    def __init__(self, kind: str = "mean", **kw):
        super().__init__(**kw)
        if kind not in ("mean", "apoz"):
            raise BadInput(f"ActivationImportance kind must be 'mean' or 'apoz', got {kind!r}")
        self.kind = kind
        self.stats: dict[str, torch.Tensor] = {}

    def prepare(self, model, loader, *, device, batches=8):
        from .train import split_batch, to_device

        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = {}
        handles = []

        def hook(name):
            def fn(module, inputs, output):
                a = inputs[0].detach()
                if isinstance(module, nn.Linear):
                    a = a.reshape(-1, a.shape[-1])
                    dims, n = (0,), a.shape[0]
                else:
                    dims = (0,) + tuple(range(2, a.dim()))
                    n = a.numel() // a.shape[1]
                v = (a != 0).float().sum(dims) if self.kind == "apoz" else a.abs().float().sum(dims)
                sums[name] = sums[name] + v if name in sums else v
                counts[name] = counts.get(name, 0.0) + n
            return fn

        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                handles.append(m.register_forward_hook(hook(name)))
        was = model.training
        model.eval()
        n_batches = 0
        try:
            with torch.no_grad():
                for batch in _batches(loader, batches):
                    x, _ = split_batch(to_device(batch, device))
                    _forward(model, x)
                    n_batches += 1
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        if n_batches == 0:
            raise BadInput("the importance data loader yielded no batches")
        self.stats = {k: sums[k] / counts[k] for k in sums}

    @torch.no_grad()
    def channel_scores(self, group, names):
        contribs = []
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer = dep.target.module
            if not isinstance(layer, nn.Module) or layer not in names:
                continue
            if _dep_kind(dep, layer) != "in":
                continue
            st = self.stats.get(names[layer])
            if st is None:
                continue
            contribs.append((st[torch.as_tensor(idxs, dtype=torch.long, device=st.device)],
                             item.root_idxs))
        return self._reduce(group, contribs)


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


IMPORTANCES: dict[str, Any] = {
    "l1": L1Importance,
    "l2": L2Importance,
    "taylor": TaylorImportance,
    "hessian": HessianImportance,
    "activation": ActivationImportance,
    "bn": BNScaleImportance,
    "random": RandomImportance,
}


def get_importance(spec: str | Importance, *, seed: int = 0) -> Importance:
    """An :class:`Importance` from a name in :data:`IMPORTANCES` (or the object itself)."""
    if isinstance(spec, Importance):
        return spec
    if not isinstance(spec, str) or spec.lower() not in IMPORTANCES:
        raise BadInput(f"unknown importance {spec!r} (use {', '.join(IMPORTANCES)})")
    cls = IMPORTANCES[spec.lower()]
    return cls(seed=seed) if cls is RandomImportance else cls()


def normalized(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean, so groups of different scale can be ranked together."""
    m = float(scores.float().mean())
    if not math.isfinite(m) or m <= 0:
        return scores.float()
    return scores.float() / m
