"""FLOPs of attention (issue 15, part 7): nbcompress count_flops vs fvcore (2 x MACs) vs a hand
formula, per model. Run in a venv with fvcore (torchvision rows need torchvision):
    python scripts/check_attention_flops.py"""
import logging
import warnings

import torch
from torch import nn
from nbcompress.counting import count_flops
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from fvcore.nn import FlopCountAnalysis

def fv(model, x):
    model.eval()
    a = FlopCountAnalysis(model, x if not isinstance(x, dict) else tuple(x.values()))
    a.unsupported_ops_warnings(False); a.uncalled_modules_warnings(False)
    return 2 * a.total(), dict(a.unsupported_ops())

def enc_layer(b, t, e, f):
    return 2*b*t*e*3*e + 4*b*t*t*e + 2*b*t*e*e + 4*b*t*e*f

rows = []
torch.manual_seed(0)
try:
    from torchvision import models
    for name in ["vit_b_16", "vit_b_32"]:
        m = models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        p = 16 if name.endswith("16") else 32
        n = (224 // p) ** 2
        hand = 2*n*3*p*p*768 + 12*enc_layer(1, n+1, 768, 3072) + 2*768*1000
        ours = count_flops(m, x)[0]
        f, unsup = fv(m, x)
        rows.append((f"torchvision {name}", ours, f, hand, unsup))
except ImportError:
    pass
from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification, GPT2Config, GPT2Model
for impl in ("eager", "sdpa"):
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100, attn_implementation=impl)
    m = BertModel(cfg).eval()
    B, T = 2, 16
    ids = torch.randint(0, 100, (B, T))
    hand = 2*enc_layer(B, T, 64, 128) + 2*B*64*64
    rows.append((f"BERT ({impl})", count_flops(m, ids)[0], fv(m, ids)[0], hand, {}))
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8, num_labels=10, attn_implementation=impl)
    m = ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    n = 16
    hand = 2*2*n*3*64*64 + 2*enc_layer(2, n+1, 64, 128) + 2*2*64*10
    rows.append((f"HF ViT ({impl})", count_flops(m, x)[0], fv(m, x)[0], hand, {}))
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, use_cache=False, attn_implementation=impl)
    m = GPT2Model(cfg).eval()
    hand = 2*enc_layer(B, T, 64, 256)
    rows.append((f"GPT-2 ({impl})", count_flops(m, ids)[0], fv(m, ids)[0], hand, {}))
mha = nn.MultiheadAttention(64, 4, batch_first=True)
class W(nn.Module):
    def __init__(s): super().__init__(); s.a = mha
    def forward(s, x): return s.a(x, x, x, need_weights=False)[0]
x = torch.randn(2, 10, 64)
rows.append(("nn.MultiheadAttention", count_flops(W(), x)[0], fv(W(), x)[0], enc_layer(2, 10, 64, 0), {}))
print(f"{'model':28s} {'ours':>14s} {'fvcore':>14s} {'hand':>14s} {'ours/fv':>8s} {'ours/hand':>9s}")
for name, o, f, h, u in rows:
    print(f"{name:28s} {o:14,d} {int(f):14,d} {h:14,d} {o/f if f else float('nan'):8.4f} {o/h:9.4f} {u if u else ''}")
