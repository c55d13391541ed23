"""%lowrank: exact full-rank factorisations of every layer form, rank choices (rank, ratio,
energy, a global parameter target), the per-layer report, fine-tuning, safe storage, the magic
through a real shell, and every bad input leaving the model untouched."""
from __future__ import annotations

import io
import math

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

from conftest import same_as_snapshot, snapshot, state_equal
from nbcompress import BadInput, History, NBCompressError, compress, measure
from nbcompress.data import reference_cnn
from nbcompress.techniques.lowrank import (LowRankConfig, demo_config, effective_weight, lowrank,
                                           recalibrate_batchnorm, relative_error,
                                           separable_factorize_conv, svd_factorize_conv,
                                           svd_factorize_linear, tucker_factorize_conv,
                                           tucker_ranks_limit)

LENET_PARAMS = 266_610


def _close(a, b, tol=2e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(a.abs().max()))


# --- the factorisers: exact at full rank, every conv setting kept ------------------------------
CONVS = [
    dict(in_channels=6, out_channels=10, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=8, out_channels=12, kernel_size=3, groups=4, padding=2, dilation=2,
         padding_mode="reflect"),
    dict(in_channels=6, out_channels=4, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2),
         groups=2, padding_mode="circular"),
    dict(in_channels=6, out_channels=10, kernel_size=3, padding="same", padding_mode="replicate"),
    dict(in_channels=6, out_channels=9, kernel_size=1, stride=2),
]


def _full_rank_seq(conv, method):
    o, ci, kh, kw = conv.weight.shape
    og = o // conv.groups
    if method == "svd":
        return svd_factorize_conv(conv, min(og, ci * kh * kw))
    if method == "tucker":
        return tucker_factorize_conv(conv, tucker_ranks_limit(conv))
    return separable_factorize_conv(conv, min(og, kh * kw))


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("method", ["svd", "tucker", "separable"])
def test_conv_at_full_rank_reproduces_outputs(spec, method):
    torch.manual_seed(0)
    conv = nn.Conv2d(**spec)
    if conv.bias is not None:
        nn.init.normal_(conv.bias)
    seq = _full_rank_seq(conv, method)
    x = torch.randn(2, spec["in_channels"], 11, 13)
    with torch.no_grad():
        assert _close(conv(x), seq(x))
    assert relative_error(conv, seq) < 1e-6
    s = seq[1] if method == "tucker" else seq[0]         # the conv that does the spatial work
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(s, attr) == getattr(conv, attr), attr
    for m in seq:
        if m is not s:
            assert m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
    assert all(m.bias is None for m in list(seq)[:-1])
    assert (seq[-1].bias is None) == (conv.bias is None)
    if method == "separable" and conv.kernel_size != (1, 1):
        assert seq[0].groups == conv.in_channels and seq[1].groups == conv.groups


@pytest.mark.parametrize("bias", [True, False])
def test_linear_at_full_rank_reproduces_outputs(bias):
    torch.manual_seed(1)
    lin = nn.Linear(20, 7, bias=bias)
    seq = svd_factorize_linear(lin, 7)
    x = torch.randn(3, 5, 20)                       # any leading dims
    with torch.no_grad():
        assert _close(lin(x), seq(x))
    assert [type(m) for m in seq] == [nn.Linear, nn.Linear]
    assert seq[0].bias is None and (seq[1].bias is not None) == bias
    assert seq[0].out_features == 7


def test_truncation_errors_are_the_discarded_energy():
    """Eckart-Young: the truncated SVD (and the per-channel SVD of the separable fit) leave exactly
    the discarded singular values; Tucker's ALS refinement does no worse than the plain HOSVD."""
    torch.manual_seed(2)
    lin = nn.Linear(30, 12)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    for r in (1, 4, 9):
        want = math.sqrt(float((s[r:] ** 2).sum() / (s ** 2).sum()))
        assert relative_error(lin, svd_factorize_linear(lin, r)) == pytest.approx(want, rel=1e-6)
    conv = nn.Conv2d(8, 12, 3, groups=2)
    w = conv.weight.detach().double()
    per_group = torch.linalg.svdvals(w.reshape(2, 6, -1))
    want = math.sqrt(float((per_group[:, 3:] ** 2).sum() / (w ** 2).sum()))
    assert relative_error(conv, svd_factorize_conv(conv, 3)) == pytest.approx(want, rel=1e-6)
    per_chan = torch.linalg.svdvals(w.reshape(2, 6, 4, 9).permute(0, 2, 1, 3))
    want = math.sqrt(float((per_chan[..., 2:] ** 2).sum() / (w ** 2).sum()))
    assert relative_error(conv, separable_factorize_conv(conv, 2)) == pytest.approx(want, rel=1e-6)
    hosvd = relative_error(conv, tucker_factorize_conv(conv, (3, 2), iters=0))
    als = relative_error(conv, tucker_factorize_conv(conv, (3, 2)))
    assert als <= hosvd + 1e-9
    # the reported error is measured on the layers built, not assumed
    seq = svd_factorize_conv(conv, 3)
    with torch.no_grad():
        seq[0].weight.mul_(2)
    assert relative_error(conv, seq) > want + 0.1
    assert effective_weight(seq).shape == (12, 8, 3, 3)


