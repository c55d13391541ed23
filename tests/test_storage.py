"""nbcompress.storage: safe architecture-included model files and their lossless packing."""
from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
import time

import numpy as np
import pytest
import torch
from torch import nn

from nbcompress import storage
from nbcompress.core import BadInput
from nbcompress.storage import breakdown, describe, load, register_module_codec, save


# ------------------------------------------------------------------------------ helpers

def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def roundtrip(model, **load_kw):
    buf = io.BytesIO()
    n = save(model, buf)
    assert n == buf.tell()
    buf.seek(0)
    return load(buf, **load_kw), buf.getvalue()


def assert_same_model(a: nn.Module, b: nn.Module):
    assert type(a) is type(b)
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    assert list(sa) == list(sb)
    for k in sa:
        assert same_bits(sa[k], sb[k]), k
        assert sa[k].requires_grad == sb[k].requires_grad, k
        assert isinstance(sb[k], nn.Parameter) == isinstance(sa[k], nn.Parameter), k
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()):
        assert na == nb and type(ma) is type(mb) and ma.training == mb.training, na
        assert set(ma._non_persistent_buffers_set) == set(mb._non_persistent_buffers_set)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                         nn.ReLU(), nn.Linear(100, 10))


def packed(t: torch.Tensor, huffman=True) -> dict:
    m = nn.Module()
    m.register_buffer("t", t)
    rows = breakdown(m, huffman=huffman)
    assert len(rows) == 1
    back, _ = roundtrip(m)
    assert same_bits(back.t, t)
    return rows[0]


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.scale = 0.5
        self.kinds = ("a", 1, 2.5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.scale * self.bn2(self.conv2(y)))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(Residual(8), Residual(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


# ------------------------------------------------------------------------------ round trips

def test_mlp_roundtrip_bit_identical(tmp_path):
    m = mlp()
    m[1].bias.requires_grad_(False)
    path = tmp_path / "m.nbc"
    save(m, path)
    m2 = load(path)
    assert_same_model(m, m2)
    assert not m2[1].bias.requires_grad and m2[1].weight.requires_grad
    x = torch.randn(7, 1, 28, 28)
    assert torch.equal(m(x), m2(x))
    # a str path and an open file work too
    assert_same_model(m, load(str(path)))
    with open(path, "rb") as f:
        assert_same_model(m, load(f))


def test_convnet_batchnorm_running_stats_and_modes():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(4 * 13 * 13, 10), nn.Dropout(0.3))
    for _ in range(3):                      # move running stats away from their init
        m(torch.randn(8, 1, 28, 28))
    assert int(m[1].num_batches_tracked) == 3
    m.eval()
    m[6].train()                            # mixed modes come back as saved
    m2, _ = roundtrip(m)
    assert_same_model(m, m2)
    assert not m2.training and m2[6].training and not m2[1].training
    assert int(m2[1].num_batches_tracked) == 3
    assert m2[1].num_batches_tracked.dtype == torch.int64
    m[6].eval(), m2[6].eval()
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(m(x), m2(x))
    assert m2[0].padding == (0, 0) and isinstance(m2[0].kernel_size, tuple)


def test_user_class_needs_classes_argument():
    torch.manual_seed(2)
    m = ResNetish().eval()
    m(torch.randn(2, 1, 8, 8))
    buf = io.BytesIO()
    save(m, buf)
    # one refusal names every class the file needs (not one per retry)
    with pytest.raises(BadInput, match=r"refusing to import \S*ResNetish, \S*Residual from file; "
                                       r"pass classes=\[ResNetish, Residual\]"):
        load(io.BytesIO(buf.getvalue()))
    with pytest.raises(BadInput, match=r"refusing to import \S*Residual from file"):
        load(io.BytesIO(buf.getvalue()), classes=[ResNetish])
    m2 = load(io.BytesIO(buf.getvalue()), classes=[ResNetish, Residual])
    assert_same_model(m, m2)
    assert m2.blocks[0].kinds == ("a", 1, 2.5) and type(m2.blocks[0].scale) is float
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(m(x), m2(x))
    # trusted_modules also admits a whole module
    m3 = load(io.BytesIO(buf.getvalue()), trusted_modules=[ResNetish.__module__])
    assert torch.equal(m(x), m3(x))


def test_attributes_keep_types():
    m = nn.Linear(3, 2)
    m.cfg = {"a": [1, 2.0, None], "b": (True, "x"), "inf": float("inf"), "nan": float("nan"),
             "ninf": -math.inf, "dt": torch.bfloat16, "size": torch.Size([2, 3]),
             "dev": torch.device("cpu"), "big": 2 ** 70}
    m.empty_tuple = ()
    m2, _ = roundtrip(m)
    c = m2.cfg
    assert c["a"] == [1, 2.0, None] and type(c["a"][1]) is float
    assert c["b"] == (True, "x") and type(c["b"]) is tuple
    assert c["inf"] == math.inf and math.isnan(c["nan"]) and c["ninf"] == -math.inf
    assert c["dt"] is torch.bfloat16 and c["size"] == torch.Size([2, 3])
    assert type(c["size"]) is torch.Size and c["dev"] == torch.device("cpu")
    assert c["big"] == 2 ** 70 and m2.empty_tuple == ()


def test_tied_weights_stored_once_and_come_back_tied():
    torch.manual_seed(3)
    emb = nn.Embedding(50, 16)
    out = nn.Linear(16, 50, bias=False)
    out.weight = emb.weight
    m = nn.Sequential(emb, out)
    rows = breakdown(m)
    assert len(rows) == 1 and rows[0]["aliases"] == ["1.weight"]
    m2, _ = roundtrip(m)
    assert m2[0].weight is m2[1].weight
    assert len(list(m2.parameters())) == 1
    x = torch.randint(0, 50, (4, 7))
    assert torch.equal(m(x), m2(x))


def test_views_of_one_storage_share_again():
    m = nn.Module()
    base = torch.arange(12, dtype=torch.float32)
    m.register_buffer("a", base[:8].view(2, 4))
    m.register_buffer("b", base[4:].view(4, 2).t())      # overlapping, transposed view
    m2, _ = roundtrip(m)
    assert same_bits(m2.a, m.a) and same_bits(m2.b, m.b)
    assert m2.b.stride() == m.b.stride()
    m2.a[1, 0] = 100.0                                   # element 4 of the storage
    assert m2.b[0, 0].item() == 100.0


def test_shared_submodule_identity():
    act = nn.ReLU()
    m = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act)
    m2, _ = roundtrip(m)
    assert m2[1] is m2[3]


