"""%quantize: int8 with real kernels (dynamic, static), fp16/bf16, k-bit uniform codes stored
packed, k-means weight clustering with Huffman-coded storage, binary weights, QAT; the magic
through a real InteractiveShell, the API, storage round trips, and every bad input."""
from __future__ import annotations

import copy
import io
import struct

import numpy as np
import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

import nbcompress
from nbcompress import BadInput, NBCompressError, load, measure, save
from nbcompress.data import digits_loaders, reference_cnn
from nbcompress.errors import FieldError
from nbcompress.techniques.quantize import (QuantizeConfig, binarize, demo_config, kmeans_cluster,
                                            quantize, uniform_quantize)
from nbcompress.techniques.quantize.qmodules import QuantizedWeightLayer, ReducedPrecision
from nbcompress.techniques.quantize.qmodules_int8 import (DynamicInt8GRU, DynamicInt8Linear,
                                                          DynamicInt8LSTM, StaticInt8Conv2d,
                                                          StaticInt8Linear)
from nbcompress.storage import breakdown
from nbcompress.train import evaluate
from conftest import same_as_snapshot, snapshot

LENET_FLOPS = 2 * (784 * 300 + 300 * 100 + 100 * 10)
# (latency=False below: these tests check sizes, FLOPs and accuracy; benchmarks time things)
X1 = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def packed(model, **kw) -> int:
    buf = io.BytesIO()
    return save(model, buf, **kw)


def roundtrip(model):
    buf = io.BytesIO()
    save(model, buf)
    data = buf.getvalue()
    return load(io.BytesIO(data)), data


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def test_batch(mnist):
    return next(iter(mnist[1]))[0][:200]


# ------------------------------------------------------------------------------ int8 dynamic
def test_dynamic_int8_real_kernels_size_flops_accuracy_roundtrip(trained_lenet, mnist, test_batch):
    snap = snapshot(trained_lenet)
    before = measure(trained_lenet, X1, mnist[1], latency=False)
    q = quantize(trained_lenet, mode="dynamic")
    assert same_as_snapshot(trained_lenet, snap)                 # the argument is untouched
    assert [type(m) for m in (q.fc1, q.fc2, q.fc3)] == [DynamicInt8Linear] * 3
    assert q.fc1._packed_params._packed_params.__class__.__name__ == "ScriptObject"  # real kernel
    after = measure(q, X1, mnist[1], latency=False)
    assert after.params == before.params == 266_610
    assert after.flops == before.flops == LENET_FLOPS            # int8 ops counted, not dropped
    assert before.packed_bytes / after.packed_bytes >= 3.9
    assert after.dense_bytes < before.dense_bytes / 3.8          # int8 in memory too
    assert before.accuracy - after.accuracy <= 0.005
    assert {r["bits"] for r in after.layers if r["type"] == "DynamicInt8Linear"} == {8}
    back, data = roundtrip(q)
    assert len(data) == after.packed_bytes
    assert torch.equal(outputs(back, test_batch), outputs(q, test_batch))
    assert type(back.fc1) is DynamicInt8Linear


def test_dynamic_per_channel_scales_and_weights_exact(trained_lenet):
    q = quantize(trained_lenet, mode="dynamic", per_channel=True)
    w, _ = q.fc1._weight_bias()
    assert w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    assert w.int_repr().abs().max() <= 127
    err = (w.dequantize() - trained_lenet.fc1.weight.detach()).abs()
    scales = w.q_per_channel_scales().float()[:, None]
    assert bool((err <= scales / 2 + 1e-7).all())                # round-to-nearest on the grid
    assert torch.equal(scales, scales.half().float())            # fp16-exact: 2 bytes in the file


class RecurrentNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(64, 24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.fc(y[:, -1])


def test_dynamic_int8_lstm_gru_counted_and_stored():
    torch.manual_seed(0)
    model = RecurrentNet().eval()
    x = torch.randn(4, 7, 16)
    res = nbcompress.compress(model, QuantizeConfig(per_channel=True))
    q = res.model
    assert (type(q.lstm), type(q.gru), type(q.fc)) == (DynamicInt8LSTM, DynamicInt8GRU,
                                                       DynamicInt8Linear)
    assert "1 Linear and 2 LSTM/GRU layers" in " ".join(res.notes)
    assert (outputs(q, x) - outputs(model, x)).abs().max() < 0.02
    before, after = measure(model, x[:1], latency=False), measure(q, x[:1], latency=False)
    gates = 2 * (4 * 32 * (16 + 32) + 4 * 32 * (64 + 32)) + 3 * 24 * (64 + 24)   # per token
    assert before.flops == after.flops == 2 * 7 * gates + 2 * 24 * 5
    assert before.params == after.params
    assert before.packed_bytes / after.packed_bytes >= 3.0
    buf = io.BytesIO()
    save(q, buf)
    back = load(io.BytesIO(buf.getvalue()), classes=[RecurrentNet])
    assert type(back.lstm) is DynamicInt8LSTM and torch.equal(outputs(back, x), outputs(q, x))


def test_auto_magic_picks_int8_says_which_and_undo(shell, trained_lenet, mnist):
    shell.user_ns.update(model=trained_lenet, test_loader=mnist[1])
    orig = trained_lenet
    snap = snapshot(orig)
    shell.run_line_magic("nbcompress", "model --eval test_loader")
    r = shell.run_line_magic("quantize", "model --no-progress")
    q = shell.user_ns["model"]
    assert type(q.fc1) is DynamicInt8Linear
    text = repr(r)
    assert "chose dynamic int8" in text and "torch.ao" in text
    assert r.after.packed_bytes * 3.9 <= r.before.packed_bytes
    assert same_as_snapshot(orig, snap)
    shell.run_line_magic("undo", "model")
    assert shell.user_ns["model"] is not orig and same_as_snapshot(shell.user_ns["model"], snap)


def test_auto_on_conv_model_needs_calib_or_goes_static(shell):
    cnn = reference_cnn(width=8, seed=0).eval()
    shell.user_ns["cnn"] = cnn
    with pytest.raises(UsageError, match="--calib LOADER"):
        shell.run_line_magic("quantize", "cnn --layers conv --no-progress")
    assert shell.user_ns["cnn"] is cnn


# ------------------------------------------------------------------------------ int8 static
@pytest.fixture(scope="module")
def digits_cnn():
    from nbcompress.data import train_reference

    train, test = digits_loaders(batch_size=64)
    model = reference_cnn(width=8, seed=0)
    train_reference(model, train, epochs=2, seed=0)
    return model.eval(), train, test


def test_static_int8_convnet_folds_bn_fuses_relu(digits_cnn):
    model, train, test = digits_cnn
    x = next(iter(test))[0]
    res = nbcompress.compress(model, QuantizeConfig(mode="static", calib=train, calib_batches=4,
                                                    per_channel=True), device="cpu")
    q = res.model
    convs = [m for m in q.modules() if isinstance(m, StaticInt8Conv2d)]
    assert len(convs) == 6 and type(q.fc) is StaticInt8Linear
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())          # all folded
    assert {n for n, m in q.named_modules() if getattr(m, "fused_relu", False)} == \
        {"conv1", "layer1.conv1", "down_conv", "layer2.conv1"}                  # relu after BN
    assert isinstance(q.relu, nn.Identity) and isinstance(q.layer1.relu2, nn.ReLU)  # after add
    notes = " ".join(res.notes)
    assert "folded 6 BatchNorm" in notes and "fused 4 ReLU" in notes
    ref, out = outputs(model, x), outputs(q, x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.95
    assert abs(evaluate(model, test) - evaluate(q, test)) <= 0.02
    fp, qm = measure(model, x[:1], latency=False), measure(q, x[:1], latency=False)
    bn = sum(m.weight.numel() + m.bias.numel() for m in model.modules()
             if isinstance(m, nn.BatchNorm2d))
    new_bias = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    assert qm.flops == fp.flops and qm.params == fp.params - bn + new_bias   # BN folded into convs
    tensor_bytes = [sum(r["bytes"] for r in breakdown(m)) for m in (model, q)]
    assert tensor_bytes[0] / tensor_bytes[1] >= 3.5          # (a 7k-param file is mostly header)
    back, _ = roundtrip(q)
    assert torch.equal(outputs(back, x), out) and back.conv1.nbc_huffman is False
    # copies and pickles (History spills to disk with torch.save) keep the calibrated state
    cp = copy.deepcopy(q)
    assert torch.equal(outputs(cp, x), out)
    assert cp.conv1.fused_relu and cp.conv1.nbc_huffman is False
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    assert torch.equal(outputs(torch.load(buf, weights_only=False), x), out)


def test_static_magic_with_calib(shell, digits_cnn):
    model, train, test = digits_cnn
    shell.user_ns.update(cnn=copy.deepcopy(model), calib=train, test=test)
    r = shell.run_line_magic("quantize", "cnn --calib calib --calib-batches 2 --eval test "
                                         "--no-progress")
    assert "chose static int8" in repr(r)
    assert isinstance(shell.user_ns["cnn"].conv1, StaticInt8Conv2d)
    assert r.after.accuracy >= r.before.accuracy - 0.03


# ------------------------------------------------------------------------------ uniform k-bit
@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_codes_grid_and_error_fall_with_bits(symmetric):
    torch.manual_seed(0)
    w = torch.randn(64, 100) * torch.linspace(0.1, 2, 64)[:, None]
    w[:, :5] = 0
    errs = []
    for bits in range(1, 9):
        codes, scale, zp = uniform_quantize(w, bits, per_channel=True, symmetric=symmetric)
        assert torch.unique(codes).numel() <= 2 ** bits
        shape = (-1, 1)
        deq = (codes.float() - (zp.float().reshape(shape) if zp is not None else 0)) * \
            scale.reshape(shape)
        if symmetric and bits == 1:
            assert set(torch.unique(codes).tolist()) <= {-1, 1}
        else:
            assert torch.equal(deq[:, :5], torch.zeros(64, 5))     # zeros stay exactly zero
        errs.append(float((deq - w).norm() / w.norm()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.01


def test_uniform_4bit_per_channel_stored_packed(trained_lenet, mnist, test_batch):
    before = measure(trained_lenet, X1, mnist[1], latency=False)
    q = quantize(trained_lenet, bits=4, per_channel=True)
    assert type(q.fc1) is QuantizedWeightLayer and q.fc1.bits == 4 and q.fc1.per_channel
    assert not any(t.dim() > 1 for t in q.parameters())              # no float weight left
    after = measure(q, X1, mnist[1], latency=False)
    assert after.params == before.params and after.flops == before.flops
    assert before.accuracy - after.accuracy <= 0.01
    rows = {r["name"]: r for r in breakdown(q)}
    assert rows["fc1.codes"]["encoding"] == "dense/codebook"          # no Huffman without --huffman
    assert rows["fc1.codes"]["bits_per_element"] <= 4.001
    payload = sum(r["bytes"] for r in rows.values())
    assert payload <= 266_200 * 4 / 8 + 410 * 4 + 410 * 2 + 200     # codes + biases + fp16 scales
    assert before.packed_bytes / after.packed_bytes >= 7.5
    w = q.fc2.dequantized_weight()
    assert torch.equal(w, q.fc2.codes.float() * q.fc2.scale.float()[:, None])
    back, _ = roundtrip(q)
    assert torch.equal(outputs(back, test_batch), outputs(q, test_batch))


def test_uniform_asymmetric_per_tensor_and_huffman_flag(trained_lenet):
    q = quantize(trained_lenet, bits=3, symmetric=False)
    assert q.fc1.zero_point is not None and q.fc1.scale.numel() == 1
    assert q.fc1.codes.dtype == torch.uint8 and int(q.fc1.codes.max()) <= 7
    plain = packed(q)
    qh = quantize(trained_lenet, bits=3, symmetric=False, huffman=True)
    assert any("huffman" in r["encoding"] for r in breakdown(qh))
    assert packed(qh) < plain                                         # skewed codes: Huffman wins
    back, _ = roundtrip(qh)
    assert torch.equal(back.fc1.codes, qh.fc1.codes)


def test_uniform_on_conv_layers(digits_cnn):
    model, train, test = digits_cnn
    q = quantize(model, bits=8, mode="uniform", per_channel=True, layers="conv")
    assert isinstance(q.layer1.conv1, QuantizedWeightLayer) and isinstance(q.fc, nn.Linear)
    x = next(iter(test))[0]
    assert (outputs(q, x).argmax(1) == outputs(model, x).argmax(1)).float().mean() >= 0.97


# ------------------------------------------------------------------------------ clustering
def test_kmeans_linear_init_lloyd_fixed_point_and_zeros():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 50, generator=g)
    w[w.abs() < 0.7] = 0
    w[0, 0] = 9.0                                           # one outlier keeps its own centroid
    centroids, index = kmeans_cluster(w, 4)
    assert centroids.numel() == 16 and bool((centroids[1:] >= centroids[:-1]).all())
    assert torch.equal(index == -1, w == 0)
    assert float(centroids[-1]) == 9.0                      # linear init: the outlier is a cluster
    for j in range(16):                                     # Lloyd converged: centroid = mean
        members = w[index == j]
        if members.numel():
            assert abs(float(members.mean()) - float(centroids[j])) < 1e-5
    few = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.0])
    c, i = kmeans_cluster(few, 5)
    assert c.tolist() == [1.0, 2.0] and i.tolist() == [-1, 0, 0, 1, -1]


