"""Issue 13: the history never lies. Driven through a real IPython shell (and the API), on a user's
own BatchNorm CNN trained on scikit-learn's 8x8 digits: in-place edits between steps become
versions of their own, failed commands leave no settings behind, evaluator mistakes are one line,
options are never abbreviated."""
from __future__ import annotations

import copy

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

import nbcompress
from nbcompress import History
from nbcompress.core import BadInput
from nbcompress.data import digits_loaders

from conftest import digits_cnn, same_as_snapshot, snapshot


def user_training_loop(model, loader, steps=5, lr=1e-2):
    """The user's own loop, in place, on whatever the name is bound to now."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def digits():
    return digits_loaders(batch_size=64)


@pytest.fixture(scope="module")
def _trained_cnn(digits):
    m = digits_cnn()
    user_training_loop(m, digits[0], steps=60, lr=0.05)
    return m


@pytest.fixture
def net(_trained_cnn):
    return copy.deepcopy(_trained_cnn)


@pytest.fixture
def sh(shell, net, digits):
    shell.user_ns.update(net=net, train_loader=digits[0], test_loader=digits[1])
    return shell


def _history(sh, name="net"):
    return sh._nbcompress_workspace.get(name)


def _settings(h):
    return (h.evaluator, h.example_input, h.device, h.latency_mode, dict(h._sources))


# ------------------------------------------------------------------------ 1. in-place edits
def test_training_in_place_between_steps_never_rewrites_a_version(sh, digits):
    ns = sh.user_ns
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    r = sh.run_line_magic("prune", "net 0.5 --no-progress")
    step_output = snapshot(ns["net"])
    step_acc = r.after.accuracy
    user_training_loop(ns["net"], digits[0])             # the user's loop, on the live model
    edited = snapshot(ns["net"])
    assert not same_as_snapshot(ns["net"], step_output)

    sh.run_line_magic("undo", "net")                      # the edit is recorded first, then undone
    h = _history(sh)
    assert [v.technique for v in h.versions] == ["baseline", "prune", "edited"]
    assert h.pos == 1 and same_as_snapshot(ns["net"], step_output)
    assert h.versions[1].args == "amount=0.5"
    assert h.versions[1].metrics.accuracy == step_acc    # the step's row still says what it made
    for _ in range(4):                                    # and walking never changes a version
        sh.run_line_magic("redo", "net")
        assert same_as_snapshot(ns["net"], edited)
        user_training_loop(ns["net"], digits[0], steps=0)  # touching without changing: no version
        sh.run_line_magic("undo", "net 2")
        sh.run_line_magic("redo", "net")
        assert same_as_snapshot(ns["net"], step_output)
    assert len(h) == 3
    df = sh.run_line_magic("compress_history", "net --no-plot")
    assert list(df["technique"]) == ["baseline", "prune", "edited"]
    assert df.loc[1, "accuracy"] == step_acc
    assert "outside nbcompress" in df.loc[2, "args"]


def test_edit_through_data_is_seen(sh):
    """``.data`` edits bypass the version counter; the content fingerprint still sees them."""
    ns = sh.user_ns
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    sh.run_line_magic("prune", "net 0.5 --no-progress")
    pruned = snapshot(ns["net"])
    ns["net"][3].weight.data.mul_(0)
    r = sh.run_line_magic("quantize", "net --mode uniform --bits 4 --no-progress")
    h = _history(sh)
    assert [v.technique for v in h.versions] == ["baseline", "prune", "edited", "quantize"]
    assert r.before.accuracy == h.versions[2].metrics.accuracy       # measured the edited model
    sh.run_line_magic("undo", "net 2")
    assert same_as_snapshot(ns["net"], pruned)
    sh.run_line_magic("redo", "net")
    assert float(ns["net"][3].weight.detach().abs().sum()) == 0.0


def test_undo_redo_n_times_bit_identical_api(net, digits):
    """The Python API: every version, visited many times, is exactly what made it."""
    h = History(net, evaluator=digits[1], measure_latency=False)
    outputs = [snapshot(net)]
    for cfg in (nbcompress.PruneConfig(amount=0.3), nbcompress.PruneConfig(amount=0.6)):
        h.apply(cfg, progress=False)
        outputs.append(snapshot(h.current))
        user_training_loop(h.current, digits[0], steps=3)   # the user edits every output
    h.sync()
    outputs.append(snapshot(h.current))
    assert [v.technique for v in h.versions] == ["baseline", "prune", "edited", "prune", "edited"]
    expected = [outputs[0], outputs[1], None, outputs[2], outputs[3]]
    for _ in range(3):
        h.undo(len(h) - 1)
        for k in range(len(h)):
            if expected[k] is not None:
                assert same_as_snapshot(h.current, expected[k]), k
            if k < len(h) - 1:
                h.redo()


def test_reassigned_name_is_a_version_and_the_old_model_stays(sh):
    ns = sh.user_ns
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    first = snapshot(ns["net"])
    ns["net"] = digits_cnn(seed=3)
    sh.run_line_magic("prune", "net 0.3 --no-progress")
    h = _history(sh)
    assert [v.technique for v in h.versions] == ["baseline", "assigned", "prune"]
    sh.run_line_magic("undo", "net 2")
    assert same_as_snapshot(ns["net"], first)


def test_versions_cost_host_memory_and_spill(net, digits, tmp_path):
    h = History(net, evaluator=digits[1], measure_latency=False, host_budget_bytes=0)
    h.apply(nbcompress.PruneConfig(amount=0.5), progress=False)
    assert all(v.where == "disk" and v.record is None for v in h.versions)
    assert h.versions[1].nbytes == sum(t.numel() * t.element_size()
                                       for t in h.current.state_dict().values())
    user_training_loop(h.current, digits[0], steps=2)
    h.undo()                                  # records the edit, then reads version 1 back
    assert len(h) == 3 and h.pos == 1
    h.close()


# ------------------------------------------------------------------------ 2. failed commands
def two_arg_eval(model, loader):
    return 0.5


def test_failed_eval_is_not_remembered(sh):
    sh.user_ns["two_arg_eval"] = two_arg_eval
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    h = _history(sh)
    before = _settings(h)
    w = snapshot(sh.user_ns["net"])
    with pytest.raises(UsageError) as e:
        sh.run_line_magic("prune", "net 0.5 --eval two_arg_eval --no-progress")
    assert "two_arg_eval" in str(e.value) and "\n" not in str(e.value)
    assert _settings(h) == before and same_as_snapshot(sh.user_ns["net"], w) and len(h) == 1
    r = sh.run_line_magic("prune", "net 0.5 --no-progress")           # works, with test_loader
    assert r.after.accuracy is not None
    sh.run_line_magic("compress_history", "net --no-plot")


def test_failed_input_shape_is_not_remembered(sh):
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    h = _history(sh)
    before = _settings(h)
    with pytest.raises(UsageError, match="example input") as e:
        sh.run_line_magic("nbcompress", "net --input-shape 1,3,8,8")
    assert "\n" not in str(e.value)
    assert _settings(h) == before
    r = sh.run_line_magic("prune", "net 0.5 --no-progress")
    assert r.after.flops > 0
    sh.run_line_magic("compress_history", "net --no-plot")


def test_failed_first_command_leaves_no_history(sh):
    with pytest.raises(UsageError):
        sh.run_line_magic("nbcompress", "net --input-shape 1,3,32,32")
    assert _history(sh) is None
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    assert len(_history(sh)) == 1


@pytest.mark.parametrize("flag,value", [("--latency", "deployed"), ("--device", "cpu")])
def test_failed_step_forgets_latency_and_device(sh, flag, value):
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    h = _history(sh)
    before = _settings(h)
    with pytest.raises(UsageError):
        # a valid setting on a command that then fails (3x8x8 input for a 1-channel model)
        sh.run_line_magic("nbcompress", f"net {flag} {value} --input-shape 1,3,8,8")
    assert _settings(h) == before


def test_remembered_setting_that_stops_fitting_says_which(sh):
    ns = sh.user_ns
    sh.run_line_magic("nbcompress", "net --eval test_loader --input-shape 1,1,8,8")
    ns["net"] = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))    # a model for 28x28 input
    with pytest.raises(UsageError) as e:
        sh.run_line_magic("prune", "net 0.5 --no-progress")
    msg = str(e.value)
    assert "--input-shape 1,1,8,8" in msg and "remembered" in msg
    assert "%nbcompress net --input-shape SHAPE" in msg and "\n" not in msg


def test_ctrl_c_in_measuring_keeps_settings(sh, digits):
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    h = _history(sh)
    before = _settings(h)

    def interrupted(model):
        raise KeyboardInterrupt

    sh.user_ns["interrupted"] = interrupted
    with pytest.raises(KeyboardInterrupt):
        sh.run_line_magic("prune", "net 0.5 --eval interrupted --no-progress")
    assert _settings(h) == before and len(h) == 1


# ------------------------------------------------------------------------ 3. evaluators
def says_hello(model):
    return "hello"


def no_accuracy(model):
    return {"loss": 0.3}


def raises_inside(model):
    return {"accuracy": 1 / 0}


@pytest.mark.parametrize("fn,match", [
    (two_arg_eval, r"two_arg_eval\(model, loader\) cannot be called as f\(model\)"),
    (says_hello, r"says_hello returned 'hello' \(str\)"),
    (no_accuracy, r"no_accuracy returned \{'loss': 0.3\}: it has no accuracy key"),
    (lambda m: {"accuracy": "high"}, r"value for 'accuracy' is not a number"),
])
def test_bad_evaluator_is_one_line(sh, fn, match):
    sh.user_ns["ev"] = fn
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    h = _history(sh)
    before, w = _settings(h), snapshot(sh.user_ns["net"])
    for line in ("nbcompress net --eval ev", "prune net 0.5 --eval ev --no-progress"):
        magic, rest = line.split(" ", 1)
        with pytest.raises(UsageError, match=match) as e:
            sh.run_line_magic(magic, rest)
        assert "\n" not in str(e.value)
        assert _settings(h) == before and same_as_snapshot(sh.user_ns["net"], w) and len(h) == 1
    with pytest.raises(BadInput, match=match):               # the API says the same
        nbcompress.measure(sh.user_ns["net"], (1, 1, 8, 8), evaluator=fn)


def test_exception_inside_evaluator_keeps_its_traceback(sh):
    sh.user_ns["raises_inside"] = raises_inside
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    h = _history(sh)
    before = _settings(h)
    with pytest.raises(ZeroDivisionError) as e:
        sh.run_line_magic("prune", "net 0.5 --eval raises_inside --no-progress")
    assert any(f.name == "raises_inside" for f in e.traceback)    # their code, their traceback
    assert _settings(h) == before and len(h) == 1


def test_accuracy_like_keys(net):
    m = nbcompress.measure(net, (1, 1, 8, 8), evaluator=lambda m: {"eval_accuracy": 0.5, "f1": 0.4},
                           latency=False)
    assert m.accuracy == 0.5 and m.eval_extra == {"f1": 0.4}


# ------------------------------------------------------------------------ 4. abbreviations
@pytest.mark.parametrize("magic,line,suggest", [
    ("prune", "net 0.5 --structure", "--structured"),
    ("prune", "net 0.5 --fine x", "--finetune"),
    ("quantize", "net --bit 4", "--bits"),
    ("nbcompress", "net --input 1,1,8,8", "--input-shape"),
    ("lowrank", "net --rat 0.5", "--ratio"),
    ("prune", "net 0.5 --strcutured", "--structured"),
])
def test_abbreviations_refused_with_did_you_mean(sh, magic, line, suggest):
    sh.run_line_magic("nbcompress", "net --eval test_loader")
    h = _history(sh)
    w = snapshot(sh.user_ns["net"])
    with pytest.raises(UsageError) as e:
        sh.run_line_magic(magic, line)
    msg = str(e.value)
    assert f"did you mean {suggest}" in msg and "\n" not in msg, msg
    assert len(h) == 1 and same_as_snapshot(sh.user_ns["net"], w)


# ------------------------------------------------------------------------ fingerprints
def _outputs(net, digits):
    """Every technique's output, as the history holds it (modules made by each technique)."""
    tr, te = digits
    small = torch.utils.data.DataLoader(torch.utils.data.Subset(tr.dataset, range(128)),
                                        batch_size=64)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    return {
        "prune": nbcompress.prune(net, 0.5),
        "prune --structured": nbcompress.prune(net, 0.5, structured=True, round_to=1, evaluator=te),
        "quantize dynamic": nbcompress.quantize(student),
        "quantize static": nbcompress.quantize(net, mode="static", calib=small),
        "quantize uniform": nbcompress.quantize(net, 4, mode="uniform"),
        "quantize cluster": nbcompress.quantize(net, 4, mode="cluster"),
        "quantize binary": nbcompress.quantize(net, mode="binary"),
        "lowrank": nbcompress.lowrank(net, ratio=0.5),
        "distill": nbcompress.distill(student, net, small, epochs=1),
        "earlyexit": nbcompress.early_exit(net, small, exits=["2"], epochs=1),
    }


def test_every_output_has_a_stable_fingerprint(net, digits):
    """A fingerprint that changed by itself would record phantom "edited" versions."""
    from nbcompress.history import state_fingerprint

    for label, m in _outputs(net, digits).items():
        assert state_fingerprint(m) == state_fingerprint(m), label
        h = History(m, measure_latency=False, remember_init=False)
        assert not h.sync(), label
        with torch.no_grad():
            m.eval()(digits[1].dataset[0][0][None])            # a forward is no edit either
        assert not h.sync(), label
        h.close()
