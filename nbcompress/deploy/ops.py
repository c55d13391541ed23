"""The one operator the exporters lack: a dynamic int8 Linear as ONNX Runtime runs it.

``nbcompress::dynamic_int8_linear(x, weight_t, w_scale, w_zero_point, bias, qmax)``: the
activations are quantized per call to uint8 codes 0..qmax with their own range (scale =
(max(0, x) - min(0, x)) / qmax, zero point round(-min(0, x) / scale)), multiplied with the int8
weight in integers (``MatMulInteger``) and rescaled to float. ``qmax`` is what the PyTorch model
uses: 127 on the x86 / fbgemm engine (``torch.ao``'s dynamic Linear quantizes activations with
``reduce_range=True``), 255 elsewhere. With 255 the ONNX translation writes
``DynamicQuantizeLinear`` (whose range is 0..255) + ``MatMulInteger``, which ONNX Runtime fuses
into its ``DynamicQuantizeMatMul`` kernel; with 127 it writes the range, scale and zero point in
plain operators, ``QuantizeLinear`` and ``MatMulInteger`` (run as ``MatMulIntegerToFloat``), so the
file computes the same numbers as the model (writing 255 there would be a different, finer
quantization: up to ~2% of the logits' scale apart on LeNet-300-100). The PyTorch body computes
the same numbers (it runs only when the lowered copy itself is run, e.g. to compare). Static int8
layers, k-bit weights and ``.pt2`` files need no custom operator: they are written with PyTorch's
own ``quantized_decomposed`` operators (PT2E's representation), which the ONNX exporter turns into
``QuantizeLinear`` / ``DequantizeLinear`` pairs.

:func:`finish_onnx` then tidies the written graph where an exact rewrite lets ONNX Runtime keep
int8 tensors int8: a ``MaxPool`` of a dequantized tensor becomes the ``MaxPool`` of its integer
codes, dequantized after (the maximum commutes with a dequantization, whose scale is positive:
the same numbers), so that the runtime pools uint8 in place of float and fuses the residual
``Add`` that follows into ``QLinearAdd``; and the exporter's per-node debugging metadata goes
(stack traces and source paths: size, and the exporting machine's paths, in a shipped file).
"""
from __future__ import annotations

import torch

import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

__all__ = ["dynamic_int8_linear", "activation_qparams", "onnx_translations", "finish_onnx", "QD"]

QD = torch.ops.quantized_decomposed
_TINY = float(torch.finfo(torch.float32).tiny)
# torch.ao's dynamic Linear (fbgemm and qnnpack: ChooseQuantizationParams) floors the activation
# scale at SMALL_SCALE_THRESHOLD and keeps the zero point of the unfloored scale
_SMALL_SCALE = 6.1e-5


def activation_qparams(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero point)`` (float tensors) with which torch.ao's dynamic Linear quantizes
    ``x`` to codes 0..qmax: the range widened to hold 0, the zero point from the raw scale, the
    scale then floored at 6.1e-5 (fbgemm / qnnpack's ChooseQuantizationParams). Plain torch
    operators: the .pt2 path writes them as they are."""
    xf = x.float()
    lo = torch.clamp(xf.min(), max=0.0)
    hi = torch.clamp(xf.max(), min=0.0)
    raw = torch.clamp((hi - lo) / float(qmax), min=_TINY)
    zp = torch.clamp(torch.round(-lo / raw), 0, qmax)
    return torch.clamp(raw, min=_SMALL_SCALE), zp


@torch.library.custom_op("nbcompress::dynamic_int8_linear", mutates_args=())
def dynamic_int8_linear(x: torch.Tensor, weight_t: torch.Tensor, w_scale: torch.Tensor,
                        w_zero_point: torch.Tensor, bias: torch.Tensor,
                        qmax: int = 255) -> torch.Tensor:
    xf = x.float()
    scale, zp = activation_qparams(xf, qmax)
    xq = torch.clamp(torch.round(xf * (1.0 / scale)) + zp, 0, qmax)    # fbgemm's reciprocal
    acc = (xq - zp) @ (weight_t.float() - w_zero_point.float())
    return (acc * (scale * w_scale.float()) + bias.float()).to(x.dtype)


@dynamic_int8_linear.register_fake
def _(x, weight_t, w_scale, w_zero_point, bias, qmax=255):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``."""
    from onnxscript import FLOAT
    from onnxscript import opset18 as op

    def dynamic_int8_linear_onnx(x: FLOAT, weight_t, w_scale, w_zero_point, bias,
                                 qmax: int = 255):
        if qmax == 255:
            xq, xs, xz = op.DynamicQuantizeLinear(x)
        else:           # DynamicQuantizeLinear's range is 0..255: the model's range, written out
            zero = op.Constant(value_float=0.0)
            lo = op.Min(op.ReduceMin(x, keepdims=0), zero)
            hi = op.Max(op.ReduceMax(x, keepdims=0), zero)
            # scale > 0 (an all-zero x gives codes 0: the bias); lo <= 0 <= hi puts the zero
            # point in [0, qmax] without a clip
            raw = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=float(qmax))),
                         op.Constant(value_float=_TINY))
            xz = op.Cast(op.Round(op.Div(op.Neg(lo), raw)), to=2)
            xs = op.Max(raw, op.Constant(value_float=_SMALL_SCALE))
            # codes as torch.ao's kernel makes them: x times the scale's reciprocal, rounded
            # half to even (QuantizeLinear divides: a value at a tie can land one code apart,
            # which deep networks amplify: 2% of a random-init Swin-T's outputs)
            codes = op.Add(op.Round(op.Mul(x, op.Reciprocal(xs))), op.Cast(xz, to=1))
            xq = op.Cast(op.Clip(codes, zero, op.Constant(value_float=float(qmax))), to=2)
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


def strip_node_metadata(graph) -> int:
    """Remove the exporter's per-node debugging properties (the Python stack trace, source
    paths, FX node text: about 1 kB a node, 14% of an int8 LeNet-300-100 file, and the
    exporting machine's paths inside a file meant to be shipped) from every node of an
    ``onnx.GraphProto`` and its subgraphs; the computation is untouched. Returns the bytes
    removed."""
    removed = 0
    for n in graph.node:
        removed += sum(len(p.key) + len(p.value) for p in n.metadata_props)
        del n.metadata_props[:]
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                removed += strip_node_metadata(g)
    return removed


def finish_onnx(path: str) -> int:
    """The written ``.onnx`` file tidied in place (its external data, if any, left where it
    is): the exact rewrites above, and the nodes' debugging metadata removed. Returns how many
    nodes were rewritten."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    done = pool_before_dequantize(model.graph)
    if done + strip_node_metadata(model.graph):
        onnx.save(model, path)
    return done
