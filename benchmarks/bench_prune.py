"""Benchmarks for %prune (issue 4), on the embedded MNIST subset (4,000 train / 1,000 test digits).

1. structured  The reference CNN (SmallResNet, width 32/64) trained ``--epochs``; 50% of the
               channels removed (L2 group norm, per layer, channels rounded to 8), fine-tuned up
               to as many epochs as the original training. Targets: >= 3x fewer parameters,
               >= 1.8x faster on CPU at batch 64 (1 thread, the two models alternated, median of
               30+ runs), accuracy within 1 point of the original. Also the speed of variants
               (global ranking, channels not rounded) to show why rounding matters.
2. lottery     LeNet-300-100: iterative magnitude pruning with rewinding to the initial weights,
               ``--rounds`` rounds of ``--round-epochs`` epochs, 20% of fc1/fc2 and 10% of fc3
               per round (the classifier at half rate, Frankle & Carbin). Targets: a ticket with
               <= 6% of the weights within 0.5 points of the dense accuracy and above a random
               re-initialisation of the same mask, mean over 3 seeds.
3. iterative   LeNet-300-100 pruned to 95% sparsity by global magnitude in ``--steps`` rounds with
               fine-tuning. Targets: <= 1 point accuracy drop, packed bytes >= 8x smaller.
4. speed       Global magnitude pruning (50%) of a 25M-parameter MLP: our selection + zeroing vs
               ``torch.nn.utils.prune.global_unstructured`` + ``prune.remove``, alternated, on
               fresh copies, 1 thread. Target: >= 2x faster.

    python benchmarks/bench_prune.py                     # all four (the lottery part is long)
    python benchmarks/bench_prune.py --parts lottery --quick
    python benchmarks/bench_prune.py --parts structured,speed

Each part prints a table and writes benchmarks/results/prune_<part>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _timing import alternated  # noqa: E402  (benchmarks/_timing.py: the one timing protocol)
from nbcompress import compress, evaluate, measure  # noqa: E402
from nbcompress.core import StepContext  # noqa: E402
from nbcompress.data import lenet_300_100, mnist_loaders, reference_cnn, train_reference  # noqa: E402
from nbcompress.metrics import count_flops, count_params  # noqa: E402
from nbcompress.techniques.prune import PruneConfig, prune, prune_weights_  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def log(*a):
    print(*a, flush=True)


def env() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_threads_for_timing": 1,
            "date": time.strftime("%Y-%m-%d")}


def write(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"prune_{name}.json"
    data = {"benchmark": f"prune/{name}", "environment": env(), **data}
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    log(f"wrote {path.relative_to(ROOT)}")


def table(headers, rows):
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    log("  " + "  ".join(str(h).ljust(w[i]) for i, h in enumerate(headers)))
    for r in rows:
        log("  " + "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))


def latency_pair(models: dict, x: torch.Tensor, runs: int = 40, warmup: int = 5) -> dict:
    """Median wall-clock ms per forward of each model, alternated in one loop (1 thread)."""
    return {k: v["wall_ms"] for k, v in alternated(models, x, runs=runs, warmup=warmup).items()}


# ------------------------------------------------------------------------------ 1. structured

def bench_structured(a) -> dict:
    train, test = mnist_loaders(seed=0)
    x1 = next(iter(test))[0][:1]
    x64 = next(iter(test))[0][:64]
    cache = Path(a.cache_dir) / f"cnn_w32_e{a.epochs}.pt"
    model = reference_cnn(width=32, seed=0)
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        log(f"original CNN loaded from {cache}")
    else:
        t0 = time.perf_counter()
        train_reference(model, train, epochs=a.epochs, seed=0)
        log(f"original CNN trained {a.epochs} epochs in {time.perf_counter() - t0:.0f} s")
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    model.eval()
    acc0 = evaluate(model, test)
    ft_epochs = a.finetune_epochs or a.epochs
    t0 = time.perf_counter()
    res = compress(model, PruneConfig(amount=0.5, structured=True, finetune=train,
                                      epochs=ft_epochs, lr=a.lr, progress=False,
                                      importance=a.importance, steps=a.struct_steps),
                   evaluator=test, example_input=x1)
    seconds = time.perf_counter() - t0
    pruned = res.model.eval()
    p0, p1 = count_params(model)[0], count_params(pruned)[0]
    f0, f1 = count_flops(model, x1)[0], count_flops(pruned, x1)[0]
    acc1 = evaluate(pruned, test)
    one_shot = res.tables["rounds"]["accuracy_pruned"].iloc[0]

    # speed variants, no fine-tuning (only their shapes matter for latency)
    variants = {"original": model, "pruned (layer, round 8)": pruned}
    extra = {}
    for label, opts in [("global, round 8", dict(scope="global", round_to=8)),
                        ("global, round 1", dict(scope="global", round_to=1))]:
        m = prune(model, 0.5, structured=True, example_input=x1, **opts).eval()
        variants[f"pruned ({label})"] = m
        extra[label] = {"params": count_params(m)[0], "flops": count_flops(m, x1)[0],
                        "channels": [mod.out_channels for mod in m.modules()
                                     if isinstance(mod, nn.Conv2d)]}
    lat = latency_pair(variants, x64, runs=a.runs)
    rows = []
    for k, m in variants.items():
        rows.append([k, f"{count_params(m)[0]:,}", f"{count_flops(m, x1)[0] / 1e6:.2f} M",
                     f"{lat[k]:.2f} ms", f"{lat['original'] / lat[k]:.2f}x"])
    log("\nstructured pruning of the reference CNN, 50% of channels:")
    table(["model", "params", "FLOPs/sample", "latency b64 (1 thr)", "speedup"], rows)
    log(f"  accuracy: original {100 * acc0:.2f}%, pruned one-shot {100 * one_shot:.2f}%, "
        f"after {ft_epochs} fine-tune epochs {100 * acc1:.2f}% "
        f"({100 * (acc1 - acc0):+.2f} pts); step took {seconds:.0f} s")
    out = {
        "original": {"params": p0, "flops_per_sample": f0, "accuracy": acc0,
                     "train_epochs": a.epochs, "latency_ms_b64": lat["original"]},
        "pruned": {"params": p1, "flops_per_sample": f1, "accuracy_one_shot": float(one_shot),
                   "accuracy": acc1, "finetune_epochs": ft_epochs, "steps": a.struct_steps,
                   "importance": a.importance or "l2",
                   "latency_ms_b64": lat["pruned (layer, round 8)"],
                   "channels": [m.out_channels for m in pruned.modules()
                                if isinstance(m, nn.Conv2d)],
                   "rounds": res.tables["rounds"].to_dict("records")},
        "params_ratio": p0 / p1, "flops_ratio": f0 / f1,
        "speedup_b64": lat["original"] / lat["pruned (layer, round 8)"],
        "accuracy_delta_points": 100 * (acc1 - acc0),
        "variants_no_finetune": {k: {**extra[k], "latency_ms_b64": lat[f"pruned ({k})"],
                                     "speedup_b64": lat["original"] / lat[f"pruned ({k})"]}
                                 for k in extra},
        "latency_runs": a.runs,
        "targets": {"params_ratio": ">= 3", "speedup_b64": ">= 1.8",
                    "accuracy_delta_points": ">= -1"},
    }
    out["met"] = {"params_ratio": out["params_ratio"] >= 3, "speedup_b64": out["speedup_b64"] >= 1.8,
                  "accuracy": out["accuracy_delta_points"] >= -1}
    log(f"  params {out['params_ratio']:.2f}x fewer, FLOPs {out['flops_ratio']:.2f}x fewer, "
        f"{out['speedup_b64']:.2f}x faster at batch 64; met: {out['met']}")
    write("structured", out)
    return out


# --------------------------------------------------------------------------------- 2. lottery

def bench_lottery(a) -> dict:
    runs = []
    rounds, epochs = a.rounds, a.round_epochs
    # the full run: 20% of fc1/fc2 and 10% of fc3 per round for 13 rounds -> 5.57% of the weights
    # left; --quick reaches the same fraction in fewer rounds (a faster per-round rate)
    n = {"fc1": 784 * 300, "fc2": 300 * 100, "fc3": 100 * 10}
    left = (0.8 ** 13 * (n["fc1"] + n["fc2"]) + 0.9 ** 13 * n["fc3"]) / sum(n.values())
    for seed in a.seeds:
        train, test = mnist_loaders(seed=seed)
        model = lenet_300_100(seed=seed)
        init = copy.deepcopy(model.state_dict())
        t0 = time.perf_counter()
        train_reference(model, train, epochs=epochs, seed=seed)
        dense = evaluate(model, test)
        res = compress(model, PruneConfig(amount=1 - left, lottery=True, steps=rounds,
                                          finetune=train, epochs=epochs, lr=a.lottery_lr,
                                          scheduler=None, seed=seed, progress=False),
                       ctx=StepContext(device=torch.device("cpu"), origin_device=torch.device("cpu"),
                                       evaluator=test, init_state=init, progress=False))
        e = res.extra
        rows = res.tables["lottery rounds"].to_dict("records")
        runs.append({"seed": seed, "dense": dense, "ticket": e["ticket_accuracy"],
                     "random_reinit": e["random_reinit_accuracy"],
                     "weights_left": e["weights_left"], "rounds": rows,
                     "seconds": time.perf_counter() - t0})
        log(f"  seed {seed}: dense {100 * dense:.2f}%  ticket {100 * e['ticket_accuracy']:.2f}% "
            f"at {100 * e['weights_left']:.2f}% weights  random re-init "
            f"{100 * e['random_reinit_accuracy']:.2f}%  ({time.perf_counter() - t0:.0f} s)")
    mean = {k: statistics.mean(r[k] for r in runs) for k in ("dense", "ticket", "random_reinit",
                                                             "weights_left")}
    # the best (sparsest within 0.5 points) round per seed, from the per-round table
    best = []
    for r in runs:
        ok = [x for x in r["rounds"] if x["accuracy"] >= r["dense"] - 0.005]
        best.append(min((x["weights_left"] for x in ok), default=None))
    log("\nlottery ticket on LeNet-300-100 (mean over seeds):")
    table(["", "weights left", "accuracy"],
          [["dense", "100%", f"{100 * mean['dense']:.2f}%"],
           ["ticket (rewound)", f"{100 * mean['weights_left']:.2f}%", f"{100 * mean['ticket']:.2f}%"],
           ["random re-init", f"{100 * mean['weights_left']:.2f}%",
            f"{100 * mean['random_reinit']:.2f}%"]])
    out = {"rounds": rounds, "epochs_per_round": epochs, "quick": a.quick, "lr": a.lottery_lr,
           "seeds": list(a.seeds), "runs": runs, "mean": mean,
           "ticket_minus_dense_points": 100 * (mean["ticket"] - mean["dense"]),
           "ticket_minus_random_points": 100 * (mean["ticket"] - mean["random_reinit"]),
           "sparsest_round_within_half_point_per_seed": best,
           "targets": {"weights_left": "<= 0.06", "ticket_minus_dense_points": ">= -0.5",
                       "ticket_minus_random_points": "> 0"}}
    out["met"] = {"weights_left": mean["weights_left"] <= 0.06,
                  "within_half_point": out["ticket_minus_dense_points"] >= -0.5,
                  "above_random": out["ticket_minus_random_points"] > 0}
    log(f"  ticket - dense {out['ticket_minus_dense_points']:+.2f} pts, ticket - random "
        f"{out['ticket_minus_random_points']:+.2f} pts; met: {out['met']}")
    write("lottery_quick" if a.quick else "lottery", out)
    return out


# ------------------------------------------------------------------------------- 3. iterative

def bench_iterative(a) -> dict:
    train, test = mnist_loaders(seed=0)
    model = lenet_300_100(seed=0)
    train_reference(model, train, epochs=a.epochs, seed=0)
    x1 = next(iter(test))[0][:1]
    before = measure(model, x1, test, latency=False)
    t0 = time.perf_counter()
    res = compress(model, PruneConfig(amount=0.95, steps=a.steps, finetune=train,
                                      epochs=a.step_epochs, lr=a.lr, progress=False),
                   evaluator=test)
    seconds = time.perf_counter() - t0
    after = measure(res.model, x1, test, latency=False)
    rounds = res.tables["rounds"]
    log(f"\niterative magnitude pruning of LeNet-300-100 to 95% in {a.steps} rounds "
        f"({a.step_epochs} epochs each):")
    table(["round", "sparsity", "acc pruned", "acc fine-tuned"],
          [[int(r["round"]), f"{100 * r['sparsity']:.2f}%", f"{100 * r['accuracy_pruned']:.2f}%",
            f"{100 * r['accuracy']:.2f}%"] for _, r in rounds.iterrows()])
    out = {"train_epochs": a.epochs, "steps": a.steps, "epochs_per_step": a.step_epochs,
           "accuracy_before": before.accuracy, "accuracy_after": after.accuracy,
           "drop_points": 100 * (before.accuracy - after.accuracy),
           "sparsity_of_pruned_layers": float(rounds["sparsity"].iloc[-1]),
           "nonzero_params": after.nonzero_params, "params": after.params,
           "dense_bytes": after.dense_bytes, "packed_bytes_before": before.packed_bytes,
           "packed_bytes_after": after.packed_bytes,
           "packed_ratio_vs_dense": before.packed_bytes / after.packed_bytes,
           "sparse_flops_ratio": before.sparse_flops / after.sparse_flops,
           "rounds": rounds.to_dict("records"), "seconds": seconds,
           "targets": {"drop_points": "<= 1", "packed_ratio_vs_dense": ">= 8"}}
    out["met"] = {"accuracy": out["drop_points"] <= 1, "packed": out["packed_ratio_vs_dense"] >= 8}
    log(f"  accuracy {100 * before.accuracy:.2f}% -> {100 * after.accuracy:.2f}% "
        f"({-out['drop_points']:+.2f} pts); packed {before.packed_bytes:,} -> "
        f"{after.packed_bytes:,} bytes ({out['packed_ratio_vs_dense']:.1f}x smaller); "
        f"met: {out['met']}")
    write("iterative", out)
    return out


# ----------------------------------------------------------------------------------- 4. speed

def big_mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                          nn.Linear(4096, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def bench_speed(a) -> dict:
    import torch.nn.utils.prune as tprune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = big_mlp()
    n_params = count_params(base)[0]
    lin = [m for m in base.modules() if isinstance(m, nn.Linear)]
    n_w = sum(m.weight.numel() for m in lin)

    def ours(m):
        prune_weights_(m, 0.5, scope="global")

    def torch_prune(m):
        mods = [(x, "weight") for x in m.modules() if isinstance(x, nn.Linear)]
        tprune.global_unstructured(mods, pruning_method=tprune.L1Unstructured, amount=0.5)
        for x, name in mods:
            tprune.remove(x, name)

    def api(m):
        prune(m, 0.5)          # the public verb: includes the private deep copy

    times = {"nbcompress (in place)": [], "torch.nn.utils.prune": [], "nbcompress.prune()": []}
    fns = {"nbcompress (in place)": ours, "torch.nn.utils.prune": torch_prune,
           "nbcompress.prune()": api}
    check = {}
    try:
        for i in range(a.speed_runs + 1):
            for k, fn in fns.items():
                m = copy.deepcopy(base)
                t0 = time.perf_counter()
                fn(m)
                dt = time.perf_counter() - t0
                if i > 0:                       # the first pass is the warm-up
                    times[k].append(dt)
                if i == 0 and k != "nbcompress.prune()":
                    check[k] = [(x.weight == 0) for x in m.modules() if isinstance(x, nn.Linear)]
                del m
    finally:
        torch.set_num_threads(threads)
    same = all(torch.equal(p, q) for p, q in zip(check["nbcompress (in place)"],
                                                   check["torch.nn.utils.prune"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["torch.nn.utils.prune"] / med["nbcompress (in place)"]
    log(f"\nglobal magnitude pruning (50%) of a {n_params / 1e6:.1f}M-parameter MLP, 1 thread, "
        f"median of {a.speed_runs}:")
    table(["method", "seconds", "vs torch"],
          [[k, f"{v:.3f}", f"{med['torch.nn.utils.prune'] / v:.2f}x"] for k, v in med.items()])
    log(f"  same weights zeroed as torch: {same}")
    out = {"params": n_params, "weights_pruned_over": n_w, "amount": 0.5, "runs": a.speed_runs,
           "median_seconds": med, "all_seconds": times, "speedup_vs_torch": ratio,
           "speedup_vs_torch_including_copy": med["torch.nn.utils.prune"] / med["nbcompress.prune()"],
           "identical_mask_to_torch": same, "targets": {"speedup_vs_torch": ">= 2"},
           "met": {"speedup": ratio >= 2}}
    write("speed", out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="structured,iterative,speed,lottery")
    p.add_argument("--quick", action="store_true", help="lottery: 1 seed, fewer epochs per round")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the originals")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="structured fine-tune epochs (default: --epochs)")
    p.add_argument("--struct-steps", type=int, default=1)
    p.add_argument("--importance", default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--runs", type=int, default=40, help="latency runs per model")
    p.add_argument("--rounds", type=int, default=13, help="lottery rounds")
    p.add_argument("--round-epochs", type=int, default=20, help="lottery epochs per round")
    p.add_argument("--lottery-lr", type=float, default=1.2e-3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=5, help="iterative: rounds to 95%%")
    p.add_argument("--step-epochs", type=int, default=3, help="iterative: fine-tune epochs/round")
    p.add_argument("--speed-runs", type=int, default=7)
    p.add_argument("--cache-dir", default="/tmp/nbc_bench_prune")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for training (timings always use 1); on a shared machine "
                        "1 avoids OpenMP oversubscription, which can be 10x slower")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    if a.quick:              # 1 seed, 7 rounds of 6 epochs at a faster per-round rate
        a.seeds = a.seeds[:1]
        a.round_epochs = min(a.round_epochs, 6)
        a.rounds = min(a.rounds, 7)
    torch.manual_seed(0)
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    for part in parts:
        t0 = time.perf_counter()
        {"structured": bench_structured, "lottery": bench_lottery, "iterative": bench_iterative,
         "speed": bench_speed}[part](a)
        log(f"[{part}: {time.perf_counter() - t0:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
