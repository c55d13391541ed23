"""Storage at scale (issue 16, part 2): the encoding search's shortcuts choose exactly what the
full search chooses, packed_size is exactly len(save) without writing (and re-encodes only what
changed), CRC-32 combination, streamed load, and faults during save leave nothing behind."""
from __future__ import annotations

import copy
import io
import os
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import nbcompress
from nbcompress import History, PruneConfig
from nbcompress.core import BadInput
from nbcompress.fingerprint import MEMO, _same_state
from nbcompress.storage import codec, gaps, load, pack, packed_size, save, saver


def lenet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.ReLU(),
                         nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def saved(model, huffman=True) -> bytes:
    buf = io.BytesIO()
    n = save(model, buf, huffman=huffman)
    assert n == buf.tell()
    return buf.getvalue()


def same_state(a, b):
    assert type(a) is type(b)
    assert _same_state(a, b)                # bit for bit, NaNs included


# ------------------------------------------------------------------------------ CRC-32

def test_crc32_combine_equals_crc_of_the_concatenation():
    rng = np.random.default_rng(0)
    for la, lb in [(0, 0), (0, 5), (5, 0), (1, 1), (17, 1000), (3, 1 << 16), (100, 1_234_567)]:
        a = rng.integers(0, 256, la, dtype=np.uint8).tobytes()
        b = rng.integers(0, 256, lb, dtype=np.uint8).tobytes()
        assert pack.crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b)
    parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (7, 0, 4096, 33, 1)]
    crc = 0
    for p in parts:
        crc = pack.crc32_combine(crc, zlib.crc32(p), len(p))
    assert crc == zlib.crc32(b"".join(parts))


# ------------------------------------------------------------------------------ the search

def _spread():
    g = torch.Generator().manual_seed(0)
    n = 300_000                             # above the sample size, so the shortcuts run
    dense = torch.randn(n, generator=g)
    out = {"dense": dense, "dense_f64": torch.randn(n, generator=g, dtype=torch.float64)}
    for frac in (0.5, 0.9, 0.999):
        out[f"pruned{frac}"] = torch.where(torch.rand(n, generator=g) < frac, 0.0, dense)
    few_zeros = dense.clone()
    few_zeros[::5000] = 0
    out["few_zeros"] = few_zeros
    out["some_zeros"] = torch.where(torch.rand(n, generator=g) < 0.05, 0.0, dense)
    out["int8_codes"] = torch.randint(-128, 128, (n,), generator=g, dtype=torch.int8)
    codes = torch.clamp(torch.randn(n, generator=g) * 40, -127, 127).round().to(torch.int8)
    out["int8_pruned_codes"] = torch.where(torch.rand(n, generator=g) < 0.5, 0, codes)
    # 128 distinct nonzero codes (a 7-bit codebook beats raw bytes) and 129 (it cannot)
    out["int8_2_of_4"] = torch.where(torch.arange(n) % 4 < 2, codes, 0).masked_fill(codes == 0, 1)
    tail = out["int8_pruned_codes"].clone()
    tail[-64:] = 0                                   # trailing zeros: 1-bit gaps beat the mask
    out["int8_trailing_zeros"] = tail
    out["int8_30pct"] = torch.where(torch.rand(n, generator=g) < 0.3, codes, 0)
    out["int8_128_values"] = torch.randint(-64, 64, (n,), generator=g, dtype=torch.int8)
    out["int8_129_values"] = torch.randint(-64, 65, (n,), generator=g, dtype=torch.int8)
    out["int32_codes"] = torch.randint(-7, 8, (n,), generator=g, dtype=torch.int32)
    out["few_values"] = torch.randint(0, 16, (n,), generator=g).float() * 0.125
    out["few_values_sparse"] = torch.where(torch.rand(n, generator=g) < 0.8, 0.0,
                                           out["few_values"])
    k70k = torch.randint(0, 70_000, (n,), generator=g).float()     # just over a codebook
    out["70k_values"] = k70k
    out["65k_values_and_zero"] = torch.where(k70k < 65_536, k70k, 0.0)
    special = dense.clone()
    special[::3] = -0.0
    special[1::7] = float("nan")
    special[2::11] = 0.0
    out["neg_zero_nan"] = special
    out["fp16"] = torch.randn(n, generator=g).half()
    out["bf16_pruned"] = torch.where(torch.rand(n, generator=g) < 0.6, 0.0, dense).bfloat16()
    out["bool"] = torch.rand(n, generator=g) < 0.1
    out["long_gaps"] = torch.zeros(3_000_000).index_fill_(0, torch.tensor([0, 5, 2_000_000]), 1.0)
    return out


