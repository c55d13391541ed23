"""The report object every magic returns and displays, and the history view."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from . import html as H
from .format import _is_missing
from .plots import history_plot_png, layers_plot_png
from .tables import (bar_key, dataframe_text, history_text, is_timing_key, layer_rows,
                     layers_text, metric_rows, metrics_table, plural, text_table)

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def display_mode() -> str:
    """``NBCOMPRESS_DISPLAY``: ``auto`` (default: text + HTML, plus the widget in a live kernel),
    ``html`` (text + HTML, never a widget) or ``text`` (text only: for output-comparing notebook
    tests, since nbval compares ``text/html`` too and the HTML shows timings)."""
    mode = os.environ.get("NBCOMPRESS_DISPLAY", "auto").strip().lower()
    return mode if mode in ("auto", "html", "text") else "auto"


def text_timings() -> bool:
    """Whether the text view of a report (``str()``, the terminal display) ends with its timings
    section. ``NBCOMPRESS_TEXT_TIMINGS=1`` / ``0`` decides; unset: yes, except inside a Jupyter
    kernel, where the text/plain output is what notebook tests (nbval) compare and the HTML and
    widget views show the timings. ``repr()`` never has them."""
    v = os.environ.get("NBCOMPRESS_TEXT_TIMINGS", "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return not kernel_has_comms()


def kernel_has_comms() -> bool:
    """True inside a running Jupyter kernel (an IPython with a ``kernel``), where a widget can be
    shown; False in a plain terminal, a script, nbconvert's exporter without a kernel, ..."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _filter(bundle: dict, include=None, exclude=None) -> dict:
    if include:
        bundle = {k: v for k, v in bundle.items() if k in include}
    if exclude:
        bundle = {k: v for k, v in bundle.items() if k not in exclude}
    return bundle


def widget_view(w: Any) -> dict | None:
    """The ``application/vnd.jupyter.widget-view+json`` payload for a widget."""
    try:
        b = w._repr_mimebundle_()
        if isinstance(b, dict) and WIDGET_MIME in b:
            return b[WIDGET_MIME]
    except Exception:  # noqa: BLE001
        pass
    mid = getattr(w, "model_id", None)
    return {"version_major": 2, "version_minor": 0, "model_id": mid} if mid else None


