"""%prune: exact weight selection (global, per layer, the large-model path, ties), structured
pruning that keeps coupled layers consistent (residual adds, concatenation, flatten into Linear,
the classifier kept), every importance criterion checked against a hand computation, dry-run
counts against the pruned model, target FLOPs/params, iterative fine-tuning that keeps zeros,
lottery tickets with rewinding, sensitivity scans, the magic through a real shell, and every bad
input leaving the model untouched."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import same_as_snapshot, snapshot, state_equal
from nbcompress import BadInput, History, NBCompressError, compress, measure
from nbcompress.core import FieldError, StepContext
from nbcompress.data import lenet5, reference_cnn
from nbcompress.techniques.prune.importance import (ActivationImportance, BNScaleImportance,
                                                   HessianImportance, TaylorImportance,
                                                   get_importance)
from nbcompress.metrics import count_flops, count_params
from nbcompress.techniques.prune import (ChannelPruner, PruneConfig, prune, prune_weights_,
                                         sensitivity)
from nbcompress.train import check_loader_runs

P = importlib.import_module("nbcompress.techniques.prune")   # the package (nbcompress.prune: the verb)
W = importlib.import_module("nbcompress.techniques.prune.weights")
X28 = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _weights(model):
    return [m.weight for _, m in P.weight_targets(model)]


def _zeros(model):
    return sum(int((w == 0).sum()) for w in _weights(model))


def _n(model):
    return sum(w.numel() for w in _weights(model))


@pytest.fixture(scope="module")
def small_loader(mnist):
    """256 training digits: enough for importance statistics and a quick fine-tune."""
    x, y = next(iter(DataLoader(mnist[0].dataset, batch_size=256, shuffle=False)))
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)


@pytest.fixture(scope="module")
def mid_loader(mnist):
    """1,024 training digits, shuffled with a fixed generator: quick fine-tunes."""
    x, y = next(iter(DataLoader(mnist[0].dataset, batch_size=1024, shuffle=False)))
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


# --- weight pruning: exact selection ----------------------------------------------------------
def test_global_magnitude_removes_exactly_the_smallest(trained_lenet):
    snap = snapshot(trained_lenet)
    out = prune(trained_lenet, 0.8)
    assert same_as_snapshot(trained_lenet, snap) and out is not trained_lenet
    n = _n(out)
    assert _zeros(out) == round(0.8 * n)
    dropped = torch.cat([w0.flatten()[(w == 0).flatten()].abs()
                         for w, w0 in zip(_weights(out), _weights(trained_lenet))])
    kept = torch.cat([w.flatten()[w.flatten() != 0].abs() for w in _weights(out)])
    assert dropped.max() <= kept.min()
    # biases are not pruned, survivors are untouched, zeros are +0.0
    assert torch.equal(out.fc1.bias, trained_lenet.fc1.bias)
    w, w0 = out.fc1.weight, trained_lenet.fc1.weight
    assert torch.equal(w[w != 0], w0[w != 0])
    assert not torch.signbit(w[w == 0]).any()


def test_layer_scope_and_layers_regex(trained_lenet):
    out = prune(trained_lenet, 0.5, scope="layer")
    for w in _weights(out):
        assert int((w == 0).sum()) == round(0.5 * w.numel())
    only = prune(trained_lenet, 0.5, layers="fc[12]$", scope="layer")
    assert int((only.fc3.weight == 0).sum()) == 0
    assert int((only.fc2.weight == 0).sum()) == round(0.5 * only.fc2.weight.numel())


def test_large_model_selection_matches_exact_kthvalue(monkeypatch):
    """The sample-and-refine path (used above 2M weights) removes the very same weights as one
    exact kthvalue, ties included."""
    g = torch.Generator().manual_seed(1)
    lin = [nn.Linear(300, 200), nn.Linear(200, 100), nn.Linear(100, 10)]
    model = nn.Sequential(lin[0], nn.ReLU(), lin[1], nn.ReLU(), lin[2])
    with torch.no_grad():
        for m in lin:                                  # few distinct values: many ties
            m.weight.copy_(torch.randint(-40, 41, m.weight.shape, generator=g).float() / 40)
    exact = copy.deepcopy(model)
    prune_weights_(exact, 0.37)
    monkeypatch.setattr(W, "_EXACT_LIMIT", 1000)
    sampled = copy.deepcopy(model)
    prune_weights_(sampled, 0.37)
    n = _n(model)
    assert _zeros(sampled) == _zeros(exact) == round(0.37 * n)
    for a, b in zip(_weights(exact), _weights(sampled)):
        assert torch.equal(a, b)


def test_amount_is_the_sparsity_after_the_step(trained_lenet):
    once = prune(trained_lenet, 0.6)
    res = compress(once, PruneConfig(amount=0.6))
    assert _zeros(res.model) == _zeros(once)
    assert any("already" in n for n in res.notes)
    more = prune(once, 0.9)
    assert _zeros(more) == round(0.9 * _n(once))
    assert all(((w0 == 0) <= (w == 0)).all() for w0, w in zip(_weights(once), _weights(more)))


def test_random_importance_is_a_different_mask_of_the_same_size(trained_lenet):
    mag = prune(trained_lenet, 0.7)
    rnd = prune(trained_lenet, 0.7, importance="random", seed=3)
    assert _zeros(rnd) == _zeros(mag) == round(0.7 * _n(mag))
    assert not torch.equal(rnd.fc1.weight == 0, mag.fc1.weight == 0)


def test_taylor_and_hessian_weight_scores_match_hand_computation(small_loader):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    lin = model[1]
    xs, ys = [], []
    for x, y in small_loader:
        xs.append(x)
        ys.append(y)
    # taylor: mean over batches of |g * w|
    tay = TaylorImportance()
    tay.prepare(model, small_loader, device=torch.device("cpu"), batches=8)
    want = torch.zeros_like(lin.weight)
    for x, y in zip(xs, ys):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        want += (lin.weight.grad * lin.weight).abs()
    want /= len(xs)
    assert torch.allclose(tay.weight_scores("1", lin), want, rtol=1e-4, atol=1e-8)
    # hessian (OBD): 0.5 * mean per-sample g^2 * w^2, on the first 64 samples
    hes = HessianImportance(max_samples=64)
    hes.prepare(model, small_loader, device=torch.device("cpu"), batches=8)
    fisher = torch.zeros_like(lin.weight)
    for i in range(64):
        model.zero_grad()
        F.cross_entropy(model(xs[0][i:i + 1]), ys[0][i:i + 1]).backward()
        fisher += lin.weight.grad.pow(2)
    want = 0.5 * (fisher / 64) * lin.weight.detach().pow(2)
    assert torch.allclose(hes.weight_scores("1", lin), want, rtol=1e-3, atol=1e-12)


# --- structured pruning -----------------------------------------------------------------------
def test_structured_resnet_halves_channels_keeps_classifier_and_runs():
    model = reference_cnn(seed=0).eval()
    before = count_params(model)[0]
    out = prune(model, 0.5, structured=True, example_input=X28)
    assert out.conv1.out_channels == out.layer1.conv2.out_channels == 16      # residual partners
    assert out.down_conv.out_channels == out.layer2.conv2.out_channels == 32
    assert out.layer1.bn1.num_features == out.layer1.conv1.out_channels == 16
    assert out.fc.in_features == 32 and out.fc.out_features == 10            # classifier kept
    assert out(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert before / count_params(out)[0] >= 3.0
    assert model.conv1.out_channels == 32                                   # caller's untouched


def test_dry_run_counts_equal_the_pruned_model():
    model = reference_cnn(seed=1).eval()
    for scope in ("layer", "global"):
        work = copy.deepcopy(model)
        cp = ChannelPruner(work, X28, get_importance("l2"), scope=scope)
        plan = cp.plan(0.4)
        params, flops = cp.counts(plan)
        cp.apply(plan)
        assert params == count_params(work)[0]
        assert flops == count_flops(work, X28)[0]


def test_round_to_and_narrow_layers():
    model = lenet5(seed=0)
    out = prune(model, 0.5, structured=True, example_input=X28)
    assert out.conv1.out_channels == 3          # 6 channels: narrower than 2x8, rounds to 1
    assert out.conv2.out_channels == 8
    assert out.fc1.out_features == 64 and out.fc2.out_features == 40        # 60 -> 64, 42 -> 40
    assert out.fc1.in_features == 8 * 5 * 5                                 # flatten followed
    assert out.fc3.out_features == 10
    odd = prune(model, 0.5, structured=True, example_input=X28, round_to=1)
    assert odd.fc1.out_features == 60 and odd.fc2.out_features == 42


class CatNet(nn.Module):
    """Two branches concatenated, then a conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        x = torch.relu(self.c(x)).mean((2, 3))
        return self.head(x)


