"""A copy of the model that the exporters can express: every nbcompress layer replaced by plain
PyTorch operators on plain tensors.

``lowered_copy(model, target)`` deep-copies the model to the CPU in eval mode and replaces

- dynamic int8 Linear -> ``nbcompress::dynamic_int8_linear`` for ONNX (activation codes
  0..127 on the x86 engine as torch.ao computes them, else ``DynamicQuantizeLinear``; then
  ``MatMulInteger``: int8 in ONNX Runtime, see :mod:`.ops`); for ``.pt2`` torch.ao's range
  (:func:`.ops.activation_qparams`, plain ops) and PT2E's quantize / dequantize pair;
- static int8 Linear / Conv -> QDQ: quantize the input with its calibrated scale, dequantize the
  int8 weight and the int32 bias, the float op (+ ReLU), quantize and dequantize the output
  (ONNX Runtime fuses it into ``QLinearConv`` / ``QLinearMatMul``; a one-channel stem conv is
  written for ONNX as a depthwise conv of its input's codes repeated per output channel);
- k-bit and binary weights (``QuantizedWeightLayer``) -> their integer codes, one byte each,
  dequantized in the graph (``DequantizeLinear``; ONNX's int4 is not used);
- dynamic int8 LSTM / GRU -> float ``nn.LSTM`` / ``nn.GRU`` with the int8 weights dequantized
  (ONNX's recurrent ops take float weights);
- an early-exit model -> every exit computed, each sample's output taken from the first exit
  whose confidence reaches the threshold (the same predictions; a graph cannot stop part of a
  batch early, so no FLOPs are saved in the runtime).

Everything else (pruned, structured, low-rank, separable, clustered, fp16 layers) is already plain
PyTorch and stays as it is. A layer still holding a ``torch.ao`` packed weight after this (a model
quantized outside nbcompress) is named in a :class:`BadInput`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..core import BadInput
from ..techniques.earlyexit.model import EarlyExitModel, call_batch, first_confident
from ..techniques.quantize.qmodules import QuantizedWeightLayer
from ..techniques.quantize.qmodules_int8 import (STATIC_CONV, DynamicInt8GRU, DynamicInt8Linear,
                                                 DynamicInt8LSTM, StaticInt8Linear)
from .ops import QD, activation_qparams

__all__ = ["lowered_copy", "TARGETS"]

TARGETS = ("onnx", "pt2", "state_dict")


# --------------------------------------------------------------------------- weights
def _channel_codes(tensors: dict, attrs: dict, n_out: int):
    """(codes, per-channel scales float32, zero points int64, axis, qmin, qmax, dtype) of an
    int8 torch.ao weight's plain form; a per-tensor scale is spread over the channels."""
    codes = tensors["weight_int8"]
    if "weight_scales" in tensors:
        scales = tensors["weight_scales"].float()
        zp = tensors.get("weight_zero_points")
        zp = torch.zeros(scales.numel(), dtype=torch.long) if zp is None else zp.long()
        axis = int(attrs.get("weight_axis", 0))
    else:
        scales = torch.full((n_out,), float(attrs["weight_scale"]))
        zp = torch.full((n_out,), int(attrs["weight_zero_point"]), dtype=torch.long)
        axis = 0
    return codes.clone(), scales.clone(), zp, axis