@dataclass(eq=False, repr=False)
class StepReport:
    """What a magic shows after measuring, compressing, undoing or redoing a model.

    ``repr()`` is plain, fixed-width and deterministic (no latency, no timings, no ids): it is what
    notebook tests compare. ``_repr_html_`` is the self-contained dashboard; ``widget()`` the same
    as ipywidgets. Nothing here measures: every number comes from ``before`` / ``after`` /
    ``result`` / ``history`` as given.
    """

    name: str
    kind: str                       # "measure" | "step" | "undo" | "redo"
    technique: str                  # "baseline", "prune", "quantize", "undo", ...
    args: str                       # deterministic, e.g. "amount=0.5 structured=True"
    before: Any                     # Metrics | None (None for kind "measure")
    after: Any                      # Metrics
    result: Any = None              # CompressionResult | None
    version: int = 0                # index of the version the name is bound to now
    n_versions: int = 1
    history: Any = None             # pandas DataFrame of the history, or None
    extra_models: dict = field(default_factory=dict)   # e.g. {"teacher": Metrics}
    _cache: dict = field(default_factory=dict, init=False, compare=False)

    def __post_init__(self):
        # The live dashboard of this name (shown by ``%nbcompress NAME``), if one is on screen,
        # now shows this report: a step, %undo or %redo updates it even when not displayed.
        if self.kind != "measure" and display_mode() == "auto" and kernel_has_comms():
            try:
                from .widgets import Dashboard

                live = Dashboard._registry.get(self.name)
                if live is not None:
                    live.update(self)
            except Exception:  # noqa: BLE001 - a display must never break a step
                pass

    # ------------------------------------------------------------------------------ pieces

    @property
    def has_before(self) -> bool:
        return self.kind != "measure" and self.before is not None

    @property
    def version_text(self) -> str:
        return f"version {self.version} of {self.n_versions}"

    @property
    def headline(self) -> str:
        h = f"{self.technique} {self.name}: {self.version_text}"
        return f"{h} — {self.args}" if self.args else h

    @property
    def notes(self) -> list[str]:
        return [str(n) for n in (getattr(self.result, "notes", None) or [])]

    def metrics_table(self, *, raw: bool = False, latency: bool = True):
        """The before/after table as a DataFrame (see :func:`metrics_table`)."""
        return metrics_table(self.before if self.has_before else None, self.after,
                             self.extra_models, raw=raw, latency=latency)

    def layers_table(self):
        """The per-layer detail as a DataFrame (the step's own, else the measured layers)."""
        import pandas as pd

        cols, rows, _ = layer_rows(self.result, self.after)
        return pd.DataFrame.from_records(rows, columns=cols)

    def _chart_layers(self) -> tuple[list[dict], str | None, list[dict] | None]:
        layers = list(getattr(self.after, "layers", None) or [])
        cols: list[str] = []
        if layers:
            for r in layers:
                cols += [k for k in r if k not in cols]
            key = bar_key(cols, layers)
            if key == "sparsity" and not any((r.get("sparsity") or 0) > 0 for r in layers):
                step_cols, step_rows, src = layer_rows(self.result, None)
                alt = bar_key(step_cols, step_rows) if src == "step" else None
                if alt:
                    return step_rows, alt, None
        else:
            cols, layers, _src = layer_rows(self.result, None)
            key = bar_key(cols, layers)
        before = None
        if key == "sparsity" and self.has_before:
            before = list(getattr(self.before, "layers", None) or []) or None
            if before and not any((r.get("sparsity") or 0) > 0 for r in before):
                before = None  # nothing to show behind the bars
        if key == "sparsity" and not any((r.get("sparsity") or 0) > 0 for r in layers) \
                and before is None and any(isinstance(r.get("params"), int) for r in layers):
            key = "params"  # a dense model: where the weights are says more than 0% bars
        return layers, key, before

    def layers_png(self) -> bytes | None:
        """Per-layer sparsity (or bits) bars, or None when there is nothing per layer."""
        if "layers_png" not in self._cache:
            layers, key, before = self._chart_layers()
            png = None
            if layers and key:
                png = layers_plot_png(layers, key, before=before)
            self._cache["layers_png"] = png
        return self._cache["layers_png"]

    def history_png(self) -> bytes | None:
        if "history_png" not in self._cache:
            png = None
            if self.history is not None and len(self.history) > 1:
                png = history_plot_png(self.history)
            self._cache["history_png"] = png
        return self._cache["history_png"]

    # -------------------------------------------------------------------------------- text

    def __repr__(self) -> str:
        return self.text(timings=False)

    def __str__(self) -> str:
        return self.text()

    def text(self, timings: bool | None = None) -> str:
        """Plain text: headline, metrics, per-layer detail, notes and the step's tables, all
        deterministic; then, when ``timings`` (default: :func:`text_timings`), a separate
        section with the latency before -> after and how it was timed. ``repr()`` is
        ``text(timings=False)``: what notebook tests compare."""
        out = [self.headline, ""]
        cols, rows = metric_rows(self.before if self.has_before else None, self.after,
                                 self.extra_models, latency=False)
        out.append(self._metrics_text(cols, rows))
        if self._unscored():
            out.append("  (accuracy not measured: give an evaluator with --eval)")

        lcols, lrows, source = layer_rows(self.result, self.after)
        if lrows:
            if source == "metrics":
                lcols = [c for c in lcols if c != "flops"]
            what = "step detail" if source == "step" else "measured"
            out += ["", f"layers ({len(lrows)}, {what}):", layers_text(lcols, lrows)]
        notes = self.notes
        if notes:
            out += ["", "notes:"] + [f"  - {n}" for n in notes]
        tables = getattr(self.result, "tables", None) or {}
        for tname, df in tables.items():
            n = len(df) if hasattr(df, "__len__") else 0
            out += ["", f"{str(tname).replace('_', ' ')} ({plural(n, 'row')}; "
                        f"report.result.tables[{str(tname)!r}]):", dataframe_text(df)]
        if timings is None:
            timings = text_timings()
        if timings:
            out += self._timings_text()
        return "\n".join(out)

    def _metrics_text(self, cols: list[str], rows: list, labels: dict | None = None) -> str:
        main = [c for c in cols if c in ("before", "after", "value")]
        extras = [c for c in cols if c not in main]
        headers = ["metric"] + main + (["change"] if self.has_before else []) + extras
        body = []
        for r in rows:
            line = [(labels or {}).get(r.spec.key, r.spec.label)] + [r.texts[c] for c in main]
            if self.has_before:
                line.append(r.change.text if r.change else "")
            line += [r.texts[c] for c in extras]
            body.append(line)
        right = set(range(1, 1 + len(main))) | {headers.index(e) for e in extras}
        return text_table(headers, body, right, indent="  ")

    def _timings_text(self) -> list[str]:
        """The latency rows (before -> after, change) and how they were timed, as a section of
        its own: these numbers change from run to run."""
        cols, rows = metric_rows(self.before if self.has_before else None, self.after,
                                 self.extra_models, latency=True)
        rows = [r for r in rows if not r.spec.deterministic]
        if not rows:
            return []
        models = ([self.before] if self.has_before else []) + [self.after]
        modes = [str(getattr(m, "latency_mode", "eager") or "eager") for m in models]
        how = modes[-1] if len(set(modes)) == 1 else " before, ".join(modes) + " after"
        where = [f"on {self.after.device}"] if getattr(self.after, "device", None) else []
        bs = getattr(self.after, "batch_size", None)
        if bs:
            where.append(f"batch {bs}")
        return ["", "timings (they change from run to run: repr() and notebook text leave "
                    "them out):", self._metrics_text(cols, rows, {"latency_ms": "latency"}),
                f"  latency: median of timed forwards after warm-up; mode {how}"
                + (f", {', '.join(where)}" if where else "")]

    # -------------------------------------------------------------------------------- html

    def _latency_note(self) -> str:
        dev = getattr(self.after, "device", None)
        bs = getattr(self.after, "batch_size", None)
        parts = [str(dev)] if dev else []
        if bs:
            parts.append(f"batch {bs}")
        mode = getattr(self.after, "latency_mode", "eager")
        if mode and mode != "eager":
            parts.append(mode)
        return ", ".join(parts)

    def summary_html(self) -> str:
        """Headline and the row of headline numbers (no card)."""
        cols, rows = metric_rows(self.before if self.has_before else None, self.after,
                                 self.extra_models, latency=True)
        return (H.headline_html(self.technique, self.name, self.version_text, self.args, self.kind)
                + H.kpi_html(rows, self.has_before))

    def metrics_html(self) -> str:
        cols, rows = metric_rows(self.before if self.has_before else None, self.after,
                                 self.extra_models, latency=True)
        note = ""
        if self._unscored():
            note = (f'<div style="color:{H.MUTED};font-size:12px;margin-top:6px;">accuracy not '
                    f"measured: give an evaluator with <code>--eval</code></div>")
        return H.metrics_html(cols, rows, latency_note=self._latency_note()) + note

    def _unscored(self) -> bool:
        """No evaluator's number (accuracy, or a language model's perplexity) after the step."""
        return all(_is_missing(getattr(self.after, k, None)) for k in ("accuracy", "perplexity"))

    def layers_html(self) -> str:
        cols, rows, source = layer_rows(self.result, self.after)
        return H.layers_html(cols, rows)

    def details_html(self) -> str:
        """Notes, extra numbers, extra tables and figures of the step ('' when none)."""
        parts = []
        if self.notes:
            parts.append(H.section("Notes", H.notes_html(self.notes)))
        extra = {k: v for k, v in (getattr(self.result, "extra", None) or {}).items()}
        if extra:
            parts.append(H.section("Details", H.dict_html(extra)))
        for tname, df in (getattr(self.result, "tables", None) or {}).items():
            parts.append(H.section(str(tname), H.dataframe_html(df)))
        for fname, png in (getattr(self.result, "figures", None) or {}).items():
            if isinstance(png, (bytes, bytearray)):
                parts.append(H.section(str(fname), H.png_img(bytes(png), str(fname), "640px")))
        return "".join(parts)

    def _repr_html_(self) -> str | None:
        if display_mode() == "text":
            return None
        if "html" in self._cache:
            return self._cache["html"]
        body = [self.summary_html()]
        hist = self.history_png()
        metrics = H.section("Metrics", H.scroll(self.metrics_html()), _TABLE_COL)
        cols, rows, source = layer_rows(self.result, self.after)
        png = self.layers_png() if rows else None
        chart = (H.section(self._chart_title(), H.png_img(png, "per-layer chart"), _PLOT_COL)
                 if png else "")
        table = ""
        if rows:
            title = "Layers" + (" (step detail)" if source == "step" else "")
            table = H.section(title, H.scroll(H.layers_html(cols, rows)), _TABLE_COL)
        if hist is not None:
            title = ("History: size vs accuracy" if self._history_has_accuracy()
                     else "History: parameters by version")
            plot = H.section(title, H.png_img(hist, "history plot"), _PLOT_COL)
            body.append(_row(metrics + plot))
            if table:
                body.append(_row(table + chart))
        else:  # no history to plot: the per-layer chart goes beside the metrics
            body.append(_row(metrics + chart))
            body.append(table)
        body.append(self.details_html())
        body.append(self._footer_html())
        html = H.card("".join(body))
        self._cache["html"] = html
        return html

    def _history_has_accuracy(self) -> bool:
        h = self.history
        return h is not None and "accuracy" in h.columns and h["accuracy"].notna().any()

    def _chart_title(self) -> str:
        _layers, key, _before = self._chart_layers()
        return {"bits": "Bits per weight by layer", "sparsity": "Sparsity by layer",
                "params": "Parameters by layer"}.get(key or "", f"{key} by layer")

    def _footer_html(self) -> str:
        bits = ["dense bytes: tensors in memory now", "packed bytes: what nbcompress.save writes"]
        if getattr(self.after, "sparse_flops", None) is not None:
            bits.append("sparse FLOPs skip zero weights (dense hardware does not)")
        note = self._latency_note()
        if getattr(self.after, "latency_ms", None) is not None:
            bits.append(f"latency: median of timed runs on {note or 'the device'}")
        return (f'<div style="margin-top:14px;padding-top:8px;border-top:1px solid {H.LINE};'
                f'color:{H.MUTED};font-size:11px;">{" · ".join(bits)}</div>')

    # --------------------------------------------------------------------------- widgets

    def widget(self):
        """The dashboard as ipywidgets: a VBox of a headline and tabs (Metrics, Layers, History,
        Details). Built from HTML and Image widgets only, so it needs no callbacks."""
        from .widgets import build_widget

        return build_widget(self)

    def _display_widget(self):
        """The widget a live kernel shows for this report. A ``measure`` report (what
        ``%nbcompress NAME`` returns) shows the name's live :class:`Dashboard`, which every later
        report of that name updates in place (see ``__post_init__``); a step, undo or redo shows
        its own widget, a fixed record of that step."""
        if self.kind == "measure":
            from .widgets import Dashboard

            return Dashboard.for_name(self.name, self).widget
        return self.widget()

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle: dict = {"text/plain": self._safe_text()}
        mode = display_mode()
        if mode != "text":
            try:
                html = self._repr_html_()
                if html:
                    bundle["text/html"] = html
            except Exception as e:  # noqa: BLE001 - a display must never fail
                bundle["text/html"] = f"<pre>{H.escape(bundle['text/plain'])}</pre>" \
                                      f"<!-- nbcompress: html failed: {H.escape(type(e).__name__)} -->"
        if mode == "auto" and kernel_has_comms():
            try:
                w = self._cache.get("widget")
                if w is None:
                    w = self._cache["widget"] = self._display_widget()
                view = widget_view(w)
                if view:
                    bundle[WIDGET_MIME] = view
            except Exception:  # noqa: BLE001 - no widgets here: the text and HTML remain
                pass
        return _filter(bundle, include, exclude)

    def _safe_text(self) -> str:
        try:
            return self.text()      # with timings only outside a Jupyter kernel (text_timings)
        except Exception as e:  # noqa: BLE001
            return f"{self.technique} {self.name} (report could not be formatted: {type(e).__name__})"


