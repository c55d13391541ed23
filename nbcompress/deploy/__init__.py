"""Leaving the notebook: ``nbcompress.export`` / ``%export`` write a model (any version of its
history) as ONNX, ``.pt2`` (torch.export) or a plain state_dict, load the file back in its runtime
and compare it with the model. :mod:`.lowering` says how each compressed layer is written."""
from __future__ import annotations

from .exporter import FORMATS, ExportConfig, export, run_export
from .report import ExportReport

__all__ = ["export", "run_export", "ExportConfig", "ExportReport", "FORMATS"]