def test_cluster_keeps_pruned_zeros_and_storage_codebook(trained_lenet, test_batch):
    pruned = copy.deepcopy(trained_lenet)
    with torch.no_grad():
        for m in (pruned.fc1, pruned.fc2):
            m.weight[m.weight.abs() < m.weight.abs().quantile(0.9)] = 0
    q = quantize(pruned, mode="cluster", bits=5)
    for name in ("fc1", "fc2", "fc3"):
        w, w0 = getattr(q, name).weight, getattr(pruned, name).weight
        assert torch.equal(w == 0, w0 == 0)
        assert torch.unique(w[w != 0]).numel() <= 32
        assert getattr(q, name).nbc_bits == 5
    rows = {r["name"]: r for r in breakdown(q)}
    assert "huffman" not in rows["fc1.weight"]["encoding"]           # fixed-width without --huffman
    assert "codebook" in rows["fc1.weight"]["encoding"]
    qh = quantize(pruned, mode="cluster", bits=5, huffman=True)
    assert torch.equal(qh.fc1.weight, q.fc1.weight)
    rows_h = {r["name"]: r for r in breakdown(qh)}
    assert "huffman" in rows_h["fc1.weight"]["encoding"]
    assert packed(qh) < packed(q) < packed(pruned) / 3
    back, _ = roundtrip(qh)
    assert torch.equal(back.fc1.weight, qh.fc1.weight)
    assert torch.equal(outputs(back, test_batch), outputs(qh, test_batch))


