"""Benchmarks for Hugging Face transformers (issue 15, Benchmarks), all in one run, offline,
random initial weights from configs (nothing downloaded):

1. vit: ``ViTForImageClassification`` (28x28, 7x7 patches, 1 channel) trained on the embedded
   MNIST digits (4,000 train / 1,000 test) from dict batches ``{"pixel_values", "labels"}``.
   - structured: whole attention heads + FFN neurons removed to at most 50% of the parameters
     (``target_params=0.5``), fine-tuned, then distilled from the unpruned model.
     Target: params <= 50% and test accuracy within 1 point of the original.
   - int8: dynamic int8 of the trained model. Target: at least 3.5x smaller (the bytes
     ``nbcompress.save`` writes) and faster than fp32 on the CPU (one thread, warm-up, the two
     models alternated run by run, median; benchmarks/_timing.py), on a batch of test digits.
2. lm: ``GPT2LMHeadModel`` (byte vocabulary 256) trained on ``nbcompress.data.text_loaders()``
   (Python standard-library sources; test text from other modules).
   - ffn: 50% of the FFN neurons pruned (``layers='mlp'``, structured), fine-tuned, distilled
     from the original. Target: test perplexity within 10% of the original's.
   - 4bit: 4-bit weights (uniform, per-channel) of the trained model. Target: perplexity within
     5% of the original's.

Ratios are against the baseline trained in the same run, and against that baseline trained as
many epochs more as the compressed model gets (fine-tuning + distillation): a fair comparison
(a target counts as met only against both).

    python benchmarks/bench_transformers.py                 # the full run
    python benchmarks/bench_transformers.py --vit-epochs 4 --finetune-epochs 2 --lm-epochs 1

Prints a table and writes benchmarks/results/transformers.json.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nbcompress  # noqa: E402
from nbcompress import distill, evaluate, fit, prune, quantize  # noqa: E402
from nbcompress.data import mnist_arrays, text_loaders  # noqa: E402
from _timing import alternated  # noqa: E402

TARGETS = {
    "vit_structured": "params <= 50% of the original, test accuracy within 1 point",
    "vit_int8": "dynamic int8 >= 3.5x smaller (saved bytes) and faster than fp32 (1 thread)",
    "lm_ffn": "50% of FFN neurons pruned + distilled: perplexity within 10% of the original",
    "lm_4bit": "4-bit weights: perplexity within 5% of the original",
}


def log(*a):
    print(*a, flush=True)


def env() -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0],
            "quantized_engine": torch.backends.quantized.engine}


class Digits(Dataset):
    """MNIST digits as a Hugging Face image dataset with a collator yields them."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def saved_bytes(m) -> int:
    buf = io.BytesIO()
    nbcompress.save(m, buf)
    return buf.tell()


def _vit(a, layers: int):
    """(untrained HF ViT of ``layers`` layers for the 28x28 digits, train loader, test loader,
    test images)."""
    from transformers import ViTConfig, ViTForImageClassification

    x_tr, y_tr, x_te, y_te = mnist_arrays()
    train = DataLoader(Digits(x_tr, y_tr), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(Digits(x_te, y_te), batch_size=500)
    cfg = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=a.vit_hidden,
                    num_hidden_layers=layers, num_attention_heads=a.vit_heads,
                    intermediate_size=4 * a.vit_hidden, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, num_labels=10)
    torch.manual_seed(0)
    return ViTForImageClassification(cfg), train, test, x_te


