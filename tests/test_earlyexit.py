"""%earlyexit / nbcompress.early_exit: heads after chosen blocks, per-sample exits in a batch,
honest average FLOPs in the history, the threshold-only step, and every bad input."""
from __future__ import annotations

from collections import OrderedDict

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError
from torch import nn

import nbcompress
from nbcompress import BadInput, NBCompressError, compress, measure
from nbcompress.errors import FieldError
from nbcompress.techniques.earlyexit import (EarlyExitConfig, EarlyExitModel, demo_config,
                                             early_exit, sequential_cnn, threshold_sweep)
from conftest import same_as_snapshot, snapshot, state_equal
from test_storage import roundtrip

FC1, FC2, FC3 = 2 * 784 * 300, 2 * 300 * 100, 2 * 100 * 10
LENET_FLOPS = FC1 + FC2 + FC3
HEAD1 = 2 * 300 * 10          # the linear head after relu1 (300 features -> 10 classes)


@pytest.fixture(scope="module")
def small_train(mnist):
    """1,000 of the training digits (for the small conv models of the structure tests)."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = mnist[0].dataset.tensors
    return DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def digits():
    from nbcompress.data import digits_loaders

    return digits_loaders(batch_size=64)


@pytest.fixture(scope="module")
def small_cnn(digits):
    """The benchmark's sequential CNN at width 8 (BatchNorm in every block), trained briefly on
    the 8x8 digits (fast)."""
    from nbcompress.train import fit

    model = sequential_cnn(8, seed=0)
    fit(model, digits[0], epochs=6, lr=1e-2, seed=0, progress=False)
    return model.eval()


def _head_decisions(lenet, ee, x):
    """By hand: the head's logits after relu1, whether each sample is confident enough, and the
    original network's output."""
    with torch.no_grad():
        h = lenet.relu1(lenet.fc1(lenet.flatten(x)))
        head = ee.heads[0](h)
        conf = torch.softmax(head, dim=1).amax(dim=1)
        return head, conf >= ee.threshold, lenet(x)


# ---------------------------------------------------------------------------------- the model

