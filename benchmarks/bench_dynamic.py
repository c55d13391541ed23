"""Dynamic width (issue 17): a slimmable SmallResNet against networks of each width trained alone,
and against structured pruning at the same FLOPs, on the embedded MNIST (4,000 / 1,000 digits).

For each seed:

* **slimmable**: ``nbcompress.slim(SmallResNet(32), widths=0.25,0.5,0.75,1, epochs=E)`` from
  random weights (sandwich rule + in-place distillation, BatchNorm re-estimated per width);
  accuracy at every width on the test digits.
* **alone**: ``SmallResNet(round(32 w))`` for each width (the same architecture the slimmable
  network runs at that width), trained alone for the same E epochs with the same optimiser
  (Adam, lr 1e-3, cosine, ``nbcompress.fit``).
* **pruned**: the full network trained alone, then ``%prune --structured --target-flops F
  --finetune`` (L1, E epochs of fine-tuning) with F the slimmable width 0.5's share of the FLOPs.

FLOPs: ``torch.utils.flop_counter`` on one digit. Latency: batch 64, one thread, the width-0.5 and
full-width slimmable networks alternated, median of --runs runs after warm-up
(``benchmarks/_timing.py``), wall and thread-CPU milliseconds.

Targets (issue 17): every width within 1 point of the same width trained alone (mean over seeds);
width 0.5 at most 0.3x the full FLOPs and at least 2x faster at batch 64; the width-0.5 network
within 0.5 points of structured pruning at the same FLOPs.

Depth (``--parts depth``): SmallResNet(16) with 3 residual blocks a stage (6 in all), made
slimmable from random weights with ``widths=0.5,0.7,1, depths=0.5,1``, E epochs on 3,500 of the
training digits (layer dropping for half the epochs, then the chosen blocks left out exactly).
Targets: leaving half the blocks out (depth 0.5, full width) costs at most 2 points against the
full configuration; ``%budget --flops 0.5`` (``nbcompress.choose``, choosing on the 500 held-out
training digits) is on the test digits at least as accurate as the best single fixed
configuration of the network within that budget, that one picked in hindsight on the test digits.
Reported beside it, not a target: networks of a fixed shape within the budget trained alone for
the same epochs (SmallResNet(11) with 3 blocks a stage, SmallResNet(16) with 1).

    python benchmarks/bench_dynamic.py                    # seeds 0 1 2, 6 epochs, both parts
    python benchmarks/bench_dynamic.py --parts depth --seeds 0 --epochs 2 --runs 10

Writes benchmarks/results/dynamic.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _tables import log, table  # noqa: E402
from _timing import alternated  # noqa: E402
import nbcompress  # noqa: E402
from nbcompress.counting import count_flops  # noqa: E402
from nbcompress.data import mnist_loaders, reference_cnn  # noqa: E402

WIDTHS = (0.25, 0.5, 0.75, 1.0)
BASE = 32
TARGETS = {"vs_alone_pts": 1.0, "flops_05": 0.3, "speedup_05": 2.0, "vs_pruned_pts": 0.5}


def run_seed(seed: int, a, train, test) -> dict:
    x1 = next(iter(test))[0][:1]
    t0 = time.perf_counter()
    sn = nbcompress.slim(reference_cnn(BASE, seed=seed), train, widths=list(WIDTHS),
                         epochs=a.epochs, seed=seed)
    slim_s = time.perf_counter() - t0
    out = {"seed": seed, "slim_seconds": round(slim_s, 1), "widths": {}}
    flops = {}
    for w in WIDTHS:
        sn.width = w
        flops[w] = count_flops(sn, x1)[0]
        out["widths"][str(w)] = {"slim_accuracy": nbcompress.evaluate(sn, test),
                                 "flops": flops[w]}
    alone_full = None
    t0 = time.perf_counter()
    for w in WIDTHS:
        m = reference_cnn(max(1, round(BASE * w)), seed=seed)
        nbcompress.fit(m, train, epochs=a.epochs, lr=1e-3, scheduler="cosine", seed=seed,
                       progress=False)
        row = out["widths"][str(w)]
        row["alone_accuracy"] = nbcompress.evaluate(m, test)
        row["alone_flops"] = count_flops(m, x1)[0]
        row["vs_alone_pts"] = 100 * (row["slim_accuracy"] - row["alone_accuracy"])
        if w == 1.0:
            alone_full = m
    out["alone_seconds"] = round(time.perf_counter() - t0, 1)
    share = flops[0.5] / flops[1.0]
    pruned = nbcompress.prune(alone_full, structured=True, target_flops=share, finetune=train,
                              epochs=a.epochs, seed=seed)
    out["pruned"] = {"target_flops": share, "flops": count_flops(pruned, x1)[0],
                     "accuracy": nbcompress.evaluate(pruned, test)}
    out["vs_pruned_pts"] = 100 * (out["widths"]["0.5"]["slim_accuracy"]
                                  - out["pruned"]["accuracy"])
    half, full = sn, nbcompress.slim(sn, width=1.0)
    half.width = 0.5
    xb = next(iter(train))[0][:64]
    t = alternated({"width 0.5": half, "width 1": full}, xb, runs=a.runs, warmup=5)
    out["latency_b64"] = t
    out["speedup_05_wall"] = t["width 1"]["wall_ms"] / t["width 0.5"]["wall_ms"]
    out["speedup_05_cpu"] = t["width 1"]["cpu_ms"] / t["width 0.5"]["cpu_ms"]
    out["flops_05"] = share
    return out


DEPTH_WIDTHS = (0.5, 0.7, 1.0)


def run_depth(seed: int, a, train, val, test) -> dict:
    x1 = next(iter(test))[0][:1]
    t0 = time.perf_counter()
    sn = nbcompress.slim(reference_cnn(16, seed=seed, blocks=3), train,
                         widths=list(DEPTH_WIDTHS), depths=[0.5, 1], epochs=a.depth_epochs,
                         seed=seed)
    out = {"seed": seed, "slim_seconds": round(time.perf_counter() - t0, 1),
           "left_out": sn.drops["0.5"], "configs": {}}
    for w in sn.widths:
        for d in sn.depths:
            sn.width, sn.depth = w, d
            out["configs"][f"w{w:g} d{d:g}"] = {"accuracy": nbcompress.evaluate(sn, test),
                                                "flops": count_flops(sn, x1)[0]}
    full = out["configs"]["w1 d1"]
    half = out["configs"]["w1 d0.5"]
    for c in out["configs"].values():
        c["flops_fraction"] = c["flops"] / full["flops"]
    out["half_depth_drop_pts"] = 100 * (full["accuracy"] - half["accuracy"])
    out["half_depth_flops"] = half["flops"] / full["flops"]
    sn.width, sn.depth = 1.0, 1.0
    picked = nbcompress.choose(sn, flops=0.5, evaluator=val)       # chosen on held-out digits
    out["budget"] = {"width": picked.width, "depth": picked.depth,
                     "accuracy": nbcompress.evaluate(picked, test),
                     "flops": count_flops(picked, x1)[0] / full["flops"]}
    inside = {k: c["accuracy"] for k, c in out["configs"].items() if c["flops_fraction"] <= 0.5}
    out["best_fixed_config"] = max(inside, key=inside.get)
    out["best_fixed_config_accuracy"] = inside[out["best_fixed_config"]]
    fixed = {}
    for label, m in (("SmallResNet(11, 3 blocks)", reference_cnn(11, seed=seed, blocks=3)),
                     ("SmallResNet(16, 1 block)", reference_cnn(16, seed=seed, blocks=1))):
        nbcompress.fit(m, train, epochs=a.depth_epochs, lr=1e-3, scheduler="cosine", seed=seed,
                       progress=False)
        fixed[label] = {"accuracy": nbcompress.evaluate(m, test),
                        "flops": count_flops(m, x1)[0] / full["flops"]}
    out["fixed"] = fixed
    fits = [v["accuracy"] for v in fixed.values() if v["flops"] <= 0.5]
    out["best_fixed_accuracy"] = max(fits) if fits else None
    return out


def depth_part(a, train, test) -> dict:
    from torch.utils.data import DataLoader, random_split

    g = torch.Generator().manual_seed(0)
    fit_set, val_set = random_split(train.dataset, [len(train.dataset) - 500, 500], generator=g)
    train = DataLoader(fit_set, batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=500)
    runs = [run_depth(int(s), a, train, val, test) for s in a.seeds.split(",")]
    mean = statistics.mean
    drop = mean(r["half_depth_drop_pts"] for r in runs)
    bud = mean(r["budget"]["accuracy"] for r in runs)
    inside = mean(r["best_fixed_config_accuracy"] for r in runs)
    best = mean(r["best_fixed_accuracy"] for r in runs if r["best_fixed_accuracy"] is not None)
    log(f"\ndepth: SmallResNet(16), 3 blocks a stage, widths "
        f"{','.join(f'{w:g}' for w in DEPTH_WIDTHS)} x depths 0.5,1, {a.depth_epochs} epochs on "
        f"3,500 digits, %budget chosen on 500 held-out ones, accuracy on the 1,000 test digits, "
        f"{len(runs)} seeds:")
    table(["seed", "full %", "half depth %", "drop pts", "FLOPs", "left out", "budget 0.5",
           "budget %", "best fixed config (hindsight)", "best alone %"],
          [[r["seed"], f"{100 * r['configs']['w1 d1']['accuracy']:.2f}",
            f"{100 * r['configs']['w1 d0.5']['accuracy']:.2f}",
            f"{r['half_depth_drop_pts']:+.2f}", f"{r['half_depth_flops']:.2f}",
            ",".join(r["left_out"]), f"w{r['budget']['width']:g} d{r['budget']['depth']:g}",
            f"{100 * r['budget']['accuracy']:.2f}",
            f"{r['best_fixed_config']} {100 * r['best_fixed_config_accuracy']:.2f}",
            f"{100 * r['best_fixed_accuracy']:.2f}" if r["best_fixed_accuracy"] else "-"]
           for r in runs])
    met = {"half_depth": drop <= 2.0, "budget_vs_fixed_config": bud >= inside - 1e-12}
    log(f"  half the blocks left out: {drop:+.2f} pts (target <= 2); %budget --flops 0.5 "
        f"(chosen on held-out digits): {100 * bud:.2f}% vs the best fixed configuration within "
        f"the budget picked in hindsight on the test digits {100 * inside:.2f}%; networks of a "
        f"fixed shape trained alone: {100 * best:.2f}% (reported, not a target); "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    return {"runs": runs, "half_depth_drop_pts": drop, "budget_accuracy": bud,
            "best_fixed_config_accuracy": inside, "best_alone_accuracy": best, "met": met,
            "epochs": a.depth_epochs, "widths": list(DEPTH_WIDTHS)}


class _Padded(torch.utils.data.Dataset):
    """MNIST digits padded to 32x32 (a VGG's five poolings), repeated to 3 channels if asked."""

    def __init__(self, ds, rgb: bool):
        self.ds, self.rgb = ds, rgb

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        x = torch.nn.functional.pad(x, (2, 2, 2, 2))
        return (x.expand(3, -1, -1) if self.rgb else x), y


def exit_models(seed: int):
    """(label, model, wants RGB): torchvision's ResNet-18 as it is (10 classes), and a VGG-11-BN
    chain from torchvision's own ``make_layers`` (configuration A, channels / 4, one input
    channel) with a CIFAR-style 512/4 -> 10 classifier."""
    import torchvision
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(seed)
    resnet = torchvision.models.resnet18(num_classes=10)
    cfg = [c if c == "M" else c // 4 for c in cfgs["A"]]
    feats = make_layers(cfg, batch_norm=True)
    first = feats[0]
    feats[0] = torch.nn.Conv2d(1, first.out_channels, 3, padding=1)
    vgg = torch.nn.Sequential(feats, torch.nn.Flatten(), torch.nn.Linear(cfg[-2], 10))
    return [("torchvision resnet18", resnet, True), ("VGG-11-BN chain (tv make_layers, /4)",
                                                      vgg, False)]


def run_exits(seed: int, a, fit_set, val_set, test_set) -> list[dict]:
    from torch.utils.data import DataLoader

    from nbcompress.techniques.earlyexit import threshold_sweep

    rows = []
    for label, model, rgb in exit_models(seed):
        tr = DataLoader(_Padded(fit_set, rgb), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
        val = DataLoader(_Padded(val_set, rgb), batch_size=500)
        te = DataLoader(_Padded(test_set, rgb), batch_size=500)
        t0 = time.perf_counter()
        nbcompress.fit(model, tr, epochs=a.exit_epochs, lr=1e-3, scheduler="cosine", seed=seed,
                       progress=False)
        fit_s = time.perf_counter() - t0
        full = nbcompress.evaluate(model, te)
        t0 = time.perf_counter()
        ee = nbcompress.early_exit(model, tr, evaluator=val, target_flops=a.exit_flops,
                                   head=a.exit_head, epochs=a.exit_epochs, seed=seed)
        ee_s = time.perf_counter() - t0
        sw = threshold_sweep(ee, te, [ee.threshold])
        cur = sw[sw["current"]].iloc[0]
        rows.append({"seed": seed, "model": label, "full_accuracy": full,
                     "exits": list(ee.exit_names), "threshold": ee.threshold,
                     "accuracy": float(cur["accuracy"]),
                     "flops_fraction": float(cur["flops_fraction"]),
                     "drop_pts": 100 * (full - float(cur["accuracy"])),
                     "fit_seconds": round(fit_s, 1), "earlyexit_seconds": round(ee_s, 1)})
        log(f"  seed {seed} {label}: full {100 * full:.2f}%, exits {rows[-1]['exits']} at "
            f"{ee.threshold:g}: {100 * rows[-1]['accuracy']:.2f}% at "
            f"{rows[-1]['flops_fraction']:.1%} of the FLOPs ({fit_s:.0f} s + {ee_s:.0f} s)")
    return rows


def exits_part(a, train, test) -> dict:
    from torch.utils.data import random_split

    g = torch.Generator().manual_seed(0)
    fit_set, val_set = random_split(train.dataset, [len(train.dataset) - 500, 500], generator=g)
    log(f"\nearly exits chosen for you (--target-flops {a.exit_flops:g}, --head {a.exit_head}) "
        f"on two architectures the project did not write, {a.exit_epochs} epochs (network, then "
        f"heads), chosen on 500 held-out training digits, measured on the 1,000 test digits:")
    runs = [r for s in a.seeds.split(",") for r in run_exits(int(s), a, fit_set, val_set,
                                                              test.dataset)]
    mean = statistics.mean
    summary = {}
    for label in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == label]
        summary[label] = {"full_accuracy": mean(r["full_accuracy"] for r in rs),
                          "accuracy": mean(r["accuracy"] for r in rs),
                          "drop_pts": mean(r["drop_pts"] for r in rs),
                          "flops_saved": 1 - mean(r["flops_fraction"] for r in rs)}
        summary[label]["met"] = summary[label]["flops_saved"] >= 0.5 and \
            summary[label]["drop_pts"] <= 0.5
    table(["model", "full %", "early exit %", "drop pts", "FLOPs saved", "target"],
          [[k, f"{100 * v['full_accuracy']:.2f}", f"{100 * v['accuracy']:.2f}",
            f"{v['drop_pts']:+.2f}", f"{v['flops_saved']:.1%}",
            "met" if v["met"] else "NOT met"] for k, v in summary.items()])
    return {"runs": runs, "summary": summary, "epochs": a.exit_epochs,
            "target_flops": a.exit_flops, "head": a.exit_head,
            "targets": {"flops_saved": 0.5, "drop_pts": 0.5}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="width,depth,exits")
    p.add_argument("--depth-epochs", type=int, default=5)
    p.add_argument("--exit-epochs", type=int, default=2)
    p.add_argument("--exit-flops", type=float, default=0.5)
    p.add_argument("--exit-head", default="conv")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dynamic.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = mnist_loaders()
    parts = a.parts.split(",")
    out_path = Path(a.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result["env"] = {"torch": torch.__version__, "python": platform.python_version(),
                     "date": time.strftime("%Y-%m-%d"), "threads": 1,
                     "data": "embedded MNIST 4,000 / 1,000"}
    if "width" in parts:
        result.update(width_part(a, train, test))
    if "depth" in parts:
        result["depth"] = depth_part(a, train, test)
    if "exits" in parts:
        result["exits"] = exits_part(a, train, test)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"wrote {a.out}")
    return 0


def width_part(a, train, test) -> dict:
    runs = []
    for s in a.seeds.split(","):
        log(f"seed {s}: slimmable + {len(WIDTHS)} networks alone + structured pruning, "
            f"{a.epochs} epochs each ...")
        runs.append(run_seed(int(s), a, train, test))
    mean = statistics.mean
    rows, summary = [], {}
    for w in WIDTHS:
        k = str(w)
        sa = mean(r["widths"][k]["slim_accuracy"] for r in runs)
        aa = mean(r["widths"][k]["alone_accuracy"] for r in runs)
        fl = runs[0]["widths"][k]["flops"]
        summary[k] = {"slim_accuracy": sa, "alone_accuracy": aa, "vs_alone_pts": 100 * (sa - aa),
                      "flops": fl, "flops_fraction": fl / runs[0]["widths"]["1.0"]["flops"]}
        rows.append([f"{w:g}", f"{fl / 1e6:.2f} M", f"{summary[k]['flops_fraction']:.2f}",
                     f"{100 * sa:.2f}", f"{100 * aa:.2f}", f"{100 * (sa - aa):+.2f}"])
    log(f"\nslimmable SmallResNet({BASE}) vs each width trained alone ({a.epochs} epochs, mean "
        f"of {len(runs)} seeds, 1,000 test digits):")
    table(["width", "FLOPs", "of full", "slimmable %", "alone %", "diff pts"], rows)
    pr = mean(r["pruned"]["accuracy"] for r in runs)
    vs_pr = mean(r["vs_pruned_pts"] for r in runs)
    sp_w = mean(r["speedup_05_wall"] for r in runs)
    sp_c = mean(r["speedup_05_cpu"] for r in runs)
    f05 = summary["0.5"]["flops_fraction"]
    log(f"\nstructured pruning to the same FLOPs ({100 * runs[0]['pruned']['target_flops']:.1f}% "
        f"target, {runs[0]['pruned']['flops'] / 1e6:.2f} MFLOPs): {100 * pr:.2f}%; width 0.5 "
        f"{100 * summary['0.5']['slim_accuracy']:.2f}% ({vs_pr:+.2f} pts)")
    log(f"width 0.5 at batch 64, one thread: {sp_w:.2f}x faster (wall), {sp_c:.2f}x (CPU); "
        f"FLOPs {f05:.3f}x the full width")
    worst = min(summary[str(w)]["vs_alone_pts"] for w in WIDTHS)
    met = {"vs_alone": worst >= -TARGETS["vs_alone_pts"], "flops_05": f05 <= TARGETS["flops_05"],
           "speedup_05": sp_c >= TARGETS["speedup_05"],
           "vs_pruned": vs_pr >= -TARGETS["vs_pruned_pts"]}
    log("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    return {"settings": {"epochs": a.epochs, "base_width": BASE, "widths": list(WIDTHS),
                         "runs": a.runs},
            "targets": TARGETS, "summary": summary, "pruned_accuracy": pr,
            "vs_pruned_pts": vs_pr, "speedup_05_wall": sp_w, "speedup_05_cpu": sp_c,
            "met": met, "runs": runs}


if __name__ == "__main__":
    sys.exit(main())
