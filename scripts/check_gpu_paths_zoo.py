"""Issue 20's two GPU layers on library models (random weights, no download), on the CPU:

* ``%prune --pattern 2:4`` through a History: every layer that fits has exactly 2 nonzeros in
  each group of 4 inputs, plain Linear layers became SemiSparseLinear, the model runs, save/load
  gives the same outputs, undo gives the exact original;
* the int8 GEMM layer (``Int8MatmulLinear``), as ``%quantize --mode dynamic`` builds it for a model
  on CUDA (the mode forced here, since the choice needs a GPU): output error against fp32,
  save/load, undo.

    python scripts/check_gpu_paths_zoo.py        # torchvision + timm + transformers
"""
import io
import time
import warnings

import torch
from torch import nn

import nbcompress
from nbcompress.techniques.prune.semisparse import SemiSparseLinear
from nbcompress.techniques.quantize import config as qconfig
from nbcompress.techniques.quantize.qmodules import Int8MatmulLinear

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def _tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def cases():
    import timm
    import torchvision
    import transformers as tr

    img = torch.randn(2, 3, 64, 64)
    ids = {"input_ids": torch.randint(0, 99, (2, 16))}
    yield "torchvision resnet18", torchvision.models.resnet18(num_classes=10), img
    yield "torchvision mobilenet_v3_small", torchvision.models.mobilenet_v3_small(num_classes=10), img
    yield "torchvision swin_t", torchvision.models.swin_t(num_classes=10), img
    yield "torchvision vit (tiny)", torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10), torch.randn(2, 3, 32, 32)
    for name in ("resnet10t", "convnext_atto", "efficientnet_b0", "vit_tiny_patch16_224",
                 "mixer_s16_224"):
        size = 224 if name in ("vit_tiny_patch16_224", "mixer_s16_224") else 64
        yield f"timm {name}", timm.create_model(name, pretrained=False, num_classes=10), \
            torch.randn(2, 3, size, size)
    yield "HF bert", tr.BertForSequenceClassification(tr.BertConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=3)), ids
    yield "HF distilbert", tr.DistilBertForSequenceClassification(tr.DistilBertConfig(
        vocab_size=99, dim=64, n_layers=2, n_heads=4, hidden_dim=128, num_labels=3)), ids
    yield "HF gpt2", tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=99, n_embd=64, n_layer=2,
                                                      n_head=4, n_positions=32)), ids
    yield "HF t5", tr.T5EncoderModel(tr.T5Config(vocab_size=99, d_model=64, d_ff=128, d_kv=16,
                                                 num_layers=2, num_heads=4)), ids


def run(model, x):
    with torch.no_grad():
        return _tensor(model(**x) if isinstance(x, dict) else model(x)).float()


def roundtrip(model):
    buf = io.BytesIO()
    nbcompress.save(model, buf)
    buf.seek(0)
    return nbcompress.load(buf, trusted_modules=["timm", "torchvision", "transformers"])


def check(name, model, x):
    model.eval()
    ref = run(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    # 2:4
    t = time.time()
    h = nbcompress.History(model, example_input=x, measure_latency=False)
    h.apply(nbcompress.PruneConfig(pattern="2:4"), progress=False)
    p = h.current
    fits = bad = 0
    tied = {id(e.weight) for e in p.modules() if isinstance(e, nn.Embedding)}   # left whole
    for m in p.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or type(m).__name__ == "Conv1D":
            w = m.weight.detach()
            rows = w.t() if type(m).__name__ == "Conv1D" else w.reshape(w.shape[0], -1)
            if rows.shape[1] % 4 == 0 and id(m.weight) not in tied:
                fits += 1       # at most 2 of 4 (a zero-initialised head has none)
                bad += int(not (rows.reshape(-1, 4) != 0).sum(1).le(2).all())
    semi = sum(type(m) is SemiSparseLinear for m in p.modules())
    y = run(p, x)
    back = roundtrip(p)
    same = torch.equal(run(back, x), y)
    h.undo()
    undone = all(torch.equal(before[k], v) for k, v in h.current.state_dict().items())
    ok24 = bad == 0 and fits > 0 and same and undone and torch.isfinite(y).all()
    out.append(f"2:4 {'ok' if ok24 else 'FAILED'} ({fits} layers to the pattern, {semi} "
               f"SemiSparseLinear, save/load {'same' if same else 'DIFFERENT'}, undo "
               f"{'exact' if undone else 'NOT exact'}, {time.time() - t:.1f} s)")
    # int8 GEMM (what --mode dynamic builds on CUDA)
    real = qconfig.QuantizeConfig._choose
    qconfig.QuantizeConfig._choose = lambda self, m, d, o=None: ("int8_mm", [qconfig._INT8_MM_NOTE])
    try:
        h2 = nbcompress.History(model, example_input=x, measure_latency=False)
        rep = h2.apply(nbcompress.QuantizeConfig(mode="dynamic"), progress=False)
    finally:
        qconfig.QuantizeConfig._choose = real
    q = h2.current
    gemm = sum(type(m) is Int8MatmulLinear for m in q.modules())
    yq = run(q, x)
    err = float((yq - ref).norm() / ref.norm().clamp(min=1e-12))
    same_q = torch.equal(run(roundtrip(q), x), yq)
    flops_same = rep.after.flops == rep.before.flops
    h2.undo()
    undone = all(torch.equal(before[k], v) for k, v in h2.current.state_dict().items())
    # Linear layers (transformers' Conv1D too: quantize turns it into the Linear it is) whose
    # sizes allow the GEMM; nn.MultiheadAttention's out_proj is left alone (its forward reads
    # out_proj.weight itself), as quantize's notes say
    fit = 0
    for m in model.modules():
        if type(m).__name__ == "Conv1D":
            n_in, n_out = m.weight.shape
        elif isinstance(m, nn.Linear) and not isinstance(
                m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            n_in, n_out = m.in_features, m.out_features
        else:
            continue
        fit += n_in % 8 == 0 and n_out % 8 == 0 and id(m.weight) not in tied
    okq = gemm == fit and err < 0.1 and same_q and undone and flops_same
    out.append(f"int8 GEMM {'ok' if okq else 'FAILED'} ({gemm} Int8MatmulLinear of {fit} Linear "
               f"layers with sizes in multiples of 8, rel error "
               f"{err:.4f}, FLOPs {'same' if flops_same else 'CHANGED'}, save/load "
               f"{'same' if same_q else 'DIFFERENT'})")
    return ok24 and okq, out


def main():
    passed = total = 0
    for name, model, x in cases():
        total += 1
        torch.manual_seed(0)
        try:
            ok, lines = check(name, model, x)
        except Exception as e:  # noqa: BLE001 - a model's failure is this check's finding
            ok, lines = False, [f"FAILED {type(e).__name__}: {str(e)[:300]}"]
        passed += ok
        print(f"{name}: " + "; ".join(lines), flush=True)
    print(f"{passed}/{total} pass")


if __name__ == "__main__":
    main()
