"""Tables built from what a step measured: the before/after metrics table and the per-layer table.

Nothing here measures anything: the rows come straight from :class:`~nbcompress.metrics.Metrics`
objects and the per-layer dicts of a :class:`~nbcompress.core.CompressionResult`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from .format import (MISSING, _is_missing, accuracy_scale, format_accuracy, format_bytes,
                     format_count, format_flops, format_ms, format_number, format_pct,
                     format_ratio)

# ------------------------------------------------------------------------------- metric specs


@dataclass(frozen=True)
class MetricSpec:
    key: str                       # attribute of Metrics (also the HTML data-metric value)
    label: str
    fmt: Callable[[Any], str]
    better: str                    # "lower" | "higher" | "neutral"
    change: str                    # "ratio" | "points" | "delta"
    words: tuple[str, str] = ("smaller", "larger")   # (when it went down, when it went up)
    deterministic: bool = True     # False: left out of the text repr (timings)


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("params", "params", format_count, "lower", "ratio", ("fewer", "more")),
    MetricSpec("nonzero_params", "nonzero params", format_count, "lower", "ratio", ("fewer", "more")),
    MetricSpec("sparsity", "sparsity", format_pct, "higher", "points"),
    MetricSpec("dense_bytes", "dense bytes", format_bytes, "lower", "ratio"),
    MetricSpec("packed_bytes", "packed bytes", format_bytes, "lower", "ratio"),
    MetricSpec("flops", "FLOPs", format_flops, "lower", "ratio", ("fewer", "more")),
    MetricSpec("sparse_flops", "sparse FLOPs", format_flops, "lower", "ratio", ("fewer", "more")),
    MetricSpec("latency_ms", "latency ms", format_ms, "lower", "ratio", ("faster", "slower"),
               deterministic=False),
    MetricSpec("accuracy", "accuracy", format_accuracy, "higher", "points"),
    MetricSpec("perplexity", "perplexity", format_number, "lower", "ratio", ("lower", "higher")),
)

#: latency is noisy: a change smaller than this fraction is not coloured as better/worse
LATENCY_NOISE = 0.05


def _get(m: Any, key: str) -> Any:
    if m is None:
        return None
    if key == "sparsity":
        params = getattr(m, "params", None)
        nz = getattr(m, "nonzero_params", None)
        if params is None or nz is None:
            return None
        return 1.0 - nz / params if params else 0.0
    return getattr(m, key, None)


def _latency_mode(m: Any) -> str:
    """How a version's latency was timed, without the reason a mode fell back ("eager (...)")."""
    return str(getattr(m, "latency_mode", "eager") or "eager").split(" (")[0]


@dataclass
class Change:
    text: str
    state: str          # "better" | "worse" | "same" | "neutral" | "na"
    value: float | None  # before/after ratio, or delta in points / units


def compute_change(spec: MetricSpec, before: Any, after: Any, acc_scale: float = 100.0) -> Change:
    """How ``after`` compares with ``before`` for one metric, in words and as a number."""
    if _is_missing(before) or _is_missing(after):
        return Change(MISSING, "na", None)
    b, a = float(before), float(after)
    if spec.change == "ratio":
        if a == b:
            return Change("same", "same", 1.0)
        if a == 0:
            return Change("→ 0", _state(spec, down=True), float("inf"))
        if b == 0:
            return Change("new", _state(spec, down=False), 0.0)
        ratio = b / a
        down = ratio > 1
        shown = ratio if down else 1.0 / ratio
        txt = format_ratio(shown)
        if txt == "1.00×":
            return Change("≈ same", "same", ratio)
        state = _state(spec, down)
        if spec.key == "latency_ms" and abs(shown - 1.0) < LATENCY_NOISE:
            state = "same"
        return Change(f"{txt} {spec.words[0] if down else spec.words[1]}", state, ratio)
    if spec.change == "points":
        scale = acc_scale if spec.key == "accuracy" else 100.0
        delta = (a - b) * scale
        if a == b:
            return Change("same", "same", 0.0)
        if round(delta, 2) == 0:
            return Change("±0.00 pts", "same", 0.0)
        state = "better" if (delta > 0) == (spec.better == "higher") else "worse"
        if spec.better == "neutral":
            state = "neutral"
        return Change(f"{delta:+.2f} pts", state, delta)
    delta = a - b
    if delta == 0:
        return Change("same", "same", 0.0)
    return Change(f"{delta:+.4g}", "neutral", delta)


