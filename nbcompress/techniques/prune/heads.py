"""Where the heads and FFN neurons of a transformer are: its attention blocks and feed-forward
layers found by their structure, each as the slices of tensors one unit (a head, a neuron) owns.
With grouped-query attention the unit is a key/value head with the query heads that read it.

The hidden size (embeddings, norms, residual stream, classifier) is never pruned, so removing a
unit is local to one block: a head is ``head_dim`` rows of Q, K and V (of each part of a fused
``qkv`` / GPT-2 ``c_attn``), the same columns of the output projection and its column of a
relative-position bias table; an FFN neuron is a row of the up (and gate) projection and a column
of the down projection. After slicing, the module's own size attributes (``num_heads``,
``all_head_size``, ``split_size``, ``attn_dim``, ...) are set to what its forward must read.

Blocks are recognised by layer names and shapes, not by class, so HF BERT / DistilBERT / GPT-2 /
T5 / ViT / Whisper / Llama, timm ``Attention`` / ``WindowAttention`` / ``Mlp`` and torchvision's
``MLPBlock`` share one code path. A block that does not fit (keys / values not whole groups of
query heads, an unknown parameter that may index heads, ``nn.MultiheadAttention`` whose forward
needs ``embed_dim == num_heads * head_dim``) is left whole with a note.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ...layers import is_conv1d

__all__ = ["Block", "find_blocks", "is_transformer", "slice_block"]

_HEAD_ATTRS = ("num_attention_heads", "n_heads", "num_heads")
_WIDTH_ATTRS = ("all_head_size", "inner_dim", "attn_dim", "split_size")
_QKV = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"),
        ("q", "k", "v"))
_OUT = ("o_proj", "out_proj", "out_lin", "o", "dense")
# (up layers, down layer): the up layers' outputs are the FFN's neurons, the down layer reads them
_FFN = ((("fc1",), "fc2"), (("lin1",), "lin2"), (("c_fc",), "c_proj"), (("wi",), "wo"),
        (("wi_0", "wi_1"), "wo"), (("gate_proj", "up_proj"), "down_proj"),
        (("up_proj",), "down_proj"), (("intermediate.dense",), "output.dense"))
_HEAD_TABLES = ("relative_position_bias_table", "relative_attention_bias")


def _is_dense(m) -> bool:
    """A plain float Linear / Conv1D (not a compressed or quantized replacement)."""
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.Linear) or is_conv1d(m)) and isinstance(w, nn.Parameter) and \
        w.is_floating_point() and not getattr(m, "_nbc_weight_buffers", None)


def _is_norm(m) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
        "Norm" in type(m).__name__


def _out_dim(m: nn.Module) -> int:
    return 1 if is_conv1d(m) else 0


def _n_out(m: nn.Module) -> int:
    return m.weight.shape[_out_dim(m)]


def _n_in(m: nn.Module) -> int:
    return m.weight.shape[1 - _out_dim(m)]


@dataclass
class Slice:
    """``module.<param>`` along ``dim``: ``parts`` equal blocks, each ``units * width`` long; unit u
    owns ``[p * units * width + u * width, ... + width)`` in every part ``p``."""
    name: str
    module: nn.Module
    param: str
    dim: int
    width: int
    parts: int = 1
    role: str = "other"          # "out" / "in" (a dense layer's outputs / inputs) or "other"

    def index(self, keep: torch.Tensor, units: int, device) -> torch.Tensor:
        w = torch.arange(self.width, device=device)
        one = (keep.to(device)[:, None] * self.width + w).flatten()
        return torch.cat([p * units * self.width + one for p in range(self.parts)])

    def per_unit(self, s: torch.Tensor, units: int) -> torch.Tensor:
        """A score per element of the tensor -> the sum of each unit's elements."""
        s = s.movedim(self.dim, 0).reshape(self.parts, units, self.width, -1)
        return s.sum(dim=(0, 2, 3))


@dataclass
class Block:
    """One attention block (unit: head) or FFN (unit: neuron) and what its units own."""
    name: str
    module: nn.Module
    unit: str                    # "head" | "neuron"
    units: int
    slices: list = field(default_factory=list)
    attrs: list = field(default_factory=list)    # (module, attribute, per-unit multiplier)
    couple: str | None = None    # blocks with the same key must keep the same heads (T5)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(s.name for s in self.slices))

    def ok(self) -> bool:
        for s in self.slices:
            t = getattr(s.module, s.param)
            if t.shape[s.dim] != s.parts * self.units * s.width:
                return False
        return self.units >= 1