# --- rank choices ---------------------------------------------------------------------------
def _ranks(result):
    return {r["layer"]: r["rank"] for r in result.layers}


def test_rank_ratio_energy_on_lenet(trained_lenet):
    x = torch.randn(1, 1, 28, 28)
    res = compress(trained_lenet, LowRankConfig(rank=20), example_input=x)
    assert _ranks(res) == {"fc1": "20", "fc2": "20"}       # the classifier fc3 is kept whole
    assert any(n.startswith("kept the classifier fc3 whole") for n in res.notes)
    assert isinstance(res.model.fc3, nn.Linear)
    assert res.model.fc1[0].weight.shape == (20, 784) and res.model.fc1[1].weight.shape == (300, 20)
    # selected by --layers, fc3 (10x100) at its full rank 10 would not be smaller: kept
    res = compress(trained_lenet, LowRankConfig(rank=20, layers="fc"), example_input=x)
    assert _ranks(res) == {"fc1": "20", "fc2": "20"}
    assert any("fc3" in n and "would not save" in n for n in res.notes)

    res = compress(trained_lenet, LowRankConfig(ratio=0.5), example_input=x)
    assert _ranks(res) == {"fc1": "150", "fc2": "50"}
    res = compress(trained_lenet, LowRankConfig(ratio=0.5, layers="."), example_input=x)
    assert _ranks(res) == {"fc1": "150", "fc2": "50", "fc3": "5"}

    res = compress(trained_lenet, LowRankConfig(energy=0.8), example_input=x)
    for row in res.layers:
        w = getattr(trained_lenet, row["layer"]).weight.detach().double()
        s2 = torch.linalg.svdvals(w) ** 2
        cum = torch.cumsum(s2, 0) / s2.sum()
        r = int(row["rank"])
        assert cum[r - 1] >= 0.8 - 1e-9 and (r == 1 or cum[r - 2] < 0.8)
        assert row["energy_kept"] == pytest.approx(float(cum[r - 1]), abs=1e-6)
        assert row["rel_error"] == pytest.approx(math.sqrt(1 - float(cum[r - 1])), abs=1e-5)
        assert row["params_after"] == r * (w.shape[0] + w.shape[1]) + w.shape[0]
        assert row["flops_after"] == 2 * r * (w.shape[0] + w.shape[1])
        assert row["flops_before"] == 2 * w.numel()


