"""Which library models leave the notebook (issue 18): ``nbcompress.export`` on models the
project did not write, fp32 and compressed, and the reason for each refusal.

Models come from benchmarks/bench_zoo.py's builders (random weights, batch 1, the smallest image
size the model takes): the Hugging Face architectures from small configs, a few torchvision
classifiers and a dozen timm families. Each model is exported as

  fp32_onnx    the model as built                      fp32_pt2     the same, torch.export
  int8_onnx    nbcompress.quantize(m) (dynamic int8)   pruned_onnx  nbcompress.prune(m, 0.5)

and each cell records pass / refused (nbcompress's one-line BadInput) / crash (anything else,
or a message of several lines: a bug) / timeout, the reason's first line, the file's bytes, the
max |difference| of the outputs on the example (and relative to the largest output), top-1
agreement on the example, the int8 kernels ONNX Runtime runs, and seconds. A group runs in one
process (the libraries load once), each model under an alarm of ``--timeout`` seconds in all.

    python scripts/check_export_zoo.py --group transformers            # in .venv
    python scripts/check_export_zoo.py --group torchvision             # in /tmp/v214
    python scripts/check_export_zoo.py --group timm --models 'vit|deit'
    python scripts/check_export_zoo.py --table                         # the table again

Results are merged by group into benchmarks/results/export_zoo.json (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_zoo import HF, TIMM, build, logits  # noqa: E402 - the zoo's own builders and lists

OUT = ROOT / "benchmarks" / "results" / "export_zoo.json"
TINY = 1e-4       # outputs below this: random weights vanished, relative differences are noise
CELLS = ["fp32_onnx", "int8_onnx", "pruned_onnx", "fp32_pt2"]
# the picks below are names of the zoo's lists (torchvision: its list_models), one or two a family
PICK = {
    "transformers": ["bert", "distilbert", "gpt2", "t5", "vit", "whisper"],
    "torchvision": ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
                    "vit_b_16", "swin_t", "regnet_y_400mf", "shufflenet_v2_x0_5",
                    "squeezenet1_0", "densenet121", "mnasnet0_5", "googlenet", "inception_v3"],
    "timm": ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
             "vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s", "regnetx_002",
             "cspresnet50", "res2net50_14w_8s", "mixer_s16_224", "edgenext_xx_small",
             "poolformer_s12", "ghostnet_100"],
}
assert set(PICK["transformers"]) <= set(HF) and set(PICK["timm"]) <= set(TIMM)


class Timeout(BaseException):
    """The model's alarm: not an Exception, so the exporter's ``except Exception`` lets it by."""


def _alarm(*_):
    raise Timeout


def variant(model, which: str, example):
    import nbcompress

    m = copy.deepcopy(model)
    if which == "int8":
        return nbcompress.quantize(m, example_input=example)
    if which == "pruned":
        return nbcompress.prune(m, 0.5, example_input=example)
    return m


def failure(e: BaseException, stage: str) -> dict:
    """A cell for an exception: refused when it is nbcompress's own one-line error."""
    from nbcompress.errors import NBCompressError

    lines = str(e).strip().splitlines() or [""]
    ours = isinstance(e, NBCompressError) and len(lines) == 1 and lines[0]
    status = ("refused" if stage == "export" else "n/a") if ours else "crash"
    reason = lines[0][:400] if ours else f"{type(e).__name__}: {lines[0][:300]}"
    if len(lines) > 1:
        reason += f" (+{len(lines) - 1} lines)"
    return {"status": status, "reason": reason if stage == "export" else f"{stage}: {reason}"}


def cell(model, example, name: str, folder: str) -> dict:
    import nbcompress

    which, fmt = name.split("_")
    t0, tt = time.perf_counter(), time.thread_time()
    try:
        m = variant(model, which, example)
    except Timeout:
        raise
    except Exception as e:  # noqa: BLE001 - the compression step itself refused
        return failure(e, which)
    scale = float(logits(m, example).abs().max())      # pruning can zero a whole classifier
    try:
        r = nbcompress.export(m, f"{folder}/{name}.{fmt}", example_input=example, latency=False)
    except Timeout:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is recorded
        out = failure(e, "export")
    else:
        out = {"status": "pass", "bytes": r.bytes, "max_abs_diff": r.max_abs_diff,
               "rel_diff": r.rel_diff, "top1": list(r.example_top1 or ()),
               "int8_kernels": r.int8_kernels, "dynamic_batch": r.dynamic_batch,
               "outputs": r.outputs, "out_scale": scale}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["cpu_seconds"] = round(time.thread_time() - tt, 1)
    return out


