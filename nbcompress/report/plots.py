"""Plots rendered straight to PNG bytes with the object-oriented matplotlib API.

No ``pyplot``: a :class:`~matplotlib.figure.Figure` with its own Agg canvas is drawn, saved and
cleared, so no global figure state is touched, nothing leaks into a notebook's text output, and no
GUI backend is needed. The PNGs carry no software/version metadata so the bytes depend only on
the data (and the installed fonts).
"""
from __future__ import annotations

import io
import math
from typing import Any

from .format import MISSING, _is_missing, accuracy_scale, format_bytes, format_count

# A quiet palette (Tableau 10 ordering)
BLUE = "#4c78a8"
ORANGE = "#f58518"
RED = "#e45756"
GREEN = "#54a24b"
GREY = "#9aa4ae"
LIGHT = "#dfe4ea"
INK = "#1f2328"
MUTED = "#57606a"

MAX_BARS = 60
_LABEL_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85}

_DTYPE_BITS = {"float64": 64, "double": 64, "float32": 32, "float": 32, "float16": 16,
               "half": 16, "bfloat16": 16, "int8": 8, "qint8": 8, "quint8": 8, "uint8": 8,
               "int4": 4, "uint4": 4, "int16": 16, "int32": 32, "bool": 1}


#: plots are drawn at 150 dpi and shown at 100 CSS px per inch (sharp on high-DPI screens)
DPI = 150


def _figure(width: float, height: float, dpi: int = DPI):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", facecolor="white", metadata={"Software": None})
    finally:
        fig.clear()
    return buf.getvalue()


def _style(ax, grid_axis: str = "x") -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#c9d1d9")
    ax.tick_params(colors=MUTED, labelsize=8, length=3)
    ax.grid(axis=grid_axis, color="#eaeef2", linewidth=0.8)
    ax.set_axisbelow(True)


def placeholder_png(message: str, width: float = 6.0, height: float = 1.2) -> bytes:
    fig = _figure(width, height)
    fig.text(0.5, 0.5, message, ha="center", va="center", color=MUTED, fontsize=9)
    return _png(fig)


# ---------------------------------------------------------------------------- per-layer bars


def _layer_name(row: dict, i: int) -> str:
    return str(row.get("layer") or row.get("name") or f"#{i}")


def _layer_value(row: dict, key: str) -> float | None:
    v = row.get(key)
    if key == "bits" and _is_missing(v):
        dt = row.get("dtype")
        v = _DTYPE_BITS.get(str(dt).replace("torch.", "")) if dt is not None else None
    if _is_missing(v) or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def layers_plot_png(layers: list[dict], key: str = "sparsity", *, before: list[dict] | None = None,
                    title: str | None = None) -> bytes:
    """Horizontal bars, one per layer (first layer at the top), of ``key`` in each layer dict.

    ``sparsity`` (and other fractions) is drawn in percent on a 0-100 axis, ``bits`` on a
    bit-width axis (a layer without ``bits`` shows its dtype's width). ``before``: the same layers
    before the step, drawn as light bars behind.
    """
    layers = list(layers or [])
    if not layers:
        return placeholder_png("no per-layer data")
    shown = layers[:MAX_BARS]
    names = [_short(_layer_name(r, i)) for i, r in enumerate(shown)]
    vals = [_layer_value(r, key) for r in shown]
    pct = key in ("sparsity", "density") or (
        key not in ("bits",) and all(v is None or 0 <= v <= 1 for v in vals)
        and any(w in key for w in ("sparsity", "density", "energy", "kept", "ratio")))
    scale = 100.0 if pct else 1.0
    prev = None
    if before:
        by_name = {_layer_name(r, i): r for i, r in enumerate(before)}
        prev = [(_layer_value(by_name[_layer_name(r, i)], key)
                 if _layer_name(r, i) in by_name else None) for i, r in enumerate(shown)]

    n = len(shown)
    fig = _figure(5.4, 0.8 + 0.27 * n + (0.25 if title or prev is not None else 0))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(n))
    plotted = [(v or 0.0) * scale for v in vals]
    if prev is not None:
        ax.barh(ys, [(v or 0.0) * scale for v in prev], height=0.72, color=LIGHT, label="before",
                zorder=1)
    if key == "bits":
        colors = [_bits_color(v) for v in vals]
    else:
        colors = [BLUE] * n
    ax.barh(ys, plotted, height=0.5 if prev is not None else 0.62, color=colors, zorder=2,
            label="after" if prev is not None else None)
    ax.set_yticks(ys, names, fontsize=8, color=INK)
    ax.invert_yaxis()
    if pct:
        hi = 100.0
    else:
        hi = max([p for p in plotted] + [(v or 0.0) * scale for v in (prev or [])] + [1e-9])
        hi = 32.0 if key == "bits" and hi <= 32 else hi * 1.08
    ax.set_xlim(0, hi * 1.12)
    for y, v, p in zip(ys, vals, plotted):
        if v is None:
            label = MISSING
        elif pct:
            label = f"{p:.1f}%"
        elif key == "bits":
            label = f"{p:g} bit"
        else:
            label = format_count(p) if float(p).is_integer() else f"{p:.3g}"
        ax.text(p + hi * 0.012, y, label, va="center", ha="left", fontsize=7.5, color=MUTED)
    label = {"sparsity": "sparsity (% of weights that are zero)", "bits": "bits per weight",
             "params": "parameters"}.get(
        key, key + (" (%)" if pct else ""))
    ax.set_xlabel(label, fontsize=8, color=MUTED)
    if not pct and key != "bits":
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: _count_short(v)))
    _style(ax)
    if prev is not None:
        ax.legend(fontsize=7.5, frameon=False, loc="lower right", bbox_to_anchor=(1.0, 1.0),
                  ncol=2, borderaxespad=0.2)
    if title:
        ax.set_title(title, fontsize=9.5, color=INK, loc="left")
    if len(layers) > n:
        fig.text(0.99, 0.005, f"first {n} of {len(layers)} layers", ha="right", va="bottom",
                 fontsize=7, color=MUTED)
    fig.tight_layout(pad=0.6)
    return _png(fig)


