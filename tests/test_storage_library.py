"""Issue 15, part 2: save / load of library models (Hugging Face transformers from configs, timm,
torchvision), random weights. A round trip gives the same class, the same parameter names and
shapes, tied weights tied again (the same tensor object) and bit-identical outputs in eval mode.
The HF cases run where transformers imports (.venv); the timm / torchvision ones where those do
(the torch 2.14 venv) and skip elsewhere."""
from __future__ import annotations

import enum
import functools
import io
import json
import pathlib
import struct
import zlib

import pytest
import torch
from torch import nn

import nbcompress
from nbcompress.errors import BadInput
from nbcompress.storage import load, save
from nbcompress.storage.format import _read


def roundtrip(model: nn.Module, **kw) -> tuple[nn.Module, bytes]:
    buf = io.BytesIO()
    save(model, buf)
    return load(io.BytesIO(buf.getvalue()), **kw), buf.getvalue()


def header_of(data: bytes) -> dict:
    return _read(io.BytesIO(data))[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def assert_same(model: nn.Module, loaded: nn.Module, call) -> None:
    assert type(loaded) is type(model)
    names = [(k, p.shape) for k, p in model.named_parameters(remove_duplicate=False)]
    assert names == [(k, p.shape) for k, p in loaded.named_parameters(remove_duplicate=False)]
    assert len(list(loaded.parameters())) == len(list(model.parameters()))   # ties kept
    model.eval(), loaded.eval()
    with torch.no_grad():
        a, b = call(model), call(loaded)
    a = a.logits if hasattr(a, "logits") else a
    b = b.logits if hasattr(b, "logits") else b
    assert torch.equal(bits(a), bits(b))
    assert a.std() > 0                        # not a constant that any model would match


# ------------------------------------------------------------------------------ transformers

def _hf(name: str):
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    c = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    if name == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(vocab_size=200, **c)), {"input_ids": ids}
    if name == "distilbert":
        return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=200, dim=64, n_layers=2, n_heads=2, hidden_dim=128)), {"input_ids": ids}
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=200, n_embd=64, n_layer=2, n_head=2,
                                                n_positions=64)), {"input_ids": ids}
    if name == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=200, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2)), \
            {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    if name == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8,
                                                         num_labels=5, **c)), \
            {"pixel_values": torch.randn(2, 3, 32, 32)}
    return tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=200, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=32, max_target_positions=32)), \
        {"input_features": torch.randn(2, 16, 64), "decoder_input_ids": ids[:, :5]}


def _configs(model: nn.Module) -> dict[str, int]:
    """{module path: index of its config object, numbered by first sight}."""
    seen: dict[int, int] = {}
    return {n: seen.setdefault(id(m.__dict__["config"]), len(seen))
            for n, m in model.named_modules() if "config" in m.__dict__}


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "t5", "vit", "whisper"])
def test_hf_model_round_trip(name):
    model, x = _hf(name)
    loaded, data = roundtrip(model)
    assert_same(model, loaded, lambda m: m(**x))
    # the config: the library's own class, the same settings, shared as before (T5 has three)
    assert type(loaded.config) is type(model.config)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.config._attn_implementation == model.config._attn_implementation
    assert _configs(loaded) == _configs(model) and len(_configs(model)) >= 2
    values = header_of(data)["values"]
    assert len(values) == len(set(_configs(model).values())) + hasattr(model, "generation_config")
    assert values[0]["class"] == f"{type(model.config).__module__}.{type(model.config).__name__}"
    if hasattr(model, "generation_config"):
        assert loaded.generation_config.to_dict() == model.generation_config.to_dict()
    out = model.get_output_embeddings()
    if out is not None and out.weight is model.get_input_embeddings().weight:   # tied LM head
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
        assert len(header_of(data)["tensors"]) == len(list(model.parameters())) + \
            len(list(model.buffers()))


def test_hf_config_state_and_tied_gpt2_generate():
    model, x = _hf("gpt2")
    model.config._attn_implementation = "eager"       # instance state to_dict does not say
    loaded, data = roundtrip(model)
    assert loaded.config._attn_implementation == "eager"
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    stored = header_of(data)["values"][0]["dict"]["$dict"]
    assert stored["n_embd"] == 64 and stored["model_type"] == "gpt2"     # JSON, no pickle
    ids = x["input_ids"][:, :4]
    a = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, loaded.generate(ids, max_new_tokens=3, do_sample=False))