def _heads(m: nn.Module) -> int | None:
    """The head count of an attention module: its attribute, or (Llama-style modules that keep
    only ``head_dim``) the query projection's outputs / ``head_dim``."""
    for a in _HEAD_ATTRS:
        if isinstance(getattr(m, a, None), int):
            return getattr(m, a)
    hd = getattr(m, "head_dim", None)
    q = next((_child(m, t[0]) for t in _QKV if all(_child(m, c) is not None for c in t)), None)
    if isinstance(hd, int) and hd > 0 and isinstance(getattr(q, "weight", None), torch.Tensor):
        n = _n_out(q)
        return n // hd if n % hd == 0 else None
    return None


def is_transformer(model: nn.Module) -> bool:
    """The model has attention (a module with a head count, or ``nn.MultiheadAttention``): its
    structured step prunes heads and FFN neurons and keeps the hidden size."""
    return any(isinstance(m, nn.MultiheadAttention) or _heads(m) is not None
               for m in model.modules())


def _child(m: nn.Module, path: str):
    try:
        return m.get_submodule(path)
    except AttributeError:
        return None


def _dense_slices(name, m, dim_kind, width, parts=1):
    """The weight (and bias, for outputs) of a dense layer along its out or in dimension."""
    d = _out_dim(m) if dim_kind == "out" else 1 - _out_dim(m)
    out = [Slice(name, m, "weight", d, width, parts, dim_kind)]
    if dim_kind == "out" and getattr(m, "bias", None) is not None:
        out.append(Slice(name, m, "bias", 0, width, parts))
    return out


