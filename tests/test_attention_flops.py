"""FLOPs of attention (issue 15, part 7): `measure` counts nn.MultiheadAttention (its fused fast
path included), nn.TransformerEncoderLayer's fast path and transformers' eager and sdpa attention
the same as the unfused matmuls, checked against a hand formula and against fvcore.

Hand formula of one encoder layer on (B, T, E) with FFN width F: 2*B*T*E*3E (Q, K, V) +
2*2*B*T*T*E (Q K^T and A V, all heads) + 2*B*T*E*E (out projection) + 2*2*B*T*E*F (FFN).
fvcore counts what it can trace (2 x its MACs): it counts LayerNorm (torch's counter does not)
and not `aten::scaled_dot_product_attention` (it lists it unsupported), so the cross-check is
made operator by operator, not on totals."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import nbcompress
from nbcompress.counting import ATTENTION_FORMULAS, count_flops


def layer(b, t, e, f=0):
    return 2 * b * t * e * 3 * e + 4 * b * t * t * e + 2 * b * t * e * e + 4 * b * t * e * f


def core(b, t, e):
    return 4 * b * t * t * e


class SelfAttention(nn.Module):
    def __init__(self, e=64, h=4):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(e, h, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def counted_with_grad(model, x):
    """The count of a forward with autograd on and in train mode (no fast path)."""
    model.train()
    c = FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS)
    with c:
        model(x)
    model.eval()
    return c.get_total_flops()


def test_multihead_attention_fast_path_counts_as_the_unfused_ops():
    m, x = SelfAttention(), torch.randn(2, 10, 64)
    plain = FlopCounterMode(display=False)
    with torch.no_grad(), plain:
        m.eval()(x)
    assert plain.get_total_flops() == 0          # torch alone: the fused kernel has no formula
    fast = count_flops(m, x)[0]                  # eval + no_grad: the fast path
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        slow = count_flops(m, x)[0]
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert fast == slow == counted_with_grad(m, x) == layer(2, 10, 64) == 706_560
    assert nbcompress.measure(m, x, latency=False, pack=False).flops == fast


def test_cross_attention_and_unbatched_inputs():
    m = SelfAttention()
    q, kv = torch.randn(3, 5, 64), torch.randn(3, 9, 64)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = m.attn

        def forward(self, q, kv):
            return self.attn(q, kv, kv, need_weights=False)[0]

    e, b = 64, 3
    hand = 2 * b * 5 * e * e + 2 * 2 * b * 9 * e * e + 4 * b * 5 * 9 * e + 2 * b * 5 * e * e
    assert count_flops(Cross(), (q, kv))[0] == hand
    x = torch.randn(7, 64)                        # unbatched (L, E)
    assert count_flops(m, x)[0] == counted_with_grad(m, x) == layer(1, 7, 64)


def test_transformer_encoder_layer_fast_path():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 96, batch_first=True),
                                num_layers=2, enable_nested_tensor=False)
    x = torch.randn(2, 12, 64)
    assert count_flops(enc, x)[0] == counted_with_grad(enc, x) == 2 * layer(2, 12, 64, 96)


def _hf(kind, impl):
    tr = pytest.importorskip("transformers")
    tr.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "bert":
        cfg = tr.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, vocab_size=100, attn_implementation=impl)
        x = torch.randint(0, 100, (2, 16))
        return tr.BertModel(cfg).eval(), x, 2 * layer(2, 16, 64, 128) + 2 * 2 * 64 * 64, \
            2 * core(2, 16, 64)
    if kind == "vit":
        cfg = tr.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, image_size=32, patch_size=8, num_labels=10,
                           attn_implementation=impl)
        hand = 2 * 2 * 16 * 3 * 8 * 8 * 64 + 2 * layer(2, 17, 64, 128) + 2 * 2 * 64 * 10
        return (tr.ViTForImageClassification(cfg).eval(), torch.randn(2, 3, 32, 32), hand,
                2 * core(2, 17, 64))
    cfg = tr.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                        use_cache=False, attn_implementation=impl)
    return (tr.GPT2Model(cfg).eval(), torch.randint(0, 100, (2, 16)), 2 * layer(2, 16, 64, 256),
            2 * core(2, 16, 64))


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_attention_matches_the_hand_formula(kind, impl):
    model, x, hand, _ = _hf(kind, impl)
    flops = nbcompress.measure(model, x, latency=False, pack=False).flops
    assert abs(flops / hand - 1) < 0.01, (flops, hand)
    assert flops == hand                          # exactly, in fact: no op is left out


def _fvcore(model, x):
    fv = pytest.importorskip("fvcore.nn")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        a = fv.FlopCountAnalysis(model.eval(), x)
        a.unsupported_ops_warnings(False)
        a.uncalled_modules_warnings(False)
        ops = dict(a.by_operator())
        unsupported = dict(a.unsupported_ops())
    finally:
        logging.disable(logging.NOTSET)
    return ops, unsupported


@pytest.mark.parametrize("kind", ["bert", "vit"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_attention_against_fvcore(kind, impl):
    model, x, hand, attention = _hf(kind, impl)
    ops, unsupported = _fvcore(model, x)
    ours = count_flops(model, x)[0]
    theirs = 2 * sum(v for k, v in ops.items() if k != "layer_norm")     # torch counts no norms
    if "aten::scaled_dot_product_attention" in unsupported:    # fvcore: 0 for the fused kernel
        theirs += attention
    assert ours == theirs, (ours, theirs, ops, unsupported)
    assert abs(ours / (2 * sum(ops.values())) - 1) < 0.05


def test_torchvision_vit_against_fvcore_and_the_hand_formula():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    m = models.get_model("vit_b_16", weights=None, image_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    n, e = 16, 768
    hand = 2 * n * 3 * 16 * 16 * e + 12 * layer(1, n + 1, e, 3072) + 2 * e * 1000
    ours = count_flops(m, x)[0]
    assert ours == hand
    ops, unsupported = _fvcore(m, x)
    fv_total = 2 * sum(ops.values())
    assert abs(ours / fv_total - 1) < 0.05, (ours, fv_total)
    theirs = 2 * sum(v for k, v in ops.items() if k != "layer_norm")
    assert "aten::scaled_dot_product_attention" in unsupported
    assert ours == theirs + 12 * core(1, n + 1, e)
