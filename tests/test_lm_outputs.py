"""Sequence outputs (issue 15, part 1): language models whose scores are [batch, seq, vocab].

A GPT-2 (transformers, from a small config) and a plain nn.Module LM are trained, evaluated
(perplexity and next-token accuracy), pruned with fine-tuning through the magic, and distilled
token by token, on real text available offline: Python standard library source files, as bytes
(a byte-level vocabulary of 256). Bad input is one line before any work, the model unchanged."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nbcompress
from nbcompress.core import BadInput
from nbcompress.data import TEXT_VOCAB, TokenSequences, text_arrays, text_loaders
from nbcompress.report.html import history_table_html
from nbcompress.report.tables import METRICS, compute_change
from nbcompress.tokens import task_loss, token_kd_loss
from nbcompress.train import evaluate, evaluation, fit

tr = pytest.importorskip("transformers")
tr.logging.set_verbosity_error()

SEQ = 32


def gpt2(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = tr.GPT2Config(vocab_size=TEXT_VOCAB, n_positions=SEQ, n_embd=32, n_layer=layers,
                        n_head=2, bos_token_id=0, eos_token_id=0)
    return tr.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def text():
    """Loaders of {"input_ids", "attention_mask", "labels"} over stdlib source bytes, and the ids."""
    train, test = text_loaders(SEQ, 32, 64, train_bytes=16_000, test_bytes=6_000)
    train_ids, test_ids = text_arrays(SEQ, train_bytes=16_000, test_bytes=6_000)
    assert torch.equal(train.dataset.ids, train_ids)
    return train, test, train_ids, test_ids


@pytest.fixture(scope="module")
def trained(text):
    """(GPT-2 trained one epoch on the text, its evaluation before, the fit records)."""
    train, test, *_ = text
    model = gpt2()
    before = evaluation(model, test)
    records = fit(model, train, epochs=1, lr=2e-2, progress=False, eval_loader=test, seed=0)
    return model, before, records


def test_token_loss_is_the_models_own_and_labels_shift(text):
    """Our loss from the logits equals GPT-2's own shifted loss, -100 ignored."""
    _, test, *_ = text
    model = gpt2().eval()
    batch = next(iter(test))
    batch["labels"][:, :5] = -100
    with torch.no_grad():
        theirs = model(**batch).loss
        x = {k: v for k, v in batch.items() if k != "labels"}
        ours = task_loss(model(**x).logits, x, batch["labels"])
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_gpt2_trained_one_epoch_on_real_text_perplexity_falls(trained):
    model, before, records = trained
    after = records[-1]
    assert before["perplexity"] > 150                # untrained: near uniform over 256 bytes
    assert after["perplexity"] < before["perplexity"] / 4
    assert after["token_accuracy"] > before["token_accuracy"] + 0.05
    assert 0 < after["token_accuracy"] < 1 and "accuracy" not in after
    assert math.isclose(math.log(before["perplexity"]), before["loss"])
    print(f"GPT-2 perplexity {before['perplexity']:.1f} -> {after['perplexity']:.2f}, "
          f"next-token accuracy {before['token_accuracy']:.3f} -> {after['token_accuracy']:.3f}")


def test_evaluate_metrics_and_measure(trained, text):
    model, _, records = trained
    _, test, *_ = text
    ppl = evaluate(model, test)                      # auto: a language model's perplexity
    assert ppl == pytest.approx(records[-1]["perplexity"])
    assert evaluate(model, test, metric="token_accuracy") == \
        pytest.approx(records[-1]["token_accuracy"])
    with pytest.raises(BadInput, match="top-1 accuracy scores class predictions"):
        evaluate(model, test, metric="accuracy")     # an LM scored as a classifier by mistake
    m = nbcompress.measure(model, evaluator=test, latency=False, pack=False)
    assert m.perplexity == pytest.approx(ppl) and m.accuracy == pytest.approx(
        records[-1]["token_accuracy"])
    assert "perplexity" in repr(m) and "(next token)" in repr(m)
    spec = next(s for s in METRICS if s.key == "perplexity")
    assert compute_change(spec, 20.0, 10.0).state == "better"        # lower is better
    assert compute_change(spec, 10.0, 20.0).text == "2.00× higher"
    # a callable evaluator may give a perplexity too
    got = nbcompress.measure(model, next(iter(test))["input_ids"][:1], latency=False, pack=False,
                             evaluator=lambda mdl: {"perplexity": 12.5})
    assert got.perplexity == 12.5 and got.accuracy is None


