"""Counting what a model is: parameters (nonzero too), bytes as stored now and as
:func:`nbcompress.save` packs them, and FLOPs of one forward pass (``torch.utils.flop_counter``),
per layer and scaled by weight density."""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import (FlopCounterMode, _FlopCounterMode, flop_registry,
                                      sdpa_flop_count)

from .fingerprint import MEMO, Rebuilt, state_values
from .nonzeros import _count, code_counts, nonzero_count, plain_code_counts  # noqa: F401
from .train import forward_batch as _forward


def _weight_like(module: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors that are the module's learned content: its own parameters, plus buffers a module
    declares as weights (``_nbc_weight_buffers``, e.g. int codes of a quantized layer)."""
    out = {n: p for n, p in module.named_parameters(recurse=False)}
    for n in getattr(module, "_nbc_weight_buffers", ()):
        b = getattr(module, n, None)
        if isinstance(b, torch.Tensor):
            out[n] = b
    return out


def _is_torch_quantized(m: nn.Module) -> bool:
    """A ``torch.ao`` quantized module: its weights live in packed, backend-specific objects
    (not in ``parameters()``), read back through ``_weight_bias()`` / ``weight()``."""
    return any(c.__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
               for c in type(m).__mro__)


def _counts_itself(m: nn.Module) -> bool:
    """True for a module that stands for its whole subtree when counting: one with its own
    ``nbc_count`` or a ``torch.ao`` quantized module (whose children only hold packed params)."""
    return hasattr(m, "nbc_count") or _is_torch_quantized(m)


def _units(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(name, module)`` of every module once, in ``named_modules`` order, except the modules
    inside one that counts itself (:func:`_counts_itself`): those are its packed parameters."""
    inside = None
    for name, m in model.named_modules():
        if inside is not None and (inside == "" or name.startswith(inside + ".")):
            continue
        inside = None
        yield name, m
        if _counts_itself(m):
            inside = name


def _stored_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own learned tensors as it stores them: :func:`_weight_like`, plus, for a
    ``torch.ao`` quantized module, its packed weights (quantized tensors) and biases."""
    out = dict(_weight_like(module))
    if not _is_torch_quantized(module):
        return out
    got = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wb = getattr(module, "_weight_bias", None)
            if callable(wb):
                got = wb()
            elif callable(getattr(module, "weight", None)):
                got = (module.weight(), None)
        except Exception:  # noqa: BLE001 - a module we cannot read: counted as having none
            got = None
    if isinstance(got, tuple) and len(got) == 2:
        for n, t in zip(("weight", "bias"), got):
            if isinstance(t, torch.Tensor):
                out[n] = t
    elif isinstance(got, dict):           # dynamic LSTM / GRU: {"weight": {...}, "bias": {...}}
        for part in ("weight", "bias"):
            for n, t in (got.get(part) or {}).items():
                if isinstance(t, torch.Tensor):
                    out[n] = t
    return out


def _tensor_counts(t: torch.Tensor) -> tuple[int, int]:
    """(entries, nonzero entries). A quantized tensor's entry is zero when its integer code
    equals its zero point (per channel for per-channel schemes), i.e. it dequantizes to 0.
    Kept in :data:`~nbcompress.fingerprint.MEMO` while the tensor keeps its values."""
    memo = MEMO.results(t)
    got = memo.get("counts")
    if got is None:
        got = memo["counts"] = _count(t)
    return got


def _is_bias(name: str) -> bool:
    return name == "bias" or name.startswith("bias_") or name.endswith(".bias")


def module_counts(module: nn.Module, seen: dict | None = None) -> tuple[int, int]:
    """(params, nonzero params) the module stores itself (not its children): its ``nbc_count()``
    when it has one, else :func:`_stored_tensors`. ``seen`` (id -> tensor, filled here): tensors
    already counted elsewhere in the model (tied weights) are skipped; the tensors are held there
    so no id is reused while counting (torch.ao hands out fresh tensors on each call)."""
    if hasattr(module, "nbc_count"):
        p, z = module.nbc_count()
        return int(p), int(z)
    p = z = 0
    for t in _stored_tensors(module).values():
        if seen is not None:
            if id(t) in seen:
                continue
            seen[id(t)] = t
        a, b = _tensor_counts(t)
        p, z = p + a, z + b
    return p, z


def weight_density(module: nn.Module) -> float | None:
    """Fraction of the module's stored *weights* (biases left out) that are nonzero, read from
    what it stores: float weights, the int codes of a ``torch.ao`` quantized weight against its
    zero points, or, for a layer that only counts itself, ``nbc_count()`` less its biases.
    None when the module stores no weight."""
    plain = _plain_weight_counts(module)
    if plain is not None:
        return plain[1] / plain[0] if plain[0] else None
    tensors = _stored_tensors(module)
    w = module.__dict__.get("weight")       # (not a property: a quantized layer's dequantizes)
    if isinstance(w, torch.Tensor) and "weight" not in tensors:   # torch.nn.utils.prune: the
        tensors["weight"] = w                                     # masked weight, not weight_orig
    exact = {n: t for n, t in tensors.items() if not _is_bias(n)
             and (t.is_quantized or t.is_floating_point() or t.is_complex())}
    if "weight" in exact:
        exact = {"weight": exact["weight"]}
    elif any(n.startswith("weight") for n in exact):     # LSTM / GRU: weight_ih_l0, weight_hh_l0...
        exact = {n: t for n, t in exact.items() if n.startswith("weight")}
    if exact:
        p = z = 0
        for t in exact.values():
            a, b = _tensor_counts(t)
            p, z = p + a, z + b
        return z / p if p else None
    if hasattr(module, "nbc_count"):        # e.g. integer codes with zero points of its own
        p, z = module.nbc_count()
        for n, t in tensors.items():
            if _is_bias(n):
                a, b = _tensor_counts(t)
                if p - a > 0:
                    p, z = p - a, z - b
        return z / p if p else None
    return None


def _plain_weight_counts(module: nn.Module) -> tuple[int, int] | None:
    """(weights, nonzero weights) of an int8 layer that keeps its weight's plain form (int8
    codes and zero points, made once when it was packed: ``quantize.int8_plain``), from those
    codes, kept in MEMO with them; None for any other module. (Its quantized weight, rebuilt on
    each ``_weight_bias()``, would be a new tensor to count every time.)"""
    plain = getattr(module, "_plain", None) or getattr(module, "_nbc_plain_form", None)
    if not callable(plain):
        return None
    tensors, attrs = plain()
    codes = tensors.get("weight_int8")
    if not isinstance(codes, torch.Tensor):
        return None
    return plain_code_counts(tensors, attrs)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(params, nonzero params). A module may override with ``nbc_count() -> (params, nonzero)``
    (used by layers whose weights live outside ``parameters()``, like packed int8 kernels);
    ``torch.ao`` quantized modules are counted from their packed weights (an int8 entry is zero
    when it equals its zero point). Biases count as parameters. A tensor two modules share (tied
    weights) counts once: for a float model, ``params == sum(p.numel() for p in
    model.parameters())``."""
    total = nz = 0
    seen: dict[int, torch.Tensor] = {}   # a tied tensor (GPT-2's lm_head and wte) counts once
    for _, m in _units(model):
        p, z = module_counts(m, seen)
        total, nz = total + p, nz + z
    return total, nz


