"""The zoo matrix (issue 15, part 8): every step on library models, random weights, small inputs.

Models: every torchvision classification model (``torchvision.models.list_models``), one small
model of each of 29 timm families, and 10 Hugging Face transformers architectures built from small
configs (encoder: BERT, DistilBERT, RoBERTa; decoder: GPT-2, Llama, Qwen2; encoder-decoder: T5,
BART; vision: ViT; speech: Whisper). Each step runs on a fresh copy of the model:

  measure        nbcompress.measure on one example (+ FLOPs / (2 x fvcore MACs) when fvcore imports)
  prune          unstructured, 0.5              structured    prune 0.3, structured=True
  int8           quantize() default             int8_static   mode="static", calib=a loader
  4bit           quantize(bits=4)               lowrank       lowrank() default (energy 0.9)
  distill        one epoch; student = the structured-pruned model (a copy when that failed)
  earlyexit      one epoch ("n/a" when refused as not sequential)
  save_load      save + load (no classes listed): same state and bit-identical outputs
  undo           through IPython's InteractiveShell and the magics: %nbcompress, %prune 0.5,
                 %undo, back to the original bit-identical (state and outputs)

A cell is ``pass``, ``refused: <one line>`` (nbcompress's BadInput / NBCompressError: a clear
refusal), ``crash: <Type: first line>`` (any other exception), ``broken: <why>`` (the step
returned a model that no longer runs, whose output shape changed, or whose round trip is not
bit-identical) or ``timeout``. Each model runs in its own forked process (the libraries are
imported once, before the fork), each step under an alarm of ``--timeout`` seconds and the whole
model under 3x that (then killed), so neither a hang nor a crash stops the sweep.

    python benchmarks/bench_zoo.py --subset fast             # a few models per family group
    python benchmarks/bench_zoo.py --subset full --groups timm,transformers --timeout 300
    python benchmarks/bench_zoo.py --models 'resnet|bert'    # a regex over group/name
    python benchmarks/bench_zoo.py --worker timm resnet18    # one model, rows on stdout (debug)
    python benchmarks/bench_zoo.py --table benchmarks/results/zoo.json   # the table again

Prints a pass-rate table (group x step) and writes benchmarks/results/zoo.json (``--out``).
Needs torchvision, timm and transformers (a missing library skips its group); fvcore optional.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEPS = ["measure", "prune", "structured", "int8", "int8_static", "4bit", "lowrank", "distill",
         "earlyexit", "save_load", "undo"]
GROUPS = ["torchvision", "timm", "transformers"]
TIMM = ["resnet18", "resnext26ts", "regnetx_002", "efficientnet_b0", "mobilenetv3_small_100",
        "convnext_atto", "convnextv2_atto", "ghostnet_100", "res2net50_14w_8s", "cspresnet50",
        "dla34", "densenet121", "dpn68", "hrnet_w18_small", "inception_v3", "mixer_s16_224",
        "repvgg_a0", "rexnet_100", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
        "swin_tiny_patch4_window7_224", "edgenext_xx_small", "poolformer_s12", "levit_128s",
        "efficientformer_l1", "mobilevit_xxs", "coat_lite_tiny", "maxvit_tiny_tf_224",
        "xcit_nano_12_p16_224"]
HF = ["bert", "distilbert", "roberta", "gpt2", "llama", "qwen2", "t5", "bart", "vit", "whisper"]
# the fast subset (tests/test_zoo.py runs it in the test suite): small members of each group;
# timm's test_* models are its own tiny ResNet / ConvNeXt / ViT
FAST = {"torchvision": ["mobilenet_v3_small", "regnet_x_400mf"],
        "timm": ["test_resnet", "test_convnext", "test_vit"],
        "transformers": ["bert", "gpt2", "t5"]}
VOCAB, SEQ, BATCH, N = 128, 8, 4, 8
MARK = "ZOO "


# ------------------------------------------------------------------------ building (worker side)

def _hf(name: str):
    """(model, batch function) of a small random-weight transformers model."""
    import transformers as tf

    att = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, hidden_size=64)
    seq2seq = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                   vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   decoder_start_token_id=1)
    causal = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=64)
    build = {
        "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(vocab_size=VOCAB, num_labels=3, **att)),
        "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=VOCAB, dim=64, n_layers=2, n_heads=2, hidden_dim=128, num_labels=3)),
        "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(
            vocab_size=VOCAB, num_labels=3, max_position_embeddings=64, pad_token_id=1, **att)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2,
                                                         n_head=2, n_positions=64)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**causal)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**causal)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=VOCAB, d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2,
            decoder_start_token_id=0)),
        "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(max_position_embeddings=64,
                                                                      **seq2seq)),
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8,
                                                                 num_labels=10, **att)),
        "whisper": lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            num_mel_bins=16, max_source_positions=16, max_target_positions=32, **seq2seq)),
    }[name]
    import torch

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, VOCAB, (n, SEQ), generator=g)  # noqa: E731

    def batch(n):
        if name == "vit":
            return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g),
                    "labels": torch.randint(0, 10, (n,), generator=g)}
        if name == "whisper":
            return {"input_features": torch.randn(n, 16, 32, generator=g),
                    "decoder_input_ids": ids(n), "labels": ids(n)}
        if name in ("t5", "bart"):
            return {"input_ids": ids(n), "attention_mask": torch.ones(n, SEQ, dtype=torch.long),
                    "decoder_input_ids": ids(n), "labels": ids(n)}
        x = ids(n)
        lab = x.clone() if name in ("gpt2", "llama", "qwen2") else torch.randint(0, 3, (n,), generator=g)
        return {"input_ids": x, "attention_mask": torch.ones(n, SEQ, dtype=torch.long), "labels": lab}
    return build(), batch


def build(group: str, name: str):
    """(model in eval mode, example batch of 1 (tensor or dict of keyword inputs), loader)."""
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    if group == "transformers":
        model, batch = _hf(name)
        data = batch(N)
        rows = [{k: v[i] for k, v in data.items()} for i in range(N)]
        example = {k: v[:1] for k, v in data.items() if k != "labels"}
        return model.eval(), example, DataLoader(rows, batch_size=BATCH)
    if group == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10)
        sizes = [64, model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]]
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=10)
        sizes = [64, 224, 299]
    model.eval()
    for s in sizes:        # the smallest input the model accepts, evaluating and training
        x = torch.randn(1, 3, s, s)
        try:
            with torch.no_grad():
                model(x)
                _trains(model, torch.randn(2, 3, s, s))
            break
        except Exception:  # noqa: BLE001 - try the next size
            continue
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(N, *x.shape[1:], generator=g), torch.randint(0, 10, (N,), generator=g)
    return model, x, DataLoader(list(zip(xs, ys)), batch_size=BATCH)


def _trains(model, x) -> None:
    """A training-mode forward (Inception's auxiliary classifier needs 299 pixels there, not in
    evaluation), every buffer put back after."""
    import torch

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.train()(x)
    finally:
        model.eval()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(saved[k])


def logits(model, example):
    import torch

    with torch.no_grad():
        out = model(**example) if isinstance(example, dict) else model(example)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


# ---------------------------------------------------------------------------- the steps (worker)

class Broken(Exception):
    pass


class StepTimeout(BaseException):
    """The step's alarm: not an Exception, so no ``except Exception`` inside a step swallows it."""


