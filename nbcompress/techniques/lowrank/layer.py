""":class:`LowRank`: the factorised form of a layer, an ``nn.Sequential`` of standard Linear /
Conv2d factors that still reads like the layer it replaced, so a model's own code that reads
``self.qkv.weight`` (torchvision's Swin), ``self.wo.weight.dtype`` (Hugging Face T5) or
``self.projection.weight.dtype`` (Hugging Face ViT) keeps running.

``weight`` is the product of the factors in the original layout and dtype (differentiable, so
fine-tuning trains through it; computed on each read, so a model that reads it for its own
``F.linear`` pays a dense product there), ``bias`` the last factor's bias, and the original's
shape attributes are plain attributes: ``in_features`` / ``out_features`` for a Linear, plus
``nf`` / ``nx`` for a transformers ``Conv1D`` (whose ``weight`` is ``[in, out]``), and
``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``,
``groups`` for a Conv2d.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["LowRank"]

_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "padding_mode")


class LowRank(nn.Sequential):
    """A factorised Linear, ``Conv1D`` or Conv2d: its factors in sequence (``layout``: "linear",
    "conv1d" or "conv"), with the original's ``weight``, ``bias`` and shape attributes."""

    @classmethod
    def of(cls, factors: nn.Sequential, original: nn.Module, layout: str) -> "LowRank":
        new = cls(*factors)
        new.layout = layout
        if layout == "conv":
            for a in _CONV_ATTRS:
                setattr(new, a, getattr(original, a))
        else:
            if isinstance(original, nn.Linear):
                n_in, n_out = original.in_features, original.out_features
            else:                                           # a Conv1D: weight [in, out]
                n_in, n_out = original.weight.shape
            new.in_features, new.out_features = int(n_in), int(n_out)
            if layout == "conv1d":
                new.nf, new.nx = int(n_out), int(n_in)
        new.train(original.training)
        return new

    @property
    def weight(self) -> torch.Tensor:
        layers = list(self)
        if self.layout != "conv":
            w = layers[0].weight
            for m in layers[1:]:
                w = m.weight @ w
            return w.t() if self.layout == "conv1d" else w
        w = _dense(layers[0])
        for m in layers[1:]:
            b = _dense(m)
            if b.shape[2:] == (1, 1):
                w = torch.einsum("oc,cixy->oixy", b[:, :, 0, 0], w)
            else:                           # a spatial conv after a 1x1 one
                w = torch.einsum("ocxy,ci->oixy", b, w[:, :, 0, 0])
        return _grouped(w, self.groups)

    @property
    def bias(self):
        return self[-1].bias

    def extra_repr(self) -> str:
        if self.layout == "conv":
            return (f"low-rank Conv2d({self.in_channels}, {self.out_channels}, "
                    f"kernel_size={self.kernel_size}, groups={self.groups})")
        return f"low-rank {'Conv1D' if self.layout == 'conv1d' else 'Linear'}(" \
               f"in_features={self.in_features}, out_features={self.out_features})"


def _dense(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's kernel as ``out x in x kh x kw`` with zeros outside its groups
    (differentiable)."""
    w = conv.weight
    g = conv.groups
    if g == 1:
        return w
    o, ci = w.shape[:2]
    member = torch.arange(o, device=w.device) // (o // g)
    onehot = nn.functional.one_hot(member, g).to(w.dtype)             # (o, g)
    return torch.einsum("oikl,og->ogikl", w, onehot).reshape(o, g * ci, *w.shape[2:])


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A dense ``out x in x kh x kw`` kernel back in the layout of a conv with ``groups``
    (``out x in/groups x kh x kw``: the diagonal blocks)."""
    if groups == 1:
        return w
    o, i = w.shape[:2]
    blocks = w.reshape(groups, o // groups, groups, i // groups, *w.shape[2:])
    diag = blocks.diagonal(dim1=0, dim2=2)                                # (o/g, i/g, kh, kw, g)
    return diag.permute(4, 0, 1, 2, 3).reshape(o, i // groups, *w.shape[2:])
