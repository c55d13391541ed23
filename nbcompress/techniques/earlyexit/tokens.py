"""Vision transformers as a chain of blocks: the embedding before the blocks, the blocks, the
norm + pooling + classifier after them.

A ViT is not a chain of its sub-modules: its forward concatenates a class token (a parameter of
the model itself) and adds position embeddings between the patch embedding and the blocks, then
takes the class token (or the mean of the tokens) after them. For the two ViT classes users
have, the parts before and after the blocks become one block each:

- timm's ``VisionTransformer`` (ViT, DeiT, and the models built on it): the part before is the
  model's own ``forward_features`` with its blocks and final norm taken out; the part after is
  its own final norm and ``forward_head``. Each part is a shallow copy of the model holding only
  its own modules and parameters, so nothing is held twice and timm's code does the work.
- torchvision's ``VisionTransformer``: ``_process_input``, the class token and the position
  embedding before ``encoder.layers``; ``encoder.ln``, the class token and ``heads`` after.

The chain is checked like any other: run one after another on a real batch, the parts must
reproduce the model's output (else the model is refused as before).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["adapt"]


def _stub(model: nn.Module, keep_modules: set[str], keep_params: set[str]) -> nn.Module:
    """A shallow copy of ``model`` holding only the named sub-modules and parameters (the rest
    are ``nn.Identity`` / None), so two stubs share no tensor."""
    s = copy.copy(model)
    s._modules = {k: (m if k in keep_modules else (nn.Identity() if m is not None else None))
                  for k, m in model._modules.items()}
    s._parameters = {k: (p if k in keep_params else None) for k, p in model._parameters.items()}
    s._buffers = dict(model._buffers)
    s._forward_hooks, s._forward_pre_hooks = type(model._forward_hooks)(), \
        type(model._forward_pre_hooks)()
    return s


class TimmEmbed(nn.Module):
    """timm ViT's ``forward_features`` up to its blocks: patch embedding, class / register
    tokens, position embedding, ``norm_pre``."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = _stub(vit, {"patch_embed", "pos_drop", "patch_drop", "norm_pre"},
                         {"cls_token", "reg_token", "pos_embed"})

    def forward(self, x):
        return self.vit.forward_features(x)          # its blocks and norm are Identity


class TimmHead(nn.Module):
    """timm ViT's final norm and ``forward_head`` (pooling, fc_norm, classifier)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = _stub(vit, {"norm", "attn_pool", "fc_norm", "head_drop", "head"}, set())

    def forward(self, x):
        return self.vit.forward_head(self.vit.norm(x))


class TorchvisionEmbed(nn.Module):
    """torchvision ViT's forward up to ``encoder.layers``: patches, class token, positions."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = _stub(vit, {"conv_proj"}, {"class_token"})
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x):
        x = self.vit._process_input(x)
        x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class TorchvisionHead(nn.Module):
    """torchvision ViT's ``encoder.ln``, the class token, ``heads``."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.ln = vit.encoder.ln
        self.heads = vit.heads

    def forward(self, x):
        return self.heads(self.ln(x)[:, 0])


def adapt(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The chain of a vision transformer whose class is known here, or None."""
    cls = type(model)
    mod = cls.__module__
    if mod.startswith("timm.") and all(hasattr(model, a) for a in
                                       ("forward_features", "forward_head", "patch_embed",
                                        "_pos_embed", "blocks", "norm")) \
            and isinstance(model.blocks, nn.Sequential):
        return ([("(patch embedding, tokens, positions)", TimmEmbed(model))]
                + [(f"blocks.{k}", b) for k, b in model.blocks.named_children()]
                + [("(norm, pooling, head)", TimmHead(model))])
    if mod.startswith("torchvision.models.vision_transformer") and cls.__name__ == \
            "VisionTransformer":
        layers = model.encoder.layers
        return ([("(patch embedding, class token, positions)", TorchvisionEmbed(model))]
                + [(f"encoder.layers.{k}", b) for k, b in layers.named_children()]
                + [("(norm, class token, heads)", TorchvisionHead(model))])
    return None
