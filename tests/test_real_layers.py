"""Issue 15, parts 5-6: layers that int8 / 4-bit / low-rank / unstructured pruning replace or
touch keep real models running: a replaced layer still has a tensor ``weight`` (original shape),
``bias`` and its shape attributes; Linear subclasses are matched; transformers' ``Conv1D`` is a
Linear; a tied weight is left whole and stays tied; large layers are factorised without a full
SVD. Hugging Face models from small configs (skipped without transformers); timm / torchvision
cases skip without them (they run in the /tmp/v214 venv)."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbcompress
from nbcompress.core import compress
from nbcompress.techniques.lowrank import LowRank, LowRankConfig
from nbcompress.techniques.prune import PruneConfig
from nbcompress.techniques.quantize import QuantizeConfig


def _cos(a, b) -> float:
    return float(F.cosine_similarity(a.detach().flatten().float(), b.detach().flatten().float(), dim=0))


def _logits(y):
    return y.logits if hasattr(y, "logits") else y


class ReadsWeight(nn.Module):
    """A model whose own forward reads ``fc.weight`` / ``fc.bias`` / ``fc.in_features``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 48)
        self.out = nn.Linear(48, 10)

    def forward(self, x):
        assert x.shape[-1] == self.fc.in_features
        h = F.linear(x.to(self.fc.weight.dtype), self.fc.weight, self.fc.bias)
        return self.out(torch.relu(h))


@pytest.mark.parametrize("options", [{}, {"bits": 4}, {"lowrank": True}])
def test_model_reading_weight_runs(options):
    torch.manual_seed(0)
    m = ReadsWeight().eval()
    x = torch.randn(8, 64)
    if options.pop("lowrank", False):
        out = nbcompress.lowrank(m, rank=8, layers="fc", example_input=x)
        assert isinstance(out.fc, LowRank)
        assert out.fc.in_features == 64 and out.fc.out_features == 48
    else:
        out = nbcompress.quantize(m, example_input=x, **options)
        assert _cos(out(x), m(x)) > (0.99 if not options else 0.95)
    w = out.fc.weight
    assert isinstance(w, torch.Tensor) and w.shape == (48, 64) and w.dtype == torch.float32
    assert torch.allclose(out(x), out.out(torch.relu(F.linear(x, w, out.fc.bias))), atol=1e-5)


class MyLinear(nn.Linear):
    """A subclass computing what nn.Linear computes."""