class _CodedWeight(nn.Module):
    """Integer weight codes with per-channel scales and zero points, dequantized in the graph
    with PyTorch's ``quantized_decomposed`` operators (``DequantizeLinear`` in ONNX)."""

    def _set_codes(self, codes, scales, zero_points, axis: int):
        self.register_buffer("weight_codes", codes.contiguous())
        self.register_buffer("weight_scales", scales.float().contiguous())
        self.register_buffer("weight_zero_points", zero_points.long().contiguous())
        self.axis = int(axis)
        info = torch.iinfo(codes.dtype)
        self.qmin, self.qmax, self.qdtype = int(info.min), int(info.max), codes.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the codes stand for, for model code that reads ``layer.weight``
        (torchvision's Swin multiplies by it, T5 reads its dtype): DequantizeLinear in ONNX."""
        return self.dequantized()

    def dequantized(self) -> torch.Tensor:
        return QD.dequantize_per_channel.default(
            self.weight_codes, self.weight_scales, self.weight_zero_points, self.axis,
            self.qmin, self.qmax, self.qdtype)


class LoweredDynamicLinear(_CodedWeight):
    """A dynamic int8 Linear in exportable operators (see the module's docstring)."""

    def __init__(self, m: DynamicInt8Linear, target: str):
        super().__init__()
        tensors, attrs = m._plain()
        codes, scales, zp, axis = _channel_codes(tensors, attrs, m.out_features)
        self._set_codes(codes, scales, zp, axis)
        bias = tensors.get("bias")
        self.register_buffer("bias", (torch.zeros(m.out_features) if bias is None
                                      else bias.detach().float().clone()))
        self.target = target
        # the activations' codes: torch.ao's dynamic Linear quantizes them to 0..127 on the
        # x86 / fbgemm engine (reduce_range), to 0..255 elsewhere
        self.act_qmax = 127 if torch.backends.quantized.engine in ("x86", "fbgemm") else 255
        if target == "onnx":
            # MatMulInteger multiplies x [.., in] by B [in, out]: the codes transposed, and the
            # zero points as int8 (ONNX wants them in the codes' type)
            self.register_buffer("weight_t", codes.t().contiguous())
            self.register_buffer("zero_point_i8", zp.to(torch.int8))
            del self.weight_codes

    def dequantized(self) -> torch.Tensor:
        if self.target != "onnx":
            return super().dequantized()
        # the ONNX target keeps the codes transposed only (MatMulInteger's layout)
        return QD.dequantize_per_channel.default(
            self.weight_t.t(), self.weight_scales, self.weight_zero_points, self.axis,
            self.qmin, self.qmax, self.qdtype)

    def forward(self, x):
        if self.target == "onnx":
            return torch.ops.nbcompress.dynamic_int8_linear(
                x, self.weight_t, self.weight_scales, self.zero_point_i8, self.bias,
                self.act_qmax)
        # torch.ao's own choice of range (its floor on the scale included; choose_qparams has
        # none)
        scale, zp = activation_qparams(x, self.act_qmax)
        zp = zp.to(torch.int64)
        xq = QD.quantize_per_tensor.tensor(x, scale, zp, 0, self.act_qmax, torch.uint8)
        xd = QD.dequantize_per_tensor.tensor(xq, scale, zp, 0, self.act_qmax, torch.uint8)
        return F.linear(xd, self.dequantized(), self.bias)


class LoweredStatic(_CodedWeight):
    """A static int8 Linear or Conv as QDQ (see the module's docstring)."""

    def __init__(self, m, conv_dims: int = 0, target: str = "onnx"):
        super().__init__()
        tensors, attrs = m._plain()
        n_out = m.out_channels if conv_dims else m.out_features
        codes, scales, zp, axis = _channel_codes(tensors, attrs, n_out)
        self._set_codes(codes, scales, zp, axis)
        self.in_scale, self.in_zp = float(m.input_scale), int(m.input_zero_point)
        self.out_scale, self.out_zp = float(m.scale), int(m.zero_point)
        self.relu = bool(m.fused_relu)
        bias = tensors.get("bias")
        bias = torch.zeros(n_out) if bias is None else bias.detach().float()
        bias_scale = (scales.double() * self.in_scale)
        q = torch.round(bias.double() / bias_scale).clamp(-2 ** 31, 2 ** 31 - 1)
        self.register_buffer("bias_int32", q.to(torch.int32))
        self.register_buffer("bias_scales", bias_scale.float())
        self.conv_dims, self.spread = conv_dims, False
        if conv_dims:
            self.stride, self.padding = tuple(m.stride), tuple(m.padding)
            self.dilation, self.groups = tuple(m.dilation), int(m.groups)
            self.padding_mode = str(m.padding_mode)
            self.pad = tuple(p for p in reversed(self.padding) for _ in range(2))
        # ONNX: a conv reading one channel (an image stem) as the same conv on the input's
        # codes repeated per output channel, one group each (the same sums): ONNX Runtime runs
        # its depthwise int8 kernel, ~10% faster on SmallResNet than its int8 conv at K = 9
        self.spread = (target == "onnx" and bool(conv_dims) and m.in_channels == 1
                       and self.groups == 1 and n_out > 1)

    def forward(self, x):
        xq = QD.quantize_per_tensor.default(x, self.in_scale, self.in_zp, 0, 255, torch.uint8)
        if self.spread:
            xq = xq.expand(-1, self.weight_codes.shape[0], *xq.shape[2:])
        x = QD.dequantize_per_tensor.default(xq, self.in_scale, self.in_zp, 0, 255, torch.uint8)
        w = self.dequantized()
        b = QD.dequantize_per_channel.default(
            self.bias_int32, self.bias_scales, torch.zeros_like(self.bias_int32, dtype=torch.long),
            0, -2 ** 31, 2 ** 31 - 1, torch.int32)
        if not self.conv_dims:
            y = F.linear(x, w, b)
        else:
            padding = self.padding
            if self.padding_mode != "zeros":
                x = F.pad(x, self.pad, mode=self.padding_mode)
                padding = 0
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.conv_dims - 1]
            y = conv(x, w, b, self.stride, padding, self.dilation,
                     w.shape[0] if self.spread else self.groups)
        if self.relu:
            y = torch.relu(y)
        return QD.dequantize_per_tensor.default(
            QD.quantize_per_tensor.default(y, self.out_scale, self.out_zp, 0, 255, torch.uint8),
            self.out_scale, self.out_zp, 0, 255, torch.uint8)