def test_cluster_qat_fine_tunes_centroids(trained_lenet, mnist):
    train, test = mnist
    res = nbcompress.compress(trained_lenet, QuantizeConfig(mode="cluster", bits=2, qat=train,
                                                            epochs=1, lr=1e-3, progress=False))
    plain = quantize(trained_lenet, mode="cluster", bits=2)
    q = res.model
    assert not torch.equal(q.fc1.weight, plain.fc1.weight)           # centroids moved
    assert torch.unique(q.fc1.weight).numel() <= 4                   # still shared
    assert all(not hasattr(m, "parametrizations") for m in q.modules())
    assert q.fc1.weight.requires_grad
    assert len(res.extra["qat"]) == 1 and "loss" in res.extra["qat"][0]
    assert evaluate(q, test) >= evaluate(plain, test) - 0.005
    assert {"positions", "indices", "codebook"} <= set(res.tables["storage"])


# ------------------------------------------------------------------------------ binary + QAT
def test_binarize_scale_is_mean_abs_per_channel():
    w = torch.tensor([[0.5, -1.5, 0.0], [2.0, 2.0, -2.0]])
    codes, scale = binarize(w)
    assert codes.tolist() == [[1, -1, 1], [1, 1, -1]]
    assert torch.allclose(scale, torch.tensor([2.0 / 3, 2.0]), rtol=1e-3)


def test_binary_qat_trains_shadow_and_stores_1bit(trained_lenet, mnist, test_batch):
    train, test = mnist
    fp32 = measure(trained_lenet, X1, test, latency=False)
    plain = quantize(trained_lenet, mode="binary")
    res = nbcompress.compress(trained_lenet, QuantizeConfig(mode="binary", qat=train, epochs=1,
                                                            progress=False))
    q = res.model
    assert set(torch.unique(q.fc1.codes).tolist()) == {-1, 1}
    assert q.fc1.scale.numel() == 300 and q.fc1.scheme == "binary"
    assert set(q.state_dict()) == {f"fc{i}.{t}" for i in (1, 2, 3)
                                   for t in ("codes", "scale", "bias")}
    assert all(not hasattr(m, "parametrizations") for m in q.modules())   # shadow gone
    acc_plain, acc_qat = evaluate(plain, test), evaluate(q, test)
    assert acc_qat > acc_plain and acc_qat >= fp32.accuracy - 0.03
    m = measure(q, X1, test, latency=False)
    assert fp32.packed_bytes / m.packed_bytes >= 25
    assert breakdown(q)[1]["bits_per_element"] <= 1.001 or \
        {r["name"]: r for r in breakdown(q)}["fc1.codes"]["bits_per_element"] <= 1.001
    back, _ = roundtrip(q)
    assert torch.equal(outputs(back, test_batch), outputs(q, test_batch))


# ------------------------------------------------------------------------------ fp16 / bf16
def test_bf16_cast_on_cpu(trained_lenet, mnist, test_batch):
    q = quantize(trained_lenet, dtype="bf16", example_input=X1)
    assert isinstance(q, ReducedPrecision) and q.module.fc1.weight.dtype == torch.bfloat16
    out = outputs(q, test_batch)
    assert out.dtype == torch.float32
    assert (out.argmax(1) == outputs(trained_lenet, test_batch).argmax(1)).float().mean() >= 0.98
    back, _ = roundtrip(q)
    assert torch.equal(outputs(back, test_batch), out)