def test_api_lenet_per_sample_exits_in_a_batch(trained_lenet, mnist):
    train, test = mnist
    snap = snapshot(trained_lenet)
    label, config = demo_config(train, test)
    assert isinstance(label, str) and isinstance(config, EarlyExitConfig)
    config.progress = False
    result = compress(trained_lenet, config, evaluator=test)
    ee = result.model
    assert same_as_snapshot(trained_lenet, snap) and trained_lenet.training is False
    assert isinstance(ee, EarlyExitModel) and not ee.training
    assert ee.exit_names == ("relu1",) and ee.exit_after == (2,)
    assert ee.block_names == ("flatten", "fc1", "relu1", "fc2", "relu2", "fc3")
    assert ee.threshold == 0.9 and ee.num_classes == 10
    # the backbone's own weights are the trained network's, untouched by head training
    assert torch.equal(ee.backbone[1].weight, trained_lenet.fc1.weight)

    x = next(iter(test))[0][:300]
    head, leaves, full = _head_decisions(trained_lenet, ee, x)
    n_exit = int(leaves.sum())
    assert 0 < n_exit < len(x), "some samples should leave early and some go on"
    ee.reset_exit_counts()
    with torch.no_grad():
        out = ee(x)
        singles = torch.cat([ee(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(out[leaves], head[leaves], atol=1e-5)
    assert torch.allclose(out[~leaves], full[~leaves], atol=1e-5)
    assert torch.allclose(out, singles, atol=1e-5)
    assert ee.exit_counts == (2 * n_exit, 2 * (len(x) - n_exit))
    assert ee.exit_shares()["after relu1"] == pytest.approx(n_exit / len(x))
    # training mode runs the whole network (for ordinary fine-tuning)
    ee.train()
    with torch.no_grad():
        assert torch.allclose(ee(x), full, atol=1e-5)
    ee.eval()

    # the step's result: per-exit rows, the sweep table and plot, the notes
    rows = {r["exit"]: r for r in result.layers}
    assert rows["1"]["layer"] == "relu1" and rows["1"]["params"] == 300 * 10 + 10
    assert rows["1"]["path_flops"] == FC1 + HEAD1
    assert rows["final"]["path_flops"] == LENET_FLOPS + HEAD1
    sweep = result.tables["threshold sweep"]
    assert isinstance(sweep, pd.DataFrame) and sweep["current"].sum() == 1
    assert list(sweep["threshold"]) == sorted(sweep["threshold"])
    assert (sweep["avg_flops"].diff().dropna() >= 0).all()   # a higher threshold never costs less
    assert result.figures["accuracy vs FLOPs"][:8] == b"\x89PNG\r\n\x1a\n"
    assert any("threshold 0.9 on the eval data" in n for n in result.notes)


def test_flops_are_averaged_over_the_eval_data_by_hand(trained_lenet, mnist):
    train, test = mnist
    ee = early_exit(trained_lenet, train, exits="relu1", threshold=0.9, epochs=1)
    n_exit = n = 0
    for x, _ in test:
        _, leaves, _ = _head_decisions(trained_lenet, ee, x)
        n_exit += int(leaves.sum())
        n += len(x)
    expected = (n_exit * (FC1 + HEAD1) + (n - n_exit) * (LENET_FLOPS + HEAD1)) / n
    m = measure(ee, example_input=torch.randn(1, 1, 28, 28), evaluator=test, latency=False)
    assert m.flops == round(expected)
    assert m.eval_extra["share after relu1"] == pytest.approx(n_exit / n)
    assert m.eval_extra["share final"] == pytest.approx(1 - n_exit / n)
    # the same basis as the dense count: a batch of 4 as the example gives 4x the FLOPs
    m4 = measure(ee, example_input=torch.randn(4, 1, 28, 28), evaluator=test, latency=False)
    assert m4.flops == round(4 * expected)
    # the sweep's prediction at the model's threshold is what the real run spent
    sweep = threshold_sweep(ee, test)
    cur = sweep[sweep["current"]].iloc[0]
    assert cur["avg_flops"] == pytest.approx(expected)
    assert cur["accuracy"] == pytest.approx(m.accuracy)
    # the hook's own pass does not add to what the model has counted
    ee.reset_exit_counts()
    flops, details = ee.nbc_flops(torch.randn(1, 1, 28, 28), test)
    assert ee.exit_counts == (0, 0) and flops == m.flops and details == m.eval_extra
    # a plain network keeps its static count
    assert measure(trained_lenet, torch.randn(1, 1, 28, 28), latency=False).flops == LENET_FLOPS


# ---------------------------------------------------------------------------------- the magic

def test_magic_history_threshold_step_and_undo(shell, trained_lenet, mnist):
    train, test = mnist
    shell.user_ns.update(model=trained_lenet, train_loader=train, test_loader=test)
    shell.run_line_magic("nbcompress", "model --eval test_loader")
    r = shell.run_line_magic("earlyexit", "model --data train_loader --exits relu1 "
                                          "--threshold 0.9 --epochs 2 --no-progress")
    ee = shell.user_ns["model"]
    assert isinstance(ee, EarlyExitModel) and ee is not trained_lenet
    assert "share after relu1" in r.after.eval_extra
    df = shell.run_line_magic("compress_history", "model --no-plot")
    assert list(df["technique"]) == ["baseline", "earlyexit"]
    assert df["flops"].iloc[0] == LENET_FLOPS
    share = r.after.eval_extra["share after relu1"]
    hand = share * (FC1 + HEAD1) + (1 - share) * (LENET_FLOPS + HEAD1)
    assert df["flops"].iloc[1] == round(hand) and df["flops"].iloc[1] < LENET_FLOPS
    assert df["accuracy"].iloc[1] == pytest.approx(nbcompress.evaluate(ee, test))

    # only the threshold: same weights, new version, more FLOPs at a stricter threshold
    r2 = shell.run_line_magic("earlyexit", "model --threshold 0.999 --no-progress")
    ee2 = shell.user_ns["model"]
    assert ee2 is not ee and ee2.threshold == 0.999 and ee.threshold == 0.9
    assert state_equal(ee2, ee)
    assert any("weights unchanged" in n for n in r2.result.notes)
    assert r2.after.eval_extra["share after relu1"] < share
    df = shell.run_line_magic("compress_history", "model --no-plot")
    assert len(df) == 3 and df["flops"].iloc[2] > df["flops"].iloc[1]
    assert "threshold=0.999" in df["args"].iloc[2]

    shell.run_line_magic("undo", "model")
    back = shell.user_ns["model"]
    assert back is not ee and back.threshold == 0.9 and state_equal(back, ee)
    shell.run_line_magic("undo", "model")
    assert state_equal(shell.user_ns["model"], trained_lenet)
    shell.run_line_magic("redo", "model 2")
    again = shell.user_ns["model"]
    assert again.threshold == ee2.threshold and state_equal(again, ee2)


# ------------------------------------------------------------------------- structures, options

def test_sequential_cnn_exits_every_and_named(small_cnn, digits):
    train, test = digits
    snap = snapshot(small_cnn)
    result = compress(small_cnn, EarlyExitConfig(data=train, epochs=2, threshold=0.9,
                                                 progress=False), evaluator=test)
    ee = result.model
    assert same_as_snapshot(small_cnn, snap)
    # default: after every conv block, moved past the pools, not just before the classifier
    assert ee.exit_names == ("0", "2", "3", "5", "6")
    assert [r["head"] for r in result.layers[:2]] == ["avgpool 4x4 + linear"] * 2
    x = next(iter(test))[0][:200]
    with torch.no_grad():
        out = ee(x)
        singles = torch.cat([ee(x[i:i + 1]) for i in range(len(x))])
        full = small_cnn(x)
    assert torch.allclose(out, singles, atol=1e-4)
    final_rows = torch.isclose(out, full, atol=1e-4).all(dim=1)
    assert final_rows.sum() == ee.exit_counts[-1] // 2 < len(x)
    # measured = predicted by the sweep at the current threshold
    m = measure(ee, example_input=x[:1], evaluator=test, latency=False)
    cur = result.tables["threshold sweep"].query("current").iloc[0]
    assert m.flops == pytest.approx(cur["avg_flops"], rel=0.01)
    assert m.accuracy == pytest.approx(cur["accuracy"], abs=0.003)
    assert m.flops < measure(small_cnn, x[:1], latency=False).flops

    every2 = early_exit(small_cnn, train, every=2, epochs=1)
    assert every2.exit_names == ("2", "5") and every2.exit_after == (2, 5)
    named = early_exit(small_cnn, train, exits="4,1", epochs=1)
    assert named.exit_names == ("1", "4")
    assert [type(h[0]).__name__ for h in named.heads] == ["AdaptiveAvgPool2d"] * 2
    # 8 channels of 8x8 pooled to 4x4; 16 channels of 4x4 kept
    assert named.heads[0][2].in_features == 8 * 4 * 4
    assert named.heads[1][2].in_features == 16 * 4 * 4


def test_nested_blocks_and_plain_module_chain(small_train):
    train = small_train
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 10)))
    ee = early_exit(model, train, exits="features.2", epochs=1, threshold=0.5)
    assert ee.exit_names == ("features.2",)
    assert ee.block_names == ("features.0", "features.1", "features.2", "features.3",
                              "features.4", "pool", "flatten", "fc")
    x = next(iter(train))[0][:16]
    ee.threshold = 1.5              # nothing can reach it: every sample runs to the end
    with torch.no_grad():
        assert torch.allclose(ee(x), model(x), atol=1e-5)
    # a module (not a Sequential) whose forward runs its children in order: LeNet-5
    from nbcompress.data import lenet5

    ee5 = early_exit(lenet5(seed=0), train, exits="pool1", epochs=1)
    assert ee5.exit_names == ("pool1",) and ee5.heads[0][0].output_size == (4, 4)


