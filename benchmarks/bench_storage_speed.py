"""Storage speed at the sizes users have (issue 16, part 2): ``nbcompress.save`` / ``load`` next to
``torch.save(model.state_dict())`` / ``torch.load``, ``packed_size`` (what ``measure`` asks for
``packed_bytes``) the first time and after a one-layer change, and the peak memory each holds.

Models: a 25.2M-parameter MLP (six ``nn.Linear(2048, 2048)``, fp32, 100 MB) dense, pruned 50%
(``nbcompress.prune``) and int8-quantized (``nbcompress.quantize``). One thread; each pair
alternated run by run (a burst of load elsewhere hits both alike), medians of ``--repeats``; wall
time and the thread's CPU time (``time.thread_time``, which stays meaningful on a loaded machine).
``save`` is timed cold (``MEMO`` cleared: nothing remembered, every tensor planned) and warm (the
plans remembered from the previous save; the bytes are produced again). Files are rewritten in
place each run for both libraries (both pay for dropping the previous file's pages).

Peak memory: a fresh subprocess per operation; ``VmHWM`` reset through ``/proc/self/clear_refs``
once the model is in memory, then the peak above the resident size before the operation (for a
load, above the resident size plus the loaded model's tensor bytes).

    python benchmarks/bench_storage_speed.py                 # 25M: dense, pruned, int8
    python benchmarks/bench_storage_speed.py --repeats 3 --models dense

Prints a table and writes benchmarks/results/storage_speed.json. ``storage_rows(model, tmpdir)``
is the same measurement for one model (``benchmarks/bench_scale.py`` imports it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nbcompress  # noqa: E402
from nbcompress.fingerprint import MEMO  # noqa: E402
from nbcompress.storage import packed_size  # noqa: E402


def mlp25m(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)])


def tensor_bytes(path: str) -> int:
    """Bytes of the tensors a saved model holds (as stored: a packed int8 layer's int8 weight)."""
    return sum(r["numel"] * torch.empty(0, dtype=getattr(torch, r["dtype"])).element_size()
               for r in nbcompress.storage.describe(path))


def _timed(fn) -> tuple[float, float]:
    """(wall ms, CPU ms of the whole process: a load checks its CRC on worker threads too)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


def _alternate(fns: dict, repeats: int) -> dict:
    """{name: {"wall_ms", "cpu_ms"}}: medians, the functions called in turn each round. Each call
    starts with the process's freed memory handed back to the system (as in a fresh process):
    otherwise whether a load's 100 MB of new tensors are faulted in page by page (24,000 faults,
    ~50 ms here) or land in memory the previous call freed depends on the allocator's state,
    and the same two loaders measured 1.1x apart in one run and 3x in the next."""
    from nbcompress.records import _release_freed_memory

    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _release_freed_memory()
            w, c = _timed(fn)
            wall[k].append(w)
            cpu[k].append(c)
    return {k: {"wall_ms": round(statistics.median(wall[k]), 1),
                "cpu_ms": round(statistics.median(cpu[k]), 1)} for k in fns}


def _largest_tensor(model: nn.Module) -> tuple[str, torch.Tensor]:
    owned = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    cands = [(k, t) for k, t in model.state_dict(keep_vars=True).items()
             if isinstance(t, torch.Tensor) and id(t) in owned]
    if not cands:                           # (packed layers: their exported tensors)
        cands = [(k, t) for m in model.modules() if hasattr(m, "nbc_export")
                 for k, t in m.nbc_export()[1].items()]
    return max(cands, key=lambda kt: kt[1].numel())


_PEAK = r"""
import os, sys, time, torch, nbcompress
torch.set_num_threads(1)
op, nbc, pt, out = sys.argv[1:5]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
if op in ("save", "torch.save"):
    m = nbcompress.load(nbc)
    sd = m.state_dict()
open("/proc/self/clear_refs", "w").write("5")       # peak := now
before = status("VmRSS")
if op == "save":
    nbcompress.save(m, out)
elif op == "torch.save":
    torch.save(sd, out)
elif op == "load":
    m = nbcompress.load(nbc)
else:
    sd = torch.load(pt)
