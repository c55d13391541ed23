"""Compression records on the classic MNIST LeNets, in real file bytes (issue 21).

The whole chain runs through the magics in a real IPython shell, as a user types it:

    %nbcompress net --eval test_loader
    %prune net --learned --finetune train_loader --learn-epochs L --kl-weight K --epochs F
    %quantize net --mode cluster --bits B --huffman --qat train_loader --epochs Q

and the result is measured as the length of the file ``nbcompress.save`` writes, against the
file of the dense fp32 model (the same writer, no compression to do). A per-layer table in the
manner of Han et al. 2016, Table 1 (weights kept, bits, bytes in the file) follows each model.

Published, for reference (full MNIST, parameter-count or bit-count estimates, never a file):
Deep Compression 40x / 39x, Dynamic Network Surgery 56x / 108x params, Sparse VD 68x / 280x
params, Bayesian Compression 419x bits (LeNet-5). Targets (issue 21): LeNet-300-100 >= 70x,
LeNet-5 >= 150x, each within 0.5 points of the dense accuracy, mean over 3 seeds. The papers'
LeNet-5 is Caffe's 20-50-500 network (431,080 weights; ``nbcompress.data.lenet5_caffe``), so that
is the one held to the target; the textbook 6-16-120-84 LeNet-5 (61,706 weights) is run and
reported beside it (``lenet5_small``), with no published row to compare against.

    python benchmarks/bench_records.py                   # the three models, seeds 0 1 2
    python benchmarks/bench_records.py --models lenet300 --seeds 0

Writes benchmarks/results/records.json.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("NBCOMPRESS_DISPLAY", "text")

from _tables import log, table  # noqa: E402
from nbcompress import evaluate, save  # noqa: E402
from nbcompress.data import (lenet5, lenet5_caffe, lenet_300_100, mnist_loaders,  # noqa: E402
                             train_reference)
from nbcompress.storage import breakdown  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"lenet300": 70.0, "lenet5": 150.0, "drop": 0.5}
# The papers' LeNet-5 is Caffe's (20-50-500, 431K weights: Han et al. 2016 Table 1, DNS, Sparse VD,
# Bayesian Compression), so the target and the published rows are for that one. The textbook
# 6-16-120-84 variant (61.7K weights, nbcompress.data.lenet5) has far less to remove; it is run
# and reported beside it, with no published row to compare against.
PUBLISHED = {"lenet300": {"Deep Compression (bits)": 40, "DNS (params)": 56,
                          "Sparse VD (params)": 68},
             "lenet5": {"Deep Compression (bits)": 39, "DNS (params)": 108,
                        "Sparse VD (params)": 280, "Bayesian Compression (bits)": 419},
             "lenet5_small": {}}
BUILD = {"lenet300": lenet_300_100, "lenet5": lenet5_caffe, "lenet5_small": lenet5}
TITLE = {"lenet300": "LeNet-300-100 (266,610 weights)",
         "lenet5": "LeNet-5, Caffe's / the papers' (431,080 weights)",
         "lenet5_small": "LeNet-5, textbook 6-16-120-84 (61,706 weights; no published row)"}


def file_bytes(model) -> int:
    return save(model, io.BytesIO())


def _shell():
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbcompress")
    return ip


def per_layer(dense: nn.Module, final: nn.Module) -> list[dict]:
    """Han et al.'s Table 1: per layer, weights, the share kept, bits per kept weight (the
    cluster codebook's), and the bytes each layer's tensors take in the file."""
    rows = {r["name"]: r for r in breakdown(final)}
    out = []
    for name, m in dense.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        q = final.get_submodule(name)
        w = q.weight.detach() if isinstance(q.weight, torch.Tensor) else q.weight
        kept = float((w != 0).float().mean())
        wb = rows.get(f"{name}.weight", {}).get("bytes", 0)
        bb = rows.get(f"{name}.bias", {}).get("bytes", 0)
        fp32 = 4 * sum(p.numel() for p in m.parameters())
        out.append({"layer": name, "weights": m.weight.numel(), "kept_pct": 100 * kept,
                    "bits": getattr(q, "nbc_bits", None) or 32,
                    "weight_bytes": wb, "bias_bytes": bb, "fp32_bytes": fp32,
                    "ratio": fp32 / max(1, wb + bb),
                    "encoding": rows.get(f"{name}.weight", {}).get("encoding")})
    return out


def run_one(ip, model_name: str, seed: int, a, train, test) -> dict:
    ns = ip.user_ns
    key = f"{model_name}_s{seed}_e{a.epochs}"
    dense = BUILD[model_name](seed=seed)
    cache = Path(a.cache_dir) / f"{key}.pt" if a.cache_dir else None
    if cache is not None and cache.exists():
        dense.load_state_dict(torch.load(cache, weights_only=True))
    else:
        train_reference(dense, train, epochs=a.epochs, seed=seed)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dense.state_dict(), cache)
    dense.eval()
    cfg = a.settings[model_name]
    ns.update(net=copy.deepcopy(dense), train_loader=train, test_loader=test)
    if getattr(ip, "_nbcompress_workspace", None) is not None:
        ip._nbcompress_workspace.clear()          # a fresh history for each run
    t0 = time.perf_counter()
    ip.run_line_magic("nbcompress", "net --eval test_loader")
    lines = [("prune", f"net --learned --finetune train_loader --learn-epochs {cfg['learn']} "
                       f"--kl-weight {cfg['kl']} --epochs {cfg['finetune']} --seed {seed} "
                       f"--no-progress"),
             ("quantize", f"net --mode cluster --bits {cfg['bits']} --huffman --qat train_loader "
                          f"--epochs {cfg['qat']} --seed {seed} --no-progress")]
    stages = {"dense fp32": (file_bytes(dense), evaluate(dense, test))}
    for magic, line in lines:
        ip.run_line_magic(magic, line)
        stages[f"%{magic}"] = (file_bytes(ns["net"]), evaluate(ns["net"], test))
    final = ns["net"]
    d_bytes, d_acc = stages["dense fp32"]
    f_bytes, f_acc = stages["%quantize"]
    return {"seed": seed, "seconds": round(time.perf_counter() - t0, 1),
            "magics": [f"%{m} {line}" for m, line in lines],
            "stages": {k: {"bytes": b, "accuracy": acc, "ratio": d_bytes / b}
                       for k, (b, acc) in stages.items()},
            "ratio": d_bytes / f_bytes, "bytes": f_bytes, "dense_bytes": d_bytes,
            "acc_dense": d_acc, "acc_final": f_acc, "drop_points": 100 * (d_acc - f_acc),
            "layers": per_layer(dense, final)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lenet300,lenet5,lenet5_small")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20, help="dense training epochs")
    p.add_argument("--cache-dir", default=None, help="keep the trained dense weights here")
    p.add_argument("--out", default=str(RESULTS / "records.json"))
    p.add_argument("--lenet300-kl", type=float, default=0.5)
    p.add_argument("--lenet5-kl", type=float, default=0.6)
    p.add_argument("--lenet5-learn", type=int, default=20)
    p.add_argument("--finetune", type=int, default=8, help="fine-tuning epochs after %%prune")
    a = p.parse_args(argv)
    ft = a.finetune
    a.settings = {"lenet300": {"learn": 10, "kl": a.lenet300_kl, "finetune": ft, "bits": 5,
                               "qat": 2},
                  "lenet5": {"learn": a.lenet5_learn, "kl": a.lenet5_kl, "finetune": ft,
                             "bits": 5, "qat": 2},
                  "lenet5_small": {"learn": 15, "kl": 1.0, "finetune": ft, "bits": 5, "qat": 2}}
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    train, test = mnist_loaders()
    ip = _shell()
    # models not run this time keep their last results (the file holds every model's)
    prev = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    out = {k: v for k, v in prev.items() if k in BUILD}
    out.update({"env": {"torch": torch.__version__, "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d"),
                        "data": "embedded MNIST 4,000 / 1,000"},
                "settings": {**prev.get("settings", {}),
                             **{k: a.settings[k] for k in a.models.split(",")}},
                "targets": TARGETS})
    for name in a.models.split(","):
        log(f"\n== {TITLE[name]}: learned sparsity -> cluster {a.settings[name]['bits']} bits + QAT -> "
            f"Huffman, through the magics")
        runs = [run_one(ip, name, int(s), a, train, test) for s in a.seeds.split(",")]
        table(["seed", "dense", "after %prune", "after %quantize", "acc dense", "acc final",
               "drop pts"],
              [[r["seed"], f"{r['dense_bytes']:,} B",
                f"{r['stages']['%prune']['bytes']:,} B ({r['stages']['%prune']['ratio']:.1f}x)",
                f"{r['bytes']:,} B ({r['ratio']:.1f}x)", f"{100 * r['acc_dense']:.2f}",
                f"{100 * r['acc_final']:.2f}", f"{r['drop_points']:+.2f}"] for r in runs])
        log(f"  per layer (seed {runs[0]['seed']}), as Han et al. 2016 Table 1:")
        table(["layer", "weights", "kept %", "bits", "weight B", "bias B", "ratio", "encoding"],
              [[x["layer"], f"{x['weights']:,}", f"{x['kept_pct']:.2f}", x["bits"],
                f"{x['weight_bytes']:,}", f"{x['bias_bytes']:,}", f"{x['ratio']:.1f}x",
                x["encoding"]] for x in runs[0]["layers"]])
        ratio = statistics.mean(r["ratio"] for r in runs)
        drop = statistics.mean(r["drop_points"] for r in runs)
        target = TARGETS.get(name)
        met = None if target is None else (ratio >= target and round(drop, 6) <= TARGETS["drop"])
        pub = ", ".join(f"{k} {v}x" for k, v in PUBLISHED[name].items()) or "none"
        verdict = ("no target" if target is None else
                   f"target {target:g}x within {TARGETS['drop']} pts: {'met' if met else 'NOT met'}")
        log(f"  mean {ratio:.1f}x smaller (min {min(r['ratio'] for r in runs):.1f}x), drop "
            f"{drop:+.2f} pts; {verdict}   (published: {pub})")
        out[name] = {"model": TITLE[name], "runs": runs, "mean_ratio": ratio,
                     "mean_drop_points": drop, "target_met": met, "published": PUBLISHED[name]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    log(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