def run_model(group: str, name: str, cells: list[str], timeout: int) -> dict:
    import torch

    row = {"group": group, "model": name, "cells": {}}
    t0 = time.perf_counter()
    signal.alarm(timeout)
    todo = list(cells)
    try:
        torch.manual_seed(0)
        model, example, _ = build(group, name)
        row["input"] = (list(example.shape) if isinstance(example, torch.Tensor)
                        else {k: list(v.shape) for k, v in example.items()})
        # the largest |score| of the model: random weights can make it vanish (a zero-initialised
        # head, activations shrinking layer by layer), and then relative differences are noise
        row["out_scale"] = float(logits(model, example).abs().max())
        with tempfile.TemporaryDirectory(prefix="nbc-exzoo-") as folder:
            while todo:
                row["cells"][todo[0]] = cell(model, example, todo[0], folder)
                todo.pop(0)
    except Timeout:
        for c in todo:
            row["cells"][c] = {"status": "timeout", "reason": f"model over {timeout} s"}
    except Exception as e:  # noqa: BLE001 - the model does not build or run
        for c in todo:
            row["cells"][c] = {"status": "crash", "reason": f"build: {type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ----------------------------------------------------------------------------------- the table
def _mark(c: dict, scale: float | None = None) -> str:
    s = c.get("status", "-")
    if s != "pass":
        return {"refused": "REFUSED", "crash": "CRASH", "timeout": "timeout",
                "n/a": "n/a"}.get(s, s)
    top = c.get("top1") or []
    agree = f" {top[0]}/{top[1]}" if len(top) == 2 else ""
    k = f" k{c['int8_kernels']}" if c.get("int8_kernels") else ""
    scale = c.get("out_scale", scale)
    tiny = scale is not None and scale < TINY
    d = f"d{c['rel_diff']:.0e}" + ("(tiny out)" if tiny else "")
    return f"ok {c['bytes'] / 1e6:.1f}MB {d}{agree}{k}"


def print_table(rows: list[dict]) -> None:
    """One line per model (ok SIZE d<rel diff> <top-1 agree> k<int8 kernels>), then reasons."""
    head = ["model"] + CELLS
    table = [[f"{r['group'][:5]}/{r['model']}"] + [_mark(r["cells"].get(c, {}), r.get("out_scale"))
                                                 for c in CELLS]
             for r in rows]
    w = [max(len(h), *(len(t[i]) for t in table)) if table else len(h)
         for i, h in enumerate(head)]
    for t in [head] + table:
        print("  ".join(str(x).ljust(w[i]) for i, x in enumerate(t)))
    print()
    for r in rows:
        for c in CELLS:
            x = r["cells"].get(c, {})
            if x.get("status", "pass") != "pass":
                print(f"{r['group']}/{r['model']} {c}: {x['status']}: {x.get('reason', '')[:200]}")
    for s in ("pass", "refused", "crash", "timeout", "n/a"):
        counts = {c: sum(r["cells"].get(c, {}).get("status") == s for r in rows) for c in CELLS}
        print(f"{s:8s} " + "  ".join(f"{c} {n}" for c, n in counts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", choices=list(PICK))
    ap.add_argument("--models", default=None, help="regex over the group's picks")
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--timeout", type=int, default=90, help="seconds per model, all cells")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="only print the saved table")
    a = ap.parse_args()
    out = Path(a.out)
    saved = json.loads(out.read_text()) if out.exists() else {"env": {}, "models": []}
    if a.table or not a.group:
        return print_table(saved["models"])
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    names = [n for n in PICK[a.group] if not a.models or re.search(a.models, n)]
    cells = [c for c in a.cells.split(",") if c in CELLS]
    rows = []
    for i, n in enumerate(names):
        r = run_model(a.group, n, cells, a.timeout)
        rows.append(r)
        print(f"[{i + 1}/{len(names)}] {a.group}/{n} {r['seconds']} s: "
              + "  ".join(f"{c} {_mark(x, r.get('out_scale'))}" for c, x in r["cells"].items()),
              flush=True)
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "timeout_s": a.timeout}
    for lib in ("transformers", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript"):
        try:
            env[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - not in this environment
            env[lib] = None
    done = {(r["group"], r["model"]): r for r in rows}
    for r in saved["models"]:                 # a run of some cells keeps the others' results
        new = done.get((r["group"], r["model"]))
        if new is not None:
            new["cells"] = {c: {**r["cells"], **new["cells"]}[c] for c in CELLS
                            if c in r["cells"] or c in new["cells"]}
    keep = [r for r in saved["models"] if (r["group"], r["model"]) not in done]
    saved["env"][a.group] = env
    saved["models"] = sorted(keep + rows, key=lambda r: (list(PICK).index(r["group"]),
                                                         PICK[r["group"]].index(r["model"])
                                                         if r["model"] in PICK[r["group"]]
                                                         else 99))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=1))
    print()
    print_table([r for r in saved["models"] if r["group"] == a.group])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
