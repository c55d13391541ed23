"""The int8-kernel layer classes ``%quantize`` produces, each storable by :mod:`nbcompress.storage`.

**Real int8 kernels** (CPU, ``torch.ao`` x86/fbgemm/qnnpack backends): :class:`DynamicInt8Linear`,
:class:`DynamicInt8LSTM`, :class:`DynamicInt8GRU` (int8 weights, activations quantized per batch
on the fly) and :class:`StaticInt8Linear` / :class:`StaticInt8Conv1d` / ``2d`` / ``3d`` (int8
weights and activations, activation ranges calibrated on data). They subclass the
``torch.ao.nn.quantized`` modules, whose weights live in packed, backend-specific objects that
are not plain tensors; each class therefore exports its int8 weight + scales + zero points + bias
as plain tensors (``nbc_export``) and re-packs them on load (``nbc_import``), counts its
parameters (``nbc_count``) and says its bits (``nbc_bits``). The static layers take float input
and return float output (quantize, int8 kernel, dequantize), so they drop into any model without
rewriting its ``forward``. Importing this module teaches the FLOP counter the int8 ops
(:mod:`.flops`).

**Cheap to look at.** torch.ao keeps only the packed weight, so every read (``state_dict``,
``.weight``, counting, storing, copying) would unpack it again (a full pass over the weight,
hundreds of ms for a 2048x2048 layer). The Linear and conv layers here keep the plain form
beside it (:class:`.int8_plain.Plain`: int8 codes, scales, zero points, float bias), made once when the
weight is set (``set_weight_bias``, which loading calls too) from the tensor being packed, never
by unpacking: ``nbc_export`` returns the same tensor objects every time (so
:data:`nbcompress.fingerprint.MEMO`, keyed by identity, skips them when measuring or saving
again), ``nbc_count`` is computed once per weight, and a deep copy shares the packed weight
(never changed in place) and copies the plain tensors: it packs and unpacks nothing. The cost: one more byte per weight (the int8 codes beside the packed form).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .flops import register_quantized_flop_formulas
from .int8_plain import Plain, PlainPacked, bias_import, count_qweight, qweight_export, \
    qweight_import
from .qmodules import quiet

__all__ = ["DynamicInt8Linear", "DynamicInt8LSTM", "DynamicInt8GRU", "StaticInt8Linear",
           "StaticInt8Conv1d", "StaticInt8Conv2d", "StaticInt8Conv3d", "STATIC_CONV"]

with quiet():
    import torch.ao.nn.quantized as _nnq  # noqa: E402  (deprecated upstream: see int8.py)
    import torch.ao.nn.quantized.dynamic as _nnqd  # noqa: E402


_FLAGS = ("nbc_huffman",)      # plain attributes set on a layer after it is built (see common.mark)


def _flags_out(m: nn.Module, attrs: dict) -> dict:
    attrs.update({k: m.__dict__[k] for k in _FLAGS if k in m.__dict__})
    return attrs


def _flags_in(m: nn.Module, attrs: dict) -> nn.Module:
    for k in _FLAGS:
        if k in attrs:
            setattr(m, k, attrs[k])
    return m


def _rebuild(cls, attrs: dict, tensors: dict, training: bool) -> nn.Module:
    m = cls.nbc_import(attrs, tensors)
    m.train(training)
    return m


def _keeps_plain(m: nn.Module) -> bool:
    """A layer whose packed weight keeps its plain form (Linear through ``PlainPacked``, convs
    as ``Plain`` themselves)."""
    packed = m.__dict__.get("_modules", {}).get("_packed_params")
    return isinstance(m, Plain) or isinstance(packed, PlainPacked)


def _copy_sharing_packed(obj, memo):
    """A deep copy of ``obj`` (the layer, or its ``PlainPacked``) whose packed kernel weight (a
    torch ScriptObject) is the original's, shared, not packed again: a packed weight is never
    changed in place (``set_weight_bias`` replaces it), so sharing it is safe, and copying a
    quantized BERT no longer re-packs 85M weights (the plain int8 codes, scales and bias are
    copied, so the copy is its own in everything that can change)."""
    new = obj.__class__.__new__(obj.__class__)
    memo[id(obj)] = new
    for k, v in obj.__dict__.items():
        if type(v).__name__ == "ScriptObject":
            new.__dict__[k] = v
        elif k == "_modules":
            new.__dict__[k] = {n: (None if c is None else
                                   _copy_sharing_packed(c, memo) if isinstance(c, PlainPacked)
                                   else copy.deepcopy(c, memo)) for n, c in v.items()}
        else:
            new.__dict__[k] = copy.deepcopy(v, memo)
    return new


class _CopyByCodec:
    """Copies and pickles go through ``nbc_export`` / ``nbc_import``: the torch.ao base classes'
    own ``__getstate__`` / ``__deepcopy__`` keep only their fixed fields and would drop ours
    (calibrated input ranges, fused ReLU, storage flags)."""

    def _codec_parts(self):
        attrs, tensors = self.nbc_export()
        return (type(self), dict(attrs), {k: v.detach().clone() for k, v in tensors.items()},
                self.training)

    def __reduce__(self):
        return (_rebuild, self._codec_parts())

    def __deepcopy__(self, memo):
        if _keeps_plain(self):
            return _copy_sharing_packed(self, memo)
        cls, attrs, tensors, training = self._codec_parts()
        new = _rebuild(cls, attrs, tensors, training)
        # the copy's plain tensors stand for ours: per-tensor results follow them (MEMO.carry)
        _, old = self.nbc_export()
        _, mine = new.nbc_export()
        for k, t in old.items():
            if isinstance(mine.get(k), torch.Tensor):
                memo[id(t)] = mine[k]
        return new

    def __copy__(self):
        return _rebuild(*self._codec_parts())


class _FloatView:
    """What the code around a layer reads stays a tensor: ``weight`` is the dequantized float
    weight (torch.ao's ``weight()`` method would break ``F.linear(x, self.qkv.weight)`` in
    torchvision's Swin) and ``bias`` the float bias. A model reading them computes in float with
    the int8-rounded weight; the layer itself runs its int8 kernel."""

    @property
    def weight(self) -> torch.Tensor:
        return self._weight_bias()[0].dequantize()

    @property
    def bias(self):
        return self._weight_bias()[1]

    def extra_repr(self) -> str:
        """torch.ao's text (``in_features=..., out_features=..., dtype=..., qscheme=...``); its own
        extra_repr calls ``weight()`` as a method, which is a tensor here."""
        tensors, _ = self._plain()
        scheme = torch.per_channel_affine if "weight_scales" in tensors else torch.per_tensor_affine
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype={self._packed_params.dtype}")
        return text + f", qscheme={scheme}"


class _PlainLinear:
    """A torch.ao Linear whose packed weight keeps its plain form (``PlainPacked``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed_params.__class__ = PlainPacked

    @classmethod
    def _empty(cls, n_in: int, n_out: int):
        """A layer of this size with no weight yet (packs a 1x1 placeholder, not an n_out x n_in
        one); the caller sets the weight at once."""
        with quiet():
            m = cls(1, 1, dtype=torch.qint8)
        m.in_features, m.out_features = int(n_in), int(n_out)
        return m

    def _plain(self) -> tuple[dict, dict]:
        return self._packed_params._nbc_plain_form()

    def nbc_count(self) -> tuple[int, int]:
        return self._packed_params._nbc_count()

    def _linear_export(self) -> tuple[dict, dict]:
        tensors, attrs = self._plain()
        return dict(attrs, in_features=int(self.in_features),
                    out_features=int(self.out_features)), dict(tensors)


class DynamicInt8Linear(_FloatView, _CopyByCodec, _PlainLinear, _nnqd.Linear):
    """``torch.ao`` dynamic int8 Linear (int8 weight in a packed, backend-specific form; each
    batch of activations is quantized to uint8 on the fly with its own range), made countable
    and storable."""

    nbc_bits = 8

    def nbc_export(self) -> tuple[dict, dict]:  # (attrs, tensors), as storage expects
        attrs, tensors = self._linear_export()
        return _flags_out(self, attrs), tensors

    @classmethod
    def nbc_import(cls, attrs: dict, tensors: dict) -> "DynamicInt8Linear":
        n_in, n_out = int(attrs["in_features"]), int(attrs["out_features"])
        m = cls._empty(n_in, n_out)
        with quiet():
            m.set_weight_bias(qweight_import(tensors, attrs, (n_out, n_in)),
                              bias_import(tensors, n_out))
        return _flags_in(m, attrs)

    @classmethod
    def from_linear(cls, lin: nn.Linear, qweight: torch.Tensor) -> "DynamicInt8Linear":
        m = cls._empty(lin.in_features, lin.out_features)
        with quiet():
            bias = None if lin.bias is None else lin.bias.detach().float().cpu()
            m.set_weight_bias(qweight, bias)
        return m


def _rnn_keys(m) -> list[tuple[str, str]]:
    """(weight name, bias name) of every gate matrix of a (quantized) LSTM/GRU, in order."""
    out = []
    for layer in range(m.num_layers):
        for suffix in ("", "_reverse")[: 2 if m.bidirectional else 1]:
            for ihhh in ("ih", "hh"):
                out.append((f"weight_{ihhh}_l{layer}{suffix}", f"bias_{ihhh}_l{layer}{suffix}"))
    return out


def _rnn_in_features(m, weight_name: str) -> int:
    if "_hh_" in weight_name:
        return m.hidden_size
    layer = int(weight_name.split("_l")[1].split("_")[0])
    return m.input_size if layer == 0 else m.hidden_size * (2 if m.bidirectional else 1)


class _DynamicInt8RNN(_CopyByCodec):
    """``torch.ao`` dynamic int8 LSTM/GRU (int8 gate weights, activations quantized on the fly),
    made countable and storable: each gate matrix is exported as int8 + scales like a Linear."""

    nbc_bits = 8

    def _gates(self):
        wb = self._weight_bias()
        return [(wk, wb["weight"][wk], wb["bias"][bk]) for wk, bk in _rnn_keys(self)]

    def nbc_count(self) -> tuple[int, int]:
        p = nz = 0
        for _, w, b in self._gates():
            a, c = count_qweight(w, b)
            p, nz = p + a, nz + c
        return p, nz

    def nbc_export(self):
        tensors: dict = {}
        attrs = {k: getattr(self, k) for k in ("input_size", "hidden_size", "num_layers",
                                                "batch_first", "dropout", "bidirectional")}
        gate_attrs = {}
        for (wk, bk), (_, w, b) in zip(_rnn_keys(self), self._gates()):
            t, a = qweight_export(w)
            tensors.update({f"{wk}.{k}": v for k, v in t.items()})
            tensors[bk] = b.detach()
            gate_attrs[wk] = a
        attrs["gates"] = gate_attrs
        return _flags_out(self, attrs), tensors

    @classmethod
    def nbc_import(cls, attrs, tensors):
        with quiet():
            m = cls(int(attrs["input_size"]), int(attrs["hidden_size"]), int(attrs["num_layers"]),
                    True, bool(attrs["batch_first"]), float(attrs["dropout"]),
                    bool(attrs["bidirectional"]), dtype=torch.qint8)
            gates = 4 if cls.__name__.endswith("LSTM") else 3
            d = {}
            for wk, bk in _rnn_keys(m):
                n_in = _rnn_in_features(m, wk)
                sub = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(wk + ".")}
                d[wk] = qweight_import(sub, dict(attrs["gates"][wk]),
                                        (gates * m.hidden_size, n_in))
                d[bk] = bias_import({"bias": tensors.get(bk)}, gates * m.hidden_size)
                if d[bk] is None:
                    raise ValueError(f"{bk} missing")
            m.set_weight_bias(d)
        return _flags_in(m, attrs)

    @classmethod
    def from_float(cls, rnn: nn.Module, quantize_weight) -> nn.Module:
        """``quantize_weight(w) -> qint8 tensor``; biases stay float (the kernel's choice)."""
        with quiet():
            m = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, True, rnn.batch_first,
                    float(rnn.dropout), rnn.bidirectional, dtype=torch.qint8)
            d = {}
            for wk, bk in _rnn_keys(m):
                d[wk] = quantize_weight(getattr(rnn, wk).detach().float().cpu())
                b = getattr(rnn, bk, None) if rnn.bias else None
                d[bk] = (b.detach().float().cpu() if b is not None
                         else torch.zeros(d[wk].shape[0]))
            m.set_weight_bias(d)
        return m


