"""Compact history records (issue 16, memory): a version whose large weights are its parent's with
entries zeroed (what unstructured pruning leaves) records them as a packed mask of its parent
record's tensors, one bit per weight, instead of a second copy; every way back to it (undo, redo,
a spill to disk and back, the user training the model in place after it) gives it bit for bit,
signed zeros included."""
from __future__ import annotations

import torch
from torch import nn

import nbcompress
from nbcompress import History
from nbcompress.fingerprint import MASKED_MIN_NUMEL, _model_bytes


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def bits(model):
    """Every tensor's bits (so -0.0 and +0.0 differ)."""
    return {k: v.detach().clone().view(torch.int32) if v.dtype == torch.float32 else v.clone()
            for k, v in model.state_dict().items()}


def same_bits(model, snap):
    now = bits(model)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def test_pruned_record_is_a_mask_and_comes_back_bit_for_bit():
    assert 256 * 256 >= MASKED_MIN_NUMEL
    x = torch.randn(2, 256)
    h = History(mlp(), example_input=x, measure_latency=False)
    base = bits(h.current)
    h.apply(nbcompress.PruneConfig(amount=0.5), progress=False)
    pruned = bits(h.current)
    v = h.versions[1]
    assert set(v.deltas) == {"0.weight", "2.weight"}          # 256x256: compact; 10x256: copied
    full = _model_bytes(h.current)
    # the two large weights cost a bit each instead of 4 bytes: the record is far smaller
    assert v.nbytes == full - 2 * (256 * 256 * 4 - 256 * 256 // 8)
    assert all(ph.numel() == 0 for ph, *_ in v.deltas.values())
    # the parent record's tensors are what the mask applies to, not copies of them
    assert v.deltas["0.weight"][1] is h.versions[0].record[0].weight
    for _ in range(2):
        h.undo()
        assert same_bits(h.current, base)
        h.redo()
        assert same_bits(h.current, pruned)
    # a step after it: the int8 record is its own; undo twice, redo twice
    h.apply(nbcompress.QuantizeConfig(), progress=False)
    h.undo()
    assert same_bits(h.current, pruned)
    h.undo()
    assert same_bits(h.current, base)
    h.redo(2)
    h.undo()
    assert same_bits(h.current, pruned)
    h.close()


def test_negative_zeros_training_in_place_and_spill():
    """The user zeroes weights by multiplying (negative weights become -0.0): the edit is
    recorded as a mask with the multiplication's signs; training in place after it is a new
    version and the masked one stays as it was; spilled to disk and read back, the same bits."""
    x = torch.randn(2, 256)
    net = mlp(1)
    h = History(net, example_input=x, measure_latency=False)
    with torch.no_grad():
        net[0].weight.mul_((net[0].weight.abs() > 0.03).float())
    assert bool((net[0].weight.view(torch.int32) == -2 ** 31).any())   # there are -0.0s
    h.sync()
    edited = bits(net)
    v = h.versions[1]
    assert v.technique == "edited" and v.deltas["0.weight"][3] == "sign"
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):                          # the user trains the live model in place
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    h.sync()
    assert len(h) == 3
    h.undo()
    assert same_bits(h.current, edited)
    h.host_budget_bytes = 0                     # every record to disk, the compact one too
    h.enforce_budget()
    assert v.where == "disk" and not v.deltas and v.record is None
    h.redo()
    h.undo()
    assert same_bits(h.current, edited)
    h.undo()
    h.redo()
    assert same_bits(h.current, edited)
    h.close()


