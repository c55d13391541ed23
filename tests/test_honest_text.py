"""Issue 13, item 5, "Text that tells the truth": the numbers and labels of the terminal text view.

- sparse FLOPs of quantized layers come from their stored int8 codes (a 90%-pruned model stays at
  ~10% of its FLOPs after int8 quantization, not "10.0x more"), and the parameter counts and the
  layer table agree with them;
- the demo's history table wraps long args between key=value tokens, never inside a number;
- the text view has the latency (before -> after, ratio, mode) in a section of its own, which
  ``repr()`` (what notebook tests compare) leaves out;
- plain-English labels, "1 row" / "3 rows", one number format per table column;
- ``repr(Metrics)`` is a few readable lines.
"""
from __future__ import annotations

import dataclasses
import re
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import nbcompress
from nbcompress.core import CompressionResult
from nbcompress.data import lenet_300_100
from nbcompress.demo import format_table
from nbcompress.metrics import Metrics, count_flops, count_params, measure, weight_density
from nbcompress.report import HistoryView, StepReport
from nbcompress.report import step as step_mod
from nbcompress.report.html import dataframe_html
from nbcompress.report.tables import format_column, wrap_args

X = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
LENET_FLOPS = 532_400
RAW_FIELDS = ("nonzero_params", "dense_bytes", "packed_bytes", "sparse_flops", "latency_ms",
              "size_ratio", "accuracy_delta")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("NBCOMPRESS_DISPLAY", raising=False)
    monkeypatch.delenv("NBCOMPRESS_TEXT_TIMINGS", raising=False)


@pytest.fixture(scope="module")
def pruned():
    """LeNet-300-100 with 90% of its weights zero (global magnitude; untrained is enough)."""
    return nbcompress.prune(lenet_300_100(seed=0), 0.9, progress=False)


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# ------------------------------------------------------------------ sparse FLOPs of int8 layers

def test_int8_dynamic_keeps_the_sparse_flops_of_the_pruned_model(pruned):
    q = nbcompress.quantize(pruned, progress=False)            # auto: torch.ao dynamic int8
    assert type(q.fc1).__name__ == "DynamicInt8Linear"
    p = measure(pruned, X, latency=False, pack=False)
    m = measure(q, X, latency=False, pack=False)
    assert p.flops == m.flops == LENET_FLOPS
    assert p.sparse_flops == pytest.approx(0.1 * LENET_FLOPS, rel=0.01)
    # the int8 layers skip their zero codes too (int8 rounding may add a few zeros, never remove)
    assert m.sparse_flops <= p.sparse_flops and m.sparse_flops == pytest.approx(p.sparse_flops,
                                                                                 rel=0.01)
    assert m.sparse_flops < 0.11 * m.flops
    # parameters and the layer table agree with what the FLOPs were scaled by
    assert m.params == p.params and m.nonzero_params <= p.nonzero_params
    rows = {r["layer"]: r for r in m.layers}
    assert set(rows) == {"fc1", "fc2", "fc3"}
    assert sum(r["params"] for r in m.layers) == m.params
    assert sum(r["nonzero"] for r in m.layers) == m.nonzero_params
    assert [rows[n]["flops"] for n in ("fc1", "fc2", "fc3")] == [470_400, 60_000, 2_000]
    for name in ("fc1", "fc2", "fc3"):
        w = getattr(pruned, name).weight
        assert weight_density(getattr(q, name)) == pytest.approx(
            float((w != 0).float().mean()), abs=2e-3)