def _state(spec: MetricSpec, down: bool) -> str:
    if spec.better == "neutral":
        return "neutral"
    return "better" if down == (spec.better == "lower") else "worse"


# ------------------------------------------------------------------------------ metric rows


@dataclass
class MetricRow:
    spec: MetricSpec
    values: dict            # column -> raw value
    texts: dict             # column -> formatted text
    change: Change | None   # None when there is no "before"


def metric_rows(before: Any, after: Any, extra: dict | None = None, *,
                latency: bool = True) -> tuple[list[str], list[MetricRow]]:
    """(value columns, rows). Columns: ``before``, ``after`` and one per extra model; when
    ``before`` is None (a plain measurement) the single column is ``value``. Rows whose every value
    is missing (no FLOPs without an example input, ...) are left out."""
    extra = dict(extra or {})
    cols: list[tuple[str, Any]] = []
    if before is None:
        cols.append(("value", after))
    else:
        cols += [("before", before), ("after", after)]
    cols += [(str(k), v) for k, v in extra.items()]
    models = [m for _, m in cols]
    acc_scale = accuracy_scale(*(_get(m, "accuracy") for m in models))

    specs = [s for s in METRICS if latency or s.deterministic]
    # other numbers the evaluator returned (loss, top-5, ...): shown as neutral rows
    eval_keys: list[str] = []
    for m in models:
        for k, v in (getattr(m, "eval_extra", None) or {}).items():
            if k not in eval_keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                eval_keys.append(k)
    for k in eval_keys:
        specs.append(MetricSpec(f"eval_{k}", f"eval {k}", format_number, "neutral", "delta"))

    rows = []
    for spec in specs:
        values = {}
        for col, m in cols:
            if spec.key.startswith("eval_") and spec not in METRICS:
                v = (getattr(m, "eval_extra", None) or {}).get(spec.key[5:]) if m is not None else None
            else:
                v = _get(m, spec.key)
            values[col] = v
        if all(_is_missing(v) for v in values.values()):
            continue
        if spec.key == "accuracy":
            texts = {c: format_accuracy(v, acc_scale) for c, v in values.items()}
        else:
            texts = {c: spec.fmt(v) for c, v in values.items()}
        change = None
        if before is not None:
            change = compute_change(spec, values["before"], values["after"], acc_scale)
            modes = (_latency_mode(before), _latency_mode(after))
            if spec.key == "latency_ms" and change.state != "na" and modes[0] != modes[1]:
                # e.g. deployed before, eager after (an early-exit model cannot be traced):
                # two different ways of running are not a speed-up or a slow-down of the step
                change = Change(f"not comparable ({modes[0]} vs {modes[1]})", "na", None)
        rows.append(MetricRow(spec, values, texts, change))
    return [c for c, _ in cols], rows


def metrics_table(before: Any, after: Any, extra: dict | None = None, *, raw: bool = False,
                  latency: bool = True) -> pd.DataFrame:
    """The before/after table, one row a metric.

    Columns ``before``, ``after``, ``ratio`` and one per model in ``extra`` (e.g. a distillation
    teacher). ``ratio`` reads as an improvement when > 1 ("8.20× smaller", "10.0× fewer",
    "1.30× faster"); for accuracy and sparsity it is the change in points ("-0.30 pts").
    With ``before=None`` the only value column is ``value``.

    By default the cells are formatted strings; ``raw=True`` gives the numbers (ratio = before /
    after, or the change in points). ``latency=False`` leaves latency out (deterministic table).
    """
    cols, rows = metric_rows(before, after, extra, latency=latency)
    records = []
    for r in rows:
        rec = {}
        for c in cols:
            if c in ("before", "after", "value"):
                rec[c] = r.values[c] if raw else r.texts[c]
        if r.change is not None:
            rec["ratio"] = r.change.value if raw else r.change.text
        for c in cols:
            if c not in ("before", "after", "value"):
                rec[c] = r.values[c] if raw else r.texts[c]
        records.append(rec)
    order = [c for c in ("before", "after", "value") if c in cols]
    if before is not None:
        order.append("ratio")
    order += [c for c in cols if c not in ("before", "after", "value")]
    df = pd.DataFrame.from_records(records, index=[r.spec.label for r in rows], columns=order)
    df.index.name = "metric"
    return df


