"""Issue 16: a step's bookkeeping grows with the work. What is measured once is not measured
again (per-tensor results kept while a tensor keeps its values, edits through ``.data`` included),
the first FLOP count of a process does not import ``torch._dynamo``, records larger than the host
budget go straight to disk, and the faults (no room, Ctrl-C while spilling) leave the history as
it was. Speed itself is measured in benchmarks/bench_scale.py, not here."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import nbcompress
from nbcompress import History
from nbcompress.core import BadInput
from nbcompress.counting import count_params
from nbcompress.fingerprint import _model_bytes

from conftest import same_as_snapshot, snapshot


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def _spy_counts(monkeypatch) -> list:
    """The sizes of the tensors whose nonzeros are counted from now on (each a MEMO miss)."""
    from nbcompress import counting

    calls, real = [], counting._count
    monkeypatch.setattr(counting, "_count", lambda t: calls.append(t.numel()) or real(t))
    return calls


def test_counts_are_kept_per_tensor_and_follow_every_kind_of_edit(monkeypatch):
    m = mlp()
    x = torch.randn(1, 64)
    calls = _spy_counts(monkeypatch)
    a = nbcompress.measure(m, x, latency=False)
    n_first = len(calls)
    b = nbcompress.measure(m, x, latency=False)
    assert len(calls) == n_first and b.nonzero_params == a.nonzero_params   # nothing recounted
    m[0].weight.data[:10].zero_()          # an edit the version counter does not see
    c = nbcompress.measure(m, x, latency=False)
    assert c.nonzero_params == a.nonzero_params - 10 * 64
    assert len(calls) == n_first + 1       # only the edited tensor was counted again
    with torch.no_grad():
        m[2].bias.zero_()                  # an in-place op
    assert nbcompress.measure(m, x, latency=False).nonzero_params == c.nonzero_params - 128
    assert count_params(m) == (sum(p.numel() for p in m.parameters()),
                               sum(int(torch.count_nonzero(p)) for p in m.parameters()))


def test_copies_reuse_what_was_measured_and_stay_exact(monkeypatch):
    h = History(mlp(), example_input=torch.randn(1, 64), measure_latency=False)
    h.metrics_of(h.current_version)
    calls = _spy_counts(monkeypatch)
    h.apply(nbcompress.PruneConfig(amount=0.5, layers="^2$"), progress=False)
    after = h.current_version.metrics
    # the work copy carried the untouched layers' counts: at most the pruned layer's tensors
    # (and whatever the technique counts itself) were counted again
    assert 128 * 64 not in calls and after.nonzero_params < h.versions[0].metrics.nonzero_params
    h.undo()
    h.redo()
    assert same_as_snapshot(h.current, snapshot(h.version_model(1)))
    assert h.current_version.overhead > 0 and h.current_version.seconds > 0


FRESH = r"""
import sys, torch
from torch import nn
import nbcompress
from torch.utils.flop_counter import FlopCounterMode
m = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                  nn.Linear(100, 10))
x = torch.randn(1, 1, 28, 28)
first = nbcompress.measure(m, x, latency=False).flops
assert "torch._dynamo" not in sys.modules, "the first count imported torch._dynamo"
import torch._dynamo  # noqa: F401  (now torch's own path, with its real dynamo mark)
with FlopCounterMode(display=False) as c:
    m(x)