@pytest.mark.parametrize("huffman", [True, False])
def test_shortcuts_choose_exactly_what_the_full_search_chooses(huffman):
    for name, t in _spread().items():
        u = codec._bits_of(t)
        fast, rec_fast = codec._encode(u, u.dtype.itemsize, huffman, fast=True)
        full, rec_full = codec._encode(u, u.dtype.itemsize, huffman, fast=False)
        assert rec_fast == rec_full, name
        assert [bytes(s) for s in fast] == [bytes(s) for s in full], name
        back = codec._decode([bytes(s) for s in fast], rec_fast, u.size, u.dtype.itemsize)
        assert np.array_equal(back, u), name


def test_the_shortcuts_skip_the_sort_where_it_is_provable(monkeypatch):
    """A dense float tensor is planned without sorting it (no codebook, by a sample) and without
    a sparse search (no zeros, or too few to pay for a mask)."""
    sorted_sizes = []
    real_sort = np.sort
    monkeypatch.setattr(codec.np, "sort", lambda a, *k, **kw: (sorted_sizes.append(a.size),
                                                               real_sort(a, *k, **kw))[1])
    t = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    t[::10_000] = 0
    u = codec._bits_of(t)
    plan, scratch = codec._plan(u, 4, True)
    assert plan["rec"] == {"pos": "dense", "val": "raw", "nnz": int(torch.count_nonzero(t))}
    assert plan["rec"]["nnz"] <= 1_000_000 - 100
    assert max(sorted_sizes) < 300_000 and "d" not in scratch


def test_int8_codes_of_a_real_layer_are_planned_without_counting_every_byte(monkeypatch):
    """Without Huffman codes (int8 layers), a byte tensor whose sample already has more than 128
    distinct nonzero values cannot use a codebook: its plan skips the exact count; one with 128
    values is counted and gets its 7-bit codebook."""
    counted = []
    real = codec._distinct
    monkeypatch.setattr(codec, "_distinct", lambda u, isz: (counted.append(u.size),
                                                             real(u, isz))[1])
    g = torch.Generator().manual_seed(1)
    w = torch.randn(768, 768, generator=g)
    w = torch.where(w.abs() < 0.67, 0.0, w)                     # pruned about half
    scale = w.abs().amax(1, keepdim=True) / 127
    codes = torch.round(w / scale).to(torch.int8)               # absmax per row, as int8 layers
    plan, _ = codec._plan(codec._bits_of(codes), 1, huffman=False)
    assert plan["rec"]["val"] == "raw" and plan["rec"]["pos"] == "bitmask" and counted == []
    few = torch.randint(-64, 64, (768, 768), generator=g, dtype=torch.int8)
    plan, _ = codec._plan(codec._bits_of(few), 1, huffman=False)
    assert plan["rec"]["val"] == "codebook" and plan["rec"]["idx_bits"] == 7
    assert counted == [few.numel()]