def test_joint_training_changes_the_backbone_not_the_original(trained_lenet, mnist):
    train, test = mnist
    snap = snapshot(trained_lenet)
    ee = early_exit(trained_lenet, train, exits="relu1", epochs=1, joint=True, lr=1e-4)
    assert same_as_snapshot(trained_lenet, snap)
    assert not torch.equal(ee.backbone[1].weight, trained_lenet.fc1.weight)
    assert all(p.requires_grad for p in ee.parameters())
    assert nbcompress.evaluate(ee, test) > 0.85


def test_frozen_training_without_the_feature_cache(trained_lenet, mnist, monkeypatch):
    import nbcompress.techniques.earlyexit.training as eemod

    train, test = mnist
    monkeypatch.setattr(eemod, "CACHE_BYTES", 0)      # the backbone then runs every epoch
    b = early_exit(trained_lenet, train, exits="relu1", epochs=1)
    assert torch.equal(b.backbone[1].weight, trained_lenet.fc1.weight)
    assert all(p.requires_grad for p in b.parameters())
    x, y = next(iter(test))
    with torch.no_grad():
        head_acc = (b.forward_all(x)[0].argmax(1) == y).float().mean()
    assert head_acc > 0.8


def test_save_load_round_trip(trained_lenet, mnist):
    train, test = mnist
    ee = early_exit(trained_lenet, train, exits="relu1", threshold=0.8, epochs=1)
    back = roundtrip(ee)[0]
    assert isinstance(back, EarlyExitModel)
    assert (back.threshold, back.exit_names, back.exit_after) == (0.8, ("relu1",), (2,))
    x = next(iter(test))[0]
    with torch.no_grad():
        assert torch.equal(back.eval()(x), ee.eval()(x))


def test_no_eval_loader_no_sweep(trained_lenet, mnist):
    train, _ = mnist
    result = compress(trained_lenet, EarlyExitConfig(data=train, exits=("relu1",), epochs=1,
                                                     progress=False))
    assert any("no threshold sweep" in n for n in result.notes)
    assert result.tables == {} and [r["exit"] for r in result.layers] == ["1", "final"]


# -------------------------------------------------------------------------------- bad input