print(status("VmHWM") - before)
"""


def peak_extra(op: str, nbc: str, pt: str, out: str) -> int:
    """Peak resident bytes an operation adds in a fresh process (see the module docstring)."""
    r = subprocess.run([sys.executable, "-c", _PEAK, op, nbc, pt, out], capture_output=True,
                       text=True, timeout=600, cwd=str(ROOT))
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1])
    return int(r.stdout.strip().splitlines()[-1])


def storage_rows(model: nn.Module, tmpdir, *, label: str = "model", repeats: int = 5,
                 peak: bool = True) -> list[dict]:
    """One dict per measurement of ``model``: save / load against torch, packed_size first and
    after a one-layer change, peak memory. Ratios are nbcompress over torch (wall and CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = Path(tmpdir)
    nbc, pt = str(tmp / f"{label}.nbc"), str(tmp / f"{label}.pt")
    rows: list[dict] = []

    def row(what, ours, theirs=None, **extra):
        r = {"model": label, "what": what, "tensor_mb": round(nbytes / 2**20, 1), **ours}
        if theirs is not None:
            r.update(torch_wall_ms=theirs["wall_ms"], torch_cpu_ms=theirs["cpu_ms"],
                     ratio_wall=round(ours["wall_ms"] / theirs["wall_ms"], 2),
                     ratio_cpu=round(ours["cpu_ms"] / max(theirs["cpu_ms"], 1e-3), 2))
        r.update(extra)
        rows.append(r)

    def cold_save():
        MEMO.clear()
        nbcompress.save(model, nbc, progress=False)

    try:
        sd = model.state_dict()
        nbcompress.save(model, nbc, progress=False)           # warm-up: files and imports
        torch.save(sd, pt)
        nbytes = tensor_bytes(nbc)
        t = _alternate({"torch": lambda: torch.save(sd, pt), "cold": cold_save,
                        "warm": lambda: nbcompress.save(model, nbc, progress=False)}, repeats)
        size = os.path.getsize(nbc)
        row("save (cold)", t["cold"], t["torch"], file_mb=round(size / 2**20, 2),
            torch_file_mb=round(os.path.getsize(pt) / 2**20, 2))
        row("save (plans remembered)", t["warm"], t["torch"])
        t = _alternate({"torch": lambda: torch.load(pt),
                        "ours": lambda: nbcompress.load(nbc, progress=False)}, repeats)
        row("load", t["ours"], t["torch"])

        def first():
            MEMO.clear()
            assert packed_size(model) == size
        name, w = _largest_tensor(model)
        t = _alternate({"first": first}, repeats)
        row("packed_size, first call", t["first"], packed_bytes=size)
        times = {"wall": [], "cpu": []}
        for i in range(repeats):
            packed_size(model)
            with torch.no_grad():
                w.view(-1)[i * 64:(i + 1) * 64] = w.view(-1)[-64:].clone()  # one tensor changes
            wall, cpu = _timed(lambda: packed_size(model))
            times["wall"].append(wall)
            times["cpu"].append(cpu)
        row("packed_size, one tensor changed", {
            "wall_ms": round(statistics.median(times["wall"]), 1),
            "cpu_ms": round(statistics.median(times["cpu"]), 1)}, changed=name)
        nbcompress.save(model, nbc, progress=False)
        torch.save(model.state_dict(), pt)
        if peak:
            for ours, theirs in (("save", "torch.save"), ("load", "torch.load")):
                a = peak_extra(ours, nbc, pt, str(tmp / "peak.nbc"))
                b = peak_extra(theirs, nbc, pt, str(tmp / "peak.pt"))
                if ours == "load":
                    a, b = a - nbytes, b - nbytes
                row(f"peak memory, {ours}", {"extra_mb": round(a / 2**20, 1)},
                    torch_extra_mb=round(b / 2**20, 1),
                    extra_per_model_bytes=round(a / nbytes, 2))
    finally:
        torch.set_num_threads(threads)
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'model':8s} {'what':34s} {'ours ms':>9s} {'cpu ms':>8s} {'torch ms':>9s} "
            f"{'cpu ms':>8s} {'ratio':>6s} {'cpu':>5s}  other")
    lines = [head, "-" * len(head)]
    for r in rows:
        other = ", ".join(f"{k}={v}" for k, v in r.items() if k in (
            "file_mb", "torch_file_mb", "packed_bytes", "changed", "extra_mb", "torch_extra_mb",
            "extra_per_model_bytes"))
        lines.append(f"{r['model']:8s} {r['what']:34s} {r.get('wall_ms', ''):>9} "
                     f"{r.get('cpu_ms', ''):>8} {r.get('torch_wall_ms', ''):>9} "
                     f"{r.get('torch_cpu_ms', ''):>8} {r.get('ratio_wall', ''):>6} "
                     f"{r.get('ratio_cpu', ''):>5}  {other}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="dense,pruned,int8")
    ap.add_argument("--no-peak", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "storage_speed.json"))
    args = ap.parse_args(argv)
    makers = {"dense": mlp25m, "pruned": lambda: nbcompress.prune(mlp25m(), 0.5),
              "int8": lambda: nbcompress.quantize(mlp25m())}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = makers[name]()
            rows += storage_rows(model, tmp, label=name, repeats=args.repeats,
                                 peak=not args.no_peak)
            print(_table([r for r in rows if r["model"] == name]).split("\n", 2)[-1]
                  if len(rows) > 7 else _table(rows), flush=True)
            del model
    print()
    print(_table(rows))
    out = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "cpus": os.cpu_count(), "threads": 1,
                       "load_avg": os.getloadavg()},
           "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