def test_nonpersistent_buffers_kept_and_marked():
    m = nn.Linear(4, 3)
    m.register_buffer("scratch", torch.full((3,), -0.0), persistent=False)
    m.register_buffer("none_buf", None)
    m2, _ = roundtrip(m)
    assert "scratch" not in m2.state_dict() and "scratch" in m2._non_persistent_buffers_set
    assert same_bits(m2.scratch, m.scratch)
    assert "none_buf" in m2._buffers and m2.none_buf is None


def test_lstm_and_transformer_roundtrip():
    torch.manual_seed(4)
    m = nn.ModuleDict({"rnn": nn.LSTM(5, 6, num_layers=2, bidirectional=True),
                       "enc": nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)})
    m.eval()
    m2, _ = roundtrip(m)
    x = torch.randn(4, 3, 5)
    assert torch.equal(m["rnn"](x)[0], m2["rnn"](x)[0])
    y = torch.randn(4, 3, 8)
    assert torch.equal(m["enc"](y), m2["enc"](y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                   torch.bool, torch.complex64])
def test_dtypes_roundtrip_bit_exact(dtype):
    torch.manual_seed(5)
    if dtype == torch.bool:
        t = torch.rand(37, 5) > 0.7
    elif dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(37, 5, dtype=dtype)
        t[torch.rand(37, 5) < 0.5] = 0
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -100), min(info.max, 100), (37, 5), dtype=dtype)
    for tensor in (t, t[0, 0].clone(), t[:0], t.t()):
        packed(tensor)


def test_negative_zero_and_nan_payloads_survive():
    t = torch.tensor([0.0, -0.0, 1.0, float("nan"), 0.0, -0.0] * 50)
    raw = t.view(torch.int32)
    raw[3] = 0x7FC01234                         # a NaN with a payload
    raw[9] = -0x00400001                        # a negative NaN
    for huffman in (True, False):
        packed(t, huffman=huffman)


