"""The one way the benchmarks time models on the CPU.

One thread, warm-up, then the models alternated run by run (so a burst of load elsewhere on the
machine hits them alike), medians. Each run also records the thread's CPU time
(``time.thread_time``), which leaves out the time the process waits for a core and so stays
meaningful on a loaded machine where wall-clock medians do not.
"""
from __future__ import annotations

import statistics
import time

import torch


def alternated(models: dict, inputs, *, runs: int, warmup: int = 5, min_seconds: float = 0.0,
               max_runs: int | None = None) -> dict:
    """``{name: {"wall_ms": median, "cpu_ms": median}}`` of one run of each model over
    ``inputs`` (a tensor, or a list of tensors run one after the other), under
    ``torch.inference_mode`` with one thread (the thread count is restored after). At least
    ``runs`` rounds; more, up to ``max_runs``, until ``min_seconds`` have passed (short forwards
    on a busy machine need many samples for a stable median)."""
    batches = inputs if isinstance(inputs, list) else [inputs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    try:
        for m in models.values():
            m.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                for m in models.values():
                    for x in batches:
                        m(x)
            start, n = time.perf_counter(), 0
            while n < runs or (n < (max_runs or runs)
                               and time.perf_counter() - start < min_seconds):
                for k, m in models.items():
                    w0, c0 = time.perf_counter(), time.thread_time()
                    for x in batches:
                        m(x)
                    cpu[k].append((time.thread_time() - c0) * 1e3)
                    wall[k].append((time.perf_counter() - w0) * 1e3)
                n += 1
    finally:
        torch.set_num_threads(threads)
    return {k: {"wall_ms": statistics.median(wall[k]), "cpu_ms": statistics.median(cpu[k])}
            for k in models}
