"""Techniques at scale (issue 16, parts 4 and 5): int8 layers that are cheap to look at (their
plain form kept, never unpacked again), int8 weight-only and unstructured pruning on a bf16 GPT-2,
and the per-layer progress bars of large models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nbcompress
from nbcompress import layers as layers_mod
from nbcompress.core import compress
from nbcompress.errors import BadInput
from nbcompress.techniques.prune.config import PruneConfig
from nbcompress.techniques.quantize.config import QuantizeConfig
from nbcompress.techniques.quantize.int8_plain import count_qweight, qweight_export
from nbcompress.techniques.quantize.qmodules import QuantizedWeightLayer
from nbcompress.techniques.quantize.qmodules_int8 import DynamicInt8Linear, StaticInt8Conv2d

transformers = pytest.importorskip("transformers")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.ReLU(),
                         nn.Linear(32, 10, bias=False)).eval()


@pytest.fixture
def unpacks(monkeypatch):
    """How often torch.ao's Linear weight is unpacked."""
    calls = {"n": 0}
    real = torch.ops.quantized.linear_unpack

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.ops.quantized, "linear_unpack", counting)
    return calls


# ------------------------------------------------------------------ int8 layers: plain form kept
def test_int8_export_is_stable_and_equals_what_unpacking_gives(unpacks):
    m = _mlp()
    m[0].weight.data[:, :8] = 0.0                   # zeros to count
    q = nbcompress.quantize(m, per_channel=True)
    q2 = nbcompress.quantize(m, per_channel=False)
    for layer in (q[0], q[2], q[4], q2[0]):
        assert type(layer) is DynamicInt8Linear
        a1, t1 = layer.nbc_export()
        a2, t2 = layer.nbc_export()
        assert a1 == a2 and t1.keys() == t2.keys()
        assert all(t1[k] is t2[k] for k in t1)       # the same objects: MEMO skips them
        n0 = unpacks["n"]
        w, b = torch.ops.quantized.linear_unpack(layer._packed_params._packed_params)
        assert unpacks["n"] == n0 + 1
        ref, ref_attrs = qweight_export(w)            # what the old code exported
        assert {k: v for k, v in a1.items() if k.startswith("weight_")} == ref_attrs
        for k, v in ref.items():
            assert t1[k].dtype == v.dtype and torch.equal(t1[k], v)
        assert (b is None) == ("bias" not in t1)
        if b is not None:
            assert torch.equal(t1["bias"], b)
        assert layer.nbc_count() == count_qweight(w, b)
        assert torch.equal(layer.weight, w.dequantize())
    before = unpacks["n"]
    x = torch.randn(5, 64)
    for _ in range(2):
        for layer in (q[0], q[2], q[4]):
            layer.nbc_count(), layer.nbc_export(), layer.weight, layer.bias, repr(layer)
        q.state_dict()
        nbcompress.measure(q, x[:1])
    assert unpacks["n"] == before                     # looking never unpacks
    assert q[0].nbc_count()[1] < q[0].nbc_count()[0]  # the zeros are counted


def test_int8_deepcopy_does_not_unpack_and_carries_per_tensor_results(unpacks):
    q = nbcompress.quantize(_mlp())
    x = torch.randn(4, 64)
    n0 = unpacks["n"]
    memo: dict = {}
    c = copy.deepcopy(q, memo)
    assert unpacks["n"] == n0
    assert torch.equal(c(x), q(x))
    _, old = q[0].nbc_export()
    _, new = c[0].nbc_export()
    for k in old:
        assert memo[id(old[k])] is new[k] and new[k] is not old[k]
        assert torch.equal(new[k], old[k])
    # a copy is independent: changing its weight changes its plain form, not the original's
    w = torch.quantize_per_tensor(torch.zeros(96, 64), 0.1, 0, torch.qint8)
    c[0].set_weight_bias(w, None)
    assert c[0].nbc_count() == (96 * 64, 0) and "bias" not in c[0].nbc_export()[1]
    assert q[0].nbc_count()[1] > 0 and torch.equal(q[0].nbc_export()[1]["weight_int8"],
                                                    old["weight_int8"])


def test_int8_state_dict_round_trip_refreshes_the_plain_form():
    q, r = nbcompress.quantize(_mlp(0)), nbcompress.quantize(_mlp(1))
    x = torch.randn(3, 64)
    r.load_state_dict(q.state_dict())                 # torch.ao's own loading path
    assert torch.equal(r(x), q(x))
    for a, b in ((q[0], r[0]), (q[4], r[4])):
        ta, tb = a.nbc_export()[1], b.nbc_export()[1]
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert a.nbc_count() == b.nbc_count()