def test_target_params_allocates_by_singular_values(trained_lenet):
    x = torch.randn(1, 1, 28, 28)
    res = compress(trained_lenet, LowRankConfig(target_params="3x"), example_input=x)
    params = measure(res.model, x).params
    assert params <= LENET_PARAMS / 3 and params > 0.95 * LENET_PARAMS / 3
    assert any("allocated across layers by singular values" in n for n in res.notes)
    t = res.extra["share_threshold"]
    shares, dims = {}, {}
    for name in ("fc1", "fc2", "fc3"):
        w = getattr(trained_lenet, name).weight.detach().double()
        s2 = torch.linalg.svdvals(w) ** 2
        shares[name], dims[name] = s2 / s2.sum(), w.shape

    def cost(thr):
        total = 0
        for name, sh in shares.items():
            r = max(1, int((sh >= thr).sum()))
            o, i = dims[name]
            total += min(o * i, r * (o + i)) + o
        return total

    # each layer keeps exactly its components above the one threshold: ranks differ by spectrum
    ranks = {r["layer"]: int(r["rank"]) for r in res.layers}
    for name, r in ranks.items():
        assert r == int((shares[name] >= t * (1 - 1e-9)).sum())
    assert "fc3" not in ranks          # the head's flat spectrum keeps it whole: no saving, kept
    assert ranks["fc2"] / 100 > ranks["fc1"] / 300
    # the budget is met, and the next lower threshold (one more component) would break it
    assert cost(t * (1 - 1e-9)) == params
    lower = max(float(v) for sh in shares.values() for v in sh if v < t * (1 - 1e-9))
    assert cost(lower) > LENET_PARAMS / 3
    # absolute counts and fractions mean the same budget
    same = compress(trained_lenet, LowRankConfig(target_params=LENET_PARAMS // 3), example_input=x)
    assert _ranks(same) == _ranks(res)
    same = compress(trained_lenet, LowRankConfig(target_params=1 / 3), example_input=x)
    assert _ranks(same) == _ranks(res)


def test_layers_regex_and_conv_none_and_skips():
    torch.manual_seed(0)
    cnn = reference_cnn(width=8, seed=0).eval()
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(BadInput, match="the only layer to factorise is the classifier fc"):
        compress(cnn, LowRankConfig(conv="none", energy=0.5), example_input=x)
    res = compress(cnn, LowRankConfig(conv="none", energy=0.5, layers="fc"), example_input=x)
    assert [r["layer"] for r in res.layers] == ["fc"]
    assert isinstance(res.model.layer1.conv1, nn.Conv2d)
    res = compress(cnn, LowRankConfig(layers=r"^layer2\.", rank=4), example_input=x)
    assert sorted(r["layer"] for r in res.layers) == ["layer2.conv1", "layer2.conv2"]
    assert isinstance(res.model.down_conv, nn.Conv2d) and isinstance(res.model.fc, nn.Linear)
    # energy 1 keeps every layer at full rank: nothing would be smaller, so nothing changes
    res = compress(cnn, LowRankConfig(energy=1.0), example_input=x)
    assert res.layers == [] and any("no layer was factorised" in n for n in res.notes)
    with torch.no_grad():
        assert torch.equal(res.model(x), cnn(x))


@pytest.mark.parametrize("mode,kind", [("svd", "conv-svd"), ("tucker", "conv-tucker"),
                                       ("separable", "conv-separable")])
def test_reference_cnn_each_conv_mode(mode, kind):
    cnn = reference_cnn(width=8, seed=0).eval()
    x = torch.randn(1, 1, 28, 28)
    before = measure(cnn, x, latency=False)
    res = compress(cnn, LowRankConfig(conv=mode, ratio=0.5, layers="layer|down"), example_input=x)
    after = measure(res.model, x, latency=False)
    assert after.params < before.params and after.flops < before.flops
    rows = {r["layer"]: r for r in res.layers}
    assert set(rows) == {"layer1.conv1", "layer1.conv2", "down_conv", "layer2.conv1", "layer2.conv2"}
    for name, row in rows.items():
        assert row["kind"] == kind
        assert set(row) >= {"layer", "kind", "shape", "rank", "params_before", "params_after",
                            "flops_before", "flops_after", "rel_error", "energy_kept"}
        new = res.model.get_submodule(name)
        assert isinstance(new, nn.Sequential)
        assert row["params_after"] == sum(p.numel() for p in new.parameters())
        assert row["flops_after"] < row["flops_before"]
        assert 0 < row["rel_error"] < 1
    assert rows["down_conv"]["shape"] == "16x8x3x3"
    spatial = [m for m in res.model.down_conv if m.kernel_size == (3, 3)][0]
    assert spatial.stride == (2, 2) and spatial.padding == (1, 1)
    out = res.model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)


def test_separable_default_multiplier_one_keeps_single_channel_stem():
    cnn = reference_cnn(width=8, seed=0).eval()
    res = compress(cnn, LowRankConfig(conv="separable", layers="conv"),
                   example_input=torch.randn(1, 1, 28, 28))
    assert "conv1" not in {r["layer"] for r in res.layers}
    assert any(n.startswith("kept conv1") for n in res.notes)
    assert {r["rank"] for r in res.layers} == {"1"}
    assert res.model.layer1.conv1[0].groups == 8 and res.model.layer1.conv1[0].out_channels == 8


def test_depthwise_and_tied_and_shared_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 16, 1)
            self.enc = nn.Linear(16, 16)
            self.dec = nn.Linear(16, 16, bias=False)
            self.dec.weight = self.enc.weight             # tied
            self.head = nn.Linear(16, 40)
            self.again = self.head                        # one module at two paths

        def forward(self, x):
            x = self.pw(self.dw(x)).mean((2, 3))
            return self.again(self.dec(self.enc(x))) + self.head(x[:, :16])

    torch.manual_seed(0)
    net = Net()
    res = compress(net, LowRankConfig(rank=2), example_input=torch.randn(1, 8, 6, 6))
    assert {r["layer"] for r in res.layers} == {"pw"}     # the output sums two heads: the last kept
    assert any(n.startswith("kept the classifier head whole") for n in res.notes)
    res = compress(net, LowRankConfig(rank=2, layers="."), example_input=torch.randn(1, 8, 6, 6))
    names = {r["layer"] for r in res.layers}
    assert names == {"pw", "head"}
    assert any("enc" in n and "shared" in n for n in res.notes)
    assert any("dw" in n and "would not save" in n for n in res.notes)
    assert res.model.head is res.model.again and isinstance(res.model.head, nn.Sequential)
    assert res.model.dec.weight is res.model.enc.weight


