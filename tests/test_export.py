"""%export / nbcompress.export (issue 18): every technique's result leaves the notebook as ONNX,
.pt2 or a plain state_dict, runs in its runtime (int8 as int8 kernels), agrees with the model,
and bad input writes nothing and changes nothing."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import nbcompress
from nbcompress import BadInput, export
from nbcompress.data import digits_loaders, reference_cnn, train_reference

from nbcompress.fingerprint import state_fingerprint

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits():
    return digits_loaders()


@pytest.fixture(scope="module")
def _resnet(digits):
    m = reference_cnn(width=8, in_channels=1, seed=0)
    train_reference(m, digits[0], epochs=4, seed=0)
    return m.eval()


@pytest.fixture
def resnet(_resnet):
    return copy.deepcopy(_resnet)


def _x(loader, n=1):
    return next(iter(loader))[0][:n].clone()


def _ort_run(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


# every technique's result on the digits SmallResNet: (build, exact) — exact: float ops only,
# the file must match the model to float rounding
TECHNIQUES = {
    "fp32": (lambda m, tr, x: m, True),
    "pruned": (lambda m, tr, x: nbcompress.prune(m, 0.6), True),
    "structured": (lambda m, tr, x: nbcompress.prune(m, 0.5, structured=True, example_input=x),
                   True),
    "int8 static": (lambda m, tr, x: nbcompress.quantize(m, mode="static", calib=tr), False),
    "4-bit": (lambda m, tr, x: nbcompress.quantize(m, mode="uniform", bits=4), True),
    "binary": (lambda m, tr, x: nbcompress.quantize(m, mode="binary"), True),
    "cluster": (lambda m, tr, x: nbcompress.quantize(m, mode="cluster", bits=4), True),
    "lowrank": (lambda m, tr, x: nbcompress.lowrank(m, energy=0.8), True),
    "separable": (lambda m, tr, x: nbcompress.lowrank(m, conv="separable"), True),
    "fp16": (lambda m, tr, x: nbcompress.quantize(m, dtype="fp16"), False),
    "early exit": (lambda m, tr, x: nbcompress.early_exit(m, tr, epochs=1, threshold=0.8), True),
    "slim 0.5": (lambda m, tr, x: nbcompress.slim(m, tr, widths=[0.5, 1], width=0.5, epochs=1),
                 True),
}


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_every_technique_exports_to_onnx_and_agrees(name, resnet, digits, tmp_path):
    tr, te = digits
    x = _x(te)
    build, exact = TECHNIQUES[name]
    model = build(resnet, tr, x)
    snap = state_fingerprint(model)
    path = tmp_path / "m.onnx"
    r = export(model, path, example_input=x, check=te, latency=False)
    assert path.is_file() and r.bytes == path.stat().st_size
    assert state_fingerprint(model) == snap                  # the model is not changed
    assert r.dynamic_batch                                # traced at batch 1, runs any batch
    xb = _x(te, 7)
    with torch.no_grad():
        ref = model.eval()(xb)
    got = _ort_run(str(path), xb)
    assert got.shape == tuple(ref.shape)
    if exact:
        assert r.rel_diff < 1e-4, r
        assert np.allclose(got, ref.numpy(), rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
        assert r.check["agreement"] >= 0.998, r
    else:
        assert r.check["agreement"] >= 0.97, r
    assert r.check["accuracy"] == pytest.approx(r.check["model_accuracy"], abs=0.02)
    if name == "int8 static":                             # runs as int8 in ONNX Runtime
        assert r.kernels.get("QLinearConv", 0) >= 6 and r.float_kernels == 0, r.kernels
        assert "static int8 Conv2d" in r.notes
    if name == "early exit":
        assert "early exit" in r.notes and "threshold" not in repr(r) or "0.8" in repr(r)


def test_dynamic_int8_runs_int8_kernels_and_is_smaller(trained_lenet, mnist, tmp_path):
    _, te = mnist
    x = _x(te)
    q = nbcompress.quantize(trained_lenet)
    fp = export(trained_lenet, tmp_path / "fp32.onnx", example_input=x, latency=False)
    r = export(q, tmp_path / "int8.onnx", example_input=x, check=te, latency=False)
    assert sum(r.kernels.get(k, 0) for k in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                                             "MatMulInteger")) == 3, r.kernels
    assert r.max_abs_diff < 1e-4, r       # the model's activation codes, not a finer range
    assert r.float_kernels == 0, r.kernels
    assert r.check["agreement"] >= 0.99, r
    assert fp.bytes / r.bytes > 3.4
    assert "dynamic int8 Linear" in r.notes
    assert "x3], float kernels [none]" in repr(r)


def test_files_run_without_nbcompress(trained_lenet, mnist, digits, _resnet, tmp_path):
    """The .onnx needs only onnxruntime; the .pt2 only torch (its quantized ops are PyTorch's
    own quantized_decomposed ones); the state_dict only torch.load(weights_only=True)."""
    _, te = mnist
    x = _x(te, 3)
    q = nbcompress.quantize(trained_lenet)
    s = nbcompress.quantize(_resnet, mode="static", calib=digits[0])
    xs = _x(digits[1], 3)
    r1 = export(q, tmp_path / "q.onnx", example_input=x[:1], latency=False)
    r2 = export(q, tmp_path / "q.pt2", example_input=x[:1], latency=False)
    r3 = export(s, tmp_path / "s.pt2", example_input=xs[:1], latency=False)
    r4 = export(q, tmp_path / "q.pt", example_input=x[:1], latency=False)
    assert (r1.format, r2.format, r3.format, r4.format) == ("onnx", "pt2", "pt2", "state_dict")
    assert "torch.ao.quantization.fx._decomposed" in r2.notes.get("loading", "")
    torch.save({"x": x, "xs": xs}, tmp_path / "inputs.pt")
    code = textwrap.dedent(f"""
        import sys, numpy as np, torch, onnxruntime as ort
        import torch.ao.quantization.fx._decomposed
        d = torch.load({str(tmp_path / 'inputs.pt')!r})
        s = ort.InferenceSession({str(tmp_path / 'q.onnx')!r})
        a = s.run(None, {{s.get_inputs()[0].name: d["x"].numpy()}})[0]
        b = torch.export.load({str(tmp_path / 'q.pt2')!r}).module()(d["x"])
        c = torch.export.load({str(tmp_path / 's.pt2')!r}).module()(d["xs"])
        sd = torch.load({str(tmp_path / 'q.pt')!r}, weights_only=True)
        assert "nbcompress" not in sys.modules
        np.save({str(tmp_path / 'out.npy')!r}, np.stack([a, b.detach().numpy()]))
        np.save({str(tmp_path / 'outs.npy')!r}, c.detach().numpy())
        print(sorted({{str(v.dtype) for v in sd.values()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.int8" in out.stdout
    ab = np.load(tmp_path / "out.npy")
    with torch.no_grad():
        ref = q(x).numpy()
        ref_s = s(xs).numpy()
    assert (ab[0].argmax(1) == ref.argmax(1)).all() and (ab[1].argmax(1) == ref.argmax(1)).all()
    assert np.abs(np.load(tmp_path / "outs.npy") - ref_s).max() < 0.1 * np.abs(ref_s).max()


# ------------------------------------------------------------------------------ bad input
def _no_leftovers(folder) -> bool:
    return not any(n.startswith(".nbc-export-") for n in os.listdir(folder))


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "tflite"}, "format must be one of onnx, pt2, state_dict"),
    ({"opset": 3}, "opset must be a whole number in [18, 23]"),
    ({"format": "pt2", "opset": 18}, "opset only applies to format='onnx'"),
    ({"fmt": "onnx"}, "export() got an unknown option 'fmt'"),
    ({"check": [1, 2]}, "check"),
])
def test_bad_options_one_line_nothing_written(kwargs, message, trained_lenet, mnist, tmp_path):
    snap = state_fingerprint(trained_lenet)
    with pytest.raises(BadInput) as e:
        export(trained_lenet, tmp_path / "m.onnx", example_input=_x(mnist[1]), **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == [] and state_fingerprint(trained_lenet) == snap


def test_bad_paths_and_inputs(trained_lenet, mnist, tmp_path):
    x = _x(mnist[1])
    with pytest.raises(BadInput, match="the folder .* does not exist"):
        export(trained_lenet, tmp_path / "nope" / "m.onnx", example_input=x)
    with pytest.raises(BadInput, match="is a folder"):
        export(trained_lenet, tmp_path, example_input=x)
    with pytest.raises(BadInput, match="example input"):
        export(trained_lenet, tmp_path / "m.onnx")
    with pytest.raises(BadInput, match="does not run on the example input"):
        export(trained_lenet, tmp_path / "m.onnx", example_input=torch.randn(1, 3, 5))
    with pytest.raises(BadInput, match="torch.nn.Module"):
        export("model", tmp_path / "m.onnx", example_input=x)
    assert os.listdir(tmp_path) == []


def test_layer_the_exporter_cannot_express_is_named(trained_lenet, mnist, tmp_path):
    """A model quantized by torch.ao directly (its packed layers are not ours)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(trained_lenet, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(BadInput, match=r"cannot export layer 'fc1' .*format='state_dict'"):
        export(q, tmp_path / "m.onnx", example_input=_x(mnist[1]))
    assert os.listdir(tmp_path) == []


def test_runtime_refusal_leaves_no_file(resnet, digits, tmp_path):
    """bf16: ONNX Runtime's CPU kernels have no bf16 Conv; the file is refused before it is put
    in place, and no temporary folder stays behind."""
    b = nbcompress.quantize(resnet, dtype="bf16")
    with pytest.raises(BadInput, match="ONNX Runtime cannot run the exported file.*fp16"):
        export(b, tmp_path / "b.onnx", example_input=_x(digits[1]), latency=False)
    assert os.listdir(tmp_path) == []
    r = export(b, tmp_path / "b.pt2", example_input=_x(digits[1]), latency=False)
    assert r.rel_diff == 0 and _no_leftovers(tmp_path)


def test_latency_is_timed_in_the_runtime(trained_lenet, mnist, tmp_path):
    r = export(nbcompress.quantize(trained_lenet), tmp_path / "q.onnx",
               example_input=_x(mnist[1], 64))
    assert r.latency_ms > 0 and r.eager_latency_ms > 0 and r.latency_batch == 64
    assert "latency (batch 64, one thread)" in str(r) and "latency" not in repr(r)
    assert "<li>" in r._repr_html_()


class _BatchTwoIsSpecial(nn.Module):
    """A model whose code looks at the batch size: the exporter fixes the batch dimension."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if x.shape[0] == 2:
            return self.fc(x.flatten(1)) * 2.0
        return self.fc(x.flatten(1))


def test_a_model_that_fixes_its_batch_is_checked_in_slices(digits, tmp_path):
    m = _BatchTwoIsSpecial()
    r = export(m, tmp_path / "f.onnx", example_input=_x(digits[1]), check=digits[1],
               latency=False)
    assert not r.dynamic_batch and "fixed to the example input's" in repr(r)
    assert r.check["n"] == len(digits[1].dataset) and r.check["agreement"] == 1.0
    p = export(m, tmp_path / "f.pt2", example_input=_x(digits[1]), latency=False)
    assert not p.dynamic_batch and p.rel_diff == 0
