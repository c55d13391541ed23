"""Structured pruning of transformers (issue 15, part 4): whole attention heads and FFN neurons of
Hugging Face models built from small configs (random weights, no download), timm and torchvision
ViT / Swin (run where timm is installed), through the API and the magic. The hidden size is kept,
so a removed head must act exactly like the same head's output zeroed in the original."""
from __future__ import annotations

import copy

import pytest
import torch
from IPython.core.error import UsageError
from torch.utils.data import DataLoader, Dataset

import nbcompress
from nbcompress.core import compress
from nbcompress.errors import BadInput
from nbcompress.metrics import count_flops
from nbcompress.techniques.prune import PruneConfig
from nbcompress.techniques.prune.heads import find_blocks
from nbcompress.techniques.prune.importance import get_importance
from nbcompress.techniques.prune.units import HeadPruner
from nbcompress.train import forward_batch, logits_of

tr = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def _hf(name):
    torch.manual_seed(0)
    if name == "bert":
        cfg = tr.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=32, num_labels=3)
        return tr.BertForSequenceClassification(cfg), {"input_ids": IDS}
    if name == "distilbert":
        cfg = tr.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                  max_position_embeddings=32)
        return tr.DistilBertForSequenceClassification(cfg), {"input_ids": IDS}
    if name == "gpt2":
        cfg = tr.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                            bos_token_id=0, eos_token_id=0)
        return tr.GPT2LMHeadModel(cfg), {"input_ids": IDS}
    if name == "t5":
        cfg = tr.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                          num_heads=4, decoder_start_token_id=0)
        return tr.T5ForConditionalGeneration(cfg), {"input_ids": IDS,
                                                    "decoder_input_ids": IDS[:, :6]}
    if name == "vit":
        cfg = tr.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, num_labels=10)
        return tr.ViTForImageClassification(cfg), torch.randn(2, 3, 32, 32)
    if name.startswith("llama"):                  # llama-gqa: 2 key/value heads for 4 queries
        cfg = tr.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2 if "gqa" in name else 4,
                             intermediate_size=128)
        return tr.LlamaForCausalLM(cfg), {"input_ids": IDS}
    cfg = tr.WhisperConfig(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                           max_source_positions=20, max_target_positions=32, pad_token_id=0,
                           decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)
    return tr.WhisperForConditionalGeneration(cfg), {"input_features": torch.randn(2, 16, 40),
                                                      "decoder_input_ids": IDS[:, :6]}


HF = ("bert", "distilbert", "gpt2", "t5", "vit", "whisper", "llama", "llama-gqa")


def _out(model, x):
    with torch.no_grad():
        out = forward_batch(model.eval(), x)
    return getattr(out, "logits", None) if not isinstance(out, torch.Tensor) else out


def _n(model):
    return sum(p.numel() for p in model.parameters())


def _zeroed(model, x, plan):
    """The original with the planned heads / neurons silenced: the output projection's (down
    projection's) input columns of those units set to zero."""
    ref = copy.deepcopy(model)
    cp = HeadPruner(ref, x, get_importance("l2"))
    with torch.no_grad():
        for gi in cp.groups:
            for b in gi.blocks:
                for s in b.slices:
                    if s.role == "in" and plan.get(gi.name):
                        t = getattr(s.module, s.param)
                        idx = s.index(torch.tensor(plan[gi.name]), b.units, t.device)
                        t.index_fill_(s.dim, idx, 0.0)
    return ref