def test_structured_through_concatenation():
    model = CatNet().eval()
    out = prune(model, 0.5, structured=True, example_input=X28)
    assert out.a.out_channels == out.b.out_channels == 8
    assert out.bn.num_features == out.c.in_channels == 16
    assert out.c.out_channels == 16 and out.head.out_features == 10
    assert out(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "hessian", "activation", "bn",
                                        "random"])
def test_every_structured_criterion_prunes_a_consistent_model(importance, small_loader):
    model = reference_cnn(width=16, seed=0).eval()
    out = prune(model, 0.5, structured=True, importance=importance, data=small_loader,
                importance_batches=2)
    assert out.conv1.out_channels == 8 and out.down_conv.out_channels == 16
    x, y = next(iter(small_loader))
    assert out.eval()(x).shape == (64, 10)


def test_channel_scores_match_hand_computation(small_loader):
    """l1 per channel = mean over the coupled layers of each one's summed |w| for that channel;
    bn = |gamma|; activation = mean |input| of the consuming layer."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.1, 2.0)
    cp = ChannelPruner(model, X28, get_importance("l1"))
    g = next(gi for gi in cp.groups if gi.name == "0")
    got = cp.importance.channel_scores(g.group, cp.names)
    want = (model[0].weight.abs().sum((1, 2, 3)) + model[1].weight.abs()
            + model[3].weight.abs().sum((0, 2, 3))) / 3
    assert torch.allclose(got, want.detach(), rtol=1e-5)
    assert torch.allclose(BNScaleImportance().channel_scores(g.group, cp.names),
                          model[1].weight.detach().abs())
    act = ActivationImportance()
    act.prepare(model, small_loader, device=torch.device("cpu"), batches=1)
    x = next(iter(small_loader))[0]
    with torch.no_grad():
        a = model[2](model[1](model[0](x)))
    assert torch.allclose(act.channel_scores(g.group, cp.names), a.abs().mean((0, 2, 3)),
                          rtol=1e-4)


def test_recalibrate_bn_matches_batch_statistics(small_loader):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 1, 28, 28))
    model.eval()
    assert P.recalibrate_bn(model, small_loader, torch.device("cpu"), batches=2)
    bn = model[1]
    assert bn.momentum == 0.3 and not model.training
    means, vars_ = [], []
    with torch.no_grad():
        for i, (x, _) in enumerate(small_loader):
            if i == 2:
                break
            a = model[0](x)
            means.append(a.mean((0, 2, 3)))
            vars_.append(a.var((0, 2, 3), unbiased=True))
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack(vars_).mean(0), rtol=1e-4)
    assert not P.recalibrate_bn(nn.Linear(3, 2), small_loader, torch.device("cpu"))


def test_target_flops_and_params():
    model = reference_cnn(seed=0).eval()
    f0 = count_flops(model, X28)[0]
    p0 = count_params(model)[0]
    half = prune(model, structured=True, target_flops=0.5, example_input=X28, round_to=1)
    f = count_flops(half, X28)[0]
    assert 0.45 * f0 <= f <= 0.5 * f0
    third = prune(model, structured=True, target_params=0.3, example_input=X28, round_to=1)
    assert 0.27 * p0 <= count_params(third)[0] <= 0.3 * p0
    with pytest.raises(BadInput, match="cannot be reached"):
        prune(model, structured=True, target_flops=0.001, example_input=X28)


def test_weight_target_params_and_flops(trained_lenet):
    p0, nz0 = count_params(trained_lenet)
    out = prune(trained_lenet, target_params=0.1)
    assert abs(count_params(out)[1] - 0.1 * nz0) <= 1
    x = torch.randn(1, 1, 28, 28)
    s0 = count_flops(trained_lenet, x)[1]
    out = prune(trained_lenet, target_flops=0.2, example_input=x)
    s = count_flops(out, x)[1]
    assert 0.19 * s0 <= s <= 0.2 * s0


def test_sparsity_reg_shrinks_bn_scales(small_loader):
    model = reference_cnn(width=16, seed=0)
    res = compress(model, PruneConfig(amount=0.5, structured=True, importance="bn",
                                      sparsity_reg=1e-2, finetune=small_loader, epochs=1,
                                      progress=False), example_input=X28)
    assert any("L1" in n for n in res.notes)
    assert res.model.conv1.out_channels == 8
    assert "rounds" in res.tables and res.tables["rounds"]["stage"].iloc[0] == "sparsity-reg"


# --- iterative, fine-tuning -------------------------------------------------------------------
def test_iterative_finetune_keeps_zeros_and_reports_rounds(trained_lenet, mnist, mid_loader):
    train, test = mid_loader, mnist[1]
    res = compress(trained_lenet, PruneConfig(amount=0.9, steps=2, finetune=train, epochs=1,
                                              progress=False), evaluator=test)
    out = res.model
    assert _zeros(out) == round(0.9 * _n(out))
    # fine-tuning kept them +0.0 (a -0.0 is a distinct value to lossless storage)
    assert not any(torch.signbit(w[w == 0]).any() for w in _weights(out))
    df = res.tables["rounds"]
    assert list(df["round"]) == [1, 2]
    assert df["sparsity"].iloc[0] == pytest.approx(1 - 0.1 ** 0.5, abs=1e-4)
    assert df["sparsity"].iloc[1] == pytest.approx(0.9, abs=1e-5)
    # fine-tuning helped, and the accuracy reported is the model's
    assert df["accuracy"].iloc[-1] >= df["accuracy_pruned"].iloc[-1]
    assert df["accuracy"].iloc[-1] == pytest.approx(measure(out, evaluator=test).accuracy)


def test_structured_finetune_recovers(trained_lenet, mnist, mid_loader):
    test = mnist[1]
    res = compress(trained_lenet, PruneConfig(amount=0.8, structured=True, finetune=mid_loader,
                                              epochs=1, progress=False), evaluator=test)
    df = res.tables["rounds"]
    assert df["accuracy"].iloc[-1] > df["accuracy_pruned"].iloc[-1]
    assert res.model.fc1.out_features == 64 and res.model.fc2.out_features == 24  # 20 -> 24
    assert df["accuracy"].iloc[-1] == pytest.approx(measure(res.model, evaluator=test).accuracy)


# --- lottery ----------------------------------------------------------------------------------
def test_lottery_rewinds_survivors_to_init(trained_lenet, lenet_init, mnist, small_loader):
    train, test = small_loader, mnist[1]
    res = compress(trained_lenet, PruneConfig(amount=0.8, lottery=True, steps=1, finetune=train,
                                              epochs=1, lr=1e-12, scheduler=None, progress=False),
                   ctx=StepContext(device=torch.device("cpu"), origin_device=torch.device("cpu"),
                                   evaluator=test, init_state=lenet_init, progress=False))
    t = res.model
    # lr ~ 0: the ticket is the initial weights under the final mask
    for name in ("fc1", "fc2", "fc3"):
        w = getattr(t, name).weight
        w0 = lenet_init[f"{name}.weight"]
        assert torch.allclose(w[w != 0], w0[w != 0], atol=1e-6)
    left = res.extra["weights_left"]
    assert left == pytest.approx(0.2, abs=2e-3)
    assert not any(torch.signbit(w[w == 0]).any() for w in _weights(t))
    # the classifier is pruned at half the rate (Frankle & Carbin)
    s3 = float((t.fc3.weight == 0).float().mean())
    s1 = float((t.fc1.weight == 0).float().mean())
    assert s3 < s1
    # mask comes from the trained weights' magnitudes: the largest trained weights survive
    w = trained_lenet.fc1.weight.abs()
    assert w[t.fc1.weight != 0].min() >= w[t.fc1.weight == 0].max()
    tab = res.tables["ticket vs controls"]
    assert list(tab["model"]) == ["dense (trained)", "winning ticket (rewound to init)",
                                  "same mask, random re-init"]
    assert res.extra["dense_accuracy"] == pytest.approx(measure(trained_lenet,
                                                                evaluator=test).accuracy)
    assert "random re-init" in res.compare


def test_lottery_ticket_beats_random_reinit(trained_lenet, lenet_init, mnist):
    """A short real run from the trained LeNet: 2 rounds of 1 epoch to 90% sparsity."""
    train, test = mnist
    res = compress(trained_lenet, PruneConfig(amount=0.9, lottery=True, steps=2, finetune=train,
                                              epochs=1, progress=False),
                   ctx=StepContext(device=torch.device("cpu"), origin_device=torch.device("cpu"),
                                   evaluator=test, init_state=lenet_init, progress=False))
    e = res.extra
    assert e["ticket_accuracy"] > e["random_reinit_accuracy"]
    assert e["ticket_accuracy"] > 0.8
    assert list(res.tables["lottery rounds"]["weights_left"].round(2)) == [0.32, 0.1]


def test_lottery_trains_an_untrained_model_first(lenet_init, mnist, small_loader):
    from nbcompress.data import lenet_300_100

    model = lenet_300_100(seed=0)
    model.load_state_dict(lenet_init)
    res = compress(model, PruneConfig(amount=0.5, lottery=True, finetune=small_loader,
                                      progress=False),
                   ctx=StepContext(device=torch.device("cpu"), origin_device=torch.device("cpu"),
                                   evaluator=mnist[1], init_state=lenet_init, progress=False))
    assert any("trained dense" in n for n in res.notes)
    assert res.extra["dense_accuracy"] > 0.25     # it was trained (an untrained one is ~10%)


def test_lottery_needs_initial_weights(trained_lenet, mnist):
    with pytest.raises(BadInput, match="initial weights"):
        prune(trained_lenet, 0.5, lottery=True, finetune=mnist[0], evaluator=mnist[1])


# --- sensitivity ------------------------------------------------------------------------------
def test_sensitivity_table_figure_and_model_unchanged(trained_lenet, mnist):
    snap = snapshot(trained_lenet)
    df = sensitivity(trained_lenet, mnist[1], amounts=(0.5, 0.95))
    assert same_as_snapshot(trained_lenet, snap)
    assert len(df) == 6 and set(df["layer"]) == {"fc1", "fc2", "fc3"}
    assert df.attrs["figure"][:8] == b"\x89PNG\r\n\x1a\n"
    base = df.attrs["baseline_accuracy"]
    # pruning fc3 alone to 95% must hurt more than fc1 to 95% (fc3 is the classifier)
    at = df[df["amount"] == 0.95].set_index("layer")["accuracy"]
    assert at["fc3"] < at["fc1"] <= base + 0.01
    # every value is a real evaluation of that variant
    one = prune(trained_lenet, 0.95, layers="^fc3$")
    assert at["fc3"] == pytest.approx(measure(one, evaluator=mnist[1]).accuracy)


def test_structured_sensitivity():
    model = reference_cnn(width=16, seed=0).eval()
    xs = torch.randn(64, 1, 28, 28)
    ys = model(xs).argmax(1).detach()                       # the model is right on these
    loader = DataLoader(TensorDataset(xs, ys), batch_size=64)
    df = sensitivity(model, loader, structured=True, amounts=(0.5,))
    assert set(df["layer"]) == {"conv1", "layer1.conv1", "down_conv", "layer2.conv1"}
    assert (df["channels"] == 8).sum() == 2 and df["accuracy"].max() <= 1.0


# --- the magic --------------------------------------------------------------------------------
def test_magic_prune_undo_and_report(shell, trained_lenet, mnist):
    ns = shell.user_ns
    ns.update(model=trained_lenet, train=mnist[0], test=mnist[1])
    shell.run_line_magic("nbcompress", "model --eval test")
    r = shell.run_line_magic("prune", "model 90% --no-progress")
    new = ns["model"]
    assert new is not trained_lenet and _zeros(new) == round(0.9 * _n(new))
    assert r.after.packed_bytes * 3 < r.before.packed_bytes
    assert r.after.sparse_flops * 5 < r.before.sparse_flops
    text = repr(r)
    assert "prune model" in text and "fc1" in text
    shell.run_line_magic("undo", "model")
    undone = ns["model"]
    assert undone is not trained_lenet and state_equal(undone, trained_lenet)
    s = shell.run_line_magic("prune", "model --sensitivity --amounts 0.5 --no-progress")
    assert ns["model"] is undone and len(shell._nbcompress_workspace.get("model")) == 2
    assert "sensitivity" in s.result.tables and "sensitivity" in s.result.figures


def test_magic_structured_and_lottery_with_remember_init(shell, mnist, mid_loader):
    from nbcompress.data import lenet_300_100, train_reference

    ns = shell.user_ns
    net = lenet_300_100(seed=0)
    ns.update(net=net, train=mid_loader, test=mnist[1])
    shell.run_line_magic("nbcompress", "net --eval test --remember-init")
    init = {k: v.clone() for k, v in net.state_dict().items()}
    train_reference(net, mid_loader, epochs=2, seed=0)
    r = shell.run_line_magic("prune", "net 0.5 --lottery --finetune train --epochs 1 --no-progress")
    t = ns["net"]
    assert r.result.extra["weights_left"] == pytest.approx(0.5, abs=2e-3)
    assert "random re-init" in r.extra_models and "lottery ticket" in repr(r)
    # the ticket was rewound to the weights recorded by --remember-init, then trained one epoch:
    # its survivors are closer to those than to the trained dense weights
    # training in place after --remember-init is recorded as its own version, "edited"
    h = shell._nbcompress_workspace.get("net")
    assert [v.technique for v in h.versions] == ["baseline", "edited", "prune"]
    trained = h.versions[1].record
    keep = t.fc1.weight != 0
    d_init = (t.fc1.weight[keep] - init["fc1.weight"][keep]).abs().mean()
    d_dense = (t.fc1.weight[keep] - trained.fc1.weight[keep]).abs().mean()
    assert d_init < d_dense
    shell.run_line_magic("undo", "net")
    shell.run_line_magic("prune", "net 0.5 --structured --no-progress")
    assert ns["net"].fc1.out_features == 152 and ns["net"].fc2.out_features == 48
    assert ns["net"].fc3.out_features == 10


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(28, 16)
        self.rnn = nn.LSTM(16, 8, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h, _ = self.rnn(self.fc(x.view(x.shape[0], 28, 28)))
        return self.head(h[:, -1])


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.scale


class SharedFC(nn.Module):
    """One Linear called twice in forward (shared weights)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 784)
        self.out = nn.Linear(784, 10)

    def forward(self, x):
        return self.out(self.fc(self.fc(x.flatten(1))))


