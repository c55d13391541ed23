"""What the history compares and keeps: a model's state fingerprint (cheap change detection,
``.data`` edits included) and its host copy (the immutable record of a version)."""
from __future__ import annotations

import copy
import gc
import itertools
import weakref
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _content_sum(t: torch.Tensor) -> torch.Tensor:
    """A wrap-around sum of the tensor's bits (as a 0-d tensor, not synchronised): changes when
    any value changes by any amount, including edits through ``.data``, which the version counter
    does not see. (A permutation of a tensor's values would keep it; a fingerprint is a cheap check,
    not a proof.)"""
    t = t.detach()
    if t.is_quantized:
        t = t.int_repr()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    size = t.element_size()
    if size not in _BITS or t.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    if size < 8 and (t.numel() * size) % 8 == 0:
        try:      # whole 8-byte words: a native int64 sum (bf16 summed as int16 is 13x slower)
            return t.view(torch.int64).sum()
        except RuntimeError:        # (a storage offset that is not 8-byte aligned)
            pass
    bits = t.view(_BITS[size])
    return bits.sum(dtype=torch.int64 if size == 8 else torch.int32).to(torch.int64)


def state_fingerprint(model: nn.Module) -> tuple:
    """Identity and content of the model's tensors (its ``state_dict``): for each entry its storage
    address, in-place version counter (bumped by optimizer steps and in-place ops), shape and dtype,
    plus a wrap-around sum of its bits (catches ``.data`` edits). Entries made afresh on every call
    (packed int8 weights, torch.ao's scale tensors) contribute their content only. About 6 GB/s
    on one CPU core: 16 ms for 100 MB of weights."""
    ident, sums = [], []
    owned = {id(t) for t in itertools.chain(model.parameters(), model.buffers())}
    for k, v in _state_entries(model, owned):
        if isinstance(v, torch.Tensor) and id(v) not in owned:
            # made afresh by the module's _save_to_state_dict (torch.ao's scale / zero point)
            ident.append((k, tuple(v.shape), str(v.dtype)))
            sums.append(_content_sum(v))
        elif isinstance(v, torch.Tensor):
            try:
                version = v._version
            except RuntimeError:        # inference tensors carry no version counter
                version = -1
            ptr = v.data_ptr() if v.layout == torch.strided and not v.is_quantized else id(v)
            ident.append((k, ptr, version, tuple(v.shape), str(v.dtype)))
            sums.append(MEMO.content_sum(v))     # (summed once per MEMO.trusting block)
        elif isinstance(v, tuple) and k.endswith("(state)"):
            ident.append((k, v))
        elif isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                if isinstance(x, torch.Tensor):
                    ident.append((f"{k}[{i}]", tuple(x.shape), str(x.dtype)))
                    sums.append(_content_sum(x))
    content = tuple(int(s) for s in sums)
    return tuple(ident), content


def _state_entries(model: nn.Module, owned: set):
    """``model.state_dict(keep_vars=True)``'s entries, module by module, except that a module
    with ``nbc_state() -> (tensors, extra)`` (an int8 layer's packed weight, which keeps its plain
    int8 codes, scales and bias: ``quantize.int8_plain``) is represented by those kept tensors and
    ``extra`` (added to ``owned``: they have an identity and a version) instead of the quantized
    weight its ``_save_to_state_dict`` would rebuild on every call."""
    skip = None
    for name, m in model.named_modules():
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        skip = None
        prefix = f"{name}." if name else ""
        state = getattr(m, "nbc_state", None)
        if callable(state):
            skip = name
            tensors, extra = state()
            yield f"{prefix}(state)", tuple(sorted((str(k), repr(v)) for k, v in extra.items()))
            for k, t in tensors.items():
                owned.add(id(t))
                yield prefix + k, t
            continue
        dest: dict = {}
        m._save_to_state_dict(dest, prefix, True)
        yield from dest.items()