class LoweredCodes(_CodedWeight):
    """A B-bit / binary ``QuantizedWeightLayer``: its codes (one byte each), dequantized in the
    graph, then the float op."""

    def __init__(self, m: QuantizedWeightLayer):
        super().__init__()
        n_out = m.codes.shape[0]
        scales = m.scale.detach().float().reshape(-1)
        if scales.numel() == 1:
            scales = scales.expand(n_out)
        zp = (torch.zeros(n_out, dtype=torch.long) if m.zero_point is None
              else m.zero_point.detach().long().reshape(-1).expand(n_out))
        self._set_codes(m.codes.detach().clone(), scales.clone(), zp.clone(), 0)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(),
                                                             requires_grad=False)
        self.op = m.op
        if m.op != "linear":
            self.stride, self.padding = m.stride, m.padding
            self.dilation, self.groups = m.dilation, m.groups

    def forward(self, x):
        w = self.dequantized().to(x.dtype)
        if self.op == "linear":
            return F.linear(x, w, self.bias)
        conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.op]
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _float_rnn(m) -> nn.Module:
    cls = nn.LSTM if isinstance(m, DynamicInt8LSTM) else nn.GRU
    rnn = cls(m.input_size, m.hidden_size, m.num_layers, bias=True, batch_first=m.batch_first,
              dropout=float(m.dropout), bidirectional=m.bidirectional)
    with torch.no_grad():
        for wk, w, b in m._gates():
            getattr(rnn, wk).copy_(w.dequantize())
            getattr(rnn, wk.replace("weight", "bias")).copy_(b)
    return rnn


class LoweredEarlyExit(nn.Module):
    """An early-exit model as one graph: every exit's scores, and per sample the first exit
    whose softmax confidence reaches the threshold (else the final output). A transformers model
    with exits (``HookedExitModel``) takes its keyword inputs; token scores count only the
    positions its attention mask keeps, as its own forward does."""

    def __init__(self, m: EarlyExitModel):
        super().__init__()
        self.model = m
        self.threshold = float(m.threshold)

    def forward(self, *args, **kwargs):
        x = call_batch(args, kwargs)
        if x is None:
            raise TypeError("an early-exit model takes one batch: a tensor, or the model's "
                            "inputs as keywords, not both")
        return first_confident(self.model.forward_all(x), self.threshold,
                               self.model.token_mask(x))