class FunctionalNet(nn.Module):
    """Blocks glued by a function in forward that is not a flatten, ReLU or pooling (tanh):
    cannot be listed as a chain."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(self.fc2(torch.tanh(self.fc1(x.view(len(x), -1)))))


BAD = [
    ("--data train_loader --threshold 0", "(0, 1]"),
    ("--data train_loader --threshold 1.5", "(0, 1]"),
    ("--data train_loader --threshold -0.2", "(0, 1]"),
    ("--data train_loader --threshold nan", "(0, 1]"),
    ("--data train_loader --threshold abc", "--threshold must be a number, got 'abc'"),
    ("--data train_loader --exits nosuch", "no module named 'nosuch'"),
    ("--data train_loader --exits fc3", "is the last block"),
    ("--data train_loader --exits relu1,relu1", "twice"),
    ("--data train_loader --exits relu1 --every 1", "give --exits or --every, not both"),
    ("--data train_loader --every 0", "--every must be a whole number >= 1, got 0"),
    ("--data train_loader --every 3", "puts no exit"),
    ("--exits relu1", "--data LOADER is needed"),
    ("--data not_a_loader --exits relu1", "not a torch DataLoader"),
    ("--data missing_loader --exits relu1", "no variable named 'missing_loader'"),
    ("--data train_loader --epochs 0", "--epochs must be a whole number >= 1, got 0"),
    ("--data train_loader --alpha 1.5", "--alpha must be a number in [0, 1], got 1.5"),
    ("--data train_loader -T 0", "-T must be a number > 0, got 0.0"),
    ("--data train_loader --lr -1", "--lr must be a number > 0, got -1.0"),
    ("--data train_loader --head-pool 0", "--head-pool must be a whole number >= 1, got 0"),
    ("--data train_loader --device nosuchdevice", "unknown device"),
    ("--data bad_labels --alpha 0.5", "--data has label 50, but the model scores 10 classes"),
    ("--data train_loader --target-flops 0.5", "--target-flops chooses the exits on the "
                                               "evaluation data: give an evaluation loader (--eval LOADER"),
    ("--data train_loader --target-flops 0.5 --threshold 0.9", "not both"),
    ("--data train_loader --target-flops 0", "--target-flops must be"),
    ("--data train_loader --head big", "--head must be one of"),
    ("--data train_loader --eval train_loader --exits relu1 --target-flops 0.001 --epochs 1",
     "no choice of exits and threshold fits 0.1% of the FLOPs on the evaluation data: the "
     "cheapest"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_model_unchanged(shell, trained_lenet, mnist, args, message):
    from torch.utils.data import DataLoader, TensorDataset

    bad_labels = DataLoader(TensorDataset(torch.rand(16, 1, 28, 28), torch.full((16,), 50)),
                            batch_size=8)
    shell.user_ns.update(model=trained_lenet, train_loader=mnist[0], not_a_loader=[1, 2],
                         bad_labels=bad_labels)
    snap = snapshot(trained_lenet)
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("earlyexit", f"model {args}")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert shell.user_ns["model"] is trained_lenet and same_as_snapshot(trained_lenet, snap)


def _resnet():
    from nbcompress.data import reference_cnn

    return reference_cnn(width=4, seed=0)


@pytest.mark.parametrize("make,args,message", [
    (FunctionalNet, "", "cannot list the blocks of the model (FunctionalNet)"),
    (_resnet, "--exits layer1.conv1", "cannot list the blocks of layer1 (ResidualBlock)"),
    (lambda: nn.Linear(784, 10), "", "it has no sub-modules"),
    (lambda: 3, "", "not a torch.nn.Module"),
])
def test_models_whose_blocks_cannot_be_listed(shell, mnist, make, args, message):
    model = make()
    shell.user_ns.update(model=model, train_loader=mnist[0])
    snap = snapshot(model) if isinstance(model, nn.Module) else None
    with pytest.raises(UsageError, match=None) as e:
        shell.run_line_magic("earlyexit", f"model --data train_loader {args}")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert shell.user_ns["model"] is model
    if snap is not None:
        assert same_as_snapshot(model, snap)


def test_early_exit_model_only_takes_a_threshold(shell, trained_lenet, mnist):
    train, _ = mnist
    ee = early_exit(trained_lenet, train, exits="relu1", epochs=1)
    shell.user_ns.update(model=ee, train_loader=train)
    for args, message in [("--data train_loader --exits relu1", "only --threshold can change"),
                          ("--epochs 2 --threshold 0.5", "not --epochs"),
                          ("", "give --threshold P")]:
        with pytest.raises(UsageError) as e:
            shell.run_line_magic("earlyexit", f"model {args}")
        assert message in str(e.value)
        assert shell.user_ns["model"] is ee and ee.threshold == 0.95
    shell.run_line_magic("earlyexit", "model --threshold 1")      # (0, 1]: 1 is allowed
    assert shell.user_ns["model"].threshold == 1.0 and ee.threshold == 0.95


def test_strict_mode_and_api_errors(shell, trained_lenet, mnist, monkeypatch):
    train, _ = mnist
    shell.user_ns.update(model=trained_lenet, train_loader=train)
    monkeypatch.setenv("NBCOMPRESS_STRICT", "1")
    with pytest.raises(NBCompressError, match=r"\(0, 1\]"):
        shell.run_line_magic("earlyexit", "model --data train_loader --threshold 2")
    snap = snapshot(trained_lenet)
    for kwargs, message in [(dict(threshold=2), r"\(0, 1\]"), (dict(threshold=True), r"\(0, 1\]"),
                            (dict(exits=["fc9"]), "no module named 'fc9'"),
                            (dict(exits=[1.5]), "module names"),
                            (dict(nonsense=1), "unknown option"),
                            (dict(exits=[]), "names no module")]:
        with pytest.raises(BadInput, match=message):
            early_exit(trained_lenet, train, **kwargs)
    with pytest.raises(FieldError, match="^data=LOADER is needed to train the exit heads$"):
        nbcompress.early_exit(trained_lenet, exits="relu1")
    assert nbcompress.early_exit is early_exit and nbcompress.EarlyExitConfig is EarlyExitConfig
    assert same_as_snapshot(trained_lenet, snap)


# ------------------------------------------------------- one mistake, two spellings (fields, flags)

@pytest.mark.parametrize("kwargs,line,python,magic", [
    (dict(threshold=2), "--data train_loader --threshold 2",
     r"threshold must be a number in (0, 1], got 2", r"--threshold must be a number in (0, 1], got 2.0"),
    (dict(exits="relu1", every=1), "--data train_loader --exits relu1 --every 1",
     "give exits or every, not both", "give --exits or --every, not both"),
    (dict(T=0.0), "--data train_loader -T 0",
     "T must be a number > 0, got 0.0", "-T must be a number > 0, got 0.0"),
    (dict(every=3), "--data train_loader --every 3",
     "every=3 puts no exit in LeNet300", "--every 3 puts no exit in LeNet300"),
    (dict(exits="nosuch"), "--data train_loader --exits nosuch",
     "exits: LeNet300 has no module named 'nosuch'", "--exits: LeNet300 has no module named 'nosuch'"),
    (dict(exits="relu1", alpha=0.5, data="unlabelled"),
     "--data unlabelled --exits relu1 --alpha 0.5",
     "alpha below 1 trains the heads on labels too, but data yields no labels (use alpha=1: "
     "distil from the final output only)",
     "--alpha below 1 trains the heads on labels too, but --data yields no labels (use --alpha 1: "
     "distil from the final output only)"),
    (dict(exits="relu1", data=None), "--exits relu1",
     "data=LOADER is needed to train the exit heads", "--data LOADER is needed to train the exit heads"),
])
def test_same_mistake_names_fields_in_python_and_flags_on_the_magic(shell, trained_lenet, mnist,
                                                                    kwargs, line, python, magic):
    from torch.utils.data import DataLoader, TensorDataset

    train = mnist[0]
    unlabelled = DataLoader(TensorDataset(torch.rand(16, 1, 28, 28)), batch_size=8)
    kwargs = dict(kwargs)
    data = kwargs.pop("data", train)
    data = unlabelled if data == "unlabelled" else data
    model_name = type(trained_lenet).__name__
    python, magic = python.replace("LeNet300", model_name), magic.replace("LeNet300", model_name)
    snap = snapshot(trained_lenet)
    with pytest.raises(FieldError) as e:
        compress(trained_lenet, EarlyExitConfig(data=data, progress=False, **kwargs))
    assert str(e.value).startswith(python), str(e.value)
    shell.user_ns.update(model=trained_lenet, train_loader=train, unlabelled=unlabelled)
    with pytest.raises(UsageError) as u:
        shell.run_line_magic("earlyexit", f"model {line}")
    assert str(u.value).startswith(magic), str(u.value)
    assert shell.user_ns["model"] is trained_lenet and same_as_snapshot(trained_lenet, snap)


def test_early_exit_model_refusals_in_both_spellings(shell, trained_lenet, mnist):
    train, _ = mnist
    ee = early_exit(trained_lenet, train, exits="relu1", epochs=1)
    with pytest.raises(FieldError) as e:
        early_exit(ee, threshold=0.5, epochs=2, head_pool=2)
    assert str(e.value) == ("the model already has early exits (relu1): only threshold can change "
                            "now, not epochs, head_pool (%undo to get the plain network back)")
    with pytest.raises(FieldError) as e:
        early_exit(ee)
    assert str(e.value) == "the model already has early exits: give threshold=P to change its " \
                           "threshold"
    shell.user_ns.update(model=ee, train_loader=train)
    with pytest.raises(UsageError) as u:
        shell.run_line_magic("earlyexit", "model --threshold 0.5 --epochs 2 --head-pool 2")
    assert str(u.value) == ("the model already has early exits (relu1): only --threshold can "
                            "change now, not --epochs, --head-pool (%undo to get the plain "
                            "network back)")
    with pytest.raises(UsageError) as u:
        shell.run_line_magic("earlyexit", "model")
    assert str(u.value) == "the model already has early exits: give --threshold P to change its " \
                           "threshold"
    # options not on the line keep their defaults: the threshold alone is accepted
    shell.run_line_magic("earlyexit", "model --threshold 0.5 --no-progress")
    assert shell.user_ns["model"].threshold == 0.5 and ee.threshold == 0.95


def test_generated_magic_help_keeps_the_options(shell):
    doc = shell.find_line_magic("earlyexit").__doc__
    for text in ("--data LOADER", "--exits LAYER[,LAYER...]", "--every K", "--threshold P",
                 "-T TEMP, --temperature TEMP", "--head-pool S", "(default 5)", "(default 0.95)",
                 "%earlyexit cnn --threshold 0.97"):
        assert text in doc, text
    assert "%%" not in doc


def test_residual_networks_get_exits_between_their_stages():
    """torchvision's ResNet and VGG (models the project did not write) flatten in their forward
    before the classifier: that flatten becomes a block, the residual stages stay whole, and at
    threshold 1 every sample goes through: the output is the network's own."""
    tv = pytest.importorskip("torchvision")
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=16)
    for m, exits in ((tv.models.resnet18(num_classes=10), "layer1,layer2,layer3"),
                     (tv.models.vgg11(num_classes=10), "features.5,features.10")):
        m.eval()
        ee = early_exit(m, dl, exits=exits, epochs=1, threshold=1.0)
        assert ee.exit_names == tuple(exits.split(","))
        assert any(isinstance(b, nn.Flatten) for b in ee.backbone)
        with torch.no_grad():
            assert torch.allclose(ee.eval()(x[:8]), m(x[:8]), atol=1e-5)
            ee.threshold = 1e-6                       # every sample leaves at the first exit
            ee.reset_exit_counts()
            out = ee(x)
        assert ee.exit_counts[0] == len(x)
        with torch.no_grad():
            assert torch.allclose(out, ee.forward_all(x)[0], atol=1e-5)