def check_runs(new, ref_out, example):
    """The step's model runs on the example, in eval mode, with the original's output shape."""
    new.eval()
    try:
        out = logits(new, example)
    except Exception as e:  # noqa: BLE001
        raise Broken(f"no longer runs: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    if tuple(out.shape) != tuple(ref_out.shape):
        raise Broken(f"output shape {tuple(out.shape)} != {tuple(ref_out.shape)}")
    return out


def same_state(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k])
        for k in sa if isinstance(sa[k], torch.Tensor))


def fvcore_ratio(model, example, flops):
    try:
        from fvcore.nn import FlopCountAnalysis
    except Exception:  # noqa: BLE001 - optional
        return None
    try:
        fa = FlopCountAnalysis(model, example)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        macs = fa.total()
    except Exception:  # noqa: BLE001 - fvcore cannot trace it: no column
        return None
    return round(flops / (2 * macs), 4) if macs and flops else None


def undo_through_magics(model, example, loader, ref_out):
    import copy

    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbcompress")
    # a fresh name per model: the shell remembers each name's example input and evaluator
    name = f"m{len(sh.user_ns.get('_zoo_names', []))}"
    sh.user_ns.setdefault("_zoo_names", []).append(name)
    sh.user_ns.update({name: copy.deepcopy(model), "loader": loader})
    if isinstance(example, dict):
        sh.run_line_magic("nbcompress", f"{name} --eval loader")
    else:
        sh.run_line_magic("nbcompress", f"{name} --input-shape " + ",".join(map(str, example.shape)))
    sh.run_line_magic("prune", f"{name} 0.5")
    if same_state(sh.user_ns[name], model):
        raise Broken("%prune 0.5 left the weights unchanged")
    sh.run_line_magic("undo", name)
    back = sh.user_ns.pop(name)
    if not same_state(back, model):
        raise Broken("%undo did not restore the original state bit-identically")
    if not (check_runs(back, ref_out, example) == ref_out).all():
        raise Broken("%undo: outputs differ from the original")
    return {}


