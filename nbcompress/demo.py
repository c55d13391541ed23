"""``python -m nbcompress demo``: the main job on the embedded data, in a terminal.

Trains the reference LeNet-300-100 on the embedded MNIST subset, measures it, applies each
technique the package has as an undoable step, and prints the before/after table.
"""
from __future__ import annotations

import argparse
import io
import time

import torch

from . import History, load, save
from .data import lenet_300_100, mnist_loaders, train_reference


def demo_steps(train_loader, test_loader):
    """(label, StepConfig) pairs, applied in order to the trained model. Each technique adds its
    step here when it lands."""
    steps = []
    return steps


def format_table(df) -> str:
    from .report import format_bytes, format_count, format_flops

    cols = []
    for _, r in df.iterrows():
        cols.append([
            str(r["version"]), str(r["technique"]), str(r["args"])[:38],
            format_count(r["params"]), format_count(r["nonzero_params"]),
            format_bytes(r["packed_bytes"]), format_flops(r["flops"]),
            "-" if r["accuracy"] is None or r["accuracy"] != r["accuracy"] else f"{100 * r['accuracy']:.2f}%",
            "-" if r.get("size_ratio") is None or r["size_ratio"] != r["size_ratio"] else f"{r['size_ratio']:.1f}x",
        ])
    head = ["v", "technique", "args", "params", "nonzero", "packed", "FLOPs", "accuracy", "smaller"]
    widths = [max(len(h), *(len(c[i]) for c in cols)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cols]
    return "\n".join(lines)


def run(epochs: int = 20, seed: int = 0, progress: bool = False) -> History:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_loader, test_loader = mnist_loaders(seed=seed)
    print(f"nbcompress demo: LeNet-300-100 on the embedded MNIST subset "
          f"({len(train_loader.dataset)} train / {len(test_loader.dataset)} test digits)")
    model = lenet_300_100(seed=seed)
    hist = History(model, name="model", evaluator=test_loader)
    train_reference(model, train_loader, epochs=epochs, seed=seed, progress=progress)
    print(f"trained {epochs} epochs in {time.perf_counter() - t0:.1f} s")
    print(hist.measure_report())
    for label, config in demo_steps(train_loader, test_loader):
        print(f"\n== {label}")
        report = hist.apply(config, progress=progress)
        print(report)
    buf = io.BytesIO()
    save(hist.current, buf)
    buf.seek(0)
    restored = load(buf)
    x = next(iter(test_loader))[0][:8]
    with torch.no_grad():
        same = torch.equal(hist.current.eval()(x), restored.eval()(x))
    print(f"\nsaved with nbcompress.save: {buf.getbuffer().nbytes:,} bytes; "
          f"reloaded outputs identical: {same}")
    print("\nHistory (%compress_history model):")
    print(format_table(hist.table()))
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return hist


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbcompress demo", description=__doc__)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    run(epochs=a.epochs, seed=a.seed, progress=a.progress)
    return 0