# ------------------------------------------------------------------------------ packing sizes

def test_sparse_float_packs_far_below_dense():
    torch.manual_seed(6)
    n = 100_000
    w = torch.randn(n)
    w = torch.where(torch.rand(n) < 0.9, torch.zeros(()), w)
    nnz = int(torch.count_nonzero(w))
    row = packed(w)
    # the bitmask alone gives n/8 + 4*nnz bytes; gaps can only do better
    assert row["bytes"] <= n // 8 + 4 * nnz
    assert row["bytes"] / (4 * n) < 0.135
    assert row["raw"] == 4 * nnz                # distinct random floats: raw values
    assert row["positions"] < n // 8            # gap coding beats a bitmask at 10% density
    assert row["encoding"].startswith("gaps")


def test_32_value_codebook_about_5_bits_and_huffman_on_skew():
    torch.manual_seed(7)
    n = 100_000
    book = torch.linspace(0.01, 1.0, 32)
    uniform = book[torch.randint(0, 32, (n,))]
    row = packed(uniform, huffman=False)
    assert row["encoding"] == "dense/codebook"
    assert row["codebook"] == 32 * 4 and row["indices"] == math.ceil(n * 5 / 8)
    assert row["bytes"] == 32 * 4 + math.ceil(n * 5 / 8)
    # skewed: geometric-like frequencies; Huffman is well below 5 bits per element
    p = 0.5 ** torch.arange(1, 33, dtype=torch.float64)
    skew = book[torch.multinomial(p / p.sum(), n, replacement=True)]
    fixed = packed(skew, huffman=False)
    huff = packed(skew, huffman=True)
    assert huff["encoding"] == "dense/codebook+huffman"
    counts = np.bincount(torch.bucketize(skew, book).numpy(), minlength=32)
    probs = counts[counts > 0] / n
    entropy_bytes = float(-(probs * np.log2(probs)).sum()) * n / 8
    assert huff["indices"] < entropy_bytes * 1.05 + 1
    assert huff["bytes"] < 0.55 * fixed["bytes"]   # ~2 bits vs 4 bits (17 values occur)


def test_int8_codes_pack_at_about_4_bits():
    torch.manual_seed(8)
    n = 65_536
    codes = torch.randint(-8, 8, (n,), dtype=torch.int8)
    codes[codes == 0] = 1                       # 15 distinct nonzero codes plus a few ...
    codes[:16] = torch.arange(-8, 8, dtype=torch.int8)   # ... all 16 present
    row = packed(codes, huffman=False)
    assert row["bytes"] <= 16 + n // 2 + 1
    row = packed(codes)
    assert row["bytes"] / n * 8 <= 4.01


def test_module_flag_turns_huffman_off():
    torch.manual_seed(11)
    n = 20_000
    p = 0.5 ** torch.arange(1, 17, dtype=torch.float64)
    codes = torch.multinomial(p / p.sum(), n, replacement=True).to(torch.int8) + 1
    m = nn.Module()
    m.register_buffer("codes", codes)
    assert breakdown(m)[0]["encoding"] == "dense/codebook+huffman"
    m.nbc_huffman = False                       # e.g. %quantize without --huffman
    assert breakdown(m)[0]["encoding"] == "dense/codebook"
    back, _ = roundtrip(m)
    assert torch.equal(back.codes, codes) and back.nbc_huffman is False


def test_int8_sparse_codes_and_bool():
    torch.manual_seed(9)
    codes = torch.randint(-7, 8, (300, 100), dtype=torch.int8)
    codes[torch.rand(300, 100) < 0.8] = 0
    packed(codes)
    mask = torch.rand(1000) < 0.05
    row = packed(mask)                          # only positions: all values are True
    assert row["indices"] == 0 and row["raw"] == 0 and row["bytes"] < 1000 // 8


def test_long_gaps_use_fillers_losslessly():
    t = torch.zeros(1_000_000)
    t[[0, 5, 70_000, 70_001, 999_999]] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    for huffman in (True, False):
        row = packed(t, huffman=huffman)
        assert row["bytes"] < 100
    t[:] = 0
    row = packed(t)                             # all zeros: nothing but the shape
    assert row["bytes"] == 0