# ------------------------------------------------------------------------------- layer rows

_TIMING_WORDS = ("latency", "time", "second", "duration", "elapsed", "_ms", "timestamp", "date",
                 "device")


def is_timing_key(key: str) -> bool:
    """Columns that change from run to run or machine to machine: kept out of text reprs."""
    k = str(key).lower()
    return any(w in k for w in _TIMING_WORDS) or k == "ms"


_PCT_WORDS = ("sparsity", "density", "energy", "kept", "pruned", "fraction", "share", "left")


def format_layer_value(key: str, v: Any) -> str:
    """One value of a table column on its own (prefer :func:`format_column`, which gives a whole
    column one format)."""
    return format_column(key, [v])[0]


# Metrics and history fields in plain English (a step's own per-layer and table columns keep
# their keys: they are what ``report.layers_table()`` and ``result.tables`` are indexed by)
_LABELS = {"nonzero_params": "nonzero params", "dense_bytes": "dense bytes",
           "packed_bytes": "packed bytes", "flops": "FLOPs", "sparse_flops": "sparse FLOPs",
           "latency_ms": "latency", "size_ratio": "smaller", "accuracy_delta": "accuracy change",
           "dense_bytes_by_dtype": "dense bytes by dtype", "eval_extra": "other eval numbers",
           "batch_size": "batch size", "latency_mode": "latency mode"}


def column_label(key: Any) -> str:
    """A column name for the text view: a :class:`~nbcompress.metrics.Metrics` field in plain
    English (``nonzero_params`` -> ``nonzero params``, ``sparse_flops`` -> ``sparse FLOPs``);
    any other column keeps its key."""
    return _LABELS.get(str(key), str(key))


def _numeric_cell(v: Any) -> bool:
    if isinstance(v, bool) or _is_missing(v):
        return False
    if isinstance(v, (int, float)):
        return True
    try:
        import numpy as np

        return isinstance(v, np.number) and not isinstance(v, np.bool_)
    except ImportError:  # pragma: no cover
        return False


def _percent_kind(k: str) -> str | None:
    """"accuracy" (2 decimals, fraction or already percent), "fraction" (1 decimal) or None."""
    if "accuracy" in k and not any(w in k for w in ("drop", "delta", "change", "points", "pts")):
        return "accuracy"
    if any(w in k for w in _PCT_WORDS):
        return "fraction"
    return None


def format_column(key: Any, values: list) -> list[str]:
    """A table column formatted one way for every row: a column of fractions reads ``53.6%`` in
    every row (never ``53.6%`` in one and ``0.9778`` in the next), byte and FLOP counts in their
    units, other floats with the same number of decimals, missing values blank."""
    k = str(key).lower()
    nums = [float(v) for v in values if _numeric_cell(v)]
    if not nums:
        return ["" if _is_missing(v) else format_number(v) for v in values]

    def each(fmt):
        return [fmt(float(v)) if _numeric_cell(v) else ("" if _is_missing(v) else format_number(v))
                for v in values]

    relative = any(w in k for w in ("fraction", "share", "ratio", "density"))
    if "bytes" in k and not relative:
        return each(format_bytes)
    if "flops" in k and not relative:
        return each(format_flops)
    if is_timing_key(k) and ("ms" in k.split("_") or "latency" in k):
        return each(format_ms)
    kind = _percent_kind(k)
    if not any(isinstance(v, float) or type(v).__name__.startswith("float")
               for v in values if _numeric_cell(v)):
        kind = None                        # counts (kept: 23,550), not fractions
    if kind == "accuracy":
        scale = accuracy_scale(*nums)
        return each(lambda v: f"{v * scale:.2f}%")
    if kind == "fraction" and all(-1e-9 <= v <= 1 + 1e-9 for v in nums):
        return each(lambda v: f"{100 * v:.1f}%")
    if all(float(v).is_integer() and abs(v) < 1e15 for v in nums):
        return each(lambda v: f"{int(v):,}")
    big = max(abs(v) for v in nums)
    if big >= 1e6 or 0 < big < 1e-3:
        return each(lambda v: f"{v:.3e}")
    digits = 4 - (len(str(int(big))) if big >= 1 else 0)
    if big < 1:   # 4 significant digits of the largest value: 0.1995, 0.004406
        import math

        digits = 3 - math.floor(math.log10(big)) if big > 0 else 4
    digits = max(0, min(digits, 6))
    while digits > 1 and all(f"{v:.{digits}f}".endswith("0") for v in nums):
        digits -= 1                        # same decimals in every row, no needless zeros
    return each(lambda v: f"{v:.{digits}f}")