class Reshaped(nn.Module):
    """A Linear whose output is reshaped: the dependency graph cannot keep its channels."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 64)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        return self.out(self.fc(x.flatten(1)).view(-1, 4, 16).sum(1))


@pytest.mark.parametrize("line,match", [
    ("prune model 0", r"^AMOUNT must be a fraction in \(0, 1\)"),
    ("prune model 1", r"^AMOUNT must be a fraction in \(0, 1\)"),
    ("prune model 1.5", r"^AMOUNT must be a fraction in \(0, 1\)"),
    ("prune model -0.2", r"^AMOUNT must be a fraction in \(0, 1\)|arguments"),
    ("prune model lots", "must be a number"),
    ("prune model", "give AMOUNT"),
    ("prune model 0.5 --importance magic", "^--importance must be one of l1, l2, .*got 'magic'"),
    ("prune model 0.5 --structured --importance bn", "no BatchNorm"),
    ("prune model 0.5 --importance activation", "use it with --structured"),
    ("prune model 0.5 --importance taylor", "measures on data"),
    ("prune model 0.5 --lottery --finetune train", "initial weights"),
    ("prune model 0.5 --lottery", "give --finetune"),
    ("prune model 0.5 --finetune notaloader", "--finetune notaloader is a list"),
    ("prune model 0.5 --finetune nosuch", "no variable named 'nosuch'"),
    ("prune model 0.5 --data notaloader", "--data notaloader is a list"),
    ("prune model 0.5 --target-flops 0.5", "not both"),
    ("prune model --target-flops 1.5", r"^--target-flops must be a fraction in \(0, 1\)"),
    ("prune model --target-flops 0.5 --target-params 0.5", "not both"),
    ("prune model 0.5 --sensitivity", "leave out AMOUNT"),
    ("prune model 0.5 --layers ([", "not a valid regular expression"),
    ("prune model 0.5 --layers conv", "matches no Linear/Conv layer"),
    ("prune model 0.5 --steps 0", "whole number >= 1"),
    ("prune model 0.5 --round-to 0", "whole number >= 1"),
    ("prune model 0.5 --lottery --structured --finetune train", "does not combine"),
    ("prune model 0.5 --sparsity-reg 0.1", "--structured --importance bn"),
    ("prune lstm 0.5 --structured", "layer 'rnn' \\(LSTM\\)"),
    ("prune scaled 0.5 --structured", "no channels to prune: every Linear/Conv layer feeds"),
    ("prune grouped 0.5 --structured", "no channels to prune: every Linear/Conv layer feeds"),
    ("prune shared 0.5 --structured", "layer 'fc' \\(Linear\\): forward calls it 2 times"),
    ("prune reshaped 0.5 --structured", "--structured cannot handle layer 'fc' \\(Linear\\)"),
    ("prune model 0.5 --finetune digits", "cannot run on a batch of --finetune \\(inputs of "
                                          "shape \\(8, 1, 8, 8\\)\\): RuntimeError"),
    ("prune model 0.5 --structured --finetune digits", "cannot run on a batch of --finetune"),
    ("prune model 0.5 --importance taylor --data digits", "cannot run on a batch of --data"),
    ("prune model 0.5 --lottery --finetune digits --eval train", "batch of --finetune"),
    ("prune model 0.5 --finetune empty", "--finetune yielded no batches"),
    ("prune model 0.5 --finetune badlabels", "--finetune has label 50, but the model scores 10 "
                                             "classes \\(labels 0..9\\)"),
    ("prune model 0.5 --amounts 0.1,0.2", "^--amounts only applies with --sensitivity"),
    ("prune model 0.5 --epochs 3", "^--epochs only applies with --finetune"),
    ("prune model 0.5 --lr 0.1 --epochs 2", "^--epochs and --lr only apply with --finetune"),
])
def test_bad_input_is_one_line_and_model_unchanged(shell, trained_lenet, mnist, line, match):
    ns = shell.user_ns
    models = {"model": trained_lenet, "lstm": WithLSTM(), "scaled": Scaled(),
              "grouped": nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten()),
              "shared": SharedFC(), "reshaped": Reshaped()}
    digits = DataLoader(TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))),
                        batch_size=8)
    empty = DataLoader(TensorDataset(torch.rand(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)))
    badlabels = DataLoader(TensorDataset(torch.rand(16, 1, 28, 28), torch.full((16,), 50)),
                           batch_size=8)
    ns.update(models, train=mnist[0], notaloader=[1, 2, 3], digits=digits, empty=empty,
              badlabels=badlabels)
    name = line.split()[1]
    shell.run_line_magic("nbcompress", f"{name} --input-shape "
                         + ("1,4,8,8" if name == "grouped" else "1,1,28,28"))
    h = shell._nbcompress_workspace.get(name)
    if "initial weights" in match:
        h.init_state = None                   # as if nothing had been recorded
    snap = snapshot(models[name])
    magic, _, rest = line.partition(" ")
    with pytest.raises(UsageError, match=match) as ei:
        shell.run_line_magic(magic, rest + " --no-progress")
    assert type(ei.value) is UsageError and "\n" not in str(ei.value).strip()
    assert ns[name] is models[name] and same_as_snapshot(models[name], snap)
    assert len(h) == 1


def test_api_bad_input_is_one_line_and_model_unchanged(trained_lenet, small_loader):
    snap = snapshot(trained_lenet)
    digits = DataLoader(TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))),
                        batch_size=8)
    for call, match in [
        (lambda: prune(trained_lenet, 0.5, ammount=0.3), "unknown option 'ammount'; did you mean amounts"),
        (lambda: prune(trained_lenet, 0.5, structured=True, importance="bn"), "no BatchNorm layer"),
        (lambda: prune(trained_lenet, 0.5, finetune=small_loader.dataset), "^finetune must be a DataLoader"),
        (lambda: prune(trained_lenet, 0.5, finetune=digits), "cannot run on a batch of finetune "),
        (lambda: prune(trained_lenet, 0.5, epochs=3), "^epochs only applies with finetune"),
        (lambda: prune(SharedFC(), 0.5, structured=True, example_input=X28), "forward calls it 2"),
        (lambda: sensitivity(trained_lenet, small_loader, amounts=0.5), "amounts must be a list"),
        (lambda: sensitivity(trained_lenet, small_loader, bogus=1), "unknown option 'bogus'"),
    ]:
        with pytest.raises(BadInput, match=match) as ei:
            call()
        assert "\n" not in str(ei.value)
    assert same_as_snapshot(trained_lenet, snap)


@pytest.mark.parametrize("kwargs,line,python,magic", [
    (dict(amount=0.5, epochs=3), "model 0.5 --epochs 3",
     "epochs only applies with finetune: give finetune too (or leave out epochs)",
     "--epochs only applies with --finetune: give --finetune too (or leave out --epochs)"),
    (dict(amount=0.5, importance="bn"), "model 0.5 --importance bn",
     "importance='bn' ranks channels: use it with structured",
     "--importance bn ranks channels: use it with --structured"),
    (dict(amount=0.5, target_flops=0.5), "model 0.5 --target-flops 0.5",
     "give amount or target_flops, not both", "give AMOUNT or --target-flops, not both"),
    (dict(amount=0.5, sensitivity=True), "model 0.5 --sensitivity",
     "sensitivity scans its own amounts (amounts): leave out amount",
     "--sensitivity scans its own amounts (--amounts): leave out AMOUNT"),
    (dict(), "model", "give amount (the fraction to remove, e.g. 0.5), target_flops=F or "
     "target_params=P", "give AMOUNT (the fraction to remove, e.g. 0.5), --target-flops F or "
     "--target-params P"),
    (dict(amount=0.5, layers="conv"), "model 0.5 --layers conv",
     "layers 'conv' matches no Linear/Conv layer (layers: fc1, fc2, fc3)",
     "--layers 'conv' matches no Linear/Conv layer (layers: fc1, fc2, fc3)"),
    (dict(amount=0.5, lottery=True), "model 0.5 --lottery",
     "lottery retrains the ticket after every round: give finetune=LOADER (and epochs)",
     "--lottery retrains the ticket after every round: give --finetune LOADER (and --epochs)"),
    (dict(amount=0.5, steps=0), "model 0.5 --steps 0",
     "steps must be a whole number >= 1, got 0", "--steps must be a whole number >= 1, got 0"),
])
def test_the_same_mistake_in_both_spellings(shell, trained_lenet, kwargs, line, python, magic):
    """Python names the fields (``epochs``), the magic names its flags (``--epochs``)."""
    amount = kwargs.pop("amount", None)
    with pytest.raises(FieldError) as ei:
        prune(trained_lenet, amount, **kwargs)
    assert str(ei.value) == python
    shell.user_ns["model"] = trained_lenet
    with pytest.raises(UsageError) as ei:
        shell.run_line_magic("prune", line + " --no-progress")
    assert str(ei.value) == magic
    assert shell.user_ns["model"] is trained_lenet


def test_magic_layers_regex_in_quotes(shell, trained_lenet):
    """``--layers "fc[12]"``: the quotes are the shell's, not part of the regular expression."""
    shell.user_ns["model"] = trained_lenet
    shell.run_line_magic("prune", 'model 0.5 --layers "fc[12]" --scope layer --no-progress')
    out = shell.user_ns["model"]
    assert int((out.fc3.weight == 0).sum()) == 0
    for w in (out.fc1.weight, out.fc2.weight):
        assert int((w == 0).sum()) == round(0.5 * w.numel())
    shell.user_ns["other"] = trained_lenet
    shell.run_line_magic("prune", "other 50% --layers 'fc1' --no-progress")
    out = shell.user_ns["other"]
    assert int((out.fc1.weight == 0).sum()) == round(0.5 * out.fc1.weight.numel())
    assert int((out.fc2.weight == 0).sum()) == 0


