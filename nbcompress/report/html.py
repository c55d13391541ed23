"""Self-contained HTML fragments: inline ``style`` attributes only (no ``<style>`` block, no
scripts, no external assets), images as ``data:`` URIs, so the output looks the same in
JupyterLab, VS Code, nbconvert and nbviewer, and stays readable where a sanitizer strips styles.

The main metrics table has ``class="nbc-metrics"``; each value cell carries ``data-metric`` (the
Metrics attribute, e.g. ``packed_bytes``), ``data-col`` (``before`` / ``after`` / ``value`` /
``change`` / an extra model's name) and, for values, ``data-value`` (the raw number).
"""
from __future__ import annotations

import base64
from html import escape
from typing import Any

from .format import MISSING, _is_missing, format_bytes, format_number
from .tables import MetricRow, bar_key, format_column

FONT = ("-apple-system,BlinkMacSystemFont,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif")
MONO = "ui-monospace,SFMono-Regular,Menlo,Consolas,'Liberation Mono',monospace"
INK = "#1f2328"
MUTED = "#656d76"
LINE = "#d8dee4"
SOFT = "#f6f8fa"
BAR = "#4c78a8"

STATE_STYLE = {
    "better": "color:#1a7f37;background:#dafbe1;",
    "worse": "color:#cf222e;background:#ffebe9;",
    "same": "color:#656d76;background:#eef1f4;",
    "neutral": "color:#57606a;background:#eef1f4;",
    "na": "color:#8c959f;background:transparent;",
}

TECHNIQUE_COLORS = {
    "baseline": "#57606a", "measure": "#57606a", "prune": "#4c78a8", "quantize": "#b55d00",
    "lowrank": "#7e57c2", "distill": "#2f8f5b", "undo": "#6e7781", "redo": "#6e7781",
    "cluster": "#c2410c",
}

WRAP = (f"font-family:{FONT};font-size:13px;line-height:1.45;color:{INK};background:#ffffff;"
        "text-align:left;")


def png_size(png: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels from a PNG's header."""
    if len(png) >= 24 and png[:8] == b"\x89PNG\r\n\x1a\n":
        return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return None


def css_width(png: bytes, max_width: str | None = None) -> str:
    """The width to show a plot at: our plots are drawn at 1.5x (sharp on high-DPI screens)."""
    if max_width:
        return max_width
    size = png_size(png)
    return f"{round(size[0] / PIXEL_RATIO)}px" if size else "100%"


PIXEL_RATIO = 1.5


def png_img(png: bytes, alt: str, max_width: str | None = None) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<img src="data:image/png;base64,{b64}" alt="{escape(alt)}" '
            f'style="width:100%;max-width:{css_width(png, max_width)};height:auto;display:block;'
            f'margin:0;border:0;">')


def scroll(body: str) -> str:
    """Let a wide table scroll sideways instead of spilling out of its column."""
    return f'<div style="overflow-x:auto;max-width:100%;">{body}</div>'


def section(title: str, body: str, extra_style: str = "") -> str:
    return (f'<div style="margin:14px 0 0 0;{extra_style}">'
            f'<div style="font-size:11px;font-weight:600;letter-spacing:.06em;'
            f'text-transform:uppercase;color:{MUTED};margin:0 0 6px 0;">{escape(title)}</div>'
            f"{body}</div>")


def card(body: str, cls: str = "nbc-report") -> str:
    return (f'<div class="{cls}" style="{WRAP}border:1px solid {LINE};border-radius:10px;'
            f'padding:16px 20px 18px 20px;max-width:1100px;box-sizing:border-box;">{body}</div>')


def fragment(body: str) -> str:
    """A piece for an ipywidgets.HTML (no card border, same fonts)."""
    return f'<div style="{WRAP}padding:2px 4px;">{body}</div>'