def test_the_gap_bound_never_refuses_a_gap_coding_that_would_win():
    """``fixed_gaps_lose`` (no fixed-width gap coding beats the bitmask, proved without the gaps'
    histogram) agrees with the exact search whenever it says so, on random masks of every
    density, structured masks, runs and trailing zeros; and it does decide pruned int8 codes."""
    rng = np.random.default_rng(0)
    decided = 0
    for trial in range(300):
        n = int(rng.integers(8, 5000))
        kind = trial % 4
        if kind == 0:
            m = rng.random(n) < rng.uniform(0.05, 0.95)
        elif kind == 1:                         # repeating patterns (N:M sparsity and others)
            period = int(rng.integers(2, 12))
            m = np.resize(rng.random(period) < 0.5, n)
        elif kind == 2:                         # runs of zeros of random lengths
            m = np.repeat(rng.random(n // 4 + 1) < 0.5, rng.integers(1, 8, n // 4 + 1))[:n]
        else:                                   # dense with trailing zeros
            m = rng.random(n) < 0.6
            m[n - int(rng.integers(0, 40)):] = False
        u = (m * rng.integers(1, 256, m.size)).astype(np.uint8)
        nnz = int(np.count_nonzero(u))
        if nnz == 0:
            continue
        budget = (u.size + 7) // 8
        exact = codec._plan_gaps(codec._gaps(np.flatnonzero(u)), False, budget)
        if gaps.fixed_gaps_lose(u, nnz, budget):
            decided += 1
            assert exact is None, (trial, kind)
    assert decided > 50
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1024, 1024, generator=g)
    codes = torch.round(torch.where(w.abs() < 0.67, 0.0, w) / w.abs().amax(1, keepdim=True)
                        * 127).to(torch.int8)
    u = codec._bits_of(codes)
    assert gaps.fixed_gaps_lose(u, int(np.count_nonzero(u)), (u.size + 7) // 8)


# ------------------------------------------------------------------------------ packed_size

@pytest.mark.parametrize("huffman", [True, False])
def test_segment_lengths_come_from_the_plan_alone(huffman):
    """Measuring a packed size writes no bytes: every segment's length follows from the plan."""
    for name, t in _spread().items():
        u = codec._bits_of(t)
        plan, scratch = codec._plan(u, u.dtype.itemsize, huffman)
        segs = codec._emit(u, u.dtype.itemsize, plan, scratch)
        assert codec._seg_lengths(plan, u.size, u.dtype.itemsize) == [len(x) for x in segs], name


def test_packed_size_encodes_nothing_and_a_file_length_does_not_depend_on_its_crc(monkeypatch):
    from nbcompress.storage import format as fmt

    MEMO.clear()
    m = nbcompress.prune(lenet(), 0.8)
    n = len(saved(m))
    MEMO.clear()
    monkeypatch.setattr(codec, "_emit", lambda *a, **k: pytest.fail("packed_size encoded bytes"))
    import nbcompress.storage.pack as pack_mod
    monkeypatch.setattr(pack_mod, "_emit", codec._emit)
    assert packed_size(m) == n
    monkeypatch.undo()
    hb = saved(m)
    head_len = int.from_bytes(hb[4:8], "little")
    header = zlib.decompress(hb[8:8 + head_len])
    for digits in (b"00000000", b"ffffffff", b"0123abcd"):
        other = header[:fmt._CRC_AT] + digits + header[fmt._CRC_AT + 8:]
        assert zlib.decompress(fmt._deflate_header(other)) == other
        assert len(fmt._deflate_header(other)) == head_len


def _gpt2_tied():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    assert m.lm_head.weight is m.transformer.wte.weight
    return m


def _models():
    base = lenet()
    out = {"lenet": base, "pruned": nbcompress.prune(base, 0.8),
           "int8": nbcompress.quantize(lenet()),
           "4bit": nbcompress.quantize(lenet(), bits=4),
           "structured": nbcompress.prune(lenet(), 0.5, structured=True,
                                          example_input=torch.randn(1, 1, 28, 28)),
           "gpt2_tied": _gpt2_tied()}
    return out


def test_packed_size_is_exactly_the_saved_length():
    MEMO.clear()
    for name, m in _models().items():
        for huffman in (True, False):
            assert packed_size(m, huffman=huffman) == len(saved(m, huffman)), name
            assert packed_size(m, huffman=huffman) == len(saved(m, huffman)), name  # remembered
        assert nbcompress.counting.packed_bytes(m) == len(saved(m)), name
        same_state(load(io.BytesIO(saved(m))), m)


def test_packed_size_follows_edits_copies_and_undo(monkeypatch):
    MEMO.clear()
    m = lenet()
    first = packed_size(m)
    planned = []
    real = codec._plan
    monkeypatch.setattr(pack, "_plan", lambda u, *a, **k: (planned.append(u.size),
                                                           real(u, *a, **k))[1])
    assert packed_size(m) == first and planned == []            # nothing encoded again
    with torch.no_grad():
        m[7].weight[:60] = 0                                     # an in-place edit of one layer
    assert packed_size(m) == len(saved(m)) < first
    assert planned[0] == m[7].weight.numel()
    planned.clear()
    m[9].weight.data.mul_(0)                                     # through .data
    assert packed_size(m) == len(saved(m))
    assert planned[0] == m[9].weight.numel()
    planned.clear()
    c = copy.deepcopy(m)
    size = packed_size(m)
    with torch.no_grad():
        c[0].weight.zero_()                     # the copy changes, the original does not
    assert packed_size(c) == len(saved(c)) < size
    assert packed_size(m) == size == len(saved(m))

    h = History(lenet(), measure_latency=False)
    sizes = [packed_size(h.current)]
    h.apply(PruneConfig(amount=0.7), progress=False)
    sizes.append(packed_size(h.current))
    assert sizes[1] < sizes[0] and sizes[1] == len(saved(h.current))
    h.undo()
    assert packed_size(h.current) == sizes[0] == len(saved(h.current))
    h.redo()
    assert packed_size(h.current) == sizes[1] == len(saved(h.current))
    h.close()


def test_a_stale_remembered_plan_is_planned_again():
    """A remembered codebook plan whose values changed without the memo noticing (a content-sum
    collision, simulated) is checked against the values: save plans again, the file is right."""
    MEMO.clear()
    m = nn.Module()
    m.register_buffer("w", torch.randint(0, 5, (10_000,)).float())
    save(m, io.BytesIO())
    entry = MEMO.results(m.w)[("pack", True)]
    assert entry["rec"]["val"] != "raw"
    m.w[0] = 7.0                                  # a value outside the remembered codebook
    MEMO.results(m.w)[("pack", True)] = entry     # ... as if the memo had not seen the change
    back = load(io.BytesIO(saved(m)))
    assert torch.equal(back.w, m.w)


class Views(nn.Module):
    def __init__(self):
        super().__init__()
        base = torch.randn(100, 10)
        self.a = nn.Parameter(base[:50])
        self.b = nn.Parameter(base[50:])


def test_views_of_one_storage_are_packed_and_sized():
    m = Views()
    assert packed_size(m) == len(saved(m))
    with torch.no_grad():
        m.b[0] = 0.0                        # a group of views is not remembered: sized afresh
    assert packed_size(m) == len(saved(m))
    back = load(io.BytesIO(saved(m)), classes=[Views])
    assert torch.equal(back.a, m.a) and torch.equal(back.b, m.b)


# ------------------------------------------------------------------------------ load

class _ReadOnly:
    """A file object with read() only (no readinto, no seek)."""
    def __init__(self, data):
        self.f = io.BytesIO(data)

    def read(self, n=-1):
        return self.f.read(n)


def test_load_streams_from_files_and_plain_readers(tmp_path):
    m = lenet()
    data = saved(m)
    same_state(load(_ReadOnly(data)), m)
    path = tmp_path / "m.nbc"
    assert save(m, path) == len(data) == path.stat().st_size
    same_state(load(path), m)
    for cut in (len(data) - 1, len(data) // 2):
        with pytest.raises(BadInput, match="truncated nbcompress file"):
            load(io.BytesIO(data[:cut]))
    path.write_bytes(data[:len(data) // 2])         # a file on disk: refused before reading
    with pytest.raises(BadInput, match="truncated nbcompress file"):
        load(path)
    bad = bytearray(data)
    bad[-100] ^= 1                                  # inside the last (dense raw) tensor
    with pytest.raises(BadInput, match="CRC-32"):
        load(io.BytesIO(bytes(bad)))


# ------------------------------------------------------------------------------ faults

def _explode_after(monkeypatch, n, exc):
    real = saver._write
    calls = {"n": 0}

    class Exploding:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            calls["n"] += 1
            if calls["n"] > n:
                raise exc
            return self.f.write(b)

    monkeypatch.setattr(saver, "_write", lambda f, *a: real(Exploding(f), *a))


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(1), RuntimeError("boom")])
def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch, exc):
    m = lenet()
    fresh, old = tmp_path / "fresh.nbc", tmp_path / "old.nbc"
    save(m, old)
    before = old.read_bytes()
    _explode_after(monkeypatch, 3, exc)
    for target in (fresh, old):
        with pytest.raises(type(exc)):
            save(nbcompress.prune(m, 0.5), target)
    assert not fresh.exists() and old.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["old.nbc"]          # no temporary file left


def test_disk_full_is_one_clear_error(tmp_path, monkeypatch):
    m = lenet()
    target = tmp_path / "m.nbc"
    save(m, target)
    before = target.read_bytes()
    _explode_after(monkeypatch, 2, OSError(28, "No space left on device"))
    with pytest.raises(BadInput, match=r"cannot write .*m.nbc: No space left on device"):
        save(nbcompress.prune(m, 0.5), target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["m.nbc"]


# ------------------------------------------------------------------------------ progress

def test_progress_bar_per_tensor(capsys, tmp_path, monkeypatch):
    m = lenet()
    save(m, tmp_path / "a.nbc", progress=True)
    err = capsys.readouterr().err
    assert "packing" in err and f"/{len(m.state_dict())}" in err
    load(tmp_path / "a.nbc", progress=True)
    assert "loading" in capsys.readouterr().err
    save(m, tmp_path / "a.nbc")                       # a small model: no bar by default
    load(tmp_path / "a.nbc", progress=None)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(pack, "_PROGRESS_BYTES", 1000)  # ... a large one gets one
    save(m, tmp_path / "a.nbc")
    assert "packing" in capsys.readouterr().err
    save(m, tmp_path / "a.nbc", progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(BadInput, match="progress must be"):
        save(m, tmp_path / "b.nbc", progress="yes")
    assert not (tmp_path / "b.nbc").exists()


def test_the_hashed_bound_never_exceeds_the_distinct_count():
    """The no-codebook proof counts filled hash buckets: a lower bound on the distinct values
    (equal values share a bucket), whatever the values."""
    g = np.random.default_rng(0)
    for s in (g.integers(0, 2**32, 80_000, dtype=np.uint64).astype(np.uint32),
              g.integers(0, 70_000, 90_000).astype(np.uint32),       # collisions galore
              np.repeat(np.arange(40_000, dtype=np.uint32), 3),
              g.integers(0, 2**63, 70_000, dtype=np.uint64)):
        assert codec._hashed_distinct(s) <= np.unique(s).size


@pytest.mark.parametrize("n", [1, 8, 9, 65_536, 65_537, 524_289, 3_000_000])
def test_streamed_gap_histogram_is_the_whole_tensors(n):
    """Measuring streams over a tensor in chunks (no position arrays the size of the tensor) and
    finds the same gap histogram, hence the same plan, as saving does on the whole tensor:
    gaps across chunk borders and gaps longer than the bincount range included."""
    g = np.random.default_rng(n)
    for density in (0.001, 0.1, 0.5, 0.97, 1.0):
        u = ((g.random(n) < density) * g.integers(1, 9, n)).astype(np.uint32)
        if n > 2_000_000:
            u[: 1_500_000] = 0                  # a first gap longer than 2**20
        if not u.any():
            continue
        v1, c1 = codec._gap_histogram(codec._gaps(np.flatnonzero(u)))
        o1 = np.argsort(v1)
        for v2, c2 in (codec._streamed_gap_histogram(u), codec._byte_gap_histogram(u)):
            o2 = np.argsort(v2)
            assert np.array_equal(v1[o1], v2[o2]) and np.array_equal(c1[o1], c2[o2])
        for huffman in (True, False):
            kept, _ = codec._plan(u, 4, huffman, keep=True)
            streamed, _ = codec._plan(u, 4, huffman, keep=False)
            assert kept["rec"] == streamed["rec"] and kept["size"] == streamed["size"]


def test_stream_crc_in_pieces_is_zlib_crc32_of_the_whole():
    """The load's CRC: big chunks checked in a thread pool in pieces, small ones inline, joined
    in order: the same number as zlib.crc32 over the whole stream, from any starting state."""
    import os as _os
    import zlib

    from nbcompress.storage.loader import _StreamCRC

    big = _StreamCRC.BIG
    chunks = [_os.urandom(n) for n in (10, big + 3, 5, 7, 3 * big + 1, big, 1, 0, 2 * big - 1)]
    for start in (0, 0x1234ABCD):
        s = _StreamCRC(start)
        for c in chunks:
            s.feed(memoryview(c))
        assert s.value() == zlib.crc32(b"".join(chunks), start)


def test_a_flipped_byte_in_a_big_tensor_is_refused(tmp_path):
    """A raw tensor over the pool's piece size (checked off the main thread): one flipped byte in
    its middle and the file is refused as corrupt; the intact file loads bit-identical."""
    import pytest

    import nbcompress
    from nbcompress import BadInput

    torch.manual_seed(0)
    m = torch.nn.Linear(1536, 1536)                      # 9.4 MB of float32 weights
    p = tmp_path / "big.nbc"
    nbcompress.save(m, p)
    back = nbcompress.load(p)
    assert torch.equal(back.weight, m.weight) and torch.equal(back.bias, m.bias)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    bad = tmp_path / "bad.nbc"
    bad.write_bytes(bytes(raw))
    with pytest.raises(BadInput, match="corrupt"):
        nbcompress.load(bad)
