"""Early exits on Hugging Face transformers models (issue 15): their own forward runs, the exits
hook their stack of layers (a decoder's for an encoder-decoder), dict batches in, ModelOutput out.

Checked on models built from configs (random weights, no download): every row of the early-exit
forward is the output of the first exit confident enough for it (or the final output), with
padded attention masks and two exits so samples leave at each; a BERT trained on token sequences
and a GPT-2 trained on Python standard library source through the magic, the API, the sweep,
honest FLOPs, save / load and undo; bad input is one line, the model unchanged."""
from __future__ import annotations

import copy

import pytest
import torch
from IPython.core.error import UsageError
from torch.utils.data import DataLoader

import nbcompress
from nbcompress.batches import forward_batch, logits_of
from nbcompress.data import TEXT_VOCAB, text_loaders
from nbcompress.techniques.earlyexit import threshold_sweep
from nbcompress.techniques.earlyexit.hooked import HookedExitModel, find_stack
from nbcompress.techniques.earlyexit.model import confidence
from nbcompress.train import evaluate, evaluation, fit
from test_storage import roundtrip

tr = pytest.importorskip("transformers")
tr.logging.set_verbosity_error()

V, SEQ = 64, 8


def build(name: str, layers: int = 4):
    torch.manual_seed(0)
    att = dict(num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
               hidden_size=32)
    return {
        "bert": lambda: tr.BertForSequenceClassification(tr.BertConfig(vocab_size=V, num_labels=3,
                                                                       **att)),
        "gpt2": lambda: tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=V, n_embd=32, n_layer=layers,
                                                         n_head=2, n_positions=32)),
        "llama": lambda: tr.LlamaForCausalLM(tr.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)),
        "t5": lambda: tr.T5ForConditionalGeneration(tr.T5Config(
            vocab_size=V, d_model=32, d_ff=64, d_kv=16, num_layers=layers, num_heads=2,
            decoder_start_token_id=0)),
        "vit": lambda: tr.ViTForImageClassification(tr.ViTConfig(image_size=16, patch_size=4,
                                                                 num_labels=5, **att)),
    }[name]().eval()