# --- BatchNorm re-estimation, fine-tuning, storage, API --------------------------------------
def test_recalibrate_batchnorm_is_the_average_over_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    xs = [torch.randn(8, 1, 6, 6) * (i + 1) for i in range(5)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs)), batch_size=8)
    net.train()
    net[1].momentum = 0.3
    assert recalibrate_batchnorm(net, loader, batches=3) == 3
    with torch.no_grad():
        means = [net[0](x).mean((0, 2, 3)) for x in xs[:3]]
    assert torch.allclose(net[1].running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert net[1].momentum == 0.3 and net.training and net[2].training     # modes put back
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 1, 6, 6)))
    assert recalibrate_batchnorm(net, empty) == 0
    assert all(torch.equal(v, before[k]) for k, v in net[1].state_dict().items())
    assert recalibrate_batchnorm(nn.Linear(2, 2), loader) == 0


@pytest.fixture(scope="module")
def digits_cnn():
    from nbcompress.data import digits_loaders, train_reference

    train, test = digits_loaders(seed=0)
    return train_reference(reference_cnn(width=8, seed=0), train, epochs=5, seed=0), train, test


def test_batchnorm_reestimation_recovers_accuracy(digits_cnn):
    cnn, train, test = digits_cnn
    cfg = dict(conv="svd", ratio=0.4, layers="layer|down")
    plain = compress(cnn, LowRankConfig(**cfg), evaluator=test)
    assert any("not re-estimated" in n for n in plain.notes)
    recal = compress(cnn, LowRankConfig(**cfg, data=train), evaluator=test)
    assert any("re-estimated BatchNorm statistics on 20 batches" in n for n in recal.notes)
    acc_plain = measure(plain.model, evaluator=test, latency=False).accuracy
    acc_recal = measure(recal.model, evaluator=test, latency=False).accuracy
    assert acc_recal > acc_plain + 0.1
    # only the statistics moved: the factorised weights are the same
    for (k, v), (k2, v2) in zip(plain.model.state_dict().items(), recal.model.state_dict().items()):
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, v2), k


def test_finetune_runs_the_shared_loop_and_keeps_accuracy(trained_lenet, mnist):
    train, test = mnist
    x = torch.randn(1, 1, 28, 28)
    plain = compress(trained_lenet, LowRankConfig(target_params="3x"), example_input=x)
    res = compress(trained_lenet, LowRankConfig(target_params="3x", finetune=train, epochs=1,
                                                progress=False),
                   evaluator=test, example_input=x)
    # the same factorisation, then trained: same shapes, other weights
    assert _ranks(res) == _ranks(plain)
    assert not torch.equal(res.model.fc1[0].weight, plain.model.fc1[0].weight)
    assert res.extra["accuracy_before_finetune"] == measure(plain.model, evaluator=test,
                                                            latency=False).accuracy
    base = measure(trained_lenet, evaluator=test, latency=False).accuracy
    acc = measure(res.model, evaluator=test, latency=False).accuracy
    assert acc >= base - 0.01
    assert res.extra["finetune_loss"] > 0 and any("fine-tuned 1 epoch" in n for n in res.notes)
    assert not res.model.training


