"""Issue 13, "Done when": a bad-input matrix. Every magic x its wrong arguments, through a real
IPython shell, on a user's BatchNorm CNN for scikit-learn's 8x8 digits that already has a history
(``%nbcompress net --eval test_loader`` then ``%prune net 0.3``: two versions, undo possible).

For each wrong line: the error is a plain ``UsageError`` (no traceback in IPython) whose message is
one line saying what is wrong; the user's variables are the same objects with the same weights
(the student, the teacher, a model with no history); the name's settings, versions (the same
Version objects, records and metrics), position and initial weights are unchanged; no history was
made or dropped. In strict mode (``NBCOMPRESS_STRICT=1``) the same line is an ``NBCompressError``
with the same message.

Cases marked ``xfail(strict=True, reason="BUG: ...")`` are wrong lines that still escape as a
traceback or a multi-line message: visible here until they are fixed (then they XPASS and fail,
and the mark goes).
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from nbcompress.core import NBCompressError
from nbcompress.data import digits_loaders

from conftest import Unlabelled, digits_cnn, same_as_snapshot, snapshot

MODELS = ("net", "teacher", "other")     # every model in the notebook: none may change
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# ------------------------------------------------------------------------ evaluators of a user
def two_arg_eval(model, loader):
    return 0.5


def says_hello(model):
    return "hello"


def no_accuracy(model):
    return {"loss": 0.3}


def says_true(model):
    return True


def matrix_eval(model):
    return torch.zeros(3, 3)


def matrix_in_dict(model):
    return {"accuracy": 0.5, "f1": torch.zeros(3, 3)}


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, x):
        self.x = x

    def __iter__(self):
        return iter((v, 0) for v in self.x)


# ------------------------------------------------------------------------ fixtures (module: once)
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny batch-1 forwards (latency, FLOPs) on a busy 2-core machine: one intra-op thread is
    ~10x faster than two fighting over the cores. Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    train, test = digits_loaders(batch_size=64)
    g = torch.Generator().manual_seed(0)
    x_tr = torch.stack([train.dataset[i][0] for i in range(64)])
    return dict(
        train_loader=DataLoader(Subset(train.dataset, range(256)), batch_size=64),
        test_loader=DataLoader(Subset(test.dataset, range(128)), batch_size=64),   # small: fast
        # a loader of colour images: 3 channels where the model takes 1
        wrong_channels_loader=DataLoader(TensorDataset(torch.randn(64, 3, 8, 8, generator=g),
                                                       torch.randint(0, 10, (64,), generator=g)),
                                         batch_size=32),
        unlabelled_loader=DataLoader(Unlabelled(x_tr), batch_size=32),
        empty_loader=DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8),
                                              torch.zeros(0, dtype=torch.long)), batch_size=32),
        # a stream: no length, no index, cannot be split between processes
        stream_loader=DataLoader(_Stream(x_tr), batch_size=32),
        # labels 50..59 for a 10-class model
        bad_labels_loader=DataLoader(TensorDataset(x_tr, torch.randint(50, 60, (64,), generator=g)),
                                     batch_size=32),
    )


@pytest.fixture(scope="module")
def _models(data):
    net = digits_cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net.train()
    for _ in range(3):
        for x, y in data["train_loader"]:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    return dict(net=net, teacher=digits_cnn(seed=1).eval(), other=digits_cnn(seed=2).eval(),
                big_teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 100)))


@pytest.fixture
def sh(shell, data, _models):
    """``net`` registered and pruned once (versions: baseline, prune; at version 1), a teacher,
    a model with no history, loaders good and bad, and things that are not models or evaluators."""
    ns = shell.user_ns
    ns.update({k: copy.deepcopy(m) for k, m in _models.items()})
    ns.update(data)
    ns.update(not_a_loader=[1, 2, 3], number=5, text="abc", two_arg_eval=two_arg_eval,
              says_hello=says_hello, no_accuracy=no_accuracy, says_true=says_true,
              matrix_eval=matrix_eval, matrix_in_dict=matrix_in_dict)
    shell.run_line_magic("nbcompress", "net --eval test_loader")
    shell.run_line_magic("prune", "net 0.3 --no-progress")
    h = shell._nbcompress_workspace.get("net")
    assert [v.technique for v in h.versions] == ["baseline", "prune"] and h.pos == 1
    return shell


# ------------------------------------------------------------------------ state before / after
def _settings(h):
    return (h.evaluator, h.example_input, h.device, h.latency_mode, dict(h._sources))


def _state(sh) -> dict:
    ns, ws = sh.user_ns, sh._nbcompress_workspace
    h = ws.get("net")
    return dict(
        objects={k: ns[k] for k in MODELS}, weights={k: snapshot(ns[k]) for k in MODELS},
        histories=dict(ws.histories), settings=_settings(h), init_state=h.init_state,
        versions=list(h.versions), techniques=[v.technique for v in h.versions],
        records=[v.record for v in h.versions], metrics=[v.metrics for v in h.versions],
        pos=h.pos, live=h.live)


def _assert_unchanged(sh, before: dict) -> None:
    ns, ws = sh.user_ns, sh._nbcompress_workspace
    for k in MODELS:
        assert ns[k] is before["objects"][k], f"{k} was rebound"
        assert same_as_snapshot(ns[k], before["weights"][k]), f"{k}'s weights changed"
    assert ws.histories.keys() == before["histories"].keys(), "a history was made or dropped"
    assert all(ws.histories[k] is h for k, h in before["histories"].items())
    h = ws.get("net")
    assert _settings(h) == before["settings"], "settings changed"
    now, then = h.init_state, before["init_state"]      # (version 0's record, read as a dict)
    assert (now is None) == (then is None) and (now is None or (
        now.keys() == then.keys() and all(now[k] is then[k] for k in now))), \
        "initial weights changed"
    assert [v.technique for v in h.versions] == before["techniques"]
    assert len(h.versions) == len(before["versions"]) and all(
        a is b for a, b in zip(h.versions, before["versions"])), "versions changed"
    assert all(v.record is r for v, r in zip(h.versions, before["records"])), "a record changed"
    assert all(v.metrics is m for v, m in zip(h.versions, before["metrics"])), "metrics changed"
    assert h.pos == before["pos"] and h.live is before["live"] is ns["net"], "position changed"


def _run_bad(sh, line: str) -> BaseException:
    magic, _, rest = line.partition(" ")
    with pytest.raises(BaseException) as e:
        sh.run_line_magic(magic, rest)
    return e.value


# ------------------------------------------------------------------------ the matrix
def case(line: str, match: str, *, pre: tuple = (), bug: str | None = None, marks=()):
    marks = list(marks) + ([pytest.mark.xfail(strict=True, reason=f"BUG: {bug}")] if bug else [])
    return pytest.param(line, match, pre, id=line, marks=marks)


NOT_A_MODULE = r"^number is a int, not a torch\.nn\.Module$"
NO_ATTR = r"^name: net has no attribute 'nothing'$"
NO_VAR = r"^name: no variable named 'missing_name' in the notebook$"
TWO_ARGS = (r"^--eval two_arg_eval: evaluator two_arg_eval\(model, loader\) cannot be called as "
            r"f\(model\): an evaluator takes the model as its only argument")
HELLO = r"^evaluator says_hello returned 'hello' \(str\); an evaluator returns a number"
CUDA = r"^device 'cuda' asked for, but CUDA is not available here$"
BANANA = r"^unknown device 'banana' \(use cpu, cuda or cuda:N\)$"
QUOTE = r"(?i)quot"          # what a fix should say: the line has an unclosed quote
SEED = r"--seed"             # what a fix should say: the seed is out of range
OVERFLOW = "99999999999999999999999"

CASES = [
    # ---- %nbcompress
    case("nbcompress", r"^the following arguments are required: name$"),
    case("nbcompress missing_name --eval test_loader", NO_VAR),
    case("nbcompress number", NOT_A_MODULE),
    case("nbcompress net.nothing", NO_ATTR),
    case("nbcompress 3net", r"^name must be a variable name \(optionally dotted.*got '3net'$"),
    case("nbcompress net --eval missing_name", r"^--eval: no variable named 'missing_name'"),
    case("nbcompress net --eval number",
         r"^--eval number is a int: give a DataLoader or a callable"),
    case("nbcompress net --eval text", r"^--eval text is a str: give a DataLoader or a callable"),
    case("nbcompress net --eval two_arg_eval", TWO_ARGS),
    case("nbcompress net --eval says_hello", HELLO),
    case("nbcompress net --eval no_accuracy",
         r"^evaluator no_accuracy returned \{'loss': 0\.3\}: it has no accuracy key"),
    case("nbcompress net --eval says_true", r"^evaluator says_true returned True \(bool\)"),
    case("nbcompress net --eval matrix_eval", r"^evaluator matrix_eval returned .*not a number|"
         r"^evaluator matrix_eval returned .*\(Tensor\)"),
    case("nbcompress net --eval matrix_in_dict",
         r"^evaluator matrix_in_dict returned .*'f1'.*not a number"),
    case("nbcompress net --eval wrong_channels_loader",
         r"^could not run the model on the example input \(shape \(1, 3, 8, 8\)\).*to have 1 "
         r"channels, but got 3 channels"),
    case("nbcompress net --eval unlabelled_loader",
         r"^the evaluation loader yields no labels: accuracy needs \(inputs, labels\) batches$"),
    case("nbcompress net --input-shape 1,1,8,8 --eval empty_loader",
         r"^the evaluation loader yielded no samples$"),
    case("nbcompress net --eval empty_loader", r"(?i)no (batches|samples)|empty"),
    case("nbcompress net --input-shape garbage",
         r"^--input-shape must be positive integers separated by commas, like 1,1,28,28; got "
         r"'garbage'$"),
    case("nbcompress net --input-shape 0,1,8,8", r"^--input-shape must be positive integers.*got "
         r"'0,1,8,8'$"),
    case("nbcompress net --input-shape 1,1,8,8,", r"^--input-shape must be positive integers.*got "
         r"'1,1,8,8,'$"),
    case("nbcompress net --input-shape 1,3,8,8",
         r"^could not run the model on the example input \(shape \(1, 3, 8, 8\)\): RuntimeError: "
         r".*expected input\[1, 3, 8, 8\] to have 1 channels, but got 3 channels instead$"),
    case("nbcompress net --remember-init --input-shape 1,1,8",
         r"^could not run the model on the example input \(shape \(1, 1, 8\)\): ValueError: "
         r"expected 4D input \(got 3D input\)$"),
    case("nbcompress net --latency turbo",
         r"^--latency must be one of eager, channels_last, deployed, onnxruntime; got 'turbo'$"),
    case("nbcompress net --latency deployed --eval says_hello", HELLO),
    case("nbcompress net --device cuda", CUDA, marks=[NO_CUDA]),
    case("nbcompress net --device banana", BANANA),
    case("nbcompress net --bogus",
         r"^unknown option --bogus: %nbcompress\? lists every option \(options are never "
         r"abbreviated\)$"),
    case("nbcompress net --inp 1,1,8,8", r"^unknown option --inp: did you mean --input-shape\? "
         r"\(options are never abbreviated\)$"),
    case('nbcompress net --eval "test_loader', QUOTE),

    # ---- --processes / --launcher (every technique's training; declared once on StepConfig)
    case("prune net 0.5 --finetune train_loader --processes 0",
         r"^--processes must be a whole number >= 1, got 0$"),
    case("prune net 0.5 --processes 2",
         r"^--processes only applies with --finetune: the processes train, and this step does "
         r"not$"),
    case("prune net 0.5 --finetune train_loader --processes 64",
         r"^64 processes asked for, but this machine has \d+ CPU cores? \(each process trains "
         r"on one\)$"),
    case("prune net 0.5 --finetune stream_loader --processes 2",
         r"^--finetune reads an IterableDataset, which cannot be split between processes"),
    case("prune net 0.5 --finetune train_loader --processes 2 --launcher mpi",
         r"^--launcher must be one of none, accelerate, got 'mpi'$"),
    case("quantize net --mode binary --processes 2",
         r"^--processes only applies with --qat"),
    case("lowrank net --launcher accelerate", r"^--launcher only applies with --finetune"),
    case("distill other --teacher teacher --data train_loader --processes two",
         r"^--processes must be a whole number, got 'two'$"),
    case("earlyexit net --data stream_loader --exits 2 --processes 2",
         r"^--data reads an IterableDataset"),

    # ---- %prune
    case("prune number 0.5", NOT_A_MODULE),
    case("prune net.nothing 0.5", NO_ATTR),
    case("prune net.training 0.5", r"^net\.training is a bool, not a torch\.nn\.Module$"),
    case("prune net", r"^give AMOUNT \(the fraction to remove, e\.g\. 0\.5\), --target-flops F or "
         r"--target-params P$"),
    case("prune net 0", r"^AMOUNT must be a fraction in \(0, 1\) \(0\.5 or 50%\), got 0\.0$"),
    case("prune net 1.5", r"^AMOUNT must be a fraction in \(0, 1\) .* got 1\.5$"),
    case("prune net -0.1", r"^AMOUNT must be a fraction in \(0, 1\) .* got -0\.1$"),
    case("prune net 150%", r"^AMOUNT must be a fraction in \(0, 1\) .* got 1\.5$"),
    case("prune net nan", r"^AMOUNT must be a fraction in \(0, 1\) .* got nan$"),
    case("prune net abc", r"^AMOUNT must be a number between 0 and 1 \(or a percentage like "
         r"50%\), got 'abc'$"),
    case("prune net 0.5 extra_arg", r"^unrecognized arguments: extra_arg$"),
    case("prune net 0.5 --importance bogus", r"^--importance must be one of l1, l2, taylor, "
         r"hessian, activation, bn, random, got 'bogus'$"),
    case("prune net 0.5 --importance bn",
         r"^--importance bn ranks channels: use it with --structured$"),
    case("prune net 0.5 --structured --importance taylor",
         r"^--importance taylor measures on data: give --data LOADER \(or --finetune LOADER\)$"),
    case("prune net 0.5 --scope bogus", r"^--scope must be one of global, layer, got 'bogus'$"),
    case("prune net 0.5 --layers nomatch_xyz",
         r"^--layers 'nomatch_xyz' matches no Linear/Conv layer \(layers: 0, 3, 8\)$"),
    case("prune net 0.5 --layers (",
         r"^--layers '\(' is not a valid regular expression: missing \)"),
    case("prune net 0.5 --structured --layers ^8$",
         r"^no channels to prune: every Linear/Conv layer feeds the output or is outside --layers"),
    case("prune net 0.5 --steps 0", r"^--steps must be a whole number >= 1, got 0$"),
    case("prune net 0.5 --steps 1.5", r"^--steps must be a whole number, got '1\.5'$"),
    case("prune net 0.5 --epochs 3", r"^--epochs only applies with --finetune: give --finetune "
         r"too \(or leave out --epochs\)$"),
    case("prune net 0.5 --finetune not_a_loader",
         r"^--finetune not_a_loader is a list, not a torch DataLoader$"),
    case("prune net 0.5 --finetune missing_name",
         r"^--finetune: no variable named 'missing_name' in the notebook$"),
    case("prune net 0.5 --finetune wrong_channels_loader",
         r"^the model cannot run on a batch of --finetune \(inputs of shape \(32, 3, 8, 8\)\): "
         r"RuntimeError: .*; is it the data this model takes\?$"),
    case("prune net 0.5 --finetune unlabelled_loader",
         r"^the training loader yields no labels; pass loss_fn\(model, batch\)"),
    case("prune net 0.5 --finetune empty_loader", r"^--finetune yielded no batches$"),
    case("prune net 0.5 --finetune bad_labels_loader",
         r"^--finetune has label 5\d, but the model scores 10 classes \(labels 0\.\.9\)"),
    case("prune net 0.5 --finetune train_loader --lr nan",
         r"^--lr must be a number > 0, got nan$"),
    case("prune net 0.5 --lr -1", r"^--lr must be a number > 0, got -1\.0$"),
    case("prune net 0.5 --sparsity-reg -1", r"^--sparsity-reg must be a number >= 0, got -1\.0$"),
    case("prune net 0.5 --data not_a_loader",
         r"^--data not_a_loader is a list, not a torch DataLoader$"),
    case("prune net 0.5 --structured --importance taylor --data wrong_channels_loader",
         r"^the model cannot run on a batch of --data \(inputs of shape \(32, 3, 8, 8\)\)"),
    case("prune net --target-flops 2", r"^--target-flops must be a fraction in \(0, 1\) "
         r"\(0\.5 or 50%\), got 2\.0$"),
    case("prune net 0.5 --target-flops 0.5", r"^give AMOUNT or --target-flops, not both$"),
    case("prune net --target-flops 0.5 --target-params 0.5",
         r"^give --target-flops or --target-params, not both$"),
    case("prune net --target-flops 0.0001 --structured",
         r"^--target-flops cannot be reached: removing as many channels as possible keeps "
         r"[\d.]+% of the flops$"),
    case("prune net 0.5 --structured --round-to 0", r"^--round-to must be a whole number >= 1, "
         r"got 0$"),
    case("prune net 0.5 --lottery", r"^--lottery retrains the ticket after every round: give "
         r"--finetune LOADER \(and --epochs\)$"),
    case("prune net 0.5 --sensitivity",
         r"^--sensitivity scans its own amounts \(--amounts\): leave out AMOUNT$"),
    case("prune net --sensitivity --amounts 0.1,abc",
         r"^--amounts must be a number between 0 and 1 .*got 'abc'$"),
    case("prune net 0.5 --amounts 0.1", r"^--amounts only applies with --sensitivity: give "
         r"--sensitivity too \(or leave out --amounts\)$"),
    case("prune net 0.5 --structure", r"^unknown option --structure: did you mean --structured\? "
         r"\(options are never abbreviated\)$"),
    case("prune net 0.5 --fine train_loader", r"^unknown option --fine: did you mean --finetune\?"),
    case("prune net 0.5 --eval", r"^argument --eval: expected one argument$"),
    case("prune net 0.5 --eval not_a_loader",
         r"^--eval not_a_loader is a list: give a DataLoader or a callable"),
    case("prune net 0.5 --eval two_arg_eval", TWO_ARGS),
    case("prune net 0.5 --eval says_hello", HELLO),
    case("prune other 0.5 --eval says_hello", HELLO),
    case("prune net 0.5 --eval no_accuracy", r"^evaluator no_accuracy returned .* no accuracy key"),
    case("prune net 0.5 --eval empty_loader", r"(?i)no (batches|samples)|empty"),
    case("prune net 0.5 --device cuda", CUDA, marks=[NO_CUDA]),
    case("prune net 0.5 --device banana", BANANA),
    case('prune net 0.5 --layers "unclosed', QUOTE),
    case(f"prune net 0.5 --importance random --seed {OVERFLOW}", SEED),
    case(f"prune net 0.5 --finetune train_loader --seed {OVERFLOW}", SEED),

    # ---- %quantize
    case("quantize number", NOT_A_MODULE),
    case("quantize net --bits 0", r"^--bits must be a whole number in \[1, 8\], got 0$"),
    case("quantize net --bits 33", r"^--bits must be a whole number in \[1, 8\], got 33$"),
    case("quantize net --bits abc", r"^--bits must be a whole number, got 'abc'$"),
    case("quantize net --mode bogus",
         r"^--mode must be one of dynamic, static, uniform, cluster, binary, got 'bogus'$"),
    case("quantize net --mode static",
         r"^--mode static needs calibration data: add --calib LOADER"),
    case("quantize net --mode static --calib not_a_loader",
         r"^--calib not_a_loader is a list, not a torch DataLoader$"),
    case("quantize net --mode static --calib missing_name",
         r"^--calib: no variable named 'missing_name' in the notebook$"),
    case("quantize net --mode static --calib wrong_channels_loader",
         r"^the model cannot run on a batch of --calib \(inputs of shape \(32, 3, 8, 8\)\)"),
    case("quantize net --mode static --calib empty_loader", r"^--calib yielded no batches$"),
    case("quantize net --calib-batches 0 --mode static --calib train_loader",
         r"^--calib-batches must be a whole number >= 1, got 0$"),
    case("quantize net --mode uniform --bits 4 --calib train_loader",
         r"^--calib sets activation ranges for static int8; it does not apply to --mode uniform$"),
    case("quantize net --mode uniform --bits 4 --qat not_a_loader",
         r"^--qat not_a_loader is a list, not a torch DataLoader$"),
    case("quantize net --mode dynamic --qat train_loader",
         r"^--qat trains --mode uniform, cluster or binary; int8 kernels"),
    case("quantize net --mode uniform --bits 4 --qat wrong_channels_loader",
         r"^the model cannot run on a batch of --qat \(inputs of shape \(32, 3, 8, 8\)\)"),
    case("quantize net --mode uniform --bits 4 --qat unlabelled_loader",
         r"^the training loader yields no labels"),
    case("quantize net --mode uniform --bits 4 --qat empty_loader", r"^--qat yielded no batches$"),
    case("quantize net --mode uniform --bits 4 --qat bad_labels_loader",
         r"^--qat has label 5\d, but the model scores 10 classes"),
    case("quantize net --mode uniform --bits 4 --qat train_loader --epochs 0",
         r"^--epochs must be a whole number >= 1, got 0$"),
    case("quantize net --mode uniform --bits 4 --qat train_loader --lr nan",
         r"^--lr must be a number > 0, got nan$"),
    case("quantize net --epochs 2",
         r"^--epochs only applies with --qat: give --qat too \(or leave out --epochs\)$"),
    case("quantize net --dtype bogus",
         r"^--dtype must be one of fp16, float16, half, bf16, bfloat16, got 'bogus'$"),
    case("quantize net --dtype fp16 --bits 4",
         r"^give --dtype or --bits, not both$"),
    case("quantize net --dtype bf16 --per-channel", r"^give --dtype or --per-channel, not both$"),
    case("quantize net --mode binary --bits 4",
         r"^--mode binary stores 1 bit per weight; got --bits 4$"),
    case("quantize net --mode cluster --per-channel",
         r"^--per-channel does not apply to --mode cluster \(one codebook per layer\)$"),
    case("quantize net --mode dynamic --asymmetric", r"^--asymmetric applies to --mode uniform"),
    case("quantize net --mode uniform --bits 4 --layers nomatch_xyz",
         r"^--layers 'nomatch_xyz' matches none of the quantizable layers: 0, 3, 8$"),
    case("quantize net --mode uniform --bits 4 --layers (",
         r"^--layers '\(' is not a valid regular expression: missing \)"),
    case("quantize net --bit 4", r"^unknown option --bit: did you mean --bits\?"),
    case("quantize net --mode uniform --bits 4 --eval two_arg_eval", TWO_ARGS),
    case("quantize net --mode uniform --bits 4 --eval says_hello", HELLO),
    case('quantize net --layers "abc', QUOTE),
    case(f"quantize net --mode uniform --bits 4 --qat train_loader --seed {OVERFLOW}", SEED),

    # ---- %lowrank
    case("lowrank net.nothing", NO_ATTR),
    case("lowrank number", NOT_A_MODULE),
    case("lowrank net --rank 0", r"^--rank must be a whole number >= 1, got 0$"),
    case("lowrank net --rank 1000", r"^--rank 1000 is above the full rank of every selected layer"),
    case("lowrank net --ratio 2", r"^--ratio must be a number in \(0, 1\], got 2\.0$"),
    case("lowrank net --ratio nan", r"^--ratio must be a number in \(0, 1\], got nan$"),
    case("lowrank net --energy 2", r"^--energy must be a number in \(0, 1\], got 2\.0$"),
    case("lowrank net --rank 2 --ratio 0.5", r"^give --rank or --ratio, not both$"),
    case("lowrank net --target-params abc",
         r"^--target-params must be a parameter count \(80000\), a fraction of the current "
         r"count \(0\.33\) or N times fewer \(3x\); got 'abc'$"),
    case("lowrank net --target-params -3", r"^--target-params must be positive, got '-3'$"),
    case("lowrank net --target-params 10", r"^--target-params 10 \(10\) cannot be reached: rank 1 "
         r"in every selected layer still leaves [\d,]+ parameters$"),
    case("lowrank net --conv bogus", r"^--conv must be one of svd, tucker, separable, none, "
         r"got 'bogus'$"),
    case("lowrank net --layers nomatch_xyz",
         r"^--layers 'nomatch_xyz' matches no Linear/Conv2d layer \(the layers are: 0, 3, 8\)$"),
    case("lowrank net --layers (", r"^--layers '\(' is not a valid regular expression"),
    case("lowrank net --finetune not_a_loader",
         r"^--finetune not_a_loader is a list, not a torch DataLoader$"),
    case("lowrank net --finetune wrong_channels_loader",
         r"^the model cannot run on a batch of --finetune \(inputs of shape \(32, 3, 8, 8\)\)"),
    case("lowrank net --finetune unlabelled_loader", r"^the training loader yields no labels"),
    case("lowrank net --finetune bad_labels_loader",
         r"^--finetune has label 5\d, but the model scores 10 classes"),
    case("lowrank net --data wrong_channels_loader",
         r"^the model cannot run on a batch of --data \(inputs of shape \(32, 3, 8, 8\)\)"),
    case("lowrank net --data empty_loader", r"^--data yielded no batches$"),
    case("lowrank net --data not_a_loader", r"^--data not_a_loader is a list, not a torch "
         r"DataLoader$"),
    case("lowrank net --epochs 3", r"^--epochs only applies with --finetune: give --finetune too "
         r"\(or leave out --epochs\)$"),
    case("lowrank net --epochs 0 --finetune train_loader",
         r"^--epochs must be a whole number >= 1, got 0$"),
    case("lowrank net --finetune train_loader --lr inf",
         r"^--lr must be a number > 0, got inf$"),
    case("lowrank net --rat 0.5", r"^unknown option --rat: did you mean --ratio\?"),
    case("lowrank net --eval two_arg_eval", TWO_ARGS),
    case("lowrank net --energy 0.5 --eval says_hello", HELLO),

    # ---- %distill
    case("distill number --teacher teacher --data train_loader", NOT_A_MODULE),
    case("distill net", r"^--teacher is needed: the teacher model\(s\) by name; several are an "
         r"ensemble"),
    case("distill net --data train_loader", r"^--teacher is needed: the teacher model\(s\)"),
    case("distill net --teacher , --data train_loader",
         r"^--teacher needs NAME\[,NAME\.\.\.\]$"),
    case("distill net --teacher teacher", r"^--data is needed: the transfer data: a DataLoader"),
    case("distill net --teacher missing_name --data train_loader",
         r"^--teacher: no variable named 'missing_name' in the notebook$"),
    case("distill net --teacher number --data train_loader",
         r"^--teacher number is a int, not a torch\.nn\.Module$"),
    case("distill net --teacher net --data train_loader",
         r"^the teacher is the student itself \(net\): distil from another model, or from an "
         r"earlier version of it \(--teacher net@0: net as first registered\)$"),
    case("distill net --teacher teacher,net --data train_loader",
         r"^the teacher is the student itself \(net\)"),
    case("distill net --teacher net@1 --data train_loader",
         r"^--teacher net@1 is the student net itself \(the current version\): pick an earlier "
         r"one \(net@0\.\.net@0\) or another model$"),
    case("distill net --teacher net@7 --data train_loader",
         r"^--teacher net@7: net has versions 0\.\.1$"),
    case("distill net --teacher net@x --data train_loader",
         r"^--teacher net@x: write NAME@K with K a version number \(0 is the first\)$"),
    case("distill net --teacher net@-1 --data train_loader", r"^--teacher net@-1: write NAME@K"),
    case("distill net --teacher other@0 --data train_loader",
         r"^--teacher other@0: other has no history yet \(compress it or %nbcompress other "
         r"first\)$"),
    case("distill net --teacher big_teacher --data train_loader",
         r"^the teacher's output has shape \(N, 100\) but the student's has \(N, 10\)"),
    case("distill net --teacher teacher --data missing_name",
         r"^--data: no variable named 'missing_name' in the notebook$"),
    case("distill net --teacher teacher --data not_a_loader",
         r"^--data not_a_loader is a list, not a torch DataLoader$"),
    case("distill net --teacher teacher --data wrong_channels_loader",
         r"^the student could not run on a batch of --data: RuntimeError: .*but got 3 channels"),
    case("distill net --teacher teacher --data unlabelled_loader",
         r"^--data yields inputs only \(no labels\): use --soft-only"),
    case("distill net --teacher teacher --data empty_loader",
         r"^the transfer data \(--data\) yielded no batches$"),
    case("distill net --teacher teacher --data bad_labels_loader",
         r"^--data has label 5\d, but the student scores 10 classes"),
    case("distill net --teacher teacher --data train_loader -T 0",
         r"^-T must be a number > 0, got 0\.0$"),
    case("distill net --teacher teacher --data train_loader -T nan",
         r"^-T must be a number > 0, got nan$"),
    case("distill net --teacher teacher --data train_loader --alpha 2",
         r"^--alpha must be a number in \[0, 1\], got 2\.0$"),
    case("distill net --teacher teacher --data train_loader --soft-only --alpha 0.5",
         r"^--soft-only trains on teacher outputs alone \(alpha = 1\); --alpha 0\.5 contradicts"),
    case("distill net --teacher teacher --data train_loader --epochs 0",
         r"^--epochs must be a whole number >= 1, got 0$"),
    case("distill net --teacher teacher --data train_loader --lr inf",
         r"^--lr must be a number > 0, got inf$"),
    case("distill net --teacher teacher --data train_loader --optimizer bogus",
         r"^--optimizer must be one of adam, adamw, sgd, got 'bogus'$"),
    case("distill net --teacher teacher --data train_loader --features 0",
         r"^--features takes STUDENT_LAYER:TEACHER_LAYER pairs, got '0'$"),
    case("distill net --teacher teacher --data train_loader --features 99:0",
         r"^--features: the student has no layer named '99'; its layers: 0, 1, 2"),
    case("distill net --teacher teacher --data train_loader --features 3:3 --feature-weight nan",
         r"^--feature-weight must be a number >= 0, got nan$"),
    case("distill net --teacher teacher --data train_loader --bias-adjust -1",
         r"^--bias-adjust must be a whole number >= 0, got -1$"),
    case("distill net --teacher teacher --data train_loader --bias-adjust 99",
         r"^--bias-adjust 99: the student scores 10 classes \(0\.\.9\)$"),
    case("distill net --teacher teacher --data train_loader --temp 2",
         r"^unknown option --temp: did you mean --temperature\?"),
    case("distill net --teacher teacher --data train_loader --eval two_arg_eval", TWO_ARGS),
    case("distill net --teacher teacher --data train_loader --eval says_hello", HELLO),
    case(f"distill net --teacher teacher --data train_loader --epochs 1 --seed {OVERFLOW}", SEED),

    # ---- %earlyexit
    case("earlyexit number --data train_loader", NOT_A_MODULE),
    case("earlyexit net", r"^--data LOADER is needed to train the exit heads$"),
    case("earlyexit net --threshold 0.9", r"^--data LOADER is needed to train the exit heads$"),
    case("earlyexit net --data not_a_loader",
         r"^--data not_a_loader is a list, not a torch DataLoader$"),
    case("earlyexit net --data wrong_channels_loader --exits 2",
         r"^the model failed on a batch of the data: RuntimeError: .*but got 3 channels instead$"),
    case("earlyexit net --data empty_loader --exits 2", r"^--data yielded no batches$"),
    case("earlyexit net --data unlabelled_loader --exits 2 --alpha 0.5",
         r"^--alpha below 1 trains the heads on labels too, but --data yields no labels"),
    case("earlyexit net --data bad_labels_loader --exits 2 --alpha 0.5",
         r"^--data has label 5\d, but the model scores 10 classes"),
    case("earlyexit net --data train_loader --exits 99",
         r"^--exits: Sequential has no module named '99' \(its blocks: 0, 1, 2, 3, 4, 5, 6, 7, "
         r"8\)$"),
    case("earlyexit net --data train_loader --exits 8",
         r"^--exits: 8 is the last block: its output is the network's own output"),
    case("earlyexit net --data train_loader --exits 2,2", r"^--exits names '2' twice$"),
    case("earlyexit net --data train_loader --exits ,", r"^--exits names no module$"),
    case("earlyexit net --data train_loader --exits 2 --every 1",
         r"^give --exits or --every, not both$"),
    case("earlyexit net --data train_loader --every 0", r"^--every must be a whole number >= 1, "
         r"got 0$"),
    case("earlyexit net --data train_loader --every 100",
         r"^--every 100 puts no exit in Sequential"),
    case("earlyexit net --data train_loader --threshold 2",
         r"^--threshold must be a number in \(0, 1\], got 2\.0$"),
    case("earlyexit net --data train_loader --threshold 0",
         r"^--threshold must be a number in \(0, 1\], got 0\.0$"),
    case("earlyexit net --data train_loader --threshold nan",
         r"^--threshold must be a number in \(0, 1\], got nan$"),
    case("earlyexit net --data train_loader --epochs 0", r"^--epochs must be a whole number >= 1, "
         r"got 0$"),
    case("earlyexit net --data train_loader --alpha 2", r"^--alpha must be a number in \[0, 1\], "
         r"got 2\.0$"),
    case("earlyexit net --data train_loader -T 0", r"^-T must be a number > 0, got 0\.0$"),
    case("earlyexit net --data train_loader --exits 2 --lr inf",
         r"^--lr must be a number > 0, got inf$"),
    case("earlyexit net --data train_loader --head-pool 0",
         r"^--head-pool must be a whole number >= 1, got 0$"),
    case("earlyexit net --data train_loader --head wide",
         r"^--head must be one of pool, conv, got 'wide'$"),
    case("earlyexit net --data train_loader --target-flops 1.5",
         r"^--target-flops must be a fraction in \(0, 1\) \(0\.5 or 50%\), got 1\.5$"),
    case("earlyexit net --data train_loader --target-flops 0.5 --threshold 0.9",
         r"^give --target-flops or --threshold, not both$"),
    case("earlyexit net --data train_loader --target-flops 0.01 --epochs 1",
         r"^no choice of exits and threshold fits 1\.0% of the FLOPs on the evaluation data: the "
         r"cheapest \(.*\) spends \d+\.\d%$"),
    case("earlyexit net --data train_loader --exit 2",
         r"^unknown option --exit: did you mean --exits\?"),
    case("earlyexit net --data train_loader --eval two_arg_eval", TWO_ARGS),
    case("earlyexit net --data train_loader --exits 2 --eval says_hello", HELLO),
    case(f"earlyexit net --data train_loader --exits 2 --epochs 1 --seed {OVERFLOW}", SEED),

    # ---- %slim
    case("slim number --data train_loader", NOT_A_MODULE),
    case("slim net", r"^--data LOADER is needed to make the model slimmable \(train its widths\)$"),
    case("slim net --width 0.5", r"^--data LOADER is needed to make the model slimmable .*, "
                                 r"before --width can choose one$"),
    case("slim net --data not_a_loader", r"^--data not_a_loader is a list, not a torch DataLoader$"),
    case("slim net --data wrong_channels_loader",
         r"^the model cannot run on a batch of --data \(inputs of shape \(32, 3, 8, 8\)\): "
         r"RuntimeError: .*but got 3 channels instead; is it the data this model takes\?$"),
    case("slim net --data empty_loader", r"^--data yielded no batches$"),
    case("slim net --data unlabelled_loader", r"^--data yields no labels: the full width trains"),
    case("slim net --data bad_labels_loader", r"^--data has label 5\d, but the model scores 10 "),
    case("slim net --data train_loader --widths 0,1", r"^each of --widths must be in \(0, 1\], "
                                                       r"got 0$"),
    case("slim net --data train_loader --widths 0.5,1.5", r"^each of --widths must be in \(0, 1\], "
                                                           r"got 1\.5$"),
    case("slim net --data train_loader --widths 1", r"^--widths needs at least one width below 1"),
    case("slim net --data train_loader --widths a,b", r"^--widths must be numbers in \(0, 1\], "
                                                       r"got 'a'$"),
    case("slim net --data train_loader --widths 0.5 --width 0.75",
         r"^--width 0\.75 is not among the widths to train \(0\.5, 1\)$"),
    case("slim net --data train_loader --width 2", r"^--width must be a number in \(0, 1\], got 2"),
    case("slim net --data train_loader --epochs 0", r"^--epochs must be a whole number >= 1, "),
    case("slim net --data train_loader --importance taylor", r"^--importance must be one of "),
    case("slim net --data train_loader -T 0", r"^-T must be a number > 0, got 0\.0$"),
    case("slim net --data train_loader --widht 0.5", r"^unknown option --widht: did you mean "),
    case("slim net --data train_loader --depths 0.5,1",
         r"^--depths needs residual blocks to leave out \(a module whose forward adds its own "),
    case("slim net --data train_loader --depths 0,1", r"^each of --depths must be in \(0, 1\], "
                                                       r"got 0$"),
    case("slim net --data train_loader --depth 0.5",
         r"^--depth 0\.5 is not among the depths to train \(1\); give --depths$"),

    # ---- %budget
    case("budget number --flops 0.5", NOT_A_MODULE),
    case("budget net", r"^give --flops F: the budget, as a fraction of the full network's FLOPs "
                       r"\(e\.g\. 0\.3\), or --latency L, a fraction of its latency$"),
    case("budget net --flops 0.5", r"^there is nothing to choose in a Sequential: a budget "
                                   r"chooses among the widths of a slimmable network \(%slim, "),
    case("budget net --flops 0", r"^--flops must be a number in \(0, 1\], got 0"),
    case("budget net --flops abc", r"^--flops must be a number"),
    case("budget net --latency 1.5", r"^--latency must be a number in \(0, 1\], got 1\.5$"),
    case("budget net --flops 0.5 --latency 0.5", r"^give --flops or --latency, not both$"),

    # ---- %undo / %redo
    case("undo", r"^the following arguments are required: name$"),
    case("undo net", r"^nothing to undo for net: it is at its first version$", pre=("undo net",)),
    case("undo net 0", r"^%undo takes a positive number of steps, got '0'$"),
    case("undo net -1", r"^%undo takes a positive number of steps, got '-1'$"),
    case("undo net abc", r"^%undo takes a positive number of steps, got 'abc'$"),
    case("undo net 1.5", r"^%undo takes a positive number of steps, got '1\.5'$"),
    case("undo net 5", r"^cannot undo 5 steps for net: only 1 available$"),
    case("undo net 1 2", r"^unrecognized arguments: 2$"),
    case("undo other", r"^other has no history yet: compress it \(or %nbcompress other\) first$"),
    case("undo number", NOT_A_MODULE),
    case("undo missing_name", NO_VAR),
    case("undo net.nothing", NO_ATTR),
    case('undo "net', QUOTE),
    case("redo net", r"^nothing to redo for net: it is at its newest version$"),
    case("redo net 2", r"^cannot redo 2 steps for net: only 1 available$", pre=("undo net",)),
    case("redo net 0", r"^%redo takes a positive number of steps, got '0'$"),
    case("redo net -1", r"^%redo takes a positive number of steps, got '-1'$"),
    case("redo net abc", r"^%redo takes a positive number of steps, got 'abc'$"),
    case("redo other", r"^other has no history yet: compress it \(or %nbcompress other\) first$"),
    case("redo number", NOT_A_MODULE),

    # ---- %compress_history
    case("compress_history other",
         r"^other has no history yet: compress it \(or %nbcompress other\) first$"),
    case("compress_history number", NOT_A_MODULE),
    case("compress_history net.nothing", NO_ATTR),
    case("compress_history missing_name", NO_VAR),
    case("compress_history net --bogus",
         r"^unknown option --bogus: %compress_history\? lists every option"),
    case("compress_history net --no-p", r"^unknown option --no-p: did you mean --no-plot\?"),
    case('compress_history "net', QUOTE),
]


@pytest.mark.parametrize("line,match,pre", CASES)
def test_bad_line_is_one_line_and_changes_nothing(sh, line, match, pre):
    for p in pre:
        magic, _, rest = p.partition(" ")
        sh.run_line_magic(magic, rest)
    before = _state(sh)
    err = _run_bad(sh, line)
    msg = str(err)
    assert type(err) is UsageError, f"{type(err).__name__} instead of UsageError: {msg}"
    assert msg.strip() and "\n" not in msg, f"not one line: {msg!r}"
    assert re.search(match, msg), msg
    _assert_unchanged(sh, before)


def test_matrix_covers_every_magic():
    magics = {p.values[0].split(" ", 1)[0] for p in CASES}
    assert magics == {"nbcompress", "prune", "quantize", "lowrank", "distill", "earlyexit",
                      "slim", "budget", "undo", "redo", "compress_history"}
    assert len(CASES) >= 60


# ------------------------------------------------------------------------ strict mode
@pytest.mark.parametrize("line,match", [
    ("prune net 1.5", r"^AMOUNT must be a fraction in \(0, 1\) .* got 1\.5$"),
    ("prune net 0.5 --structure", r"^unknown option --structure: did you mean --structured\?"),
    ("quantize net --bits abc", r"^--bits must be a whole number, got 'abc'$"),
    ("nbcompress net --eval says_hello", HELLO),
    ("nbcompress net --input-shape 1,3,8,8", r"^could not run the model on the example input"),
    ("distill net --teacher net --data train_loader", r"^the teacher is the student itself"),
    ("earlyexit net --data train_loader --exits 99", r"^--exits: Sequential has no module"),
    ("redo net", r"^nothing to redo for net: it is at its newest version$"),
    ("compress_history other", r"^other has no history yet"),
])
def test_strict_mode_raises_nbcompress_error_with_the_same_line(sh, monkeypatch, line, match):
    before = _state(sh)
    plain = _run_bad(sh, line)
    assert type(plain) is UsageError
    _assert_unchanged(sh, before)
    monkeypatch.setenv("NBCOMPRESS_STRICT", "1")
    err = _run_bad(sh, line)
    assert type(err) is NBCompressError, f"{type(err).__name__}: {err}"
    assert not isinstance(err, UsageError)
    assert str(err) == str(plain) and "\n" not in str(err) and re.search(match, str(err))
    _assert_unchanged(sh, before)