class DynamicInt8LSTM(_DynamicInt8RNN, _nnqd.LSTM):
    """``torch.ao`` dynamic int8 LSTM, countable and storable."""


class DynamicInt8GRU(_DynamicInt8RNN, _nnqd.GRU):
    """``torch.ao`` dynamic int8 GRU, countable and storable."""


class _StaticInt8Mixin(_FloatView, _CopyByCodec):
    """Float in, float out: quantize the input with the calibrated (input_scale,
    input_zero_point), run the int8 kernel (output requantized with the calibrated output scale;
    ReLU fused when ``fused_relu``), dequantize."""

    nbc_bits = 8
    _relu_op = None
    _op = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_quantized:
            x = torch.quantize_per_tensor(x.float(), self.input_scale, self.input_zero_point,
                                          torch.quint8)
        op = self._relu_op if self.fused_relu else self._op
        return self._run(op, x).dequantize()

    def _static_attrs(self) -> dict:
        return {"input_scale": float(self.input_scale),
                "input_zero_point": int(self.input_zero_point),
                "output_scale": float(self.scale), "output_zero_point": int(self.zero_point),
                "fused_relu": bool(self.fused_relu)}

    def _set_static(self, attrs: dict) -> None:
        for k in ("input_scale", "output_scale"):
            v = float(attrs[k])
            if not v > 0 or not math.isfinite(v):
                raise ValueError(f"{k} must be positive")
        self.input_scale = float(attrs["input_scale"])
        self.input_zero_point = int(attrs["input_zero_point"])
        self.scale = float(attrs["output_scale"])
        self.zero_point = int(attrs["output_zero_point"])
        self.fused_relu = bool(attrs["fused_relu"])