def test_prune_twice_and_magic_undo(shell):
    """A record whose parent is itself compact is recorded as it is (correct, if not compact);
    the magics walk all of them."""
    shell.run_line_magic("load_ext", "nbcompress")
    shell.user_ns["net"] = mlp(2)
    shell.run_line_magic("nbcompress", "net --input-shape 1,256")
    snaps = [bits(shell.user_ns["net"])]
    for amount in ("0.5", "0.8"):
        shell.run_line_magic("prune", f"net {amount} --no-progress")
        snaps.append(bits(shell.user_ns["net"]))
    shell.run_line_magic("undo", "net 2")
    assert same_bits(shell.user_ns["net"], snaps[0])
    shell.run_line_magic("redo", "net")
    assert same_bits(shell.user_ns["net"], snaps[1])
    shell.run_line_magic("redo", "net")
    assert same_bits(shell.user_ns["net"], snaps[2])


def test_spilling_the_parent_spills_the_masked_record_first():
    """A compact record reads its parent record's tensors: when the parent goes to disk, the
    compact one goes first (written whole), so no tensor stays in memory that no version counts;
    both come back bit for bit."""
    x = torch.randn(2, 256)
    h = History(mlp(3), example_input=x, measure_latency=False)
    base = bits(h.current)
    h.apply(nbcompress.PruneConfig(amount=0.5), progress=False)
    pruned = bits(h.current)
    h.apply(nbcompress.PruneConfig(amount=0.7), progress=False)
    v0, v1 = h.versions[0], h.versions[1]
    assert v1.deltas and v1.delta_parent is v0
    h.host_budget_bytes = h._host_total() - 1      # the oldest record must go
    h.enforce_budget()
    assert v0.where == "disk" and v1.where == "disk" and not v1.deltas
    h.undo()
    assert same_bits(h.current, pruned)
    h.undo()
    assert same_bits(h.current, base)
    h.redo()
    assert same_bits(h.current, pruned)
    h.close()


def test_masked_bits_rebuild_exactly_or_refuse():
    """The compact check on its own, across chunk borders: whatever it accepts is rebuilt bit for
    bit (signed zeros, NaN payloads, r's own -0.0 kept), and what is not r with entries zeroed by
    one op is refused."""
    import numpy as np

    from nbcompress.fingerprint import _CHUNK, _masked_bits, rebuild_masked

    g = torch.Generator().manual_seed(0)
    n = _CHUNK + 1000                                     # two chunks
    r = torch.randn(n, generator=g)
    r[:50] = -0.0                                         # r's own negative zeros
    r[50:60] = float("nan")
    r.view(torch.int32)[60:70] |= 0x12345                 # odd NaN / denormal-like payloads
    keep = torch.rand(n, generator=g) < 0.5
    as_where = torch.where(keep, r, torch.zeros(()))      # +0.0 written (masked_fill)
    as_sign = r * keep                                    # a negative weight times 0 is -0.0
    late_sign = as_where.clone()
    late_sign[-1] = -0.0 if r[-1] < 0 else 0.0            # "where" fails only in the last chunk
    cases = {"where": as_where, "sign": as_sign, "late": late_sign}
    for name, t in cases.items():
        found = _masked_bits(t, r)
        assert found is not None, name
        packed, op = found
        back = rebuild_masked(r, packed, op, (n,))
        assert torch.equal(back.view(torch.int32), t.view(torch.int32)), name
    assert _masked_bits(cases["where"], r)[1] == "where"
    assert _masked_bits(cases["sign"], r)[1] == "sign" or bool((r >= 0).all())
    # refused: a changed value, a zero with the wrong sign under both ops, nothing zeroed
    bad = as_where.clone()
    bad[n - 5] = 3.0 if bad[n - 5] != 3.0 else 4.0
    assert _masked_bits(bad, r) is None
    mixed = as_sign.clone()
    neg = int(np.flatnonzero((r < 0).numpy() & ~keep.numpy())[0])
    pos = int(np.flatnonzero((r > 0).numpy() & ~keep.numpy())[0])
    mixed[pos] = -0.0                                     # -0.0 where r is positive: neither op
    mixed[neg] = 0.0
    assert _masked_bits(mixed, r) is None
    assert _masked_bits(r.clone(), r) is None