def dense_bytes(model: nn.Module) -> tuple[int, dict]:
    """Bytes the model's tensors occupy in memory now, total and per dtype (state_dict tensors,
    each storage counted once)."""
    seen: set = set()
    per: dict[str, int] = {}
    for t in _state_tensors(model):
        name = str(t.dtype).replace("torch.", "")
        if isinstance(t, Rebuilt):          # made afresh on every call: a storage of its own
            per[name] = per.get(name, 0) + t.nbytes
            continue
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.untyped_storage().nbytes() if t.numel() else 0
        per[name] = per.get(name, 0) + nbytes
    return sum(per.values()), per


def _state_tensors(model: nn.Module) -> Iterable[torch.Tensor | Rebuilt]:
    """The state dict's tensors (:func:`~nbcompress.fingerprint.state_values`: an int8 layer's
    quantized weight, rebuilt on every call, by its size only)."""
    for v in state_values(model):
        if isinstance(v, Rebuilt):
            yield v
        elif isinstance(v, torch.Tensor):
            yield v.detach()
        elif isinstance(v, (tuple, list)):
            yield from (x if isinstance(x, Rebuilt) else x.detach() for x in v
                        if isinstance(x, (torch.Tensor, Rebuilt)))


def packed_bytes(model: nn.Module) -> int:
    """The length of what ``nbcompress.save`` writes for this model (computed without writing
    it; tensors measured before with the same values are not encoded again)."""
    from .storage import packed_size

    return packed_size(model)


# ------------------------------------------------------------------------ attention FLOPs
# Fused attention kernels torch's FLOP counter has no formula for (it counts them as 0):
# ``nn.MultiheadAttention``'s inference fast path, ``nn.TransformerEncoderLayer``'s, and the CPU
# flash kernel that ``F.scaled_dot_product_attention`` (transformers' "sdpa") runs on. Each
# counts what the unfused ops would: 2 FLOPs a multiply-add for the projections' matmuls, for
# ``Q K^T`` and for ``softmax(.) V`` (no softmax, scaling, bias or mask FLOPs, as torch's own
# formula for the CUDA kernels; a causal mask is not discounted either).