def test_huffman_codec_roundtrip_and_speed():
    rng = np.random.default_rng(0)
    n = 300_000
    syms = np.minimum(rng.geometric(0.15, n) - 1, 999)
    counts = np.bincount(syms, minlength=1000)
    lens = storage.bits._huffman_lengths(counts)
    assert lens.max() <= storage.bits._HUFF_LIMIT
    assert sum(2.0 ** -lens[lens > 0]) <= 1.0
    buf = storage.bits._huffman_encode(syms, lens)
    bits = int((counts * lens).sum())
    # the code bits plus one u32 start offset per block of 2048 symbols after the first
    expected = (bits + 7) // 8 + 4 * (-(-n // 2048) - 1)
    assert len(buf) == storage.bits._huffman_bytes(n, bits) == expected
    t0 = time.perf_counter()
    out = storage.bits._huffman_decode(buf, lens, n)
    dt = time.perf_counter() - t0
    assert np.array_equal(out, syms)
    assert dt < 1.0
    # a very skewed distribution gets its code lengths limited
    counts = np.array([2 ** 40] + [1] * 30 + [2 ** i for i in range(30)], dtype=np.int64)
    lens = storage.bits._huffman_lengths(counts)
    assert lens.max() <= storage.bits._HUFF_LIMIT and sum(2.0 ** -lens) <= 1.0
    # single-block streams (a Python loop) and a final partial block decode too
    for m in (1, 7, 2048, 2049, 5000):
        part = syms[:m]
        lens = storage.bits._huffman_lengths(np.bincount(part, minlength=1000))
        buf = storage.bits._huffman_encode(part, lens)
        assert np.array_equal(storage.bits._huffman_decode(buf, lens, m), part)


# ------------------------------------------------------------------------------ reports

def test_describe_sums_to_file_size_minus_header(tmp_path):
    m = mlp()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.where(torch.rand_like(p) < 0.9, torch.zeros(()), p))
    path = tmp_path / "m.nbc"
    size = save(m, path)
    assert size == os.path.getsize(path)
    rows = describe(path)
    data = path.read_bytes()
    (hlen,) = struct.unpack("<I", data[4:8])
    # overhead = 4 magic bytes + 4-byte header length + the (zlib-compressed) JSON header
    assert sum(r["bytes"] for r in rows) == size - 8 - hlen
    assert storage.overhead_bytes(path) == 8 + hlen
    for r in rows:
        assert r["bytes"] == r["positions"] + r["indices"] + r["codebook"] + r["raw"]
    assert [r["name"] for r in rows] == [k for k in m.state_dict()]
    assert rows == breakdown(m)
    raw = zlib.decompress(data[8:8 + hlen])
    assert len(raw) > 2 * hlen                          # the header compresses well
    header = json.loads(raw)
    assert header["root"]["class"] == "torch.nn.modules.container.Sequential"


