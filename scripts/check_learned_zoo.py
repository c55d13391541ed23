"""``%prune --learned`` and ``%quantize --budget-bytes`` on library models (random weights, no
download, CPU): 2 epochs of variational dropout on 128 random images (or the token dicts of
tests/test_dict_batches.py), then bits per layer under a budget of 60% of the 8-bit file. A model
passes when weights were dropped, the layers are the user's again (same state_dict keys, no
patched forward), the model runs, the file fits the budget and undo is exact.

    PYTHONPATH=tests python scripts/check_learned_zoo.py
"""
import io
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import nbcompress

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def images(shape, n=128):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g),
                                    torch.randint(0, 10, (n,), generator=g)), batch_size=32)


def cases():
    import timm
    import torchvision
    import transformers as tr
    from test_dict_batches import Tokens

    tokens = DataLoader(Tokens(seed=0), batch_size=32)
    yield "torchvision resnet18", torchvision.models.resnet18(num_classes=10), images((3, 32, 32))
    yield "torchvision mobilenet_v3_small", torchvision.models.mobilenet_v3_small(num_classes=10), \
        images((3, 32, 32))
    yield "timm convnext_atto", timm.create_model("convnext_atto", num_classes=10), \
        images((3, 32, 32))
    yield "timm vit_tiny", timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32,
                                             patch_size=8), images((3, 32, 32))
    yield "HF bert", tr.BertForSequenceClassification(tr.BertConfig(
        vocab_size=39, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3, max_position_embeddings=16)), tokens
    yield "HF gpt2", tr.GPT2ForSequenceClassification(tr.GPT2Config(
        vocab_size=39, n_embd=32, n_layer=2, n_head=4, n_positions=16, num_labels=3,
        pad_token_id=0)), tokens


def main():
    ok_n = total = 0
    for name, model, loader in cases():
        total += 1
        t = time.time()
        try:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            x = next(iter(loader))[0] if not isinstance(next(iter(loader)), dict) else \
                {k: v for k, v in next(iter(loader)).items() if k != "labels"}
            h = nbcompress.History(model, example_input=x, measure_latency=False)
            rep = h.apply(nbcompress.PruneConfig(learned=True, finetune=loader, learn_epochs=2,
                                                 epochs=1, kl_weight=20.0), progress=False)
            p = h.current
            keys_same = set(p.state_dict()) == set(before)
            patched = any("forward" in m.__dict__ for m in p.modules())
            eight = nbcompress.save(nbcompress.quantize(p, mode="cluster", bits=8), io.BytesIO())
            budget = int(0.6 * eight)
            rq = h.apply(nbcompress.QuantizeConfig(mode="cluster", budget_bytes=budget,
                                                   qat=loader, epochs=1), progress=False)
            fits = rq.result.extra["file_bytes"] <= budget
            h.undo(2)
            exact = all(torch.equal(before[k], v) for k, v in h.current.state_dict().items())
            ok = rep.after.sparsity > 0.01 and keys_same and not patched and fits and exact
            ok_n += ok
            print(f"{name}: {'ok' if ok else 'FAILED'}: learned {rep.after.sparsity:.1%} sparse, "
                  f"layers the user's {keys_same and not patched}; budget {budget:,} B -> "
                  f"{rq.result.extra['file_bytes']:,} B, bits "
                  f"{sorted(set(rq.result.extra['bits_per_layer'].values()))}; undo exact {exact}"
                  f" ({time.time() - t:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - a model's failure is this check's finding
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(f"{ok_n}/{total} pass")


if __name__ == "__main__":
    main()