@pytest.mark.parametrize("name", HF)
def test_removed_heads_and_neurons_act_like_silenced_ones(name):
    model, x = _hf(name)
    model.eval()
    blocks, whole = find_blocks(model)
    assert whole == [] and {b.unit for b in blocks} == {"head", "neuron"}
    work = copy.deepcopy(model)
    cp = HeadPruner(work, x, get_importance("l2"))
    assert cp.apply({}) and torch.equal(_out(work, x), _out(model, x))       # 0 removed: same
    plan = {gi.name: [1, 2][:gi.channels - 1] if gi.unit == "head" else
            list(range(0, gi.channels, 3)) for gi in cp.groups}
    params, _ = cp.counts(plan)
    cp.apply(plan)
    assert _n(work) == params < _n(model)
    torch.testing.assert_close(_out(work, x), _out(_zeroed(model, x, plan), x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", HF)
def test_prune_api_halves_heads_and_ffn(name):
    model, x = _hf(name)
    before = _n(model)
    sliced = sum(getattr(s.module, s.param).numel() for b in find_blocks(model)[0]
                 for s in b.slices)
    out = nbcompress.prune(model, 0.5, structured=True, example_input=x)
    assert _n(model) == before                                      # the original untouched
    assert _n(out) == before - sliced // 2                          # 2 of 4 heads, half the FFN
    assert _out(out, x).shape == _out(model, x).shape
    heads = [getattr(m, a) for m in out.modules() for a in ("num_attention_heads", "n_heads",
                                                            "num_heads")
             if isinstance(getattr(m, a, None), int)]
    assert set(heads) <= {2} and {b.units for b in find_blocks(out)[0] if b.unit == "head"} == \
        {1 if name == "llama-gqa" else 2}                   # GQA: 1 of 2 key/value groups
    if name.startswith("llama"):
        attn = out.model.layers[0].self_attn
        assert attn.q_proj.out_features == 32 and attn.o_proj.in_features == 32
        assert attn.k_proj.out_features == (16 if name == "llama-gqa" else 32)
    if name == "gpt2":
        attn = out.transformer.h[0].attn
        assert attn.c_attn.weight.shape == (64, 96) and attn.split_size == 32
        assert attn.c_attn.nf == 96 and out.transformer.h[0].mlp.c_proj.nx == 128
    if name == "bert":
        sa = out.bert.encoder.layer[0].attention.self
        assert sa.all_head_size == 32 and sa.query.out_features == 32
        assert out.config.num_attention_heads == 4              # config: as built (see notes)
    if name == "t5":
        rel = out.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        assert rel.weight.shape == (32, 2) and rel.embedding_dim == 2


def test_notes_rows_and_bounds():
    model, x = _hf("whisper")
    r = compress(model, PruneConfig(
        amount=0.99, structured=True), example_input=x)
    text = " ".join(r.notes)
    assert "heads whole" in text and "2 convs (model.encoder.conv1" in text
    assert "embeddings" in text and "norms" in text
    heads = {row["channels"] for row in r.layers if row["unit"] == "head"}
    assert heads == {1}                                     # at least one head per block
    assert {row["channels"] for row in r.layers if row["unit"] == "neuron"} == {8}
    assert _out(r.model, x) is not None


def test_lowest_heads_go_and_layers_selects():
    model, x = _hf("bert")
    sa = model.bert.encoder.layer[1].attention.self
    with torch.no_grad():
        for lin in (sa.query, sa.key, sa.value):
            lin.weight[16:32] *= 1e-3                       # head 1 of layer 1: tiny
    out = nbcompress.prune(model, 0.25, structured=True, example_input=x, layers=r"layer\.1\.")
    sa0, sa1 = out.bert.encoder.layer[0].attention.self, out.bert.encoder.layer[1].attention.self
    assert sa0.num_attention_heads == 4 and sa1.num_attention_heads == 3
    keep = torch.cat([torch.arange(0, 16), torch.arange(32, 64)])
    assert torch.equal(sa1.query.weight, sa.query.weight[keep])
    assert out.bert.encoder.layer[0].intermediate.dense.out_features == 128
    assert out.bert.encoder.layer[1].intermediate.dense.out_features == 96


def test_bad_input_model_unchanged():
    model, x = _hf("bert")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(BadInput, match="matches no attention block or FFN"):
        nbcompress.prune(model, 0.5, structured=True, example_input=x, layers="classifier")
    with pytest.raises(BadInput, match="cannot be reached.*embeddings, norms and the classifier"):
        nbcompress.prune(model, structured=True, example_input=x, target_params=0.05)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_targets_and_criteria():
    model, x = _hf("bert")
    before = _n(model)
    out = nbcompress.prune(model, structured=True, example_input=x, target_params=0.7)
    assert 0.6 * before < _n(out) <= 0.7 * before
    f0 = count_flops(model, x)[0]
    out = nbcompress.prune(model, structured=True, example_input=x, target_flops=0.6)
    assert 0.5 * f0 < count_flops(out, x)[0] <= 0.6 * f0
    for imp in ("l1", "random"):
        o = nbcompress.prune(model, 0.5, structured=True, example_input=x, importance=imp)
        assert o.bert.encoder.layer[0].attention.self.num_attention_heads == 2


class Tokens(Dataset):
    """Dict batches as a dataset + collator yield them: class c uses tokens 20c..20c+19."""

    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.ids = torch.randint(0, 20, (n, 12), generator=g) + 20 * self.y[:, None]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.y[i]}


def test_magic_finetune_taylor_steps_and_undo(shell):
    model, _ = _hf("bert")
    orig = copy.deepcopy(model.state_dict())
    ns = shell.user_ns
    ns.update(bert=model, train_dl=DataLoader(Tokens(32), batch_size=16),
              test_dl=DataLoader(Tokens(16, seed=1), batch_size=16))
    r = shell.run_line_magic("prune", "bert 0.5 --structured --steps 2 --importance taylor "
                                      "--finetune train_dl --eval test_dl --no-progress")
    new = ns["bert"]
    assert new.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert r.after.params < r.before.params and "rounds" in r.result.tables
    assert "heads whole" in repr(r) or "heads whole" in " ".join(r.result.notes)
    with torch.no_grad():
        assert logits_of(new(**{k: v for k, v in next(iter(ns["test_dl"])).items()
                                if k != "labels"})).shape == (16, 3)
    shell.run_line_magic("undo", "bert")
    back = ns["bert"].state_dict()
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)
    with pytest.raises(UsageError, match="matches no attention block or FFN"):
        shell.run_line_magic("prune", "bert 0.5 --structured --layers nothing_here")
    assert ns["bert"].bert.encoder.layer[0].attention.self.num_attention_heads == 4