def run_step(step, model, example, loader, ref_out, done):
    """One step on a fresh copy of ``model``; returns extra numbers (may be {})."""
    import copy
    import io

    import nbcompress as nbc

    m = copy.deepcopy(model)
    if step == "measure":
        met = nbc.measure(m, example_input=example, latency=False)
        extra = {"params": met.params, "flops": met.flops}
        if not isinstance(example, dict):
            extra["flops_vs_fvcore"] = fvcore_ratio(copy.deepcopy(model), example, met.flops)
        return extra
    if step == "save_load":
        buf = io.BytesIO()
        n = nbc.save(m, buf)
        buf.seek(0)
        back = nbc.load(buf)
        if not same_state(back, model):
            raise Broken("load(save(m)) state differs")
        if not (check_runs(back, ref_out, example) == ref_out).all():
            raise Broken("load(save(m)) outputs differ")
        return {"bytes": n}
    if step == "undo":
        return undo_through_magics(model, example, loader, ref_out)
    ex = {"example_input": example}
    new = {
        "prune": lambda: nbc.prune(m, 0.5, **ex),
        "structured": lambda: nbc.prune(m, 0.3, structured=True, **ex),
        "int8": lambda: nbc.quantize(m, **ex),
        "int8_static": lambda: nbc.quantize(m, mode="static", calib=loader, **ex),
        "4bit": lambda: nbc.quantize(m, bits=4, **ex),
        "lowrank": lambda: nbc.lowrank(m, **ex),
        "distill": lambda: nbc.distill(done.get("structured") or m, model, loader, epochs=1,
                                       progress=False),
        "earlyexit": lambda: nbc.early_exit(m, loader, epochs=1),
    }[step]()
    check_runs(new, ref_out, example)
    if step == "structured":
        done["structured"] = new
    from nbcompress.counting import count_params

    return {"params": count_params(new)[0]}


def worker(group: str, name: str, step_timeout: int, steps: list[str], emit=None) -> None:
    import signal
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    def alarm(*_):
        raise StepTimeout("step timeout")
    signal.signal(signal.SIGALRM, alarm)

    if emit is None:
        def emit(**row):
            print(MARK + json.dumps(row), flush=True)

    t0 = time.perf_counter()
    try:
        model, example, loader = build(group, name)
        ref_out = logits(model, example)
    except Exception as e:  # noqa: BLE001
        emit(step="build", status="crash", reason=f"{type(e).__name__}: {str(e).splitlines()[0]}")
        return
    emit(step="build", status="pass", seconds=round(time.perf_counter() - t0, 2),
         input=list(example.shape) if isinstance(example, torch.Tensor) else sorted(example))
    done: dict = {}
    for step in steps:
        t = time.perf_counter()
        signal.alarm(step_timeout)
        try:
            status, reason, extra = cell(step, model, example, loader, ref_out, done)
        except StepTimeout:
            status, reason, extra = "timeout", f"step over {step_timeout} s", {}
        finally:
            signal.alarm(0)
        emit(step=step, status=status, reason=reason, seconds=round(time.perf_counter() - t, 2),
             **extra)


