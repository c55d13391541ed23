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


_PCT_WORDS = ("sparsity", "density", "energy", "kept", "pruned", "fraction")


def format_layer_value(key: str, v: Any) -> str:
    k = str(key).lower()
    if _is_missing(v):
        return ""
    if isinstance(v, float) and any(w in k for w in _PCT_WORDS) and -1e-9 <= v <= 1 + 1e-9:
        return format_pct(v, 1)
    if "bytes" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format_bytes(v)
    if "flops" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format_flops(v)
    return format_number(v)


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
    body = [[format_layer_value(c, r.get(c)) for c in cols] for r in shown]
    right = {i for i, c in enumerate(cols) if _looks_numeric([b[i] for b in body])}
    out = text_table([str(c) for c in cols], body, right, indent="  ")
    if len(rows) > limit:
        out += f"\n  ... {len(rows) - limit} more layers"
    return out
