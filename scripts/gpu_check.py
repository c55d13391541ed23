"""Every magic on a GPU, in one short run: what issue 20 asks a lent GPU to prove.

    python scripts/gpu_check.py                      # on CUDA (the device machine)
    python scripts/gpu_check.py --device cpu --quick # the same checks on the CPU (CI runs this)

Sections, each timed and kept apart (one failing does not stop the others):

* ``magics``: every magic through a real IPython shell on the device: weight, 2:4, learned and
  structured pruning with fine-tuning, quantize in every mode (automatic int8, dynamic, uniform
  4-bit, k-means, k-means under a byte budget, binary, bf16, QAT), low rank, distillation, early
  exits; after each step the model
  still lives on the device it came from, and ``%undo`` / ``%redo`` give back the exact tensors.
* ``amp``: ``fit`` in fp32 against mixed precision (bf16 autocast; on CUDA also fp16 with a
  gradient scaler): samples per second and accuracy.
* ``budget``: a history whose host budget is forced to a few bytes spills its versions to disk;
  the GPU holds only the live model, and undo brings each version back onto the GPU bit-identical.
* ``speed``: a 1024-4096-1024 MLP and a BERT-base-sized encoder at batch 64: fp32 against bf16,
  int8 (``torch._int_mm``) and 2:4 sparsity (the largest Linear layers alone, too), timed with CUDA
  events (synchronised), warm-up, alternated, medians; outputs compared.

Prints a table and writes every figure to ``--out`` (JSON). Exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NBCOMPRESS_DISPLAY", "text")
os.environ.setdefault("MPLBACKEND", "Agg")


# ----------------------------------------------------------------------------------- helpers

def _state(model: nn.Module) -> dict:
    """Every tensor of the model, copied to the CPU (torch.ao's packed int8 weights unpacked:
    their state_dict holds them packed, with dtype entries beside)."""
    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, tuple):
            v = tuple(t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t for t in v)
        elif isinstance(v, torch.Tensor):
            v = v.detach().to("cpu", copy=True)
            if v.is_quantized:
                v = (v.int_repr(), v.q_per_channel_scales() if v.qscheme() in (
                    torch.per_channel_affine, torch.per_channel_symmetric) else v.q_scale())
        out[k] = v
    return out


def _equal(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)


def _devices(model: nn.Module) -> set[str]:
    """Where the model's tensors are (torch.ao's packed int8 weights included, through the
    state_dict that unpacks them)."""
    out = set()
    for v in model.state_dict().values():
        for t in (v if isinstance(v, tuple) else (v,)):
            if isinstance(t, torch.Tensor):
                out.add(t.device.type)
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_alternated(fns: dict, dev: torch.device, runs: int, warmup: int = 5) -> dict:
    """Median milliseconds of each callable, run alternately after a warm-up; CUDA events on a
    GPU (the wall clock after a synchronise elsewhere)."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        _sync(dev)
        for _ in range(runs):
            for k, f in fns.items():
                if dev.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), \
                        torch.cuda.Event(enable_timing=True)
                    start.record()
                    f()
                    end.record()
                    end.synchronize()
                    times[k].append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    f()
                    times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


class Section:
    """One section's figures and verdict; ``check`` records a named condition."""

    def __init__(self, name: str):
        self.name, self.figures, self.failures = name, {}, []
        self.t0 = time.perf_counter()

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        if not ok:
            self.failures.append(f"{what}" + (f": {detail}" if detail else ""))
        return ok

    def result(self, error: str | None = None) -> dict:
        out = {"ok": not self.failures and error is None, "seconds": round(
            time.perf_counter() - self.t0, 2), "failures": self.failures, **self.figures}
        if error:
            out["error"] = error
        return out


# ----------------------------------------------------------------------------------- magics

def _shell():
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbcompress")
    return ip


