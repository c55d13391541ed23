"""Batches as Hugging Face users have them (issue 15, part 1): a loader of dicts (what a dataset +
collator yields, `labels` beside the model's keyword inputs) and a model returning a dict with
`logits`, through fit / evaluate, fine-tuning, data-driven importance, calibration, QAT,
distillation and a magic with --eval. The model is one a user writes (no transformers needed)."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn
from torch.utils.data import DataLoader, Dataset

import nbcompress
from nbcompress.batches import example_of, head, split_batch
from nbcompress.train import evaluate, fit


class Tokens(Dataset):
    """Sequences of mostly class-specific tokens (class c: tokens 13c..13c+12, a quarter of them
    random), as dicts."""

    def __init__(self, n=192, seq=8, vocab=39, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        ids = torch.randint(0, 13, (n, seq), generator=g) + 13 * self.y[:, None]
        noise = torch.rand(n, seq, generator=g) < 0.25
        self.ids = torch.where(noise, torch.randint(0, vocab, (n, seq), generator=g), ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.y[i]}


class TinyTextClassifier(nn.Module):
    """Keyword inputs and a dict output with ``logits``, like a transformers model."""

    def __init__(self, vocab=39, dim=32, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return OrderedDict(logits=self.fc2(torch.relu(self.fc1(h.mean(1)))))


@pytest.fixture(scope="module")
def loaders():
    return (DataLoader(Tokens(seed=0), batch_size=32, shuffle=True),
            DataLoader(Tokens(n=96, seed=1), batch_size=48))


@pytest.fixture(scope="module")
def trained(loaders):
    m = TinyTextClassifier()
    fit(m, loaders[0], epochs=15, lr=1e-2, progress=False)
    return m


def test_split_and_head_of_a_dict_batch():
    batch = next(iter(DataLoader(Tokens(), batch_size=4)))
    x, y = split_batch(batch)
    assert set(x) == {"input_ids", "attention_mask"} and y.shape == (4,)
    one = example_of(batch)
    assert one["input_ids"].shape == (1, 8) and "labels" not in one
    assert head(x, 2)["attention_mask"].shape == (2, 8)
    with pytest.raises(nbcompress.BadInput, match="needs model inputs besides its labels"):
        split_batch({"labels": torch.zeros(2)})


def test_fit_and_evaluate_on_dict_batches(trained, loaders):
    acc = evaluate(trained, loaders[1])
    assert acc > 0.9                      # learnt from the dict batches (chance is 1/3)
    assert evaluate(TinyTextClassifier(seed=3), loaders[1]) < acc


def test_every_technique_reads_dict_batches(trained, loaders):
    train, test = loaders
    base = evaluate(trained, test)
    tuned = nbcompress.prune(trained, 0.5, finetune=train, epochs=2, lr=1e-3)
    assert evaluate(tuned, test) > base - 0.1
    taylor = nbcompress.prune(trained, 0.5, importance="taylor", data=train)
    zeros = sum(int((getattr(taylor, n).weight == 0).sum()) for n in ("fc1", "fc2"))
    assert zeros / (32 * 64 + 64 * 3) == pytest.approx(0.5, abs=0.01)   # global, over fc1 + fc2
    static = nbcompress.quantize(trained, mode="static", calib=train)
    assert evaluate(static, test) > base - 0.1
    qat = nbcompress.quantize(trained, bits=4, qat=train, epochs=1)
    assert evaluate(qat, test) > base - 0.15
    student = nbcompress.distill(TinyTextClassifier(dim=16, seed=1), trained, train, epochs=8,
                                 lr=1e-2)
    assert evaluate(student, test) > 0.5
    low = nbcompress.lowrank(trained, energy=0.9, finetune=train, layers="fc1")
    assert evaluate(low, test) > base - 0.15


def test_magic_with_dict_loaders_and_undo(shell, trained, loaders):
    train, test = loaders
    shell.user_ns.update(clf=trained, train_dl=train, test_dl=test)
    report = shell.run_line_magic("prune", "clf 0.5 --finetune train_dl --eval test_dl")
    assert report.before.accuracy == pytest.approx(evaluate(trained, test))
    assert report.after.nonzero_params < report.before.nonzero_params
    shell.run_line_magic("undo", "clf")
    assert torch.equal(shell.user_ns["clf"].fc1.weight, trained.fc1.weight)
    shell.user_ns["only_labels"] = DataLoader([{"labels": torch.tensor(1)}] * 4, batch_size=2)
    with pytest.raises(UsageError, match="needs model inputs besides its labels"):
        shell.run_line_magic("prune", "clf 0.5 --finetune only_labels")