def cell(step, model, example, loader, ref_out, done) -> tuple[str, str, dict]:
    """(status, one-line reason, extra numbers) of one step: pass, refused (nbcompress's own
    one-line error; a message of several lines is a crash), n/a (early exits refused on a model
    that is not sequential), broken, or crash."""
    from IPython.core.error import UsageError

    from nbcompress.errors import NBCompressError

    try:
        return "pass", "", run_step(step, model, example, loader, ref_out, done)
    except Broken as e:
        return "broken", str(e), {}
    except Exception as e:  # noqa: BLE001 - the matrix records every failure
        lines = str(e).strip().splitlines() or [""]
        text = lines[0][:300]
        if isinstance(e, (NBCompressError, UsageError)) and len(lines) == 1 and text:
            if step == "earlyexit" and "sequential" in text.lower():
                return "n/a", text, {}
            return "refused", text, {}
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        return "crash", f"{type(e).__name__}: {text}{more}", {}


# ------------------------------------------------------------------------------- sweep (parent)

def model_list(subset: str, groups: list[str]) -> list[tuple[str, str]]:
    out = []
    for g in groups:
        try:
            for lib in ("torchvision", "timm") if g == "timm" else (g,):
                __import__(lib)               # timm needs torchvision
        except Exception as e:  # noqa: BLE001
            print(f"skipping {g}: {type(e).__name__}: {e}", flush=True)
            continue
        if subset == "fast":
            names = FAST[g]
        elif g == "torchvision":
            import torchvision

            names = sorted(torchvision.models.list_models(module=torchvision.models))
        else:
            names = TIMM if g == "timm" else HF
        out += [(g, n) for n in names]
    return out


def _child(conn, group, name, timeout, steps):
    """A forked child: run one model's steps, send each row back as it is done."""
    os.environ.update(NBCOMPRESS_STRICT="1", NBCOMPRESS_DISPLAY="text", MPLBACKEND="Agg")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1), os.dup2(devnull, 2)         # progress bars and warnings: not ours
    import resource

    try:
        worker(group, name, timeout, steps, emit=lambda **row: conn.send(row))
        ru = resource.getrusage(resource.RUSAGE_SELF)     # CPU time: meaningful on a busy machine
        conn.send({"step": "_cpu", "seconds": round(ru.ru_utime + ru.ru_stime, 1)})
    finally:
        conn.close()


def preload(groups) -> None:
    """Import the libraries once in the parent (no tensor work, so forking stays safe): each
    model's child then starts in a second instead of paying the imports again."""
    import warnings

    warnings.filterwarnings("ignore")
    for mod in ["torch", "nbcompress", "IPython.core.interactiveshell", "torchvision", "timm",
                "transformers", "fvcore.nn"]:
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - a missing library skips its group elsewhere
            pass
    if "transformers" in groups:
        try:
            import transformers as tf

            for cls in ("BertModel", "GPT2Model", "T5Model", "WhisperModel", "LlamaModel"):
                getattr(tf, cls)                     # resolve the lazy modules once
        except Exception:  # noqa: BLE001
            pass


def start_model(group, name, timeout, steps):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, group, name, timeout, steps), daemon=True)
    p.start()
    send.close()
    return {"p": p, "conn": recv, "rows": {}, "t0": time.perf_counter(), "group": group,
            "name": name, "limit": timeout * 3}


def poll_model(job, steps) -> dict | None:
    """Read what the child sent; its result when it ended (or ran past its limit), else None."""
    while job["conn"].poll(0):
        try:
            r = job["conn"].recv()
        except EOFError:
            break
        job["rows"][r.pop("step")] = r
    over = time.perf_counter() - job["t0"] > job["limit"]
    if job["p"].is_alive() and not over:
        return None
    if job["p"].is_alive():
        job["p"].kill()
    job["p"].join()
    rows = job["rows"]
    cpu = rows.pop("_cpu", {}).get("seconds")
    for s in ["build"] + steps:
        if s not in rows:
            rows[s] = ({"status": "timeout", "reason": "model over its time limit"} if over else
                       {"status": "crash", "reason": f"worker died (exit {job['p'].exitcode})"})
    return {"group": job["group"], "model": job["name"],
            "seconds": round(time.perf_counter() - job["t0"], 1), "cpu_seconds": cpu,
            "steps": rows}


