"""The one operator the exporters lack: a dynamic int8 Linear as ONNX Runtime runs it.

``nbcompress::dynamic_int8_linear(x, weight_t, w_scale, w_zero_point, bias)``: the activations
are quantized per call to uint8 with their own range (ONNX ``DynamicQuantizeLinear``: scale =
(max(0, x) - min(0, x)) / 255), multiplied with the int8 weight in integers (``MatMulInteger``)
and rescaled to float. The ONNX translation below writes exactly those nodes, which ONNX Runtime
fuses into its int8 ``DynamicQuantizeMatMul`` kernel. The PyTorch body computes the same numbers
(it runs only when the lowered copy itself is run, e.g. to compare). Static int8 layers, k-bit
weights and ``.pt2`` files need no custom operator: they are written with PyTorch's own
``quantized_decomposed`` operators (PT2E's representation), which the ONNX exporter turns into
``QuantizeLinear`` / ``DequantizeLinear`` pairs.
"""
from __future__ import annotations

import torch

import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

__all__ = ["dynamic_int8_linear", "onnx_translations", "QD"]

QD = torch.ops.quantized_decomposed


@torch.library.custom_op("nbcompress::dynamic_int8_linear", mutates_args=())
def dynamic_int8_linear(x: torch.Tensor, weight_t: torch.Tensor, w_scale: torch.Tensor,
                        w_zero_point: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    lo = torch.clamp(xf.min(), max=0.0)
    hi = torch.clamp(xf.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    xq = torch.clamp(torch.round(xf / scale) + zp, 0, 255)
    acc = (xq - zp) @ (weight_t.float() - w_zero_point.float())
    return (acc * (scale * w_scale.float()) + bias.float()).to(x.dtype)


@dynamic_int8_linear.register_fake
def _(x, weight_t, w_scale, w_zero_point, bias):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``."""
    from onnxscript import FLOAT
    from onnxscript import opset18 as op

    def dynamic_int8_linear_onnx(x: FLOAT, weight_t, w_scale, w_zero_point, bias):
        xq, xs, xz = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, weight_t, xz, w_zero_point)
        y = op.Mul(op.Cast(acc, to=1), op.Mul(xs, w_scale))
        return op.Add(y, bias)

    return {torch.ops.nbcompress.dynamic_int8_linear.default: dynamic_int8_linear_onnx}
