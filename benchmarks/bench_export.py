"""Exported models measured where they run (issue 18): ONNX files written by
``nbcompress.export``, run in ONNX Runtime (CPU execution provider, one intra-op thread).

Sections (each prints a table; all go to benchmarks/results/export.json):

* ``agree``  LeNet-300-100 int8 dynamic and SmallResNet (``reference_cnn``) int8 static
  (``quantize(m, mode="static", calib=train_loader)``, 16 calibration batches), both trained on the
  embedded MNIST subset (4,000 train / 1,000 test), exported with ``check=test_loader``: top-1
  agreement of the ONNX file with the PyTorch model on the 1,000 test digits, and the accuracies
  (fp32 PyTorch, int8 PyTorch, int8 in ONNX Runtime). Target: agreement >= 99.5%.
* ``mlp``    a 1024-4096-1024 MLP (``nn.Sequential(Linear, ReLU, Linear)``, random weights), fp32
  file against the int8 dynamic file, at batch 1 and 64. Targets: int8 >= 2x faster, file
  >= 3.5x smaller.
* ``resnet`` SmallResNet at batch 64: fp32 file, int8 static file and the structured 50% file
  (``prune(m, 0.5, structured=True, example_input=x, finetune=train, epochs=1)``), three
  sessions alternated. Targets: int8 >= 1.5x, structured >= 1.8x faster than the fp32 file.
* ``matrix`` every technique's tutorial model (on the trained SmallResNet; int8 dynamic on
  LeNet-300-100, whose Linear layers are what it quantizes) exported and checked: file bytes,
  agreement on the test digits, max abs diff on the example batch, int8 kernels ONNX Runtime
  runs (after its graph optimizations), latency in ONNX Runtime (``ExportReport.latency_ms``,
  batch 64, alternated with eager PyTorch by ``nbcompress.export`` itself).

Timing (``mlp``, ``resnet``): the files' ``InferenceSession``s (one intra-op thread, sequential)
run in turn, round after round, after a warm-up; medians of wall milliseconds and of the thread's
CPU milliseconds (``time.thread_time``: ONNX Runtime with one intra-op thread computes in the
calling thread), which stay meaningful when other processes load the machine. Ratios are on wall
medians (CPU ratios beside them).

    python benchmarks/bench_export.py                 # everything (~4 minutes on 2 cores)
    python benchmarks/bench_export.py --quick         # a smoke run (fewer epochs and runs)
    python benchmarks/bench_export.py --sections mlp,resnet --runs 60
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nbcompress  # noqa: E402
from nbcompress.data import lenet_300_100, mnist_loaders, reference_cnn, train_reference  # noqa: E402
from nbcompress.deploy.runtime import OnnxRunner  # noqa: E402
from nbcompress.train import evaluate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("agree", "mlp", "resnet", "matrix")
TARGETS = {"agreement": 0.995, "mlp_speedup": 2.0, "mlp_size": 3.5, "resnet_int8_speedup": 1.5,
           "resnet_structured_speedup": 1.8}
MATRIX = ("fp32", "unstructured prune", "structured prune", "int8 dynamic", "int8 static",
          "4-bit", "binary", "cluster", "lowrank", "separable", "fp16", "early exit")


@dataclass
class Config:
    """Sizes of a run (``--quick`` and the smoke test shrink them)."""

    runs: int = 40                      # timed rounds (at least)
    warmup: int = 5
    min_seconds: float = 4.0            # keep timing up to 4 * runs rounds until this has passed
    lenet_epochs: int = 8
    resnet_epochs: int = 4
    resnet_width: int = 32
    mlp_dims: tuple = (1024, 4096, 1024)
    mlp_batches: tuple = (1, 64)
    batch: int = 64                     # SmallResNet timing / matrix example batch
    finetune_epochs: int = 1            # structured prune (0: none), early exit heads (>= 1)
    matrix: tuple = MATRIX
    test_batches: int | None = None     # limit the check loader (None: the 1,000 test digits)
    seed: int = 0
    tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="nbc-bench-export-"))


def log(*a):
    print(*a, flush=True)


def table(headers, rows):
    rows = [[_fmt(c) for c in r] for r in rows]
    w = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
         for i, h in enumerate(headers)]
    log("  " + "  ".join(str(h).ljust(w[i]) for i, h in enumerate(headers)))
    for r in rows:
        log("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)))


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.4g}"
    return "-" if c is None else str(c)


def env() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "ort_intra_op_threads": 1, "date": time.strftime("%Y-%m-%d %H:%M")}


# ----------------------------------------------------------------------------- pieces
def ort_alternated(paths: dict, x: torch.Tensor, cfg: Config) -> dict:
    """``{name: {"wall_ms", "cpu_ms", "rounds"}}``: medians of one ``session.run`` of each file
    on ``x``, the sessions run in turn (one intra-op thread each), after ``cfg.warmup`` rounds."""
    sessions = {k: OnnxRunner(p, threads=1).session for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    for _ in range(cfg.warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    wall = {k: [] for k in sessions}
    cpu = {k: [] for k in sessions}
    start, n = time.perf_counter(), 0
    while n < cfg.runs or (n < 4 * cfg.runs and time.perf_counter() - start < cfg.min_seconds):
        for k, s in sessions.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            s.run(None, feeds[k])
            cpu[k].append((time.thread_time() - c0) * 1e3)
            wall[k].append((time.perf_counter() - w0) * 1e3)
        n += 1
    return {k: {"wall_ms": statistics.median(wall[k]), "cpu_ms": statistics.median(cpu[k]),
                "rounds": n} for k in sessions}


def export(model: nn.Module, name: str, x, cfg: Config, check=None, latency=False):
    """``nbcompress.export`` to ``cfg.tmp/name.onnx``: the report."""
    path = os.path.join(cfg.tmp, name.replace(" ", "_") + ".onnx")
    return nbcompress.export(model, path, example_input=x, check=check, latency=latency)


def loaders(cfg: Config):
    tr, te = mnist_loaders(seed=cfg.seed)
    if cfg.test_batches is not None:
        x, y = next(iter(mnist_loaders(test_batch_size=32 * cfg.test_batches)[1]))
        te = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    return tr, te


def trained(cfg: Config, tr) -> dict:
    """The two reference models, trained on the MNIST subset (deterministic)."""
    t0 = time.perf_counter()
    lenet = train_reference(lenet_300_100(seed=cfg.seed), tr, epochs=cfg.lenet_epochs,
                            seed=cfg.seed)
    resnet = train_reference(reference_cnn(width=cfg.resnet_width, seed=cfg.seed), tr,
                             epochs=cfg.resnet_epochs, seed=cfg.seed)
    log(f"trained LeNet-300-100 ({cfg.lenet_epochs} epochs) and SmallResNet width "
        f"{cfg.resnet_width} ({cfg.resnet_epochs} epochs) in {time.perf_counter() - t0:.0f} s")
    return {"lenet": lenet.eval(), "resnet": resnet.eval()}


def example(te, n: int) -> torch.Tensor:
    xs = []
    for x, _ in te:
        xs.append(x)
        if sum(len(t) for t in xs) >= n:
            break
    x = torch.cat(xs)[:n]
    return torch.cat([x] * (n // len(x) + 1))[:n].clone()


def build(name: str, models: dict, tr, x, cfg: Config) -> tuple[str, nn.Module]:
    """``(model name, compressed model)`` of one row of the matrix."""
    m, ft = models["resnet"], cfg.finetune_epochs
    builders = {
        "fp32": lambda: m,
        "unstructured prune": lambda: nbcompress.prune(m, 0.6),
        "structured prune": lambda: nbcompress.prune(
            m, 0.5, structured=True, example_input=x,
            **({"finetune": tr, "epochs": ft} if ft else {})),
        "int8 static": lambda: nbcompress.quantize(m, mode="static", calib=tr),
        "4-bit": lambda: nbcompress.quantize(m, mode="uniform", bits=4, per_channel=True),
        "binary": lambda: nbcompress.quantize(m, mode="binary"),
        "cluster": lambda: nbcompress.quantize(m, mode="cluster", bits=4),
        "lowrank": lambda: nbcompress.lowrank(m, energy=0.8),
        "separable": lambda: nbcompress.lowrank(m, conv="separable"),
        "fp16": lambda: nbcompress.quantize(m, dtype="fp16"),
        "early exit": lambda: nbcompress.early_exit(m, tr, epochs=max(ft, 1), threshold=0.9),
    }
    if name == "int8 dynamic":
        return "LeNet-300-100", nbcompress.quantize(models["lenet"], mode="dynamic")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return "SmallResNet", builders[name]()


def _acc(model: nn.Module, te) -> float:
    return float(evaluate(model, te))


# ----------------------------------------------------------------------------- sections
def sec_agree(models: dict, tr, te, cfg: Config) -> dict:
    log("\n== agree: int8 files vs their PyTorch models on the test digits ==")
    out = {}
    for key, label, mode, base in (("lenet_int8_dynamic", "LeNet-300-100", "dynamic", "lenet"),
                                   ("resnet_int8_static", "SmallResNet", "static", "resnet")):
        fp32 = models[base]
        x = example(te, cfg.batch)
        q = (nbcompress.quantize(fp32, mode="dynamic") if mode == "dynamic" else
             nbcompress.quantize(fp32, mode="static", calib=tr))
        r = export(q, f"agree_{key}", x, cfg, check=te)
        c = r.check
        out[key] = {"model": label, "mode": mode, "agreement": c["agreement"],
                    "agree": c["agree"], "n": c["n"], "fp32_accuracy": _acc(fp32, te),
                    "int8_accuracy_pytorch": c["model_accuracy"],
                    "int8_accuracy_onnxruntime": c["accuracy"], "max_abs_diff": r.max_abs_diff,
                    "bytes": r.bytes, "int8_kernels": r.int8_kernels, "kernels": r.kernels,
                    "met": c["agreement"] >= TARGETS["agreement"]}
    table(["model", "int8", "agreement", "of", "fp32 acc", "int8 acc (torch)", "int8 acc (ORT)",
           "max |diff|", "int8 kernels", "met"],
          [[v["model"], v["mode"], v["agreement"], v["n"], v["fp32_accuracy"],
            v["int8_accuracy_pytorch"], v["int8_accuracy_onnxruntime"], v["max_abs_diff"],
            v["int8_kernels"], v["met"]] for v in out.values()])
    return out


def sec_mlp(cfg: Config) -> dict:
    d_in, d_h, d_out = cfg.mlp_dims
    log(f"\n== mlp: {d_in}-{d_h}-{d_out} MLP, fp32 file vs int8 dynamic file in ONNX Runtime ==")
    torch.manual_seed(cfg.seed)
    m = nn.Sequential(nn.Linear(d_in, d_h), nn.ReLU(), nn.Linear(d_h, d_out)).eval()
    q = nbcompress.quantize(m, mode="dynamic")
    x = torch.randn(max(cfg.mlp_batches), d_in)
    r32, r8 = export(m, "mlp_fp32", x, cfg), export(q, "mlp_int8", x, cfg)
    out = {"dims": list(cfg.mlp_dims), "fp32_bytes": r32.bytes, "int8_bytes": r8.bytes,
           "size_ratio": r32.bytes / r8.bytes, "int8_kernels": r8.kernels,
           "fp32_kernels": r32.kernels, "max_abs_diff": r8.max_abs_diff,
           "rel_diff": r8.rel_diff, "batches": {}}
    rows = []
    for b in cfg.mlp_batches:
        t = ort_alternated({"fp32": r32.path, "int8": r8.path}, torch.randn(b, d_in), cfg)
        sp = t["fp32"]["wall_ms"] / t["int8"]["wall_ms"]
        out["batches"][str(b)] = {"fp32": t["fp32"], "int8": t["int8"], "speedup": sp,
                                  "cpu_speedup": t["fp32"]["cpu_ms"] / t["int8"]["cpu_ms"]}
        rows.append([b, t["fp32"]["wall_ms"], t["int8"]["wall_ms"], sp,
                     out["batches"][str(b)]["cpu_speedup"], t["fp32"]["rounds"]])
    table(["batch", "fp32 ms", "int8 ms", "speedup", "cpu speedup", "rounds"], rows)
    out["speedup_met"] = all(v["speedup"] >= TARGETS["mlp_speedup"]
                             for v in out["batches"].values())
    out["size_met"] = out["size_ratio"] >= TARGETS["mlp_size"]
    log(f"  files: fp32 {r32.bytes:,} B, int8 {r8.bytes:,} B ({out['size_ratio']:.2f}x smaller; "
        f"target {TARGETS['mlp_size']}x); ORT runs {r8.kernels}")
    return out


def sec_resnet(models: dict, tr, te, cfg: Config) -> dict:
    log(f"\n== resnet: SmallResNet at batch {cfg.batch} in ONNX Runtime ==")
    m = models["resnet"]
    x = example(te, cfg.batch)
    _, q = build("int8 static", models, tr, x, cfg)
    _, s = build("structured prune", models, tr, x, cfg)
    reps = {"fp32": export(m, "resnet_fp32", x, cfg), "int8 static": export(q, "resnet_int8", x, cfg),
            "structured 50%": export(s, "resnet_structured", x, cfg, check=te)}
    t = ort_alternated({k: r.path for k, r in reps.items()}, x, cfg)
    out = {"batch": cfg.batch, "width": cfg.resnet_width, "rows": {}}
    rows = []
    for k, r in reps.items():
        sp = t["fp32"]["wall_ms"] / t[k]["wall_ms"]
        out["rows"][k] = {**t[k], "speedup": sp, "cpu_speedup": t["fp32"]["cpu_ms"] / t[k]["cpu_ms"],
                          "bytes": r.bytes, "kernels": r.kernels, "int8_kernels": r.int8_kernels}
        rows.append([k, r.bytes, t[k]["wall_ms"], t[k]["cpu_ms"], sp,
                     out["rows"][k]["cpu_speedup"], r.int8_kernels])
    table(["file", "bytes", "wall ms", "cpu ms", "speedup", "cpu speedup", "int8 kernels"], rows)
    out["structured_accuracy"] = reps["structured 50%"].check["accuracy"]
    out["fp32_accuracy"] = _acc(m, te)
    out["int8_met"] = out["rows"]["int8 static"]["speedup"] >= TARGETS["resnet_int8_speedup"]
    out["structured_met"] = (out["rows"]["structured 50%"]["speedup"]
                             >= TARGETS["resnet_structured_speedup"])
    log(f"  structured 50% (1 fine-tune epoch): accuracy {out['structured_accuracy']:.3f} vs "
        f"fp32 {out['fp32_accuracy']:.3f}")
    return out


def sec_matrix(models: dict, tr, te, cfg: Config) -> list:
    log(f"\n== matrix: every technique exported to ONNX, checked on the test digits "
        f"(latency: batch {cfg.batch}, one thread) ==")
    x = example(te, cfg.batch)
    rows = []
    for name in cfg.matrix:
        model_name, m = build(name, models, tr, x, cfg)
        try:
            r = export(m, f"matrix_{name}", x, cfg, check=te, latency=True)
        except Exception as e:  # noqa: BLE001 - a refused export is a row of the table
            rows.append({"technique": name, "model": model_name, "error": str(e)[:200]})
            continue
        rows.append({"technique": name, "model": model_name, "bytes": r.bytes,
                     "agreement": r.agreement, "accuracy_onnxruntime": r.check["accuracy"],
                     "accuracy_pytorch": r.check["model_accuracy"],
                     "max_abs_diff": r.max_abs_diff, "int8_kernels": r.int8_kernels,
                     "float_kernels": r.float_kernels, "ort_ms": r.latency_ms,
                     "eager_ms": r.eager_latency_ms, "notes": r.notes})
    table(["technique", "model", "bytes", "agreement", "acc ORT", "max |diff|", "int8 kern",
           "ORT ms", "eager ms"],
          [[r["technique"], r["model"], r.get("bytes"), r.get("agreement"),
            r.get("accuracy_onnxruntime"), r.get("max_abs_diff"), r.get("int8_kernels"),
            r.get("ort_ms"), r.get("eager_ms") if "error" not in r else r["error"][:60]]
           for r in rows])
    return rows


def targets(res: dict) -> dict:
    """Each target of the issue: measured value, target, met."""
    out = {}
    for k, v in res.get("agree", {}).items():
        out[f"agreement {k}"] = {"value": v["agreement"], "target": TARGETS["agreement"],
                                 "met": v["met"]}
    if "mlp" in res:
        for b, v in res["mlp"]["batches"].items():
            out[f"mlp int8 speedup batch {b}"] = {"value": v["speedup"],
                                                  "target": TARGETS["mlp_speedup"],
                                                  "met": v["speedup"] >= TARGETS["mlp_speedup"]}
        out["mlp int8 size ratio"] = {"value": res["mlp"]["size_ratio"],
                                      "target": TARGETS["mlp_size"], "met": res["mlp"]["size_met"]}
    if "resnet" in res:
        rs = res["resnet"]["rows"]
        out["resnet int8 static speedup"] = {"value": rs["int8 static"]["speedup"],
                                             "target": TARGETS["resnet_int8_speedup"],
                                             "met": res["resnet"]["int8_met"]}
        out["resnet structured 50% speedup"] = {"value": rs["structured 50%"]["speedup"],
                                                "target": TARGETS["resnet_structured_speedup"],
                                                "met": res["resnet"]["structured_met"]}
    if "matrix" in res:
        ok = [r for r in res["matrix"] if "error" not in r]
        out["matrix exports"] = {"value": len(ok), "target": len(res["matrix"]),
                                 "met": len(ok) == len(res["matrix"])}
    return out


def run(cfg: Config, sections=SECTIONS) -> dict:
    torch.set_num_threads(1)
    res: dict = {"env": env(), "config": {k: v for k, v in asdict(cfg).items() if k != "tmp"}}
    tr, te = loaders(cfg)
    models = trained(cfg, tr) if set(sections) & {"agree", "resnet", "matrix"} else {}
    t0 = time.perf_counter()
    if "agree" in sections:
        res["agree"] = sec_agree(models, tr, te, cfg)
    if "mlp" in sections:
        res["mlp"] = sec_mlp(cfg)
    if "resnet" in sections:
        res["resnet"] = sec_resnet(models, tr, te, cfg)
    if "matrix" in sections:
        res["matrix"] = sec_matrix(models, tr, te, cfg)
    res["targets"] = targets(res)
    res["seconds"] = time.perf_counter() - t0
    log("\n== targets ==")
    table(["target", "value", "needed", "met"],
          [[k, v["value"], v["target"], v["met"]] for k, v in res["targets"].items()])
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer epochs and rounds")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--runs", type=int, default=None, help="timed rounds (default 40)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/export.json; --quick: "
                         "export_quick.json)")
    a = ap.parse_args(argv)
    sections = tuple(s.strip() for s in a.sections.split(",") if s.strip())
    bad = set(sections) - set(SECTIONS)
    if bad:
        ap.error(f"unknown sections {sorted(bad)}; choose from {', '.join(SECTIONS)}")
    cfg = Config()
    if a.quick:
        cfg = Config(runs=10, min_seconds=0.5, lenet_epochs=2, resnet_epochs=1)
    if a.runs:
        cfg.runs = a.runs
    t0 = time.perf_counter()
    try:
        res = run(cfg, sections)
    finally:
        shutil.rmtree(cfg.tmp, ignore_errors=True)
    res["total_seconds"] = time.perf_counter() - t0
    res["quick"] = a.quick
    out = write(res, a.out or RESULTS / ("export_quick.json" if a.quick else "export.json"))
    log(f"\nwrote {out} ({res['total_seconds']:.0f} s)")
    return res


def write(res: dict, path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