def check_magics(dev: torch.device, quick: bool) -> Section:
    from nbcompress import data
    from nbcompress.techniques.prune.semisparse import SemiSparseLinear

    sec = Section("magics")
    ip = _shell()
    train, test = data.mnist_loaders(batch_size=64)
    if quick:
        train = _subset(train, 512)
        test = _subset(test, 500)
    ns = ip.user_ns
    ns.update(train=train, test=test)
    d = f" --device {dev.type} --no-progress"
    # (no local variable may be called like a magic's NAME: IPython's run_line_magic hands the
    # magics this function's locals, which they search before the shell's namespace)
    base_lenet = data.lenet_300_100(seed=0)
    data.train_reference(base_lenet, train, epochs=1 if quick else 3, seed=0)
    base_cnn = data.reference_cnn(width=16, seed=0)
    data.train_reference(base_cnn, train, epochs=1, seed=0)
    steps = [
        ("lenet", "prune", "lenet 0.9 --finetune train --epochs 1" + d),
        ("lenet", "prune", "lenet --pattern 2:4" + d),
        ("lenet", "prune", "lenet --learned --finetune train --learn-epochs 1 --epochs 1" + d),
        ("cnn", "prune", "cnn 0.5 --structured --finetune train --epochs 1" + d),
        ("lenet", "quantize", "lenet" + d),
        ("lenet", "quantize", "lenet --mode dynamic" + d),
        ("lenet", "quantize", "lenet --mode uniform --bits 4" + d),
        ("lenet", "quantize", "lenet --mode cluster --bits 4" + d),
        ("lenet", "quantize", "lenet --mode cluster --budget-bytes 300000 --qat train" + d),
        ("lenet", "quantize", "lenet --mode binary" + d),
        ("lenet", "quantize", "lenet --dtype bf16" + d),
        ("lenet", "quantize", "lenet --bits 4 --qat train --epochs 1" + d),
        ("lenet", "lowrank", "lenet --ratio 0.5" + d),
        ("student", "distill", "student --teacher teacher --data train --epochs 1" + d),
        ("cnn", "earlyexit", "cnn --data train --exits layer1 --threshold 0.9 --epochs 1" + d),
    ]
    rows = []
    for var, magic, line in steps:
        ns["lenet"] = copy.deepcopy(base_lenet).to(dev)
        ns["cnn"] = copy.deepcopy(base_cnn).to(dev)
        ns["teacher"] = copy.deepcopy(base_cnn).to(dev)
        ns["student"] = data.reference_cnn(width=8, seed=1).to(dev)
        ip.run_line_magic("nbcompress", f"{var} --eval test")
        before = _state(ns[var])
        row = {"magic": f"%{magic} {line}"}
        t0 = time.perf_counter()
        try:
            rep = ip.run_line_magic(magic, line)
        except BaseException as e:  # noqa: BLE001 - a magic's failure is this check's finding
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
            sec.check(row["magic"], False, row["error"])
            rows.append(row)
            continue
        row["seconds"] = round(time.perf_counter() - t0, 2)
        out = ns[var]
        after = _state(out)
        where = _devices(out)
        row["devices"] = sorted(where)
        row["accuracy"] = getattr(getattr(rep, "after", None), "accuracy", None)
        row["ok"] = sec.check(f"{row['magic']}: result on {dev.type}", where <= {dev.type},
                              f"tensors on {sorted(where)}")
        try:
            ip.run_line_magic("undo", var)
            back = _state(ns[var])
            row["undo_identical"] = _same(before, back) and _devices(ns[var]) <= {dev.type}
            ip.run_line_magic("redo", var)
            row["redo_identical"] = _same(after, _state(ns[var]))
        except BaseException as e:  # noqa: BLE001 - recorded as this step's failure
            row["undo_redo_error"] = f"{type(e).__name__}: {e}"
            row["undo_identical"] = row["redo_identical"] = False
        sec.check(f"{row['magic']}: undo bit-identical", row["undo_identical"])
        sec.check(f"{row['magic']}: redo bit-identical", row["redo_identical"])
        if "--pattern 2:4" in line:
            row["semi_sparse_layers"] = sum(isinstance(m, SemiSparseLinear)
                                            for m in ns[var].modules())
        if "--mode dynamic" in line or line.strip() == f"lenet{d}":
            row["layer_types"] = sorted({type(m).__name__ for m in ns[var].modules()
                                         if not list(m.children())})
        rows.append(row)
        ip._nbcompress_workspace.clear()        # the next step starts from a fresh history
    sec.figures["steps"] = rows
    return sec


def _subset(loader, n: int):
    from torch.utils.data import DataLoader, Subset

    ds = Subset(loader.dataset, range(min(n, len(loader.dataset))))
    return DataLoader(ds, batch_size=loader.batch_size, shuffle=False)


# ----------------------------------------------------------------------------------- amp

