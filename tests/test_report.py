"""The display layer, fed hand-made Metrics (no training, no measuring)."""
from __future__ import annotations

import dataclasses
import re

import pandas as pd
import pytest

from nbcompress.core import CompressionResult
from nbcompress.metrics import Metrics
from nbcompress.report import (Dashboard, HistoryView, StepReport, format_bytes, format_count,
                               format_flops, format_pct, history_html, history_plot_png,
                               layers_plot_png, metrics_table)
from nbcompress.report import step as step_mod

PNG = b"\x89PNG"
IMG = '<img src="data:image/png;base64,'


def _layers(nonzero, bits=None, dtype="float32"):
    sizes = [("fc1", 235_500, 470_400), ("fc2", 30_100, 60_000), ("fc3", 1_010, 2_000)]
    return [{"layer": n, "type": "Linear", "params": p, "nonzero": z, "sparsity": 1 - z / p,
             "flops": f, "dtype": dtype, "bits": bits} for (n, p, f), z in zip(sizes, nonzero)]


def _before(**kw):
    m = Metrics(params=266_610, nonzero_params=266_610, dense_bytes=1_066_440,
                packed_bytes=1_068_911, flops=532_400, sparse_flops=532_400, latency_ms=0.081,
                accuracy=0.946, layers=_layers([235_500, 30_100, 1_010]), device="cpu",
                batch_size=1)
    return dataclasses.replace(m, **kw)


def _after(**kw):
    m = Metrics(params=266_610, nonzero_params=26_661, dense_bytes=1_066_440,
                packed_bytes=130_212, flops=532_400, sparse_flops=53_240, latency_ms=0.079,
                accuracy=0.943, layers=_layers([23_550, 3_010, 101]), device="cpu", batch_size=1)
    return dataclasses.replace(m, **kw)


def _history(accuracy=True):
    rows = []
    for v, (tech, args, m) in enumerate([("baseline", "", _before()),
                                         ("prune", "amount=0.5", _after(nonzero_params=133_305,
                                                                        packed_bytes=561_023,
                                                                        accuracy=0.947)),
                                         ("prune", "amount=0.9", _after())]):
        r = {"version": v, "technique": tech, "args": args}
        r.update({k: getattr(m, k) for k in ("params", "nonzero_params", "dense_bytes",
                                             "packed_bytes", "flops", "sparse_flops",
                                             "latency_ms", "accuracy")})
        if not accuracy:
            r["accuracy"] = None
        r["current"] = v == 2
        rows.append(r)
    return pd.DataFrame(rows)


def _result():
    return CompressionResult(
        model=None,
        layers=[{"layer": "fc1", "sparsity": 0.9, "kept": 23_550},
                {"layer": "fc2", "sparsity": 0.9, "kept": 3_010},
                {"layer": "fc3", "sparsity": 0.9, "kept": 101}],
        notes=["global magnitude pruning; biases kept", "fine-tuned 2 epochs"],
        extra={"epochs": 2},
        tables={"scan": pd.DataFrame({"amount": [0.5, 0.9], "accuracy": [0.947, 0.943]})})


def _report(**kw):
    args = dict(name="model", kind="step", technique="prune", args="amount=0.9 structured=False",
                before=_before(), after=_after(), result=_result(), version=2, n_versions=3,
                history=_history())
    args.update(kw)
    return StepReport(**args)


@pytest.fixture(autouse=True)
def _plain_display(monkeypatch):
    monkeypatch.delenv("NBCOMPRESS_DISPLAY", raising=False)
    monkeypatch.delenv("NBCOMPRESS_TEXT_TIMINGS", raising=False)


# ----------------------------------------------------------------------------- formatting

def test_formatters():
    assert format_bytes(1_066_440) == "1.07 MB"
    assert format_bytes(5_200) == "5.2 kB"
    assert format_bytes(130_212) == "130 kB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(999_999) == "1 MB"
    assert format_count(266_610) == "266,610"
    assert format_flops(532_400) == "532.4 kFLOPs"
    assert format_flops(1_200_000) == "1.2 MFLOPs"
    assert format_flops(4.1e9) == "4.1 GFLOPs"
    assert format_pct(0.9453) == "94.53%"
    assert format_bytes(None) == format_flops(None) == format_pct(None) == "—"