@pytest.mark.parametrize("qconfig", ["per_tensor", "per_channel"])
def test_plain_torch_ao_dynamic_int8_is_counted_from_its_codes(pruned, qconfig):
    """A model the user quantized with torch.ao directly (no nbc_count): weights read back from
    the packed params, zero when the int8 code equals the zero point (per channel too)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qc = per_channel_dynamic_qconfig if qconfig == "per_channel" else default_dynamic_qconfig
    q = _quiet(torch.ao.quantization.quantize_dynamic, pruned, {nn.Linear: qc},
               dtype=torch.qint8)
    total, nz = count_params(q)
    assert (total, nz) == count_params(pruned) == (266_610, 27_030)
    flops, sparse, per_leaf = count_flops(q, X)
    assert flops == LENET_FLOPS and sparse == pytest.approx(0.1 * LENET_FLOPS, rel=0.01)
    assert set(per_leaf) >= {"fc1", "fc2", "fc3"}


def test_asymmetric_codes_count_their_zero_point(pruned):
    """Uniform 4-bit asymmetric codes: a zero weight is the zero-point code, not code 0."""
    q = nbcompress.quantize(pruned, mode="uniform", bits=4, symmetric=False, progress=False)
    assert q.fc1.zero_point is not None and bool((q.fc1.zero_point != 0).any())
    flops, sparse, _ = count_flops(q, X)
    assert sparse == pytest.approx(0.1 * LENET_FLOPS, rel=0.01)


def test_step_text_says_sparse_flops_unchanged_after_int8(pruned):
    from nbcompress import History, QuantizeConfig

    h = History(pruned, name="m", example_input=X, measure_latency=False)
    r = h.apply(QuantizeConfig(mode="dynamic", progress=False))
    line = next(ln for ln in repr(r).splitlines() if ln.strip().startswith("sparse FLOPs"))
    assert "53.2 kFLOPs" in line and "more" not in line, line


def test_magic_prune_then_quantize_in_ipython(shell):
    """Through a real IPython shell: the numbers, and the terminal display with its latency."""
    ns = shell.user_ns
    ns["net"] = lenet_300_100(seed=0)
    shell.run_line_magic("nbcompress", "net --input-shape 1,1,28,28")
    shell.run_line_magic("prune", "net 0.9 --no-progress")
    r = shell.run_line_magic("quantize", "net --no-progress")
    assert r.after.sparse_flops == pytest.approx(0.1 * r.after.flops, rel=0.02)
    assert r.before.sparse_flops == pytest.approx(r.after.sparse_flops, rel=0.01)
    text = repr(r)
    sparse_line = next(ln for ln in text.splitlines() if "sparse FLOPs" in ln)
    assert "more" not in sparse_line and "10.0×" not in sparse_line
    assert "latency" not in text                                  # repr: deterministic
    # what the terminal shows (no Jupyter kernel here): the text view, with the timings section
    data, _ = shell.display_formatter.format(r)
    shown = data["text/plain"]
    assert shown.startswith(text) and "timings" in shown
    lat = next(ln for ln in shown.splitlines() if ln.strip().startswith("latency "))
    assert re.search(r"\d ms\s+[\d.]+ (ms|µs)\s+\S+", lat), lat                # before, after
    assert re.search(r"× (faster|slower)|same", lat), lat                      # and the ratio
    assert "mode eager" in shown
    for raw in RAW_FIELDS:
        assert raw not in shown


# ------------------------------------------------------------------------- history args

LONG_ARGS = ["amount=0.9 finetune=DataLoader lr=0.0005",
             "teacher=version 0 epochs=2 T=4 alpha=0.9 lr=0.0003",
             "data=DataLoader exits=[relu1] threshold=0.9 epochs=2",
             "amount=0.123456789 structured=True importance=l2 scope=layer steps=3 seed=12345"]


def _history_df():
    rows = [{"version": 0, "technique": "baseline", "args": "", "params": 266_610,
             "nonzero_params": 266_610, "dense_bytes": 1_066_440, "packed_bytes": 1_068_911,
             "flops": 532_400, "sparse_flops": 532_400, "latency_ms": 0.081, "accuracy": 0.904,
             "size_ratio": 1.0, "accuracy_delta": 0.0, "current": False}]
    for i, a in enumerate(LONG_ARGS, 1):
        rows.append({**rows[0], "version": i, "technique": "prune", "args": a,
                     "nonzero_params": 27_030, "packed_bytes": 123_000, "sparse_flops": 53_240,
                     "latency_ms": 0.07 + i / 1000, "accuracy": 0.91, "size_ratio": 8.69,
                     "current": i == len(LONG_ARGS)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("args", LONG_ARGS)
def test_wrap_args_never_cuts_a_token(args):
    lines = wrap_args(args, 38)
    assert " ".join(lines) == args
    tokens = re.findall(r"\S+=", args)
    for ln in lines:
        assert len(ln) <= 38 or " " not in ln.split("=", 1)[-1], ln
    for key in tokens:                           # every key=value pair sits on one line, whole
        value = re.search(re.escape(key) + r"(\S+)", args).group(1)
        assert any(key + value in ln for ln in lines), (key, value, lines)


def test_demo_history_table_keeps_every_number_whole():
    text = format_table(_history_df())
    for a in LONG_ARGS:
        for tok in re.findall(r"[A-Za-z_]\w*=\S+", a):
            assert tok in text, (tok, text)
    assert "alpha=0.9" in text and "lr=0.0005" in text and "threshold=0.9" in text
    head = text.splitlines()[0]
    assert "nonzero" in head and "sparse FLOPs" in head and "latency" in head
    assert "← current" in text
    for raw in RAW_FIELDS:
        assert raw not in text
    # the same table without timings has no latency
    assert "latency" not in format_table(_history_df(), timings=False)


def test_history_view_text_is_plain_and_deterministic():
    df = _history_df()
    text = repr(HistoryView(df))
    assert "lr=0.0005" in text and "1.07 MB" in text and "90.40%" in text
    for raw in RAW_FIELDS + ("current",):
        assert raw not in text.splitlines()[0]
    df2 = df.copy()
    df2["latency_ms"] = 99.0
    assert repr(HistoryView(df2)) == text


# --------------------------------------------------------------------- latency in the text

def _metrics(**kw):
    m = Metrics(params=266_610, nonzero_params=266_610, dense_bytes=1_066_440,
                packed_bytes=1_068_911, flops=532_400, sparse_flops=532_400, latency_ms=0.081,
                accuracy=0.946, device="cpu", batch_size=1)
    return dataclasses.replace(m, **kw)


def _report(**kw):
    args = dict(name="model", kind="step", technique="prune", args="amount=0.9",
                before=_metrics(), after=_metrics(nonzero_params=26_661, packed_bytes=130_212,
                                                  sparse_flops=53_240, latency_ms=0.062,
                                                  accuracy=0.943),
                version=1, n_versions=2)
    args.update(kw)
    return StepReport(**args)


def test_text_view_shows_latency_before_after_ratio_and_mode():
    r = _report()
    text = str(r)
    section = text[text.index("\ntimings"):]
    assert re.search(r"latency\s+0\.081 ms\s+0\.062 ms\s+1\.31× faster", section), section
    assert "mode eager" in section and "on cpu" in section and "batch 1" in section
    assert "latency" not in repr(r) and repr(r) == r.text(timings=False)
    assert text.startswith(repr(r))                  # the compared part is unchanged
    # a measurement (no before) shows the one value
    one = str(StepReport(name="model", kind="measure", technique="baseline", args="",
                         before=None, after=_metrics()))
    assert re.search(r"latency\s+0\.081 ms", one)


def test_latency_modes_that_differ_are_not_compared():
    r = _report(before=_metrics(latency_mode="deployed"),
                after=_metrics(latency_mode="eager (deployed: data-dependent control flow)"))
    section = r.text(timings=True).split("\ntimings", 1)[1]
    assert "not comparable (deployed vs eager)" in section
    assert "deployed before, eager (deployed: data-dependent control flow) after" in section


def test_timings_follow_the_kernel_and_the_env_var(monkeypatch):
    r = _report()
    assert "timings" in str(r)                                   # a terminal / a script
    monkeypatch.setattr(step_mod, "kernel_has_comms", lambda: True)
    assert str(r) == repr(r)                                     # a kernel: nbval's text/plain
    assert r._repr_mimebundle_()["text/plain"] == repr(r)
    monkeypatch.setenv("NBCOMPRESS_TEXT_TIMINGS", "1")
    assert "timings" in r._repr_mimebundle_()["text/plain"]
    monkeypatch.setattr(step_mod, "kernel_has_comms", lambda: False)
    monkeypatch.setenv("NBCOMPRESS_TEXT_TIMINGS", "0")
    assert str(r) == repr(r)
    # no latency measured: no section
    monkeypatch.delenv("NBCOMPRESS_TEXT_TIMINGS")
    quiet = _report(before=_metrics(latency_ms=None), after=_metrics(latency_ms=None))
    assert str(quiet) == repr(quiet)


# ------------------------------------------------------------- labels, plurals, table formats

def _kind(cell: str) -> tuple:
    """What a formatted cell looks like: its unit and number of decimals."""
    m = re.fullmatch(r"[-+]?[\d,]+(?:\.(\d+))?\s*(%|×|\S*B|\S*FLOPs|ms)?", cell)
    assert m, cell
    return (m.group(2) or "", len(m.group(1) or ""))


def _columns(block: list[str]) -> dict[str, list[str]]:
    head = block[0]
    names = re.findall(r"\S+(?: \S+)*", head.strip())
    rows = [re.split(r"\s{2,}", ln.strip()) for ln in block[1:]]
    assert all(len(r) == len(names) for r in rows), (names, rows)
    return {n: [r[i] for r in rows] for i, n in enumerate(names)}


def _block(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    out = []
    for ln in lines[i + 1:]:
        if not ln.strip():
            break
        out.append(ln)
    return out


def _rounds_result():
    rounds = pd.DataFrame({"round": [1, 2, 3], "stage": ["prune + fine-tune"] * 3,
                           "sparsity": [0.535841, 0.78, 0.9],
                           "accuracy_pruned": [0.904, 0.888, 0.9778],
                           "accuracy": [0.923, 0.921, 0.917],
                           "loss": [0.199496, 0.18376, 1.2]})
    lottery = pd.DataFrame({"round": [1], "weights_left": [0.5], "accuracy": [0.9778],
                            "loss": [0.31]})
    return CompressionResult(model=None, notes=["rounds"],
                             tables={"rounds": rounds, "lottery rounds": lottery})


def test_tables_in_text_have_one_format_per_column_and_a_plural():
    r = _report(result=_rounds_result())
    text = repr(r)
    assert "(1 rows" not in text and "tables:" not in text
    assert "rounds (3 rows; report.result.tables['rounds']):" in text
    assert "lottery rounds (1 row; report.result.tables['lottery rounds']):" in text
    cols = _columns(_block(text, "rounds (3 rows"))
    for name, cells in cols.items():
        if name == "stage":
            continue
        kinds = {_kind(c) for c in cells}
        assert len(kinds) == 1, (name, cells)           # one number format per column
    assert cols["sparsity"] == ["53.6%", "78.0%", "90.0%"]
    assert cols["accuracy"] == ["92.30%", "92.10%", "91.70%"]
    assert cols["accuracy_pruned"] == ["90.40%", "88.80%", "97.78%"]
    lot = _columns(_block(text, "lottery rounds"))
    assert lot["weights_left"] == ["50.0%"] and lot["accuracy"] == ["97.78%"]
    # the HTML table of the same data formats the columns the same way
    html = dataframe_html(r.result.tables["rounds"])
    assert "0.9778" not in html and "97.78%" in html and "53.6%" in html


def test_format_column_one_format_per_column():
    assert format_column("sparsity", [0.5, 1.0, 0.9999]) == ["50.0%", "100.0%", "100.0%"]
    assert format_column("loss", [0.1995, 0.18376]) == ["0.1995", "0.1838"]
    assert format_column("loss", [0.1995, 2.25]) == ["0.20", "2.25"]      # same decimals
    assert format_column("amount", [0.5, 0.9, 0.99]) == ["0.50", "0.90", "0.99"]
    assert format_column("kept", [23_550, 1]) == ["23,550", "1"]       # counts stay counts
    assert format_column("flops_fraction", [1.0, 0.78]) == ["100.0%", "78.0%"]
    assert format_column("accuracy", [94.6, None]) == ["94.60%", ""]


def test_step_text_has_no_raw_field_names():
    r = _report(result=_rounds_result(), history=_history_df())
    for t in (repr(r), str(r)):
        for raw in RAW_FIELDS:
            assert raw not in t, raw


# ------------------------------------------------------------------------ print(metrics)

def test_metrics_repr_is_short_and_has_the_key_numbers(pruned):
    q = nbcompress.quantize(pruned, progress=False)
    m = measure(q, X, evaluator=lambda model: {"accuracy": 0.5, "loss": 1.25})
    text = repr(m)
    assert str(m) == text
    lines = text.splitlines()
    assert len(lines) <= 10 and len(text) <= 700 and max(map(len, lines)) <= 100, text
    for s in ("266,610", f"{m.nonzero_params:,}", "532.4 kFLOPs", "53.2 kFLOPs",
              "sparse", "dense", "packed", "latency", "ms", "eager", "50.00%", "loss 1.25",
              "3 with weights (see .layers)", "cpu", "batch 1"):
        assert s in text, (s, text)
    assert "{'layer'" not in text and "Linear" not in text        # no per-layer dump
    none = measure(q, pack=False)
    assert "not counted" in repr(none) and "not measured" in repr(none)


class _TiedLM(nn.Module):
    """A user's small language model with its output layer tied to the embedding (as GPT-2, T5,
    Whisper and BERT's masked-LM head do)."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.emb(ids))))


def test_tied_weights_count_once():
    m = _TiedLM()
    assert count_params(m)[0] == sum(p.numel() for p in m.parameters()) == 50 * 16 + 16 * 16 + 16
    # the same tensor listed under two modules is still one tensor of parameters
    assert sum(p.numel() for _, p in m.named_parameters(remove_duplicate=False)) == \
        count_params(m)[0] + 50 * 16
    ids = torch.randint(0, 50, (1, 8))
    met = measure(m, ids)
    assert met.params == met.nonzero_params == count_params(m)[0]
    # zeros in the shared tensor count once too
    with torch.no_grad():
        m.emb.weight[:10].zero_()
    assert count_params(m) == (count_params(m)[0], count_params(m)[0] - 10 * 16)