def batch(name: str, n: int = 12, seed: int = 0) -> dict:
    """Inputs with padding: row i keeps its first SEQ - i % 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g)}
    ids = torch.randint(1, V, (n, SEQ), generator=g)
    mask = (torch.arange(SEQ)[None] < (SEQ - torch.arange(n) % 4)[:, None]).long()
    x = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        x.update(decoder_input_ids=torch.randint(1, V, (n, SEQ), generator=g),
                 decoder_attention_mask=mask.flip(0))
    return x


def split_by_the_rule(ee, x):
    """Set ``ee``'s threshold between the two middle values of its exits' confidences on ``x``
    (so samples leave at the exits and go on, and none sits on the threshold, where another
    runtime's rounding could send it the other way), and return (every exit's scores, the exit
    each sample takes by the rule, computed here from them, the scores it must get)."""
    outs = ee.forward_all(x)
    mask = ee.token_mask(x)
    conf = [confidence(o, mask) for o in outs[:-1]]
    c = torch.cat(conf).sort().values
    ee.threshold = float((c[len(c) // 2 - 1] + c[len(c) // 2]) / 2)
    first = torch.full((len(conf[0]),), len(outs) - 1)
    for k in reversed(range(len(conf))):
        first[conf[k] >= ee.threshold] = k
    return outs, first, torch.stack([outs[int(k)][i] for i, k in enumerate(first)])


def attach(name: str, m, data):
    loader = DataLoader([data], batch_size=None)
    return nbcompress.early_exit(m, loader, exits="0,1", epochs=1, progress=False)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5", "vit"])
def test_each_row_is_its_first_confident_exit(name):
    m = build(name)
    x = batch(name)
    ee = attach(name, m, x)
    assert isinstance(ee, HookedExitModel) and ee.backbone is not m      # a copy: m unchanged
    assert ee.stack == find_stack(m) and ("decoder" in ee.stack) == (name == "t5")
    ee.eval()
    with torch.no_grad():
        outs, first, want = split_by_the_rule(ee, x)
        ee.reset_exit_counts()
        got = forward_batch(ee, x)
    assert type(got) is type(forward_batch(m, x))          # the model's own ModelOutput
    torch.testing.assert_close(logits_of(got), want, rtol=1e-4, atol=1e-5)
    assert ee.exit_counts == tuple(int((first == k).sum()) for k in range(len(outs)))
    assert ee.exit_counts[-1] > 0 and sum(ee.exit_counts[:-1]) > 0
    with torch.no_grad():               # threshold 1: the model's own output, bit for bit
        ee.threshold = 1.0
        assert torch.equal(logits_of(forward_batch(ee, x)), logits_of(forward_batch(m, x)))
        ee.threshold = 1e-6             # every sample leaves at the first exit: forward stops
        ee.reset_exit_counts()
        out = forward_batch(ee, x)
        assert type(out) is type(forward_batch(m, x)) and torch.equal(out.logits, outs[0])
        assert ee.exit_counts[0] == len(first)


@pytest.fixture(scope="module")
def tokens():
    """A 4-layer BERT trained on token sequences whose class shows in their tokens, and loaders
    of dict batches {input_ids, attention_mask, labels}."""
    from test_dict_batches import Tokens

    train = DataLoader(Tokens(n=384, seed=0), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(Tokens(n=192, seed=1), batch_size=64)
    torch.manual_seed(0)
    m = tr.BertForSequenceClassification(tr.BertConfig(
        vocab_size=39, num_labels=3, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, hidden_size=32, max_position_embeddings=16))
    fit(m, train, epochs=6, lr=3e-3, progress=False, seed=0)
    m.eval()
    return m, train, test


def test_bert_exits_through_the_magic_save_load_and_undo(shell, tokens, tmp_path):
    m, train, test = tokens
    full = evaluate(m, test)
    assert full > 0.8                                          # the BERT learnt the task
    shell.run_line_magic("load_ext", "nbcompress")
    shell.user_ns.update(bert=copy.deepcopy(m), train_dl=train, test_dl=test)
    before = copy.deepcopy(shell.user_ns["bert"].state_dict())
    report = shell.run_line_magic("earlyexit", "bert --data train_dl --eval test_dl --epochs 4 "
                                  "--threshold 0.9")
    ee = shell.user_ns["bert"]
    assert isinstance(ee, HookedExitModel) and ee.exit_names == ("bert.encoder.layer.0",
                                                                  "bert.encoder.layer.1",
                                                                  "bert.encoder.layer.2")
    sweep = report.result.tables["threshold sweep"]
    row = sweep[sweep["current"]].iloc[0]
    # samples leave early, the FLOPs they save are counted, accuracy stays near the network's
    assert row["flops_fraction"] < 0.9 and sum(row[f"share after {n}"] for n in ee.exit_names) > 0.2
    assert row["accuracy"] > full - 0.05
    assert sweep[sweep["threshold"] == 1.0]["accuracy"].iloc[0] == pytest.approx(full)
    assert report.after.accuracy == pytest.approx(row["accuracy"])     # the real forward agrees
    assert report.after.flops < 0.9 * report.before.flops
    # save / load: the transformers model rebuilt from its config, the heads, the exits
    path = tmp_path / "bert_ee.nbc"
    nbcompress.save(ee, path)
    back = nbcompress.load(path)
    assert isinstance(back, HookedExitModel) and back.exit_names == ee.exit_names
    x = {k: v for k, v in next(iter(test)).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(back(**x).logits, ee(**x).logits)
    shell.run_line_magic("undo", "bert")
    got = shell.user_ns["bert"]
    assert type(got) is type(m) and all(torch.equal(v, got.state_dict()[k])
                                        for k, v in before.items())
    # an early-exit model: only the threshold changes, undoably
    shell.run_line_magic("redo", "bert")
    shell.run_line_magic("earlyexit", "bert --threshold 0.99")
    assert shell.user_ns["bert"].threshold == 0.99
    # exported from the magic: the graph takes the model's keyword inputs, each sample its exit
    r = shell.run_line_magic("export", f"bert {tmp_path}/bert_ee.onnx --check test_dl "
                                       f"--no-latency")
    assert "early exit" in r.notes and r.check["agreement"] >= 0.99, r


def test_gpt2_exits_on_real_text(tokens):
    train, test = text_loaders(32, 32, 64, train_bytes=40_000, test_bytes=4_000)
    torch.manual_seed(0)
    lm = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=TEXT_VOCAB, n_embd=64, n_layer=4, n_head=4,
                                          n_positions=32, bos_token_id=0, eos_token_id=0))
    fit(lm, train, epochs=4, lr=1e-3, progress=False, seed=0)   # (perplexity about 17)
    lm.eval()
    ee = nbcompress.early_exit(lm, train, epochs=2, lr=3e-3, progress=False)
    assert ee.tokens and ee.exit_names == ("transformer.h.0", "transformer.h.1",
                                           "transformer.h.2")   # every layer but the last
    sweep = threshold_sweep(ee, test)
    # threshold 1: every token from the final output: the sweep's token accuracy is the model's
    # (fixed-length sequences: the mean of per-sample token accuracies is the token accuracy)
    assert sweep[sweep["threshold"] == 1.0]["accuracy"].iloc[0] == \
        pytest.approx(evaluation(lm, test)["token_accuracy"])
    # every token of a sequence must be confident for it to leave (the least confident decides),
    # so at the thresholds of a classifier this small LM's sequences of 32 bytes all go on; at
    # the median confidence of its first exit half of them leave there
    x = {k: v for k, v in next(iter(test)).items() if k != "labels"}
    with torch.no_grad():
        outs = ee.forward_all(x)
        final = outs[-1].argmax(-1)
        # the heads start from the LM head and are trained: their tokens agree with the final
        # output more than always answering its most frequent token would, the later the more
        agree = [float((o.argmax(-1) == final).float().mean()) for o in outs[:-1]]
        mode = float(torch.bincount(final.flatten()).max() / final.numel())
        ee.threshold = float(confidence(outs[0]).median())
    assert final.unique().numel() > 5 and mode < agree[0] < agree[-1], (agree, mode)
    assert sweep[sweep["threshold"] == 0.95].iloc[0][f"share after {ee.exit_names[0]}"] == 0
    ee.reset_exit_counts()
    assert evaluate(ee, test) > 1.0                     # a perplexity, from the exits' answers
    shares = ee.exit_shares()
    assert 0.3 < shares[f"after {ee.exit_names[0]}"] < 0.7, shares


def test_bad_input_is_one_line_and_the_model_unchanged(shell, tokens):
    m, train, _ = tokens
    shell.run_line_magic("load_ext", "nbcompress")
    shell.user_ns.update(bert=m, train_dl=train)
    state = copy.deepcopy(m.state_dict())
    for args, msg in [("bert --data train_dl --exits 7", "go after its layers "
                                                        "bert.encoder.layer.0 .. "
                                                        "bert.encoder.layer.3"),
                      ("bert --data train_dl --exits 3", "is the last layer"),
                      ("bert --data train_dl --exits bert.pooler", "is not one of them"),
                      ("bert --data train_dl --head conv", "LayerNorm \\+ linear over its tokens"),
                      ("bert --data train_dl --exits 1,1", "names a layer twice")]:
        with pytest.raises(UsageError, match=msg) as e:
            shell.run_line_magic("earlyexit", args)
        assert "\n" not in str(e.value)
    assert shell.user_ns["bert"] is m
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


def test_timm_models_that_are_no_chain_get_exits_on_their_stack():
    """LeViT (two heads averaged), XCiT (a class token added after its blocks): no chain of
    sub-modules, but a stack of blocks their forward runs one after another (``stages``,
    ``blocks``); the exits hook it as on a transformers model. Each row is its first confident
    exit's; at threshold 1 the model's own output; save / load round-trips. HRNet's parallel
    branches are refused in one line."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    for name, size, prefix in [("xcit_nano_12_p16_224", 64, "blocks."),
                               ("levit_128s", 224, "stages.")]:
        m = timm.create_model(name, pretrained=False, num_classes=10, img_size=size).eval()
        x = torch.randn(8, 3, size, size, generator=g)
        ee = nbcompress.early_exit(m, DataLoader([x], batch_size=None), epochs=1,
                                   progress=False).eval()
        assert isinstance(ee, HookedExitModel) and not ee.pairs and ee.stack == prefix[:-1]
        assert ee.exit_names and all(n.startswith(prefix) for n in ee.exit_names)
        with torch.no_grad():
            *_, want = split_by_the_rule(ee, x)
            got = ee(x)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
            ee.threshold = 1.0
            assert torch.allclose(ee(x), m(x), atol=1e-5)
        back = roundtrip(ee)[0].eval()
        with torch.no_grad():
            assert torch.equal(back.forward_all(x)[-1], ee.forward_all(x)[-1])
    hr = timm.create_model("hrnet_w18_small", pretrained=False, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64, generator=g)
    with pytest.raises(nbcompress.BadInput, match="cannot run on the samples that stay alone") \
            as e:
        nbcompress.early_exit(hr, DataLoader([x], batch_size=None), epochs=1)
    assert "\n" not in str(e.value)


