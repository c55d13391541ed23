"""How the benchmarks print: a line at a time (flushed), and plain aligned tables."""
from __future__ import annotations


def log(*a):
    print(*a, flush=True)


def table(headers, rows):
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    log("  " + "  ".join(str(h).ljust(w[i]) for i, h in enumerate(headers)))
    for r in rows:
        log("  " + "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