def pill(text: str, color: str) -> str:
    return (f'<span style="display:inline-block;background:{color};color:#fff;font-size:11px;'
            f'font-weight:600;letter-spacing:.04em;text-transform:uppercase;padding:2px 8px;'
            f'border-radius:10px;vertical-align:2px;">{escape(text)}</span>')


def code(text: str) -> str:
    return (f'<code style="font-family:{MONO};font-size:12px;background:{SOFT};'
            f'border:1px solid {LINE};border-radius:4px;padding:1px 5px;color:{INK};">'
            f"{escape(text)}</code>")


def badge(text: str, state: str) -> str:
    return (f'<span style="display:inline-block;{STATE_STYLE.get(state, STATE_STYLE["na"])}'
            f'border-radius:4px;padding:1px 7px;font-size:12px;white-space:nowrap;">'
            f"{escape(text)}</span>")


def headline_html(technique: str, name: str, version_text: str, args: str,
                  kind: str = "step") -> str:
    color = TECHNIQUE_COLORS.get(technique, "#4c78a8" if kind == "step" else "#57606a")
    parts = [pill(technique, color),
             f'<span style="font-family:{MONO};font-size:15px;font-weight:600;margin-left:8px;">'
             f"{escape(name)}</span>",
             f'<span style="color:{MUTED};margin-left:10px;">{escape(version_text)}</span>']
    if args:
        parts.append(f'<span style="margin-left:10px;">{code(args)}</span>')
    return f'<div class="nbc-headline" style="margin:0 0 4px 0;">{"".join(parts)}</div>'


# ------------------------------------------------------------------------------ KPI tiles

_KPI_KEYS = (("packed_bytes", "Packed size"), ("nonzero_params", "Non-zero params"),
             ("sparse_flops", "Sparse FLOPs"), ("flops", "FLOPs"), ("accuracy", "Accuracy"),
             ("perplexity", "Perplexity"))


def kpi_html(rows: list[MetricRow], has_before: bool) -> str:
    """A row of headline numbers (size, non-zeros, FLOPs, accuracy) above the tables."""
    by_key = {r.spec.key: r for r in rows}
    tiles = []
    chosen = []
    for key, label in _KPI_KEYS:
        if key not in by_key:
            continue
        if key == "flops" and "sparse_flops" in chosen:
            continue
        if key == "sparse_flops":
            r = by_key[key]
            if r.values.get("after" if has_before else "value") == (
                    by_key.get("flops").values.get("after" if has_before else "value")
                    if "flops" in by_key else None):
                continue  # identical to FLOPs: show plain FLOPs instead
        chosen.append(key)
    for key in chosen:
        r = by_key[key]
        label = dict(_KPI_KEYS)[key]
        col = "after" if has_before else "value"
        if _is_missing(r.values.get(col)):
            continue
        sub = ""
        if has_before and r.change is not None:
            sub = (f'<div style="font-size:12px;margin-top:3px;color:{MUTED};">from '
                   f'{escape(r.texts["before"])} &nbsp;{badge(r.change.text, r.change.state)}</div>')
        tiles.append(
            f'<div style="flex:1 1 150px;min-width:150px;background:{SOFT};border:1px solid {LINE};'
            f'border-radius:8px;padding:8px 12px;">'
            f'<div style="font-size:11px;color:{MUTED};text-transform:uppercase;letter-spacing:.05em;">'
            f"{escape(label)}</div>"
            f'<div style="font-size:20px;font-weight:600;font-variant-numeric:tabular-nums;'
            f'margin-top:1px;" data-kpi="{escape(key)}">{escape(r.texts[col])}</div>{sub}</div>')
    if not tiles:
        return ""
    return (f'<div class="nbc-kpis" style="display:flex;flex-wrap:wrap;gap:10px;margin:12px 0 0 0;">'
            f'{"".join(tiles)}</div>')


# --------------------------------------------------------------------------- metrics table

TH = (f"text-align:left;font-weight:600;color:{MUTED};font-size:11px;text-transform:uppercase;"
      f"letter-spacing:.05em;padding:5px 10px;border-bottom:1px solid {LINE};background:{SOFT};"
      "white-space:nowrap;")
