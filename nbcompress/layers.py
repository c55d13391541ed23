"""Which layers of a real model are Linear layers, and which weights are tied: one answer for
every technique that replaces or touches layers (quantize, lowrank, unstructured prune).

- Layer types are matched as subclasses (``timm.layers.Linear`` is a Linear), except
  ``nn.MultiheadAttention``'s ``out_proj`` (a ``NonDynamicallyQuantizableLinear``), whose weight
  the attention reads itself.
- transformers' ``Conv1D`` (GPT-2, GPT: weight ``[in, out]``, ``y = x @ W + b``) is the Linear it
  is: :func:`as_linear` gives the equivalent ``nn.Linear``. transformers is never imported here:
  a model holding a ``Conv1D`` has imported it already.
- A tied weight (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is one tensor with
  several owners; :func:`shared_with` names the owners outside a layer, so a technique leaves
  the layer whole (and says so) rather than changing half of the tensor through one owner.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["conv1d_type", "is_conv1d", "is_linear", "is_plain", "as_linear", "param_owners",
           "shared_with", "subclass_notes", "layer_bar", "BAR_WEIGHTS"]

BAR_WEIGHTS = 1 << 25     # layer bars from 33.5M weights on (seconds of work); none below

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class when transformers is loaded, else None."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_conv1d(m: nn.Module) -> bool:
    cls = conv1d_type()
    return cls is not None and isinstance(m, cls)


def _same_forward(m: nn.Module, base: type) -> bool:
    """``m``'s class computes what ``base`` computes: it keeps ``base.forward``, or it is
    ``timm.layers.Linear`` (``F.linear`` after a cast of the weight to the input's dtype)."""
    cls = type(m)
    if cls.forward is base.forward:
        return True
    return base is nn.Linear and cls.__name__ == "Linear" and cls.__module__.startswith("timm.")


def is_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass computing the same) reading its own weight, or a
    transformers ``Conv1D``. Not ``nn.MultiheadAttention``'s ``out_proj`` (the attention reads
    its weight itself)."""
    if isinstance(m, nn.Linear):
        return not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear) \
            and _same_forward(m, nn.Linear) and isinstance(m.weight, torch.Tensor) \
            and m.weight.dim() == 2
    return is_conv1d(m)


def is_plain(m: nn.Module, kinds: tuple) -> bool:
    """``m`` is one of ``kinds`` (nn.Linear, the convs, LSTM / GRU...) and computes what that
    class computes: a subclass with a forward of its own (timm's ``Conv2dSame`` pads in forward,
    ``StdConv2d`` standardises its weight there) is not, since a replacement would drop it.
    ``nn.Linear`` in ``kinds`` also matches transformers' ``Conv1D`` (:func:`is_linear`)."""
    if nn.Linear in kinds and is_linear(m):
        return True
    for k in kinds:
        if k is not nn.Linear and isinstance(m, k) and _same_forward(m, _base(m, k)):
            return True
    return False


def _base(m: nn.Module, kind: type) -> type:
    """The torch class of ``kind`` ``m`` derives from (Conv2d for a Conv2d subclass)."""
    for k in _CONVS + (nn.LSTM, nn.GRU, nn.Linear):
        if isinstance(m, k) and issubclass(k, kind):
            return k
    return kind


def subclass_notes(model: nn.Module, kinds: tuple, pattern=None) -> list[str]:
    """Names of layers that are of ``kinds`` by class but compute something else in a forward of
    their own, left whole (one note per class)."""
    by_cls: dict[str, list[str]] = {}
    for n, m in model.named_modules():
        if isinstance(m, kinds) and not is_plain(m, kinds) and \
                (pattern is None or pattern.search(n)) and \
                not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            by_cls.setdefault(type(m).__name__, []).append(n)
    return [f"left {len(v)} {k} layer{'s' if len(v) != 1 else ''} whole ({', '.join(v[:3])}"
            f"{', ...' if len(v) > 3 else ''}): a subclass with a forward of its own, which a "
            f"replacement would drop" for k, v in by_cls.items()]


def as_linear(m: nn.Module) -> nn.Module:
    """``m`` itself for a Linear; for a ``Conv1D`` a new ``nn.Linear`` with the transposed weight
    (the same outputs), on its device and dtype, in its train/eval mode."""
    if not is_conv1d(m):
        return m
    w = m.weight
    # uninitialised (no random init of a weight about to be overwritten: seconds at 1B)
    lin = torch.nn.utils.skip_init(nn.Linear, w.shape[0], w.shape[1], bias=m.bias is not None,
                                   device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.detach().t())
        if m.bias is not None:
            lin.bias.copy_(m.bias.detach())
    lin.train(m.training)
    return lin


def param_owners(model: nn.Module) -> dict[int, set[str]]:
    """``id(parameter) -> {"module.path.name", ...}``: every name under which a parameter is
    reached (several for a tied or shared one)."""
    owners: dict[int, set[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), set()).add(f"{mname}.{pname}" if mname else pname)
    return owners


def shared_with(module: nn.Module, paths, owners: dict[int, set[str]]) -> list[str]:
    """Names outside ``module`` (reached at ``paths``) that hold one of its own parameters:
    empty unless a parameter of it is tied to another module's."""
    mine = {f"{p}.{n}" if p else n for p in paths for n, _ in module.named_parameters(recurse=False)}
    out: set[str] = set()
    for _, t in module.named_parameters(recurse=False):
        out |= owners.get(id(t), set()) - mine
    return sorted(out)


def layer_bar(total: int, desc: str, progress: bool, weights: int):
    """The ``tqdm.auto`` bar of a technique's per-layer loop (``bar.update()`` per layer, a
    context manager), as the training loop shows its own (``train.fit``): shown when
    ``progress`` (the step's setting; the magics' ``--no-progress`` turns it off) and the layers
    hold at least :data:`BAR_WEIGHTS` weights; a small model's step takes under a second and
    shows none (notebook outputs stay as they were)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False,
                disable=not progress or weights < BAR_WEIGHTS)
