"""The display layer: before/after tables, plots and the dashboard. It formats what it is given
(Metrics, CompressionResult, history DataFrames) and never measures or trains anything.

``StepReport`` is what every magic returns: a deterministic ``repr`` (what notebook tests
compare), ``_repr_html_`` (self-contained, inline styles and images) and a widget view in a live
kernel. ``NBCOMPRESS_DISPLAY=text|html|auto`` picks what the reports put in their mime bundles.
"""
from .format import (accuracy_scale, format_accuracy, format_bytes, format_count, format_flops,
                     format_ms, format_number, format_pct, format_ratio)
from .plots import history_plot_png, layers_plot_png
from .step import (HistoryView, StepReport, deterministic_history, display_mode, history_html,
                   kernel_has_comms)
from .tables import metrics_table
from .widgets import Dashboard

__all__ = [
    "StepReport", "HistoryView", "Dashboard",
    "metrics_table", "history_plot_png", "layers_plot_png", "history_html",
    "deterministic_history", "display_mode", "kernel_has_comms",
    "format_bytes", "format_count", "format_flops", "format_pct", "format_accuracy", "format_ms",
    "format_number", "format_ratio", "accuracy_scale",
]
