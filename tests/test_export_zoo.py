"""Library models the project did not write leave the notebook (issue 18): Hugging Face BERT,
GPT-2 and ViT from small configs (dict inputs, padded attention masks), fp32 and dynamic int8,
exported to ONNX and run in ONNX Runtime by hand; timm / torchvision CNNs where those import
(they skip in .venv, run in /tmp/v214). The sweep over many models is
scripts/check_export_zoo.py; this is its CI part."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import nbcompress
from nbcompress import export
from nbcompress.fingerprint import state_fingerprint

ort = pytest.importorskip("onnxruntime")
VOCAB, SEQ = 96, 8


def _tf():
    return pytest.importorskip("transformers")


def _bert():
    tf = _tf()
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=128, num_labels=3,
                        max_position_embeddings=32)
    return tf.BertForSequenceClassification(cfg)


def _gpt2(use_cache: bool = False):
    tf = _tf()
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=2, n_positions=32,
                        bos_token_id=1, eos_token_id=2, use_cache=use_cache)
    return tf.GPT2LMHeadModel(cfg)


def _vit():
    tf = _tf()
    cfg = tf.ViTConfig(image_size=32, patch_size=8, num_labels=10, hidden_size=64,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    return tf.ViTForImageClassification(cfg)


def _tokens(n: int, seed: int = 0) -> dict:
    """input_ids and an attention mask whose second row is padded (the mask matters)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if n > 1:
        mask[1, SEQ // 2:] = 0
    return {"input_ids": torch.randint(3, VOCAB, (n, SEQ), generator=g), "attention_mask": mask}


def _pixels(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}


HF = {"bert": (_bert, _tokens), "gpt2": (_gpt2, _tokens), "vit": (_vit, _pixels)}


def _built(name: str):
    torch.manual_seed(0)
    build, inputs = HF[name]
    return build().eval(), inputs


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return (out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple)
            else out.logits).float()


def _run_file(path, x) -> tuple[torch.Tensor, list[str]]:
    """The file's first output in a plain ONNX Runtime session (no nbcompress in the way), fed
    by the graph's own input names, and the graph's node types."""
    import onnx

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    feeds = ({k: x[k].numpy() for k in names} if isinstance(x, dict) else {names[0]: x.numpy()})
    ops = sorted({n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node})
    return torch.from_numpy(np.asarray(s.run(None, feeds)[0])), ops


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


@pytest.mark.parametrize("name", list(HF))
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_hf_model_exports_to_onnx_and_agrees(name, kind, tmp_path):
    model, inputs = _built(name)
    if kind == "int8":
        model = nbcompress.quantize(model)           # dynamic int8 (the default)
    before = state_fingerprint(model)
    x = inputs(2)
    r = export(model, tmp_path / "m.onnx", example_input=x, latency=False)
    assert state_fingerprint(model) == before                 # the model is not changed
    assert r.dynamic_batch and r.outputs >= 1 and r.bytes == (tmp_path / "m.onnx").stat().st_size
    ref = _logits(model, x)
    got, ops = _run_file(tmp_path / "m.onnx", x)
    assert got.shape == ref.shape
    scale = float(ref.abs().max())
    tol = 1e-4 if kind == "fp32" else 0.1         # int8: ORT's and PyTorch's activation rounding
    assert float((got - ref).abs().max()) <= tol * scale
    assert r.rel_diff <= tol
    assert _agree(got, ref) >= (1.0 if kind == "fp32" else 0.75)
    assert r.example_top1 is not None and r.agreement >= (1.0 if kind == "fp32" else 0.75)
    if kind == "int8":                            # int8 multiplies in ONNX Runtime, not fp32
        assert r.int8_kernels > 0
        assert "MatMulInteger" in ops and ({"DynamicQuantizeLinear", "Round"} & set(ops))
    else:
        assert r.int8_kernels == 0
    # the batch is free: the file runs another batch size, still agreeing
    x3 = inputs(3, seed=1)
    got3, _ = _run_file(tmp_path / "m.onnx", x3)
    ref3 = _logits(model, x3)
    assert got3.shape == ref3.shape
    assert float((got3 - ref3).abs().max()) <= tol * float(ref3.abs().max())