TD = (f"padding:5px 10px;border-bottom:1px solid #eef1f4;text-align:left;vertical-align:middle;"
      f"white-space:nowrap;color:{INK};background:transparent;")
NUM = "text-align:right;font-variant-numeric:tabular-nums;"
# every row sets its own background: notebook front ends stripe table rows with theme colours
# (dark rows under dark text in a dark theme) unless told otherwise
TR = "background:#ffffff;"
TABLE = ("border-collapse:collapse;border-spacing:0;font-size:13px;margin:0;border:none;"
         "width:auto;table-layout:auto;")


def _raw_attr(v: Any) -> str:
    if _is_missing(v):
        return ""
    try:
        return f' data-value="{float(v)!r}"'
    except (TypeError, ValueError):
        return ""


def metrics_html(cols: list[str], rows: list[MetricRow], *, latency_note: str = "") -> str:
    """The before → after table (``class="nbc-metrics"``)."""
    has_before = "before" in cols
    extras = [c for c in cols if c not in ("before", "after", "value")]
    head = [f'<th style="{TH}">metric</th>']
    if has_before:
        head += [f'<th style="{TH}{NUM}">before</th>', f'<th style="{TH}width:14px;padding:5px 0;"></th>',
                 f'<th style="{TH}{NUM}">after</th>', f'<th style="{TH}">change</th>']
    else:
        head.append(f'<th style="{TH}{NUM}">value</th>')
    for e in extras:
        head.append(f'<th style="{TH}{NUM}border-left:1px solid {LINE};">{escape(e)}</th>')
    body = []
    for r in rows:
        key = r.spec.key
        label = escape(r.spec.label)
        if key == "latency_ms":
            label = (f'latency <span style="color:{MUTED};font-size:11px;">'
                     f"(median{', ' + escape(latency_note) if latency_note else ''})</span>")
        elif key == "sparse_flops":
            label += (f' <span style="color:{MUTED};font-size:11px;">(zeros skipped)</span>')
        elif key == "dense_bytes":
            label = 'dense bytes <span style="color:%s;font-size:11px;">(in memory)</span>' % MUTED
        elif key == "packed_bytes":
            label = 'packed bytes <span style="color:%s;font-size:11px;">(saved)</span>' % MUTED
        cells = [f'<td style="{TD}">{label}</td>']

        def vcell(col, extra_style=""):
            return (f'<td style="{TD}{NUM}{extra_style}" data-metric="{escape(key)}" '
                    f'data-col="{escape(col)}"{_raw_attr(r.values[col])}>{escape(r.texts[col])}</td>')

        if has_before:
            cells.append(vcell("before", f"color:{MUTED};"))
            cells.append(f'<td style="{TD}color:#8c959f;padding:5px 0;text-align:center;">→</td>')
            cells.append(vcell("after", "font-weight:600;"))
            ch = r.change
            cells.append(f'<td style="{TD}" data-metric="{escape(key)}" data-col="change"'
                         f'{_raw_attr(ch.value if ch else None)}>'
                         f'{badge(ch.text, ch.state) if ch and ch.state != "na" else MISSING}</td>')
        else:
            cells.append(vcell("value", "font-weight:600;"))
        for e in extras:
            cells.append(vcell(e, f"color:{MUTED};border-left:1px solid {LINE};"))
        body.append(f'<tr style="{TR}" data-metric="{escape(key)}">{"".join(cells)}</tr>')
    return (f'<table class="nbc-metrics" style="{TABLE}"><thead><tr style="{TR}">{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


# ---------------------------------------------------------------------------- layers table


def _bar(frac: float, color: str = BAR) -> str:
    w = max(0.0, min(1.0, frac)) * 100
    return (f'<span style="display:inline-block;width:70px;height:7px;background:#eaeef2;'
            f'border-radius:4px;vertical-align:1px;margin-left:8px;overflow:hidden;">'
            f'<span style="display:block;width:{w:.1f}%;height:7px;background:{color};'
            f'border-radius:4px;"></span></span>')


_BITS_COLORS = ((32, "#9aa4ae"), (16, "#4c78a8"), (8, "#54a24b"), (4, "#f58518"), (0, "#e45756"))


def layers_html(cols: list[str], rows: list[dict], limit: int = 80) -> str:
    """The per-layer table; the sparsity (or bits) column carries a small inline bar."""
    if not rows:
        return f'<div style="color:{MUTED};">no per-layer detail</div>'
    key = bar_key(cols, rows)
    head = "".join(
        f'<th style="{TH}{"" if c in ("layer", "name", "type", "kind", "dtype") else NUM}">'
        f"{escape(str(c))}</th>" for c in cols)
    body = []
    shown = rows[:limit]
    texts = {c: format_column(c, [r.get(c) for r in shown]) for c in cols}
    for i, row in enumerate(shown):
        cells = []
        for c in cols:
            v = row.get(c)
            text = escape(texts[c][i])
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            style = TD + (NUM if numeric else "")
            if c in ("layer", "name"):
                style += f"font-family:{MONO};font-size:12px;"
            if c == key and numeric:
                if key == "bits":
                    color = next(col for b, col in _BITS_COLORS if v >= b)
                    text += _bar(float(v) / 32.0, color)
                else:
                    text += _bar(float(v))
            cells.append(f'<td style="{style}">{text}</td>')
        body.append(f'<tr style="{TR}">{"".join(cells)}</tr>')
    more = ""
    if len(rows) > limit:
        more = f'<div style="color:{MUTED};font-size:12px;margin-top:4px;">… {len(rows) - limit} more layers</div>'
    return (f'<table class="nbc-layers" style="{TABLE}"><thead><tr style="{TR}">{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>{more}')


# --------------------------------------------------------------------------------- details


def notes_html(notes: list[str]) -> str:
    items = "".join(f'<li style="margin:2px 0;">{escape(str(n))}</li>' for n in notes)
    return f'<ul class="nbc-notes" style="margin:0;padding-left:20px;color:{INK};">{items}</ul>'


def dict_html(d: dict) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={format_number(b)}" for a, b in v.items())
        elif isinstance(v, (list, tuple)) and len(v) > 12:
            v = format_number(list(v[:12])) + f" … ({len(v)} values)"
        else:
            v = format_number(v)
        rows.append(f'<tr style="{TR}"><td style="{TD}color:{MUTED};">{escape(str(k))}</td>'
                    f'<td style="{TD}{NUM}white-space:normal;">{escape(str(v))}</td></tr>')
    return f'<table class="nbc-extra" style="{TABLE}width:auto;"><tbody>{"".join(rows)}</tbody></table>'


def dataframe_html(df: Any, max_rows: int = 60) -> str:
    """A pandas DataFrame as a styled table (numbers formatted, long frames cut)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        return f"<pre>{escape(str(df))}</pre>"
    if not isinstance(df, pd.DataFrame):
        return f"<pre>{escape(str(df))}</pre>"
    shown = df.head(max_rows)
    show_index = not isinstance(df.index, pd.RangeIndex)
    head = ""
    if show_index:
        head += f'<th style="{TH}">{escape(str(df.index.name or ""))}</th>'
    head += "".join(f'<th style="{TH}{NUM if _numeric(df[c]) else ""}">{escape(str(c))}</th>'
                    for c in df.columns)
    body = []
    texts = {c: format_column(str(c), shown[c].tolist()) for c in df.columns}
    for i, (idx, row) in enumerate(shown.iterrows()):
        cells = f'<td style="{TD}">{escape(str(idx))}</td>' if show_index else ""
        for c in df.columns:
            v = row[c]
            numeric = _numeric(df[c])
            cells += (f'<td style="{TD}{NUM if numeric else ""}">'
                      f"{escape(texts[c][i] if numeric else ('' if _is_missing(v) else str(v)))}</td>")
        body.append(f'<tr style="{TR}">{cells}</tr>')
    more = ""
    if len(df) > max_rows:
        more = f'<div style="color:{MUTED};font-size:12px;margin-top:4px;">… {len(df) - max_rows} more rows</div>'
    return (f'<table class="nbc-table" style="{TABLE}width:auto;"><thead><tr style="{TR}">{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>{more}')


def _numeric(series: Any) -> bool:
    try:
        from pandas.api.types import is_bool_dtype, is_numeric_dtype

        return is_numeric_dtype(series) and not is_bool_dtype(series)
    except Exception:  # noqa: BLE001
        return False


# -------------------------------------------------------------------------------- history

HISTORY_COLS = (("version", "version"), ("technique", "technique"), ("args", "args"),
                ("params", "params"), ("nonzero_params", "nonzero"),
                ("packed_bytes", "packed"), ("dense_bytes", "dense"), ("flops", "FLOPs"),
                ("sparse_flops", "sparse FLOPs"), ("latency_ms", "latency"),
                ("accuracy", "accuracy"), ("perplexity", "perplexity"),
                ("exported", "exported"), ("runtime_ms", "runtime latency"),
                ("agreement", "top-1 agreement"))


def history_table_html(df: Any) -> str:
    """The history DataFrame as a table, the current version highlighted."""
    from .format import (accuracy_scale, format_accuracy, format_count, format_flops, format_ms,
                         format_number, format_pct)

    if df is None or len(df) == 0:
        return f'<div style="color:{MUTED};">no history</div>'
    cols = [(k, label) for k, label in HISTORY_COLS if k in df.columns
            and not (k != "version" and df[k].isna().all())]
    known = {k for k, _ in HISTORY_COLS} | {"current"}
    others = [c for c in df.columns if c not in known]
    acc_scale = accuracy_scale(*df["accuracy"].tolist()) if "accuracy" in df.columns else 100.0
    fmt = {"params": format_count, "nonzero_params": format_count, "packed_bytes": format_bytes,
           "dense_bytes": format_bytes, "flops": format_flops, "sparse_flops": format_flops,
           "latency_ms": format_ms, "accuracy": lambda v: format_accuracy(v, acc_scale),
           "perplexity": format_number, "runtime_ms": format_ms, "agreement": format_pct}
    text_cols = ("technique", "args", "exported")
    head = "".join(f'<th style="{TH}{"" if k in text_cols else NUM}">{escape(label)}</th>'
                   for k, label in cols)
    head += "".join(f'<th style="{TH}">{escape(str(c))}</th>' for c in others)
    body = []
    other_texts = {c: format_column(str(c), df[c].tolist()) for c in others}
    for i, (_, row) in enumerate(df.iterrows()):
        cur = bool(row.get("current", False)) if "current" in df.columns else False
        rstyle = "background:#fff8c5;" if cur else TR
        cells = ""
        for k, _label in cols:
            v = row[k]
            if k in fmt:
                text = fmt[k](None if _is_missing(v) else v)
            elif k == "version":
                text = f"{v}" + (" ◀" if cur else "")
            else:
                text = "" if _is_missing(v) else str(v)
            style = TD + ("" if k in text_cols else NUM)
            if k == "args":
                style += f"font-family:{MONO};font-size:12px;white-space:normal;"
            if cur:
                style += "font-weight:600;"
            cells += f'<td style="{style}">{escape(text)}</td>'
        for c in others:
            cells += f'<td style="{TD}">{escape(other_texts[c][i])}</td>'
        mark = ' data-current="1"' if cur else ""
        body.append(f'<tr style="{rstyle}"{mark}>{cells}</tr>')
    return (f'<table class="nbc-history" style="{TABLE}"><thead><tr style="{TR}">{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')