class Scaled(nn.Linear):
    """A subclass with a forward of its own: a replacement would drop the scaling."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_linear_subclasses():
    torch.manual_seed(0)
    m = nn.Sequential(MyLinear(32, 64), nn.ReLU(), Scaled(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(4, 32)
    r = compress(m, QuantizeConfig(), example_input=x)
    assert type(r.model[0]).__name__ == "DynamicInt8Linear"
    assert type(r.model[2]) is Scaled
    assert any("Scaled" in n and "whole" in n for n in r.notes)
    assert _cos(r.model(x), m(x)) > 0.99
    r = compress(m, LowRankConfig(rank=4, layers="0|2"), example_input=x)
    assert isinstance(r.model[0], LowRank) and type(r.model[2]) is Scaled


def _gpt2():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    c = tf.GPT2Config(vocab_size=200, n_layer=2, n_head=2, n_embd=64, n_positions=32,
                      bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(c).eval(), {"input_ids": torch.randint(0, 200, (2, 10))}


def test_gpt2_conv1d_int8_and_tied_head():
    m, x = _gpt2()
    r = compress(m, QuantizeConfig(), example_input=x)
    q = r.model
    assert type(q.transformer.h[0].attn.c_attn).__name__ == "DynamicInt8Linear"
    assert q.lm_head.weight is q.transformer.wte.weight          # still one tensor
    assert torch.equal(q.transformer.wte.weight, m.transformer.wte.weight)
    assert any("lm_head" in n and "tied" in n for n in r.notes)
    assert any("Conv1D" in n for n in r.notes)
    with torch.no_grad():
        assert _cos(q(**x).logits, m(**x).logits) > 0.99
    q4 = nbcompress.quantize(m, 4, example_input=x)
    assert q4.lm_head.weight is q4.transformer.wte.weight
    assert q4.transformer.h[0].mlp.c_fc.weight.shape == (256, 64)   # dequantized, Linear layout


def test_gpt2_conv1d_prune_leaves_tied_embedding():
    m, x = _gpt2()
    r = compress(m, PruneConfig(amount=0.5), example_input=x)
    q = r.model
    assert q.lm_head.weight is q.transformer.wte.weight
    assert int((q.transformer.wte.weight == 0).sum()) == 0        # no half-pruned embedding
    conv = [mod.weight for mod in q.modules() if type(mod).__name__ == "Conv1D"]
    zeros = sum(int((w == 0).sum()) for w in conv) / sum(w.numel() for w in conv)
    assert abs(zeros - 0.5) < 0.01
    assert any("lm_head" in n for n in r.notes)


def test_gpt2_conv1d_lowrank():
    m, x = _gpt2()
    r = compress(m, LowRankConfig(ratio=0.25), example_input=x)
    q = r.model
    lr = q.transformer.h[0].attn.c_attn
    orig = m.transformer.h[0].attn.c_attn
    assert isinstance(lr, LowRank) and lr.layout == "conv1d"
    assert lr.weight.shape == orig.weight.shape == (64, 192) and (lr.nf, lr.nx) == (192, 64)
    h = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.allclose(lr(h), h @ lr.weight + lr.bias, atol=1e-5)   # Conv1D semantics
    assert q.lm_head.weight is q.transformer.wte.weight
    names = {row["layer"] for row in r.layers}
    assert "transformer.h.1.mlp.c_proj" in names and "lm_head" not in names
    with torch.no_grad():
        assert torch.isfinite(q(**x).logits).all()


def test_t5_and_vit_read_weight_dtype():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=64, d_ff=128,
                                                   num_layers=2, num_heads=2, d_kv=32)).eval()
    ids = torch.randint(0, 100, (2, 8))
    xt = {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    vit = tf.ViTForImageClassification(tf.ViTConfig(
        image_size=32, patch_size=8, num_labels=5, num_hidden_layers=2, num_attention_heads=2,
        hidden_size=64, intermediate_size=128)).eval()
    xv = {"pixel_values": torch.randn(2, 3, 32, 32)}
    for m, x in ((t5, xt), (vit, xv)):
        tied = [(a, b) for a, b in ((getattr(m, "lm_head", None), getattr(m, "shared", None)),)
                if a is not None and a.weight is b.weight]
        for step in (lambda: nbcompress.lowrank(m, ratio=0.25, layers=".", example_input=x),
                     lambda: nbcompress.quantize(m, 4, example_input=x),
                     lambda: nbcompress.quantize(m, example_input=x)):
            out = step()
            with torch.no_grad():
                assert torch.isfinite(_logits(out(**x))).all()
            if tied:
                assert out.lm_head.weight is out.shared.weight
    wo = nbcompress.lowrank(t5, ratio=0.25, layers="wo", example_input=xt).encoder.block[0] \
        .layer[1].DenseReluDense.wo
    assert isinstance(wo, LowRank) and wo.weight.shape == (64, 128)
    assert wo.weight.dtype == torch.float32


def test_large_layer_uses_truncated_svd_and_honest_energy():
    torch.manual_seed(0)
    # a 700 x 1200 layer with a decaying spectrum (above the full-SVD limit)
    u, _ = torch.linalg.qr(torch.randn(700, 700))
    v, _ = torch.linalg.qr(torch.randn(1200, 700))
    s = torch.logspace(0, -3, 700)
    lin = nn.Linear(1200, 700)
    with torch.no_grad():
        lin.weight.copy_((u * s) @ v.t())
    m = nn.Sequential(lin, nn.ReLU(), nn.Linear(700, 3))
    x = torch.randn(2, 1200)
    sv = torch.linalg.svdvals(lin.weight.double())
    cum = torch.cumsum(sv ** 2, 0) / (sv ** 2).sum()
    want = int((cum < 0.9 - 1e-9).sum()) + 1                      # what the full SVD selects
    t0 = time.perf_counter()
    r = compress(m, LowRankConfig(energy=0.9), example_input=x)
    took = time.perf_counter() - t0
    row = r.layers[0]
    assert int(row["rank"]) == want
    best = float(((sv[want:] ** 2).sum() / (sv ** 2).sum()).sqrt())   # optimal error at rank
    assert row["rel_error"] <= best * 1.001 + 1e-9
    assert took < 30
    r = compress(m, LowRankConfig(rank=20), example_input=x)    # randomized (rank < 1/4)
    best = float(((sv[20:] ** 2).sum() / (sv ** 2).sum()).sqrt())
    assert r.layers[0]["rel_error"] <= best * 1.01


def test_torchvision_swin_int8_and_lowrank():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.swin_t(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        q = nbcompress.quantize(m, example_input=x)
        assert _cos(q(x), y) > 0.99
        qkv = q.features[1][0].attn.qkv
        assert type(qkv).__name__ == "DynamicInt8Linear" and qkv.weight.shape == (288, 96)
        lr = nbcompress.lowrank(m, ratio=0.25, layers=r"features\.1\.0\.attn", example_input=x)
        assert isinstance(lr.features[1][0].attn.qkv, LowRank)
        assert torch.isfinite(lr(x)).all()


def test_timm_linear_and_edgenext():
    timm = pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = timm.create_model("mobilenetv3_small_100", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    assert any(type(mod).__module__.startswith("timm") and isinstance(mod, nn.Linear)
               for mod in m.modules())
    q = nbcompress.quantize(m, example_input=x)        # was refused as "convs only"
    assert any(type(mod).__name__ == "DynamicInt8Linear" for mod in q.modules())
    with torch.no_grad():
        assert _cos(q(x), m(x)) > 0.99
    e = timm.create_model("edgenext_xx_small", pretrained=False).eval()
    xe = torch.randn(1, 3, 64, 64)
    out = nbcompress.lowrank(e, ratio=0.25, layers="token_projection|stages.3", example_input=xe)
    assert any(isinstance(mod, LowRank) for mod in out.modules())
    with torch.no_grad():
        assert torch.isfinite(out(xe)).all()


def test_int8_linear_prints_like_torch():
    """The int8 Linear keeps torch.ao's text (its own extra_repr called weight() as a method)."""
    q = nbcompress.quantize(nn.Sequential(nn.Linear(12, 5)), example_input=torch.randn(1, 12))
    assert repr(q[0]).endswith("(in_features=12, out_features=5, dtype=torch.qint8, "
                               "qscheme=torch.per_tensor_affine)")
