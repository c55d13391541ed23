"""Issue 15, parts 5-6: the techniques that replace or touch layers (int8 default, 4-bit, low-rank,
unstructured prune 0.5) over the six Hugging Face architectures (small configs), every torchvision
classifier and the timm families below: random weights, small inputs, the Python API with
``example_input``. A step passes when the result runs on the input with finite outputs, tied
parameters are still one tensor, and the original is unchanged; a one-line BadInput / FieldError
is a refusal. Each model runs in a forked child, killed past ``--limit`` seconds per technique.
Prints one line per (model, technique) that does not pass and the pass counts (``--verbose``:
every line; ``--json FILE``: every result). Needs torchvision, timm, transformers (/tmp/v214).

Run: nice python scripts/check_layers_zoo.py [--only hf|tv|timm] [--tech int8,4bit,lowrank,prune]
     [--limit 60] [--json out.json] [NAME ...]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(__file__))
from check_structured_zoo import TIMM, _build, _size  # noqa: E402

TIMM_EXTRA = ["swin_tiny_patch4_window7_224", "levit_128s", "pvt_v2_b0", "coat_lite_tiny",
              "xcit_nano_12_p16_224"]
HF = ["bert", "distilbert", "gpt2", "t5", "vit", "whisper"]
TECHS = ("int8", "4bit", "lowrank", "prune")


def _hf(name: str):
    """(model, example input) for a small random-weight Hugging Face model."""
    import transformers as tf

    small = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128)
    ids = torch.randint(0, 200, (2, 12))
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=200, **small)), \
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "distilbert":
        c = tf.DistilBertConfig(vocab_size=200, n_layers=2, n_heads=2, dim=64, hidden_dim=128)
        return tf.DistilBertForSequenceClassification(c), {"input_ids": ids}
    if name == "gpt2":
        c = tf.GPT2Config(vocab_size=200, n_layer=2, n_head=2, n_embd=64, n_positions=64,
                          bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(c), {"input_ids": ids}
    if name == "t5":
        c = tf.T5Config(vocab_size=200, d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32)
        return tf.T5ForConditionalGeneration(c), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    if name == "vit":
        c = tf.ViTConfig(image_size=32, patch_size=8, num_labels=5, **small)
        return tf.ViTForImageClassification(c), {"pixel_values": torch.randn(2, 3, 32, 32)}
    if name == "whisper":
        c = tf.WhisperConfig(vocab_size=200, d_model=64, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=2, decoder_attention_heads=2,
                             encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                             max_source_positions=32, max_target_positions=32, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        return tf.WhisperForConditionalGeneration(c), \
            {"input_features": torch.randn(2, 16, 64), "decoder_input_ids": ids[:, :5]}
    raise KeyError(name)


def _model(src: str, name: str):
    if src == "hf":
        return _hf(name)
    m = _build(src, name).eval()
    s = _size(name)
    x = torch.randn(1, 3, s, s)
    with torch.no_grad():
        try:
            m(x)
        except Exception:  # noqa: BLE001 - a bigger input then
            x = torch.randn(1, 3, 224, 224)
    return m, x


def _out(y):
    if hasattr(y, "logits"):
        y = y.logits
    elif isinstance(y, dict):
        y = next(iter(y.values()))
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y.float().flatten()


def _tied(m) -> set:
    """Names of parameters reached under more than one name (PyTorch deduplicates them)."""
    seen: dict[int, list[str]] = {}
    for mod_name, mod in m.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            seen.setdefault(id(p), []).append(f"{mod_name}.{p_name}")
    return {tuple(sorted(set(v))) for v in seen.values() if len(set(v)) > 1}


def _step(tech: str, m, x):
    import nbcompress

    if tech == "int8":
        return nbcompress.quantize(m, example_input=x)
    if tech == "4bit":
        return nbcompress.quantize(m, 4, example_input=x)
    if tech == "lowrank":
        return nbcompress.lowrank(m, example_input=x)
    return nbcompress.prune(m, 0.5, example_input=x)


def _run_one(tech: str, m, x, y0, tied0) -> tuple[str, str]:
    from nbcompress.batches import forward_batch
    from nbcompress.errors import BadInput, FieldError

    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        out = _step(tech, m, x)
    except (BadInput, FieldError) as e:
        msg = str(e).strip()
        same = set(before) == set(m.state_dict()) and \
            all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        kind = "refused" if "\n" not in msg and same else "FAIL"
        return kind, ("" if same else "[model changed] ") + msg.splitlines()[0][:220]
    with torch.no_grad():
        y = _out(forward_batch(out.eval(), x))
    if not torch.isfinite(y).all():
        return "FAIL", "non-finite output"
    lost = [t for t in tied0 if t not in _tied(out)]
    if lost and tech != "lowrank":
        return "FAIL", f"tie broken: {lost[0]}"
    cos = float(torch.nn.functional.cosine_similarity(y, y0, dim=0)) if y.shape == y0.shape \
        else float("nan")
    return "pass", f"cos {cos:.4f}"


def _child(src: str, name: str, techs, conn) -> None:
    from nbcompress.batches import forward_batch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        m, x = _model(src, name)
        m.eval()
        with torch.no_grad():
            y0 = _out(forward_batch(m, x))
        tied0 = _tied(m)
    except Exception as e:  # noqa: BLE001
        conn.send(("*", "FAIL", f"build: {type(e).__name__}: {str(e)[:150]}", 0.0))
        return
    for tech in techs:
        conn.send((tech, "start", "", time.time()))
        t0 = time.perf_counter()
        try:
            kind, detail = _run_one(tech, m, x, y0, tied0)
        except Exception as e:  # noqa: BLE001 - a traceback is a failure
            first = str(e).strip().splitlines()[0][:180] if str(e).strip() else ""
            kind, detail = "FAIL", f"{type(e).__name__}: {first}"
        conn.send((tech, kind, detail, time.perf_counter() - t0))
    conn.close()


def _attempt(src: str, name: str, techs, limit: float) -> list[tuple]:
    """One forked child running ``techs`` in order; stops at the first slow or crashed one."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(src, name, techs, child))
    p.start()
    child.close()
    results, current, started = [], None, time.time()
    while True:
        wait = (limit + 60 if current is None else limit) - (time.time() - started)
        if wait <= 0 or not parent.poll(max(wait, 0)):
            results.append((current or "*", "slow", f"over {limit:g} s", limit))
            break
        try:
            tech, kind, detail, sec = parent.recv()
        except EOFError:
            results.append((current or "*", "FAIL", f"crashed (exit {p.exitcode})", 0.0))
            break
        if kind == "start":
            current, started = tech, time.time()
            continue
        results.append((tech, kind, detail, sec))
        current = None
        if tech == "*" or len(results) == len(techs):
            break
    if p.is_alive():
        p.kill()
    p.join()
    return results