def sweep(models, timeout, steps, jobs, report) -> list[dict]:
    todo, running, results = list(models), [], []
    while todo or running:
        while todo and len(running) < jobs:
            running.append(start_model(*todo.pop(0), timeout, steps))
        time.sleep(0.2)
        for job in list(running):
            r = poll_model(job, steps)
            if r is not None:
                running.remove(job)
                results.append(r)
                report(r, len(results), len(models))
    order = {m: i for i, m in enumerate(models)}
    return sorted(results, key=lambda r: order[(r["group"], r["model"])])


def summary(results: list[dict], steps: list[str]) -> dict:
    table = {}
    for g in GROUPS:
        rs = [r for r in results if r["group"] == g]
        if not rs:
            continue
        table[g] = {}
        for s in steps:
            st = [r["steps"][s]["status"] for r in rs]
            counted = [x for x in st if x != "n/a"]
            table[g][s] = {k: st.count(k) for k in ("pass", "refused", "crash", "broken",
                                                    "timeout", "n/a")}
            table[g][s]["models"] = len(counted)
    return table


def print_table(table: dict, steps: list[str]) -> None:
    print("\npass / models (r = refused, c = crash, b = broken, t = timeout; n/a not counted)")
    head = ["group"] + steps
    rows = []
    for g, cells in table.items():
        row = [g]
        for s in steps:
            c = cells[s]
            tag = "".join(f" {c[k]}{k[0]}" for k in ("refused", "crash", "broken", "timeout") if c[k])
            row.append(f"{c['pass']}/{c['models']}{tag}")
        rows.append(row)
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for r in [head] + rows:
        print("  " + "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", choices=["fast", "full"], default="full")
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--models", default=None, help="regex over 'group/name'")
    ap.add_argument("--timeout", type=int, default=180, help="seconds per step (model: 3x)")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--jobs", type=int, default=1, help="models run at the same time")
    ap.add_argument("--out", default=str(RESULTS / "zoo.json"))
    ap.add_argument("--table", metavar="JSON", help="only print the table of a results file")
    ap.add_argument("--worker", nargs=2, metavar=("GROUP", "NAME"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    steps = [s for s in a.steps.split(",") if s]
    sys.path.insert(0, str(ROOT))              # this checkout's nbcompress
    if a.table:
        d = json.loads(Path(a.table).read_text())
        steps = [s for s in steps if any(s in r["steps"] for r in d["models"])]
        return print_table(summary(d["models"], steps), steps)
    if a.worker:
        return worker(*a.worker, a.timeout, steps)
    groups = [g for g in a.groups.split(",") if g]
    models = model_list(a.subset, groups)
    if a.models:
        models = [(g, n) for g, n in models if re.search(a.models, f"{g}/{n}")]
    preload(groups)
    import torch

    ver = {"torch": torch.__version__, "python": platform.python_version()}
    for lib in ("torchvision", "timm", "transformers", "fvcore"):
        try:
            ver[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001
            ver[lib] = None
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: list = []

    def write(results, complete):
        out.write_text(json.dumps({"env": {**ver, "date": time.strftime("%Y-%m-%d %H:%M")},
                                   "args": vars(a), "complete": complete,
                                   "table": summary(results, steps), "models": results}, indent=1))

    def report(r, i, total):
        done.append(r)
        write(done, False)                       # what is done so far survives an interrupt
        bad = {s: f"{c['status']}: {c.get('reason', '')}"[:110] for s, c in r["steps"].items()
               if c["status"] not in ("pass", "n/a")}
        print(f"[{i}/{total}] {r['group']}/{r['model']} {r['seconds']} s: "
              + ("all pass" if not bad else "; ".join(f"{s} {v}" for s, v in bad.items())),
              flush=True)
    results = sweep(models, a.timeout, steps, a.jobs, report)
    write(results, True)
    print_table(summary(results, steps), steps)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
