"""FLOPs of the int8 ops: ``torch.utils.flop_counter.FlopCounterMode`` has no formula for the
``quantized::`` ops, so an int8 model would count 0 FLOPs. :func:`register_quantized_flop_formulas`
(run when :mod:`.qmodules_int8` is imported) adds formulas for them: 2 * MACs from the input shape
and the output shape (Linear: no unpacking) or the unpacked weight shape (convs), the same convention the counter uses for ``aten.mm`` /
``aten.convolution``. Integer multiply-adds are thus counted like float ones: the work is the
same, only cheaper (``aten._int_mm``, the int8 GEMM of :class:`.qmodules.Int8MatmulLinear`, too).
The int8 LSTM/GRU ops are counted from the input and hidden sizes (gates * H *
(in + H) per token, layer and direction), and so is the fp32 LSTM's CPU op
``aten.mkldnn_rnn_layer``, which torch does not count either: an LSTM model's FLOPs then compare
before and after.
"""
from __future__ import annotations

import math

import torch

__all__ = ["register_quantized_flop_formulas"]


def register_quantized_flop_formulas() -> None:
    """Teach ``FlopCounterMode`` the int8 ops (see the module docstring): 2 * MACs, from the
    input shape and the weight shape read back from the packed parameters."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    def _linear(x, packed, *args, out_val=None, **kwargs):
        if isinstance(out_val, torch.Tensor) and out_val.dim():    # no unpack: [..., n_out]
            return 2 * x.numel() * out_val.shape[-1]
        w, _ = torch.ops.quantized.linear_unpack(packed)
        n_out, n_in = w.shape
        return 2 * (x.numel() // x.shape[-1]) * n_in * n_out

    def _conv(x, packed, *args, out_val=None, **kwargs):
        w = packed.weight() if hasattr(packed, "weight") else packed.unpack()[0]
        # each output element costs (in_channels / groups) * prod(kernel) MACs: w.shape[1:]
        out_elems = out_val.numel() if isinstance(out_val, torch.Tensor) else 0
        return 2 * out_elems * math.prod(w.shape[1:])

    def _rnn(gates):
        # every token, layer and direction: gates * H * (in + H) multiply-adds (the fp32 GRU's
        # decomposition into addmm counts exactly this)
        def count(x, *args, out_val=None, **kwargs):
            try:
                if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 1 \
                        and not args[0].is_floating_point():       # packed sequence
                    tokens, (hx, _, _, layers, _, _, bidir) = x.shape[0], args[1:8]
                else:
                    hx, _, _, layers, _, _, bidir = args[:7]
                    tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
                h = hx[0] if isinstance(hx, (list, tuple)) else hx
                hidden, dirs = h.shape[-1], (2 if bidir else 1)
                per_token = sum(gates * hidden * ((x.shape[-1] if i == 0 else hidden * dirs)
                                                  + hidden) for i in range(layers))
                return 2 * tokens * dirs * per_token
            except Exception:  # noqa: BLE001 - an unexpected signature is not counted
                return 0
        return count

    def _mkldnn_rnn_layer(x, w_ih, w_hh, *args, out_val=None, **kwargs):
        tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
        return 2 * tokens * (w_ih.numel() + w_hh.numel())

    formulas = {name: _linear for name in ("linear_dynamic", "linear", "linear_relu",
                                           "linear_relu_dynamic")}
    formulas.update({name: _conv for name in ("conv1d", "conv2d", "conv3d", "conv1d_relu",
                                              "conv2d_relu", "conv3d_relu")})
    packets = [(getattr(torch.ops.quantized, n, None), f) for n, f in formulas.items()]

    def _int_mm(a, b, *args, out_val=None, **kwargs):       # Int8MatmulLinear's int8 GEMM
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]

    packets.append((getattr(torch.ops.aten, "_int_mm", None), _int_mm))
    # the int8 LSTM/GRU ops, and the fp32 LSTM's CPU op (uncounted by torch too), so that an LSTM
    # model's FLOPs compare before and after
    packets += [(getattr(torch.ops.aten, "quantized_lstm", None), _rnn(4)),
                (getattr(torch.ops.aten, "quantized_gru", None), _rnn(3)),
                (getattr(torch.ops.aten, "mkldnn_rnn_layer", None), _mkldnn_rnn_layer)]
    for packet, fn in packets:
        if packet is None or packet in flop_registry:
            continue
        register_flop_formula(packet, get_raw=True)(fn)

