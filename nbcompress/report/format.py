"""Human-readable numbers. Pure functions, deterministic, no imports beyond the standard library.

Every formatter takes ``None`` (a metric that was not measured) and returns ``"—"``.
"""
from __future__ import annotations

import math
from typing import Any

MISSING = "—"


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _scaled(value: float, units: list[str], base: float, fmt) -> str:
    """Pick the unit so that the formatted mantissa stays below ``base`` after rounding."""
    v = float(value)
    sign = "-" if v < 0 else ""
    v = abs(v)
    i = 0
    while i < len(units) - 1 and v >= base:
        v /= base
        i += 1
    text = fmt(v, i)
    # rounding may carry over (999.96 kB -> "1000 kB"): move up one unit
    if i < len(units) - 1 and float(text) >= base:
        v /= base
        i += 1
        text = fmt(v, i)
    return f"{sign}{text} {units[i]}"


def format_bytes(n: int | float | None) -> str:
    """Decimal units, three significant digits: ``"512 B"``, ``"5.2 kB"``, ``"1.07 MB"``."""
    if _is_missing(n):
        return MISSING
    return _scaled(n, ["B", "kB", "MB", "GB", "TB"], 1000.0,
                   lambda v, i: f"{v:.0f}" if i == 0 else _sig3(v))


def _sig3(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.2f}".rstrip("0").rstrip(".")


def format_count(n: int | float | None) -> str:
    """Thousands separators: ``"266,610"``."""
    if _is_missing(n):
        return MISSING
    if isinstance(n, float) and not n.is_integer():
        return f"{n:,.2f}"
    return f"{int(n):,}"


def format_flops(n: int | float | None) -> str:
    """One decimal in the largest fitting unit: ``"532.4 kFLOPs"``, ``"1.2 MFLOPs"``, ``"4.1 GFLOPs"``."""
    if _is_missing(n):
        return MISSING
    return _scaled(n, ["FLOPs", "kFLOPs", "MFLOPs", "GFLOPs", "TFLOPs", "PFLOPs"], 1000.0,
                   lambda v, i: f"{v:.0f}" if i == 0 else f"{v:.1f}")


def format_pct(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage: ``format_pct(0.9453) == "94.53%"``."""
    if _is_missing(x):
        return MISSING
    return f"{100.0 * float(x):.{digits}f}%"


def accuracy_scale(*values: float | None) -> float:
    """Accuracy may be given as a fraction (0.9453) or in percent (94.53): 100 when every
    measured value is within [0, 1] (a fraction), else 1."""
    vals = [float(v) for v in values if not _is_missing(v)]
    return 100.0 if all(-1e-9 <= v <= 1.0 + 1e-9 for v in vals) else 1.0


def format_accuracy(x: float | None, scale: float | None = None, digits: int = 2) -> str:
    """``"94.53%"`` whether ``x`` is a fraction or already in percent."""
    if _is_missing(x):
        return MISSING
    s = accuracy_scale(x) if scale is None else scale
    return f"{float(x) * s:.{digits}f}%"


def format_ms(x: float | None) -> str:
    if _is_missing(x):
        return MISSING
    x = float(x)
    if x >= 100:
        return f"{x:.0f} ms"
    if x >= 1:
        return f"{x:.2f} ms"
    return f"{x * 1000:.0f} µs" if x < 0.01 else f"{x:.3f} ms"


def format_number(x: Any) -> str:
    """A generic value for tables: ints with separators, floats with 4 significant digits."""
    if _is_missing(x):
        return MISSING
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if x.is_integer() and abs(x) < 1e15:
            return f"{int(x):,}"
        if 1e-3 <= abs(x) < 1e6:
            return f"{x:.4g}"
        return f"{x:.3e}"
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        try:
            return format_number(x.item())
        except (TypeError, ValueError):
            pass
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(format_number(v) for v in x) + "]"
    return str(x)


def format_ratio(r: float) -> str:
    """``"10.0×"``, ``"8.20×"``, ``"125×"``: three significant digits."""
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    return f"{r:.2f}×"
