"""Issue 13, item 6, "silent surprises": each is now a one-line refusal or a note.

1. ``%distill s --teacher s`` (a model as its own teacher, or a teacher sharing the student's
   tensors) is bad input, refused before any work, the model unchanged.
2. ``%lowrank`` keeps the classifier (the layer producing the model's output) whole by default
   and says so; ``--layers`` selecting it still factorises it.
3. Dynamic int8 on a CNN says how many convs (and what share of the parameters) stay float32 and
   how to get int8 convs (``--mode static --calib LOADER``).

Each through a real IPython shell and through the Python API.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

import nbcompress
from conftest import same_as_snapshot, snapshot
from nbcompress import BadInput, History, NBCompressError, compress, evaluate
from nbcompress.data import reference_cnn
from nbcompress.techniques.distill import DistillConfig, mlp_student
from nbcompress.techniques.lowrank import LowRankConfig, output_layers
from nbcompress.techniques.quantize import QuantizeConfig


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, text
    return text


def _workspace(shell):
    return getattr(shell, "_nbcompress_workspace", None)


# ------------------------------------------------------------------ 1. a model as its own teacher
def test_magic_refuses_the_student_as_its_own_teacher(shell, trained_lenet, mnist):
    ns = shell.user_ns
    ns.update(s=trained_lenet, train_loader=mnist[0])
    snap = snapshot(trained_lenet)
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("distill", "s --teacher s --data train_loader")
    msg = _one_line(e.value)
    assert msg.startswith("the teacher is the student itself (s)") and "--teacher s@0" in msg
    assert ns["s"] is trained_lenet and same_as_snapshot(trained_lenet, snap)
    ws = _workspace(shell)
    assert ws is None or ws.get("s") is None          # refused before any work: no history made
    # in an ensemble too
    ns["other"] = mlp_student(hidden=(16,), seed=0)
    with pytest.raises(UsageError, match="the teacher is the student itself"):
        shell.run_line_magic("distill", "s --teacher other,s --data train_loader")
    assert ns["s"] is trained_lenet and same_as_snapshot(trained_lenet, snap)


def test_magic_refuses_a_teacher_sharing_the_students_tensors(shell, trained_lenet, mnist):
    ns = shell.user_ns
    wrapper = nn.Sequential(trained_lenet, nn.Identity())      # the student inside the teacher
    ns.update(s=trained_lenet, big=wrapper, train_loader=mnist[0])
    snap = snapshot(trained_lenet)
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("distill", "s --teacher big --data train_loader")
    msg = _one_line(e.value)
    assert "the teacher big shares 6 parameter tensors with s (e.g. 0.fc1.weight)" in msg
    # one tied tensor is enough
    half = copy.deepcopy(trained_lenet)
    half.fc3.weight = trained_lenet.fc3.weight
    ns["half"] = half
    with pytest.raises(UsageError,
                       match=r"shares 1 parameter tensor with s \(e\.g\. fc3\.weight\)"):
        shell.run_line_magic("distill", "s --teacher half --data train_loader")
    assert ns["s"] is trained_lenet and same_as_snapshot(trained_lenet, snap)


def test_magic_refuses_the_current_version_as_teacher(shell, trained_lenet, mnist):
    ns = shell.user_ns
    ns.update(s=trained_lenet, train_loader=mnist[0])
    shell.run_line_magic("nbcompress", "s")
    snap = snapshot(ns["s"])
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("distill", "s --teacher s@0 --data train_loader")
    msg = _one_line(e.value)
    assert msg.startswith("--teacher s@0 is the student s itself (the current version")
    assert same_as_snapshot(ns["s"], snap)
    shell.run_line_magic("prune", "s 0.5 --no-progress")
    pruned = ns["s"]
    snap = snapshot(pruned)
    with pytest.raises(UsageError, match=r"--teacher s@1 is the student s itself .*s@0\.\.s@0"):
        shell.run_line_magic("distill", "s --teacher s@1 --data train_loader")
    with pytest.raises(UsageError, match=r"--teacher s@0: s as first registered"):
        shell.run_line_magic("distill", "s --teacher s --data train_loader")
    assert ns["s"] is pruned and same_as_snapshot(pruned, snap)
    assert len(_workspace(shell).get("s")) == 2                 # no version added


def test_strict_mode_raises_the_refusal(shell, trained_lenet, mnist, monkeypatch):
    shell.user_ns.update(s=trained_lenet, train_loader=mnist[0])
    monkeypatch.setenv("NBCOMPRESS_STRICT", "1")
    with pytest.raises(NBCompressError, match="the teacher is the student itself"):
        shell.run_line_magic("distill", "s --teacher s --data train_loader")
    assert shell.user_ns["s"] is trained_lenet


def test_api_refuses_the_student_as_its_own_teacher(trained_lenet, mnist):
    snap = snapshot(trained_lenet)
    with pytest.raises(BadInput) as e:
        nbcompress.distill(trained_lenet, trained_lenet, mnist[0], epochs=1, progress=False)
    assert _one_line(e.value).startswith("the teacher is the student itself:")
    with pytest.raises(BadInput, match="teacher 2 shares 6 parameter tensors with the student"):
        nbcompress.distill(trained_lenet, [mlp_student(seed=0), nn.Sequential(trained_lenet)],
                           mnist[0], epochs=1, progress=False)
    with pytest.raises(BadInput, match="the teacher is the student itself"):
        DistillConfig(teachers=trained_lenet, loader=mnist[0]).validate(trained_lenet)
    assert same_as_snapshot(trained_lenet, snap)
    # a separate copy is another model: accepted by validation
    DistillConfig(teachers=copy.deepcopy(trained_lenet), loader=mnist[0]).validate(trained_lenet)


def test_api_teacher_version_of_the_current_version_is_refused(trained_lenet, mnist):
    h = History(trained_lenet, measure_latency=False)
    snap = snapshot(trained_lenet)
    with pytest.raises(BadInput) as e:
        h.apply(DistillConfig(teacher_version=0, loader=mnist[0], epochs=1), progress=False)
    assert _one_line(e.value).startswith("teacher_version 0 is model's current version, the "
                                         "student itself")
    assert len(h) == 1 and h.pos == 0 and same_as_snapshot(h.current, snap)


# ------------------------------------------------------------- 2. lowrank keeps the classifier
def _rank(w: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(w.detach().double()))


def test_lowrank_keeps_the_classifier_whole_by_default(trained_lenet, mnist):
    x = torch.randn(1, 1, 28, 28)
    res = compress(trained_lenet, LowRankConfig(ratio=0.5), example_input=x)
    fc3 = res.model.fc3
    assert type(fc3) is nn.Linear and _rank(fc3.weight) == 10
    assert torch.equal(fc3.weight, trained_lenet.fc3.weight)
    assert {r["layer"] for r in res.layers} == {"fc1", "fc2"}
    note = [n for n in res.notes if n.startswith("kept the classifier fc3 whole")]
    assert note and "1,010 parameters" in note[0]
    assert "use layers to include it (layers='.' selects every layer)" in note[0]   # Python spelling
    # without an example input (nor a loader) the last layer is taken as the classifier: the same
    same = compress(trained_lenet, LowRankConfig(ratio=0.5))
    assert type(same.model.fc3) is nn.Linear
    # selected explicitly, it is factorised (rank 5 of 10)
    sel = compress(trained_lenet, LowRankConfig(ratio=0.5, layers="fc"), example_input=x)
    assert isinstance(sel.model.fc3, nn.Sequential)
    assert sel.model.fc3[0].weight.shape == (5, 100) and sel.model.fc3[1].weight.shape == (10, 5)
    assert not any("classifier" in n for n in sel.notes)
    # and keeping it costs no accuracy here, while rank 5 of 10 class scores does
    test = mnist[1]
    assert evaluate(res.model, test) >= evaluate(sel.model, test)


def test_lowrank_magic_keeps_the_classifier_and_layers_selects_it(shell, trained_lenet, mnist):
    ns = shell.user_ns
    ns.update(model=trained_lenet, test_loader=mnist[1])
    r = shell.run_line_magic("lowrank", "model --ratio 0.5 --eval test_loader --no-progress")
    assert type(ns["model"].fc3) is nn.Linear and _rank(ns["model"].fc3.weight) == 10
    assert isinstance(ns["model"].fc1, nn.Sequential)
    assert "kept the classifier fc3 whole" in repr(r)
    shell.run_line_magic("undo", "model")
    r = shell.run_line_magic("lowrank", "model --ratio 0.5 --layers . --no-progress")
    assert isinstance(ns["model"].fc3, nn.Sequential)
    assert "fc3" in {x["layer"] for x in r.result.layers}
    assert "kept the classifier" not in repr(r)


def test_lowrank_classifier_only_model_is_refused_in_one_line(shell):
    torch.manual_seed(0)
    logreg = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    shell.user_ns["logreg"] = logreg
    snap = snapshot(logreg)
    with pytest.raises(UsageError) as e:
        shell.run_line_magic("lowrank", "logreg --rank 2")
    msg = _one_line(e.value)
    assert msg.startswith("the only layer to factorise is the classifier 1") and "--layers" in msg
    assert shell.user_ns["logreg"] is logreg and same_as_snapshot(logreg, snap)
    with pytest.raises(BadInput, match="the only layer to factorise is the classifier 1"):
        nbcompress.lowrank(logreg, rank=2)
    assert isinstance(nbcompress.lowrank(logreg, rank=2, layers=".")[1], nn.Sequential)
    assert same_as_snapshot(logreg, snap)


def test_output_layers_finds_returned_tensors_not_reused_ids():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.a = nn.Linear(8, 3)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            h = self.body(x)
            return self.a(h), {"logits": self.b(h)}

    class Summed(nn.Module):          # the returned tensor is a sum: no layer's output as it is
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.dec = nn.Linear(8, 8)
            self.head = nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self.dec(self.enc(x))) + x

    m = TwoHeads()
    layers = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert output_layers(m, layers, (torch.randn(2, 8),)) == {"a"}   # dict values one level down
    s = Summed()
    layers = [(n, mod) for n, mod in s.named_modules() if isinstance(mod, nn.Linear)]
    for _ in range(5):           # a freed output's id reused by the sum must not name ``dec``
        assert output_layers(s, layers, torch.randn(2, 8)) == {"head"}
    assert output_layers(s, layers, None) == {"head"}


# ----------------------------------------------------------- 3. dynamic int8 leaves convs float
def test_dynamic_int8_on_a_cnn_says_the_convs_stay_float(shell):
    cnn = reference_cnn(width=8, seed=0).eval()
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    share = sum(p.numel() for m in convs for p in m.parameters()) / sum(
        p.numel() for p in cnn.parameters())
    for cfg in (QuantizeConfig(), QuantizeConfig(mode="dynamic")):
        res = compress(cnn, cfg)
        note = [n for n in res.notes if "stay float32" in n]
        assert len(note) == 1, res.notes
        assert note[0].startswith(f"{len(convs)} conv layers ({100 * share:.3g}% of the "
                                  f"parameters) stay float32")
        assert "mode='static' calib=LOADER" in note[0]          # Python spelling from compress
        assert res.extra["float_convs"] == len(convs) == 6
        assert res.extra["float_conv_share"] == pytest.approx(share)
        assert all(type(res.model.get_submodule(n)) is nn.Conv2d
                   for n, m in cnn.named_modules() if isinstance(m, nn.Conv2d))
    # the magic shows it
    shell.user_ns["cnn"] = cnn
    r = shell.run_line_magic("quantize", "cnn --no-progress")
    assert "6 conv layers" in repr(r) and "--mode static --calib LOADER" in repr(r)
    # convs left out by --layers, or a model without convs: nothing to say
    res = compress(cnn, QuantizeConfig(mode="dynamic", layers="fc"))
    assert not any("float32" in n for n in res.notes) and "float_convs" not in res.extra


def test_dynamic_int8_on_convs_only_is_still_refused(shell):
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    shell.user_ns["convs"] = convs
    snap = snapshot(convs)
    with pytest.raises(UsageError, match="--calib LOADER") as e:
        shell.run_line_magic("quantize", "convs")
    _one_line(e.value)
    with pytest.raises(UsageError, match="no quantizable layer for --mode dynamic"):
        shell.run_line_magic("quantize", "convs --mode dynamic")
    with pytest.raises(BadInput, match=r"add calib=LOADER \(static int8\), or use mode='uniform'"):
        nbcompress.quantize(convs)
    assert shell.user_ns["convs"] is convs and same_as_snapshot(convs, snap)


# ----------------------------------------------------------- a step never hands back a broken model
class _ReadsWeights(nn.Module):
    """A user's model whose forward reads a layer's own parameters (``fc2.parameters()``): a
    replacement cannot keep them (an int8 kernel has none, a factorised pair has two weights),
    so replacing that layer breaks the model. (A model reading ``fc2.weight`` keeps working:
    replaced layers keep ``.weight``, tests/test_real_layers.py.)"""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        w, b = self.fc2.parameters()
        return torch.nn.functional.linear(h, w, b)


@pytest.mark.parametrize("config", [QuantizeConfig(mode="dynamic"),
                                    LowRankConfig(rank=4, layers=".")],
                         ids=["int8", "lowrank"])
def test_a_step_that_breaks_the_model_is_refused(shell, config):
    m = _ReadsWeights()
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(BadInput, match=r"would hand back a model that no longer runs on the "
                                       r"example input .*leave that layer out with layers$"):
        compress(m, config, example_input=x)
    # without a layer the model reads itself, the step goes through
    ok = compress(m, dataclasses.replace(config, layers="fc1"), example_input=x)
    assert ok.model(x).shape == (1, 10)
    # from the magic: one line, flag spelling, nothing recorded, the name still the model
    shell.user_ns["net"] = m
    shell.run_line_magic("nbcompress", "net --input-shape 1,1,8,8")
    line = "net --mode dynamic" if isinstance(config, QuantizeConfig) else "net --rank 4 --layers ."
    with pytest.raises(UsageError, match=r"leave that layer out with --layers$"):
        shell.run_line_magic(config.technique, line)
    assert shell.user_ns["net"] is m and len(shell._nbcompress_workspace.get("net")) == 1