class _GluedNet(nn.Module):
    """torchvision's patterns in one net: a ModuleList looped over (MaxViT), F.relu + pooling
    between the features and the classifier (DenseNet), a classifier that starts with Dropout
    (EfficientNet / MobileNet), a flatten after the classifier (SqueezeNet)."""

    def __init__(self, end_flatten=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1))
                                    for _ in range(3))
        self.end_flatten = end_flatten
        self.classifier = (nn.Sequential(nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1)) if end_flatten
                           else nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 10)))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        if self.end_flatten:
            return torch.flatten(self.classifier(x), 1)
        x = F.relu(x, inplace=True)
        return self.classifier(x.mean([2, 3]))


def test_functions_between_blocks_become_blocks():
    """The functions a forward calls between its blocks (F.relu, x.mean([2, 3]), a flatten after
    the last block) are found from each block's real input and become parameter-free blocks; a
    ModuleList's members are blocks; the chain reproduces the network (threshold 1)."""
    from torch.utils.data import DataLoader, TensorDataset

    from nbcompress.techniques.earlyexit.blocks import list_blocks

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    for end_flatten, glue in ((False, "(relu, mean over H, W before classifier)"),
                              (True, "(flatten after classifier)")):
        torch.manual_seed(0)
        m = _GluedNet(end_flatten).eval()
        names = [n for n, _ in list_blocks(m, x[:4])]
        assert names[:4] == ["stem", "blocks.0", "blocks.1", "blocks.2"] and glue in names
        ee = early_exit(m, dl, epochs=1, threshold=1.0)
        assert ee.exit_names == ("stem", "blocks.0", "blocks.1")
        with torch.no_grad():
            assert torch.allclose(ee.eval()(x), m(x), atol=1e-5)