def _bits_color(v: float | None) -> str:
    if v is None:
        return GREY
    if v >= 32:
        return GREY
    if v >= 16:
        return BLUE
    if v >= 8:
        return GREEN
    if v >= 4:
        return ORANGE
    return RED


# ------------------------------------------------------------------------------ history plot


def _col(df, name: str) -> list:
    if name not in df.columns:
        return [None] * len(df)
    return [None if _is_missing(v) else v for v in df[name].tolist()]


def history_plot_png(df: Any, *, title: str | None = None) -> bytes:
    """Size against accuracy, one point a version, in version order.

    x: packed bytes on a log axis (dense bytes when nothing was packed); y: accuracy. Each point is
    labelled ``v<index> <technique>`` and the version the name is bound to now (``current``) is
    ringed. Without any accuracy the plot shows non-zero parameters against the version index
    instead, and says so.
    """
    if df is None or len(df) == 0:
        return placeholder_png("no history yet")
    if "version" in df.columns:
        df = df.sort_values("version", kind="stable")
    n = len(df)
    versions = [int(v) if not _is_missing(v) else i for i, v in enumerate(_col(df, "version"))]
    techniques = [str(t) if t is not None else "" for t in _col(df, "technique")]
    current = [bool(c) for c in _col(df, "current")] if "current" in df.columns else [False] * n
    if not any(current):
        current[-1] = True
    acc = _col(df, "accuracy")
    labels = [f"v{v} {t}".strip() for v, t in zip(versions, techniques)]

    if any(a is not None for a in acc):
        packed = _col(df, "packed_bytes")
        xname = "packed size"
        if not any(p for p in packed):
            packed, xname = _col(df, "dense_bytes"), "dense size"
        scale = accuracy_scale(*acc)
        pts = [(i, float(x), float(a) * scale) for i, (x, a) in enumerate(zip(packed, acc))
               if x and a is not None]
        if not pts:
            return placeholder_png("no version has both a size and an accuracy")
        fig = _figure(5.4, 3.4)
        ax = fig.add_subplot(1, 1, 1)
        xs = [p[1] for p in pts]
        ys = [p[2] for p in pts]
        ax.plot(xs, ys, color=GREY, linewidth=1.0, linestyle="--", zorder=1)
        for k, (i, x, y) in enumerate(pts):
            cur = current[i]
            ax.scatter([x], [y], s=70 if cur else 34, color=ORANGE if cur else BLUE, zorder=3,
                       edgecolors=INK if cur else "white", linewidths=1.2 if cur else 0.6)
            dy = 9 if k % 2 == 0 else -13
            ax.annotate(labels[i] + (" (current)" if cur else ""), (x, y), xytext=(6, dy),
                        textcoords="offset points", fontsize=7.5, zorder=4,
                        color=INK if cur else MUTED, fontweight="bold" if cur else "normal",
                        bbox=_LABEL_BOX)
        ax.set_xscale("log")
        lo, hi = min(xs), max(xs)
        span = max(hi / lo, 1.0)
        pad = max(span ** 0.18, 1.6)
        ax.set_xlim(lo / pad, hi * pad * 1.25)
        ylo, yhi = min(ys), max(ys)
        yspan = max(yhi - ylo, 0.6)
        mid = (ylo + yhi) / 2
        ax.set_ylim(mid - 0.8 * yspan, mid + 0.8 * yspan)
        _bytes_axis(ax)
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        ticks = [t for t in ax.get_yticks()]
        step = (ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
        ydig = max(0, min(3, -math.floor(math.log10(step) + 1e-9))) if step > 0 else 1
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.{ydig}f}%"))
        ax.set_xlabel(f"{xname} (log scale; smaller is further left)", fontsize=8, color=MUTED)
        ax.set_ylabel("accuracy", fontsize=8, color=MUTED)
        _style(ax, grid_axis="both")
        missing = n - len(pts)
        if missing:
            fig.text(0.99, 0.01, f"{missing} version(s) without accuracy not shown", ha="right",
                     va="bottom", fontsize=7, color=MUTED)
    else:
        nz = [float(v) if v is not None else math.nan for v in _col(df, "nonzero_params")]
        params = [float(v) if v is not None else math.nan for v in _col(df, "params")]
        fig = _figure(5.4, 3.3)
        ax = fig.add_subplot(1, 1, 1)
        if any(not math.isnan(p) for p in params) and params != nz:
            ax.plot(versions, params, color=GREY, linestyle="--", linewidth=1.0, label="params")
        ax.plot(versions, nz, color=BLUE, linewidth=1.2, marker="o", markersize=5,
                label="non-zero params", zorder=2)
        for i, (v, y) in enumerate(zip(versions, nz)):
            if math.isnan(y):
                continue
            cur = current[i]
            if cur:
                ax.scatter([v], [y], s=70, color=ORANGE, edgecolors=INK, linewidths=1.2, zorder=3)
            ax.annotate(labels[i] + (" (current)" if cur else ""), (v, y), xytext=(6, 6),
                        textcoords="offset points", fontsize=7.5, zorder=4,
                        color=INK if cur else MUTED, fontweight="bold" if cur else "normal",
                        bbox=_LABEL_BOX)
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: _count_short(v)))
        ax.set_xlabel("version", fontsize=8, color=MUTED)
        ax.set_ylabel("parameters", fontsize=8, color=MUTED)
        ax.set_ylim(bottom=0)
        ax.set_xlim(min(versions) - 0.4, max(versions) + 0.9)
        ax.legend(fontsize=7.5, frameon=False, loc="lower left")
        _style(ax, grid_axis="y")
        fig.text(0.99, 0.01, "no accuracy measured: pass --eval to plot size vs accuracy",
                 ha="right", va="bottom", fontsize=7, color=MUTED)
    if title:
        ax.set_title(title, fontsize=9.5, color=INK, loc="left")
    fig.tight_layout(pad=0.7, rect=(0, 0.03, 1, 1))
    return _png(fig)


