"""What an export says: the file, how each kind of compressed layer was written, the kernels the
runtime runs, and how the file's outputs compare with the model's."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from ..report.format import format_bytes, format_ms, format_pct
from .runtime import COMPUTE_KERNELS, INT8_KERNELS

__all__ = ["ExportReport"]

_RUNTIME = {"onnx": "ONNX Runtime", "pt2": "torch.export.load", "state_dict": "torch.load"}


@dataclass
class ExportReport:
    """The result of :func:`nbcompress.export`. ``repr`` is deterministic (no timings; what a
    notebook test compares); ``str`` and the HTML view add the latencies."""

    path: str
    format: str
    bytes: int
    files: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)       # kind of layer -> how it was written
    dynamic_batch: bool = True
    opset: int | None = None
    model_bytes: int = 0                            # the model's tensors in memory
    name: str | None = None                         # NAME@K when exported by the magic
    kernels: dict = field(default_factory=dict)     # runtime node type -> count (ONNX Runtime)
    outputs: int = 0
    max_abs_diff: float | None = None
    rel_diff: float | None = None                   # max |a - b| / max |b| over the outputs
    example_top1: tuple | None = None               # (agreeing, rows) on the example input
    check: dict | None = None                       # agreement / accuracies on --check data
    latency_ms: float | None = None                 # in the runtime, one thread
    eager_latency_ms: float | None = None           # the model in PyTorch, one thread
    latency_batch: int | None = None
    seconds: float = 0.0

    # ------------------------------------------------------------------ derived
    @property
    def runtime(self) -> str:
        return _RUNTIME[self.format]

    @property
    def int8_kernels(self) -> int:
        return sum(c for k, c in self.kernels.items() if k in INT8_KERNELS)

    @property
    def float_kernels(self) -> int:
        return sum(c for k, c in self.kernels.items() if k in COMPUTE_KERNELS)

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement on the --check data (else on the example input)."""
        if self.check:
            return self.check["agreement"]
        if self.example_top1:
            a, n = self.example_top1
            return a / n if n else None
        return None

    @property
    def speedup(self) -> float | None:
        if self.latency_ms and self.eager_latency_ms:
            return self.eager_latency_ms / self.latency_ms
        return None

    def as_row(self) -> dict:
        """The columns a history table shows for this export."""
        return {"exported": f"{self.format} {format_bytes(self.bytes)}",
                "runtime_ms": self.latency_ms, "agreement": self.agreement}

    # ------------------------------------------------------------------ text
    def _lines(self, timings: bool) -> list[str]:
        what = self.name or "the model"
        head = f"exported {what} to {self.files[0] if self.files else self.path} ({self.format}"
        head += f", opset {self.opset})" if self.opset else ")"
        size = f"{format_bytes(self.bytes)} on disk"
        if self.model_bytes:
            size += f" (the model's tensors: {format_bytes(self.model_bytes)} in memory)"
        lines = [f"{head}: {size}"]
        if self.format != "state_dict":
            lines.append("  batch size: " + ("free (any batch runs)" if self.dynamic_batch else
                                             "fixed to the example input's"))
        for kind, how in self.notes.items():
            lines.append(f"  {kind}: {how}")
        if self.kernels:
            int8 = ", ".join(f"{k} x{c}" for k, c in self.kernels.items() if k in INT8_KERNELS)
            flt = ", ".join(f"{k} x{c}" for k, c in self.kernels.items() if k in COMPUTE_KERNELS)
            lines.append(f"  {self.runtime} runs: int8 kernels [{int8 or 'none'}], "
                         f"float kernels [{flt or 'none'}]")
        if self.max_abs_diff is not None:
            text = (f"  outputs vs the model on the example input ({self.outputs} tensor"
                    f"{'s' if self.outputs != 1 else ''}): max abs diff {self.max_abs_diff:.3g} "
                    f"(relative {self.rel_diff:.2g})")
            if self.example_top1:
                text += f", top-1 agrees on {self.example_top1[0]}/{self.example_top1[1]}"
            lines.append(text)
        if self.check:
            c = self.check
            text = (f"  on {c['label']}: top-1 agreement {format_pct(c['agreement'])} "
                    f"({c['agree']}/{c['n']})")
            if c.get("accuracy") is not None:
                text += (f", accuracy {format_pct(c['accuracy'])} in {self.runtime} vs "
                         f"{format_pct(c['model_accuracy'])} in PyTorch")
            lines.append(text)
        if timings and self.latency_ms is not None:
            text = f"  latency (batch {self.latency_batch}, one thread): " \
                   f"{format_ms(self.latency_ms)} in {self.runtime}"
            if self.eager_latency_ms is not None:
                text += (f" vs {format_ms(self.eager_latency_ms)} in PyTorch eager "
                         f"({self.speedup:.2f}x)")
            lines.append(text)
        return lines

    def __repr__(self) -> str:
        return "\n".join(self._lines(timings=False))

    def __str__(self) -> str:
        return "\n".join(self._lines(timings=True))

    def _repr_html_(self) -> str:
        lines = self._lines(timings=True)
        items = "".join(f"<li>{html.escape(t.strip())}</li>" for t in lines[1:])
        return (f"<div class='nbcompress-export'><b>{html.escape(lines[0])}</b>"
                f"<ul>{items}</ul></div>")

    def summary(self) -> dict[str, Any]:
        """The numbers as a flat dict (for JSON)."""
        out = {k: getattr(self, k) for k in (
            "path", "format", "bytes", "opset", "dynamic_batch", "model_bytes", "max_abs_diff",
            "rel_diff", "latency_ms", "eager_latency_ms", "latency_batch", "seconds")}
        out.update(kernels=dict(self.kernels), notes=dict(self.notes),
                   int8_kernels=self.int8_kernels, float_kernels=self.float_kernels,
                   agreement=self.agreement, check=dict(self.check) if self.check else None)
        return out
