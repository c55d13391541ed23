#!/usr/bin/env python
# Needs `pip install transformers` (not a dependency). Run: python scripts/check_history_hf.py
"""(nbcompress.prune cannot run on these yet: its measure saves the model, issue 15; a step is simulated by rebinding the name to a pruned copy.) History integrity on Hugging Face models (random weights from configs): fingerprint stable,
in-place training recorded as 'edited', undo/redo bit-identical, tied weights stay tied."""
import torch, nbcompress
from nbcompress import History
from nbcompress.history import state_fingerprint
import transformers as T

def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

models = {
    "bert": T.BertForSequenceClassification(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=500)),
    "distilbert": T.DistilBertForSequenceClassification(T.DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=128, vocab_size=500)),
    "gpt2": T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=500)),
    "t5": T.T5ForConditionalGeneration(T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=2, vocab_size=500, d_kv=32)),
    "vit": T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8)),
}
for name, m in models.items():
    try:
        m.eval()
        ok = state_fingerprint(m) == state_fingerprint(m)
        h = History(m, measure_latency=False, remember_init=False)
        rec = h.versions[0]
        import copy
        p = copy.deepcopy(m)
        with torch.no_grad():
            for mod in p.modules():
                w = getattr(mod, 'weight', None)
                if isinstance(w, torch.Tensor) and w.dim() == 2:
                    w.mul_((w.abs() > w.abs().median()).to(w.dtype))
        h.observe(p)                          # the name rebound to a pruned model
        pruned = {k: v.clone() for k, v in h.current.state_dict().items()}
        with torch.no_grad():
            for prm in h.current.parameters():
                prm.add_(0.01)                 # the user's in-place edit
        edited = h.sync()
        v1 = h.version_model(1)               # what undo hands out (undo itself measures: save fails, issue 15)
        back_pruned = all(torch.equal(v1.state_dict()[k], pruned[k]) for k in pruned)
        back_orig = same(h.version_model(0), m)
        tied = ""
        if name == "gpt2":
            tied = f" tied lm_head {v1.lm_head.weight is v1.transformer.wte.weight}"
        print(f"{name:10s} stable fingerprint {ok}  edit recorded {edited}  undo->prune exact {back_pruned}  undo->orig exact {back_orig}  versions {[v.technique for v in h.versions]}{tied}")
    except Exception as e:
        print(f"{name:10s} FAILED {type(e).__name__}: {str(e)[:200]}")