# --------------------------------------------------------------------------- the walk
def _lowered(m: nn.Module, target: str, notes: dict) -> nn.Module | None:
    """The replacement of one module, or None to keep it (and look inside)."""
    if isinstance(m, DynamicInt8Linear):
        new = LoweredDynamicLinear(m, target)
        codes = (f"to codes 0..{new.act_qmax}" + (" as torch.ao's x86 kernel does (reduce_range)"
                                                   if new.act_qmax == 127 else ""))
        notes["dynamic int8 Linear"] = (
            f"int8 weights; activations quantized per call {codes} (" +
            ("DynamicQuantizeLinear + MatMulInteger)" if new.act_qmax == 255 else
             "their range and codes in plain ops, + MatMulInteger)") if target == "onnx"
            else f"int8 weights; activations quantized per call {codes} (torch.ao's range in "
                 f"plain ops, then quantized_decomposed quantize / dequantize)")
        return new
    if isinstance(m, StaticInt8Linear):
        notes["static int8 Linear"] = "QDQ: int8 weights and activations, int32 bias"
        return LoweredStatic(m, target=target)
    for dims, cls in STATIC_CONV.items():
        if isinstance(m, cls):
            notes[f"static int8 Conv{dims}d"] = "QDQ: int8 weights and activations, int32 bias"
            return LoweredStatic(m, dims, target)
    if isinstance(m, (DynamicInt8LSTM, DynamicInt8GRU)):
        notes[f"dynamic int8 {type(m).__name__[11:]}"] = (
            "int8 weights dequantized to float32 (ONNX's recurrent ops take float weights)")
        return _float_rnn(m)
    if isinstance(m, QuantizedWeightLayer):
        notes[f"{m.bits}-bit weights" if m.bits > 1 else "binary weights"] = (
            "integer codes, one byte each, dequantized in the graph (DequantizeLinear); "
            "the activations stay float")
        return LoweredCodes(m)
    if isinstance(m, EarlyExitModel):
        notes["early exit"] = (
            f"every exit computed; each sample takes the first exit with confidence >= "
            f"{m.threshold:g} (same predictions; no FLOPs saved in the runtime)")
        return LoweredEarlyExit(m)
    return None


def _walk(m: nn.Module, target: str, notes: dict) -> nn.Module:
    new = _lowered(m, target, notes)
    if new is not None:
        if isinstance(new, LoweredEarlyExit):
            new.model = _walk_children(new.model, target, notes)
        return new
    return _walk_children(m, target, notes)


def _walk_children(m: nn.Module, target: str, notes: dict) -> nn.Module:
    for name, child in list(m.named_children()):
        new = _walk(child, target, notes)
        if new is not child:
            setattr(m, name, new)
    return m


def _refuse_leftovers(model: nn.Module) -> None:
    for name, m in model.named_modules():
        mod = type(m).__module__
        if mod.startswith("torch.ao.nn.quantized") or mod.startswith("torch.nn.quantized"):
            raise BadInput(f"cannot export layer {name or '(the model)'!r} "
                           f"({type(m).__name__}, a torch.ao packed int8 layer made outside "
                           f"nbcompress): quantize with nbcompress, or use format='state_dict'")


def lowered_copy(model: nn.Module, target: str) -> tuple[nn.Module, dict]:
    """``(copy, notes)``: a CPU, eval-mode copy of ``model`` in exportable operators for
    ``target`` (one of :data:`TARGETS`), and how each kind of compressed layer was written
    (kind -> sentence). The caller's model is not touched."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    m = copy.deepcopy(model).cpu().eval()
    for mod in m.modules():     # a KV cache is generation state, not a graph output (torch.export
        cfg = getattr(mod, "config", None)      # cannot flatten transformers' Cache objects)
        if getattr(cfg, "use_cache", False):
            cfg.use_cache = False
    notes: dict = {}
    m = _walk(m, target, notes)
    for p in m.parameters():
        p.requires_grad_(False)
    _refuse_leftovers(m)
    return m.eval(), notes
