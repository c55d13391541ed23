"""Benchmark for %earlyexit (issue 9) on the embedded MNIST subset.

Network: the sequential CNN conv16-conv16-pool-conv32-conv32-pool-conv64-conv64-GAP-linear, each
conv a Conv2d 3x3 + BatchNorm + ReLU block (``nbcompress.techniques.earlyexit.sequential_cnn(16)``),
trained on 3,500 of the 4,000 training digits (Adam, cosine schedule); the other 500 are a
validation set.
Exits: the defaults of ``nbcompress.early_exit`` (a head after every conv block but the last:
average-pool to 4x4 + linear, trained 5 epochs on the 3,500 digits with the backbone frozen,
distilled from the final output at T=4).

Target (issue 9): at least 50% fewer average FLOPs per sample at most 0.5 points below the full
network's accuracy on the 1,000 test digits.

The threshold is chosen without looking at the test digits: the cheapest threshold of the sweep
grid whose predictions agree with the full network's on >= 99.5% of the validation digits (an
exit can only lose accuracy where it disagrees with the full network). The default threshold
(0.95) is reported too. FLOPs are what ``nbcompress.measure`` reports: ``torch.utils.flop_counter``
on the real batched early-exit run over the test digits, averaged per sample (heads included).

Latency (CPU, one thread, the two models alternated, median of --runs runs after warm-up):
the first 300 test digits in batches of 100, and the first 60 one at a time.

    python benchmarks/bench_earlyexit.py                 # 3 seeds, 10 backbone epochs
    python benchmarks/bench_earlyexit.py --seeds 1 --epochs 8 --runs 30

Prints a table and writes benchmarks/results/earlyexit.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _timing import alternated  # noqa: E402  (benchmarks/_timing.py: the one timing protocol)
from nbcompress import fit, measure  # noqa: E402
from nbcompress.data import mnist_arrays  # noqa: E402
from nbcompress.techniques.earlyexit import (DEFAULT_THRESHOLD, early_exit,  # noqa: E402
                                             sequential_cnn, threshold_sweep)

AGREEMENT = 0.995       # validation agreement the chosen threshold must keep
TARGET_SAVING = 0.50
TARGET_DROP = 0.005


def log(*a):
    print(*a, flush=True)


def loaders(seed: int, n_val: int = 500):
    """(train, val, test) loaders: a fixed stratified hold-out of the 4,000 training digits."""
    x_tr, y_tr, x_te, y_te = mnist_arrays()
    g = torch.Generator().manual_seed(1234)
    val_idx = []
    for c in range(10):
        idx = (y_tr == c).nonzero().squeeze(1)
        val_idx.append(idx[torch.randperm(len(idx), generator=g)[: n_val // 10]])
    val_idx = torch.cat(val_idx)
    keep = torch.ones(len(y_tr), dtype=torch.bool)
    keep[val_idx] = False
    gs = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_tr[keep], y_tr[keep]), batch_size=64, shuffle=True,
                       generator=gs)
    val = DataLoader(TensorDataset(x_tr[val_idx], y_tr[val_idx]), batch_size=500)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=500)
    return train, val, test


def timed(models: dict, inputs: list, runs: int) -> dict:
    """Median seconds to run every input through each model, the models alternated."""
    lat = alternated(models, inputs, runs=runs, warmup=3)
    return {k: v["wall_ms"] / 1e3 for k, v in lat.items()}


def run_seed(seed: int, epochs: int, runs: int) -> dict:
    train, val, test = loaders(seed)
    t0 = time.perf_counter()
    cnn = sequential_cnn(16, seed=seed)
    fit(cnn, train, epochs=epochs, lr=2e-3, scheduler="cosine", seed=seed, progress=False)
    cnn.eval()
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    ee = early_exit(cnn, train, seed=seed)
    t_heads = time.perf_counter() - t0

    val_sweep = threshold_sweep(ee, val)
    ok = val_sweep[val_sweep["agreement"] >= AGREEMENT]
    chosen = float(ok.sort_values("avg_flops")["threshold"].iloc[0]) if len(ok) else 1.0

    x1 = next(iter(test))[0][:1]
    dense = measure(cnn, x1, test, latency=False)
    out = {"seed": seed, "train_s": round(t_train, 1), "heads_s": round(t_heads, 1),
           "full": {"accuracy": dense.accuracy, "flops": dense.flops},
           "val_full_accuracy": float(val_sweep["accuracy"].iloc[-1]), "chosen_threshold": chosen,
           "exits": list(ee.exit_names)}
    for label, thr in (("default", DEFAULT_THRESHOLD), ("chosen", chosen)):
        ee.threshold = thr
        m = measure(ee, x1, test, latency=False)
        out[label] = {"threshold": thr, "accuracy": m.accuracy, "flops": m.flops,
                      "flops_saving": 1 - m.flops / dense.flops,
                      "accuracy_drop_pts": 100 * (dense.accuracy - m.accuracy),
                      "shares": {k: round(v, 4) for k, v in m.eval_extra.items()}}
    ee.threshold = chosen
    test_sweep = threshold_sweep(ee, test)
    out["test_sweep"] = test_sweep.round(5).to_dict(orient="list")

    torch.set_num_threads(1)
    x_all = torch.cat([x for x, _ in test])
    batches = [x_all[i:i + 100] for i in range(0, 300, 100)]
    singles = [x_all[i:i + 1] for i in range(60)]
    t_b = timed({"full": cnn, "early exit": ee}, batches, runs)
    t_s = timed({"full": cnn, "early exit": ee}, singles, runs)
    torch.set_num_threads(2)
    out["latency"] = {"batched_300_ms": {k: 1e3 * v for k, v in t_b.items()},
                      "single_60_ms": {k: 1e3 * v for k, v in t_s.items()},
                      "batched_speedup": t_b["full"] / t_b["early exit"],
                      "single_speedup": t_s["full"] / t_s["early exit"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="backbone training epochs")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "earlyexit.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    results = []
    for seed in range(a.seeds):
        r = run_seed(seed, a.epochs, a.runs)
        results.append(r)
        log(f"seed {seed}: full {100 * r['full']['accuracy']:.2f}% "
            f"{r['full']['flops'] / 1e6:.2f} MFLOPs; chosen threshold {r['chosen_threshold']:g} "
            f"(train {r['train_s']} s, heads {r['heads_s']} s)")

    head = ["seed", "threshold", "full acc", "exit acc", "drop pts", "avg MFLOPs", "saving",
            "batched x", "single x", "target"]
    lines = []
    for r in results:
        for label in ("default", "chosen"):
            e = r[label]
            met = e["flops_saving"] >= TARGET_SAVING and e["accuracy_drop_pts"] <= 100 * TARGET_DROP
            lines.append([str(r["seed"]), f"{e['threshold']:g} ({label})",
                          f"{100 * r['full']['accuracy']:.2f}%", f"{100 * e['accuracy']:.2f}%",
                          f"{e['accuracy_drop_pts']:.2f}", f"{e['flops'] / 1e6:.2f}",
                          f"{100 * e['flops_saving']:.1f}%",
                          f"{r['latency']['batched_speedup']:.2f}" if label == "chosen" else "",
                          f"{r['latency']['single_speedup']:.2f}" if label == "chosen" else "",
                          "met" if met else "MISSED"])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    log("\n" + "  ".join(h.ljust(w) for h, w in zip(head, widths)))
    log("  ".join("-" * w for w in widths))
    for l in lines:
        log("  ".join(c.ljust(w) for c, w in zip(l, widths)))

    summary = {}
    for label in ("default", "chosen"):
        summary[label] = {
            "mean_flops_saving": statistics.mean(r[label]["flops_saving"] for r in results),
            "mean_accuracy_drop_pts": statistics.mean(r[label]["accuracy_drop_pts"]
                                                      for r in results),
            "seeds_meeting_target": sum(r[label]["flops_saving"] >= TARGET_SAVING and
                                        r[label]["accuracy_drop_pts"] <= 100 * TARGET_DROP
                                        for r in results)}
    log(f"\nmean over {len(results)} seeds: " + "; ".join(
        f"{k}: {100 * v['mean_flops_saving']:.1f}% fewer FLOPs, "
        f"{v['mean_accuracy_drop_pts']:.2f} pts below the full network, "
        f"target met on {v['seeds_meeting_target']}/{len(results)}" for k, v in summary.items()))
    log("latency (CPU, 1 thread, median of %d): batched speedup %s; one-at-a-time speedup %s" % (
        a.runs, ", ".join(f"{r['latency']['batched_speedup']:.2f}x" for r in results),
        ", ".join(f"{r['latency']['single_speedup']:.2f}x" for r in results)))
    payload = {"benchmark": "earlyexit", "issue": 9,
               "target": {"flops_saving_at_least": TARGET_SAVING,
                          "accuracy_drop_at_most_pts": 100 * TARGET_DROP},
               "setup": {"network": "sequential_cnn(16)", "backbone_epochs": a.epochs,
                         "train/val/test": [3500, 500, 1000], "agreement_for_threshold": AGREEMENT,
                         "timing_runs": a.runs},
               "summary": summary, "seeds": results,
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu": platform.processor() or platform.machine()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(payload, indent=1))
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