def test_a_features_classifier_network_gets_exits_inside_its_features():
    """A top level of only ``features`` + ``classifier`` (MobileNet, EfficientNet, ConvNeXt,
    Swin, VGG) puts no exit between them: its ``features`` stages are opened and, with no
    --every, about four exits are spread over them; the classifier stays whole."""
    tv = pytest.importorskip("torchvision")
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 64, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    m = tv.models.mobilenet_v3_small(num_classes=10).eval()
    ee = early_exit(m, dl, epochs=1, threshold=1.0)
    assert 3 <= len(ee.exit_names) <= 5
    assert all(n.startswith("features.") for n in ee.exit_names)
    with torch.no_grad():
        assert torch.allclose(ee.eval()(x), m(x), atol=1e-5)
    two = early_exit(m, dl, epochs=1, every=2, threshold=1.0)       # --every still counts
    assert len(two.exit_names) > len(ee.exit_names)


# ----------------------------------------------------------------- exits chosen for you (--target-flops)

def test_target_flops_chooses_exits_and_threshold_on_the_eval_data(small_cnn, digits):
    """Heads after every candidate block, then the most accurate (exits, threshold) within the
    budget; each choice's accuracy and FLOPs, predicted from one pass, are what the model with
    only those exits really does (its own batched forward, counted by the FLOP counter)."""
    from nbcompress.techniques.earlyexit.sweep import _Sweep, choose_exits

    train, test = digits
    snap = snapshot(small_cnn)
    r = compress(small_cnn, EarlyExitConfig(data=train, target_flops=0.5, head="conv", epochs=2,
                                            progress=False), evaluator=test)
    ee = r.model
    assert same_as_snapshot(small_cnn, snap)
    cands = r.extra["candidate_exits"]
    assert cands == ["0", "2", "3", "5", "6"]     # after every conv (past its pool), not the last
    assert set(ee.exit_names) <= set(cands) and len(ee.heads) == len(ee.exit_names)
    assert all(r_["head"].startswith("conv 3x3 + BN + ReLU + avgpool ")
               for r_ in r.layers[:len(ee.heads)])
    front = r.tables["exit choices (Pareto front)"]
    assert front["flops_fraction"].is_monotonic_increasing
    assert front[front["pareto"]]["accuracy"].is_monotonic_increasing
    assert front["chosen"].sum() == 1
    m = measure(ee, example_input=next(iter(test))[0][:1], evaluator=test, latency=False)
    full = measure(small_cnn, next(iter(test))[0][:1], evaluator=test, latency=False)
    assert m.flops <= 0.5 * full.flops * 1.001
    note = next(n for n in r.notes if n.startswith("--target-flops 0.5"))
    assert f"{100 * m.accuracy:.2f}% at" in note

    # the search by brute force: a model with all the candidate heads, every subset run
    every = compress(small_cnn, EarlyExitConfig(data=train, exits=",".join(cands), head="conv",
                                                epochs=2, progress=False)).model.eval()
    row, table = choose_exits(_Sweep(every, test), 0.5)
    x = torch.cat([b[0] for b in test])
    y = torch.cat([b[1] for b in test])
    with torch.no_grad():
        ref = small_cnn(x).argmax(1)
    best = -1.0
    import itertools

    for k in range(len(cands) + 1):
        for S in itertools.combinations(range(len(cands)), k):
            sub = every.keep_exits(S).eval()
            for t in (0.5, 0.9, 0.99):
                sub.threshold = t
                got = measure(sub, example_input=x[:1], evaluator=test, latency=False)
                with torch.no_grad():
                    p = sub(x).argmax(1)
                pred = table[(table["exits"] == S) & ((table["threshold"] == t) | (k == 0))]
                assert got.flops == pytest.approx(pred["avg_flops"].iloc[0], rel=0.01)
                assert float((p == y).float().mean()) == pytest.approx(
                    pred["accuracy"].iloc[0], abs=1e-6)
                agree = float((p == ref).float().mean())
                assert agree == pytest.approx(pred["agreement"].iloc[0], abs=1e-6)
                if got.flops <= 0.5 * full.flops:
                    best = max(best, agree)
    assert row["agreement"] >= best - 1e-6 and row["flops_fraction"] <= 0.5