def _linear_flops(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def _mha_core(b: int, lq: int, lk: int, e: int) -> int:
    """``Q K^T`` and ``A V`` summed over heads: 2 * 2 * B * Lq * Lk * E."""
    return 2 * (2 * b * lq * lk * e)


def _batched(shape) -> tuple[int, int, int]:
    """(batch, length, embed) of a ``(B, L, E)`` or unbatched ``(L, E)`` input."""
    return (1, *shape) if len(shape) == 2 else tuple(shape)


def _native_mha_flops(query, key, value, embed_dim, num_head, qkv_weight, *args,
                      out_shape=None, **kwargs) -> int:
    b, lq, e = _batched(query)
    _, lk, _ = _batched(key)
    return (_linear_flops(b * lq, e, e) + 2 * _linear_flops(b * lk, e, e)     # q, k, v
            + _mha_core(b, lq, lk, e) + _linear_flops(b * lq, e, e))           # out proj


def _encoder_layer_flops(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                         use_gelu, norm_first, eps, nw1, nb1, nw2, nb2, ffn_weight_1, *args,
                         out_shape=None, **kwargs) -> int:
    b, t, e = _batched(src)
    f = ffn_weight_1[0]
    return (_linear_flops(b * t, e, 3 * e) + _mha_core(b, t, t, e) + _linear_flops(b * t, e, e)
            + _linear_flops(b * t, e, f) + _linear_flops(b * t, f, e))


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_formulas() -> dict:
    """{op: formula} for the fused attention ops this torch has and counts as 0."""
    aten = torch.ops.aten
    wanted = {"_native_multi_head_attention": _native_mha_flops,
              "_transformer_encoder_layer_fwd": _encoder_layer_flops,
              "_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
              "_scaled_dot_product_fused_attention_overrideable": _sdpa_flops}
    out = {}
    for name, fn in wanted.items():
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry:      # a newer torch's own formula wins
            out[op] = fn
    return out


ATTENTION_FORMULAS = _attention_formulas()


@contextlib.contextmanager
def _dynamo_not_imported():
    """Count FLOPs without importing ``torch._dynamo`` (2-15 s the first time in a process, most of
    a fresh kernel's first dashboard). Torch wraps every dispatch mode's ``__torch_dispatch__`` in
    ``torch._disable_dynamo``, which imports dynamo on its first call only to mark the function
    "not to be compiled"; while dynamo was never imported nothing in the process can be compiling,
    so for the duration of the count the mark is the function itself (the attribute torch's own
    wrapper caches it under), and it is taken away again after. Once dynamo is imported (the user
    compiled something) torch's path runs unchanged."""
    raw = getattr(_FlopCounterMode.__torch_dispatch__, "__wrapped__", None)
    if "torch._dynamo" in sys.modules or raw is None or hasattr(raw, "__dynamo_disable"):
        yield
        return
    raw.__dynamo_disable = raw
    try:
        yield
    finally:
        if getattr(raw, "__dynamo_disable", None) is raw:
            del raw.__dynamo_disable


@contextlib.contextmanager
def flop_mode():
    """A ``FlopCounterMode`` that counts as :func:`count_flops` does (the fused attention kernels'
    formulas added, ``torch._dynamo`` not imported): what every FLOP count of nbcompress uses, so
    two counts of the same work agree (an early-exit model's against the network's)."""
    with _dynamo_not_imported(), FlopCounterMode(display=False,
                                                 custom_mapping=ATTENTION_FORMULAS) as c:
        yield c


def count_flops(model: nn.Module, example_input: Any) -> tuple[int, int, dict[str, int]]:
    """(flops, sparse_flops, per-leaf-module flops) of one forward of ``example_input``.

    FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, with formulas added for the
    fused attention kernels it counts as 0 (:data:`ATTENTION_FORMULAS`: ``nn.MultiheadAttention``
    and ``nn.TransformerEncoderLayer`` fast paths, the CPU ``scaled_dot_product_attention``
    kernel), so attention counts the same in eval and train mode; the per-module split is read by
    snapshotting its running total around each leaf module's forward (a quantized layer, whose
    only children hold its packed weights, counts as a leaf). ``sparse_flops`` scales each leaf's
    count by the density of its stored weights (:func:`weight_density`): a pruned layer's zeros
    are skipped whether its weights are float or int8 codes.

    The forward is counted once per architecture: a model whose module tree, tensor shapes and
    dtypes, plain attributes and example input are those of a model counted before (e.g. the
    result of unstructured pruning) reuses that count (:func:`_structure`); ``sparse_flops`` is
    always computed from the weights as they are now.
    """
    key = _structure(model, example_input)
    got = _FLOPS_SEEN.get(key) if key is not None else None
    if got is not None:
        _FLOPS_SEEN.move_to_end(key)
        total, per_leaf = got
        return int(total), _sparse(model, total, per_leaf), dict(per_leaf)
    total, per_leaf = _count_forward(model, example_input)
    if key is not None:
        _FLOPS_SEEN[key] = (total, dict(per_leaf))
        while len(_FLOPS_SEEN) > 16:
            _FLOPS_SEEN.popitem(last=False)
    return int(total), _sparse(model, total, per_leaf), per_leaf


_FLOPS_SEEN: OrderedDict = OrderedDict()      # architecture -> (flops, per-leaf flops)


def structure_key(model: nn.Module, example_input: Any) -> tuple | None:
    """The key :func:`count_flops` keeps a model's count under (None: counted every time)."""
    return _structure(model, example_input)


def carry_flops(before_key: tuple | None, model: nn.Module, example_input: Any) -> bool:
    """Let ``model``, the result of a step that kept every layer's FLOPs
    (:meth:`~nbcompress.core.StepConfig.keeps_flops`), reuse the count kept for the architecture
    it came from (``before_key``), per layer by name, instead of a counted forward. Nothing is
    carried (False) when that count is not kept or a layer it names is gone."""
    got = _FLOPS_SEEN.get(before_key) if before_key is not None else None
    key = _structure(model, example_input) if got is not None else None
    if key is None:
        return False
    units = {n for n, _ in _units(model)}
    if any(n not in units for n in got[1]):
        return False
    _FLOPS_SEEN[key] = (got[0], dict(got[1]))
    while len(_FLOPS_SEEN) > 16:
        _FLOPS_SEEN.popitem(last=False)
    return True
_PLAIN = (int, float, bool, str, type(None))


def _structure(model: nn.Module, example_input: Any) -> tuple | None:
    """What a forward's FLOPs depend on besides the weights' values: every module's name and
    class, its own tensors' shapes and dtypes, its plain attributes (numbers, strings, flags,
    tuples of them), and the example input's structure. None (count every time) for a model
    that counts its own FLOPs (``nbc_flops``) or an input that is not tensors."""
    parts: list = [_input_structure(example_input)]
    if parts[0] is None:
        return None
    for name, m in model.named_modules():          # (the model itself first)
        if hasattr(m, "nbc_flops"):
            return None
        tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in
                        list(m._parameters.items()) + list(m._buffers.items()) if t is not None)
        plain = tuple(sorted((k, v) for k, v in m.__dict__.items()
                             if not k.startswith("_") and (isinstance(v, _PLAIN) or (
                                 isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)))))
        parts.append((name, type(m), tensors, plain))
    return tuple(parts)


