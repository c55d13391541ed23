"""%export through a real IPython shell (issue 18): NAME and NAME@K, --check, the history's
table, --latency onnxruntime, and every wrong argument as one line with nothing written."""
from __future__ import annotations

import os

import pytest

from nbcompress.fingerprint import state_fingerprint

pytest.importorskip("onnxruntime")


@pytest.fixture
def session(shell, trained_lenet, mnist, tmp_path):
    shell.user_ns.update(m=trained_lenet, te=mnist[1], out=str(tmp_path))
    shell.run_line_magic("nbcompress", "m --eval te")
    shell.run_line_magic("quantize", "m")
    return shell


def test_export_current_and_earlier_versions(session, tmp_path):
    ip = session
    r = ip.run_line_magic("export", f"m {tmp_path}/q.onnx --check te --no-latency")
    assert r.name == "m@1" and r.format == "onnx" and (tmp_path / "q.onnx").is_file()
    assert r.check["label"] == "te" and r.check["agreement"] >= 0.99
    assert r.int8_kernels == 3
    r0 = ip.run_line_magic("export", f"m@0 {tmp_path}/orig.onnx --no-latency")
    assert r0.name == "m@0" and r0.int8_kernels == 0 and r0.bytes > 3.4 * r.bytes
    r2 = ip.run_line_magic("export", f"m {tmp_path}/q.pt2 --no-latency")
    assert r2.format == "pt2"
    df = ip.run_line_magic("compress_history", "m --no-plot")
    assert list(df["exported"].str.split().str[0]) == ["onnx", "pt2"]
    assert df["agreement"].iloc[1] >= 0.99
    from nbcompress.report.html import history_table_html
    from nbcompress.report.tables import history_text

    assert "top-1 agreement" in history_text(df) and "pt2 " in history_text(df)
    assert "top-1 agreement" in history_table_html(df)     # (no latency: --no-latency)
    assert "exported m@1 to q.onnx (onnx, opset 18)" in repr(r)


def test_export_without_history_needs_an_input_shape(shell, trained_lenet, tmp_path):
    shell.user_ns["net"] = trained_lenet
    with pytest.raises(Exception, match="--input-shape"):
        shell.run_line_magic("export", f"net {tmp_path}/n.onnx")
    r = shell.run_line_magic("export", f"net {tmp_path}/n.onnx --input-shape 1,1,28,28 "
                                       f"--no-latency")
    assert r.name == "net" and r.dynamic_batch


@pytest.mark.parametrize("line, message", [
    ("m {out}/x.onnx --format tflite", "--format must be one of onnx, pt2, state_dict"),
    ("m {out}/nope/x.onnx", "PATH: the folder"),
    ("m@7 {out}/x.onnx", "m@7: no such version; m has versions 0..1"),
    ("m@x {out}/x.onnx", "m@x: no such version"),
    ("m {out}/x.onnx --opset 3", "--opset must be a whole number in [18, 23]"),
    ("m {out}/x.pt2 --opset 18", "--opset only applies to --format onnx"),
    ("m {out}/x.onnx --check nothere", "--check: no variable named 'nothere'"),
    ("m {out}/x.onnx --frmat onnx", "did you mean --format?"),
    ("nothere {out}/x.onnx", "no variable named 'nothere'"),
    ("m", "PATH is needed: the file to write"),
])
def test_bad_lines_are_one_line_and_write_nothing(session, tmp_path, line, message):
    from IPython.core.error import UsageError

    before = state_fingerprint(session.user_ns["m"])
    with pytest.raises(UsageError) as e:
        session.run_line_magic("export", line.format(out=tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []
    assert state_fingerprint(session.user_ns["m"]) == before


def test_latency_mode_onnxruntime_times_every_version(session):
    ip = session
    ip.run_line_magic("nbcompress", "m --latency onnxruntime")
    df = ip.run_line_magic("compress_history", "m --no-plot")
    assert df["latency_ms"].notna().all()
    h = ip._nbcompress_workspace.get("m")
    assert h.metrics_of(h.versions[0]).latency_mode == "onnxruntime"
    assert h.metrics_of(h.versions[1]).latency_mode == "onnxruntime"