def test_flops_count_attention_as_the_dashboard_does():
    """The FLOPs an early-exit model reports are counted as ``measure`` counts the network's (the
    fused attention kernels' formulas included): at threshold 1 every sample runs to the end, so
    the count is the network's plus its heads', never less (it was 0.78x: the batched evaluation
    ran an attention kernel the plain counter scores as 0)."""
    torch.manual_seed(0)
    vit = tr.ViTForImageClassification(tr.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=10)).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(50, 1, 28, 28, generator=g),
             "labels": torch.randint(0, 10, (50,), generator=g)} for _ in range(2)]
    dl = DataLoader(data, batch_size=None)
    ex = {"pixel_values": data[0]["pixel_values"][:1]}
    before = nbcompress.measure(vit, ex, latency=False).flops
    ee = nbcompress.early_exit(vit, dl, epochs=1, threshold=1.0, progress=False)
    after = nbcompress.measure(ee, ex, evaluator=dl, latency=False).flops
    heads = ee.segment_flops(ex)[1]
    assert after == pytest.approx(before + sum(heads), rel=1e-3)


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "vit"])
def test_exits_export_to_onnx_and_the_runtime_takes_each_rows_exit(name, tmp_path):
    """``export`` of a transformers model with exits: its keyword inputs go into the graph, every
    exit is computed there and each row takes its first confident exit (token scores over the
    positions its padding mask keeps): ONNX Runtime gives each row what the rule gives it."""
    ort = pytest.importorskip("onnxruntime")
    ee = attach(name, build(name), batch(name)).eval()
    x = batch(name, seed=1)
    with torch.no_grad():
        outs, first, want = split_by_the_rule(ee, x)
    assert 0 < int((first < len(outs) - 1).sum()) < len(first)   # some rows leave, some go on
    from nbcompress.deploy.lowering import LoweredEarlyExit

    lowered = LoweredEarlyExit(ee)
    with torch.no_grad():
        torch.testing.assert_close(lowered(**x), want)         # the graph before export
    first_key, *rest = x
    with pytest.raises(TypeError, match="one batch"):          # positional and keywords at once
        lowered(x[first_key], **({k: x[k] for k in rest} or {"output_hidden_states": False}))
    r = nbcompress.export(ee, tmp_path / "ee.onnx", example_input=x, latency=False)
    assert "early exit" in r.notes and r.dynamic_batch
    s = ort.InferenceSession(str(tmp_path / "ee.onnx"), providers=["CPUExecutionProvider"])
    got = s.run(None, {i.name: x[i.name].numpy() for i in s.get_inputs()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
    half = {k: v[:5] for k, v in x.items()}                      # another batch size runs too
    got5 = s.run(None, {i.name: half[i.name].numpy() for i in s.get_inputs()})[0]
    torch.testing.assert_close(torch.from_numpy(got5), want[:5], rtol=1e-4, atol=1e-5)
