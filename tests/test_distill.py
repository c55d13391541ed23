"""%distill and nbcompress.techniques.distill: the losses against hand computations, the step (teachers put
back as they were, cached == uncached, ensembles, feature hints, soft-only, bias adjustment,
pruned zeros kept), and the magic through a real IPython shell with every bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nbcompress import (BadInput, CompressionResult, History, NBCompressError, StepConfig, compress,
                        evaluate)
from nbcompress.errors import FieldError
from nbcompress.data import lenet5, mnist_arrays, reference_cnn
from nbcompress.metrics import packed_bytes
from nbcompress.techniques.distill import (DistillConfig, MLPStudent, choose_bias_raise,
                                          demo_config, distill, distillation_loss,
                                          looks_like_probs, mlp_student, soft_target_loss,
                                          soft_target_loss_from_probs)
from nbcompress.techniques.distill.probe import peek_batch
from conftest import Unlabelled, same_as_snapshot, snapshot

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------ helpers

def _loaders(n=1024, batch_size=64, seed=0, exclude=None):
    """A shuffled train loader over ``n`` MNIST digits (optionally without some classes) and a
    500-digit test loader."""
    x, y, xt, yt = mnist_arrays()
    x, y = x[:n], y[:n]
    if exclude is not None:
        keep = ~torch.isin(y, torch.tensor(exclude))
        x, y = x[keep], y[keep]
    g = torch.Generator().manual_seed(seed)
    tr = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)
    te = DataLoader(TensorDataset(xt[:500], yt[:500]), batch_size=250)
    return tr, te


class _Explodes(nn.Module):
    """Wraps a teacher; raises KeyboardInterrupt on its ``after``-th forward."""

    def __init__(self, inner, after):
        super().__init__()
        self.inner = inner
        self.after = after
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls >= self.after:
            raise KeyboardInterrupt
        return self.inner(x)


def _modes(model):
    return [m.training for m in model.modules()]


@pytest.fixture
def teacher(trained_lenet):
    return trained_lenet


@pytest.fixture(scope="module")
def small():
    return _loaders()


# --------------------------------------------------------------------------------- the losses

def test_soft_target_loss_is_T2_times_kl_and_its_gradient():
    torch.manual_seed(0)
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5)
    T = 3.0
    p, q = F.softmax(t / T, 1), F.softmax(s / T, 1)
    by_hand = T * T * (p * (p.log() - q.log())).sum(1).mean()
    loss = soft_target_loss(s, t, T)
    assert torch.allclose(loss, by_hand, atol=1e-6)
    loss.backward()
    # d/ds of T^2 KL(p || q) is T (q - p), averaged over the batch
    assert torch.allclose(s.grad, T * (q - p).detach() / s.shape[0], atol=1e-6)
    assert soft_target_loss(t, t, T).abs().item() < 1e-6
    assert torch.allclose(soft_target_loss_from_probs(s, p, T), loss, atol=1e-5)
    assert soft_target_loss(s, t, 1.0).item() != pytest.approx(loss.item())


def test_distillation_loss_blends_soft_and_hard_terms():
    torch.manual_seed(1)
    s = torch.randn(8, 10)
    t = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    T, a = 4.0, 0.7
    want = a * soft_target_loss(s, t, T) + (1 - a) * F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, T, a), want, atol=1e-6)
    assert torch.allclose(distillation_loss(s, t, y, T, 0.0), F.cross_entropy(s, y))
    assert torch.allclose(distillation_loss(s, t, None, T, 1.0), soft_target_loss(s, t, T))
    # probabilities are recognised (or declared) as such
    p = F.softmax(t / T, 1)
    assert looks_like_probs(p) and not looks_like_probs(t)
    assert torch.allclose(distillation_loss(s, p, y, T, a), want, atol=1e-5)
    assert torch.allclose(distillation_loss(s, p, y, T, a, teacher_is_probs=True), want, atol=1e-5)
    with pytest.raises(BadInput, match="targets"):
        distillation_loss(s, t, None, T, 0.5)
    with pytest.raises(BadInput, match="alpha"):
        distillation_loss(s, t, y, T, 1.5)
    with pytest.raises(BadInput, match="temperature"):
        soft_target_loss(s, t, 0)
    with pytest.raises(BadInput, match="shape"):
        soft_target_loss(s, t[:, :5], 2.0)


def test_choose_bias_raise_is_the_largest_allowed_and_ignores_the_class():
    torch.manual_seed(2)
    n, c = 600, 3
    refs = torch.randint(0, 10, (n,))
    logits = torch.randn(n, 10) + 3 * F.one_hot(refs, 10)
    logits[:, c] -= 2.0                      # class c is under-scored, as for an unseen class
    b, acc0, acc1, kept = choose_bias_raise(logits, refs, c, tolerance=0.005)
    assert kept == int((refs != c).sum())
    assert b > 0 and acc1 >= acc0 - 0.005 - 1e-9

    def acc(raise_):
        m = refs != c
        adj = logits[m].clone()
        adj[:, c] += raise_
        return (adj.argmax(1) == refs[m]).float().mean().item()

    assert acc(b) == pytest.approx(acc1)
    assert acc(b * 1.001 + 1e-3) < acc0 - 0.005            # any larger raise breaks the rule
    # examples of class c never influence the choice
    changed = logits.clone()
    changed[refs == c] = torch.randn(int((refs == c).sum()), 10) * 50
    assert choose_bias_raise(changed, refs, c, 0.005)[0] == b
    # a looser tolerance allows a larger raise
    assert choose_bias_raise(logits, refs, c, 0.02)[0] > b


def test_peek_batch_leaves_the_shuffling_order_alone():
    tr, _ = _loaders(n=256)
    tr2, _ = _loaders(n=256)
    peek_batch(tr)
    a = [y.tolist() for _, y in tr]
    b = [y.tolist() for _, y in tr2]
    assert a == b


# ------------------------------------------------------------------------------------ the step

def test_distill_trains_student_and_puts_teacher_back(teacher, small):
    tr, te = small
    student = mlp_student(seed=0)
    s_snap = snapshot(student)
    teacher.train()
    teacher.fc2.eval()                       # a mixed mode the step must give back exactly
    t_modes, t_snap = _modes(teacher), snapshot(teacher)
    out = distill(student, teacher, tr, epochs=3, lr=3e-3, progress=False)
    assert out is not student and same_as_snapshot(student, s_snap)
    assert same_as_snapshot(teacher, t_snap) and _modes(teacher) == t_modes
    assert not any(m._forward_hooks for m in teacher.modules())
    acc = evaluate(out, te)
    assert acc > 0.75, acc
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in student.parameters())


def test_student_learns_the_teachers_soft_outputs(teacher, small):
    """Distillation pulls the student's softened outputs towards the teacher's: the soft-target
    loss on held-out digits falls far below the untrained student's."""
    tr, te = small
    x = next(iter(te))[0]
    student = mlp_student(seed=0)
    with torch.no_grad():                    # training inside no_grad still trains
        t_out = teacher.eval()(x)
        before = soft_target_loss(student(x), t_out, 4.0).item()
        out = distill(student, teacher, tr, epochs=3, lr=3e-3, progress=False)
        after = soft_target_loss(out(x), t_out, 4.0).item()
        agree = (out(x).argmax(1) == t_out.argmax(1)).float().mean().item()
    assert after < 0.25 * before, (before, after)
    assert agree > 0.7