def test_hf_pt2_and_pruned(tmp_path):
    model, inputs = _built("bert")
    x = inputs(2)
    r = export(model, tmp_path / "m.pt2", example_input=x, latency=False)
    assert r.max_abs_diff == 0.0 and r.agreement == 1.0
    pruned = nbcompress.prune(copy.deepcopy(model), 0.5)
    r = export(pruned, tmp_path / "p.onnx", example_input=x, latency=False)
    got, _ = _run_file(tmp_path / "p.onnx", x)
    ref = _logits(pruned, x)
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert not torch.allclose(ref, _logits(model, x))      # pruning did change the model


def test_gpt2_with_its_default_kv_cache_exports(tmp_path):
    torch.manual_seed(0)
    model = _gpt2(use_cache=True).eval()
    r = export(model, tmp_path / "m.onnx", example_input=_tokens(2), latency=False)
    assert r.agreement == 1.0


def test_t5_int8_exports(tmp_path):
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, use_cache=False)
    model = nbcompress.quantize(tf.T5ForConditionalGeneration(cfg).eval())
    x = dict(_tokens(2), decoder_input_ids=_tokens(2, seed=3)["input_ids"])
    r = export(model, tmp_path / "m.onnx", example_input=x, latency=False)
    assert r.int8_kernels > 0


def test_int8_file_matches_the_model_on_small_activations(tmp_path):
    torch.manual_seed(0)
    q = nbcompress.quantize(torch.nn.Sequential(torch.nn.Linear(16, 8)).eval())
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 1e-4
    export(q, tmp_path / "m.onnx", example_input=x, latency=False)
    got, _ = _run_file(tmp_path / "m.onnx", x)
    assert float((got - _logits(q, x)).abs().max()) <= 1e-6
    p = export(q, tmp_path / "m.pt2", example_input=x, latency=False)     # the same range there
    assert p.max_abs_diff <= 1e-6


# ------------------------------------------------------------- timm / torchvision image models
def _cnn(lib: str, name: str):
    torch.manual_seed(0)
    if lib == "timm":
        timm = pytest.importorskip("timm")
        extra = {"img_size": 64} if "vit" in name else {}        # a ViT's size is fixed
        return timm.create_model(name, pretrained=False, num_classes=10, **extra).eval()
    tv = pytest.importorskip("torchvision")
    return tv.models.get_model(name, weights=None, num_classes=10).eval()


@pytest.mark.parametrize("lib,name,kind", [("timm", "resnet18", "int8"),
                                           ("timm", "test_vit", "int8"),
                                           ("torchvision", "resnet18", "pt2")])
def test_library_cnn_exports(lib, name, kind, tmp_path):
    model = _cnn(lib, name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fp32 = export(model, tmp_path / "f.onnx", example_input=x, latency=False)
    got, _ = _run_file(tmp_path / "f.onnx", x)
    ref = _logits(model, x)
    assert float(ref.abs().max()) > 1e-3                   # outputs that mean something
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert fp32.agreement == 1.0 and fp32.int8_kernels == 0
    if kind == "pt2":
        r = export(model, tmp_path / "m.pt2", example_input=x, latency=False)
        assert r.max_abs_diff <= 1e-5 * float(ref.abs().max()) and r.agreement == 1.0
        return
    q = nbcompress.quantize(copy.deepcopy(model))
    r = export(q, tmp_path / "q.onnx", example_input=x, latency=False)
    got, ops = _run_file(tmp_path / "q.onnx", x)
    ref = _logits(q, x)
    assert r.int8_kernels >= (20 if "vit" in name else 1) and "MatMulInteger" in ops
    assert float((got - ref).abs().max()) <= 0.1 * float(ref.abs().max())
    assert r.agreement >= 0.5