def _attention(name: str, m: nn.Module, names: dict, parent: nn.Module | None):
    """A Block for attention module ``m`` (or a reason it is left whole, or None: not one)."""
    heads = _heads(m)
    if heads is None:
        return None
    slices: list[Slice] = []
    groups = 1
    fused = _child(m, "qkv") if _is_dense(_child(m, "qkv")) else \
        _child(m, "c_attn") if _is_dense(_child(m, "c_attn")) else None
    if fused is not None:                       # timm qkv Linear / GPT-2 c_attn Conv1D
        out = _child(m, "proj") if _is_dense(_child(m, "proj")) else _child(m, "c_proj")
        if not _is_dense(out):
            return "no output projection found"
        inner = _n_in(out)
        if inner % heads or _n_out(fused) % inner:
            return "its fused projection is not a whole number of heads"
        d = inner // heads
        slices += _dense_slices(names[fused], fused, "out", d, _n_out(fused) // inner)
        for extra in ("q_attn", "gate"):        # GPT-2 cross-attention query, timm's gate
            e = _child(m, extra)
            if _is_dense(e):
                slices += _dense_slices(names[e], e, "out", d)
    else:
        qkv = next((t for t in _QKV if all(_is_dense(_child(m, c)) for c in t)), None)
        if qkv is None:
            return "no Q/K/V projections found" if any(_child(m, c) is not None for t in _QKV
                                                       for c in t) else None
        q, k, v = (_child(m, c) for c in qkv)
        inner = _n_out(q)
        if inner % heads:
            return "its projections are not a whole number of heads"
        d = inner // heads
        kv = _n_out(k)
        if _n_out(v) != kv or kv % d or heads % (kv // d):
            return "its keys / values are not whole groups of query heads"
        groups = heads // (kv // d)      # query heads per key/value head (GQA); 1: multi-head
        slices += _dense_slices(names[q], q, "out", d * groups)
        for p in (k, v):
            slices += _dense_slices(names[p], p, "out", d)
        out = next((_child(m, o) for o in _OUT if _is_dense(_child(m, o))
                    and _n_in(_child(m, o)) == inner), None)
        if out is None and parent is not None:  # BERT: the projection is a sibling's dense
            cands = [c for c in parent.modules() if _is_dense(c) and c not in (q, k, v)
                     and _n_in(c) == inner and c is not m]
            out = cands[0] if len(cands) == 1 else None
        if out is None:
            return "no output projection found"
    slices += _dense_slices(names[out], out, "in", d * groups)
    norm = _child(m, "norm")                    # timm scale_norm over the attention output
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        slices += [Slice(names[norm], norm, p, 0, d * groups) for p in ("weight", "bias")
                   if getattr(norm, p) is not None]
    for t in _HEAD_TABLES:
        tab = getattr(m, t, None)
        if isinstance(tab, nn.Embedding):
            slices.append(Slice(names[tab], tab, "weight", 1, groups))
        elif isinstance(tab, nn.Parameter):
            slices.append(Slice(name, m, t, tab.dim() - 1, groups))
    covered = {s.module for s in slices} | {_child(m, "q_norm"), _child(m, "k_norm")}
    for sub_name, sub in m.named_modules():
        if sub in covered or (_is_norm(sub) and sub.weight is not None
                              and sub.weight.shape[0] == _n_out(out)):   # over the hidden size
            continue
        for p_name, p in sub._parameters.items():
            if p is None:
                continue
            if heads in p.shape or inner in p.shape:
                return f"its parameter {sub_name + '.' if sub_name else ''}{p_name} may index heads"
    attrs = [(m, a, groups) for a in _HEAD_ATTRS if isinstance(getattr(m, a, None), int)]
    attrs += [(m, a, d * groups) for a in _WIDTH_ATTRS if getattr(m, a, None) == inner]
    attrs += [(m, a, 1) for a in ("num_key_value_heads", "num_kv_heads")
              if isinstance(getattr(m, a, None), int)]
    couple = None
    if hasattr(m, "has_relative_attention_bias"):   # T5: layer 0's bias serves the whole stack
        couple = re.sub(r"\.\d+\.", ".*.", name)
    return Block(name, m, "head", heads // groups, slices, attrs, couple)


def _ffn(name: str, m: nn.Module, names: dict):
    if isinstance(m, nn.Sequential):            # torchvision MLPBlock: Linear, act, ..., Linear
        if hasattr(m, "weight"):                # a layer made of layers (a low-rank factorisation)
            return None
        dense = [c for c in m if isinstance(c, nn.Linear)]
        rest = [c for c in m if not isinstance(c, nn.Linear)]
        if len(dense) != 2 or any(any(True for _ in c.parameters()) for c in rest):
            return None
        pairs = [((dense[0],), dense[1])]
    else:
        pairs = []
        for ups, down in _FFN:
            u = [_child(m, p) for p in ups]
            dn = _child(m, down)
            if all(_is_dense(x) for x in u) and _is_dense(dn):
                pairs.append((tuple(u), dn))
        pairs = sorted(pairs, key=lambda p: -len(p[0]))[:1]   # gate + up over up alone
    if not pairs:
        return None
    ups, down = pairs[0]
    hidden = _n_in(down)
    if any(_n_out(u) != hidden for u in ups):
        return None
    slices = [s for u in ups for s in _dense_slices(names[u], u, "out", 1)]
    slices += _dense_slices(names[down], down, "in", 1)
    norm = _child(m, "norm")                    # timm Mlp's norm over the hidden features
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None and \
            norm.weight.shape[0] == hidden:
        slices += [Slice(names[norm], norm, p, 0, 1) for p in ("weight", "bias")
                   if getattr(norm, p) is not None]
    return Block(names[ups[0]], m, "neuron", hidden, slices)


def find_blocks(model: nn.Module) -> tuple[list[Block], list[str]]:
    """The attention blocks and FFNs of ``model`` (each dense layer in at most one) and a note per
    block left whole."""
    names = {m: n for n, m in model.named_modules()}
    parents = {}
    for n, m in model.named_modules():
        for c in m.children():
            parents.setdefault(c, m)
    blocks: list[Block] = []
    whole: list[str] = []
    claimed: set = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            whole.append(f"{name} (nn.MultiheadAttention: its forward needs embed_dim == "
                         f"num_heads * head_dim)")
            continue
        b = _attention(name, m, names, parents.get(m))
        if isinstance(b, str):
            whole.append(f"{name} ({type(m).__name__}: {b})")
            continue
        if b is None:
            continue
        if not b.ok():
            whole.append(f"{name} ({type(m).__name__}: its shapes are not whole heads)")
            continue
        if any(s.module in claimed for s in b.slices):
            continue
        claimed.update(s.module for s in b.slices)
        blocks.append(b)
    for name, m in model.named_modules():
        b = _ffn(name, m, names)
        if b is None or any(s.module in claimed for s in b.slices) or not b.ok():
            continue
        claimed.update(s.module for s in b.slices)
        blocks.append(b)
    return blocks, whole


@torch.no_grad()
def slice_block(b: Block, keep: torch.Tensor) -> None:
    """Keep only units ``keep`` (sorted indices) of block ``b``: every slice, the layers' size
    attributes and the module's head attributes."""
    units = b.units
    for s in b.slices:
        old = getattr(s.module, s.param)
        new = old.detach().index_select(s.dim, s.index(keep, units, old.device)).clone()
        setattr(s.module, s.param, nn.Parameter(new, requires_grad=old.requires_grad))
    for mod in dict.fromkeys(s.module for s in b.slices):
        _fix_sizes(mod)
    n = int(keep.numel())
    for mod, attr, mult in b.attrs:
        setattr(mod, attr, n * mult)
    b.units = n


def _fix_sizes(m: nn.Module) -> None:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor):
        return
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape[0], w.shape[1]
    elif is_conv1d(m):
        m.nx, m.nf = w.shape[0], w.shape[1]
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (w.shape[0],)
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = w.shape[1]