def test_fp16_on_cpu_is_honest(trained_lenet):
    res = nbcompress.compress(trained_lenet, QuantizeConfig(dtype="fp16"), example_input=X1,
                              device="cpu")
    assert res.model.module.fc1.weight.dtype == torch.float16
    assert any("fp16 on CPU" in n and "slower" in n for n in res.notes)


def test_int8_and_dtype_device_checks_without_cuda(trained_lenet):
    cpu, meta = torch.device("cpu"), torch.device("meta")   # meta: a device with no int8 kernels
    with pytest.raises(BadInput, match="run on CPU only and the model lives on meta"):
        QuantizeConfig(mode="dynamic")._choose(trained_lenet, meta)
    mode, notes = QuantizeConfig()._choose(trained_lenet, cpu, meta)   # model on an accelerator
    assert mode == "dtype:bf16" and "CPU-only" in notes[0]
    mode, notes = QuantizeConfig(bits=8)._choose(trained_lenet, meta, meta)
    assert mode == "uniform" and "8-bit uniform codes instead" in notes[0]
    mode, notes = QuantizeConfig(mode="static", calib=object())._choose(trained_lenet, meta, cpu)
    assert mode == "static" and "quantized there, not on meta" in notes[0]   # a CPU model: CPU


# ------------------------------------------------------------------------------ API + demo
def test_layers_regex_and_api_options(trained_lenet):
    q = quantize(trained_lenet, 4, layers=r"fc[12]")
    assert isinstance(q.fc1, QuantizedWeightLayer) and isinstance(q.fc3, nn.Linear)
    with pytest.raises(BadInput, match=r"quantize\(\) got an unknown option 'bitz'; did you "
                                        r"mean bits"):
        quantize(trained_lenet, bitz=4)
    q = quantize(trained_lenet, mode="Uniform", bits=4, dtype=None)   # choices: any case
    assert isinstance(q.fc1, QuantizedWeightLayer)


def test_demo_config_is_fast_int8(mnist):
    label, cfg = demo_config(*mnist)
    assert isinstance(cfg, QuantizeConfig) and "int8" in label and cfg.mode == "dynamic"


# ------------------------------------------------------------------------------ bad input
class OnlyActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(x))


@pytest.mark.parametrize("line,match", [
    ("model --bits 0", r"--bits must be a whole number in \[1, 8\], got 0"),
    ("model --bits 9", r"--bits must be a whole number in \[1, 8\], got 9"),
    ("model --bits four", r"--bits must be a whole number, got 'four'"),
    ("model --mode static", r"--mode static needs calibration data: add --calib LOADER"),
    ("model --mode foo", r"--mode must be one of dynamic, static, uniform, cluster, binary, got "
                         r"'foo'"),
    ("model --dtype int4", r"--dtype must be one of fp16, float16, half, bf16, bfloat16, got "
                           r"'int4'"),
    ("model --dtype fp16 --bits 4", r"^give --dtype or --bits, not both$"),
    ("model --dtype fp16 --asymmetric", r"^--asymmetric applies to --mode uniform"),
    ("model --mode dynamic --bits 4", r"runs int8 kernels"),
    ("model --mode binary --bits 2", r"stores 1 bit per weight"),
    ("model --qat train_loader --mode dynamic", r"--qat trains --mode uniform, cluster or binary"),
    ("model --epochs 2 --bits 4", r"^--epochs only applies with --qat: give --qat too"),
    ("model --bits 4 --qat train_loader --epochs 0", r"--epochs must be a whole number >= 1, "
                                                     r"got 0"),
    ("model --mode cluster --asymmetric", r"--asymmetric applies to --mode uniform"),
    ("model --mode cluster --per-channel", r"does not apply to --mode cluster"),
    ("model --mode uniform --calib train_loader", r"does not apply to --mode uniform"),
    ("model --calib nothere", r"--calib: no variable named 'nothere'"),
    ("model --calib model", r"--calib model is a LeNet300100, not a torch DataLoader"),
    ("model --layers zzz --bits 4", r"--layers 'zzz' matches none of the quantizable layers: fc1"),
    ("model --layers ( --bits 4", r"^--layers '\(' is not a valid regular expression"),
    ("acts --bits 4", r"no quantizable layer .* it has: OnlyActivations, BatchNorm1d, ReLU"),
    ("acts --mode dynamic", r"no quantizable layer for --mode dynamic \(Linear, LSTM, GRU\)"),
    ("missing", r"no variable named 'missing'"),
    ("model --mode static --calib digits", r"the model cannot run on a batch of --calib \(inputs "
                                           r"of shape \(8, 1, 8, 8\)\): RuntimeError"),
    ("model --bits 4 --qat digits", r"the model cannot run on a batch of --qat"),
    ("model --mode cluster --qat digits", r"the model cannot run on a batch of --qat"),
    ("model --mode static --calib empty", r"--calib yielded no batches"),
    ("model --bits 4 --qat badlabels", r"--qat has label 50, but the model scores 10 classes"),
])
def test_bad_input_one_line_model_unchanged(shell, trained_lenet, mnist, line, match):
    acts = OnlyActivations()
    digits = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))), batch_size=8)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.rand(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)))
    badlabels = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.rand(16, 1, 28, 28), torch.full((16,), 50)), batch_size=8)
    shell.user_ns.update(model=trained_lenet, train_loader=mnist[0], acts=acts, digits=digits,
                         empty=empty, badlabels=badlabels)
    snap, asnap = snapshot(trained_lenet), snapshot(acts)
    with pytest.raises(UsageError, match=match) as ei:
        shell.run_line_magic("quantize", line)
    assert type(ei.value) is UsageError and "\n" not in str(ei.value)
    assert shell.user_ns["model"] is trained_lenet and same_as_snapshot(trained_lenet, snap)
    assert shell.user_ns["acts"] is acts and same_as_snapshot(acts, asnap)