def check_amp(dev: torch.device, quick: bool) -> Section:
    from nbcompress import data, train

    sec = Section("amp")
    tr, te = data.mnist_loaders(batch_size=128)
    if quick:
        tr, te = _subset(tr, 512), _subset(te, 250)
    epochs = 1 if quick else 4
    modes = {"fp32": dict(amp=False), "bf16 autocast": dict(amp=True)}
    if dev.type == "cuda":
        modes["fp16 + GradScaler"] = dict(amp=True, _fp16=True)
    res = {}
    for name, kw in modes.items():
        fp16 = kw.pop("_fp16", False)
        m = data.reference_cnn(width=8 if quick else 32, seed=0).to(dev)
        real = torch.cuda.is_bf16_supported
        if fp16:        # _amp_setup picks fp16 + a scaler where bf16 is missing: make it so
            torch.cuda.is_bf16_supported = lambda *a, **k: False
        try:
            _sync(dev)
            t0 = time.perf_counter()
            hist = train.fit(m, tr, epochs=epochs, seed=0, progress=False, device=dev, **kw)
            _sync(dev)
            secs = time.perf_counter() - t0
        finally:
            torch.cuda.is_bf16_supported = real
        acc = train.evaluate(m, te, device=dev)
        n = len(tr.dataset) * epochs
        res[name] = {"samples_per_s": round(n / secs, 1), "accuracy": round(acc, 4),
                     "loss": round(hist[-1]["loss"], 4)}
    base = res["fp32"]
    for name, r in res.items():
        r["speedup"] = round(r["samples_per_s"] / base["samples_per_s"], 3)
        r["accuracy_delta_pts"] = round(100 * (r["accuracy"] - base["accuracy"]), 2)
        if name != "fp32":
            sec.check(f"{name}: trains (accuracy within 5 points of fp32)",
                      abs(r["accuracy_delta_pts"]) < 5, f"{r['accuracy_delta_pts']} pts")
    sec.figures["runs"] = res
    return sec


# ----------------------------------------------------------------------------------- budget

def check_budget(dev: torch.device, quick: bool) -> Section:
    import nbcompress
    from nbcompress.history import History

    sec = Section("budget")
    torch.manual_seed(0)
    width = 256 if quick else 2048
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).to(dev)
    x = torch.randn(4, width)
    h = History(model, name="budget", example_input=x, host_budget_bytes=1, device=str(dev),
                measure_latency=False)
    states = [_state(h.current)]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base_alloc = torch.cuda.memory_allocated(dev)
    for amount in (0.5, 0.8):
        h.apply(nbcompress.PruneConfig(amount=amount), progress=False)
        states.append(_state(h.current))
    spilled = sum(v.where == "disk" for v in h.versions)
    sec.figures["versions"] = len(h.versions)
    sec.figures["spilled_to_disk"] = spilled
    sec.check("versions spilled to disk under a 1-byte budget", spilled >= len(h.versions) - 1,
              f"{spilled} of {len(h.versions)}")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        extra = torch.cuda.memory_allocated(dev) - base_alloc
        live = sum(t.numel() * t.element_size() for t in h.current.state_dict().values())
        sec.figures["gpu_bytes_beyond_first_model"] = int(extra)
        sec.figures["live_model_bytes"] = int(live)
        sec.check("the GPU holds no version but the live one", extra <= 0.1 * live + (1 << 20),
                  f"{extra} bytes beyond the first model")
    ok = True
    for k in (1, 0):
        h.undo()
        ok &= _same(states[k], _state(h.current)) and _devices(h.current) <= {dev.type}
    for k in (1, 2):
        h.redo()
        ok &= _same(states[k], _state(h.current)) and _devices(h.current) <= {dev.type}
    sec.figures["undo_redo_identical_on_device"] = bool(ok)
    sec.check("undo / redo from disk give the exact tensors on the device", ok)
    h.close()
    return sec


# ----------------------------------------------------------------------------------- speed

def _bert(quick: bool):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=128 if quick else 768, num_hidden_layers=2 if quick else 12,
                     num_attention_heads=2 if quick else 12,
                     intermediate_size=512 if quick else 3072, vocab_size=1000)
    torch.manual_seed(0)
    return BertModel(cfg).eval()