def test_factorised_model_saves_and_loads_exactly():
    from nbcompress import load, save

    cnn = reference_cnn(width=8, seed=0).eval()
    for mode in ("tucker", "separable"):
        model = lowrank(cnn, conv=mode, ratio=0.5)
        buf = io.BytesIO()
        save(model, buf)
        buf.seek(0)
        back = load(buf)
        x = torch.randn(3, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(model.eval()(x), back.eval()(x))


def test_api_returns_new_model_and_leaves_input(trained_lenet):
    snap = snapshot(trained_lenet)
    out = lowrank(trained_lenet, energy=0.7)
    assert out is not trained_lenet and isinstance(out.fc1, nn.Sequential)
    assert same_as_snapshot(trained_lenet, snap) and isinstance(trained_lenet.fc1, nn.Linear)
    with pytest.raises(BadInput, match="unknown option 'enrgy'; did you mean energy"):
        lowrank(trained_lenet, enrgy=0.7)


def test_demo_config_three_times_smaller(trained_lenet, mnist):
    label, config = demo_config(*mnist)
    assert "%lowrank" in label and config.epochs == 1
    h = History(trained_lenet, evaluator=mnist[1], measure_latency=False)
    report = h.apply(config, progress=False)
    assert report.after.params <= LENET_PARAMS / 3
    assert report.after.accuracy >= report.before.accuracy - 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_and_returns_to_cpu(trained_lenet, mnist):
    res = compress(trained_lenet, LowRankConfig(target_params="3x", finetune=mnist[0], progress=False),
                   device="cuda", example_input=torch.randn(1, 1, 28, 28))
    assert next(res.model.parameters()).device.type == "cpu"
    assert res.layers and all(r["rel_error"] < 1 for r in res.layers)


# --- the magic ------------------------------------------------------------------------------
def test_magic_factorises_rebinds_and_undoes(shell, trained_lenet, mnist):
    ns = shell.user_ns
    ns.update(model=trained_lenet, train_loader=mnist[0], test_loader=mnist[1])
    snap = snapshot(trained_lenet)
    r = shell.run_line_magic("lowrank", "model --target-params 3x --finetune train_loader "
                                        "--epochs 1 --eval test_loader --no-progress")
    assert ns["model"] is not trained_lenet and isinstance(ns["model"].fc1, nn.Sequential)
    assert r.after.params <= LENET_PARAMS / 3 and r.before.params == LENET_PARAMS
    assert r.after.flops < r.before.flops / 2.5
    text = repr(r)
    assert "fc1" in text and "rel_error" in text and "linear-svd" in text
    assert "fine-tuned 1 epoch" in text
    assert same_as_snapshot(trained_lenet, snap)
    shell.run_line_magic("undo", "model")
    assert ns["model"] is not trained_lenet and state_equal(ns["model"], trained_lenet)
    shell.run_line_magic("redo", "model")
    df = shell.run_line_magic("compress_history", "model --no-plot")
    assert df.loc[1, "technique"] == "lowrank" and "target_params=3x" in df.loc[1, "args"]


def test_magic_conv_modes_and_quoted_regex(shell):
    cnn = reference_cnn(width=8, seed=0).eval()
    shell.user_ns["cnn"] = cnn
    shell.run_line_magic("nbcompress", "cnn --input-shape 1,1,28,28")
    r = shell.run_line_magic("lowrank", "cnn --conv tucker --ratio 0.5 --layers 'layer2|down'")
    assert {row["layer"] for row in r.result.layers} == {"down_conv", "layer2.conv1", "layer2.conv2"}
    assert all(row["kind"] == "conv-tucker" for row in r.result.layers)
    assert r.after.flops < r.before.flops
    shell.run_line_magic("undo", "cnn")
    r = shell.run_line_magic("lowrank", 'cnn --conv separable --layers "layer|down"')
    assert len(shell.user_ns["cnn"].layer1.conv1) == 2 and shell.user_ns["cnn"].layer1.conv1[0].groups == 8
    assert r.after.flops < r.before.flops / 3


def test_magic_help_lists_options(shell):
    doc = shell.find_line_magic("lowrank").__doc__
    for opt in ("--rank", "--ratio", "--energy", "--target-params", "--layers", "--conv",
                "--finetune", "--epochs", "--lr", "--data", "--eval", "--device"):
        assert opt in doc


@pytest.mark.parametrize("line,match", [
    ("model --rank 0", r"^--rank must be a whole number >= 1, got 0$"),
    ("model --rank -3", r"^--rank must be a whole number >= 1, got -3$"),
    ("model --rank 301", "--rank 301 is above the full rank of every selected layer .*300, fc1"),
    ("model --energy 0", r"^--energy must be a number in \(0, 1\], got 0\.0$"),
    ("model --energy 1.2", r"^--energy must be a number in \(0, 1\]"),
    ("model --ratio 1.5", r"^--ratio must be a number in \(0, 1\]"),
    ("model --ratio nan", r"^--ratio must be a number in \(0, 1\], got nan$"),
    ("model --rank 4 --energy 0.5", r"^give --rank or --energy, not both$"),
    ("model --ratio 0.5 --target-params 3x", r"^give --ratio or --target-params, not both$"),
    ("model --layers conv", "--layers 'conv' matches no Linear/Conv2d layer .*fc1, fc2, fc3"),
    ("model --layers fc[", "not a valid regular expression"),
    ("model --conv cp", r"^--conv must be one of svd, tucker, separable, none, got 'cp'$"),
    ("model --conv none --layers nothing", "matches no"),
    ("model --finetune missing", "no variable named 'missing'"),
    ("model --finetune notaloader", "--finetune notaloader is a int, not a torch DataLoader"),
    ("model --finetune train_loader --epochs 0", r"^--epochs must be a whole number >= 1, got 0$"),
    ("model --finetune train_loader --lr -1", r"^--lr must be a number > 0, got -1\.0$"),
    ("model --finetune train_loader --lr fast", r"^--lr must be a number, got 'fast'$"),
    ("model --data notaloader", "--data notaloader is a int, not a torch DataLoader"),
    ("model --target-params 100", "cannot be reached: rank 1 in every selected layer still leaves"),
    ("model --target-params 300000", "the model already has 266,610"),
    ("model --target-params 1x", "N times fewer"),
    ("model --target-params lots", "parameter count"),
    ('model --target-params "-3"', r"^--target-params must be positive, got '-3'$"),
    ("model --rank x", r"^--rank must be a whole number, got 'x'$"),
    ("nomodel --rank 2", "no variable named 'nomodel'"),
    ("notamodel --rank 2", "not a torch.nn.Module"),
    ("relus --rank 2", r"no nn.Linear or nn.Conv2d layer .*found: Flatten, ReLU x2"),
    ("convs --conv none", "--conv none leaves nothing to factorise"),
    ("lstm --rank 2", r"in this LSTM \(found: only the LSTM itself, no sub-modules\)"),
    ("model --rank 8 --finetune digits", r"the model cannot run on a batch of --finetune \(inputs "
                                         r"of shape \(8, 1, 8, 8\)\): RuntimeError"),
    ("model --rank 8 --data digits", "the model cannot run on a batch of --data"),
    ("model --rank 8 --epochs 3", r"^--epochs only applies with --finetune: give --finetune too "
                                   r"\(or leave out --epochs\)$"),
    ("model --rank 8 --lr 0.01", r"^--lr only applies with --finetune"),
    ("model --rank 8 --epochs 2 --lr 0.01", r"^--epochs and --lr only apply with --finetune"),
    ("model --rank 8 --finetune badlabels", "--finetune has label 50, but the model scores 10"),
])
def test_bad_input_is_one_line_and_model_unchanged(shell, trained_lenet, mnist, line, match):
    ns = shell.user_ns
    relus = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.ReLU())
    convs = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3))
    digits = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))), batch_size=8)
    ns.update(model=trained_lenet, train_loader=mnist[0], notaloader=3, notamodel=3,
              relus=relus, convs=convs, lstm=nn.LSTM(4, 4), digits=digits,
              badlabels=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
                  torch.rand(16, 1, 28, 28), torch.full((16,), 50)), batch_size=8))
    snaps = {k: snapshot(ns[k]) for k in ("model", "convs")}
    with pytest.raises(UsageError, match=match) as ei:
        shell.run_line_magic("lowrank", line)
    assert type(ei.value) is UsageError
    assert "\n" not in str(ei.value).strip()
    assert ns["model"] is trained_lenet and same_as_snapshot(trained_lenet, snaps["model"])
    assert ns["convs"] is convs and same_as_snapshot(convs, snaps["convs"])
    ws = shell._nbcompress_workspace
    for name in ("model", "convs", "relus"):
        h = ws.get(name)
        assert h is None or len(h) == 1


