"""Timing a model on its example input: eager, channels_last, or deployed (traced +
``torch.jit.optimize_for_inference``); the median of warm runs."""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn

from .core import BadInput, model_device
from .train import forward_batch as _forward


LATENCY_MODES = ("eager", "channels_last", "deployed", "onnxruntime")


def check_latency_mode(mode: Any) -> str:
    if mode not in LATENCY_MODES:
        raise BadInput(f"--latency must be one of {', '.join(LATENCY_MODES)}; got {mode!r}")
    return mode


def latency_model(model: nn.Module, example_input: Any, mode: str = "eager"):
    """``(runnable, input, mode used)``: the model as it is timed in latency ``mode``.

    - ``eager``: the model itself, PyTorch's default (NCHW).
    - ``channels_last``: a copy with 4-D tensors in channels_last memory format, and the input too
      (what oneDNN's CPU convolution, pooling and BatchNorm kernels run fastest on).
    - ``onnxruntime``: the model exported to ONNX (:func:`nbcompress.export`'s lowering: int8
      layers as ONNX Runtime's int8 kernels) and run in ONNX Runtime, CPU execution provider, one
      thread: where a deployed model often runs. A model the exporter cannot take is timed eager
      and the mode used says why.
    - ``deployed``: a copy traced and passed through ``torch.jit.optimize_for_inference``
      (frozen; BatchNorm folded into convs, conv + ReLU fused): how PyTorch deploys a model for
      inference. A model with data-dependent control flow (an early-exit model) cannot be traced
      faithfully; then, or when tracing fails or changes the outputs, it is timed eager and the
      mode used says why.

    The caller's model is never changed (the other modes work on a deep copy).
    """
    check_latency_mode(mode)
    if mode == "eager":
        return model, example_input, "eager"
    x = example_input
    if mode == "onnxruntime":
        from .deploy.exporter import onnx_session

        try:
            return onnx_session(model, x), x, "onnxruntime"
        except Exception as e:  # noqa: BLE001 - any model the exporter or runtime refuses
            return model, example_input, f"eager (onnxruntime: {_why(e)})"
    if mode == "channels_last":
        try:
            m = copy.deepcopy(model).to(memory_format=torch.channels_last)
        except Exception as e:  # noqa: BLE001 - a module that cannot change its format
            return model, example_input, f"eager (channels_last: {_why(e)})"
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return m, x, "channels_last"
    try:
        m = copy.deepcopy(model).eval()
        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traced = torch.jit.trace(m, args, check_trace=False)
            if any(issubclass(w.category, torch.jit.TracerWarning) for w in caught):
                return model, example_input, "eager (deployed: data-dependent control flow)"
            deployed = torch.jit.optimize_for_inference(traced)
            ref, out = m(*args), deployed(*args)
        if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)
                and ref.shape == out.shape
                and torch.allclose(out.float(), ref.float(), rtol=1e-3,
                                   atol=1e-4 * max(1.0, float(ref.abs().max())))):
            return model, example_input, "eager (deployed: outputs changed)"
        return deployed, x, "deployed"
    except Exception as e:  # noqa: BLE001 - any model TorchScript cannot take: time it eager
        return model, example_input, (f"eager (deployed: TorchScript cannot trace or freeze it, "
                                      f"{type(e).__name__})")


def _why(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:80] if text else type(e).__name__


def measure_latency(model: nn.Module, example_input: Any, *, runs: int = 30, warmup: int = 5,
                    max_seconds: float = 2.0, device: torch.device | str | None = None) -> float:
    """Median milliseconds of a no-grad forward, after warm-up, on the model's device (or
    ``device``: a frozen TorchScript module has no parameters to tell it).

    Bounded in time for large models: warm-up stops after ``warmup`` runs or a quarter of
    ``max_seconds`` (at least one run), timing after ``runs`` runs or ``max_seconds`` (at least
    five runs), so a 0.5 s forward costs about 3.5 s of measuring, not 7.5."""
    dev = torch.device(device) if device is not None else model_device(model)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    scripted = isinstance(model, torch.jit.ScriptModule)     # frozen: no train/eval mode
    was_training = False if scripted else model.training
    if not scripted:
        model.eval()
    times = []
    try:
        with torch.inference_mode():
            warm_end = time.perf_counter() + max_seconds / 4
            for i in range(max(1, warmup)):
                _forward(model, example_input)
                sync()
                if time.perf_counter() > warm_end:
                    break
            budget_end = time.perf_counter() + max_seconds
            for i in range(runs):
                t0 = time.perf_counter()
                _forward(model, example_input)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
                if i >= 4 and time.perf_counter() > budget_end:
                    break
    finally:
        if not scripted:
            model.train(was_training)
    return statistics.median(times)