@pytest.mark.parametrize("options,match", [
    (dict(bits=4, layers=3), r"^layers must be a regular expression \(a string\), got 3$"),
    (dict(bits=4, per_channel="yes"), r"^per_channel must be True or False, got 'yes'$"),
    (dict(bits=4, huffman="no"), r"^huffman must be True or False, got 'no'$"),
    (dict(bits=4, symmetric=None), r"^symmetric must be True or False, got None$"),
    (dict(bits=4, seed="a"), r"^seed must be a whole number, got 'a'$"),
    (dict(bits=4, calib_batches=None), r"^calib_batches must be a whole number >= 1, got None$"),
    (dict(mode=["static"]), r"^mode must be one of dynamic, static, uniform, cluster, binary, "
                            r"got a list$"),
    (dict(bitz=4), r"^quantize\(\) got an unknown option 'bitz'; did you mean bits\?$"),
])
def test_api_bad_options_one_line_model_unchanged(trained_lenet, options, match):
    snap = snapshot(trained_lenet)
    with pytest.raises(BadInput, match=match) as ei:
        quantize(trained_lenet, **options)
    assert "\n" not in str(ei.value) and same_as_snapshot(trained_lenet, snap)


# the same mistake, said in the caller's language: fields from Python, flags on the magic line
@pytest.mark.parametrize("options,line,python,magic", [
    (dict(bits=4, epochs=2), "model --bits 4 --epochs 2",
     "epochs only applies with qat: give qat too (or leave out epochs)",
     "--epochs only applies with --qat: give --qat too (or leave out --epochs)"),
    (dict(mode="cluster", symmetric=False), "model --mode cluster --asymmetric",
     "symmetric=False applies to mode='uniform' (int8 kernels use symmetric weights, binary and "
     "cluster have no zero point)",
     "--asymmetric applies to --mode uniform (int8 kernels use symmetric weights, binary and "
     "cluster have no zero point)"),
    (dict(mode="static"), "model --mode static",
     "mode='static' needs calibration data: add calib=LOADER (a few batches of typical inputs "
     "set the activation ranges)",
     "--mode static needs calibration data: add --calib LOADER (a few batches of typical inputs "
     "set the activation ranges)"),
    (dict(dtype="bf16", bits=4), "model --dtype bf16 --bits 4",
     "give dtype or bits, not both", "give --dtype or --bits, not both"),
    (dict(bits=9), "model --bits 9",
     "bits must be a whole number in [1, 8], got 9",
     "--bits must be a whole number in [1, 8], got 9"),
    (dict(bits=4, layers="zzz"), "model --bits 4 --layers zzz",
     "layers 'zzz' matches none of the quantizable layers: fc1, fc2, fc3",
     "--layers 'zzz' matches none of the quantizable layers: fc1, fc2, fc3"),
    (dict(mode="dynamic", bits=4), "model --mode dynamic --bits 4",
     "mode='dynamic' runs int8 kernels (bits=8); for 4-bit weights use mode='uniform' or "
     "mode='cluster'",
     "--mode dynamic runs int8 kernels (--bits 8); for 4-bit weights use --mode uniform or "
     "--mode cluster"),
])
def test_errors_name_fields_in_python_and_flags_on_the_magic(shell, trained_lenet, options, line,
                                                             python, magic):
    snap = snapshot(trained_lenet)
    with pytest.raises(FieldError) as e:
        quantize(trained_lenet, **options)
    assert str(e.value) == python
    shell.user_ns["model"] = trained_lenet
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("quantize", line)
    assert str(e.value) == magic
    assert shell.user_ns["model"] is trained_lenet and same_as_snapshot(trained_lenet, snap)


