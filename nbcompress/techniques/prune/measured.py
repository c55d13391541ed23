"""The criteria measured on data (``needs_data``): first-order Taylor, Optimal Brain Damage
(Hessian diagonal by the empirical Fisher) and activations. Each sees the data once in
``prepare`` and keeps what it measured keyed by module name."""
from __future__ import annotations

import torch
from torch import nn

from ...core import BadInput, FieldError
from ...train import forward_batch as _forward
from ...tokens import task_loss
from ...train import logits_of
from .criteria import Importance, _batches, group_layers

__all__ = ["TaylorImportance", "HessianImportance", "ActivationImportance"]


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
        from ...train import split_batch, to_device

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
                        raise FieldError("{importance='taylor'} needs labelled batches (x, y)")
                    model.zero_grad(set_to_none=True)
                    loss = task_loss(logits_of(_forward(model, x)), x, y)
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
        from ...train import split_batch, to_device

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
                        raise FieldError("{importance='hessian'} needs labelled batches (x, y)")
                    if not isinstance(x, torch.Tensor):
                        raise FieldError("{importance='hessian'} needs tensor inputs")
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
                return task_loss(logits_of(out), x.unsqueeze(0), y.unsqueeze(0))

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
            loss = task_loss(logits_of(_forward(model, xs[j:j + 1])), xs[j:j + 1], ys[j:j + 1])
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
        from ...train import split_batch, to_device

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
        for item, layer, kind, idxs in group_layers(group, names):
            if kind != "in":
                continue
            st = self.stats.get(names[layer])
            if st is None:
                continue
            contribs.append((st[torch.as_tensor(idxs, dtype=torch.long, device=st.device)],
                             item.root_idxs))
        return self._reduce(group, contribs)