def bench_vit(a) -> dict:
    vit, train, test, x_te = _vit(a, a.vit_layers)
    t = time.perf_counter()
    fit(vit, train, epochs=a.vit_epochs, lr=2e-3, seed=0, progress=False)
    acc0 = evaluate(vit, test)
    log(f"vit: {n_params(vit):,} params, {a.vit_epochs} epochs ({time.perf_counter() - t:.0f} s): "
        f"accuracy {100 * acc0:.2f}%")

    # the fair baseline: the original trained as many more epochs as the pruned model gets
    longer = copy.deepcopy(vit)
    fit(longer, train, epochs=a.finetune_epochs + a.distill_epochs, lr=2e-3, seed=1, progress=False)
    acc_long = evaluate(longer, test)
    del longer
    log(f"vit trained {a.finetune_epochs + a.distill_epochs} epochs more: {100 * acc_long:.2f}%")

    pruned = prune(vit, structured=True, target_params=0.5, finetune=train,
                   epochs=a.finetune_epochs, lr=2e-3, seed=0)
    acc_p = evaluate(pruned, test)
    student = distill(pruned, vit, train, epochs=a.distill_epochs, T=2.0, alpha=0.5, lr=1e-3,
                      seed=0, progress=False)
    acc_d = evaluate(student, test)
    heads = [blk.attention.num_attention_heads for blk in student.vit.layers]
    ffn = [blk.mlp.fc1.out_features for blk in student.vit.layers]
    share = n_params(student) / n_params(vit)
    structured = {
        "params": n_params(vit), "params_pruned": n_params(student), "params_share": share,
        "heads_per_layer": heads, "ffn_per_layer": ffn,
        "accuracy": acc0, "accuracy_pruned_finetuned": acc_p, "accuracy_distilled": acc_d,
        "accuracy_trained_as_long": acc_long,
        "points_lost": 100 * (acc0 - acc_d),
        "points_lost_vs_trained_as_long": 100 * (acc_long - acc_d),
        # within 1 point of the original and of the original trained as long as the student
        "met": share <= 0.5 and 100 * (max(acc0, acc_long) - acc_d) <= 1.0,
    }
    log(f"vit structured: {share:.1%} of params (heads {heads}, FFN {ffn}); accuracy "
        f"{100 * acc_p:.2f}% fine-tuned, {100 * acc_d:.2f}% distilled")

    q = quantize(vit, mode="dynamic")
    acc_q = evaluate(q, test)
    b32, b8 = saved_bytes(vit), saved_bytes(q)
    x = x_te[: a.batch]
    times = alternated({"fp32": vit, "int8": q}, x, runs=a.runs, warmup=5)
    int8 = {
        "bytes_fp32": b32, "bytes_int8": b8, "size_ratio": b32 / b8,
        "batch": a.batch, "runs": a.runs,
        "fp32_wall_ms": times["fp32"]["wall_ms"], "int8_wall_ms": times["int8"]["wall_ms"],
        "fp32_cpu_ms": times["fp32"]["cpu_ms"], "int8_cpu_ms": times["int8"]["cpu_ms"],
        "speedup_wall": times["fp32"]["wall_ms"] / times["int8"]["wall_ms"],
        "speedup_cpu": times["fp32"]["cpu_ms"] / times["int8"]["cpu_ms"],
        "accuracy": acc0, "accuracy_int8": acc_q,
    }
    int8["met"] = int8["size_ratio"] >= 3.5 and int8["speedup_cpu"] > 1.0
    log(f"vit int8: {b32:,} -> {b8:,} bytes ({int8['size_ratio']:.2f}x); batch {a.batch}: "
        f"{int8['fp32_cpu_ms']:.1f} -> {int8['int8_cpu_ms']:.1f} ms CPU "
        f"({int8['speedup_cpu']:.2f}x), wall {int8['speedup_wall']:.2f}x; accuracy "
        f"{100 * acc_q:.2f}%")
    return {"config": {"hidden": a.vit_hidden, "layers": a.vit_layers, "heads": a.vit_heads,
                       "ffn": 4 * a.vit_hidden},
            "structured": structured, "int8": int8}


