"""What the history's integrity costs (issue 13): immutable version records and edit detection.

Since versions are immutable records, a step pays, on top of the technique: one host copy of the
result (the record, ``history.host_copy``) and fingerprints of the live model
(``history.state_fingerprint``: storage, version counter and a wrap-around bit sum of every tensor)
before and after. An edit the user made in place costs one more fingerprint, a bit-exact comparison
with the record and a host copy (the "edited" version). Undo / redo hand out a fresh copy of the
record. Spilling past the host budget is one ``torch.save`` of the record.

This script times those pieces on MLPs of 2048x2048 Linear layers at the sizes users have, next to
the technique they accompany (``nbcompress.prune(model, 0.5)``, the plain API: global magnitude
pruning on a private copy), one thread, median of ``--repeats`` runs:

    python benchmarks/bench_history.py                    # 25M and 110M parameters
    python benchmarks/bench_history.py --sizes 25m,110m,1b --repeats 3

(1b: 239 layers, 4 GB of fp32; needs about 14 GB of memory; the prune column is skipped there.)
Prints a table and writes benchmarks/results/history.json. (Measuring a version, ``measure``:
FLOPs, packed bytes, is the scale issue's subject and is not timed here.)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nbcompress  # noqa: E402
from nbcompress.history import History, _same_state, host_copy, state_fingerprint  # noqa: E402

SIZES = {"25m": 6, "110m": 26, "1b": 239}     # layers of 2048x2048 (+ bias)


def mlp(layers: int) -> nn.Module:
    torch.manual_seed(0)
    with torch.device("cpu"):
        return nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(layers)])


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_size(label: str, repeats: int, with_prune: bool) -> dict:
    model = mlp(SIZES[label])
    params = sum(p.numel() for p in model.parameters())
    nbytes = params * 4
    row = {"size": label, "params": params, "bytes": nbytes}
    row["fingerprint_s"] = median_seconds(lambda: state_fingerprint(model), repeats)
    row["host_copy_s"] = median_seconds(lambda: host_copy(model), repeats)
    copy_ = host_copy(model)
    row["compare_s"] = median_seconds(lambda: _same_state(model, copy_), repeats)
    del copy_
    h = History(model, measure_latency=False, remember_init=False)
    row["sync_unchanged_s"] = median_seconds(h.sync, repeats)

    def edit_then_sync():
        with torch.no_grad():
            h.current[0].weight[0, 0] += 1.0      # the user's in-place edit
        assert h.sync()
    row["sync_edited_s"] = median_seconds(edit_then_sync, repeats)
    h.close()
    del h
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.pt"
        row["spill_s"] = median_seconds(lambda: torch.save(model, path), repeats)
    # integrity bookkeeping of one step: fingerprint before (sync) + record copy + fingerprint after
    row["step_integrity_s"] = 2 * row["fingerprint_s"] + row["host_copy_s"]
    if with_prune:
        row["prune_api_s"] = median_seconds(lambda: nbcompress.prune(model, 0.5), repeats)
        row["integrity_vs_prune"] = row["step_integrity_s"] / row["prune_api_s"]
    row["fingerprint_gb_per_s"] = nbytes / row["fingerprint_s"] / 1e9
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="25m,110m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "history.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for label in args.sizes.split(","):
        rows.append(run_size(label, args.repeats, with_prune=label != "1b"))
        r = rows[-1]
        print(f"{r['size']:>5} {r['params'] / 1e6:7.1f}M params  fingerprint {r['fingerprint_s']:.3f} s "
              f"({r['fingerprint_gb_per_s']:.1f} GB/s)  host copy {r['host_copy_s']:.3f} s  "
              f"compare {r['compare_s']:.3f} s  sync {r['sync_unchanged_s']:.3f} s / edited "
              f"{r['sync_edited_s']:.3f} s  spill {r['spill_s']:.3f} s  step integrity "
              f"{r['step_integrity_s']:.3f} s"
              + (f"  prune {r['prune_api_s']:.2f} s  ratio {r['integrity_vs_prune']:.2f}"
                 if "prune_api_s" in r else ""), flush=True)
    out = {"benchmark": "history integrity cost", "threads": 1, "repeats": args.repeats,
           "torch": torch.__version__, "machine": platform.machine(),
           "python": platform.python_version(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