def test_cached_teacher_outputs_give_the_same_training(teacher):
    tr_a, te = _loaders(n=512)
    tr_b, _ = _loaders(n=512)
    r_a = compress(mlp_student(seed=0), DistillConfig(teachers=teacher, loader=tr_a, epochs=2,
                                                      progress=False))
    r_b = compress(mlp_student(seed=0), DistillConfig(teachers=teacher, loader=tr_b, epochs=2,
                                                      cache_teacher=False, progress=False))
    assert r_a.extra["teacher_cached"] and not r_b.extra["teacher_cached"]
    for p, q in zip(r_a.model.parameters(), r_b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    # a dataset that could augment is never cached automatically, and forcing it is refused
    x, y, _, _ = mnist_arrays()
    ds = torch.utils.data.Subset(TensorDataset(x[:256], y[:256]), range(256))
    sub = DataLoader(ds, batch_size=64)
    r = compress(mlp_student(seed=0), DistillConfig(teachers=teacher, loader=sub, epochs=1,
                                                    progress=False))
    assert not r.extra["teacher_cached"]
    with pytest.raises(BadInput, match="cannot cache"):
        compress(mlp_student(seed=0), DistillConfig(teachers=teacher, loader=sub, epochs=1,
                                                    cache_teacher=True, progress=False))


def test_soft_only_on_unlabelled_data(teacher, small):
    _, te = small
    x, _, _, _ = mnist_arrays()
    unl = DataLoader(Unlabelled(x[:1024]), batch_size=64, shuffle=True,
                     generator=torch.Generator().manual_seed(0))
    out = distill(mlp_student(seed=0), teacher, unl, epochs=3, lr=3e-3, soft_only=True,
                  progress=False)
    assert evaluate(out, te) > 0.7
    with pytest.raises(FieldError, match=r"^loader yields inputs only \(no labels\): use soft_only "):
        distill(mlp_student(seed=0), teacher, unl, epochs=1, progress=False)
    # a TensorDataset of inputs only is cached too, and trains the same way
    unl_t = DataLoader(TensorDataset(x[:256]), batch_size=64)
    r = compress(mlp_student(seed=0), DistillConfig(teachers=teacher, loader=unl_t, epochs=1,
                                                    soft_only=True, progress=False))
    assert r.extra["teacher_cached"] and r.extra["alpha"] == 1.0


def test_ensemble_averages_softened_probabilities(teacher, small):
    tr, te = small
    t2 = copy.deepcopy(teacher)
    with torch.no_grad():
        t2.fc3.weight.mul_(0.3)              # a different, softer teacher
    x = next(iter(tr))[0][:16]
    from nbcompress.techniques.distill.probe import teacher_signal

    T = 4.0
    want = (F.softmax(teacher(x) / T, 1) + F.softmax(t2(x) / T, 1)) / 2
    assert torch.allclose(teacher_signal([teacher, t2], x, T), want, atol=1e-6)
    snaps = [snapshot(teacher), snapshot(t2)]
    r = compress(mlp_student(seed=0), DistillConfig(teachers=[teacher, t2], loader=tr, epochs=3,
                                                    lr=3e-3, progress=False), evaluator=te)
    assert set(r.compare) == {"teacher 1", "teacher 2"}
    assert r.compare["teacher 1"] is teacher and r.compare["teacher 2"] is t2
    assert same_as_snapshot(teacher, snaps[0]) and same_as_snapshot(t2, snaps[1])
    assert evaluate(r.model, te) > 0.7
    assert "averaged" in r.notes[0]
    assert list(r.tables["per_class"].columns) == ["class", "n", "teachers (2, averaged)", "student"]
    assert r.tables["per_class"]["n"].sum() == 500 and r.tables["per_class"]["class"].tolist() == list(range(10))


def test_feature_hints_train_an_adapter_that_is_dropped(teacher, small):
    _, te = small
    student = mlp_student(seed=0)
    r = compress(student, DistillConfig(teachers=teacher, loader=_loaders()[0], epochs=3, lr=3e-3,
                                        features="fc2:fc2", feature_weight=0.1, progress=False))
    assert r.model.state_dict().keys() == student.state_dict().keys()
    assert r.layers[0]["kind"] == "feature hint" and r.layers[0]["adapter"] == "linear 16->100"
    assert r.layers[0]["adapter_params"] == 16 * 100 + 100
    assert r.extra["feature_mse_mean"] > 0 and not r.extra["teacher_cached"]
    assert not any(m._forward_hooks for m in teacher.modules())
    assert not any(m._forward_hooks for m in r.model.modules())
    plain = compress(student, DistillConfig(teachers=teacher, loader=_loaders()[0], epochs=3,
                                            lr=3e-3, progress=False)).model
    assert not torch.equal(plain.fc1.weight, r.model.fc1.weight)      # the hint did something
    assert evaluate(r.model, te) > 0.7


def test_feature_hints_between_conv_layers_of_different_sizes():
    x, y, _, _ = mnist_arrays()
    tr = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32)
    student, teacher = lenet5(seed=0), reference_cnn(width=8, seed=0)
    # conv2 of LeNet-5 gives (N, 16, 10, 10); layer1 of the CNN gives (N, 8, 14, 14)
    r = compress(student, DistillConfig(teachers=teacher, loader=tr, epochs=1,
                                        features=[("conv2", "layer1"), ("fc1", "layer2")],
                                        progress=False))
    assert [row["adapter"] for row in r.layers] == ["1x1 conv 16->8",
                                                    "linear (flattened) 120->784"]
    assert r.model.state_dict().keys() == student.state_dict().keys()


