"""``python -m nbcompress demo``: the main job on the embedded data, in a terminal.

Trains the reference LeNet-300-100 on the embedded MNIST subset, measures it, applies each
technique the package has as an undoable step, and prints the before/after table.
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import time

import torch

from . import History, export, load, save
from .data import lenet_300_100, mnist_loaders, train_reference


def demo_pipelines(train_loader, test_loader):
    """{history name: [(label, StepConfig), ...]}: each technique's own demo step, in two
    pipelines over the same trained model: Deep-Compression style (prune, distill back from the
    original, int8) and architecture (low-rank, then early exits)."""
    import importlib

    from .core import DEMOS

    importlib.import_module("nbcompress.techniques")      # registers every technique

    pipelines: dict[str, list] = {}
    for demo, pipeline in DEMOS.values():
        pipelines.setdefault(pipeline, []).append(demo(train_loader, test_loader))
    return pipelines


DEMO_COLUMNS = ("version", "technique", "args", "params", "nonzero_params", "packed_bytes",
                "flops", "sparse_flops", "latency_ms", "accuracy", "size_ratio")


def format_table(df, timings: bool = True) -> str:
    """The history as the demo prints it (see :func:`nbcompress.report.tables.history_text`):
    plain-English headers, long args wrapped between ``key=value`` tokens (never cut inside a
    value), latency included unless ``timings=False``."""
    from .report.tables import history_text

    return history_text(df, columns=DEMO_COLUMNS, timings=timings)


def run(epochs: int = 20, seed: int = 0, progress: bool = False) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_loader, test_loader = mnist_loaders(seed=seed)
    print(f"nbcompress demo: LeNet-300-100 on the embedded MNIST subset "
          f"({len(train_loader.dataset)} train / {len(test_loader.dataset)} test digits)")
    model = lenet_300_100(seed=seed)
    init = copy.deepcopy(model.state_dict())
    train_reference(model, train_loader, epochs=epochs, seed=seed, progress=progress)
    print(f"trained {epochs} epochs in {time.perf_counter() - t0:.1f} s")
    histories = {}
    for name, steps in demo_pipelines(train_loader, test_loader).items():
        h = History(copy.deepcopy(model), name=name, evaluator=test_loader, remember_init=False)
        h.init_state = init
        histories[name] = h
        print(f"\n##### {name}: " + " -> ".join(label for label, _ in steps))
        print(h.measure_report())
        for label, config in steps:
            print(f"\n== {label}")
            print(h.apply(config, progress=progress))
    hist = histories["model"]
    buf = io.BytesIO()
    save(hist.current, buf)
    buf.seek(0)
    restored = load(buf)
    x = next(iter(test_loader))[0][:8]
    with torch.no_grad():
        same = torch.equal(hist.current.eval()(x), restored.eval()(x))
    print(f"\nsaved with nbcompress.save: {buf.getbuffer().nbytes:,} bytes; "
          f"reloaded outputs identical: {same}")
    with tempfile.TemporaryDirectory() as folder:     # %export model model.onnx --check ...
        print("\n" + str(export(hist.current, os.path.join(folder, "model.onnx"),
                                example_input=x[:1], check=test_loader)))
    for name, h in histories.items():
        print(f"\nHistory (%compress_history {name}):")
        print(format_table(h.table()))
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return histories


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbcompress demo", description=__doc__)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    run(epochs=a.epochs, seed=a.seed, progress=a.progress)
    return 0
