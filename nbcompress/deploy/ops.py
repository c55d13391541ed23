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

:func:`finish_onnx` then tidies the written graph where an exact rewrite lets ONNX Runtime keep
int8 tensors int8: a ``MaxPool`` of a dequantized tensor becomes the ``MaxPool`` of its integer
codes, dequantized after (the maximum commutes with a dequantization, whose scale is positive:
the same numbers), so that the runtime pools uint8 in place of float and fuses the residual
``Add`` that follows into ``QLinearAdd``.
"""
from __future__ import annotations

import torch

import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

__all__ = ["dynamic_int8_linear", "onnx_translations", "finish_onnx", "QD"]

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


# ops that commute with a dequantization (monotone, per element or a maximum over a window)
_COMMUTES = frozenset({"MaxPool"})
_INT8 = (2, 3)          # onnx.TensorProto.UINT8, INT8


def pool_before_dequantize(graph) -> int:
    """Rewrite ``DequantizeLinear -> MaxPool`` as ``MaxPool -> DequantizeLinear`` in an
    ``onnx.GraphProto`` (in place) where the dequantized tensor feeds only the pool and the pool
    returns no indices; the pool's output keeps its name. Returns how many were rewritten."""
    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    producer = {o: n for n in graph.node for o in n.output}
    dtypes = {v.name: v.type.tensor_type.elem_type
              for v in list(graph.input) + list(graph.value_info)}
    dtypes.update({t.name: t.data_type for t in graph.initializer})
    nodes, done = list(graph.node), 0
    for pool in [n for n in nodes if n.op_type in _COMMUTES and n.domain in ("", "ai.onnx")]:
        dq = producer.get(pool.input[0])
        if (dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx")
                or consumers.get(dq.output[0]) != 1 or len(pool.output) != 1
                or dtypes.get(dq.input[0]) not in _INT8
                or any(o == dq.output[0] for o in graph.output)):
            continue
        out = pool.output[0]
        pool.input[0], pool.output[0] = dq.input[0], out + "_codes"
        dq.input[0], dq.output[0] = out + "_codes", out
        nodes.remove(dq)
        nodes.insert(nodes.index(pool) + 1, dq)
        done += 1
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
    return done


def finish_onnx(path: str) -> int:
    """The written ``.onnx`` file tidied in place by the exact rewrites above (its external
    data, if any, left where it is); returns how many nodes were rewritten."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    done = pool_before_dequantize(model.graph)
    if done:
        onnx.save(model, path)
    return done