class PlainLM(nn.Module):
    """A user's LM: token ids in, [B, T, V] scores out (a causal 1-d convolution stack)."""

    def __init__(self, vocab=256, dim=48):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, 4)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x):
        h = self.emb(x).transpose(1, 2)
        h = torch.relu(self.conv(F.pad(h, (3, 0)))).transpose(1, 2)
        return self.out(h)


def test_plain_lm_with_next_token_or_same_token_targets(text):
    _, _, train_ids, test_ids = text
    shifted = DataLoader(TensorDataset(train_ids[:, :-1], train_ids[:, 1:]), batch_size=16,
                         shuffle=True, generator=torch.Generator().manual_seed(0))
    test_same = DataLoader(TensorDataset(test_ids, test_ids), batch_size=64)       # y = x
    test_next = DataLoader(TensorDataset(test_ids[:, :-1], test_ids[:, 1:]), batch_size=64)
    lm = PlainLM()
    before = evaluate(lm, test_next)
    fit(lm, shifted, epochs=1, lr=3e-3, progress=False, seed=0)
    after = evaluation(lm, test_next)
    assert after["perplexity"] < before / 4
    # the same sequences as (x, x): the labels are the inputs, so they are shifted by one
    same = evaluation(lm, test_same)
    assert same["tokens"] == after["tokens"] == test_ids.numel() - len(test_ids)
    assert same["perplexity"] == pytest.approx(after["perplexity"], rel=1e-6)


def test_prune_gpt2_with_finetune_through_the_magic(shell, trained, text):
    model, _, _ = trained
    _, test, train_ids, _ = text
    few = DataLoader(TokenSequences(train_ids[:64]), batch_size=32)        # a short fine-tune
    gpt = copy.deepcopy(model)
    original = {k: v.clone() for k, v in gpt.state_dict().items()}
    shell.user_ns.update(gpt2=gpt, train_dl=few, test_dl=test)
    report = shell.run_line_magic("prune", "gpt2 0.3 --finetune train_dl --epochs 1 "
                                           "--eval test_dl")
    assert report.before.perplexity == pytest.approx(evaluate(model, test))
    assert report.after.nonzero_params < report.before.nonzero_params
    assert report.after.perplexity < 1.5 * report.before.perplexity
    text_out = report.text(timings=False)
    assert "perplexity" in text_out and "(accuracy not measured" not in text_out
    table = shell.run_line_magic("compress_history", "gpt2 --no-plot")
    assert list(table["perplexity"]) == pytest.approx([report.before.perplexity,
                                                       report.after.perplexity])
    html = report.summary_html() + report.metrics_html()
    assert "Perplexity" in html and "perplexity" in report.metrics_html()    # KPI tile, row
    assert "perplexity" in history_table_html(table)
    print(text_out)
    shell.run_line_magic("undo", "gpt2")
    restored = shell.user_ns["gpt2"].state_dict()
    assert all(torch.equal(restored[k], v) for k, v in original.items())


def test_distill_a_gpt2_student_token_by_token(trained, text):
    teacher, _, records = trained
    train, test, *_ = text
    student = gpt2(layers=1, seed=1)
    before = evaluate(student, test)
    student = nbcompress.distill(student, teacher, train, epochs=1, lr=2e-2, progress=False)
    after = evaluate(student, test)
    assert after < before / 4
    assert after < 2 * records[-1]["perplexity"]
    print(f"student perplexity {before:.1f} -> {after:.2f} (teacher {records[-1]['perplexity']:.2f})")
    # the soft-target loss: KL over the vocabulary at the positions that count (shifted)
    batch = next(iter(test))
    x = {k: v for k, v in batch.items() if k != "labels"}
    y = batch["labels"].clone()
    y[:, -4:] = -100
    with torch.no_grad():
        s, t = student(**x).logits, teacher(**x).logits
    kd = token_kd_loss(s, t, x, y, T=2.0)
    keep = y[:, 1:] != -100
    kl = F.kl_div(F.log_softmax(s[:, :-1][keep] / 2, -1), F.log_softmax(t[:, :-1][keep] / 2, -1),
                  reduction="batchmean", log_target=True) * 4
    assert kd.item() == pytest.approx(kl.item(), rel=1e-5)