class StaticInt8Linear(_StaticInt8Mixin, _PlainLinear, _nnq.Linear):
    """``torch.ao`` static int8 Linear (int8 weights and activations, activation ranges from
    calibration data), float in / float out."""

    def _run(self, op, x):
        return op(x, self._packed_params._packed_params, self.scale, self.zero_point)

    def nbc_export(self):
        attrs, tensors = self._linear_export()
        attrs.update(self._static_attrs())
        return _flags_out(self, attrs), tensors

    @classmethod
    def nbc_import(cls, attrs, tensors):
        n_in, n_out = int(attrs["in_features"]), int(attrs["out_features"])
        m = cls._empty(n_in, n_out)
        with quiet():
            m.set_weight_bias(qweight_import(tensors, attrs, (n_out, n_in)),
                              bias_import(tensors, n_out))
        m._set_static(attrs)
        return _flags_in(m, attrs)

    @classmethod
    def build(cls, lin: nn.Linear, qweight, bias, attrs: dict) -> "StaticInt8Linear":
        m = cls._empty(lin.in_features, lin.out_features)
        with quiet():
            m.set_weight_bias(qweight, bias)
        m._set_static(attrs)
        return m


StaticInt8Linear._op = staticmethod(torch.ops.quantized.linear)
StaticInt8Linear._relu_op = staticmethod(torch.ops.quantized.linear_relu)