def test_strict_mode_raises_plain_error(shell, trained_lenet, monkeypatch):
    monkeypatch.setenv("NBCOMPRESS_STRICT", "1")
    shell.user_ns["model"] = trained_lenet
    with pytest.raises(NBCompressError, match=r"in \[1, 8\], got 12"):
        shell.run_line_magic("quantize", "model --bits 12")


def test_interrupt_mid_qat_leaves_model_unchanged(shell, trained_lenet, mnist):
    class Boom(torch.utils.data.DataLoader):
        def __iter__(self):
            it = super().__iter__()
            yield next(it)
            raise KeyboardInterrupt

    shell.user_ns.update(model=trained_lenet, boom=Boom(mnist[0].dataset, batch_size=32))
    snap = snapshot(trained_lenet)
    with pytest.raises(KeyboardInterrupt):
        shell.run_line_magic("quantize", "model --mode binary --qat boom --no-progress")
    assert shell.user_ns["model"] is trained_lenet and same_as_snapshot(trained_lenet, snap)


@pytest.mark.parametrize("opts", [dict(mode="dynamic"), dict(bits=4, per_channel=True),
                                  dict(mode="cluster", bits=4, huffman=True)])
def test_truncated_or_corrupted_file_is_an_error_never_a_wrong_model(trained_lenet, opts,
                                                                     test_batch):
    q = quantize(trained_lenet, **opts)
    _, data = roundtrip(q)
    for cut in (10, len(data) // 2, len(data) - 1):
        with pytest.raises(BadInput, match="truncated"):
            load(io.BytesIO(data[:cut]))
    (hlen,) = struct.unpack("<I", data[4:8])
    rng = np.random.default_rng(0)
    ref = outputs(q, test_batch)
    for _ in range(20):
        b = bytearray(data)
        i = int(rng.integers(8 + hlen, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(BadInput, match="corrupt"):
            load(io.BytesIO(bytes(b)))
    # header bytes: an error, or (a flip in a name's letter case, say) a model that is still right
    for _ in range(20):
        b = bytearray(data)
        b[int(rng.integers(8, 8 + hlen))] ^= 1
        try:
            back = load(io.BytesIO(bytes(b)))
        except BadInput:
            continue
        try:
            same = torch.equal(outputs(back, test_batch), ref)
        except Exception:  # noqa: BLE001 - a model that cannot even run is not a wrong answer
            continue
        assert same


# ------------------------------------------------------- int8 codes block by block (issue 16)
def _absmax_codes_whole_tensor(w, bits, per_channel):
    """The symmetric, no-search maths of ``uniform_quantize`` as it was before it went block by
    block (whole-tensor temporaries): the reference the block path must match bit for bit."""
    from nbcompress.techniques.quantize.qmodules import round_scale

    rows = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
    qmax = 2 ** (bits - 1) - 1
    amax = rows.abs().amax(1)
    scale = round_scale(torch.where(amax > 0, amax * 1.0 / qmax, torch.ones_like(amax)))
    codes = (rows / scale[:, None]).round_().clamp_(-qmax, qmax).to(torch.int8)
    return codes.reshape(w.shape), scale


def _weights_for_codes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 53, generator=g) * torch.logspace(-3, 1, 37)[:, None]
    w[:, :7] = 0.0                          # pruned columns
    w[4] = 0.0                              # an all-zero row: scale 1
    w[5] = -0.0
    w[6, 3] = -w[6].abs().max() * 2         # the absmax on the negative side
    w[7] = 1e-9                             # a scale below fp16's normal range
    big = torch.randn(300, 400, generator=g)
    conv = torch.randn(8, 3, 5, 5, generator=g)
    return [w, big, conv, w.to(torch.bfloat16), big.half(), w.t()]


@pytest.mark.parametrize("block", [None, 64, 16, 1])
def test_int8_absmax_codes_bit_identical_to_whole_tensor_maths(monkeypatch, block):
    """The codes and scales of the block-by-block path (int8 dynamic / static / weight-only) are
    bit for bit those of the whole-tensor maths, whole rows per block or a row in pieces."""
    from nbcompress.techniques.quantize import lowbit
    from nbcompress.techniques.quantize.int8 import int8_weight

    if block is not None:
        monkeypatch.setattr(lowbit, "_BLOCK", block)
    for w in _weights_for_codes():
        if block == 1 and w.numel() > 5_000:   # (a block per element: the 300x400 weight alone
            continue                            # took 110 s; block 16 cuts its rows in pieces)
        for per_channel in (True, False):
            for bits in (8, 4, 2):
                codes, scale, zp = uniform_quantize(w, bits, per_channel=per_channel,
                                                    symmetric=True, search=False)
                ref_codes, ref_scale = _absmax_codes_whole_tensor(w, bits, per_channel)
                assert zp is None and codes.dtype == torch.int8 and codes.shape == w.shape
                assert torch.equal(codes, ref_codes), (tuple(w.shape), w.dtype, per_channel)
                assert scale.dtype == torch.float32
                assert torch.equal(scale.view(torch.int32), ref_scale.view(torch.int32))
            if w.dtype != torch.float32:
                continue
            qw = int8_weight(w, per_channel)
            ref_codes, ref_scale = _absmax_codes_whole_tensor(w, 8, per_channel)
            assert torch.equal(qw.int_repr(), ref_codes)
            if per_channel:
                assert torch.equal(qw.q_per_channel_scales(), ref_scale.double())
            else:
                assert qw.q_scale() == float(ref_scale[0])


def test_dynamic_int8_work_copy_shares_the_float_weights_never_the_result(monkeypatch):
    """Dynamic int8 reads the Linear weights of the model itself (no float copy made only to be
    dropped); the result holds none of them, the model is unchanged, a tied weight is copied,
    and a step failing halfway leaves the model as it was."""
    from nbcompress.core import StepContext, compress
    from nbcompress.techniques.quantize import int8 as int8_mod

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 32), nn.Linear(32, 4)).eval()
    m[4].weight = m[2].weight                # tied: left out of the sharing
    before = {k: v.clone() for k, v in m.state_dict().items()}
    versions = {k: p._version for k, p in m.named_parameters()}
    cfg = QuantizeConfig(progress=False)
    ctx = StepContext(device=torch.device("cpu"), origin_device=torch.device("cpu"),
                      progress=False)
    shared = cfg.shared_with_copy(m, ctx)
    assert [id(t) for t in shared] == [id(m[0].weight), id(m[5].weight)]
    seen = []
    real = int8_mod.DynamicInt8Linear.from_linear

    def spy(lin, qw):
        seen.append(lin.weight)
        return real(lin, qw)

    monkeypatch.setattr(int8_mod.DynamicInt8Linear, "from_linear", spy)
    q = compress(m, cfg).model
    assert seen[0] is m[0].weight and seen[-1] is m[5].weight       # read in place
    assert not any(s is m[2].weight for s in seen)                  # the tied one: a copy
    mine = {id(t) for t in list(m.parameters()) + list(m.buffers())}
    assert not any(id(t) in mine for t in list(q.parameters()) + list(q.buffers()))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert {k: p._version for k, p in m.named_parameters()} == versions
    x = torch.randn(3, 16)
    assert torch.allclose(q(x), m(x), atol=0.1)

    calls = {"n": 0}

    def failing(lin, qw):
        calls["n"] += 1
        if calls["n"] == 2:          # the first layer done, the second fails
            raise RuntimeError("boom")
        return real(lin, qw)

    monkeypatch.setattr(int8_mod.DynamicInt8Linear, "from_linear", failing)
    with pytest.raises(RuntimeError, match="boom"):
        compress(m, cfg)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert {k: p._version for k, p in m.named_parameters()} == versions
    assert m[4].weight is m[2].weight


def test_tensors_a_step_shares_with_its_copy_are_copied_when_left_in_the_result():
    """compress's safety net: a shared tensor the step left in its result is copied there (ties
    stay tied), so the result never shares a tensor with the caller's model."""
    from nbcompress.core import CompressionResult, StepConfig, compress

    class Halve(StepConfig):
        technique = "halve_test"

        def shared_with_copy(self, model, ctx):
            return [model[0].weight, model[1].weight]

        def run(self, model, ctx):
            model[0] = nn.Linear(4, 4)          # the first replaced; the second left as it is
            return CompressionResult(model)

    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    m[2].weight = m[1].weight
    r = compress(m, Halve(progress=False), device="cpu")
    assert r.model[1].weight is not m[1].weight and torch.equal(r.model[1].weight, m[1].weight)
    assert isinstance(r.model[1].weight, nn.Parameter)
    assert r.model[2].weight is r.model[1].weight