def test_target_flops_on_torchvision_resnet_opens_its_stages():
    tv = pytest.importorskip("torchvision")
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=16)
    m = tv.models.resnet18(num_classes=10).eval()
    r = compress(m, EarlyExitConfig(data=dl, target_flops=0.6, epochs=1, progress=False),
                 evaluator=dl)
    # candidates inside the stages: between residual blocks, never just before the classifier
    assert r.extra["candidate_exits"] == ["maxpool", "layer1.0", "layer1.1", "layer2.0",
                                          "layer2.1", "layer3.0", "layer3.1", "layer4.0"]
    cur = r.tables["threshold sweep"].query("current").iloc[0]
    assert cur["flops_fraction"] <= 0.6 + 1e-9


def test_conv_heads_save_and_load(small_cnn, digits, tmp_path):
    train, test = digits
    ee = early_exit(small_cnn, train, exits="1,4", head="conv", epochs=1)
    assert [type(h[0]).__name__ for h in ee.heads] == ["Conv2d"] * 2
    nbcompress.save(ee, tmp_path / "ee.nbc")
    back = nbcompress.load(tmp_path / "ee.nbc")
    x = next(iter(test))[0][:64]
    with torch.no_grad():
        assert torch.equal(back.eval()(x), ee.eval()(x))


class _TokenNet(nn.Module):
    """An MLP-Mixer-like net: patches to tokens (N, T, C), token blocks of LayerNorm + Linear,
    x.mean(1) over the tokens before the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())
                                      for _ in range(4)))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def test_channels_last_features_get_heads_that_pool_positions():
    """A token sequence (N, T, C) or Swin's (N, H, W, C) map is channels-last: an exit head moves
    the channels first before pooling (a head that pooled over the channels would read the
    wrong axis); found from the layers around the exit, and a conv net's heads are unchanged.
    Here the stem's flatten + transpose is a forward function the chain refuses, so the token
    blocks are the model (an nn.Sequential) and the stem's output its input."""
    from torch.utils.data import DataLoader, TensorDataset

    from nbcompress.techniques.earlyexit.blocks import ChannelsFirst, channels_last

    torch.manual_seed(0)
    net = _TokenNet().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    tokens = net.stem(x).flatten(2).transpose(1, 2).detach()          # (16, 16 tokens, 16)
    seq = nn.Sequential(*net.blocks, _Mean1(), net.head).eval()
    dl = DataLoader(TensorDataset(tokens, y), batch_size=8)
    ee = early_exit(seq, dl, epochs=1, threshold=1.0)
    assert ee.exit_names == ("0", "1", "2")
    assert all(isinstance(h[0], ChannelsFirst) for h in ee.heads)
    with torch.no_grad():
        assert torch.allclose(ee.eval().forward_all(tokens)[-1], seq(tokens), atol=1e-5)
        assert ee.heads[0](tokens).shape == (16, 10)
    # the layout: from the layer that made the feature, else the one that reads it next
    conv = nn.Conv2d(3, 8, 3)
    assert not channels_last(torch.zeros(2, 8, 5, 5), conv, [nn.BatchNorm2d(8)])
    assert channels_last(torch.zeros(2, 5, 5, 8), nn.Linear(4, 8), [])
    assert channels_last(torch.zeros(2, 7, 8), nn.GELU(), [nn.LayerNorm(8)])
    assert not channels_last(torch.zeros(2, 8, 7), nn.GELU(), [nn.Conv1d(8, 8, 1)])