@pytest.mark.parametrize("options,match", [
    (dict(conv="cp"), r"^conv must be one of svd, tucker, separable, none, got 'cp'$"),
    (dict(rank=2.5), r"^rank must be a whole number >= 1, got 2\.5$"),
    (dict(rank=True), r"^rank must be a whole number >= 1, got True$"),
    (dict(energy="0.9"), r"^energy must be a number in \(0, 1\], got '0\.9'$"),
    (dict(layers=3), r"^layers must be a regular expression"),
    (dict(data=[1, 2]), r"^data must be a DataLoader, got a list$"),
    (dict(scheduler="step"), r"^scheduler must be one of cosine, got 'step'$"),
    (dict(calib_batches=0), r"^calib_batches must be a whole number >= 1, got 0$"),
    (dict(epochs=1.5), r"^epochs must be a whole number >= 1, got 1\.5$"),
    (dict(lr=float("nan")), r"^lr must be a number > 0, got nan$"),
    (dict(seed="a"), r"^seed must be a whole number, got 'a'$"),
    (dict(target_params=-5), r"^target_params must be positive, got -5$"),
    (dict(target_params=1234.5), r"^target_params as a count must be a whole number"),
    (dict(target_params=True), r"^target_params must be a parameter count \(80000\)"),
    (dict(rank=2, target_params="3x"), r"^give rank or target_params, not both$"),
    (dict(rank=4, epochs=2), r"^epochs only applies with finetune: give finetune too"),
])
def test_api_bad_options_leave_model_unchanged(trained_lenet, options, match):
    snap = snapshot(trained_lenet)
    with pytest.raises(BadInput, match=match):
        compress(trained_lenet, LowRankConfig(**options))
    assert same_as_snapshot(trained_lenet, snap) and isinstance(trained_lenet.fc1, nn.Linear)
    with pytest.raises(BadInput, match="expected a torch.nn.Module"):
        lowrank("not a model", rank=2)


