"""The base every magic stands on: metrics vs hand counts, history transactions, undo/redo,
spill to disk, strict mode, and bad input through a real InteractiveShell."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.magic import line_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from torch import nn

import nbcompress
from nbcompress import BadInput, CompressionResult, History, NBCompressError, StepConfig, measure
from nbcompress.magics.base import NBMagics, step_options, user_errors
from conftest import same_as_snapshot, snapshot, state_equal

LENET_PARAMS = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
LENET_FLOPS = 2 * (784 * 300 + 300 * 100 + 100 * 10)


# --- a small real technique used to test the shared step mechanism ----------------------------
@dataclass
class ZeroSmallest(StepConfig):
    """Zero the given fraction of smallest-magnitude weights of every Linear (a real change)."""
    technique = "zero_smallest"
    fraction: float = 0.3
    explode: str | None = None   # raise this exception half-way, after changing the copy

    def validate(self, model):
        if not 0 < self.fraction < 1:
            raise BadInput(f"fraction must be in (0, 1), got {self.fraction}")

    def run(self, model, ctx):
        layers = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                w = m.weight.data
                k = int(self.fraction * w.numel())
                thr = w.abs().flatten().kthvalue(k).values
                w[w.abs() <= thr] = 0
                layers.append({"layer": name, "sparsity": float((w == 0).float().mean())})
                if self.explode == "keyboard":
                    raise KeyboardInterrupt
                if self.explode == "error":
                    raise RuntimeError("boom inside the step")
        return CompressionResult(model, layers=layers, notes=["zeroed smallest weights"])


@magics_class
class _TestMagics(NBMagics):
    @line_magic
    @needs_local_scope
    @no_var_expand
    @user_errors
    @magic_arguments()
    @argument("name")
    @argument("fraction", type=float)
    @argument("--explode", default=None)
    @step_options
    def zero_smallest(self, line="", local_ns=None):
        args = parse_argstring(self.zero_smallest, line)
        return self.run_step(args.name, ZeroSmallest(fraction=args.fraction, explode=args.explode),
                             args, local_ns)


@pytest.fixture
def tshell(shell):
    shell.register_magics(_TestMagics)
    return shell


# --- metrics ---------------------------------------------------------------------------------
def test_metrics_match_hand_counts_on_lenet(trained_lenet, mnist):
    m = measure(trained_lenet, example_input=torch.randn(1, 1, 28, 28), evaluator=mnist[1])
    assert m.params == LENET_PARAMS == 266_610
    assert m.nonzero_params == LENET_PARAMS
    assert m.flops == LENET_FLOPS
    assert m.sparse_flops == LENET_FLOPS
    assert m.dense_bytes == 4 * LENET_PARAMS
    assert m.dense_bytes_by_dtype == {"float32": 4 * LENET_PARAMS}
    assert m.packed_bytes >= 4 * LENET_PARAMS  # dense weights do not pack below raw
    assert m.packed_bytes < 4 * LENET_PARAMS + 20_000
    assert 0.9 < m.accuracy <= 1.0
    assert m.latency_ms > 0
    fc1 = next(r for r in m.layers if r["layer"] == "fc1")
    assert fc1["params"] == 784 * 300 + 300 and fc1["flops"] == 2 * 784 * 300


def test_sparse_flops_and_packed_bytes_follow_zeros(trained_lenet):
    zeroed = nbcompress.compress(trained_lenet, ZeroSmallest(fraction=0.9)).model
    m0 = measure(trained_lenet, example_input=(1, 1, 28, 28), latency=False)
    m1 = measure(zeroed, example_input=(1, 1, 28, 28), latency=False)
    assert m1.flops == m0.flops                      # dense count: hardware does not skip zeros
    assert m1.sparse_flops < 0.15 * m0.flops         # labelled sparse-aware count does
    assert m1.dense_bytes == m0.dense_bytes          # a masked dense tensor is not smaller
    assert m1.packed_bytes < 0.25 * m0.packed_bytes  # but what save() writes is
    assert m1.nonzero_params < 0.11 * m1.params


def test_evaluator_callable_float_and_dict(trained_lenet, mnist):
    m = measure(trained_lenet, evaluator=lambda mod: 0.5, example_input=(1, 784), latency=False)
    assert m.accuracy == 0.5
    m = measure(trained_lenet, evaluator=lambda mod: {"accuracy": 0.25, "loss": 1.5},
                example_input=(1, 784), latency=False)
    assert m.accuracy == 0.25 and m.eval_extra == {"loss": 1.5}
    with pytest.raises(BadInput, match="DataLoader or a callable"):
        measure(trained_lenet, evaluator=42)


def test_compress_never_changes_the_callers_model(trained_lenet):
    snap = snapshot(trained_lenet)
    res = nbcompress.compress(trained_lenet, ZeroSmallest(fraction=0.5))
    assert res.model is not trained_lenet
    assert same_as_snapshot(trained_lenet, snap)
    assert res.layers and res.layers[0]["sparsity"] >= 0.5


# --- history ----------------------------------------------------------------------------------
def test_history_undo_redo_bit_identical(trained_lenet, mnist):
    h = History(trained_lenet, evaluator=mnist[1])
    snap = snapshot(trained_lenet)
    r1 = h.apply(ZeroSmallest(fraction=0.5))
    pruned_snap = snapshot(h.current)
    h.apply(ZeroSmallest(fraction=0.8))
    assert len(h) == 3 and h.pos == 2
    h.undo(2)
    # a fresh copy of the record, bit-identical; never the object the history keeps
    assert h.current is not trained_lenet and same_as_snapshot(h.current, snap)
    h.redo()
    assert same_as_snapshot(h.current, pruned_snap)
    # a new step after undo drops the redo branch
    h.apply(ZeroSmallest(fraction=0.6))
    assert len(h) == 3 and h.pos == 2
    with pytest.raises(BadInput, match="nothing to redo"):
        h.redo()
    df = h.table()
    assert list(df["technique"]) == ["baseline", "zero_smallest", "zero_smallest"]
    assert df.loc[0, "params"] == LENET_PARAMS
    assert df.loc[2, "nonzero_params"] < df.loc[0, "nonzero_params"]
    assert df["current"].tolist() == [False, False, True]
    assert r1.before.accuracy is not None and r1.after.accuracy is not None


@pytest.mark.parametrize("explode", ["keyboard", "error"])
def test_interrupted_step_leaves_model_untouched(trained_lenet, explode):
    h = History(trained_lenet)
    snap = snapshot(trained_lenet)
    exc = KeyboardInterrupt if explode == "keyboard" else RuntimeError
    with pytest.raises(exc):
        h.apply(ZeroSmallest(fraction=0.5, explode=explode))
    assert len(h) == 1 and h.current is trained_lenet
    assert same_as_snapshot(trained_lenet, snap)


def test_spill_to_disk_and_back_is_exact(trained_lenet):
    h = History(trained_lenet, host_budget_bytes=0, measure_latency=False)
    snaps = [snapshot(trained_lenet)]
    for f in (0.3, 0.6, 0.9):
        h.apply(ZeroSmallest(fraction=f), progress=False)
        snaps.append(snapshot(h.current))
    assert [v.where for v in h.versions] == ["disk"] * 4     # every record, the current last
    assert all(v.record is None for v in h.versions)
    for i in (2, 1, 0):
        h.undo()
        assert same_as_snapshot(h.current, snaps[i])
    h.redo(3)
    assert same_as_snapshot(h.current, snaps[3])
    h.close()


def test_user_retraining_between_steps_is_a_new_version(trained_lenet, mnist):
    h = History(trained_lenet, evaluator=mnist[1], measure_latency=False)
    m0 = h.metrics_of(h.current_version)
    with torch.no_grad():
        trained_lenet.fc3.weight.zero_()
    assert h.metrics_of(h.versions[0]) is m0         # the record did not change with the model
    assert h.sync() and len(h) == 2 and h.current_version.technique == "edited"
    m1 = h.metrics_of(h.current_version)
    assert m1 is not m0 and m1.accuracy < m0.accuracy
    assert not h.sync()                               # nothing new: no second version


def test_configure_same_evaluator_keeps_metrics_and_version_model(trained_lenet, mnist):
    """Giving the same --eval again (every magic line may) does not throw away the measured
    versions; a different evaluator does. version_model(k) reaches spilled versions too."""
    h = History(trained_lenet, evaluator=mnist[1], measure_latency=False, host_budget_bytes=0)
    h.apply(ZeroSmallest(fraction=0.5), progress=False)
    m0 = h.metrics_of(h.versions[0])
    h.configure(evaluator=mnist[1])
    assert h.versions[0].metrics is m0                      # kept, not re-measured
    h.configure(evaluator=mnist[0])
    assert h.versions[0].metrics is None                    # another evaluator: re-measured
    v0 = h.version_model(0)
    assert same_as_snapshot(v0, snapshot(trained_lenet))
    for bad in (2, -1, "0", True):
        with pytest.raises(BadInput, match="no version"):
            h.version_model(bad)
    h.close()


# --- magics through a real shell ----------------------------------------------------------------
def test_magic_step_undo_redo_and_history(tshell, trained_lenet, mnist):
    ns = tshell.user_ns
    ns.update(model=trained_lenet, test_loader=mnist[1])
    snap = snapshot(trained_lenet)
    r = tshell.run_line_magic("nbcompress", "model --eval test_loader")
    assert r.kind == "measure" and r.after.params == LENET_PARAMS and r.after.accuracy > 0.9
    assert "params" in repr(r) and "266,610" in repr(r)
    r = tshell.run_line_magic("zero_smallest", "model 0.5 --no-progress")
    assert ns["model"] is not trained_lenet
    assert r.after.nonzero_params < 0.55 * LENET_PARAMS
    assert same_as_snapshot(trained_lenet, snap)
    r = tshell.run_line_magic("undo", "model")
    assert ns["model"] is not trained_lenet and same_as_snapshot(ns["model"], snap)
    assert r.kind == "undo"
    tshell.run_line_magic("redo", "model")
    assert ns["model"] is not trained_lenet
    df = tshell.run_line_magic("compress_history", "model --no-plot")
    assert isinstance(df, pd.DataFrame)
    for col in ("technique", "args", "params", "nonzero_params", "packed_bytes", "flops",
                "latency_ms", "accuracy"):
        assert col in df.columns
    assert df.loc[1, "args"] == "fraction=0.5"


def test_magic_dotted_name_rebinds_attribute(tshell, trained_lenet):
    class Holder:
        pass

    holder = Holder()
    holder.net = trained_lenet
    tshell.user_ns["holder"] = holder
    tshell.run_line_magic("zero_smallest", "holder.net 0.5 --no-progress")
    assert holder.net is not trained_lenet
    tshell.run_line_magic("undo", "holder.net")
    assert holder.net is not trained_lenet and state_equal(holder.net, trained_lenet)


def test_magic_interrupt_keeps_binding(tshell, trained_lenet):
    tshell.user_ns["model"] = trained_lenet
    snap = snapshot(trained_lenet)
    with pytest.raises(KeyboardInterrupt):
        tshell.run_line_magic("zero_smallest", "model 0.5 --explode keyboard --no-progress")
    assert tshell.user_ns["model"] is trained_lenet and same_as_snapshot(trained_lenet, snap)


@pytest.mark.parametrize("line,match", [
    ("nbcompress nosuchmodel", "no variable named 'nosuchmodel'"),
    ("nbcompress notamodel", "notamodel is a int, not a torch.nn.Module"),
    ("nbcompress model --eval notaloader", "--eval notaloader is a int"),
    ("nbcompress model --eval missing", "no variable named 'missing'"),
    ("nbcompress model --input-shape 1,x,28", "--input-shape must be positive integers"),
    ("nbcompress model --input-shape 1,-1", "--input-shape must be positive integers"),
    ("undo model", "nothing to undo"),
    ("undo model 0", "positive number"),
    ("redo model", "nothing to redo"),
    ("zero_smallest model 1.5", "fraction must be in \\(0, 1\\)"),
    ("zero_smallest model", "arguments are required|the following arguments"),
    ("zero_smallest model 0.5 --device cuda:7", "CUDA is not available|unknown device"),
])
def test_bad_input_is_one_clear_line_and_model_unchanged(tshell, trained_lenet, line, match):
    if "cuda" in line and torch.cuda.is_available():
        pytest.skip("CUDA present")
    ns = tshell.user_ns
    ns.update(model=trained_lenet, notamodel=3, notaloader=5)
    tshell.run_line_magic("nbcompress", "model")
    snap = snapshot(trained_lenet)
    magic, _, rest = line.partition(" ")
    with pytest.raises(UsageError, match=match) as ei:
        tshell.run_line_magic(magic, rest)
    assert type(ei.value) is UsageError          # not a subclass: IPython shows no traceback
    assert "\n" not in str(ei.value).strip()
    assert ns["model"] is trained_lenet and same_as_snapshot(trained_lenet, snap)
    assert len(tshell._nbcompress_workspace.get("model")) == 1


def test_strict_mode_raises_ordinary_exception(tshell, trained_lenet, monkeypatch):
    tshell.user_ns["model"] = trained_lenet
    monkeypatch.setenv("NBCOMPRESS_STRICT", "1")
    with pytest.raises(NBCompressError, match="nothing to undo|no history"):
        tshell.run_line_magic("undo", "model")
    with pytest.raises(NBCompressError):
        tshell.run_line_magic("zero_smallest", "model 2.0")
    # and a notebook cell that fails this way fails the cell (what nbval sees)
    res = tshell.run_cell("%zero_smallest model 3.0")
    assert not res.success and isinstance(res.error_in_exec, NBCompressError)


def test_help_and_return_value(tshell, trained_lenet):
    tshell.user_ns["model"] = trained_lenet
    tshell.run_cell("r = %nbcompress model --input-shape 1,1,28,28")
    r = tshell.user_ns["r"]
    assert r.after.flops == LENET_FLOPS
    doc = tshell.find_line_magic("nbcompress").__doc__
    assert "--eval" in doc and "--input-shape" in doc


def test_reload_extension(tshell):
    tshell.run_line_magic("unload_ext", "nbcompress")
    assert tshell.find_line_magic("compress_history") is None
    tshell.run_line_magic("load_ext", "nbcompress")
    assert tshell.find_line_magic("compress_history") is not None
    tshell.run_line_magic("reload_ext", "nbcompress")
    assert tshell.find_line_magic("undo") is not None


def test_function_scope_lookup(tshell, trained_lenet):
    tshell.user_ns["_m"] = trained_lenet
    tshell.run_cell("def f():\n    local_model = _m\n    r = %nbcompress local_model --input-shape 1,784\n    return r\n"
                    "rep = f()")
    assert tshell.user_ns["rep"].after.params == LENET_PARAMS