def bench_lm(a) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    train, test = text_loaders(seq_len=64, batch_size=32, seed=0)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=a.lm_width,
                                    n_layer=a.lm_layers, n_head=4, n_inner=4 * a.lm_width,
                                    bos_token_id=None, eos_token_id=None, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0))
    t = time.perf_counter()
    fit(lm, train, epochs=a.lm_epochs, lr=3e-3, seed=0, progress=False)
    ppl0 = evaluate(lm, test)
    log(f"lm: {n_params(lm):,} params, {a.lm_epochs} epochs ({time.perf_counter() - t:.0f} s): "
        f"perplexity {ppl0:.3f}")

    longer = copy.deepcopy(lm)
    fit(longer, train, epochs=a.finetune_epochs + a.distill_epochs, lr=1e-3, seed=1,
        progress=False)
    ppl_long = evaluate(longer, test)
    del longer
    log(f"lm trained {a.finetune_epochs + a.distill_epochs} epochs more: perplexity {ppl_long:.3f}")

    pruned = prune(lm, 0.5, structured=True, layers="mlp", finetune=train,
                   epochs=a.finetune_epochs, lr=1e-3, seed=0)
    ppl_p = evaluate(pruned, test)
    student = distill(pruned, lm, train, epochs=a.distill_epochs, T=1.0, alpha=0.5, lr=1e-3,
                      seed=0, progress=False)
    ppl_d = evaluate(student, test)
    ffn = [blk.mlp.c_fc.nf for blk in student.transformer.h]
    ffn_result = {"params": n_params(lm), "params_pruned": n_params(student),
                  "ffn_per_layer_before": [blk.mlp.c_fc.nf for blk in lm.transformer.h],
                  "ffn_per_layer": ffn, "perplexity": ppl0, "perplexity_pruned_finetuned": ppl_p,
                  "perplexity_distilled": ppl_d, "ratio": ppl_d / ppl0,
                  "perplexity_trained_as_long": ppl_long,
                  "ratio_vs_trained_as_long": ppl_d / ppl_long,
                  "met": ppl_d <= 1.10 * min(ppl0, ppl_long)}
    log(f"lm ffn 50%: FFN {ffn}; perplexity {ppl_p:.3f} fine-tuned, {ppl_d:.3f} distilled "
        f"({ppl_d / ppl0:.3f}x)")

    q4 = quantize(lm, bits=4, per_channel=True)
    ppl4 = evaluate(q4, test)
    four = {"perplexity": ppl0, "perplexity_4bit": ppl4, "ratio": ppl4 / ppl0,
            "bytes_fp32": saved_bytes(lm), "bytes_4bit": saved_bytes(q4),
            "met": ppl4 <= 1.05 * ppl0}
    log(f"lm 4-bit: perplexity {ppl4:.3f} ({ppl4 / ppl0:.3f}x), {four['bytes_fp32']:,} -> "
        f"{four['bytes_4bit']:,} bytes")
    return {"config": {"width": a.lm_width, "layers": a.lm_layers, "heads": 4,
                       "ffn": 4 * a.lm_width},
            "ffn": ffn_result, "4bit": four}


def table(res: dict) -> str:
    rows = []
    if "vit" in res:
        s, q = res["vit"]["structured"], res["vit"]["int8"]
        rows.append(("ViT structured (heads + FFN)", TARGETS["vit_structured"],
                     f"{s['params_share']:.1%} params, {100 * s['accuracy']:.2f}% -> "
                     f"{100 * s['accuracy_distilled']:.2f}% ({s['points_lost']:+.2f} pts lost; "
                     f"{s['points_lost_vs_trained_as_long']:+.2f} vs the original trained as "
                     f"long, {100 * s['accuracy_trained_as_long']:.2f}%)",
                     s["met"]))
        rows.append(("ViT int8 dynamic", TARGETS["vit_int8"],
                     f"{q['size_ratio']:.2f}x smaller, {q['speedup_cpu']:.2f}x faster (CPU time; "
                     f"wall {q['speedup_wall']:.2f}x)", q["met"]))
    if "lm" in res:
        f, b = res["lm"]["ffn"], res["lm"]["4bit"]
        rows.append(("LM 50% FFN + distill", TARGETS["lm_ffn"],
                     f"perplexity {f['perplexity']:.3f} -> {f['perplexity_distilled']:.3f} "
                     f"({f['ratio']:.3f}x; {f['ratio_vs_trained_as_long']:.3f}x the original "
                     f"trained as long, {f['perplexity_trained_as_long']:.3f})", f["met"]))
        rows.append(("LM 4-bit", TARGETS["lm_4bit"],
                     f"perplexity {b['perplexity']:.3f} -> {b['perplexity_4bit']:.3f} "
                     f"({b['ratio']:.3f}x)", b["met"]))
    if "exits" in res:
        e = res["exits"]["exits"]
        rows.append(("ViT early exits (hooked, threshold 0.95)", "no target: reported",
                     f"{e['flops_fraction']:.1%} of the FLOPs on the test digits, "
                     f"{100 * e['accuracy']:.2f}% -> {100 * e['accuracy_exits']:.2f}%; batch "
                     f"{e['batch']} {e['speedup_cpu']:.2f}x less CPU time", True))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'step':<{w}}  met  measured  (target)"]
    lines += [f"{r[0]:<{w}}  {'yes' if r[3] else 'NO ':<3}  {r[2]}  ({r[1]})" for r in rows]
    return "\n".join(lines)