def _count_short(v: float) -> str:
    a = abs(v)
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def _bytes_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs="auto"))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: format_bytes(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)


# ------------------------------------------------------------------- technique-specific plots


def sensitivity_png(df, baseline: float | None = None) -> bytes | None:
    """Accuracy against amount, one line per layer, as PNG bytes (matplotlib Agg, no pyplot)."""
    try:
        fig = _figure(6.4, 3.8, dpi=100)
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    ax = fig.add_subplot(111)
    scale = 100.0
    for name, g in df.groupby("layer", sort=False):
        ax.plot(g["amount"], g["accuracy"] * scale, marker="o", markersize=3, linewidth=1.4,
                label=str(name))
    if baseline is not None:
        ax.axhline(baseline * scale, color=MUTED, linestyle="--", linewidth=1,
                   label="unpruned")
    ax.set_xlabel("fraction pruned (this layer alone)")
    ax.set_ylabel("accuracy (%)")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(color="#eaeef2", linewidth=0.8)
    ax.legend(fontsize=7, frameon=False, ncol=2 if df["layer"].nunique() > 6 else 1)
    fig.tight_layout()
    return _png(fig)


def sweep_plot_png(sweep, *, full_accuracy: float | None = None,
                   title: str = "threshold sweep") -> bytes:
    """Accuracy (or agreement, without labels) against average FLOPs per sample, one point per
    threshold, the current threshold marked; PNG bytes (early exits' threshold sweep).

    Drawn on a plain :class:`~matplotlib.figure.Figure` (rcParams face colour) and saved with
    matplotlib's default PNG metadata, as it always was, not through :func:`_figure`/:func:`_png`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    df = sweep.sort_values("threshold")
    labelled = not df["accuracy"].isna().all()
    ycol = "accuracy" if labelled else "agreement"
    full = df["avg_flops"] / df["flops_fraction"]
    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = df["avg_flops"] / 1e6, 100 * df[ycol]
    ax.plot(xs, ys, "o-", color="#3b6ea5", ms=4, lw=1.5, label="early exit")
    span = max(float(xs.max() - xs.min()), 1e-12)
    last = None
    for t, xv, yv in zip(df["threshold"], xs, ys):      # label points not crowding the last one
        if last is None or abs(xv - last[0]) > 0.04 * span or abs(yv - last[1]) > 1.0:
            ax.annotate(f"{t:g}", (xv, yv), textcoords="offset points", xytext=(3, -10),
                        fontsize=7, color="#555555")
            last = (xv, yv)
    cur = df[df["current"]]
    if len(cur):
        ax.plot(cur["avg_flops"] / 1e6, 100 * cur[ycol], "*", color="#d9822b", ms=13,
                label=f"threshold {cur['threshold'].iloc[0]:g}")
    full_flops = float(full.iloc[0]) / 1e6
    ax.axvline(full_flops, color="#888888", ls=":", lw=1, label="full network FLOPs")
    if labelled and full_accuracy is not None and full_accuracy == full_accuracy:
        ax.axhline(100 * full_accuracy, color="#888888", ls="--", lw=1,
                   label="full network accuracy")
    elif not labelled:
        ax.axhline(100.0, color="#888888", ls="--", lw=1, label="full network")
    ax.set_xlabel("average MFLOPs per sample")
    ax.set_ylabel("accuracy %" if labelled else "agreement with full network %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def widths_plot_png(table, *, title: str = "slimmable widths") -> bytes:
    """Accuracy (if measured) or latency against FLOPs, one point per trained width (and depth)
    of a slimmable network, one line per depth, the current configuration marked; PNG bytes."""
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    has_acc = table["accuracy"].notna().any()
    ycol = "accuracy" if has_acc else "latency_ms"
    scale = 100 if has_acc else 1
    depths = sorted(table["depth"].unique(), reverse=True) if "depth" in table else [None]
    colors = ["#3b6ea5", "#2e8b57", "#8e44ad", "#c0392b"]
    for i, d in enumerate(depths):
        part = table if d is None else table[table["depth"] == d]
        part = part.sort_values("flops")
        ax.plot(part["flops"] / 1e6, scale * part[ycol], "o-", color=colors[i % len(colors)],
                ms=5, lw=1.5, label="width" if d is None else f"depth {d:g}")
        for w, xv, yv in zip(part["width"], part["flops"] / 1e6, scale * part[ycol]):
            ax.annotate(f"{w:g}", (xv, yv), textcoords="offset points", xytext=(4, -10),
                        fontsize=8, color="#555555")
    cur = table[table["current"]]
    if len(cur):
        label = f"runs at {cur['width'].iloc[0]:g}" + (
            f", depth {cur['depth'].iloc[0]:g}" if "depth" in cur else "")
        ax.plot(cur["flops"] / 1e6, scale * cur[ycol], "*", color="#d9822b", ms=13, label=label)
    ax.set_xlabel("MFLOPs per forward of the example")
    ax.set_ylabel("accuracy %" if has_acc else "latency ms")
    ax.set_title(title, fontsize=10)
    _style(ax, "both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def budget_plot_png(table, budget: float, column: str = "flops_fraction") -> bytes:
    """Accuracy against the share of the full FLOPs (or latency: ``column``) for every candidate
    of ``%budget``, the Pareto front joined, the budget as a line and the choice marked; PNG
    bytes."""
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    table = table[table[column].notna()]
    what = "FLOPs" if column == "flops_fraction" else "latency"
    if column != "flops_fraction":      # the Pareto front by this column
        best, front = -1.0, []
        for acc in table.sort_values([column, "accuracy"], ascending=[True, False])["accuracy"]:
            front.append(bool(acc > best))
            best = max(best, acc)
        table = table.sort_values([column, "accuracy"], ascending=[True, False]).assign(
            pareto=front)
    xs, ys = 100 * table[column], 100 * table["accuracy"]
    ax.plot(xs, ys, "o", color="#9aa5b1", ms=4, label="candidates")
    front = table[table["pareto"]]
    ax.plot(100 * front[column], 100 * front["accuracy"], "o-", color="#3b6ea5",
            ms=5, lw=1.5, label="Pareto front")
    ax.axvline(100 * budget, color="#c0392b", ls="--", lw=1, label=f"budget {budget:.0%}")
    pick = table[table["chosen"]] if "chosen" in table else table.iloc[:0]
    if len(pick):
        ax.plot(100 * pick[column], 100 * pick["accuracy"], "*", color="#d9822b",
                ms=14, label=f"chosen: {pick['label'].iloc[0]}")
    ax.set_xlabel(f"% of the full network's {what}")
    ax.set_ylabel("accuracy %")
    ax.set_title("budget: every trained configuration", fontsize=10)
    _style(ax, "both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)
