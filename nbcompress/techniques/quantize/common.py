"""What every quantization mode shares: the modes and dtypes, which layer types each mode
quantizes, selecting and replacing layers, and the rows of the step's layer table."""
from __future__ import annotations

import torch
from torch import nn

from ...layers import as_linear, is_conv1d, is_plain, param_owners, shared_with

__all__ = ["MODES", "DTYPES", "WEIGHT_LAYERS", "DYNAMIC_LAYERS", "STATIC_LAYERS", "AUTO_LAYERS",
           "CONV_LAYERS", "DEFAULT_BITS", "DEFAULT_LR"]

MODES = ("dynamic", "static", "uniform", "cluster", "binary")
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHT_LAYERS = (nn.Linear,) + CONV_LAYERS
DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU)
STATIC_LAYERS = (nn.Linear,) + CONV_LAYERS
AUTO_LAYERS = STATIC_LAYERS + (nn.LSTM, nn.GRU)
DEFAULT_BITS = {"uniform": 8, "cluster": 5, "binary": 1, "dynamic": 8, "static": 8}
DEFAULT_LR = {"uniform": 1e-4, "cluster": 1e-4, "binary": 1e-3}


def names(kinds: tuple) -> str:
    return ", ".join(k.__name__ for k in kinds)


def types_found(model: nn.Module) -> str:
    seen: dict[str, None] = {}
    for m in model.modules():
        seen.setdefault(type(m).__name__, None)
    return ", ".join(seen) or "nothing"


def select(model: nn.Module, kinds: tuple, pattern) -> list[tuple[str, nn.Module]]:
    """Modules of these types, subclasses included when they compute the same (``timm.layers.
    Linear``; not MultiheadAttention's out_proj, nor a conv with a forward of its own), and
    transformers' ``Conv1D`` as a Linear (:func:`nbcompress.layers.is_plain`), whose name
    ``pattern`` matches."""
    out = []
    for n, m in model.named_modules():
        if is_plain(m, kinds) and (pattern is None or pattern.search(n)):
            out.append((n, m))
    return out


def prepare(model: nn.Module, targets: list, notes: list[str]) -> list[tuple[str, nn.Module]]:
    """The targets a mode works on: a layer whose weight is tied to another module's (GPT-2's
    ``lm_head`` and its input embedding) is left whole, named in the notes (quantizing it would
    untie a copy, or change the embedding through the head); a transformers ``Conv1D`` becomes
    the ``nn.Linear`` it is (same outputs) in ``model`` first, one layer at a time (``targets``
    is emptied as it goes, so the old layers do not all stay alive beside the new ones)."""
    owners = param_owners(model)
    paths: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(n)
    out, tied, conv1d = [], [], 0
    for i, (n, m) in enumerate(targets):
        targets[i] = None        # the caller's list lets go: a replaced Conv1D is freed at once
        others = shared_with(m, paths.get(id(m), [n]), owners)
        if others:
            tied.append(f"{n} (tied to {others[0]})")
            continue
        if is_conv1d(m):
            lin = as_linear(m)
            replace(model, n, lin)
            m, conv1d = lin, conv1d + 1
        out.append((n, m))
    if tied:
        notes.append("left whole, its weight is tied to another layer's: " + ", ".join(tied))
    if conv1d:
        notes.append(f"{conv1d} transformers Conv1D layer{'s' if conv1d != 1 else ''} (weight "
                     f"[in, out]) quantized as the Linear layers they are")
    return out


def replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model`` (returns ``new`` itself when ``name`` is the root),
    in the train/eval mode of the module it replaces."""
    old = model.get_submodule(name)
    new.train(old.training)
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def mark(module: nn.Module, cfg) -> None:
    """Tell storage whether this layer's tensors may be Huffman-coded (``huffman``): a plain
    attribute the quantized layer classes export and restore (``qmodules_int8._FLAGS``)."""
    module.nbc_huffman = bool(cfg.huffman)


def row(name, old, new, bits, kind, w, wq, *, scratch: bool = False) -> dict:
    """One row of the step's layer table: what the layer became and its relative weight error.
    ``scratch``: ``wq`` is the caller's to overwrite (a dequantized weight made for this row):
    the error is computed in it, with no temporary the size of the layer (same numbers). A
    torch quantized ``wq`` (int8 kernels' weights) is dequantized a block of rows at a time: no
    float copy of the layer is made at all."""
    w = w.detach()
    if wq.is_quantized:
        err = den = 0.0
        step = max(1, (1 << 18) // max(1, w[0].numel()))    # (int8 kernels' weights: 2-D+)
        for r in range(0, w.shape[0], step):
            a = w[r:r + step].float().cpu()
            den += float(a.norm()) ** 2
            err += float(wq[r:r + step].dequantize().cpu().sub_(a).norm()) ** 2
        denom, err = den ** 0.5 or 1.0, err ** 0.5
    else:
        w = w.float().cpu()
        wq = wq.detach().float().cpu()
        denom = float(w.norm()) or 1.0
        err = float((wq.sub_(w) if scratch else wq - w).norm())
    return {"layer": name or "(model)", "type": f"{type(old).__name__}",
            "new type": type(new).__name__, "kind": kind, "bits": int(bits),
            "params": int(w.numel()), "weight_error": err / denom}


def low_precision(layers: list, pattern) -> str | None:
    """"bf16" / "fp16" when one of the selected layers (``(name, module)`` pairs, filtered by
    ``pattern`` when given) holds a weight in that dtype (a model that computes in it), else
    None: torch.ao's int8 kernels take float32 input and return float32."""
    for n, m in layers:
        if pattern is not None and not pattern.search(n):
            continue
        for p in m.parameters(recurse=False):
            if p.dtype in (torch.bfloat16, torch.float16):
                return "bf16" if p.dtype == torch.bfloat16 else "fp16"
    return None


def float_params(m: nn.Module) -> bool:
    return any(p.is_floating_point() for p in m.parameters(recurse=False)) or \
        any(b.is_floating_point() for b in m.buffers(recurse=False))