class _Logits(nn.Module):
    """A BERT encoder's last hidden state as a tensor (what the timings and comparisons use)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids):
        return self.bert(input_ids=ids).last_hidden_state


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def check_speed(dev: torch.device, quick: bool) -> Section:
    import nbcompress
    from nbcompress.techniques.prune.semisparse import STATS, SemiSparseLinear, dense_only

    sec = Section("speed")
    runs = 3 if quick else 50
    batch = 64
    half = torch.bfloat16
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).to(dev).eval()
    if quick:
        mlp = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 128)).to(dev).eval()
    x = torch.randn(batch, mlp[0].in_features, device=dev)
    bert = _Logits(_bert(quick)).to(dev).eval()
    ids = torch.randint(0, 1000, (batch, 32 if quick else 128), device=dev)
    for name, model, inp in (("mlp", mlp, x), ("bert", bert, ids)):
        variants = {"fp32": model}
        notes = {}
        pruned = nbcompress.prune(model, pattern="2:4", device=dev).eval()
        for label, make in (("bf16", lambda: nbcompress.quantize(model, dtype="bf16", device=dev)),
                            ("int8", lambda: nbcompress.quantize(model, mode="dynamic", device=dev)),
                            ("2:4", lambda: pruned),
                            ("2:4 bf16", lambda: nbcompress.quantize(pruned, dtype="bf16",
                                                                     device=dev))):
            try:
                variants[label] = make().eval()
            except Exception as e:  # noqa: BLE001 - recorded, the other variants still run
                notes[label] = f"{type(e).__name__}: {e}"
                sec.check(f"{name} {label}: builds", False, notes[label])
        with torch.inference_mode():     # 2:4 against the same zeros run dense: the kernel's error
            ref = model(inp)
            with dense_only():
                ref_24 = pruned(inp)
            errs = {k: round(_rel_err(m(inp), ref_24 if k.startswith("2:4") else ref), 5)
                    for k, m in variants.items()}
        sec.figures.setdefault("layer_types", {})[name] = {
            k: sorted({type(m).__name__ for m in v.modules() if not list(m.children())
                       and type(m).__name__ not in ("Dropout", "ReLU", "GELU", "Tanh")})
            for k, v in variants.items()}
        STATS.update(sparse=0, dense=0)
        ms = time_alternated({k: (lambda m=m: m(inp)) for k, m in variants.items()}, dev, runs)
        sec.figures[name] = {
            "batch": batch, "ms": {k: round(v, 4) for k, v in ms.items()},
            "speedup_vs_fp32": {k: round(ms["fp32"] / v, 3) for k, v in ms.items()},
            "rel_error_vs_fp32": errs, "semi_sparse_calls": dict(STATS), "errors": notes}
        for k, e in errs.items():
            sec.check(f"{name} {k}: output within 10% of fp32", e < 0.1, f"rel error {e}")
    # the largest Linear layers alone: dense against 2:4 (bf16)
    layers = {}
    shapes = [(768, 3072), (3072, 768), (4096, 1024)] if not quick else [(128, 512)]
    for n_in, n_out in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(n_in, n_out).to(dev, half).eval()
        sparse = copy.deepcopy(dense)
        nbcompress.techniques.prune.weights.prune_n_m_([("l", sparse)], 2, 4)
        masked = copy.deepcopy(sparse)
        sparse.__class__ = SemiSparseLinear
        xx = torch.randn(batch * 128 if not quick else batch, n_in, device=dev, dtype=half)
        STATS.update(sparse=0, dense=0)
        with torch.inference_mode():
            err = _rel_err(sparse(xx), masked(xx))
        ms = time_alternated({"dense": lambda: dense(xx), "2:4": lambda: sparse(xx)}, dev, runs)
        layers[f"{n_in}x{n_out}"] = {"rows": xx.shape[0], "ms": ms,
                                     "speedup": round(ms["dense"] / ms["2:4"], 3),
                                     "rel_error_vs_masked_dense": round(err, 6),
                                     "semi_sparse_calls": dict(STATS)}
        sec.check(f"2:4 {n_in}x{n_out}: same outputs as the masked dense layer", err < 1e-2,
                  f"rel error {err}")
    sec.figures["linear_2to4"] = layers
    return sec


# ----------------------------------------------------------------------------------- main

SECTIONS = {"magics": check_magics, "amp": check_amp, "budget": check_budget,
            "speed": check_speed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes and few runs (CI)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu (the same checks on the CPU)")
        return 2
    import nbcompress

    env = {"device": str(dev), "torch": torch.__version__, "nbcompress": nbcompress.__version__,
           "python": platform.python_version(), "quick": args.quick}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["capability"] = list(torch.cuda.get_device_capability(dev))
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    out = {"env": env}
    for name in args.sections.split(","):
        print(f"== {name}", flush=True)
        try:
            sec = SECTIONS[name](dev, args.quick)
            out[name] = sec.result()
        except Exception as e:  # noqa: BLE001 - a section's crash is its finding
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=6)}
        r = out[name]
        print(f"   {'ok' if r['ok'] else 'FAILED'} in {r.get('seconds', '?')} s", flush=True)
        for f in r.get("failures", []) + ([r["error"]] if "error" in r else []):
            print(f"   - {f}", flush=True)
    _print_table(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(v.get("ok") for k, v in out.items() if k != "env") else 1


def _print_table(out: dict) -> None:
    for row in out.get("magics", {}).get("steps", []):
        print(f"  {'ok ' if row.get('ok') and row.get('undo_identical') else 'BAD'} "
              f"{row['magic'][:70]:70s} {row.get('seconds', '-')} s")
    for name in ("mlp", "bert"):
        r = out.get("speed", {}).get(name)
        if r:
            print(f"  {name}: " + ", ".join(f"{k} {v}x" for k, v in r["speedup_vs_fp32"].items()))
    for shape, r in out.get("speed", {}).get("linear_2to4", {}).items():
        print(f"  2:4 {shape}: {r['speedup']}x over dense (sparse calls {r['semi_sparse_calls']})")
    for name, r in out.get("amp", {}).get("runs", {}).items():
        print(f"  fit {name}: {r['speedup']}x, accuracy {r['accuracy']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