def bench_exits(a) -> dict:
    """Early exits on a Hugging Face ViT (its own forward hooked): trained on the MNIST digits,
    heads after its layers trained with the backbone frozen, the default threshold 0.95 (not
    tuned on the test digits); FLOPs actually spent on the test digits, accuracy, and the CPU
    time of the batched forward against the ViT alone (one thread, alternated)."""
    from nbcompress.techniques.earlyexit import threshold_sweep

    vit, train, test, x_te = _vit(a, a.exit_layers)
    fit(vit, train, epochs=a.vit_epochs, lr=2e-3, seed=0, progress=False)
    vit.eval()
    acc0 = evaluate(vit, test)
    ee = nbcompress.early_exit(vit, train, epochs=a.exit_epochs, lr=1e-2, seed=0,
                               progress=False).eval()
    sweep = threshold_sweep(ee, test)
    cur = sweep[sweep["current"]].iloc[0]
    acc_e = evaluate(ee, test)
    x = x_te[: a.batch]
    times = alternated({"vit": vit, "exits": ee}, x, runs=a.runs, warmup=5)
    out = {"params": n_params(vit), "layers": a.exit_layers, "exits": list(ee.exit_names),
           "threshold": ee.threshold, "accuracy": acc0, "accuracy_exits": acc_e,
           "flops_fraction": float(cur["flops_fraction"]),
           "shares": {k: float(cur[f"share {k}"]) for k in ee.exit_labels},
           "points_lost": 100 * (acc0 - acc_e), "batch": a.batch,
           "vit_cpu_ms": times["vit"]["cpu_ms"], "exits_cpu_ms": times["exits"]["cpu_ms"],
           "speedup_cpu": times["vit"]["cpu_ms"] / times["exits"]["cpu_ms"],
           "speedup_wall": times["vit"]["wall_ms"] / times["exits"]["wall_ms"],
           "sweep": sweep.drop(columns=["current"]).to_dict("records")}
    log(f"vit exits: {acc0:.4f} -> {acc_e:.4f} at {out['flops_fraction']:.1%} of the FLOPs; "
        f"shares {out['shares']}; CPU {out['speedup_cpu']:.2f}x")
    return {"exits": out}


PARTS = {"vit": bench_vit, "lm": bench_lm, "exits": bench_exits}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--vit-hidden", type=int, default=96)
    p.add_argument("--vit-layers", type=int, default=3)
    p.add_argument("--vit-heads", type=int, default=4)
    p.add_argument("--vit-epochs", type=int, default=10)
    p.add_argument("--exit-layers", type=int, default=6, help="ViT layers for the exits part")
    p.add_argument("--exit-epochs", type=int, default=3, help="exit head training epochs")
    p.add_argument("--lm-width", type=int, default=64)
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--lm-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=3, help="after structured pruning")
    p.add_argument("--distill-epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="test digits per timed forward")
    p.add_argument("--runs", type=int, default=30, help="timed forwards per model (median)")
    p.add_argument("--out", default=str(RESULTS / "transformers.json"))
    a = p.parse_args(argv)
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"unknown part {bad[0]!r} (parts: {', '.join(PARTS)})")
    t0 = time.perf_counter()
    out_path = Path(a.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update({"benchmark": "transformers", "targets": TARGETS})
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "parts")}
    for name in parts:
        t1 = time.perf_counter()
        results[name] = PARTS[name](a)
        results[name].update(settings=settings, environment=env(),
                             seconds=time.perf_counter() - t1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    log("\n" + table(results))
    log(f"\nwrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path} "
        f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