def test_static_int8_conv_keeps_its_plain_form():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 8 * 8, 10)).eval()
    from torch.utils.data import DataLoader, TensorDataset

    calib = DataLoader(TensorDataset(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)),
                       batch_size=4)
    q = nbcompress.quantize(m, calib=calib)
    conv = q[0]
    assert type(conv) is StaticInt8Conv2d
    t1, t2 = conv.nbc_export()[1], conv.nbc_export()[1]
    assert all(t1[k] is t2[k] for k in t1)
    w, b = conv._packed_params.unpack()
    assert torch.equal(t1["weight_int8"], w.int_repr()) and conv.nbc_count() == count_qweight(w, b)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(copy.deepcopy(q)(x), q(x))


# ------------------------------------------------------------------ a bf16 GPT-2
def _gpt2_bf16(n_layer=4):
    cfg = transformers.GPT2Config(n_embd=256, n_layer=n_layer, n_head=4, n_positions=64,
                                  vocab_size=512, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval().to(torch.bfloat16)


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


def test_bf16_gpt2_pruned_then_int8_weight_only_end_to_end(capsys):
    m = _gpt2_bf16()
    x = torch.randint(0, 512, (2, 12))
    y0 = _logits(m, x).float()
    p = nbcompress.prune(m, 0.5)
    assert p.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    blocks = [mod.weight for n, mod in p.named_modules() if n.startswith("transformer.h.")
              and hasattr(mod, "weight") and mod.weight.dim() == 2]
    zeros = sum(int((w == 0).sum()) for w in blocks)
    assert zeros == pytest.approx(0.5 * sum(w.numel() for w in blocks), abs=2)
    assert p.lm_head.weight is p.transformer.wte.weight           # tied, left whole
    assert int((p.transformer.wte.weight == 0).sum()) == 0
    assert torch.equal(m.transformer.h[0].mlp.c_fc.weight != 0,   # the original is untouched
                       torch.ones_like(m.transformer.h[0].mlp.c_fc.weight, dtype=torch.bool))

    r = compress(p, QuantizeConfig())
    q = r.model
    assert any("int8 weight-only" in n for n in r.notes) and any("tied" in n for n in r.notes)
    assert {row["kind"] for row in r.layers} == {"int8 weight-only"} and len(r.layers) == 16
    fc = q.transformer.h[0].mlp.c_fc
    assert type(fc) is QuantizedWeightLayer and fc.codes.dtype == torch.int8
    assert fc.per_channel and fc.bits == 8 and fc.bias.dtype == torch.bfloat16
    assert q.lm_head.weight is q.transformer.wte.weight            # still tied, still bf16
    assert q.lm_head.weight.dtype == torch.bfloat16
    # pruned zeros stay zero codes; the quantized model runs in bf16, close to the pruned one
    c_fc = p.transformer.h[0].mlp.c_fc.weight.t()
    assert torch.equal(fc.codes == 0, c_fc == 0)
    yp, yq = _logits(p, x).float(), _logits(q, x)
    assert yq.dtype == torch.bfloat16
    assert float((yq.float() - yp).norm() / yp.norm()) < 0.03
    assert float((yp - y0).norm() / y0.norm()) > 0.05               # pruning did something
    # bits=8 asks for the same; the int8 kernel modes are refused in one line, nothing changed
    assert QuantizeConfig(bits=8)._choose(m, torch.device("cpu"))[0] == "weight_only"
    from torch.utils.data import DataLoader, TensorDataset

    calib = DataLoader(TensorDataset(x), batch_size=2)
    for kw in ({"mode": "dynamic"}, {"mode": "static", "calib": calib}, {"calib": calib}):
        with pytest.raises(BadInput) as e:
            nbcompress.quantize(m, **kw)
        assert "\n" not in str(e.value) and "bf16" in str(e.value) and "float32" in str(e.value)
    assert type(m.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    assert m.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    err = capsys.readouterr().err              # a small model's steps show no progress bar
    assert "prune (weights)" not in err and "quantize (" not in err


def test_fp32_models_keep_the_int8_kernels():
    q = nbcompress.quantize(_mlp())
    assert type(q[0]) is DynamicInt8Linear


# ------------------------------------------------------------------ progress bars
@pytest.mark.parametrize("progress", [True, False])
def test_large_model_bars_follow_the_progress_setting(monkeypatch, capsys, progress):
    monkeypatch.setattr(layers_mod, "BAR_WEIGHTS", 0)            # "large" for this test
    m = _mlp().to(torch.bfloat16)
    capsys.readouterr()
    p = compress(m, PruneConfig(amount=0.5, progress=progress)).model
    compress(p, QuantizeConfig(progress=progress))
    compress(_mlp(), QuantizeConfig(progress=progress))
    err = capsys.readouterr().err
    assert ("prune (weights)" in err) is progress
    assert ("quantize (int8 weight-only)" in err) is progress
    assert ("quantize (int8 dynamic)" in err) is progress


def test_small_models_show_no_bar(capsys):
    p = compress(_mlp().to(torch.bfloat16), PruneConfig(amount=0.5, progress=True)).model
    compress(p, QuantizeConfig(progress=True))
    compress(_mlp(), QuantizeConfig(progress=True))
    err = capsys.readouterr().err
    assert "prune (weights)" not in err and "quantize (" not in err


# ------------------------------------------------------------------ int8 step memory (issue 16)
_INT8_PEAK = r"""
import json, sys
import torch
from torch import nn
from nbcompress.core import compress
from nbcompress.techniques.quantize.config import QuantizeConfig
torch.set_num_threads(1)
if sys.argv[1] == "copy":      # the work copy of old: every float weight copied first
    QuantizeConfig.shared_with_copy = lambda self, model, ctx: []
torch.manual_seed(0)
m = nn.Sequential(*[nn.Linear(512, 512) for _ in range(24)])
nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
compress(nn.Sequential(nn.Linear(8, 8)), QuantizeConfig(progress=False))   # first-call costs
def kb(key):
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key))
with open("/proc/self/clear_refs", "w") as f:       # the peak from here on (VmHWM = VmRSS)
    f.write("5")
base = kb("VmRSS:")
q = compress(m, QuantizeConfig(progress=False)).model
peak = kb("VmHWM:")
print(json.dumps({"x": (peak - base) * 1024 / nbytes, "base_kb": base, "peak_kb": peak}))
"""


def test_dynamic_int8_step_peak_memory_stays_below_a_float_copy():
    """Dynamic int8 of a 25 MB MLP (24 Linear 512x512): the step's peak RSS (VmHWM) above the
    model stays well below one float copy of it (the int8 layers are half its bytes: packed +
    plain codes), where copying every float weight first (as the work copy did) costs more than
    the model itself."""
    import json
    import os
    import subprocess
    import sys

    def peak(how):
        out = subprocess.run([sys.executable, "-c", _INT8_PEAK, how], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                          # a fixed mmap threshold: freed blocks
                                                          # go back, RSS follows live bytes
                                                          "MALLOC_MMAP_THRESHOLD_": "65536"},
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["x"]

    shared, copied = peak("share"), peak("copy")
    assert shared < 0.75, (shared, copied)          # measured 0.556-0.561
    assert copied > 0.95, (shared, copied)          # measured 1.069-1.075


def test_dynamic_int8_reuses_the_flop_count_and_it_is_the_same(monkeypatch):
    """%quantize (dynamic int8) keeps every Linear's FLOPs: the History's measure of the result
    takes the count of the model before (no counted forward), and that count is what a fresh
    forward under the FLOP counter gives, dense, sparse and per layer (an MLP and a small
    BERT, pruned first so sparse FLOPs differ from dense)."""
    from transformers import BertConfig, BertForSequenceClassification

    import nbcompress
    from nbcompress import counting
    from nbcompress.techniques.quantize import QuantizeConfig

    torch.manual_seed(0)
    cases = [(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
              torch.randn(1, 64)),
             (BertForSequenceClassification(BertConfig(
                 hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, num_labels=2, vocab_size=500)).eval(),
              {"input_ids": torch.randint(0, 500, (1, 16))})]
    real = counting._count_forward
    for model, x in cases:
        h = nbcompress.History(model, example_input=x, measure_latency=False)
        h.apply(nbcompress.PruneConfig(amount=0.5))
        calls = []
        monkeypatch.setattr(counting, "_count_forward",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
        h.apply(QuantizeConfig(mode="dynamic"))
        monkeypatch.setattr(counting, "_count_forward", real)
        assert calls == []                       # no counted forward for the int8 result
        got = h.current_version.metrics
        counting._FLOPS_SEEN.clear()
        flops, sparse, per_leaf = counting.count_flops(h.current, x)
        assert (got.flops, got.sparse_flops) == (flops, sparse) and sparse < flops
        _, _, carried = counting.count_flops(h.current, x)    # (recounted, now kept)
        assert carried == per_leaf