again = nbcompress.measure(m, x, latency=False).flops
print(first, again, c.get_total_flops())
"""


def test_first_flop_count_of_a_process_does_not_import_dynamo():
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, again, torch_own = map(int, out.stdout.split())
    assert first == again == torch_own == 2 * (784 * 300 + 300 * 100 + 100 * 10)


def test_records_over_the_budget_go_straight_to_disk(monkeypatch, tmp_path):
    import nbcompress.records as hist

    m = mlp()
    copies = []
    real = hist.host_copy
    monkeypatch.setattr(hist, "host_copy", lambda model: copies.append(1) or real(model))
    h = History(m, example_input=torch.randn(1, 64), measure_latency=False,
                host_budget_bytes=_model_bytes(m) // 2)
    snaps = [snapshot(m)]
    for amount in (0.3, 0.6):
        h.apply(nbcompress.PruneConfig(amount=amount), progress=False)
        snaps.append(snapshot(h.current))
    assert copies == []                              # never a host copy of a record
    assert [v.where for v in h.versions] == ["disk"] * 3 and all(v.record is None
                                                                 for v in h.versions)
    files = set(os.listdir(h._spill_dir))
    h.undo(2)
    assert same_as_snapshot(h.current, snaps[0])
    assert set(os.listdir(h._spill_dir)) == files    # handed out as read; the file stays the record
    h.redo(2)
    assert same_as_snapshot(h.current, snaps[2])
    h.close()


def test_no_room_for_the_next_version_is_one_line_before_the_step(monkeypatch):
    import nbcompress.records as hist

    m = mlp()
    h = History(m, example_input=torch.randn(1, 64), measure_latency=False,
                host_budget_bytes=_model_bytes(m) + 1000)      # the original fits, no more
    snap = snapshot(m)
    monkeypatch.setattr(hist.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1 << 20}))
    with pytest.raises(BadInput, match="no room to record the next version") as e:
        h.apply(nbcompress.PruneConfig(amount=0.5), progress=False)
    assert "\n" not in str(e.value) and "Nothing was changed" in str(e.value)
    assert len(h) == 1 and h.current is m and same_as_snapshot(m, snap)


def test_ctrl_c_while_spilling_leaves_no_file_and_the_history_as_it_was(monkeypatch):
    import nbcompress.records as hist

    m = mlp()
    h = History(m, example_input=torch.randn(1, 64), measure_latency=False,
                host_budget_bytes=_model_bytes(m) + 1000)
    h.metrics_of(h.current_version)
    real = torch.save

    def interrupted(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(hist.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        h.apply(nbcompress.PruneConfig(amount=0.5), progress=False)
    assert len(h) == 1 and h.current is m and h.versions[0].where == "host"
    assert os.listdir(h._spill_dir) == []
    monkeypatch.setattr(hist.torch, "save", real)
    h.apply(nbcompress.PruneConfig(amount=0.5), progress=False)     # and it still works
    assert len(h) == 2
    h.undo()
    assert same_as_snapshot(h.current, snapshot(m))
    h.close()


def test_flops_are_counted_once_per_architecture(monkeypatch):
    import nbcompress.counting as counting

    calls = []
    real = counting._count_forward
    monkeypatch.setattr(counting, "_FLOPS_SEEN", type(counting._FLOPS_SEEN)())   # a fresh process
    monkeypatch.setattr(counting, "_count_forward",
                        lambda m, x: calls.append(type(m).__name__) or real(m, x))
    m = mlp(seed=3)
    x = torch.randn(1, 64)
    a = nbcompress.measure(m, x, latency=False)
    p = nbcompress.prune(m, 0.5, progress=False)
    b = nbcompress.measure(p, x, latency=False)
    assert len(calls) == 1                           # same architecture: the count is reused
    assert b.flops == a.flops and b.sparse_flops < 0.6 * a.sparse_flops   # sparsity: recomputed
    assert [r["flops"] for r in b.layers] == [r["flops"] for r in a.layers]
    m.add_module("5", nn.Linear(10, 10))             # a changed architecture is counted again
    c = nbcompress.measure(m, x, latency=False)
    assert len(calls) == 2 and c.flops == a.flops + 2 * 100
    m[4].out_features = 10                           # (a plain attribute is part of it)
    nbcompress.measure(m, x, latency=False)
    assert len(calls) == 2
    m[4].extra = 1
    nbcompress.measure(m, x, latency=False)
    assert len(calls) == 3
    q = nbcompress.quantize(p, progress=False)       # new layer types: counted again
    nbcompress.measure(q, x, latency=False)
    assert len(calls) == 4


def test_copies_of_int8_layers_share_the_packed_kernel_weight_and_nothing_that_can_change():
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    data = DataLoader(TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))),
                      batch_size=8)
    x = torch.randn(2, 1, 8, 8)
    for q, xin in ((nbcompress.quantize(mlp(), progress=False), torch.randn(2, 64)),
                   (nbcompress.quantize(cnn, mode="static", calib=data, progress=False), x)):
        layers = [m for m in q.modules() if hasattr(m, "nbc_export")]
        assert layers
        c = copy.deepcopy(q)
        assert torch.equal(q(xin), c(xin))
        for a, b in zip(layers, [m for m in c.modules() if hasattr(m, "nbc_export")]):
            pa = getattr(a._packed_params, "_packed_params", a._packed_params)
            pb = getattr(b._packed_params, "_packed_params", b._packed_params)
            assert pa is pb                                   # shared, not packed again
            ta, tb = a.nbc_export()[1], b.nbc_export()[1]
            assert all(ta[k] is not tb[k] and torch.equal(ta[k], tb[k]) for k in ta)
        # the copy's weight replaced: the original keeps its own
        first = [m for m in c.modules() if hasattr(m, "nbc_export")][0]
        w, bias = first._weight_bias()
        before = q(xin)
        first.set_weight_bias(torch.quantize_per_tensor(torch.zeros(w.shape), 0.1, 0, torch.qint8),
                              bias)
        assert torch.equal(q(xin), before) and not torch.equal(c(xin), before)


def test_fingerprints_of_int8_layers_read_their_kept_codes_and_see_edits(monkeypatch):
    import nbcompress.techniques.quantize.int8_plain as plain
    from nbcompress.fingerprint import state_fingerprint

    q = nbcompress.quantize(mlp(), progress=False)
    h = History(q, example_input=torch.randn(1, 64), measure_latency=False)
    rebuilt = []
    real = plain.qweight_import
    monkeypatch.setattr(plain, "qweight_import", lambda *a: rebuilt.append(1) or real(*a))
    fp = state_fingerprint(q)
    assert rebuilt == [] and fp == state_fingerprint(q)     # no quantized weight rebuilt
    codes = q[0]._packed_params._nbc_plain_form()[0]["weight_int8"]
    codes.data[0, 0] += 1                                    # an edit no version counter sees
    assert state_fingerprint(q) != fp
    assert h.sync() and h.current_version.technique == "edited"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16,
                                   torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                   torch.bool, torch.complex64])
def test_nonzero_count_is_torch_count_nonzero(dtype):
    """The numpy count (counting.nonzero_count) says what torch.count_nonzero says: -0.0 is zero,
    NaN is not, on contiguous tensors and strided views alike."""
    from nbcompress.counting import nonzero_count

    x = torch.randn(3000, generator=torch.Generator().manual_seed(0)) * 3
    x[::3] = 0.0
    x[1::7] = -0.0
    if dtype.is_floating_point:
        x[2::11] = float("nan")
    t = x.to(dtype)
    for v in (t, t[::2], t.view(30, 100).t(), t.view(30, 100)[:, 5:50]):
        assert nonzero_count(v) == int(torch.count_nonzero(v)), (dtype, v.shape)


def test_nonzero_count_of_float8_sees_negative_zero():
    from nbcompress.counting import nonzero_count

    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    x = torch.tensor([0.0, -0.0, 1.0, -2.0, 0.0, 0.5])
    assert nonzero_count(x.to(torch.float8_e4m3fn)) == 3


def test_freed_memory_within_the_next_steps_work_copy_is_kept(monkeypatch):
    """A step hands freed memory back to the system only beyond what the next step's work copy
    will take again (handing it back costs the page faults of taking it again)."""
    from nbcompress import records

    records._release_freed_memory()            # (resolves glibc, if any)
    if not records._TRIM or records._FREE is None:
        pytest.skip("no glibc malloc_trim / mallinfo2 here")
    trims = []
    monkeypatch.setattr(records, "_TRIM", lambda pad: trims.append(pad))
    records._release_freed_memory(keep=1 << 50)
    assert trims == []
    records._release_freed_memory(keep=0)
    assert trims == [0]


def _state_dict_bytes(model):
    """dense_bytes and _model_bytes as the state dict itself says them (the reference)."""
    seen, per, packed = set(), {}, 0
    for v in model.state_dict(keep_vars=True).values():
        ts = [v] if isinstance(v, torch.Tensor) else [
            x for x in v if isinstance(x, torch.Tensor)] if isinstance(v, (tuple, list)) else []
        if isinstance(v, (tuple, list)):
            packed += sum(x.numel() * x.element_size() for x in ts)
        for t in ts:
            key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else id(t)
            if key not in seen:
                seen.add(key)
                name = str(t.dtype).replace("torch.", "")
                per[name] = per.get(name, 0) + (t.untyped_storage().nbytes() if t.numel() else 0)
    own = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return (sum(per.values()), per), sum(t.numel() * t.element_size() for t in own.values()) + packed


def test_bytes_of_int8_layers_rebuild_no_weight_and_follow_new_weights(monkeypatch):
    """dense_bytes and the history's record size read an int8 layer's kept codes (its quantized
    weight, rebuilt by its state dict on every call, is read once per shape): the same numbers
    as the state dict says, before and after the layer gets a weight of another shape."""
    import nbcompress.techniques.quantize.int8_plain as plain
    from nbcompress.counting import dense_bytes

    q = nbcompress.quantize(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
                            progress=False)
    want_dense, want_model = _state_dict_bytes(q)
    assert dense_bytes(q) == want_dense and _model_bytes(q) == want_model
    rebuilt = []
    real = plain.qweight_import
    monkeypatch.setattr(plain, "qweight_import", lambda *a: rebuilt.append(1) or real(*a))
    assert dense_bytes(q) == want_dense and _model_bytes(q) == want_model
    assert rebuilt == []                                    # read again without rebuilding
    layer = q[2]
    w = torch.quantize_per_tensor(torch.randn(7, 128), 0.1, 0, torch.qint8)
    layer._packed_params.set_weight_bias(w, torch.zeros(7))
    layer.out_features = 7
    monkeypatch.setattr(plain, "qweight_import", real)
    want_dense, want_model = _state_dict_bytes(q)
    assert dense_bytes(q) == want_dense and _model_bytes(q) == want_model


def test_int8_code_counts_are_kept_with_the_codes_and_follow_edits():
    """An int8 layer's nonzero count is kept with its codes (MEMO): an edit to the codes, in
    place or through .data, and a change of the zero points are both seen."""
    from nbcompress import counting

    codes = torch.randint(-5, 6, (64, 32), dtype=torch.int8)
    zps = torch.zeros(64, dtype=torch.int32)
    tensors, attrs = {"weight_int8": codes, "weight_zero_points": zps}, {"weight_axis": 0}
    want = lambda: (codes.numel(), int(torch.count_nonzero(codes.int() - zps[:, None])))  # noqa
    assert counting.plain_code_counts(tensors, attrs) == want()
    with torch.no_grad():
        codes.mul_(0)                                       # in place: the version counter moves
    assert counting.plain_code_counts(tensors, attrs) == want() == (64 * 32, 0)
    codes.data[:3] = 1                                      # through .data: the content sum moves
    assert counting.plain_code_counts(tensors, attrs) == want()
    zps.data[:10] = 1                                       # the zero points, not the codes
    assert counting.plain_code_counts(tensors, attrs) == want()
    plain = {"weight_int8": codes}
    assert counting.plain_code_counts(plain, {"weight_zero_point": 1}) == \
        (codes.numel(), int(torch.count_nonzero(codes != 1)))
    assert counting.plain_code_counts(plain, {"weight_zero_point": 0}) == \
        (codes.numel(), int(torch.count_nonzero(codes)))


def test_history_sees_an_in_place_edit_between_steps():
    """Between two steps the user zeroes a layer in place (w.mul_(0)) and then trains another
    through .data: the next step's 'before', the edit's version and the step's result are all
    measured on the values as they are, not on what was measured before."""
    from nbcompress.counting import count_params

    h = History(mlp(), example_input=torch.randn(1, 64), measure_latency=False)
    h.apply(nbcompress.PruneConfig(amount=0.3), progress=False)
    m = h.current
    with torch.no_grad():
        m[0].weight.mul_(0)
    m[2].weight.data[:5] = 1.0
    h.apply(nbcompress.QuantizeConfig(), progress=False)
    edited = h.versions[-2]
    assert edited.technique == "edited"
    ref = h.version_model(len(h.versions) - 2)
    torch_count = sum(int(torch.count_nonzero(p)) for p in ref.parameters())   # no MEMO here
    assert torch_count != h.versions[1].metrics.nonzero_params
    assert edited.metrics.nonzero_params == torch_count
    assert ref[0].weight.abs().sum() == 0 and bool((ref[2].weight[:5] == 1).all())
    buf = io.BytesIO()
    nbcompress.save(ref, buf)
    assert edited.metrics.packed_bytes == len(buf.getvalue())
    after = h.current_version.metrics
    assert after.nonzero_params == count_params(h.version_model(len(h.versions) - 1))[1]


def test_a_steps_record_shares_only_the_tensors_the_step_left_as_they_were():
    """A record lends the next one the tensors a step (or an edit) left bit-identical (shared,
    not copied again); anything changed, even a permutation that keeps the content sum, is
    copied; undo and redo still hand out exactly what each version held."""
    h = History(mlp(), example_input=torch.randn(1, 64), measure_latency=False)
    snap0 = snapshot(h.version_model(0))
    h.apply(nbcompress.PruneConfig(amount=0.5, layers="^0$"), progress=False)
    r0, r1 = h.versions[0].record, h.versions[1].record
    assert r1[0].bias is r0[0].bias and r1[2].weight is r0[2].weight     # left as they were
    assert r1[0].weight is not r0[0].weight                                # pruned: its own
    snap1 = snapshot(h.version_model(1))
    live = h.current
    w = live[2].weight
    w.data[0] += 1.0                           # an edit through .data (no version counter)
    assert h.sync() and h.versions[-1].technique == "edited"
    r2 = h.versions[-1].record
    assert r2[2].weight is not r1[2].weight and torch.equal(r2[2].weight, w)
    assert r2[4].weight is r1[4].weight and r2[0].weight is r1[0].weight
    h.undo()
    assert same_as_snapshot(h.current, snap1)
    h.undo()
    assert same_as_snapshot(h.current, snap0)
    h.redo(2)
    assert torch.equal(h.current[2].weight, w) and not torch.equal(w, r1[2].weight)


def test_tensors_are_shared_only_when_equal_bit_for_bit():
    """The content sum only rules pairs out: a permutation (same sum), -0.0 against 0.0 (equal
    as numbers) and NaNs are told apart by comparing bits."""
    from nbcompress.fingerprint import MEMO, host_copy, shared_tensors

    a, b = mlp(), mlp()
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight.flip(0))              # permuted: same content sum
        a[2].bias.zero_()
        b[2].bias.zero_().neg_()                            # -0.0 == 0.0, other bits
        a[4].bias[0] = b[4].bias[0] = float("nan")          # NaN != NaN, same bits
    assert MEMO.content_sum(a[0].weight) == MEMO.content_sum(b[0].weight)
    shared = shared_tensors(a, b)
    assert id(a[0].weight) not in shared and id(a[2].bias) not in shared
    assert shared[id(a[4].bias)] is b[4].bias and shared[id(a[2].weight)] is b[2].weight
    c = host_copy(a, reuse=b)
    assert c[4].bias is b[4].bias and c[0].weight is not b[0].weight
    from nbcompress.fingerprint import _same_state

    assert _same_state(c, a)                                # bit for bit, NaN included


def test_an_int8_layers_count_follows_an_edit_of_its_codes():
    """count_params of an int8 model reads its kept codes each time (through MEMO, keyed on their
    values): zeroing codes through .data is counted (it was kept on the layer object, stale)."""
    q = nbcompress.quantize(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
                            progress=False)
    params, nonzero = count_params(q)
    codes = q[0]._packed_params._nbc_plain_form()[0]["weight_int8"]
    zeroed = int(torch.count_nonzero(codes[:10]))
    codes.data[:10] = 0
    assert count_params(q) == (params, nonzero - zeroed)