def test_hf_structured_pruned_round_trip():
    """Heads and FFN neurons removed by %prune --structured: the file records the new shapes
    and the config as the pruner left it."""
    model, x = _hf("gpt2")
    pruned = nbcompress.prune(model.eval(), 0.5, structured=True, example_input=x)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    loaded, _ = roundtrip(pruned)
    assert loaded.config.to_dict() == pruned.config.to_dict()
    assert loaded.transformer.h[0].mlp.c_fc.weight.shape == pruned.transformer.h[0].mlp.c_fc.weight.shape
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert_same(pruned, loaded, lambda m: m(**x))


def test_hf_sliced_ffn_and_lowrank_round_trip():
    """The file records the shapes the modules have, not the config's: a BERT whose first FFN
    was cut from 128 to 96 neurons by hand, then factorised, comes back with those shapes."""
    model, x = _hf("bert")
    ffn_in = model.bert.encoder.layer[0].intermediate.dense
    ffn_out = model.bert.encoder.layer[0].output.dense
    keep = torch.arange(96)
    new_in, new_out = nn.Linear(64, 96), nn.Linear(96, 64)
    with torch.no_grad():
        new_in.weight.copy_(ffn_in.weight[keep]), new_in.bias.copy_(ffn_in.bias[keep])
        new_out.weight.copy_(ffn_out.weight[:, keep]), new_out.bias.copy_(ffn_out.bias)
    model.bert.encoder.layer[0].intermediate.dense = new_in
    model.bert.encoder.layer[0].output.dense = new_out
    loaded, _ = roundtrip(model)
    assert loaded.bert.encoder.layer[0].intermediate.dense.weight.shape == (96, 64)
    assert loaded.config.intermediate_size == 128
    assert_same(model, loaded, lambda m: m(**x))
    small = nbcompress.lowrank(model.eval(), rank=8, layers="encoder", example_input=x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    loaded, _ = roundtrip(small)
    assert_same(small, loaded, lambda m: m(**x))


def test_user_class_inside_hf_model_refused_naming_every_class():
    """Library classes load without being listed; a notebook's own classes, Enums and functions
    are refused, all of them named in one line, until passed in classes=."""
    model, x = _hf("distilbert")
    model.extra = nn.ModuleList([_NotebookBlock(), _NotebookGate()])
    model.extra[0].mode = _Mode.FAST
    model.extra[0].act = functools.partial(_notebook_act, slope=0.5)
    buf = io.BytesIO()
    save(model, buf)
    with pytest.raises(BadInput) as e:
        load(io.BytesIO(buf.getvalue()))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("refusing to import")
    for name in ("_NotebookBlock", "_NotebookGate", "_Mode", "_notebook_act"):
        assert f"{__name__}.{name}" in msg
    assert "DistilBert" not in msg and "transformers" not in msg
    assert "classes=[_NotebookBlock, _Mode, _notebook_act, _NotebookGate]" in msg
    loaded = load(io.BytesIO(buf.getvalue()),
                  classes=[_NotebookBlock, _NotebookGate, _Mode, _notebook_act])
    assert loaded.extra[0].mode is _Mode.FAST and loaded.extra[0].act.keywords == {"slope": 0.5}
    assert_same(model, loaded, lambda m: m(**x))


class _NotebookBlock(nn.Module):
    def forward(self, x):
        return x


class _NotebookGate(nn.Module):
    def forward(self, x):
        return x


class _Mode(enum.Enum):
    FAST = "fast"


def _notebook_act(x, slope=0.1):
    return x * slope


# ------------------------------------------------------------------------------ refusals

def _with_attr(data: bytes, value) -> bytes:
    """The file with an attribute ``extra`` of the root set to ``value`` (a plain JSON header,
    which carries no CRC-32, as an attacker would write it)."""
    hlen, = struct.unpack("<I", data[4:8])
    header = json.loads(zlib.decompress(data[8:8 + hlen]))
    header["root"]["attrs"]["extra"] = value
    del header["crc32"]
    hb = json.dumps(header).encode()
    return data[:4] + struct.pack("<I", len(hb)) + hb + data[8 + hlen:]


@pytest.mark.parametrize("value, match", [
    ({"$fn": "builtins.eval"}, "refusing to import builtins.eval"),
    ({"$fn": "torch.load"}, "refusing to import torch.load"),
    ({"$fn": "os.system"}, "refusing to import os.system"),
    ({"$class": "subprocess.Popen"}, "refusing to import subprocess.Popen"),
    ({"$partial": [{"$fn": "os.system"}, ["ls"], {"$dict": {}}]}, "refusing to import os.system"),
    ({"$partial": ["os.system", [], {"$dict": {}}]}, "not a class or function"),
    ({"$enum": ["torch.nn.modules.linear.Linear", "X"]}, "is not an Enum class"),
    ({"$obj": 0}, "bad config reference"),
])
def test_names_in_attribute_values_are_checked(value, match):
    _, data = roundtrip(nn.Linear(2, 2))
    with pytest.raises(BadInput, match=match):
        load(io.BytesIO(_with_attr(data, value)))


def test_version_2_only_when_a_file_needs_it():
    """A file that uses nothing new stays version 1 (nbcompress before this change reads it); one
    with a set, a class or a config is version 2, which an older reader refuses by its number."""
    _, plain = roundtrip(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert header_of(plain)["version"] == 1
    m = nn.Linear(2, 2)
    m.kinds = {"a", "b"}
    _, data = roundtrip(m)
    assert header_of(data)["version"] == 2
    hlen, = struct.unpack("<I", data[4:8])
    header = json.loads(zlib.decompress(data[8:8 + hlen]))
    header["version"] = 3
    del header["crc32"]
    hb = json.dumps(header).encode()
    with pytest.raises(BadInput, match="unsupported nbcompress file version 3 .*reads versions "
                                       "1 to 2"):
        load(io.BytesIO(data[:4] + struct.pack("<I", len(hb)) + hb + data[8 + hlen:]))


def test_torch_tensor_operator_and_old_files_load():
    m = nn.Linear(3, 3)
    m.gate = torch.sigmoid                    # an ATen operator, stored as torch.sigmoid
    m.fn = torch.nn.functional.relu
    loaded, data = roundtrip(m)
    assert loaded.gate is torch.sigmoid and loaded.fn is torch.nn.functional.relu
    # files written before this change (tests/data, nbcompress at e78566b) load as they did
    here = pathlib.Path(__file__).parent / "data"
    for path in sorted(here.glob("*.nbc")):
        model = load(path).eval()
        ref = torch.load(path.with_suffix(".pt"), weights_only=True)
        with torch.no_grad():
            y = model(ref["x"])
        y = y[0] if isinstance(y, tuple) else y
        assert torch.allclose(y, ref["y"], atol=1e-6, rtol=1e-6), path.name


# ------------------------------------------------------------------------------ timm, torchvision

def test_torchvision_norm_layer_type_and_partial():
    tv = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    resnet = tv.models.resnet18(weights=None, num_classes=10)
    assert resnet._norm_layer is nn.BatchNorm2d                   # a class as an attribute
    x = torch.randn(2, 3, 64, 64)
    loaded, _ = roundtrip(resnet)
    assert loaded._norm_layer is nn.BatchNorm2d
    assert_same(resnet, loaded, lambda m: m(x))
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                            hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(vit.heads.head.weight)           # torchvision starts the head at zero
    assert isinstance(vit.norm_layer, functools.partial)          # partial(LayerNorm, eps=1e-6)
    loaded, _ = roundtrip(vit)
    assert loaded.norm_layer.func is nn.LayerNorm and loaded.norm_layer.keywords == {"eps": 1e-6}
    x = torch.randn(2, 3, 32, 32)
    assert_same(vit, loaded, lambda m: m(x))


def test_torchvision_structured_pruned_and_lowrank_round_trip():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = nbcompress.prune(model, 0.3, structured=True, example_input=x)
    assert pruned.layer1[0].conv1.out_channels < 64
    loaded, _ = roundtrip(pruned)
    assert loaded.layer1[0].conv1.weight.shape == pruned.layer1[0].conv1.weight.shape
    assert_same(pruned, loaded, lambda m: m(x))
    small = nbcompress.lowrank(model, rank=8, layers="layer4", example_input=x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    loaded, _ = roundtrip(small)
    assert [type(m) for m in loaded.layer4.modules()] == [type(m) for m in small.layer4.modules()]
    assert_same(small, loaded, lambda m: m(x))


def test_timm_enum_and_attention_bias_cache():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            depth=2, num_classes=10)
    assert isinstance(vit.patch_embed.output_fmt, enum.Enum)
    loaded, _ = roundtrip(vit)
    assert loaded.patch_embed.output_fmt is vit.patch_embed.output_fmt
    x = torch.randn(2, 3, 32, 32)
    assert_same(vit, loaded, lambda m: m(x))
    levit = timm.create_model("levit_128s", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        levit(x)                                       # eval forward fills the bias caches
    attn = levit.stages[0].blocks[0].attn
    assert attn.attention_bias_cache                   # a dict of unregistered tensors
    loaded, _ = roundtrip(levit)
    # stored empty: the module refills it from attention_biases on its next eval forward
    assert loaded.stages[0].blocks[0].attn.attention_bias_cache == {}
    assert_same(levit, loaded, lambda m: m(x))
    assert loaded.stages[0].blocks[0].attn.attention_bias_cache