def layer_rows(result: Any = None, after: Any = None) -> tuple[list[str], list[dict], str]:
    """(columns, rows, source): the step's own per-layer detail when it has one
    (``result.layers``), else the per-layer measurement of ``after`` (``Metrics.layers``)."""
    src = list(getattr(result, "layers", None) or [])
    source = "step"
    if not src:
        src = list(getattr(after, "layers", None) or [])
        source = "metrics"
    if not src:
        return [], [], "none"
    cols: list[str] = []
    for row in src:
        for k in row:
            if k not in cols:
                cols.append(k)
    # drop columns that are empty in every row (e.g. bits of a float model)
    cols = [c for c in cols if any(not _is_missing(r.get(c)) for r in src)]
    if source == "metrics" and "flops" in cols:
        cols.remove("flops")
        cols.append("flops")
    return cols, src, source


def bar_key(cols: list[str], rows: list[dict]) -> str | None:
    """Which per-layer number to draw as a bar: bits when the layers have them, else sparsity."""
    for key in ("bits", "sparsity"):
        if key in cols and any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                               for r in rows):
            return key
    return None


# ------------------------------------------------------------------------------- plain text


def text_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None,
               indent: str = "") -> str:
    """A fixed-width table: two spaces between columns, numbers right-aligned."""
    right = right or set()
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return (indent + "  ".join(out)).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def _looks_numeric(texts: list[str]) -> bool:
    import re

    pat = re.compile(r"^[-+±≈]?[\d,.]+\s*(%|×|[kMGTP]?B|[kMGTP]?FLOPs| pts| ms)?$")
    vals = [t for t in texts if t not in ("", MISSING)]
    return bool(vals) and all(pat.match(t) for t in vals)


def layers_text(cols: list[str], rows: list[dict], limit: int = 40) -> str:
    cols = [c for c in cols if not is_timing_key(c)]
    shown = rows[:limit]
    columns = [format_column(c, [r.get(c) for r in shown]) for c in cols]
    body = [[col[i] for col in columns] for i in range(len(shown))]
    right = {i for i, c in enumerate(cols) if _looks_numeric([b[i] for b in body])}
    out = text_table([column_label(c) for c in cols], body, right, indent="  ")
    if len(rows) > limit:
        out += f"\n  ... {len(rows) - limit} more layers"
    return out


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 row"``, ``"3 rows"``."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def dataframe_text(df: Any, limit: int = 12, indent: str = "  ") -> str:
    """A small DataFrame (a step's extra table) as fixed-width text: plain-English headers, one
    number format per column, columns that change from run to run (times) left out, at most
    ``limit`` rows."""
    if not isinstance(df, pd.DataFrame):
        return indent + str(df)
    cols = [c for c in df.columns if not is_timing_key(c)]
    shown = df.head(limit)
    columns = [format_column(c, shown[c].tolist()) for c in cols]
    index = None
    if not isinstance(df.index, pd.RangeIndex):
        index = [str(i) for i in shown.index]
    body = [([index[i]] if index else []) + [col[i] for col in columns] for i in range(len(shown))]
    headers = ([str(df.index.name or "")] if index else []) + [column_label(c) for c in cols]
    off = 1 if index else 0
    right = {i + off for i in range(len(cols)) if _looks_numeric([b[i + off] for b in body])}
    out = text_table(headers, body, right, indent=indent)
    if len(df) > limit:
        out += f"\n{indent}... {plural(len(df) - limit, 'more row')}"
    return out