def test_loader_check_leaves_the_shuffling_order_alone(trained_lenet, mid_loader):
    g = mid_loader.generator
    state = g.get_state()
    check_loader_runs(trained_lenet, mid_loader, "--finetune")
    assert torch.equal(g.get_state(), state)


def test_strict_mode_fails_the_cell(shell, trained_lenet, monkeypatch):
    shell.user_ns["model"] = trained_lenet
    monkeypatch.setenv("NBCOMPRESS_STRICT", "1")
    res = shell.run_cell("%prune model 2")
    assert not res.success and isinstance(res.error_in_exec, NBCompressError)


def test_help_lists_every_option(shell):
    doc = shell.find_line_magic("prune").__doc__
    for opt in ("--structured", "--importance", "--scope", "--layers", "--steps", "--finetune",
                "--epochs", "--lr", "--lottery", "--sensitivity", "--target-flops",
                "--target-params", "--round-to", "--sparsity-reg", "--eval", "--device"):
        assert opt in doc


def test_history_and_demo_config(trained_lenet, mnist, mid_loader):
    label, cfg = P.demo_config(mid_loader, mnist[1])
    h = History(trained_lenet, evaluator=mnist[1])
    cfg.progress = False
    rep = h.apply(cfg)
    assert "prune" in label and rep.after.sparsity == pytest.approx(0.9 * _n(trained_lenet)
                                                                    / count_params(
                                                                        trained_lenet)[0], abs=1e-4)
    assert rep.after.accuracy > rep.before.accuracy - 0.02
    h.undo()
    assert h.current is not trained_lenet and state_equal(h.current, trained_lenet)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths(trained_lenet, mnist, small_loader):
    out = prune(trained_lenet, 0.9, device="cuda", finetune=mnist[0], epochs=1)
    assert out.fc1.weight.device.type == "cpu" and _zeros(out) == round(0.9 * _n(out))
    cnn = reference_cnn(width=16, seed=0)
    out = prune(cnn, 0.5, structured=True, importance="taylor", data=small_loader, device="cuda")
    assert out.conv1.out_channels == 8 and out.conv1.weight.device.type == "cpu"


def test_output_layer_not_fooled_by_a_reused_tensor_id():
    """``head(dec(enc(x))) + x``: the sum is a new tensor, often at the address dec's freed output
    had; the classifier must still be head (the last layer), never dec."""
    from nbcompress.train import output_layers

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self.dec(self.enc(x))) + x

    m = Residual()
    for _ in range(20):
        assert output_layers(m, list(m.named_children()), torch.randn(2, 8)) == {"head"}
