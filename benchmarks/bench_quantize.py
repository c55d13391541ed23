"""Benchmarks for %quantize (issue 5), on the embedded MNIST subset (4,000 train / 1,000 test).

LeNet-300-100 is trained ``--epochs`` (default 20) epochs with seeds 0, 1, 2; every accuracy drop
below is the mean over the seeds, in points, against the same seed's fp32 model. Size ratios are
``nbcompress.save`` file sizes (the ``packed_bytes`` of the dashboard: header included) of the
fp32 model over the compressed one; ``payload`` ratios leave the JSON header out of both.

1. int8     dynamic int8 (torch.ao) on LeNet-300-100 and on a wide MLP 784-1024-4096-1024-10
            (trained ``--wide-epochs``). Targets: packed ratio >= 3.9x, latency at batch 64
            >= 1.5x faster than fp32 (1 thread, models alternated, median of ``--runs``), accuracy
            drop <= 0.3 points. torchao's int8 configs are timed the same way (each alternated with
            fp32 in its own loop; when torchao is installed): what ``int8_kernel_backend`` is
            chosen on. Also static int8 of
            the reference CNN (SmallResNet) with 16 calibration batches (no target; reported).
2. uniform  4-bit uniform, per-channel, symmetric. Targets: >= 7.8x smaller, drop <= 0.5 points.
3. deep     Deep Compression: %prune 95% (global magnitude, 3 rounds x 3 fine-tune epochs) ->
            %quantize --mode cluster --bits 5 --huffman --qat (2 epochs of centroid fine-tuning).
            Targets: >= 50x smaller than the fp32 file, drop <= 0.5 points. Per-stage ratios
            (pruning, + clustering with fixed-width indices, + Huffman) and the byte breakdown
            (positions, indices, codebooks, biases, header) as in the paper's tables.
4. binary   binary weights trained with QAT (straight-through estimator, ``--binary-epochs``).
            Targets: >= 29x smaller, drop <= 1.5 points.

    python benchmarks/bench_quantize.py                   # all four
    python benchmarks/bench_quantize.py --parts int8,uniform --seeds 0

Prints a table per part and writes benchmarks/results/quantize.json.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _timing import alternated  # noqa: E402  (benchmarks/_timing.py: the one timing protocol)
from nbcompress import evaluate, save  # noqa: E402
from nbcompress.data import (lenet_300_100, mnist_loaders, reference_cnn,  # noqa: E402
                             train_reference)
from nbcompress.techniques.prune import prune  # noqa: E402
from nbcompress.techniques.quantize import quantize  # noqa: E402
from nbcompress.storage import breakdown, overhead_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"int8_size": 3.9, "int8_speed": 1.5, "int8_drop": 0.3, "uniform_size": 7.8,
           "uniform_drop": 0.5, "deep_size": 50.0, "deep_drop": 0.5, "binary_size": 29.0,
           "binary_drop": 1.5}


def log(*a):
    print(*a, flush=True)


def env() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor(),
            "quantized_engine": torch.backends.quantized.engine, "cpu_threads_for_timing": 1,
            "date": time.strftime("%Y-%m-%d")}


def table(headers, rows):
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    log("  " + "  ".join(str(h).ljust(w[i]) for i, h in enumerate(headers)))
    for r in rows:
        log("  " + "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))


def size(model, huffman: bool = True) -> int:
    return save(model, io.BytesIO(), huffman=huffman)


def payload(model, huffman: bool = True) -> int:
    buf = io.BytesIO()
    n = save(model, buf, huffman=huffman)
    buf.seek(0)
    return n - overhead_bytes(buf)


def latency(models: dict, x: torch.Tensor, runs: int, warmup: int = 5,
            min_seconds: float = 3.0, max_runs: int = 400) -> dict:
    """Median wall-clock ms per forward of each model, alternated in one loop (1 thread): at least
    ``runs`` rounds, more (up to ``max_runs``) until ``min_seconds`` have passed, since short
    forwards on a busy machine need many samples for a stable median."""
    lat = alternated(models, x, runs=runs, warmup=warmup, min_seconds=min_seconds,
                     max_runs=max_runs)
    return {k: v["wall_ms"] for k, v in lat.items()}


def speedups(fp32: nn.Module, candidates: dict, x: torch.Tensor, runs: int) -> dict:
    """{name: (fp32 ms, candidate ms)}, each candidate alternated with fp32 in its own loop (a
    slow candidate in the same loop would disturb the others' caches)."""
    out = {}
    for name, m in candidates.items():
        lat = latency({"fp32": fp32, name: m}, x, runs)
        out[name] = (lat["fp32"], lat[name])
    return out


_CACHE: dict = {}
CACHE_DIR: Path | None = None      # --cache-dir: trained fp32 weights kept between runs


def trained(name: str, build, train, epochs: int, seed: int) -> nn.Module:
    """``build()`` trained ``epochs`` epochs with ``seed`` (once per process, or read back from
    ``--cache-dir``); a fresh copy each call."""
    key = (name, seed, epochs)
    if key not in _CACHE:
        m = build()
        path = CACHE_DIR / f"{name}_s{seed}_e{epochs}.pt" if CACHE_DIR else None
        if path is not None and path.exists():
            m.load_state_dict(torch.load(path, weights_only=True))
        else:
            train_reference(m, train, epochs=epochs, seed=seed)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(m.state_dict(), path)
        _CACHE[key] = m.eval()
    return copy.deepcopy(_CACHE[key])


def trained_lenet(seed: int, epochs: int, train):
    return trained("lenet300100", lambda: lenet_300_100(seed=seed), train, epochs, seed)


def wide_mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 4096),
                             nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))