# --------------------------------------------------------------------------------- history

def wrap_args(text: str, width: int = 38) -> list[str]:
    """``args`` of a step split into lines of at most ``width`` characters between ``key=value``
    tokens, free text between words (a value is never cut: a token longer than ``width`` keeps
    a line of its own)."""
    import re

    text = " ".join(str(text or "").split())
    if len(text) <= width:
        return [text]
    import textwrap

    tokens = []
    for tok in re.split(r"\s+(?=[A-Za-z_][\w.\-]*=)", text):
        # free text (no key=value): split between words, never inside one
        tokens += textwrap.wrap(tok, width, break_long_words=False, break_on_hyphens=False) or [tok]
    lines: list[str] = []
    for tok in tokens:
        if lines and len(lines[-1]) + 1 + len(tok) <= width:
            lines[-1] += " " + tok
        else:
            lines.append(tok)
    return lines


# (column, label, formatter kind) of the history text table, in order
HISTORY_TEXT_COLS = (("version", "v"), ("technique", "technique"), ("args", "args"),
                     ("params", "params"), ("nonzero_params", "nonzero"),
                     ("dense_bytes", "dense"), ("packed_bytes", "packed"), ("flops", "FLOPs"),
                     ("sparse_flops", "sparse FLOPs"), ("latency_ms", "latency"),
                     ("accuracy", "accuracy"), ("size_ratio", "smaller"),
                     ("exported", "exported"), ("agreement", "top-1 agreement"))


def history_text(df: Any, *, columns: tuple[str, ...] | None = None, timings: bool = False,
                 args_width: int = 38, indent: str = "") -> str:
    """The history DataFrame as fixed-width text: plain-English headers, every number formatted,
    long ``args`` wrapped between ``key=value`` tokens, the current version marked. ``columns``:
    the keys to show (default all that have a value); ``timings``: include latency (left out by
    default: it changes from run to run)."""
    if df is None or len(df) == 0:
        return indent + "(no history)"
    keys = [k for k, _ in HISTORY_TEXT_COLS if k in df.columns
            and (columns is None or k in columns)
            and (timings or not is_timing_key(k))
            and (k == "version" or not df[k].isna().all())]
    labels = dict(HISTORY_TEXT_COLS)
    texts: dict[str, list[str]] = {}
    for k in keys:
        vals = df[k].tolist()
        if k == "accuracy":
            scale = accuracy_scale(*vals)
            texts[k] = [format_accuracy(v, scale) for v in vals]
        elif k == "size_ratio":
            texts[k] = [MISSING if _is_missing(v) else f"{float(v):.1f}×" for v in vals]
        elif k in ("technique", "args", "version", "exported"):
            texts[k] = ["" if _is_missing(v) else str(v) for v in vals]
        elif k == "agreement":
            texts[k] = [MISSING if _is_missing(v) else format_pct(v) for v in vals]
        else:
            texts[k] = [MISSING if not _numeric_cell(v) else c
                        for v, c in zip(vals, format_column(k, vals))]
    current = df["current"].tolist() if "current" in df.columns else [False] * len(df)
    body = []
    for i in range(len(df)):
        arg_lines = wrap_args(texts["args"][i], args_width) if "args" in texts else [""]
        first = [texts[k][i] if k != "args" else arg_lines[0] for k in keys]
        if bool(current[i]) and "current" in df.columns:
            first.append("← current")
        body.append(first)
        for more in arg_lines[1:]:
            body.append([more if k == "args" else "" for k in keys])
    headers = [labels[k] for k in keys]
    if any(len(r) > len(keys) for r in body):
        headers.append("")
        body = [r + [""] * (len(headers) - len(r)) for r in body]
    right = {i for i, k in enumerate(keys) if k not in ("technique", "args")}
    return text_table(headers, body, right, indent=indent)