class _Mean1(nn.Module):
    def forward(self, x):
        return x.mean(1)


def test_mean_over_tokens_between_blocks_is_a_block():
    """x.mean(1) over the tokens before the head (MLP-Mixer) is found like the other functions
    between blocks, and the token blocks get exits with channels-first heads."""
    from torch.utils.data import DataLoader, TensorDataset

    from nbcompress.techniques.earlyexit.blocks import ChannelsFirst, list_blocks

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())
                                          for _ in range(4)))
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(self.blocks(x).mean(1))

    torch.manual_seed(0)
    m = Tokens().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 9, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    assert "(mean over tokens before head)" in [n for n, _ in list_blocks(m, x[:4])]
    ee = early_exit(m, DataLoader(TensorDataset(x, y), batch_size=8), epochs=1, threshold=1.0)
    assert ee.exit_names == ("blocks.0", "blocks.1", "blocks.2")
    assert all(isinstance(h[0], ChannelsFirst) for h in ee.heads)
    back = roundtrip(ee)[0].eval()
    with torch.no_grad():
        assert torch.allclose(ee.eval().forward_all(x)[-1], m(x), atol=1e-5)
        assert torch.equal(back.forward_all(x)[-1], ee.forward_all(x)[-1])


def test_vision_transformers_get_exits_between_their_blocks():
    """A ViT is no chain of its sub-modules (a class token and positions are added between the
    patch embedding and the blocks); for timm's and torchvision's VisionTransformer the part
    before the blocks and the part after them become one block each, so exits go between the
    transformer blocks, with heads that pool the tokens (channels-last). At threshold 1 the
    output is the network's own; the early-exit model round-trips through save / load; an exit
    named inside a block is refused in one line."""
    tv = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    from torch.utils.data import DataLoader, TensorDataset

    from nbcompress.techniques.earlyexit.blocks import ChannelsFirst

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    nets = [(tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=5, num_heads=2,
                                         hidden_dim=32, mlp_dim=64, num_classes=10),
             "encoder.layers.encoder_layer_"),
            (timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                               patch_size=8, depth=5, embed_dim=32, num_heads=2, num_classes=10),
             "blocks.")]
    for m, prefix in nets:
        m.eval()
        n_params = sum(p.numel() for p in m.parameters())
        ee = early_exit(m, dl, epochs=1, threshold=1.0)
        assert ee.exit_names and all(n.startswith(prefix) for n in ee.exit_names)
        assert all(isinstance(h[0], ChannelsFirst) for h in ee.heads)
        backbone = sum(p.numel() for p in ee.backbone.parameters())
        assert backbone == n_params                       # every parameter once, none lost
        with torch.no_grad():
            assert torch.allclose(ee.eval().forward_all(x)[-1], m(x), atol=1e-5)
        back = roundtrip(ee)[0].eval()
        with torch.no_grad():
            assert torch.equal(back.forward_all(x)[-1], ee.forward_all(x)[-1])
        inside = f"{prefix}1.mlp" if prefix == "blocks." else f"{prefix}1.mlp"
        with pytest.raises(FieldError, match="is inside a block of VisionTransformer"):
            early_exit(m, dl, exits=inside, epochs=1)


def test_auxiliary_classifiers_of_training_are_left_out():
    """GoogLeNet's auxiliary classifiers run only in training: an evaluation forward is a chain
    of the other blocks, so the early-exit model leaves them out and says so in the notes; at
    threshold 1 the output is the network's own."""
    tv = pytest.importorskip("torchvision")
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
    torch.manual_seed(0)
    m = tv.models.googlenet(weights=None, num_classes=10, aux_logits=True,
                            init_weights=False).eval()
    r = compress(m, EarlyExitConfig(data=DataLoader(TensorDataset(x, y), batch_size=4),
                                    exits="inception3b,inception4e", epochs=1, threshold=1.0))
    assert any(n.startswith("aux1, aux2 left out") for n in r.notes)
    ee = r.model.eval()
    assert not any(n.startswith("aux") for n in ee.block_names)
    with torch.no_grad():
        assert torch.allclose(ee.forward_all(x)[-1], m(x), atol=1e-4)
