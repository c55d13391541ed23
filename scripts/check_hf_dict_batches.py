"""Issue 15, part 1: dict batches (what HF datasets + a collator yield) through the Python API on
Hugging Face BERT (sequence classification) and ViT (image classification) from configs, random
weights, random data: prints PASS / FAIL per step with the one-line reason. Needs transformers.
Run: python scripts/check_hf_dict_batches.py"""
import warnings

import torch
import transformers as tf

warnings.filterwarnings("ignore")
import nbcompress
from torch.utils.data import DataLoader, Dataset
from nbcompress.train import evaluate, fit

class Toks(Dataset):
    def __init__(s, n=64, seq=12, vocab=200):
        g = torch.Generator().manual_seed(0)
        s.ids = torch.randint(0, vocab, (n, seq), generator=g)
        s.y = (s.ids[:, 0] % 3)
    def __len__(s): return len(s.ids)
    def __getitem__(s, i): return {"input_ids": s.ids[i], "attention_mask": torch.ones_like(s.ids[i]), "labels": s.y[i]}
class Imgs(Dataset):
    def __init__(s, n=64):
        g = torch.Generator().manual_seed(0)
        s.x = torch.randn(n, 3, 32, 32, generator=g); s.y = torch.randint(0, 5, (n,), generator=g)
    def __len__(s): return len(s.x)
    def __getitem__(s, i): return {"pixel_values": s.x[i], "labels": s.y[i]}
def bert():
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=200, num_labels=3))
def vit():
    torch.manual_seed(0)
    return tf.ViTForImageClassification(tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8, num_labels=5))
for name, make, ds in [("bert", bert, Toks()), ("vit", vit, Imgs())]:
    dl = DataLoader(ds, batch_size=16)
    m = make()
    steps = [
        ("evaluate", lambda: round(evaluate(m, dl), 3)),
        ("fit 1 epoch", lambda: fit(make(), dl, epochs=1, progress=False) and "ok"),
        ("prune 0.5 + finetune", lambda: nbcompress.prune(m, 0.5, finetune=dl, epochs=1) and "ok"),
        ("prune taylor data", lambda: nbcompress.prune(m, 0.5, importance="taylor", data=dl) and "ok"),
        ("prune activation data", lambda: nbcompress.prune(m, 0.5, structured=True, importance="activation", data=dl) and "ok"),
        ("lowrank + finetune", lambda: nbcompress.lowrank(m, energy=0.8, finetune=dl) and "ok"),
        ("quantize uniform4 + qat", lambda: nbcompress.quantize(m, bits=4, qat=dl, epochs=1) and "ok"),
        ("quantize static calib", lambda: nbcompress.quantize(m, mode="static", calib=dl) and "ok"),
        ("distill from itself copy", lambda: nbcompress.distill(make(), make(), dl, epochs=1) and "ok"),
        ("measure with loader eval", lambda: nbcompress.measure(m, evaluator=dl).accuracy),
    ]
    for label, fn in steps:
        try:
            r = fn()
            print(f"{name:5s} {label:26s} PASS {r}")
        except Exception as e:
            print(f"{name:5s} {label:26s} FAIL {type(e).__name__}: {str(e).splitlines()[0][:140]}")