# --- timm / torchvision (run where they are installed) ------------------------------------------
@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, embed_dim=32,
                                          depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4))),
])
def test_timm_heads(name, kw):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    work = copy.deepcopy(model)
    cp = HeadPruner(work, x, get_importance("l2"))
    assert len(cp.groups) == len(find_blocks(model)[0]) > 0
    plan = {gi.name: [0] if gi.unit == "head" else list(range(0, gi.channels, 4))
            for gi in cp.groups}
    cp.apply(plan)
    torch.testing.assert_close(_out(work, x), _out(_zeroed(model, x, plan), x),
                               rtol=1e-4, atol=1e-5)
    out = nbcompress.prune(model, 0.5, structured=True, example_input=x)
    assert _n(out) < 0.65 * _n(model) and _out(out, x).shape == (2, 10)


def test_torchvision_vit_mha_left_whole():
    tv = pytest.importorskip("torchvision")
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                        hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    r = compress(model, PruneConfig(
        amount=0.5, structured=True), example_input=x)
    assert "nn.MultiheadAttention" in " ".join(r.notes)
    assert r.model.encoder.layers[0].mlp[0].out_features == 64 and _out(r.model, x).shape == (2, 10)


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
@pytest.mark.parametrize("name", ("bert", "vit"))
def test_blocks_are_torch_pruning_dependency_groups(name):
    """Each attention block / FFN found by structure couples the same layers as torch-pruning's
    dependency graph traced on the model (Q, K, V with the output projection; up with down)."""
    tp = pytest.importorskip("torch_pruning")
    model, x = _hf(name)
    dg = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=x)
    names = {m: n for n, m in model.named_modules()}
    tp_sets = {frozenset(names[it.dep.target.module] for it in g if it.dep.target.module in names
                         and isinstance(it.dep.target.module, torch.nn.Linear))
               for g in dg.get_all_groups(root_module_types=(torch.nn.Linear,))}
    ours = {frozenset(b.layers) for b in find_blocks(model)[0]}
    assert len(ours) == 4 and ours <= tp_sets


class _WidthFromInput(torch.nn.Module):
    """An attention that reads its head size from the input width (C // num_heads), as some timm
    models do: it cannot lose a head, so it is left whole; the FFN beside it is still pruned."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads, self.qkv, self.proj = heads, torch.nn.Linear(dim, 3 * dim), \
            torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads) \
            .permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, C))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.attn = torch.nn.Linear(8, 32), _WidthFromInput()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                       torch.nn.Linear(64, 32))
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.attn(h)
        return self.head((h + self.mlp(h)).mean(1))


def test_a_block_that_cannot_lose_a_head_is_left_whole():
    x = torch.randn(2, 5, 8)
    r = compress(_Tiny(), PruneConfig(amount=0.5, structured=True), example_input=x)
    assert r.model.attn.num_heads == 4 and r.model.attn.qkv.out_features == 96
    assert r.model.mlp[0].out_features == 32 and r.model(x).shape == (2, 3)
    assert any("left whole: attn (its forward fails with fewer heads" in n for n in r.notes)