def test_bias_adjust_recovers_an_unseen_class(teacher):
    tr, te = _loaders(n=2000, exclude=[3])
    assert 3 not in torch.cat([y for _, y in tr]).tolist()
    r = compress(mlp_student(seed=0), DistillConfig(teachers=teacher, loader=tr, epochs=4, T=4.0,
                                                    lr=3e-3, soft_only=True, bias_adjust=3,
                                                    progress=False), evaluator=te)
    pc = r.tables["per_class"].set_index("class")
    cols = list(pc.columns)
    assert cols[:3] == ["n", "teacher", "student"] and cols[3].startswith("student (bias +")
    assert r.extra["bias_raise"] > 0
    assert r.extra["transfer_accuracy_other_classes_adjusted"] >= \
        r.extra["transfer_accuracy_other_classes"] - 0.005 - 1e-9
    assert pc.loc[3, cols[3]] > pc.loc[3, "student"]
    assert r.extra["class_accuracy_adjusted"] == pc.loc[3, cols[3]]
    assert any(row["kind"] == "bias adjust" and row["name"] == "fc3" for row in r.layers)
    # the returned model carries the raise: its accuracy is the adjusted column's
    n = pc["n"]
    assert evaluate(r.model, te) == pytest.approx(float((pc[cols[3]] * n).sum() / n.sum()))


