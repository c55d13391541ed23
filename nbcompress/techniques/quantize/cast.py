"""fp16 / bf16: cast the model (or the selected layers) and wrap it so float32 inputs are cast on
the way in and outputs back to float32 on the way out."""
from __future__ import annotations

import torch

from ...core import BadInput, CompressionResult, FieldError
from .common import DTYPES, float_params, replace
from .qmodules import ReducedPrecision

__all__ = ["cast"]


def cast(cfg, model, ctx, notes, pattern, name: str) -> CompressionResult:
    """Cast the model (``pattern`` None) or the outermost modules whose name ``pattern`` matches
    to the dtype ``name`` (fp16 / bf16 or an alias), each wrapped in :class:`ReducedPrecision`."""
    name = name.lower()
    dtype = DTYPES[name]
    dev = ctx.device
    label = "bf16" if dtype == torch.bfloat16 else "fp16"
    if dev.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise FieldError(f"bf16 is not supported on {dev} ({torch.cuda.get_device_name(dev)}); "
                         f"use {{dtype='fp16'}}")
    if dev.type not in ("cpu", "cuda"):
        notes.append(f"{label} on {dev}: not checked for this device type")
    layers = []
    if pattern is None:
        before = [(n, m) for n, m in model.named_modules() if float_params(m)]
        model = ReducedPrecision(model.to(dtype), dtype).train(model.training)
        for n, m in before:
            layers.append({"layer": n or "(model)", "type": type(m).__name__, "bits": 16,
                           "dtype": label})
    else:
        chosen = [(n, m) for n, m in model.named_modules()
                  if n and pattern.search(n) and float_params(m)]
        top = []
        for n, m in chosen:
            if not any(n.startswith(t + ".") for t, _ in top):
                top.append((n, m))
        if not top:
            raise FieldError(f"{{layers}} {cfg.layers!r} matches no module with floating-point "
                             f"weights")
        for n, m in top:
            model = replace(model, n, ReducedPrecision(m.to(dtype), dtype))
            layers.append({"layer": n, "type": type(m).__name__, "bits": 16, "dtype": label})
    check_runs(model, ctx, label, dev)
    if dev.type == "cpu" and dtype == torch.float16:
        notes.append("fp16 on CPU: the size halves, but CPUs without native fp16 arithmetic "
                     "compute it through conversions, so it is usually slower than fp32 "
                     "(see the latency); bf16 is the CPU choice")
    notes.append(f"weights and activations in {label}; inputs are cast on the way in and "
                 f"outputs back to float32 on the way out")
    return CompressionResult(model, layers=layers, notes=notes)


def check_runs(model, ctx, label, dev) -> None:
    """A dtype the device cannot run is bad input: try one forward of the example input."""
    x = ctx.example_input
    if x is None:
        return
    from ...train import to_device

    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(to_device(x, dev))
    except (RuntimeError, NotImplementedError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"{label} does not run on {dev} for this model: {msg}") from None
    finally:
        model.train(was_training)