# ------------------------------------------------------------------------------ bad input

class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.out = nn.Linear(16, 256)

    def forward(self, *, input_ids, attention_mask=None):
        return self.out(self.emb(input_ids))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_bad_input_is_one_line_before_any_work(shell, trained, text):
    model, _, _ = trained
    train, test, train_ids, _ = text
    gpt = copy.deepcopy(model)
    kw = KeywordOnly()
    before_gpt, before_kw = _state(gpt), _state(kw)
    bare = DataLoader(TensorDataset(train_ids[:32], train_ids[:32]), batch_size=16)
    no_ids = DataLoader([{"attention_mask": torch.ones(SEQ, dtype=torch.long),
                          "labels": train_ids[0]}] * 4, batch_size=2)
    wrong_keys = DataLoader([{"ids": train_ids[0], "labels": train_ids[0]}] * 4, batch_size=2)
    short = DataLoader([{"input_ids": train_ids[0], "labels": train_ids[0][:-1]}] * 4,
                       batch_size=2)
    out_of_vocab = DataLoader([{"input_ids": train_ids[0],
                                "labels": torch.full((SEQ,), 300)}] * 4, batch_size=2)
    shell.user_ns.update(gpt2=gpt, kw=kw, bare=bare, no_ids=no_ids, wrong_keys=wrong_keys,
                         short=short, oov=out_of_vocab, test_dl=test)
    cases = [("kw 0.3 --finetune bare", "forward takes keyword inputs"),
             ("gpt2 0.3 --finetune no_ids", r"a dict of \['attention_mask'\].*input_ids"),
             ("kw 0.3 --finetune wrong_keys", "needs input_ids, which the loader's dicts do not"),
             ("gpt2 0.3 --finetune short", r"token labels are \[batch, seq\] = \(2, 32\)"),
             ("gpt2 0.3 --finetune oov", "token id 300, but the model scores a vocabulary of 256")]
    for args, msg in cases:
        with pytest.raises(UsageError, match=msg) as e:
            shell.run_line_magic("prune", args)
        assert "\n" not in str(e.value), str(e.value)
    assert _same(gpt, before_gpt) and _same(kw, before_kw)
    # the Python API: the same lines, before a single step
    with pytest.raises(BadInput, match="forward takes keyword inputs"):
        fit(kw, bare, progress=False)
    with pytest.raises(BadInput, match="token labels are"):
        fit(gpt, short, progress=False)
    with pytest.raises(BadInput, match="token labels are"):
        evaluate(gpt, short)
    with pytest.raises(BadInput, match="perplexity needs a language model"):
        evaluate(nn.Sequential(nn.Flatten(), nn.Linear(SEQ, 256)),
                 DataLoader(TensorDataset(train_ids[:8].float(), train_ids[:8, 0]), batch_size=4),
                 metric="perplexity")
    assert _same(gpt, before_gpt) and _same(kw, before_kw)


@pytest.mark.parametrize("importance,structured", [("taylor", True), ("taylor", False),
                                                   ("hessian", False)])
def test_importance_measured_on_data_scores_a_language_model(trained, text, importance,
                                                             structured):
    """Taylor / Hessian importance take their gradients from the token-level loss (shifted,
    -100 ignored), as fit does, not from a classifier's cross-entropy on [B, T, V] scores."""
    train, test, train_ids, _ = text
    if importance == "hessian":      # per-sample gradients: tensor inputs (ids, ids) only
        train = DataLoader(TensorDataset(train_ids, train_ids), batch_size=8)
    model = copy.deepcopy(trained[0])
    before = sum(p.numel() for p in model.parameters())
    pruned = nbcompress.prune(model, 0.3, structured=structured, importance=importance,
                              data=train, importance_batches=2)
    assert evaluate(pruned, test, metric="perplexity") < 1e4
    if structured:
        assert sum(p.numel() for p in pruned.parameters()) < before
    else:
        assert sum(int((p != 0).sum()) for p in pruned.parameters()) < \
            0.9 * sum(int((p != 0).sum()) for p in model.parameters())