def test_plain_json_header_still_loads_and_bad_compressed_header_is_an_error(tmp_path):
    """Files may carry the header uncompressed (it starts with '{'): same model. A compressed
    header that does not inflate, or inflates to more than it should, is an error."""
    m = mlp()
    data = storage.saver._build(m, True)
    (hlen,) = struct.unpack("<I", data[4:8])
    raw = zlib.decompress(data[8:8 + hlen])
    plain = data[:4] + struct.pack("<I", len(raw)) + raw + data[8 + hlen:]
    x = torch.randn(3, 784)
    assert torch.equal(load(io.BytesIO(plain))(x), m(x))
    bad = bytearray(data)
    bad[8 + hlen // 2] ^= 0x10
    with pytest.raises(BadInput, match="corrupt nbcompress file"):
        load(io.BytesIO(bytes(bad)))
    trailing = zlib.compress(raw) + b"xx"
    with pytest.raises(BadInput, match="header does not decompress"):
        load(io.BytesIO(data[:4] + struct.pack("<I", len(trailing)) + trailing + data[8 + hlen:]))


def test_packed_bytes_equals_file_size(tmp_path):
    from nbcompress.metrics import packed_bytes

    m = mlp()
    path = tmp_path / "m.nbc"
    save(m, path)
    assert packed_bytes(m) == os.path.getsize(path)


def test_save_266k_mlp_is_fast():
    m = mlp()
    assert sum(p.numel() for p in m.parameters()) == 266_610
    with torch.no_grad():
        book = torch.linspace(-0.1, 0.1, 32)
        for p in m.parameters():
            p.copy_(torch.where(torch.rand_like(p) < 0.9, torch.zeros(()),
                                book[torch.randint(0, 32, p.shape)]))
    save(m, io.BytesIO())                       # warm-up
    t0 = time.perf_counter()
    n = save(m, io.BytesIO())
    assert time.perf_counter() - t0 < 1.0
    assert n < 0.05 * 266_610 * 4


# ------------------------------------------------------------------------------ refusals

def _with_class(data: bytes, new_class: str) -> bytes:
    (hlen,) = struct.unpack("<I", data[4:8])
    header = json.loads(zlib.decompress(data[8:8 + hlen]))
    header["root"]["class"] = new_class
    hb = json.dumps(header).encode()
    return data[:4] + struct.pack("<I", len(hb)) + hb + data[8 + hlen:]


@pytest.mark.parametrize("bad", ["os.system", "builtins.eval", "subprocess.Popen",
                                 "torch.nn.modules.module.torch.Tensor", "torch.nn.functional.relu",
                                 "torch.nn.modules.linear.os.system", "nbcompress.storage.load"])
def test_malicious_class_names_refused(bad):
    _, data = roundtrip(nn.Linear(2, 2))
    with pytest.raises(BadInput) as e:
        load(io.BytesIO(_with_class(data, bad)))
    if not bad.startswith(("torch.nn", "nbcompress")):
        assert "refusing to import" in str(e.value)


def test_garbage_and_truncated_files(tmp_path):
    _, data = roundtrip(mlp())
    with pytest.raises(BadInput, match="not an nbcompress file"):
        load(io.BytesIO(os.urandom(2000)))
    with pytest.raises(BadInput, match="not an nbcompress file"):
        load(io.BytesIO(b""))
    for cut in (3, 6, 100, len(data) - 1):
        with pytest.raises(BadInput, match="truncated"):
            load(io.BytesIO(data[:cut]))
    p = tmp_path / "junk.nbc"
    p.write_bytes(b"NBC1" + struct.pack("<I", 5) + b"{not json")
    with pytest.raises(BadInput, match="corrupt|truncated"):
        load(p)
    with pytest.raises(BadInput, match="no such file"):
        load(tmp_path / "missing.nbc")
    # flipped bytes in the data never crash with anything but BadInput (or load fine)
    rng = np.random.default_rng(0)
    _, small = roundtrip(nn.Sequential(nn.Linear(20, 20), nn.ReLU()))
    (hlen,) = struct.unpack("<I", small[4:8])
    for _ in range(30):
        b = bytearray(small)
        i = int(rng.integers(8 + hlen, len(b)))
        b[i] ^= 0xFF
        try:
            load(io.BytesIO(bytes(b)))
        except BadInput:
            pass


def test_unsupported_attribute_named_at_save_time():
    m = mlp()
    m[1].hook = lambda x: x
    with pytest.raises(BadInput, match=r"cannot save model\.1 \(Linear\): attribute 'hook' is a "
                                       r"function"):
        save(m, io.BytesIO())
    m = mlp()
    m[3].cfg = {"ok": 1, "bad": (i for i in range(2))}
    with pytest.raises(BadInput, match=r"model\.3 \(Linear\): attribute 'cfg' contains a generator"):
        save(m, io.BytesIO())
    m = mlp()
    m.stray = torch.zeros(3)
    with pytest.raises(BadInput, match=r"model \(Sequential\): attribute 'stray' is a Tensor"):
        save(m, io.BytesIO())


def test_parametrized_and_pruned_modules_refused():
    from torch.nn.utils import parametrize, prune

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    m = nn.Sequential(nn.Linear(3, 3))
    parametrize.register_parametrization(m[0], "weight", Double())
    with pytest.raises(BadInput, match="parametrizations.*remove"):
        save(m, io.BytesIO())
    m = nn.Sequential(nn.Linear(3, 3))
    prune.l1_unstructured(m[0], "weight", 0.5)
    with pytest.raises(BadInput, match=r"model\.0 \(Linear\).*prune\.remove"):
        save(m, io.BytesIO())


# ------------------------------------------------------------------------------ extension hooks

class PackedLinear(nn.Module):
    """Stand-in for a layer whose state is not plain params/buffers."""

    def __init__(self, codes: torch.Tensor, scale: float):
        super().__init__()
        self.state = {"codes": codes, "scale": scale}     # not saveable as an attribute

    def forward(self, x):
        return x @ (self.state["codes"].float() * self.state["scale"]).t()


class SelfCodecLinear(PackedLinear):
    def nbc_export(self):
        return {"scale": self.state["scale"]}, {"codes": self.state["codes"]}

    @classmethod
    def nbc_import(cls, attrs, tensors):
        return cls(tensors["codes"], attrs["scale"])


def test_registered_codec_and_method_codec():
    torch.manual_seed(10)
    codes = torch.randint(-8, 8, (6, 4), dtype=torch.int8)
    m = nn.Sequential(PackedLinear(codes, 0.25), nn.ReLU(),
                      SelfCodecLinear(torch.randint(-8, 8, (3, 6), dtype=torch.int8), 0.5))
    with pytest.raises(BadInput, match="attribute 'state' contains a Tensor"):
        save(m, io.BytesIO())
    def export(mod):
        return {"scale": mod.state["scale"]}, {"codes": mod.state["codes"]}

    register_module_codec(PackedLinear, export,
                          lambda attrs, tensors: PackedLinear(tensors["codes"], attrs["scale"]))
    try:
        m.eval()
        m2, _ = roundtrip(m, classes=[SelfCodecLinear])
        assert type(m2[0]) is PackedLinear and type(m2[2]) is SelfCodecLinear
        assert not m2[0].training
        x = torch.randn(2, 4)
        assert torch.equal(m(x), m2(x))
        names = [r["name"] for r in breakdown(m)]
        assert names == ["0.codes", "2.codes"]
    finally:
        storage.format._CODECS.pop(PackedLinear, None)


def test_map_location_and_bad_arguments():
    m = nn.Linear(3, 3)
    m2, _ = roundtrip(m, map_location=torch.device("cpu"))
    assert m2.weight.device.type == "cpu"
    with pytest.raises(BadInput):
        save(object(), io.BytesIO())
    with pytest.raises(BadInput):
        save(m, 42)


@pytest.mark.parametrize("name, cls_path", [
    ("int8_dynamic", "nbcompress.techniques.quantize.qmodules_int8.DynamicInt8Linear"),
    ("uniform4", "nbcompress.techniques.quantize.qmodules.QuantizedWeightLayer"),
    ("mlp_student", "nbcompress.techniques.distill.students.MLPStudent"),
    ("early_exit", "nbcompress.techniques.earlyexit.model.EarlyExitModel"),
])
def test_files_written_before_the_techniques_moved_still_load(name, cls_path):
    """tests/data/before_move_*.nbc were written by nbcompress at e78566b, when these classes
    lived in nbcompress.qmodules / nbcompress.distill / nbcompress.earlyexit: they load as the
    classes' new homes and compute what they computed then."""
    import pathlib

    here = pathlib.Path(__file__).parent / "data"
    raw = (here / f"before_move_{name}.nbc").read_bytes()
    old_module = {"int8_dynamic": "nbcompress.qmodules", "uniform4": "nbcompress.qmodules",
                  "mlp_student": "nbcompress.distill", "early_exit": "nbcompress.earlyexit"}[name]
    header, _ = storage.format._read(io.BytesIO(raw))
    assert old_module + "." in json.dumps(header)           # the file names the old path
    model = load(io.BytesIO(raw))
    found = {f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()}
    assert cls_path in found
    ref = torch.load(here / f"before_move_{name}.pt", weights_only=True)
    model.eval()
    with torch.no_grad():
        y = model(ref["x"])
    y = y[0] if isinstance(y, tuple) else y
    assert torch.allclose(y, ref["y"], atol=1e-6, rtol=1e-6)
