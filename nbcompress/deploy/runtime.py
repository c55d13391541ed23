"""Running an exported file where it will run: ONNX Runtime (CPU execution provider, one
thread) for ``.onnx``, ``torch.export.load`` for ``.pt2``; feeding it the model's inputs and
listing the kernels ONNX Runtime actually chose."""
from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["OnnxRunner", "Pt2Runner", "flat_inputs", "INT8_KERNELS", "COMPUTE_KERNELS"]

# ONNX Runtime kernels that multiply in integers (after its graph optimizations)
INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLSTM", "QAttention", "QLinearAdd",
    "NhwcQLinearConv", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearMul"})
# the float kernels doing the same work
COMPUTE_KERNELS = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm",
                             "NchwcConv", "LSTM", "GRU", "RNN", "ConvTranspose", "Attention",
                             "MatMulNBits", "MultiHeadAttention"})


def flat_inputs(model: nn.Module, x: Any) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor), ...]``: the tensors of an example input or batch as the model takes
    them (a mapping: keyword arguments; a tuple/list: positional; else the one argument), named
    by the model's ``forward`` parameters where it has them."""
    if isinstance(x, Mapping):
        return [(str(k), v) for k, v in x.items() if isinstance(v, torch.Tensor)]
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            out.append((params[i] if i < len(params) else f"input_{i}", a))
    return out


class OnnxRunner(nn.Module):
    """An ONNX Runtime session on the CPU execution provider with one thread (``threads``),
    called like the model (``runner(x)``, ``runner(**batch)``); outputs come back as torch
    tensors (one tensor, or a tuple when the graph has several outputs). An ``nn.Module`` so that
    nbcompress's latency timing and evaluation loops take it as they take a model."""

    def __init__(self, path: str, threads: int = 1, optimized_copy: bool = False):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        self._optimized = None
        if optimized_copy:
            fd, self._optimized = tempfile.mkstemp(suffix=".onnx", prefix="nbc-ort-")
            os.close(fd)
            so.optimized_model_filepath = self._optimized
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def kernels(self) -> dict[str, int]:
        """Node types of the graph ONNX Runtime runs (after its fusions), with their counts:
        what says whether an int8 model runs as int8."""
        if self._optimized is None:
            return {}
        import onnx

        try:
            g = onnx.load(self._optimized, load_external_data=False).graph
        finally:
            _remove(self._optimized)
            self._optimized = None
        counts: dict[str, int] = {}
        for n in g.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
        return dict(sorted(counts.items()))

    def feeds(self, named: list[tuple[str, torch.Tensor]]) -> dict:
        names = self.input_names
        by_name = {k: v for k, v in named if k in names}
        if len(by_name) == len(names):
            return {k: _numpy(by_name[k]) for k in names}
        tensors = [v for _, v in named]
        if len(tensors) == len(names):          # positional: the graph's order is the model's
            return {k: _numpy(v) for k, v in zip(names, tensors)}
        raise ValueError(f"the exported graph takes inputs {names}; the batch gives "
                         f"{[k for k, _ in named]}")

    def run_named(self, named: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, self.feeds(named))]

    def forward(self, *args, **kwargs):
        named = ([(str(k), v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)] if kwargs
                 else [(f"input_{i}", a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)])
        outs = self.run_named(named)
        return outs[0] if len(outs) == 1 else tuple(outs)


class Pt2Runner(nn.Module):
    """A ``.pt2`` file loaded with ``torch.export.load``, called like the model."""

    def __init__(self, path: str):
        super().__init__()
        self.program = torch.export.load(path)
        self.module_ = self.program.module()

    def forward(self, *args, **kwargs):
        return self.module_(*args, **kwargs)


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