def test_metrics_table():
    df = metrics_table(_before(), _after())
    assert list(df.columns) == ["before", "after", "ratio"]
    assert df.loc["params", "before"] == "266,610"
    assert df.loc["nonzero params", "after"] == "26,661"
    assert df.loc["nonzero params", "ratio"] == "10.0× fewer"
    assert df.loc["packed bytes", "before"] == "1.07 MB"
    assert df.loc["packed bytes", "ratio"] == "8.21× smaller"
    assert df.loc["dense bytes", "ratio"] == "same"
    assert df.loc["FLOPs", "before"] == "532.4 kFLOPs"
    assert df.loc["accuracy", "before"] == "94.60%"
    assert df.loc["accuracy", "ratio"] == "-0.30 pts"
    assert df.loc["sparsity", "after"] == "90.00%"
    raw = metrics_table(_before(), _after(), raw=True)
    assert raw.loc["packed bytes", "ratio"] == pytest.approx(1_068_911 / 130_212)
    assert raw.loc["accuracy", "ratio"] == pytest.approx(-0.3)
    # an extra model is one more column; no before gives a single value column
    ex = metrics_table(_before(), _after(), {"teacher": _before(accuracy=0.98)})
    assert list(ex.columns) == ["before", "after", "ratio", "teacher"]
    assert ex.loc["accuracy", "teacher"] == "98.00%"
    one = metrics_table(None, _after())
    assert list(one.columns) == ["value"]
    assert "latency ms" not in metrics_table(_before(), _after(), latency=False).index


def test_accuracy_in_percent_and_regression_sense():
    df = metrics_table(_before(accuracy=94.6, packed_bytes=100), _after(accuracy=95.1, packed_bytes=200))
    assert df.loc["accuracy", "after"] == "95.10%"
    assert df.loc["accuracy", "ratio"] == "+0.50 pts"
    assert df.loc["packed bytes", "ratio"] == "2.00× larger"


# ----------------------------------------------------------------------------------- repr

def test_repr_deterministic_and_complete():
    a = _report()
    b = _report(before=_before(latency_ms=12.5), after=_after(latency_ms=3.3, device="cuda:0"))
    assert repr(a) == repr(b)
    text = repr(a)
    assert text.splitlines()[0] == "prune model: version 2 of 3 — amount=0.9 structured=False"
    for s in ("266,610", "26,661", "10.0× fewer", "1.07 MB", "130 kB", "8.21× smaller",
              "94.60%", "94.30%", "-0.30 pts", "fc1", "23,550",
              "global magnitude pruning; biases kept", "fine-tuned 2 epochs"):
        assert s in text, s
    assert "latency" not in text and "ms" not in text.split()
    assert not re.search(r"0x[0-9a-f]{6,}", text)
    assert "before" in text and "after" in text and "change" in text


def test_measure_only_report():
    r = StepReport(name="model", kind="measure", technique="baseline", args="", before=None,
                   after=_before())
    text = repr(r)
    assert text.splitlines()[0] == "baseline model: version 0 of 1"
    assert "value" in text and "before" not in text and "change" not in text
    html = r._repr_html_()
    assert 'data-col="value"' in html and 'data-col="before"' not in html
    assert IMG in html  # the per-layer chart, even without history
    bundle = r._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}


def test_accuracy_none():
    r = _report(before=_before(accuracy=None), after=_after(accuracy=None),
                history=_history(accuracy=False))
    text = repr(r)
    assert "accuracy not measured" in text
    html = r._repr_html_()
    assert "nbc-metrics" in html and IMG in html
    png = r.history_png()
    assert png.startswith(PNG)


# ----------------------------------------------------------------------------------- html

def test_html_structure():
    html = _report()._repr_html_()
    assert '<table class="nbc-metrics"' in html
    assert 'data-metric="packed_bytes" data-col="before" data-value="1068911.0">1.07 MB<' in html
    assert 'data-metric="packed_bytes" data-col="after"' in html
    assert 'data-metric="latency_ms" data-col="after"' in html  # latency is in the HTML
    assert "median" in html
    assert html.count(IMG) >= 2  # per-layer chart and history plot
    assert "global magnitude pruning; biases kept" in html
    assert "#1a7f37" in html and "#cf222e" in html  # an improvement and a regression
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "scan" in html and "nbc-table" in html  # result.tables


def test_html_escapes():
    r = _report(name="m<x>", args="a=<b>", result=CompressionResult(model=None, notes=["<i>x</i>"]))
    html = r._repr_html_()
    assert "<i>x</i>" not in html and "&lt;i&gt;x&lt;/i&gt;" in html
    assert "m<x>" not in html


