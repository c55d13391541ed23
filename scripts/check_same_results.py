"""Same results before and after a refactor: run each Python verb on Hugging Face models from
configs (random weights, no download; needs `pip install transformers`) and on our SmallResNet
(structured pruning, the dependency-graph path), hash each result's state_dict, write JSON.

Compare two commits (issue 14 used e78566b, before the techniques/ move):
    git worktree add /tmp/old e78566b
    PYTHONPATH=/tmp/old python scripts/check_same_results.py /tmp/old.json
    python scripts/check_same_results.py /tmp/new.json
    diff /tmp/old.json /tmp/new.json
Refusals are recorded with their message (from the Python API, so they name fields)."""
import hashlib, json, sys, warnings
warnings.filterwarnings("ignore")
import torch
import nbcompress
import transformers as tf

torch.manual_seed(0)
def hf(name):
    torch.manual_seed(0)
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=500, num_labels=3))
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=500, n_positions=64))
    if name == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=2, vocab_size=500, d_kv=32))
    if name == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8, num_labels=5))
def digest(m):
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        if isinstance(v, torch.Tensor):
            v = v.int_repr() if v.is_quantized else v
            h.update(k.encode()); h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
out = {}
for name in ("bert", "gpt2", "t5", "vit"):
    for label, fn in [("prune0.5", lambda m: nbcompress.prune(m, 0.5)),
                      ("prune0.5-layer", lambda m: nbcompress.prune(m, 0.5, scope="layer", layers="dense")),
                      ("int8", lambda m: nbcompress.quantize(m, mode="dynamic")),
                      ("uniform4", lambda m: nbcompress.quantize(m, bits=4, per_channel=True)),
                      ("lowrank", lambda m: nbcompress.lowrank(m, energy=0.8))]:
        m = hf(name)
        try:
            r = fn(m)
            r = getattr(r, "model", r)
            out[f"{name}/{label}"] = digest(r)
        except Exception as e:
            out[f"{name}/{label}"] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
from nbcompress.data import SmallResNet

for label, kw in [("structured0.5", dict(structured=True)),
                  ("structured-l1-round4", dict(structured=True, importance="l1", round_to=4))]:
    torch.manual_seed(0)
    net = SmallResNet(seed=0)
    try:
        r = nbcompress.prune(net, 0.5, example_input=torch.randn(1, 1, 28, 28), **kw)
        out[f"smallresnet/{label}"] = digest(getattr(r, "model", r))
    except Exception as e:
        out[f"smallresnet/{label}"] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
json.dump(out, open(sys.argv[1], "w"), indent=1)
for k, v in out.items(): print(k, v)