def test_strict_mode_fails_the_cell(shell, trained_lenet, monkeypatch):
    shell.user_ns["model"] = trained_lenet
    monkeypatch.setenv("NBCOMPRESS_STRICT", "1")
    with pytest.raises(NBCompressError, match=r"^--energy must be a number in \(0, 1\]"):
        shell.run_line_magic("lowrank", "model --energy 2")
    res = shell.run_cell("%lowrank model --rank 0")
    assert not res.success and isinstance(res.error_in_exec, NBCompressError)
    assert shell.user_ns["model"] is trained_lenet


# --- one mistake, two spellings: fields from Python, flags on the magic line ----------------
def _lenet():
    from nbcompress.data import lenet_300_100

    torch.manual_seed(0)
    return lenet_300_100()


@pytest.mark.parametrize("model,options,line,python,magic", [
    ("lenet", dict(rank=301), "--rank 301",
     r"^rank=301 is above the full rank of every selected layer \(the largest is 300, fc1\)$",
     r"^--rank 301 is above the full rank of every selected layer \(the largest is 300, fc1\)$"),
    ("lenet", dict(rank=4, epochs=3), "--rank 4 --epochs 3",
     r"^epochs only applies with finetune: give finetune too \(or leave out epochs\)$",
     r"^--epochs only applies with --finetune: give --finetune too \(or leave out --epochs\)$"),
    ("lenet", dict(target_params="100"), "--target-params 100",
     r"^target_params='100' \(100\) cannot be reached: rank 1 in every selected layer still "
     r"leaves 2,894 parameters$",
     r"^--target-params 100 \(100\) cannot be reached: rank 1 in every selected layer still "
     r"leaves 2,894 parameters$"),
    ("lenet", dict(target_params="1x"), "--target-params '1x'",
     r"^target_params must be a parameter count \(80000\), a fraction of the current count "
     r"\(0\.33\) or N times fewer \(3x\); got '1x'$",
     r"^--target-params must be a parameter count \(80000\), a fraction of the current count "
     r"\(0\.33\) or N times fewer \(3x\); got '1x'$"),
    ("lenet", dict(energy=0.5, ratio=0.5), "--ratio 0.5 --energy 0.5",
     r"^give ratio or energy, not both$", r"^give --ratio or --energy, not both$"),
    ("lenet", dict(layers="conv"), '--layers "conv"',
     r"^layers 'conv' matches no Linear/Conv2d layer \(the layers are: fc1, fc2, fc3\)$",
     r"^--layers 'conv' matches no Linear/Conv2d layer \(the layers are: fc1, fc2, fc3\)$"),
    ("convs", dict(conv="none"), "--conv none",
     r"^conv='none' leaves nothing to factorise: the model's layers are all Conv2d \(0, 1\)$",
     r"^--conv none leaves nothing to factorise: the model's layers are all Conv2d \(0, 1\)$"),
    ("logreg", dict(rank=2), "--rank 2",
     r"^the only layer to factorise is the classifier 1 \(producing the model's output\), kept "
     r"whole by default: give layers to factorise it anyway \(layers='\.' selects every layer\)$",
     r"^the only layer to factorise is the classifier 1 \(producing the model's output\), kept "
     r"whole by default: give --layers to factorise it anyway \(--layers \. selects every "
     r"layer\)$"),
])
def test_same_mistake_names_fields_in_python_and_flags_in_the_magic(shell, model, options, line,
                                                                     python, magic):
    from nbcompress.core import FieldError

    net = {"lenet": _lenet, "convs": lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)),
           "logreg": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10))}[model]()
    snap = snapshot(net)
    with pytest.raises(FieldError, match=python):
        compress(net, LowRankConfig(**options))
    with pytest.raises(FieldError, match=python):
        lowrank(net, **options)
    shell.user_ns["net"] = net
    with pytest.raises(UsageError, match=magic):
        shell.run_line_magic("lowrank", f"net {line}")
    assert shell.user_ns["net"] is net and same_as_snapshot(net, snap)
    assert shell._nbcompress_workspace.get("net") is None