def test_pruned_zeros_stay_zero(teacher, small):
    tr, _ = small
    student = mlp_student(seed=0)
    with torch.no_grad():
        w = student.fc1.weight
        w[w.abs() < w.abs().median()] = 0
    zeros = student.fc1.weight == 0
    out = distill(student, teacher, tr, epochs=1, progress=False)
    assert (out.fc1.weight[zeros] == 0).all()
    # +0.0, not -0.0 (which the lossless packing would have to store as a value of its own)
    assert not torch.signbit(out.fc1.weight[zeros]).any()
    assert packed_bytes(out) < 1.05 * packed_bytes(student)
    assert (out.fc1.weight[~zeros] != student.fc1.weight[~zeros]).any()
    loose = distill(student, teacher, tr, epochs=1, keep_sparsity=False, progress=False)
    assert (loose.fc1.weight[zeros] != 0).any()


class _HalfZero(StepConfig):
    """A tiny real compression step for the test: zero the smallest 99% of fc1's weights."""
    technique = "half_zero"

    def run(self, model, ctx):
        with torch.no_grad():
            w = model.fc1.weight
            w[w.abs() < w.abs().flatten().quantile(0.99)] = 0
        return CompressionResult(model)


def test_demo_step_wins_back_accuracy_from_version_0_keeping_zeros(teacher, small):
    tr, te = small
    h = History(teacher, evaluator=te, measure_latency=False)
    base = h.metrics_of(h.current_version).accuracy
    h.apply(_HalfZero(), progress=False)
    pruned = h.current
    zeros = pruned.fc1.weight == 0
    acc_pruned = evaluate(pruned, te)
    label, cfg = demo_config(tr, te)
    assert "version 0" in label and cfg.teacher_version == 0
    cfg.epochs = 1
    rep = h.apply(cfg, progress=False)
    out = h.current
    assert (out.fc1.weight[zeros] == 0).all()
    assert base > 0.85 and acc_pruned < base - 0.03      # the "pruning" hurt
    assert rep.after.accuracy > acc_pruned + 0.02, (acc_pruned, rep.after.accuracy)
    assert rep.args == "teacher=version 0 epochs=1 T=4 alpha=0.9 lr=0.0003"
    # without a History there are no versions to learn from
    with pytest.raises(BadInput, match="needs the step to run through a History"):
        compress(mlp_student(), DistillConfig(teacher_version=0, loader=tr, progress=False))