def check(src: str, name: str, techs, limit: float) -> list[tuple]:
    """[(technique, kind, detail, seconds)] for one model, each technique within ``limit``
    (after a slow or crashed one, a fresh child runs the rest)."""
    results: list[tuple] = []
    todo = list(techs)
    while todo:
        got = _attempt(src, name, todo, limit)
        results += got
        if got and got[-1][0] == "*":
            break
        done = {r[0] for r in got}
        todo = [t for t in todo if t not in done]
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["hf", "tv", "timm"])
    ap.add_argument("--tech", default=",".join(TECHS))
    ap.add_argument("--limit", type=float, default=60)
    ap.add_argument("--json")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("names", nargs="*")
    a = ap.parse_args()
    techs = [t for t in a.tech.split(",") if t]
    todo = []
    if a.only in (None, "hf"):
        todo += [("hf", n) for n in HF]
    if a.only in (None, "tv"):
        import torchvision
        todo += [("tv", n) for n in torchvision.models.list_models(module=torchvision.models)]
    if a.only in (None, "timm"):
        import timm  # noqa: F401 - imported once before the forks
        todo += [("timm", n) for n in TIMM + TIMM_EXTRA]
    if a.names:
        todo = [(s, n) for s, n in todo if n in a.names]
    import nbcompress  # noqa: F401 - imported once before the forks
    if any(s == "hf" for s, _ in todo):
        import transformers  # noqa: F401
    tally: dict = {}
    rows = []
    for src, name in todo:
        for tech, kind, detail, sec in check(src, name, techs, a.limit):
            for t in (techs if tech == "*" else [tech]):
                rows.append({"src": src, "model": name, "tech": t, "result": kind,
                             "detail": detail, "seconds": round(sec, 2)})
                c = tally.setdefault((src, t), {})
                c[kind] = c.get(kind, 0) + 1
                if kind != "pass" or a.verbose:
                    print(f"{src:4} {name:30} {t:7} {kind:7} {sec:6.1f}s {detail}", flush=True)
    print()
    for (src, t), c in sorted(tally.items()):
        total = sum(c.values())
        rest = ", ".join(f"{v} {k}" for k, v in sorted(c.items()) if k != "pass")
        print(f"{src:4} {t:7} {c.get('pass', 0)}/{total} pass" + (f" ({rest})" if rest else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
