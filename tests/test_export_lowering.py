"""The ONNX lowering's runtime-minded rewrites (issue 18) change how a graph runs, never what it
computes: a one-channel stem conv as a depthwise conv of repeated codes, MaxPool on int8 codes
before their dequantization, dynamic int8 activations in the model's own code range, and the
exporter's per-node debugging metadata removed from the shipped file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import nbcompress
from nbcompress.data import digits_loaders, reference_cnn
from nbcompress.deploy import ops
from nbcompress.deploy.lowering import lowered_copy

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def static_cnn():
    tr, te = digits_loaders()
    m = reference_cnn(width=4, seed=0).eval()
    q = nbcompress.quantize(m, mode="static", calib=tr, calib_batches=4)
    return q, next(iter(te))[0][:16].clone()


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def test_stem_spread_computes_the_same_sums(static_cnn):
    q, x = static_cnn
    onnx_copy, _ = lowered_copy(q, "onnx")
    plain, _ = lowered_copy(q, "pt2")            # the stem as written for .pt2: one conv
    assert onnx_copy.conv1.spread and not plain.conv1.spread
    with torch.no_grad():
        a, b = onnx_copy.conv1(x), plain.conv1(x)
    assert a.shape == b.shape == (16, 4, 8, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_pool_on_codes_and_no_debug_metadata(static_cnn, tmp_path, monkeypatch):
    q, x = static_cnn
    r = nbcompress.export(q, tmp_path / "q.onnx", example_input=x, latency=False)
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    producer = {o: n for n in g.node for o in n.output}
    (pool,) = [n for n in g.node if n.op_type == "MaxPool"]
    assert producer[pool.input[0]].op_type == "QuantizeLinear"      # pools the uint8 codes
    assert all(not n.metadata_props for n in g.node)
    assert b"stack_trace" not in (tmp_path / "q.onnx").read_bytes()
    monkeypatch.setattr(ops, "finish_onnx", lambda path: 0)        # the file as written before
    r0 = nbcompress.export(q, tmp_path / "q0.onnx", example_input=x, latency=False)
    assert r.bytes < r0.bytes
    a, b = _run(tmp_path / "q.onnx", x), _run(tmp_path / "q0.onnx", x)
    assert (a.argmax(1) == b.argmax(1)).all()
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max() + 1e-6    # ORT's int8 Add rounding


def test_pool_before_dequantize_leaves_shared_and_float_inputs_alone():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, 4, 4])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.5])
    nodes = [helper.make_node("DequantizeLinear", ["x", "s"], ["d"]),
             helper.make_node("MaxPool", ["d"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["d"], ["z"])]          # d has a second reader: kept
    g = helper.make_graph(nodes, "g", [x], [y, z], [s])
    assert ops.pool_before_dequantize(g) == 0
    del g.node[2]
    del g.output[1]
    assert ops.pool_before_dequantize(g) == 1
    assert [n.op_type for n in g.node] == ["MaxPool", "DequantizeLinear"]
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    codes = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    (out,) = sess.run(None, {"x": codes})
    np.testing.assert_array_equal(out.reshape(-1), np.array([5, 7, 13, 15]) * 0.5)


def test_dynamic_int8_matches_the_model_and_survives_zero_input(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    q = nbcompress.quantize(m, mode="dynamic")
    x = torch.randn(4, 32)
    r = nbcompress.export(q, tmp_path / "d.onnx", example_input=x, latency=False)
    assert r.max_abs_diff < 1e-4, r
    for t in (torch.zeros(3, 32), -torch.rand(3, 32), torch.rand(1, 32)):
        got = _run(tmp_path / "d.onnx", t)
        with torch.no_grad():
            want = q(t).numpy()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-4)