def _conv_class(base, op, relu_op, dims: int):
    class StaticInt8Conv(_StaticInt8Mixin, Plain, base):
        __doc__ = (f"``torch.ao`` static int8 Conv{dims}d (int8 weights and activations, "
                   f"calibrated activation ranges; BatchNorm folded and ReLU fused when they "
                   f"follow it), float in / float out.")

        def _run(self, op_, x):
            if self.padding_mode != "zeros":
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return op_(x, self._packed_params, self.scale, self.zero_point)

        def _plain(self) -> tuple[dict, dict]:
            return self._nbc_plain_form()

        def nbc_count(self) -> tuple[int, int]:
            return self._nbc_count()

        def nbc_export(self):
            tensors, attrs = self._plain()
            tensors, attrs = dict(tensors), dict(attrs)
            attrs.update(self._static_attrs(), in_channels=int(self.in_channels),
                         out_channels=int(self.out_channels),
                         kernel_size=tuple(int(k) for k in self.kernel_size),
                         stride=tuple(int(s) for s in self.stride),
                         padding=tuple(int(p) for p in self.padding),
                         dilation=tuple(int(d) for d in self.dilation),
                         groups=int(self.groups), padding_mode=str(self.padding_mode))
            return _flags_out(self, attrs), tensors

        @classmethod
        def nbc_import(cls, attrs, tensors):
            m = cls._make(attrs)
            shape = (int(attrs["out_channels"]), int(attrs["in_channels"]) // int(attrs["groups"]),
                     *attrs["kernel_size"])
            with quiet():
                m.set_weight_bias(qweight_import(tensors, attrs, shape),
                                  bias_import(tensors, int(attrs["out_channels"])))
            m._set_static(attrs)
            return _flags_in(m, attrs)

        @classmethod
        def _make(cls, a: dict):
            with quiet():
                return cls(int(a["in_channels"]), int(a["out_channels"]), tuple(a["kernel_size"]),
                           stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                           dilation=tuple(a["dilation"]), groups=int(a["groups"]), bias=True,
                           padding_mode=str(a["padding_mode"]))

        @classmethod
        def build(cls, conv: nn.Module, qweight, bias, attrs: dict):
            a = {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                 "kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
                 "dilation": conv.dilation, "groups": conv.groups,
                 "padding_mode": conv.padding_mode}
            m = cls._make(a)
            with quiet():
                m.set_weight_bias(qweight, bias)
            m._set_static(attrs)
            return m

    StaticInt8Conv._op = staticmethod(op)
    StaticInt8Conv._relu_op = staticmethod(relu_op)
    return StaticInt8Conv


_q = torch.ops.quantized
StaticInt8Conv1d = _conv_class(_nnq.Conv1d, _q.conv1d, _q.conv1d_relu, 1)
StaticInt8Conv1d.__name__ = StaticInt8Conv1d.__qualname__ = "StaticInt8Conv1d"
StaticInt8Conv2d = _conv_class(_nnq.Conv2d, _q.conv2d.new, _q.conv2d_relu.new, 2)
StaticInt8Conv2d.__name__ = StaticInt8Conv2d.__qualname__ = "StaticInt8Conv2d"
StaticInt8Conv3d = _conv_class(_nnq.Conv3d, _q.conv3d.new, _q.conv3d_relu.new, 3)
StaticInt8Conv3d.__name__ = StaticInt8Conv3d.__qualname__ = "StaticInt8Conv3d"
STATIC_CONV = {1: StaticInt8Conv1d, 2: StaticInt8Conv2d, 3: StaticInt8Conv3d}


register_quantized_flop_formulas()
