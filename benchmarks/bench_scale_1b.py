"""Techniques at 1B parameters (issue 16, part 4): a GPT-2-style model with random weights in
bf16 (about 1.1B parameters, 2.2 GB), pruned (unstructured, global magnitude, 50%) and quantized
(int8 weight-only: int8 codes per output channel, bf16 compute) with the plain API, on the CPU.

Each row runs in a fresh subprocess (so its peak RSS, ``resource.getrusage(RUSAGE_SELF)
.ru_maxrss``, is its own): ``build`` (the model alone, the baseline), ``prune``, ``quantize``,
and ``prune+quantize`` (the sequence, the name rebound after each step as the magics do). Each
row prints each step's wall and CPU (``time.thread_time``) seconds and the peak RSS above the
process before the model was built, as a multiple of the model's bytes (target: at most 4x).
A short forward (batch 1, 8 tokens) checks that the result runs in bf16 and stays close.

    python benchmarks/bench_scale_1b.py                  # 20 layers: 1.1B parameters
    python benchmarks/bench_scale_1b.py --layers 2       # a quick run (about 0.2B)

Prints a table and writes benchmarks/results/scale_1b.json (``--out`` to change). The lead's
scale benchmark imports :func:`build_gpt2_1b`.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("build", "prune", "quantize", "prune+quantize")


def build_gpt2_1b(n_layer: int = 20, *, n_embd: int = 2048, n_head: int = 16,
                  n_positions: int = 256, vocab_size: int = 50257, seed: int = 0):
    """A GPT-2 language model with random weights, built directly in bf16 (no fp32 copy on the
    way): ``n_layer=20`` gives 1.11B parameters (2.2 GB). ``lm_head`` is tied to the token
    embedding (one tensor), as in GPT-2."""
    import transformers

    cfg = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                  n_positions=n_positions, vocab_size=vocab_size,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.GPT2LMHeadModel(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_row(row: str, n_layer: int) -> dict:
    """One row, in this process: build, then the row's steps; times, peak RSS, checks."""
    import nbcompress

    torch.set_num_threads(1)
    base = _current_rss_mb()
    out: dict = {"row": row, "layers": n_layer, "steps": {}}
    t0, c0 = time.perf_counter(), time.thread_time()
    model = build_gpt2_1b(n_layer)
    out["steps"]["build"] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.thread_time() - c0}
    out["params"] = sum(p.numel() for p in model.parameters())
    out["model_mb"] = model_bytes(model) / 2**20
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        ref = model(x).logits.float()
    steps = [] if row == "build" else row.split("+")
    for step in steps:
        t0, c0 = time.perf_counter(), time.thread_time()
        if step == "prune":
            model = nbcompress.prune(model, 0.5)
        else:
            model = nbcompress.quantize(model)
        out["steps"][step] = {"wall_s": time.perf_counter() - t0,
                              "cpu_s": time.thread_time() - c0}
        print(f"  {row}: {step} {out['steps'][step]['wall_s']:.1f} s", flush=True)
    with torch.no_grad():
        y = model(x).logits
    out["output_dtype"] = str(y.dtype).replace("torch.", "")
    out["output_rel_err"] = float((y.float() - ref).norm() / ref.norm())
    out["tied"] = model.lm_head.weight is model.transformer.wte.weight
    out["types"] = sorted({type(m).__name__ for m in model.transformer.h[0].modules()
                           if "Linear" in type(m).__name__ or "Conv1D" in type(m).__name__
                           or "Quantized" in type(m).__name__})
    if "prune" in steps:
        w = model.transformer.h[0].mlp.c_fc
        w = getattr(w, "codes", None) if hasattr(w, "codes") else w.weight
        out["sparsity_h0_mlp"] = 1 - int(torch.count_nonzero(w)) / w.numel()
    out["peak_rss_mb"] = _rss_mb()
    out["peak_above_start_mb"] = out["peak_rss_mb"] - base
    out["peak_x_model"] = out["peak_above_start_mb"] / out["model_mb"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=20, help="transformer blocks (20: 1.1B)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_1b.json"))
    ap.add_argument("--row", help=argparse.SUPPRESS)          # internal: run one row here
    a = ap.parse_args(argv)
    if a.row:
        print("ROW " + json.dumps(run_row(a.row, a.layers)), flush=True)
        return {}
    results = []
    for row in a.rows.split(","):
        proc = subprocess.run([sys.executable, __file__, "--row", row, "--layers", str(a.layers)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        if proc.returncode or not lines:
            print(proc.stdout[-2000:], proc.stderr[-3000:])
            results.append({"row": row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        results.append(json.loads(lines[-1][4:]))
        r = results[-1]
        steps = "  ".join(f"{k} {v['wall_s']:.1f}s (cpu {v['cpu_s']:.1f})"
                          for k, v in r["steps"].items())
        print(f"{row:15s} peak +{r['peak_above_start_mb']:7.0f} MB = {r['peak_x_model']:.2f}x "
              f"model | err {r['output_rel_err']:.4f} {r['output_dtype']} tied={r['tied']} | "
              f"{steps}", flush=True)
    doc = {"benchmark": "bench_scale_1b", "layers": a.layers, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "threads": 1,
           "rows": results,
           "notes": ["fresh subprocess per row; peak = ru_maxrss minus the RSS before the model "
                     "was built (imports), as a multiple of the model's bytes",
                     "quantize on a bf16 model = int8 weight-only (per-output-channel int8 codes, "
                     "bf16 compute; torchao Int8WeightOnlyConfig's scheme); the tied lm_head / "
                     "wte stays bf16 (left whole, noted). Before: quantize(m) and bits=8 made "
                     "torch.ao DynamicInt8Linear layers (float32 kernels) and the result failed "
                     "on its first forward (expected scalar type Float but found BFloat16)",
                     "prune: global magnitude over the 80 block layers (the tied lm_head / wte "
                     "left whole), exact k-th value by sample + refine, |w| kept in bf16, "
                     "per-tensor passes (no concatenated or fp32 copy of the model)",
                     "wall times on a shared 2-core machine under load; cpu_s "
                     "(time.thread_time) is the honest figure"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {a.out}")
    return doc


if __name__ == "__main__":
    main()