def test_quoted_target_params_and_layers_read_as_unquoted(shell):
    """The generic parser strips one pair of quotes from every option (options.unquote):
    ``--target-params "3x"`` is ``3x``, ``--layers 'fc[12]'`` is ``fc[12]``."""
    net = _lenet()
    x = torch.randn(1, 1, 28, 28)
    want = compress(net, LowRankConfig(target_params="3x", layers="fc[12]"), example_input=x)
    lines = ("--target-params \"3x\" --layers 'fc[12]'", "--target-params '3x' --layers \"fc[12]\"",
             "--target-params 3x --layers fc[12]")
    for i, line in enumerate(lines):
        name = f"net{i}"
        shell.user_ns[name] = net
        shell.run_line_magic("nbcompress", f"{name} --input-shape 1,1,28,28")
        r = shell.run_line_magic("lowrank", f"{name} {line} --no-progress")
        assert _ranks(r.result) == _ranks(want) and r.after.params == measure(want.model, x).params
        df = shell.run_line_magic("compress_history", f"{name} --no-plot")
        assert "target_params=3x" in df.loc[1, "args"] and "layers=fc[12]" in df.loc[1, "args"]


def test_declared_options_keep_the_old_magic_flags(shell):
    parser = shell.find_line_magic("lowrank").parser
    flags = set(parser._option_string_actions)
    assert {"--rank", "--ratio", "--energy", "--target-params", "--layers", "--conv", "--finetune",
            "--epochs", "--lr", "--data"} <= flags
    # Python-only, as before: the schedule, the BatchNorm batches, the seed
    assert not {"--scheduler", "--calib-batches", "--seed"} & flags
    doc = shell.find_line_magic("lowrank").__doc__
    assert "(default svd)" in doc and "%lowrank net --energy 0.8" in doc


def test_loader_that_does_not_fit_is_named_as_a_field_or_a_flag(shell):
    net = _lenet()
    digits = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))), batch_size=8)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 1, 28, 28)))
    with pytest.raises(BadInput, match=r"^the model cannot run on a batch of finetune \(inputs"):
        lowrank(net, rank=8, finetune=digits)
    with pytest.raises(BadInput, match=r"^data yielded no batches$"):
        lowrank(net, rank=8, data=empty)
    shell.user_ns.update(net=net, digits=digits, empty=empty)
    with pytest.raises(UsageError, match=r"^the model cannot run on a batch of --finetune \(inputs"):
        shell.run_line_magic("lowrank", "net --rank 8 --finetune digits")
    with pytest.raises(UsageError, match=r"^--data yielded no batches$"):
        shell.run_line_magic("lowrank", "net --rank 8 --data empty")
    assert shell.user_ns["net"] is net