def test_mimebundle_plain_process():
    bundle = _report()._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}
    # outside a kernel (a terminal) the text view ends with the timings; repr never has them
    assert bundle["text/plain"] == _report().text(timings=True) == str(_report())
    assert bundle["text/plain"].startswith(repr(_report()) + "\n\ntimings")
    assert step_mod.WIDGET_MIME not in bundle
    only = _report()._repr_mimebundle_(include={"text/plain"})
    assert set(only) == {"text/plain"}


def test_mimebundle_text_mode(monkeypatch):
    monkeypatch.setenv("NBCOMPRESS_DISPLAY", "text")
    r = _report()
    assert set(r._repr_mimebundle_()) == {"text/plain"}
    assert r._repr_html_() is None


def test_mimebundle_adds_widget_in_a_kernel(monkeypatch):
    pytest.importorskip("ipywidgets")
    monkeypatch.setattr(step_mod, "kernel_has_comms", lambda: True)
    bundle = _report()._repr_mimebundle_()
    view = bundle[step_mod.WIDGET_MIME]
    assert view["model_id"]
    assert "text/plain" in bundle and "text/html" in bundle
    assert bundle["text/plain"] == repr(_report())   # in a kernel: what nbval compares


def test_mimebundle_never_fails(monkeypatch):
    r = _report()
    monkeypatch.setattr(StepReport, "_repr_html_", lambda self: 1 / 0)
    bundle = r._repr_mimebundle_()
    assert bundle["text/plain"] == str(r)


# -------------------------------------------------------------------------------- widgets

def test_widget_builds():
    W = pytest.importorskip("ipywidgets")
    w = _report().widget()
    assert isinstance(w, W.VBox)
    header, tabs = w.children
    assert "prune" in header.value
    assert tuple(tabs.titles) == ("Metrics", "Layers", "History", "Details")
    assert "nbc-metrics" in tabs.children[0].value
    images = [c for c in tabs.children[1].children if isinstance(c, W.Image)]
    assert images and bytes(images[0].value).startswith(PNG)


def test_dashboard_update_replaces_contents():
    pytest.importorskip("ipywidgets")
    d = Dashboard(_report())
    first = d.box.children
    d.box.children[1].selected_index = 2
    undo = _report(kind="undo", technique="undo", args="", before=_after(), after=_before(),
                   result=None, version=0)
    d.update(undo)
    assert d.box.children is not first and d.box.children[0] is not first[0]
    assert "undo" in d.box.children[0].value and "version 0 of 3" in d.box.children[0].value
    assert d.box.children[1].selected_index == 2
    assert d.report is undo and repr(d) == repr(undo)
    same = Dashboard.for_name("model_test", _report())
    assert Dashboard.for_name("model_test", undo) is same and same.report is undo
    Dashboard.forget("model_test")


# ---------------------------------------------------------------------------------- plots

def test_plots_are_png_and_leave_no_figures():
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    pngs = [history_plot_png(_history()), history_plot_png(_history(accuracy=False)),
            history_plot_png(_history().iloc[:1]), history_plot_png(pd.DataFrame()),
            layers_plot_png(_after().layers), layers_plot_png(_after().layers, key="bits"),
            layers_plot_png(_after().layers, before=_before().layers),
            layers_plot_png(_layers([1, 2, 3], bits=4), key="bits"), layers_plot_png([])]
    assert all(p.startswith(PNG) for p in pngs)
    assert set(plt.get_fignums()) == before == set()
    assert history_plot_png(_history()) == pngs[0]  # deterministic bytes


def test_history_view_and_html():
    df = _history()
    df["time"] = ["12:00:01", "12:00:05", "12:00:09"]
    hv = HistoryView(df, name="model")
    text = repr(hv)
    assert "latency" not in text and "time" not in text and "12:00" not in text
    assert "amount=0.9" in text and "packed" in text and "1.07 MB" in text
    assert "_" not in text        # plain-English headers, no field names like packed_bytes
    html = hv._repr_html_()
    assert IMG in html and "nbc-history" in html and 'data-current="1"' in html
    assert IMG in history_html(df, history_plot_png(df))
    df2 = _history()
    df2.loc[1, "latency_ms"] = 99.0
    assert repr(HistoryView(df2)) == repr(HistoryView(_history()))