def _same_values(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or a.is_quantized != b.is_quantized:
            return False
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_quantized:
            return bool(torch.equal(a.int_repr(), b.int_repr())
                        and torch.equal(a.dequantize(), b.dequantize()))
        return bool(torch.equal(a, b)) or bool(torch.equal(  # NaNs: compare the bits
            a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b if not isinstance(a, torch.Tensor) else False)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold exactly the same state (bit for bit, NaNs included)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(_same_values(sa[k], sb[k]) for k in sa)


def _model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for v in state_values(model):          # packed weights live outside parameters()
        if isinstance(v, (tuple, list)):
            total += sum(x.numel() * x.element_size() if isinstance(x, torch.Tensor) else
                         x.nbytes for x in v if isinstance(x, (torch.Tensor, Rebuilt)))
    return total


class Rebuilt(tuple):
    """A state-dict tensor that its module makes afresh on every call from the plain tensors it
    keeps (an int8 layer's quantized weight, ``nbc_state``), given by its size and dtype only:
    ``(nbytes, dtype)``, as ``nbytes`` and ``dtype``. Only sizes are ever read from it."""

    @property
    def nbytes(self) -> int:
        return self[0]

    @property
    def dtype(self) -> torch.dtype:
        return self[1]


_REBUILT: dict = {}       # (class, extra, plain tensors' shapes and dtypes) -> how its state reads


def state_values(model: nn.Module) -> list:
    """``model.state_dict(keep_vars=True).values()``, except that an entry a module with
    ``nbc_state()`` rebuilds from its kept plain tensors on every call (an int8 layer's quantized
    weight: a copy of all its codes) is a :class:`Rebuilt` (its size and dtype, which depend only
    on the plain tensors' shapes and dtypes: read once per shape) and its other entries are the
    kept tensors themselves. Counting bytes then copies nothing. A model with state-dict hooks
    (which may change the entries) is read through ``state_dict`` itself."""
    modules = list(model.named_modules())
    if not any(callable(getattr(m, "nbc_state", None)) for _, m in modules) or any(
            m._state_dict_hooks or m._state_dict_pre_hooks for _, m in modules):
        return list(model.state_dict(keep_vars=True).values())
    out: list = []
    skip = None
    for name, m in modules:
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        skip = None
        prefix = f"{name}." if name else ""
        dest: dict = {}
        if callable(getattr(m, "nbc_state", None)):
            skip = name
            out.extend(_rebuilt_state(m, prefix))
            continue
        m._save_to_state_dict(dest, prefix, True)
        out.extend(dest.values())
    return out


def _rebuilt_state(m: nn.Module, prefix: str) -> list:
    """The state-dict values of ``m`` (which has ``nbc_state``) and of its submodules, with each
    tensor it makes afresh as a :class:`Rebuilt` (see :func:`state_values`)."""
    tensors, extra = m.nbc_state()
    key = (type(m), tuple(sorted((str(k), repr(v)) for k, v in extra.items())),
           tuple((k, tuple(t.shape), t.dtype) for k, t in tensors.items()
                 if isinstance(t, torch.Tensor)))
    plan = _REBUILT.get(key)
    if plan is None:
        own = {id(t): ("plain", k) for k, t in tensors.items() if isinstance(t, torch.Tensor)}
        for n, mod in m.named_modules():
            for k, t in itertools.chain(mod._parameters.items(), mod._buffers.items()):
                if t is not None:
                    own[id(t)] = ("module", f"{n}.{k}" if n else k)
        dest: dict = {}
        for n, mod in m.named_modules():
            mod._save_to_state_dict(dest, f"{n}." if n else "", True)

        def how(v):
            if isinstance(v, torch.Tensor):
                return own.get(id(v)) or ("fresh", v.untyped_storage().nbytes() if v.numel()
                                          else 0, v.dtype, v.numel())
            return ("value", v)

        plan = [("seq", type(v), [how(x) for x in v]) if isinstance(v, (tuple, list)) else how(v)
                for v in dest.values()]
        if len(_REBUILT) > 4096:
            _REBUILT.clear()
        _REBUILT[key] = plan
    return [_replay(h, m, tensors) for h in plan]


def _replay(how: tuple, m: nn.Module, tensors: dict):
    kind = how[0]
    if kind == "seq":
        return how[1](_replay(h, m, tensors) for h in how[2])
    if kind == "plain":
        return tensors[how[1]]
    if kind == "module":
        return m.get_parameter(how[1]) if "." not in how[1] and how[1] in m._parameters else \
            _module_tensor(m, how[1])
    if kind == "fresh":
        return Rebuilt((how[1], how[2]))
    return how[1]


def _module_tensor(m: nn.Module, path: str) -> torch.Tensor:
    *mods, leaf = path.split(".")
    for k in mods:
        m = getattr(m, k)
    t = m._parameters.get(leaf)
    return t if t is not None else m._buffers[leaf]


def host_copy(model: nn.Module, reuse: nn.Module | None = None,
              deltas: dict | None = None) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are in host memory. Tensors on an
    accelerator are copied to the host one by one (the model is never duplicated on the device).

    ``reuse``: another record (a model the history never hands out nor changes): each of
    ``model``'s tensors that holds bit for bit what ``reuse``'s tensor of the same state-dict name
    holds (same type, shape, strides, dtype, ``requires_grad``) is that tensor in the copy,
    shared, not copied again (:func:`shared_tensors`): a step's record shares what the step left
    as it was with the record it started from (a quantized BERT's embeddings, a pruned model's
    biases).

    ``deltas`` (with ``reuse``): each large tensor that is ``reuse``'s with some entries zeroed
    (what unstructured pruning leaves, :func:`masked_tensors`) is held as an empty placeholder in
    the copy, and ``deltas[name] = (placeholder, reuse's tensor, packed mask bits, op, shape)``
    says how to rebuild it bit for bit (:func:`rebuild_masked`): a pruned record costs one bit
    per weight instead of a second copy of the weights."""
    memo: dict = shared_tensors(model, reuse) if reuse is not None else {}
    if deltas is not None and reuse is not None:
        for name, t, r, bits, op in masked_tensors(model, reuse, memo):
            ph = torch.empty(0, dtype=t.dtype)
            if isinstance(t, nn.Parameter):
                ph = nn.Parameter(ph, requires_grad=t.requires_grad)
            memo[id(t)] = ph
            deltas[name] = (ph, r, bits, op, tuple(t.shape))
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "cpu" and id(t) not in memo:
            c = t.detach().to("cpu", copy=True)
            if isinstance(t, nn.Parameter):
                c = nn.Parameter(c, requires_grad=t.requires_grad)
            memo[id(t)] = c
    out = copy.deepcopy(model, memo)
    MEMO.carry(memo)
    return out


MASKED_MIN_NUMEL = 1 << 16      # smaller tensors are simply copied


def masked_tensors(model: nn.Module, record: nn.Module, skip: dict) -> list[tuple]:
    """``(name, t, r, packed mask bits, op)`` for each host float tensor ``t`` of ``model`` (not
    in ``skip``, at least ``MASKED_MIN_NUMEL`` entries) that is ``record``'s tensor ``r`` of the
    same state-dict name with some entries zeroed: ``op "where"``: zeros written as +0.0,
    ``"sign"``: each zero carries ``r``'s sign (a negative weight multiplied by 0 is -0.0).
    Confirmed bit for bit; anything else is not listed."""
    out = []
    for k, t, r in _comparable(model, record):
        if id(t) in skip or not t.is_floating_point() or t.numel() < MASKED_MIN_NUMEL:
            continue
        with torch.no_grad():
            found = _masked_bits(t.detach().reshape(-1), r.detach().reshape(-1))
        if found is not None:
            out.append((k, t, r) + found)
    return out


_CHUNK = 1 << 20                # entries compared at a time (small buffers, no big temporaries)


def _masked_bits(t: torch.Tensor, r: torch.Tensor):
    """(packed mask bits, op) when flat ``t`` is flat ``r`` with entries zeroed by one op for the
    whole tensor (see :func:`masked_tensors`), else None. ``"where"`` first: the bits of ``t``'s
    entries that are not +0.0 (any other entry, -0.0 included, is ``r``'s); then ``"sign"``: the
    bits of its entries that are not zero, each zero carrying ``r``'s sign. Compared as integers
    (numpy: several times faster here than torch's elementwise ops on one thread), chunk by
    chunk: every bit checked, no big temporaries."""
    import numpy as np

    ib = _BITS[t.element_size()]
    tn_all, rn_all = t.view(ib).numpy(), r.view(ib).numpy()
    sign = tn_all.dtype.type(np.iinfo(tn_all.dtype).min)          # the sign bit alone
    for op in ("where", "sign"):
        packed, zeros = [], 0
        for i in range(0, t.numel(), _CHUNK):
            tn, rn = tn_all[i:i + _CHUNK], rn_all[i:i + _CHUNK]
            if op == "where":
                zero = tn == 0
                ok = (tn == rn) | zero
            else:                           # a zero is +0.0 or -0.0 and must be r's sign
                zero = (tn & ~sign) == 0
                ok = (tn == rn) | (tn == (rn & sign))
            if not bool(ok.all()):
                break
            zeros += int(np.count_nonzero(zero))
            packed.append(np.packbits(~zero))
        else:
            return (np.concatenate(packed), op) if zeros else None
    return None


def rebuild_masked(r: torch.Tensor, bits: Any, op: str, shape: tuple) -> torch.Tensor:
    """The tensor :func:`masked_tensors` described: ``r`` where the packed mask ``bits`` keeps,
    zeros elsewhere (``op "where"``: +0.0; ``"sign"``: a zero with ``r``'s sign, as multiplying
    by a 0/1 mask leaves it), of ``shape``. Built as integers (``r``'s bits AND all-ones or
    all-zeros), chunk by chunk: exact for any value, NaNs and infinities included."""
    import numpy as np

    ib = _BITS[r.element_size()]
    rn = r.detach().contiguous().view(ib).reshape(-1).numpy()
    n = rn.size
    out = np.empty_like(rn)
    keep_sign = rn.dtype.type(np.iinfo(rn.dtype).min if op == "sign" else 0)
    for i in range(0, n, _CHUNK):
        c = min(_CHUNK, n - i)
        m = np.unpackbits(bits[i // 8:(i + c + 7) // 8], count=c).astype(rn.dtype)
        np.negative(m, out=m)                       # 1 -> all ones, 0 -> 0
        np.bitwise_and(rn[i:i + c], m | keep_sign, out=out[i:i + c])
    return torch.from_numpy(out).view(r.dtype).reshape(shape)


def _comparable(model: nn.Module, record: nn.Module):
    """``(name, t, r)`` for each tensor ``t`` of ``model`` and ``r`` of ``record`` under the same
    state-dict name whose bits can be compared: distinct tensors of one type, both on the host,
    plain (strided, not quantized, not complex, not empty), contiguous, of one shape and dtype,
    with the same ``requires_grad``."""
    theirs = dict(_state_entries(record, set()))
    for k, t in _state_entries(model, set()):
        r = theirs.get(k)
        if not isinstance(t, torch.Tensor) or not isinstance(r, torch.Tensor) or t is r:
            continue
        if (type(t) is not type(r) or t.device.type != "cpu" or r.device.type != "cpu"
                or t.layout != torch.strided or r.layout != torch.strided or t.is_quantized
                or r.is_quantized or t.shape != r.shape or t.dtype != r.dtype
                or t.stride() != r.stride() or t.requires_grad != r.requires_grad
                or not t.is_contiguous() or not r.is_contiguous()
                or t.element_size() not in _BITS or t.is_complex() or t.numel() == 0):
            continue
        yield k, t, r


def shared_tensors(model: nn.Module, record: nn.Module) -> dict:
    """``{id(t): r}`` for each host tensor ``t`` of ``model`` equal bit for bit to the tensor
    ``r`` of ``record`` under the same state-dict name (:func:`_comparable`). Content sums (kept
    per command in MEMO) rule out most differing pairs without a comparison; equal sums are
    confirmed by comparing every bit."""
    out: dict = {}
    for _, t, r in _comparable(model, record):
        if id(t) in out or MEMO.content_sum(t) != MEMO.content_sum(r):
            continue
        bits = _BITS[t.element_size()]
        if torch.equal(t.detach().view(bits), r.detach().view(bits)):
            out[id(t)] = r
    return out


# ------------------------------------------------------------------ per-tensor results
class TensorMemo:
    """Results computed from one tensor's values (its nonzero count, how :mod:`.storage` packs it),
    kept for as long as the tensor keeps exactly those values, so measuring a model again after a
    step recomputes only what the step changed.

    An entry belongs to the tensor *object* (a weak reference: it goes when the tensor goes) and
    is valid while the tensor still has the same storage address, in-place version counter, shape,
    strides, dtype and content sum (:func:`_content_sum`, which also sees ``.data`` edits the
    version counter misses). ``carry(memo)`` hands the entries of tensors that ``copy.deepcopy(...,
    memo)`` copied to their copies (a copy has the same values), so the history's records and
    handed-out copies reuse what was measured on the original.

    Inside ``with MEMO.trusting():`` a tensor validated once is not summed again (one measurement
    asks several questions of each tensor; nothing changes the model meanwhile)."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}      # id(t) -> (weakref, key, results)
        self._trusted: dict[int, tuple] | None = None

    @staticmethod
    def _ident(t: torch.Tensor) -> tuple:
        try:
            version = t._version
        except RuntimeError:              # inference tensors carry no version counter
            version = -1
        strided = t.layout == torch.strided and not t.is_quantized
        return (t.data_ptr() if strided else 0, version, tuple(t.shape),
                tuple(t.stride()) if strided else (), t.dtype, t.device.type)

    def _key(self, t: torch.Tensor) -> tuple:
        ident = self._ident(t)
        if self._trusted is not None:
            hit = self._trusted.get(id(t))
            if hit is not None and hit[2]() is t and hit[0] == ident:
                return hit[1]
        key = (ident, int(_content_sum(t)))
        if self._trusted is not None:
            try:     # a weak reference: trusting must not keep a technique's replaced tensors alive
                self._trusted[id(t)] = (ident, key, weakref.ref(t))
            except TypeError:
                pass
        return key

    def results_key(self, t: torch.Tensor) -> tuple:
        """What :meth:`results` keys ``t``'s values by (identity, version, shape, strides, dtype,
        device, content sum): part of another tensor's key when its results depend on ``t``."""
        return self._key(t)

    def content_sum(self, t: torch.Tensor) -> int:
        """:func:`_content_sum` of ``t`` as an int; inside :meth:`trusting`, once per tensor."""
        return self._key(t)[1]

    def results(self, t: torch.Tensor) -> dict:
        """The results dict for ``t``'s current values (empty when they changed or are new);
        callers read and fill it under their own keys."""
        if not isinstance(t, torch.Tensor):
            return {}
        key = self._key(t)
        got = self._entries.get(id(t))
        if got is not None and got[0]() is t and got[1] == key:
            return got[2]
        results: dict = {}
        self._store(t, key, results)
        return results

    def _store(self, t: torch.Tensor, key: tuple, results: dict) -> None:
        i = id(t)

        def gone(_ref, _i=i, entries=self._entries):
            e = entries.get(_i)
            if e is not None and e[0]() is None:
                del entries[_i]

        try:
            ref = weakref.ref(t, gone)
        except TypeError:                 # (a tensor type without weak references: no memo)
            return
        self._entries[i] = (ref, key, results)

    def _snapshot(self) -> list:
        """The entries as a list, taken with the cyclic garbage collector paused: a collection
        during the copy runs the weak references' callbacks, which delete entries (``dictionary
        changed size during iteration``, seen once in CI on a torchvision RegNet)."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return list(self._entries.items())
        finally:
            if enabled:
                gc.enable()

    def carry(self, memo: dict) -> None:
        """After ``copy.deepcopy(obj, memo)``: each known tensor that was copied (``memo[id(t)]``,
        same shape and dtype) gets a copy of its results, keyed by the copy's own identity."""
        for i, (ref, key, results) in self._snapshot():
            t = ref()
            new = memo.get(i)
            if t is None or not results or not isinstance(new, torch.Tensor) or new is t:
                continue
            if new.shape != t.shape or new.dtype != t.dtype or key[0] != self._ident(t):
                continue
            self._store(new, (self._ident(new), key[1]), dict(results))

    @contextmanager
    def trusting(self):
        outer = self._trusted
        if outer is None:
            self._trusted = {}
        try:
            yield self
        finally:
            if outer is None:
                self._trusted = None

    def clear(self) -> None:
        self._entries.clear()


MEMO = TensorMemo()
