"""Structured pruning of transformers (issue 15, part 4): parameters before / after and the time
of one ``nbcompress.prune(m, amount, structured=True)`` step (heads + FFN neurons) on BERT-small
(L4 H512 A8, google/bert_uncased_L-4_H-512_A-8's shape) and ViT-small (ViT-S/16: H384, 12 layers,
6 heads), random weights from configs. timm's vit_small_patch16_224 too where timm imports.

    python scripts/check_prune_heads.py [--amounts 0.3 0.5]
"""
from __future__ import annotations

import argparse
import time

import torch

import nbcompress


def models():
    import transformers as tr

    torch.manual_seed(0)
    bert = tr.BertForSequenceClassification(tr.BertConfig(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048,
        num_labels=2))
    yield "BERT-small (HF, L4 H512 A8)", bert, {"input_ids": torch.randint(0, 30000, (2, 64))}
    vit = tr.ViTForImageClassification(tr.ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        num_labels=10))
    yield "ViT-small (HF, S/16 224)", vit, torch.randn(1, 3, 224, 224)
    try:
        import timm
    except Exception:  # noqa: BLE001 - timm is optional
        return
    yield ("ViT-small (timm vit_small_patch16_224)",
           timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10),
           torch.randn(1, 3, 224, 224))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--amounts", type=float, nargs="+", default=[0.3, 0.5])
    args = ap.parse_args()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"{'model':40s} {'amount':>6s} {'params before':>14s} {'params after':>13s} "
          f"{'kept':>6s} {'time s':>7s}")
    for name, model, x in models():
        model.eval()
        for a in args.amounts:
            t = time.perf_counter()
            out = nbcompress.prune(model, a, structured=True, example_input=x)
            dt = time.perf_counter() - t
            print(f"{name:40s} {a:6.2f} {n(model):14,d} {n(out):13,d} {n(out) / n(model):6.1%} "
                  f"{dt:7.2f}", flush=True)


if __name__ == "__main__":
    main()