def torchao_variants(model: nn.Module) -> dict:
    """torchao's int8 configs on copies of ``model`` (eager; {} if torchao is not installed)."""
    out = {}
    try:
        import logging

        logging.disable(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import (Int8DynamicActivationInt8WeightConfig,
                                              Int8WeightOnlyConfig, quantize_)
    except Exception:  # noqa: BLE001 - torchao is optional
        return out
    finally:
        import logging

        logging.disable(logging.NOTSET)
    for name, cfg in (("torchao int8 dyn", Int8DynamicActivationInt8WeightConfig()),
                      ("torchao int8 weight-only", Int8WeightOnlyConfig())):
        m = copy.deepcopy(model)
        try:
            quantize_(m, cfg)
            out[name] = m
        except Exception as e:  # noqa: BLE001
            log(f"  ({name} failed: {type(e).__name__}: {e})")
    return out


def torchao_pt2e(model: nn.Module, calib, x: torch.Tensor) -> dict:
    """torchao's PT2E static int8 (X86InductorQuantizer), converted but not compiled: what a
    stored, eager model would run ({} if torchao is not installed or export fails)."""
    import logging

    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = xiq.X86InductorQuantizer()
            quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
            graph = torch.export.export(copy.deepcopy(model).eval(), (x,)).module()
            prepared = prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for i, (xb, _) in enumerate(calib):
                    if i >= 16:
                        break
                    prepared(xb)
            converted = convert_pt2e(prepared)
            from torchao.quantization.pt2e import allow_exported_model_train_eval

            allow_exported_model_train_eval(converted)
            return {"torchao pt2e (no compile)": converted}
    except Exception as e:  # noqa: BLE001 - torchao is optional
        log(f"  (torchao PT2E skipped: {type(e).__name__}: {str(e)[:120]})")
        return {}
    finally:
        logging.disable(logging.NOTSET)


# ------------------------------------------------------------------------------------ parts

def part_int8(a, train, test) -> dict:
    log("\n== 1. int8 dynamic (torch.ao) vs fp32: size, latency at batch 64, accuracy")
    x = next(iter(test))[0][:64].contiguous()
    rows, res = [], {"lenet": [], "wide": None, "static_cnn": None}

    def compare(label: str, seed: int, fp: nn.Module, q: nn.Module, key: str, peers: dict) -> dict:
        """Size, latency (``q`` and the torchao ``peers`` each alternated with ``fp``) and
        accuracy of one int8 model against its fp32 original; adds its table row."""
        lat = speedups(fp, {key: q, **peers}, x, a.runs)
        fp_ms, q_ms = lat.pop(key)
        acc0, acc1 = evaluate(fp, test), evaluate(q, test)
        r = {"size_ratio": size(fp) / size(q), "fp32_ms": fp_ms, "int8_ms": q_ms,
             "speedup": fp_ms / q_ms, "torchao_speedups": {k: f / t for k, (f, t) in lat.items()},
             "acc_fp32": acc0, "acc_int8": acc1, "drop_points": 100 * (acc0 - acc1)}
        rows.append([label, seed, f"{r['size_ratio']:.2f}x", f"{fp_ms:.3f}", f"{q_ms:.3f}",
                     f"{r['speedup']:.2f}x",
                     " ".join(f"{v:.2f}x" for v in r["torchao_speedups"].values()) or "-",
                     f"{100 * acc0:.1f}", f"{100 * acc1:.1f}"])
        return r

    for seed in a.seeds:
        m = trained_lenet(seed, a.epochs, train)
        q = quantize(m, mode="dynamic")
        r = compare("LeNet-300-100", seed, m, q, "torch.ao int8 dyn", torchao_variants(m))
        res["lenet"].append({"seed": seed, **r, "payload_ratio": payload(m) / payload(q)})
    wide = trained("wide_mlp", lambda: wide_mlp(0), train, a.wide_epochs, 0)
    res["wide"] = compare("MLP 1024-4096-1024", 0, wide, quantize(wide, mode="dynamic"),
                          "torch.ao int8 dyn", torchao_variants(wide))
    # static int8 for the reference CNN
    cnn = trained("smallresnet", lambda: reference_cnn(seed=0), train, a.cnn_epochs, 0)
    res["static_cnn"] = compare("SmallResNet (static)", 0, cnn,
                                quantize(cnn, mode="static", calib=train, per_channel=True),
                                "torch.ao int8 static", torchao_pt2e(cnn, train, x))
    table(["model", "seed", "smaller", "fp32 ms", "int8 ms", "faster",
           "torchao (dyn, w-only | pt2e)",
           "acc fp32", "acc int8"], rows)
    lenet_drop = statistics.mean(r["drop_points"] for r in res["lenet"])
    w = res["wide"]
    res["summary"] = {
        "lenet_size_ratio_min": min(r["size_ratio"] for r in res["lenet"]),
        "lenet_speedup_min": min(r["speedup"] for r in res["lenet"]),
        "lenet_mean_drop_points": lenet_drop,
        "wide_size_ratio": w["size_ratio"], "wide_speedup": w["speedup"],
        "wide_drop_points": w["drop_points"]}
    sm = res["summary"]
    res["targets_met"] = {
        "size": min(sm["lenet_size_ratio_min"], sm["wide_size_ratio"]) >= TARGETS["int8_size"],
        "speed": min(sm["lenet_speedup_min"], sm["wide_speedup"]) >= TARGETS["int8_speed"],
        "accuracy": max(lenet_drop, sm["wide_drop_points"]) <= TARGETS["int8_drop"]}
    log(f"  LeNet mean drop {lenet_drop:+.2f} pts, wide MLP drop {w['drop_points']:+.2f} pts; "
        f"targets met: {res['targets_met']}")
    return res


def part_uniform(a, train, test) -> dict:
    log("\n== 2. 4-bit uniform, per-channel, symmetric (codes stored packed at 4 bits)")
    rows, runs = [], []
    for seed in a.seeds:
        m = trained_lenet(seed, a.epochs, train)
        q = quantize(m, bits=4, per_channel=True)
        acc0, acc1 = evaluate(m, test), evaluate(q, test)
        r = {"seed": seed, "fp32_bytes": size(m), "bytes": size(q),
             "size_ratio": size(m) / size(q), "payload_ratio": payload(m) / payload(q),
             "acc_fp32": acc0, "acc_4bit": acc1, "drop_points": 100 * (acc0 - acc1)}
        runs.append(r)
        rows.append([seed, f"{r['fp32_bytes']:,}", f"{r['bytes']:,}", f"{r['size_ratio']:.2f}x",
                     f"{r['payload_ratio']:.2f}x", f"{100 * acc0:.1f}", f"{100 * acc1:.1f}"])
    table(["seed", "fp32 bytes", "4-bit bytes", "smaller", "payload smaller", "acc fp32",
           "acc 4-bit"], rows)
    drop = statistics.mean(r["drop_points"] for r in runs)
    ratio = min(r["size_ratio"] for r in runs)
    met = {"size": ratio >= TARGETS["uniform_size"], "accuracy": drop <= TARGETS["uniform_drop"]}
    log(f"  mean drop {drop:+.2f} pts, size {ratio:.2f}x; targets met: {met}")
    return {"runs": runs, "mean_drop_points": drop, "size_ratio_min": ratio, "targets_met": met}


def _split(model, huffman=True) -> dict:
    """Deep-Compression-style byte breakdown of the file ``save`` writes."""
    rows = breakdown(model, huffman=huffman)
    buf = io.BytesIO()
    total = save(model, buf, huffman=huffman)
    buf.seek(0)
    bias = sum(r["bytes"] for r in rows if r["name"].endswith("bias"))
    w = [r for r in rows if not r["name"].endswith("bias")]
    return {"positions": sum(r["positions"] for r in w), "indices": sum(r["indices"] for r in w),
            "codebooks": sum(r["codebook"] for r in w), "raw_values": sum(r["raw"] for r in w),
            "biases": bias, "header": overhead_bytes(buf), "total": total,
            "encodings": {r["name"]: r["encoding"] for r in rows}}


def part_deep(a, train, test) -> dict:
    log("\n== 3. Deep Compression: prune 95% -> cluster 5 bits (+ centroid fine-tune) -> Huffman")
    rows, runs = [], []
    for seed in a.seeds:
        m = trained_lenet(seed, a.epochs, train)
        t0 = time.perf_counter()
        p = prune(m, 0.95, steps=3, finetune=train, epochs=3, seed=seed)
        neg_zeros = sum(int(((w == 0) & torch.signbit(w)).sum()) for w in
                        (mod.weight.detach() for mod in p.modules() if isinstance(mod, nn.Linear)))
        c = quantize(p, mode="cluster", bits=5, huffman=True, qat=train, epochs=2, seed=seed,
                     progress=False)
        acc0, accp, accc = evaluate(m, test), evaluate(p, test), evaluate(c, test)
        dense = size(m, huffman=False)
        canon = copy.deepcopy(p)          # -0.0 -> +0.0 (x + 0.0), in case prune left signed zeros
        with torch.no_grad():
            for mod in canon.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.add_(0.0)
        stages = {"dense": dense, "pruned": size(p, huffman=False),
                  "pruned (+0.0 zeros)": size(canon, huffman=False),
                  "pruned+clustered": size(c, huffman=False), "+huffman": size(c, huffman=True)}
        sparsity = {n: float((mod.weight == 0).float().mean()) for n, mod in c.named_modules()
                    if isinstance(mod, nn.Linear)}
        r = {"seed": seed, "stages_bytes": stages,
             "stage_ratios": {k: dense / v for k, v in stages.items()},
             "ratio": dense / stages["+huffman"], "sparsity": sparsity,
             "negative_zeros_after_prune": neg_zeros,
             "breakdown": _split(c), "acc_fp32": acc0, "acc_pruned": accp, "acc_final": accc,
             "drop_points": 100 * (acc0 - accc), "seconds": time.perf_counter() - t0}
        runs.append(r)
        sr = r["stage_ratios"]
        rows.append([seed, " ".join(f"{100 * s:.1f}" for s in sparsity.values()),
                     f"{sr['pruned']:.1f}x", f"{sr['pruned (+0.0 zeros)']:.1f}x",
                     f"{sr['pruned+clustered']:.1f}x",
                     f"{sr['+huffman']:.1f}x", f"{100 * acc0:.1f}", f"{100 * accp:.1f}",
                     f"{100 * accc:.1f}"])
    table(["seed", "sparsity % (fc1 fc2 fc3)", "pruned", "pruned, +0.0", "+cluster 5b",
           "+Huffman", "acc fp32",
           "acc pruned", "acc final"], rows)
    b = runs[0]["breakdown"]
    log(f"  bytes of the final file (seed {runs[0]['seed']}): positions {b['positions']:,}, "
        f"indices {b['indices']:,}, codebooks {b['codebooks']:,}, biases {b['biases']:,}, "
        f"raw {b['raw_values']:,}, header {b['header']:,} = {b['total']:,}")
    log(f"  encodings: {b['encodings']}")
    if any(r["negative_zeros_after_prune"] for r in runs):
        n0 = runs[0]["negative_zeros_after_prune"]
        log(f"  note: the pruned models hold -0.0 weights ({n0:,} in seed {runs[0]['seed']}), "
            f"which storage keeps bit-exactly as nonzeros: the "
            f"'pruned' stage size is inflated by them (clustering writes +0.0)")
    drop = statistics.mean(r["drop_points"] for r in runs)
    ratio = min(r["ratio"] for r in runs)
    met = {"size": ratio >= TARGETS["deep_size"], "accuracy": drop <= TARGETS["deep_drop"]}
    log(f"  mean drop {drop:+.2f} pts, final {ratio:.1f}x smaller; targets met: {met}")
    return {"runs": runs, "mean_drop_points": drop, "size_ratio_min": ratio, "targets_met": met}


def part_binary(a, train, test) -> dict:
    log(f"\n== 4. binary weights, QAT {a.binary_epochs} epochs (straight-through estimator)")
    rows, runs = [], []
    for seed in a.seeds:
        m = trained_lenet(seed, a.epochs, train)
        plain = quantize(m, mode="binary")
        q = quantize(m, mode="binary", qat=train, epochs=a.binary_epochs, lr=1e-3, seed=seed,
                     progress=False)
        acc0, accp, accq = evaluate(m, test), evaluate(plain, test), evaluate(q, test)
        r = {"seed": seed, "size_ratio": size(m) / size(q),
             "payload_ratio": payload(m) / payload(q),
             "acc_fp32": acc0, "acc_no_qat": accp, "acc_qat": accq,
             "drop_points": 100 * (acc0 - accq)}
        runs.append(r)
        rows.append([seed, f"{r['size_ratio']:.1f}x", f"{r['payload_ratio']:.1f}x",
                     f"{100 * acc0:.1f}", f"{100 * accp:.1f}", f"{100 * accq:.1f}"])
    table(["seed", "smaller", "payload smaller", "acc fp32", "acc binary (no QAT)",
           "acc binary QAT"], rows)
    drop = statistics.mean(r["drop_points"] for r in runs)
    ratio = min(r["size_ratio"] for r in runs)
    met = {"size": ratio >= TARGETS["binary_size"], "accuracy": drop <= TARGETS["binary_drop"]}
    log(f"  mean drop {drop:+.2f} pts, size {ratio:.1f}x; targets met: {met}")
    return {"runs": runs, "mean_drop_points": drop, "size_ratio_min": ratio, "targets_met": met}


PARTS = {"int8": part_int8, "uniform": part_uniform, "deep": part_deep, "binary": part_binary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20, help="LeNet-300-100 training epochs")
    p.add_argument("--wide-epochs", type=int, default=3)
    p.add_argument("--cnn-epochs", type=int, default=3)
    p.add_argument("--binary-epochs", type=int, default=10)
    p.add_argument("--runs", type=int, default=40,
                   help="at least this many timed forwards per model (median; more for fast ones)")
    p.add_argument("--out", default=str(RESULTS / "quantize.json"))
    p.add_argument("--cache-dir", default=None,
                   help="keep the trained fp32 models here between runs (a directory)")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    global CACHE_DIR
    CACHE_DIR = Path(a.cache_dir) if a.cache_dir else None
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"unknown part {bad[0]!r} (parts: {', '.join(PARTS)})")
    train, test = mnist_loaders()
    log(f"bench_quantize: LeNet-300-100 x seeds {a.seeds}, {a.epochs} epochs; "
        f"engine {torch.backends.quantized.engine}")
    t0 = time.perf_counter()
    out_path = Path(a.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update({"benchmark": "quantize", "targets": TARGETS})
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "parts", "cache_dir")}
    for name in parts:
        t1 = time.perf_counter()
        results[name] = PARTS[name](a, train, test)
        results[name].update(settings=settings, environment=env(),
                             seconds=time.perf_counter() - t1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    log(f"\nwrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path} "
        f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