def _input_structure(x: Any):
    if isinstance(x, torch.Tensor):
        return ("t", tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, (tuple, list)):
        inner = tuple(_input_structure(v) for v in x)
        return None if any(v is None for v in inner) else (type(x).__name__, inner)
    if isinstance(x, dict):
        inner = tuple((k, _input_structure(v)) for k, v in x.items())
        return None if any(v is None for _, v in inner) else ("d", inner)
    return None


def _sparse(model: nn.Module, total: int, per_leaf: dict[str, int]) -> int:
    saved = 0.0
    modules = dict(_units(model))
    for n, f in per_leaf.items():
        density = weight_density(modules[n]) if n in modules else None
        if density is not None:
            saved += f * (1.0 - density)
    return int(round(total - saved))


def _count_forward(model: nn.Module, example_input: Any) -> tuple[int, dict[str, int]]:
    """One counted forward: (flops, per-leaf-module flops)."""
    per_leaf: dict[str, int] = {}
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS)
    handles = []
    starts: dict[str, list[int]] = {}
    units = [(n, m) for n, m in _units(model)
             if _counts_itself(m) or not any(True for _ in m.children())]

    for name, m in units:
        def pre(mod, args, _n=name):
            starts.setdefault(_n, []).append(counter.get_total_flops())

        def post(mod, args, out, _n=name):
            s = starts[_n].pop()
            per_leaf[_n] = per_leaf.get(_n, 0) + counter.get_total_flops() - s

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _dynamo_not_imported(), counter:
            _forward(model, example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(counter.get_total_flops()), per_leaf


def dynamic_flops(model: nn.Module, example_input: Any, evaluator: Any) -> tuple[int, dict] | None:
    """For a model whose work depends on its input (early exits): its own count of the FLOPs a
    forward of ``example_input`` costs on average over the evaluator's data.

    Hook: the model may define ``nbc_flops(example_input, evaluator) -> (flops, details) | None``:
    ``flops`` for a batch the size of ``example_input`` (so it compares with the static count of
    any other model), averaged over the data it actually ran; ``details`` (numbers) are shown
    beside the evaluator's. ``None`` from the hook, or no hook: the static count stands.
    """
    hook = getattr(model, "nbc_flops", None)
    if not callable(hook):
        return None
    got = hook(example_input, evaluator)
    if got is None:
        return None
    flops, details = got
    return int(flops), dict(details or {})