# Rows of [table | plot]: a table keeps its natural width (at least 520px, so the plots of
# successive rows line up when the tables are narrower), a plot takes the rest and wraps below its
# table when less than 360px would be left (narrow output areas), so plot text stays legible.
_TABLE_COL = "flex:0 1 auto;min-width:min(100%,520px);max-width:100%;"
_PLOT_COL = "flex:1 1 360px;min-width:min(100%,360px);max-width:560px;"


def _row(inner: str) -> str:
    return (f'<div style="display:flex;flex-wrap:wrap;gap:4px 32px;align-items:flex-start;">'
            f"{inner}</div>")


# ----------------------------------------------------------------------------------- history

def deterministic_history(df):
    """The history DataFrame without columns that change from run to run (latency, times,
    device)."""
    keep = [c for c in df.columns if not is_timing_key(c)]
    return df[keep]


def history_html(df, png: bytes | None = None, title: str | None = None) -> str:
    """The history as one HTML card: the size-vs-accuracy plot and the table (current version
    highlighted). ``png``: a plot already made with :func:`history_plot_png` (made here if None)."""
    if png is None and df is not None and len(df) > 0:
        png = history_plot_png(df)
    body = []
    if title:
        body.append(f'<div style="font-size:15px;font-weight:600;margin-bottom:4px;">'
                    f"{H.escape(title)}</div>")
    if png:
        body.append(H.section("Size vs accuracy", H.png_img(png, "history plot")))
    body.append(H.section("Versions", H.history_table_html(df)))
    return H.card("".join(body), cls="nbc-history-view")


class HistoryView:
    """What ``%compress_history`` can return: text repr = the deterministic columns of the table;
    HTML = plot + table. ``.df`` is the full DataFrame."""

    def __init__(self, df, png: bytes | None = None, name: str | None = None):
        self.df = df
        self.name = name
        self._png = png

    @property
    def png(self) -> bytes:
        if self._png is None:
            self._png = history_plot_png(self.df)
        return self._png

    def __repr__(self) -> str:
        """The deterministic columns (no latency) with plain-English headers, numbers
        formatted, long args wrapped; ``.df`` has the raw numbers."""
        if self.df is None or len(self.df) == 0:
            return "(no history)"
        return history_text(self.df)

    def _repr_html_(self) -> str | None:
        if display_mode() == "text":
            return None
        return history_html(self.df, self.png,
                            title=f"compress history: {self.name}" if self.name else None)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = {"text/plain": repr(self)}
        if display_mode() != "text":
            try:
                html = self._repr_html_()
                if html:
                    bundle["text/html"] = html
            except Exception:  # noqa: BLE001
                pass
        return _filter(bundle, include, exclude)
