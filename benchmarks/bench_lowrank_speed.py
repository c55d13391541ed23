"""How long ``%lowrank`` takes on large torchvision models (issue 15, part 6): the truncated /
Gram-matrix path for large layers (``factorize.LargeBlocks``) against the full float64 SVD of
every layer (the path before it, still reachable by ``factorize._FULL_SVD_LIMIT = inf``).

Per model (random weights, ``models.get_model(name, weights=None)``, one image: 224x224 for the
ViT, 64x64 otherwise) and rank option (the default energy 0.9, ``ratio=0.25``), the whole step
``compress(model, LowRankConfig(...), example_input=x)`` is timed in a fresh process on one
thread: wall seconds and the thread's CPU seconds (``time.thread_time``, which leaves out time
spent waiting for a core on a loaded machine). The baseline runs only where asked
(``--before``; minutes per model), alternated with the new path, under ``--limit`` seconds;
where both ran, the chosen ranks and the reported relative errors ``||W - W_hat|| / ||W||`` are
compared layer by layer (the new path must not lose accuracy: same ranks, errors within a few %).
Needs torchvision (the /tmp/v214 environment on this machine). Writes
``benchmarks/results/lowrank_speed.json``.

    python benchmarks/bench_lowrank_speed.py                       # five models, after only
    python benchmarks/bench_lowrank_speed.py --before vgg16,vit_l_16 --modes default
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = ("vgg16", "vit_l_16", "alexnet", "wide_resnet50_2", "convnext_base")
MODES = {"default": {}, "ratio0.25": {"ratio": 0.25}, "rank64": {"rank": 64}}


def worker(name: str, mode: str, path: str) -> dict:
    """One timed step in this process; the result as a dict."""
    import torch
    from torchvision import models

    sys.path.insert(0, ROOT)
    from nbcompress.core import compress
    from nbcompress.techniques.lowrank import LowRankConfig
    from nbcompress.techniques.lowrank import factorize

    torch.set_num_threads(1)
    if path == "full_svd":
        factorize._FULL_SVD_LIMIT = float("inf")
    torch.manual_seed(0)
    model = models.get_model(name, weights=None).eval()
    size = 224 if name.startswith("vit") else 64
    x = torch.randn(1, 3, size, size)
    w0, c0 = time.perf_counter(), time.thread_time()
    result = compress(model, LowRankConfig(**MODES[mode]), example_input=x)
    wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.model.parameters())
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "params_before": before,
            "params_after": after, "layers_factorised": len(result.layers),
            "layers": {r["layer"]: [r["rank"], r["rel_error"]] for r in result.layers}}


def run_one(name: str, mode: str, path: str, limit: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, mode, path]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "wall_s": f">{limit:g}"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail, "wall_s": round(time.perf_counter() - start, 2)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(before: dict, after: dict) -> dict:
    """Layer by layer, where both paths factorised: do ranks agree, how far apart are errors."""
    common = [k for k in after["layers"] if k in before.get("layers", {})]
    if not common:
        return {}
    same = sum(after["layers"][k][0] == before["layers"][k][0] for k in common)
    worst = max((after["layers"][k][1] / before["layers"][k][1] - 1.0)
                for k in common if before["layers"][k][1] > 0)
    return {"layers_compared": len(common), "ranks_equal": same,
            "worst_rel_error_increase": round(worst, 5),
            "only_before": sorted(set(before["layers"]) - set(after["layers"])),
            "only_after": sorted(set(after["layers"]) - set(before["layers"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default="default,ratio0.25")
    ap.add_argument("--before", default="", help="models also timed on the full-SVD path")
    ap.add_argument("--limit", type=float, default=240.0, help="seconds per run")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "lowrank_speed.json"))
    args = ap.parse_args()
    befores = set(filter(None, args.before.split(",")))
    rows = []
    print(f"{'model':<17} {'mode':<10} {'path':<9} {'wall s':>8} {'cpu s':>8} {'layers':>6} "
          f"{'params after':>13}  accuracy vs full SVD", flush=True)
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            # alternated: the baseline first on one model, second on the next
            paths = ["gram", "full_svd"] if name in befores else ["gram"]
            if len(rows) % 2 and len(paths) == 2:
                paths.reverse()
            got = {p: run_one(name, mode, p, args.limit) for p in paths}
            for p in paths:
                r = got[p]
                row = {"model": name, "mode": mode, "path": p, **r}
                if p == "gram" and "full_svd" in got and "layers" in got["full_svd"] and "layers" in r:
                    row["vs_full_svd"] = compare(got["full_svd"], r)
                rows.append(row)
                cmp = row.get("vs_full_svd")
                acc = (f"ranks {cmp['ranks_equal']}/{cmp['layers_compared']} equal, error "
                       f"+{100 * cmp['worst_rel_error_increase']:.3g}% at worst") if cmp else ""
                print(f"{name:<17} {mode:<10} {p:<9} {str(r.get('wall_s')):>8} "
                      f"{str(r.get('cpu_s', '-')):>8} {str(r.get('layers_factorised', '-')):>6} "
                      f"{str(r.get('params_after', r.get('error', '-'))):>13}  {acc}", flush=True)
    import torch
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": 1, "limit_s": args.limit,
            "command": " ".join(["python", "benchmarks/bench_lowrank_speed.py"] + sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:5])))
    else:
        main()