def test_interrupt_puts_teacher_back_and_leaves_student(teacher, small):
    tr, _ = small
    boom = _Explodes(teacher, after=5)
    boom.train()
    student = mlp_student(seed=0)
    s_snap, t_snap = snapshot(student), snapshot(teacher)
    with pytest.raises(KeyboardInterrupt):
        distill(student, boom, tr, epochs=2, cache_teacher=False, features="fc2:inner.fc2",
                progress=False)
    assert same_as_snapshot(student, s_snap) and same_as_snapshot(teacher, t_snap)
    assert boom.training and all(m.training for m in boom.modules())
    assert not any(m._forward_hooks for m in boom.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher_on_cpu_work_on_cuda(teacher, small):
    tr, te = small
    student = mlp_student(seed=0)
    out = distill(student, teacher, tr, epochs=1, device="cuda", progress=False)
    assert next(out.parameters()).device.type == "cpu"
    assert next(teacher.parameters()).device.type == "cpu"


def test_distill_api_bad_options(teacher, small):
    tr, _ = small
    with pytest.raises(BadInput, match="unknown option 'temprature'.*did you mean"):
        distill(mlp_student(), teacher, tr, temprature=2)
    with pytest.raises(FieldError, match=r"^teachers is needed: the teacher model\(s\)"):
        distill(mlp_student(), [], tr)
    with pytest.raises(BadInput, match="DataLoader"):
        distill(mlp_student(), teacher, [1, 2, 3])
    with pytest.raises(BadInput, match="soft_only must be True or False, got 'no'"):
        distill(mlp_student(), teacher, tr, soft_only="no")
    with pytest.raises(BadInput, match="no trainable"):
        frozen = mlp_student()
        for p in frozen.parameters():
            p.requires_grad_(False)
        distill(frozen, teacher, tr)


def test_describe_and_demo_config_shape(teacher, small):
    tr, _ = small
    cfg = DistillConfig(teachers=[teacher, teacher], loader=tr, T=2.0, soft_only=True,
                        features="fc2:fc2", bias_adjust=3)
    assert cfg.describe() == ("teachers=2 epochs=5 T=2 alpha=1 soft_only features=fc2:fc2 "
                              "bias_adjust=3")
    assert DistillConfig(teachers=teacher, loader=tr).describe() == \
        "teacher=LeNet300100 epochs=5 T=4 alpha=0.9"
    assert isinstance(MLPStudent(), nn.Module) and sum(
        p.numel() for p in mlp_student().parameters()) == 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10


# ------------------------------------------------------------------------- the magic, in a shell

@pytest.fixture
def ns(shell, teacher, small):
    tr, te = small
    shell.user_ns.update(student=mlp_student(seed=0), big=teacher, big2=copy.deepcopy(teacher),
                         train_loader=tr, test_loader=te, notamodel=3,
                         five=nn.Sequential(nn.Flatten(), nn.Linear(784, 5)),
                         unlabelled=DataLoader(Unlabelled(mnist_arrays()[0][:256]), batch_size=64),
                         badlabels=DataLoader(TensorDataset(torch.rand(16, 1, 28, 28),
                                                            torch.full((16,), 50)), batch_size=8))
    return shell.user_ns


def test_magic_step_rebinds_shows_teacher_and_undoes(shell, ns):
    original = ns["student"]
    snap = snapshot(original)
    r = shell.run_line_magic("distill", "student --teacher big --data train_loader --epochs 3 "
                                        "--lr 3e-3 -T 3 --alpha 0.8 --eval test_loader --no-progress")
    assert ns["student"] is not original and same_as_snapshot(original, snap)
    assert r.technique == "distill" and r.args == "teacher=LeNet300100 epochs=3 T=3 alpha=0.8 lr=0.003"
    assert r.after.accuracy > 0.7 > r.before.accuracy
    assert set(r.extra_models) == {"teacher"}
    assert r.extra_models["teacher"].params == 266_610 and r.extra_models["teacher"].accuracy > 0.85
    text = repr(r)
    assert "teacher" in text and "per_class" in text
    shell.run_line_magic("undo", "student")
    assert ns["student"] is not original and same_as_snapshot(ns["student"], snap)
    hist = shell.run_line_magic("compress_history", "student --no-plot")
    assert hist.loc[1, "technique"] == "distill"


def test_magic_ensemble_and_soft_only(shell, ns):
    r = shell.run_line_magic("distill", "student --teacher big,big2 --data unlabelled --soft-only "
                                        "--epochs 1 --no-progress")
    assert set(r.extra_models) == {"teacher 1", "teacher 2"}
    assert "teachers=2" in r.args and "soft_only" in r.args


def test_magic_teacher_from_a_history_version(shell, ns):
    shell.run_line_magic("nbcompress", "big --eval test_loader")
    r = shell.run_line_magic("distill", "student --teacher big@0 --data train_loader --epochs 1 "
                                        "--no-progress")
    assert r.technique == "distill" and r.extra_models["teacher"].params == 266_610
    for line, match in [("student --teacher big@3 --data train_loader", "big has versions 0..0"),
                        ("student --teacher big2@0 --data train_loader", "big2 has no history"),
                        ("student --teacher big@x --data train_loader", "NAME@K")]:
        with pytest.raises(UsageError, match=match):
            shell.run_line_magic("distill", line)


def test_magic_help(shell):
    doc = shell.find_line_magic("distill").__doc__
    for opt in ("--teacher", "--data", "--epochs", "-T", "--alpha", "--soft-only", "--features",
                "--bias-adjust", "--eval", "--device"):
        assert opt in doc


@pytest.mark.parametrize("line,match", [
    ("student --teacher nosuch --data train_loader", "--teacher: no variable named 'nosuch'"),
    ("student --teacher big --data nosuch", "--data: no variable named 'nosuch'"),
    ("nosuch --teacher big --data train_loader", "no variable named 'nosuch'"),
    ("student --data train_loader", r"^--teacher is needed: the teacher model\(s\) by name"),
    ("student --teacher big", r"^--data is needed: the transfer data"),
    ("student --teacher notamodel --data train_loader", "--teacher notamodel is a int"),
    ("student --teacher big --data big", "--data big is a LeNet300100, not a torch DataLoader"),
    ("student --teacher five --data train_loader",
     r"the teacher's output has shape \(N, 5\) but the student's has \(N, 10\)"),
    ("student --teacher big,five --data train_loader", r"teacher 2's output has shape \(N, 5\)"),
    ("student --teacher big --data train_loader -T 0", r"^-T must be a number > 0, got 0\.0$"),
    ("student --teacher big --data train_loader -T -2", r"^-T must be a number > 0, got -2\.0$"),
    ("student --teacher big --data train_loader --alpha 1.5", r"^--alpha must be a number in \[0, 1\]"),
    ("student --teacher big --data train_loader --alpha -0.1", r"^--alpha must be a number in \[0, 1\]"),
    ("student --teacher big --data train_loader --features fc2:fc22",
     "the teacher has no layer named 'fc22'; did you mean fc2"),
    ("student --teacher big --data train_loader --features fcc2:fc2",
     "the student has no layer named 'fcc2'; did you mean fc2"),
    ("student --teacher big --data train_loader --features fc2", "STUDENT_LAYER:TEACHER_LAYER"),
    ("student --teacher big --data unlabelled", "no labels.*--soft-only"),
    ("student --teacher big --data train_loader --soft-only --alpha 0.5", "contradicts"),
    ("student --teacher big --data train_loader --bias-adjust 10", "scores 10 classes"),
    ("student --teacher big --data train_loader --epochs 0", "^--epochs must be a whole number >= 1"),
    ("student --teacher big --data train_loader --optimizer lbfgs",
     "^--optimizer must be one of adam, adamw, sgd, got 'lbfgs'"),
    ("student --teacher big --data train_loader -T x", "^-T must be a number, got 'x'"),
    ("student --teacher big --data badlabels", r"--data has label 50, but the student scores 10 "
                                               r"classes \(labels 0..9\)"),
])
def test_magic_bad_input_one_line_student_unchanged(shell, ns, line, match):
    original = ns["student"]
    snap, t_snap = snapshot(original), snapshot(ns["big"])
    with pytest.raises(UsageError, match=match) as ei:
        shell.run_line_magic("distill", line)
    assert type(ei.value) is UsageError
    assert "\n" not in str(ei.value).strip()
    assert ns["student"] is original and same_as_snapshot(original, snap)
    assert same_as_snapshot(ns["big"], t_snap)
    h = shell._nbcompress_workspace.get("student")
    assert h is None or len(h) == 1


def test_magic_strict_mode(shell, ns, monkeypatch):
    monkeypatch.setenv("NBCOMPRESS_STRICT", "1")
    with pytest.raises(NBCompressError, match=r"^-T must be a number > 0"):
        shell.run_line_magic("distill", "student --teacher big --data train_loader -T 0")


# ------------------------------------------------ one mistake, two spellings (Python and magic)
@pytest.mark.parametrize("options,line,py,magic", [
    (dict(soft_only=True, alpha=0.5), "--soft-only --alpha 0.5",
     r"^soft_only trains on teacher outputs alone \(alpha = 1\); alpha=0\.5 contradicts it$",
     r"^--soft-only trains on teacher outputs alone \(alpha = 1\); --alpha 0\.5 contradicts it$"),
    (dict(T=0.0), "-T 0", r"^T must be a number > 0, got 0\.0$", r"^-T must be a number > 0, got 0\.0$"),
    (dict(bias_adjust=10), "--bias-adjust 10",
     r"^bias_adjust=10: the student scores 10 classes \(0\.\.9\)$",
     r"^--bias-adjust 10: the student scores 10 classes \(0\.\.9\)$"),
    (dict(features="fc2:fc22"), "--features fc2:fc22",
     r"^features: the teacher has no layer named 'fc22'; did you mean fc2",
     r"^--features: the teacher has no layer named 'fc22'; did you mean fc2"),
    (dict(features="fc2"), "--features fc2",
     r"^features takes STUDENT_LAYER:TEACHER_LAYER pairs, got 'fc2'$",
     r"^--features takes STUDENT_LAYER:TEACHER_LAYER pairs, got 'fc2'$"),
    (dict(epochs=0), "--epochs 0", r"^epochs must be a whole number >= 1, got 0$",
     r"^--epochs must be a whole number >= 1, got 0$"),
    (dict(feature_weight=float("nan")), "--feature-weight nan",
     r"^feature_weight must be a number >= 0, got nan$",
     r"^--feature-weight must be a number >= 0, got nan$"),
])
def test_the_same_mistake_in_both_spellings(shell, ns, options, line, py, magic):
    with pytest.raises(FieldError, match=py):
        distill(ns["student"], ns["big"], ns["train_loader"], progress=False, **options)
    with pytest.raises(UsageError, match=magic):
        shell.run_line_magic("distill", f"student --teacher big --data train_loader {line}")


def test_unlabelled_data_and_missing_data_in_both_spellings(shell, ns):
    with pytest.raises(FieldError, match=r"^loader yields inputs only \(no labels\): use soft_only"):
        distill(ns["student"], ns["big"], ns["unlabelled"], progress=False)
    with pytest.raises(UsageError, match=r"^--data yields inputs only \(no labels\): use --soft-only"):
        shell.run_line_magic("distill", "student --teacher big --data unlabelled")
    with pytest.raises(FieldError, match=r"^loader is needed: the transfer data"):
        distill(ns["student"], ns["big"], None, progress=False)
    with pytest.raises(UsageError, match=r"^--data is needed: the transfer data"):
        shell.run_line_magic("distill", "student --teacher big")


def test_magic_options_keep_their_declared_defaults(shell, ns):
    """Options left off the line keep the config's declared defaults; --no-cache sets
    cache_teacher=False; -T/--temperature is T; --features text is split into pairs."""
    from nbcompress.options import options_of

    fields = {f.name: o for f, o in options_of(DistillConfig)}
    assert fields["teachers"].flag == "--teacher" and fields["loader"].flag == "--data"
    assert fields["cache_teacher"].flag_value is False and fields["T"].short == "-T"
    assert not fields["teacher_version"].magic and not fields["keep_sparsity"].magic
    r = shell.run_line_magic("distill", "student --teacher big --data train_loader --epochs 1 "
                                        "--temperature 3 --no-cache --no-progress")
    cfg = shell._nbcompress_workspace.get("student").current_version.config
    assert cfg.T == 3.0 and cfg.cache_teacher is False and cfg.alpha is None and cfg.lr == 1e-3
    assert cfg.seed == 0 and cfg.keep_sparsity is True and cfg.teachers == [ns["big"]]
    assert r.result.extra["teacher_cached"] is False
