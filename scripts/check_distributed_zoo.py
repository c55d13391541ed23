"""--processes 2 on library models (random weights, no download): prune 0.5, then fine-tune for
1 epoch on 2 processes (128 random images, or the token dicts of tests/test_dict_batches.py). A
model passes when the trained weights come back and the zeros stay.

    PYTHONPATH=tests python scripts/check_distributed_zoo.py     # torchvision + timm + transformers
"""
import time, torch, warnings
warnings.filterwarnings("ignore")
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import nbcompress
torch.set_num_threads(1)
def img_loader(shape, n=128, classes=10):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)), batch_size=16, shuffle=True)
import torchvision, timm, transformers as tr
cases = {
  "torchvision resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64)),
  "torchvision mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (3, 64, 64)),
  "torchvision vit_b_16 (tiny)": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10), (3, 32, 32)),
  "timm resnet10t": (lambda: timm.create_model("resnet10t", pretrained=False, num_classes=10), (3, 64, 64)),
  "timm convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10), (3, 64, 64)),
  "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10), (3, 64, 64)),
}
for name, (mk, shape) in cases.items():
    torch.manual_seed(0); m = mk().eval()
    t = time.time()
    try:
        p = nbcompress.prune(m, 0.5, finetune=img_loader(shape), epochs=1, processes=2)
        lin = [x for x in p.modules() if isinstance(x, (nn.Linear, nn.Conv2d))]
        z = sum(int((x.weight == 0).sum()) for x in lin) / sum(x.weight.numel() for x in lin)
        moved = any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), p.state_dict().values()))
        print(f"{name}: ok in {time.time()-t:.1f} s, zeros {z:.2f}, weights trained {moved}", flush=True)
    except Exception as e:
        print(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
# HF
from test_dict_batches import Tokens
for name, mk in {"HF bert": lambda: tr.BertForSequenceClassification(tr.BertConfig(vocab_size=39, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3, max_position_embeddings=16)),
                 "HF distilbert": lambda: tr.DistilBertForSequenceClassification(tr.DistilBertConfig(vocab_size=39, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3, max_position_embeddings=16)),
                 "HF gpt2 (seq cls)": lambda: tr.GPT2ForSequenceClassification(tr.GPT2Config(vocab_size=39, n_embd=32, n_layer=2, n_head=4, n_positions=16, num_labels=3, pad_token_id=0))}.items():
    torch.manual_seed(0); m = mk().eval(); t = time.time()
    try:
        p = nbcompress.prune(m, 0.5, finetune=DataLoader(Tokens(seed=0), batch_size=32, shuffle=True), epochs=1, processes=2)
        moved = any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), p.state_dict().values()))
        print(f"{name}: ok in {time.time()-t:.1f} s, weights trained {moved}", flush=True)
    except Exception as e:
        print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
