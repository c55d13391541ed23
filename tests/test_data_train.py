"""nbcompress.data (embedded datasets, reference models) and nbcompress.train (fit / evaluate)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nbcompress import data, train
from nbcompress.core import BadInput
from conftest import Unlabelled

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------ helpers

def _small_mnist(n=512, batch_size=64, seed=0):
    x, y, xt, yt = data.mnist_arrays()
    g = torch.Generator().manual_seed(seed)
    tr = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size, shuffle=True, generator=g)
    te = DataLoader(TensorDataset(xt[:200], yt[:200]), batch_size=100)
    return tr, te


def _rows(x: torch.Tensor) -> set:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


# --------------------------------------------------------------------------------------- data

def test_mnist_split_sizes_stratified_and_normalised():
    x, y, xt, yt = data.mnist_arrays()
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and yt.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(yt, minlength=10).tolist() == [100] * 10
    # normalised with the MNIST mean/std: background is (0 - 0.1307) / 0.3081
    assert abs(x.min().item() - (-0.1307 / 0.3081)) < 1e-5
    assert abs(x.max().item() - ((1 - 0.1307) / 0.3081)) < 1e-5
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1.0) < 0.1
    # train and test are disjoint digits, and neither is sorted by class
    assert not (_rows(x) & _rows(xt))
    assert (y[:100] != y[0]).any() and (yt[:100] != yt[0]).any()


def test_mnist_split_is_deterministic_and_cache_is_protected():
    a = data.mnist_arrays()
    b = data.mnist_arrays()
    for s, t in zip(a, b):
        assert torch.equal(s, t)
    a[0].zero_()                                   # callers get copies
    assert not torch.equal(data.mnist_arrays()[0], a[0])
    other = data.mnist_arrays(seed=1)
    assert torch.bincount(other[3], minlength=10).tolist() == [100] * 10
    assert not torch.equal(other[1], b[1])         # another seed, another split


def test_mnist_loaders_order_and_exclusion():
    tr, te = data.mnist_loaders(batch_size=100, test_batch_size=250)
    assert len(tr.dataset) == 4000 and len(te.dataset) == 1000
    assert len(tr) == 40 and len(te) == 4
    first = [y for _, y in tr][:3]
    tr2, _ = data.mnist_loaders(batch_size=100)
    again = [y for _, y in tr2][:3]
    assert all(torch.equal(p, q) for p, q in zip(first, again))     # same seed, same order
    tr3, _ = data.mnist_loaders(batch_size=100, seed=1)
    assert not torch.equal(next(iter(tr3))[1], first[0])           # another seed, another order
    assert torch.equal(tr3.dataset.tensors[1].sort().values,        # ... but the same split
                       tr.dataset.tensors[1].sort().values)
    _, _, _, yt = data.mnist_arrays()
    assert torch.equal(torch.cat([y for _, y in te]), yt)          # test is not shuffled

    tr_ex, te_ex = data.mnist_loaders(exclude_classes=[3, 7])
    ytr = tr_ex.dataset.tensors[1]
    assert len(ytr) == 3200 and not torch.isin(ytr, torch.tensor([3, 7])).any()
    assert len(te_ex.dataset) == 1000                               # test set untouched
    assert len(data.mnist_loaders(exclude_classes=5)[0].dataset) == 3600
    with pytest.raises(BadInput, match="0..9"):
        data.mnist_loaders(exclude_classes=[10])
    with pytest.raises(BadInput, match="every digit"):
        data.mnist_loaders(exclude_classes=range(10))
    with pytest.raises(BadInput, match="batch_size"):
        data.mnist_loaders(batch_size=0)


def test_digits_split():
    x, y, xt, yt = data.digits_arrays()
    assert x.shape[1:] == (1, 8, 8) and xt.shape[1:] == (1, 8, 8)
    assert len(x) + len(xt) == 1797 and abs(len(xt) / 1797 - 0.2) < 0.01
    assert x.min().item() >= 0.0 and x.max().item() == 1.0
    counts, counts_t = torch.bincount(y, minlength=10), torch.bincount(yt, minlength=10)
    assert ((counts_t.float() / (counts + counts_t).float() - 0.2).abs() < 0.01).all()
    assert not (_rows(x) & _rows(xt))
    for s, t in zip(data.digits_arrays(), (x, y, xt, yt)):
        assert torch.equal(s, t)
    tr, te = data.digits_loaders(batch_size=32)
    xb, yb = next(iter(tr))
    assert xb.shape == (32, 1, 8, 8) and yb.dtype == torch.int64
    assert len(te.dataset) == len(xt)


# ------------------------------------------------------------------------------------- models

def _plain_dict(module: nn.Module) -> None:
    allowed = (int, float, bool, str, tuple, type(None))
    for m in module.modules():
        for k, v in vars(m).items():
            if k.startswith("_"):
                continue                  # nn.Module's own registries (_parameters, _modules, ...)
            assert isinstance(v, allowed), f"{type(m).__name__}.{k} is a {type(v).__name__}"


def test_lenet_300_100():
    m = data.lenet_300_100()
    assert isinstance(m, data.LeNet300100)
    assert sum(p.numel() for p in m.parameters()) == 266_610
    assert [n for n, _ in m.named_children()] == ["flatten", "fc1", "relu1", "fc2", "relu2", "fc3"]
    x = torch.randn(5, 1, 28, 28)
    out = m(x)
    assert out.shape == (5, 10)
    assert torch.allclose(m(x.reshape(5, 784)), out)
    _plain_dict(m)


def test_lenet5_and_small_resnet_shapes():
    m = data.lenet5()
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in m.parameters()) == 61_706
    r = data.reference_cnn()
    assert isinstance(r, data.SmallResNet) and isinstance(r.layer1, data.ResidualBlock)
    assert r(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert r(torch.randn(2, 1, 8, 8)).shape == (2, 10)               # the 8x8 digits fit too
    r4 = data.SmallResNet(width=8, num_classes=4, in_channels=3)
    assert r4(torch.randn(2, 3, 28, 28)).shape == (2, 4)
    assert r4.layer2.conv1.in_channels == 16 and (r4.width, r4.num_classes) == (8, 4)
    _plain_dict(m)
    _plain_dict(r)


def test_seeded_construction_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = data.lenet_300_100(seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = data.LeNet300100(seed=7)
    c = data.lenet_300_100(seed=8)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    torch.manual_seed(7)
    d = data.LeNet300100()                         # same as torch.manual_seed(7) semantics
    assert torch.equal(a.fc3.weight, d.fc3.weight)
    r1, r2 = data.reference_cnn(seed=1), data.SmallResNet(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(r1.parameters(), r2.parameters()))


def test_small_resnet_is_traceable_by_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    model = data.reference_cnn(seed=0).eval()
    example = torch.randn(1, 1, 28, 28)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = list(dg.get_all_groups())
    assert len(groups) >= 3
    # the residual stage: pruning layer1's input channels must also prune the stem conv
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 1, 2, 3])
    touched = {dep.target.module for dep, _idxs in group}
    assert model.layer1.conv2 in touched and model.down_conv in touched
    group.prune()
    assert model.conv1.out_channels == 28 and model.layer1.conv2.out_channels == 28
    assert model(example).shape == (1, 10)


# ---------------------------------------------------------------------------------- batches

def test_split_batch_and_to_device():
    x, y = torch.randn(4, 3), torch.arange(4)
    assert train.split_batch((x, y))[1] is y
    assert train.split_batch([x, y])[0] is x
    assert train.split_batch((x,)) == (x, None)
    assert train.split_batch(x) == (x, None)
    with pytest.raises(BadInput):
        train.split_batch(())
    with pytest.raises(BadInput, match="str"):
        train.split_batch("abc")
    moved = train.to_device({"a": [x, (y, 3)], "b": "s"}, "cpu")
    assert moved["a"][0] is x and moved["a"][1][1] == 3 and moved["b"] == "s"
    assert isinstance(moved["a"][1], tuple)


# ---------------------------------------------------------------------------------- evaluate

def test_evaluate_returns_fraction_and_restores_mode():
    tr, te = _small_mnist()
    m = data.lenet_300_100(seed=0)
    m.train()
    acc = train.evaluate(m, te)
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert m.training
    x = torch.cat([b[0] for b in te])
    y = torch.cat([b[1] for b in te])
    with torch.no_grad():
        expected = (m.eval()(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(expected)
    assert not m.training                          # evaluate restores eval mode too
    train.evaluate(m, te)
    assert not m.training
    # one-hot labels give the same accuracy
    oh = DataLoader(TensorDataset(x, nn.functional.one_hot(y, 10).float()), batch_size=64)
    assert train.evaluate(m, oh) == pytest.approx(expected)


def test_evaluate_bad_input():
    m = data.lenet_300_100()
    x = data.mnist_arrays()[2][:10]
    with pytest.raises(BadInput, match="no labels"):
        train.evaluate(m, DataLoader(Unlabelled(x), batch_size=5))
    with pytest.raises(BadInput, match="DataLoader, got list"):
        train.evaluate(m, [(x, torch.zeros(10, dtype=torch.long))])
    with pytest.raises(BadInput, match="no samples"):
        train.evaluate(m, DataLoader(TensorDataset(x[:0], torch.zeros(0, dtype=torch.long))))


# --------------------------------------------------------------------------------------- fit

def test_fit_lenet_reaches_90_percent_in_3_epochs():
    tr, te = data.mnist_loaders()
    m = data.lenet_300_100(seed=0)
    m.eval()
    hist = train.fit(m, tr, epochs=3, lr=1e-3, eval_loader=te, seed=0, progress=False)
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert set(hist[0]) >= {"epoch", "loss", "seconds", "accuracy"}
    assert hist[0]["loss"] > hist[1]["loss"] > hist[2]["loss"]
    assert hist[-1]["accuracy"] >= 0.90
    assert train.evaluate(m, te) == pytest.approx(hist[-1]["accuracy"])
    assert not m.training                          # mode restored after fit


def test_fit_is_deterministic_with_seed_and_leaves_global_rng():
    class Drop(nn.Module):                          # dropout: the run draws from torch's RNG
        def __init__(self):
            super().__init__()
            self.net = data.LeNet300100(seed=3)
            self.drop = nn.Dropout(0.3)

        def forward(self, x):
            return self.net.fc3(self.drop(self.net.relu2(self.net.fc2(
                self.net.relu1(self.net.fc1(self.net.flatten(x)))))))

    results = []
    torch.manual_seed(99)
    state = torch.get_rng_state()
    for _ in range(2):
        tr, _ = _small_mnist(n=256)
        m = Drop()
        train.fit(m, tr, epochs=2, seed=5, progress=False)
        results.append([p.detach().clone() for p in m.parameters()])
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(*results))


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_fit_trains_inside_no_grad_and_inference_mode(ctx):
    x, y = data.mnist_arrays()[0][:256], data.mnist_arrays()[1][:256]
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    model = data.lenet_300_100(seed=0)
    before = model.fc1.weight.detach().clone()
    with getattr(torch, ctx)():
        hist = train.fit(model, loader, epochs=2, progress=False, seed=0)
    assert not torch.equal(before, model.fc1.weight.detach())
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_evaluate_refuses_labels_the_model_cannot_score():
    x, y = data.mnist_arrays()[0][:64], data.mnist_arrays()[1][:64]
    model = data.lenet_300_100(seed=0)
    for bad, shown in ((y + 10, int((y + 10).max())), (y - 10, int((y - 10).min()))):
        loader = DataLoader(TensorDataset(x, bad), batch_size=32)
        with pytest.raises(BadInput, match=f"has label {shown}, but the model scores 10 classes"):
            train.evaluate(model, loader)
    assert 0 <= train.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=32)) <= 1


def test_fit_with_loss_fn_on_unlabelled_batches():
    # distillation-like: match a fixed teacher's logits on bare-tensor batches
    x = data.mnist_arrays()[0][:256]
    loader = DataLoader(Unlabelled(x), batch_size=64, shuffle=False)
    assert isinstance(next(iter(loader)), torch.Tensor)
    teacher = data.lenet_300_100(seed=1).eval()
    student = data.lenet_300_100(seed=2)
    seen = []

    def loss_fn(model, batch):
        seen.append(type(batch))
        with torch.no_grad():
            target = teacher(batch)
        return nn.functional.mse_loss(model(batch), target)

    hist = train.fit(student, loader, epochs=4, loss_fn=loss_fn, progress=False, seed=0)
    assert hist[-1]["loss"] < hist[0]["loss"] * 0.5
    assert seen and all(t is torch.Tensor for t in seen)
    # without a loss_fn, unlabelled data is a clear error
    with pytest.raises(BadInput, match="no labels"):
        train.fit(student, loader, progress=False)


def test_fit_after_step_keeps_a_mask():
    tr, _ = _small_mnist(n=256)
    m = data.lenet_300_100(seed=0)
    mask = (torch.rand(m.fc1.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    calls = []

    def after_step(model):
        assert not torch.is_grad_enabled()
        calls.append(1)
        model.fc1.weight.mul_(mask)

    train.fit(m, tr, epochs=2, after_step=after_step, progress=False)
    assert len(calls) == 2 * len(tr)
    assert torch.all(m.fc1.weight[mask == 0] == 0)
    assert torch.count_nonzero(m.fc1.weight[mask == 1]) > 0


@pytest.mark.parametrize("start_training", [False, True])
def test_keyboard_interrupt_propagates_and_restores_mode(start_training):
    tr, _ = _small_mnist(n=256)
    m = data.lenet_300_100(seed=0)
    m.train(start_training)
    steps = []

    def loss_fn(model, batch):
        assert model.training
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    with pytest.raises(KeyboardInterrupt):
        train.fit(m, tr, epochs=2, loss_fn=loss_fn, progress=True, desc="interrupt me")
    assert m.training == start_training
    assert len(steps) == 3


def test_fit_other_exceptions_propagate_unchanged():
    tr, _ = _small_mnist(n=128)
    m = data.lenet_300_100().eval()

    def boom(model, batch):
        raise RuntimeError("custom failure")

    with pytest.raises(RuntimeError, match="custom failure"):
        train.fit(m, tr, loss_fn=boom, progress=False)
    assert not m.training


def test_fit_bad_arguments():
    tr, _ = _small_mnist(n=128)
    m = data.lenet_300_100()
    cases = [
        (dict(epochs=0), "epochs must be a positive int"),
        (dict(epochs=1.5), "epochs must be a positive int"),
        (dict(epochs=True), "epochs must be a positive int"),
        (dict(lr=0), "lr must be a positive number"),
        (dict(lr=-1e-3), "lr must be a positive number"),
        (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
        (dict(optimizer=3), "optimizer must be"),
        (dict(scheduler="step"), "unknown scheduler"),
        (dict(grad_clip=0), "grad_clip"),
        (dict(weight_decay=-1), "weight_decay"),
        (dict(loss_fn="ce"), "loss_fn must be callable"),
        (dict(eval_loader=[1, 2]), "eval_loader must be a torch.utils.data.DataLoader, got list"),
        (dict(amp="yes"), "amp must be"),
        (dict(device="nonsense"), "unknown device"),
    ]
    before = [p.detach().clone() for p in m.parameters()]
    for kwargs, msg in cases:
        with pytest.raises(BadInput, match=msg):
            train.fit(m, tr, progress=False, **kwargs)
    with pytest.raises(BadInput, match="DataLoader, got list"):
        train.fit(m, [(torch.randn(2, 784), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(BadInput, match="DataLoader, got Tensor"):
        train.fit(m, torch.randn(4, 784))
    with pytest.raises(BadInput, match="Module"):
        train.fit("model", tr)
    frozen = data.lenet_300_100().requires_grad_(False)
    with pytest.raises(BadInput, match="no parameters"):
        train.fit(frozen, tr, progress=False)
    with pytest.raises(BadInput, match="scalar"):
        train.fit(m, tr, loss_fn=lambda model, b: model(b[0]), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))


def test_fit_optimizers_schedulers_params_and_early_stop():
    tr, _ = _small_mnist(n=256)
    for opt in ("sgd", "adamw", "ADAM"):
        h = train.fit(data.lenet_300_100(seed=0), tr, epochs=2, optimizer=opt, lr=1e-2
                      if opt == "sgd" else 1e-3, progress=False, seed=0)
        assert h[1]["loss"] < h[0]["loss"], opt
    m = data.lenet_300_100(seed=0)
    ready = torch.optim.SGD(m.parameters(), lr=0.05)
    train.fit(m, tr, optimizer=ready, progress=False)
    m = data.lenet_300_100(seed=0)
    made = []
    train.fit(m, tr, optimizer=lambda ps: made.append(1) or torch.optim.Adam(ps, lr=1e-3),
              progress=False)
    assert made == [1]

    # cosine: the lr ends at ~0 after all steps; a callable scheduler gets the step count
    m = data.lenet_300_100(seed=0)
    h = train.fit(m, tr, epochs=2, scheduler="cosine", progress=False)
    assert h[0]["lr"] > 1e-4 and h[1]["lr"] < 1e-8
    got = []

    def sched(opt, total):
        got.append(total)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    train.fit(m, tr, epochs=3, scheduler=sched, progress=False)
    assert got == [3 * len(tr)]

    # params: only the head trains; the rest is untouched and gets no grad left over
    m = data.lenet_300_100(seed=0)
    fc1 = m.fc1.weight.detach().clone()
    fc3 = m.fc3.weight.detach().clone()
    train.fit(m, tr, params=m.fc3.parameters(), grad_clip=1.0, progress=False)
    assert torch.equal(m.fc1.weight, fc1) and not torch.equal(m.fc3.weight, fc3)
    assert m.fc1.weight.grad is None

    # on_epoch_end sees each record; returning True stops
    seen = []
    h = train.fit(m, tr, epochs=5, progress=False,
                  on_epoch_end=lambda e, r: seen.append((e, r["epoch"])) or e == 2)
    assert seen == [(1, 1), (2, 2)] and len(h) == 2


def test_fit_amp_on_cpu_only_when_asked():
    tr, te = _small_mnist(n=256)
    m = data.lenet_300_100(seed=0)
    dtypes = []

    def loss_fn(model, batch):
        x, y = batch
        out = model(x)
        dtypes.append(out.dtype)
        return nn.functional.cross_entropy(out.float(), y)

    train.fit(m, tr, loss_fn=loss_fn, progress=False)            # default: no autocast on CPU
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    h = train.fit(m, tr, loss_fn=loss_fn, amp=True, epochs=2, progress=False)
    assert set(dtypes) == {torch.bfloat16}
    assert m.fc1.weight.dtype == torch.float32 and np.isfinite(h[-1]["loss"])


def test_train_reference_short():
    tr, te = _small_mnist(n=1024)
    m = data.train_reference(data.lenet_300_100(seed=0), tr, epochs=2)
    assert not m.training and train.evaluate(m, te) > 0.8
    with pytest.raises(BadInput):
        data.train_reference("not a model")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_and_evaluate_on_cuda():
    tr, te = data.mnist_loaders()
    m = data.lenet_300_100(seed=0).cuda()
    hist = train.fit(m, tr, epochs=3, eval_loader=te, seed=0, progress=False)   # amp by default
    assert hist[-1]["accuracy"] >= 0.88
    assert next(m.parameters()).device.type == "cuda"
    assert train.evaluate(m, te) == pytest.approx(hist[-1]["accuracy"])
    r = data.reference_cnn(seed=0).cuda()
    h = train.fit(r, tr, epochs=1, amp=False, grad_clip=1.0, seed=0, progress=False,
                  eval_loader=te)
    assert h[0]["accuracy"] > 0.5
