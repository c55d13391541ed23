"""Issue 21, part 1: learned sparsity (sparse variational dropout) as a pruning method,
``%prune NAME --learned --finetune LOADER``, on the embedded MNIST digits, a user's conv net and a
Hugging Face BERT fed dict batches."""
from __future__ import annotations

import math

import pytest
import torch
from IPython.core.error import UsageError
from torch import nn
from torch.utils.data import DataLoader

import nbcompress
from nbcompress.techniques.prune import learned
from nbcompress.train import evaluate

from conftest import digits_cnn, state_equal


def _zeros(m: nn.Module) -> float:
    ws = [x.weight for x in m.modules() if isinstance(x, (nn.Linear, nn.Conv2d))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def test_kl_matches_the_paper_approximation():
    """Molchanov et al. eq. 14 at three log alphas, and the limits: 0 for pure noise, growing
    as alpha falls (a weight that matters pays for it)."""
    class One(nn.Module):
        def __init__(self, la):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))
            self.nbc_log_sigma2 = nn.Parameter(torch.tensor([la]))

    for la in (-4.0, 0.0, 2.5):
        expected = (0.63576 - 0.63576 / (1 + math.exp(-(1.87320 + 1.48695 * la)))
                    + 0.5 * math.log1p(math.exp(-la)))
        with torch.no_grad():
            assert float(learned._kl([One(la)])) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        assert float(learned._kl([One(10.0)])) < 1e-3
        assert float(learned._kl([One(-8.0)])) > float(learned._kl([One(0.0)])) > 0


def test_learned_magic_on_lenet(shell, trained_lenet, mnist):
    train, test = mnist
    shell.user_ns.update(net=trained_lenet, train=train, test=test)
    shell.run_line_magic("nbcompress", "net --eval test")
    acc0 = evaluate(trained_lenet, test)
    rep = shell.run_line_magic("prune", "net --learned --finetune train --learn-epochs 4 "
                                        "--kl-weight 0.5 --epochs 1 --no-progress")
    net = shell.user_ns["net"]
    # the layers are the user's again: no noise parameter, no patched forward
    assert set(net.state_dict()) == set(trained_lenet.state_dict())
    assert all("forward" not in m.__dict__ for m in net.modules())
    assert float((net.fc1.weight == 0).float().mean()) > 0.85
    assert rep.after.sparsity > 0.8
    assert rep.after.accuracy > acc0 - 0.03
    table = rep.result.tables["learning"]
    assert list(table.columns[:2]) == ["epoch", "loss"] and len(table) == 4
    assert table["fc1"].iloc[-1] > table["fc1"].iloc[0]          # sparsity grows as it learns
    assert rep.notes[0].startswith("weights (learned: sparse variational dropout")
    assert any("log alpha >= 3" in n for n in rep.notes)
    shell.run_line_magic("undo", "net")
    assert state_equal(shell.user_ns["net"], trained_lenet)


def test_learned_with_an_amount_and_beside_magnitude(trained_lenet, mnist):
    """An amount drops exactly that fraction, chosen by the learned rates, not by magnitude."""
    train, test = mnist
    out = nbcompress.prune(trained_lenet, 0.9, learned=True, finetune=train, learn_epochs=2,
                           epochs=1, progress=False)
    assert _zeros(out) == pytest.approx(0.9, abs=1e-5)
    mag = nbcompress.prune(trained_lenet, 0.9)
    same = ((out.fc1.weight == 0) == (mag.fc1.weight == 0)).float().mean()
    assert float(same) < 0.99                                   # another set of weights


def test_learned_on_a_conv_net_and_bert_dict_batches(digits):
    tr, te = digits
    torch.manual_seed(0)
    cnn = digits_cnn()
    nbcompress.train.fit(cnn, tr, epochs=3, progress=False, seed=0)
    out = nbcompress.prune(cnn, learned=True, finetune=tr, learn_epochs=3, epochs=1,
                           kl_weight=3.0, progress=False)
    assert _zeros(out) > 0.3 and isinstance(out[0], nn.Conv2d)
    assert evaluate(out, te) > 0.5

    transformers = pytest.importorskip("transformers")
    from test_dict_batches import Tokens

    cfg = transformers.BertConfig(vocab_size=39, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, num_labels=3,
                                  max_position_embeddings=16)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(cfg)
    loader = DataLoader(Tokens(seed=0), batch_size=32, shuffle=True)
    h = nbcompress.History(bert, example_input=next(iter(loader)), measure_latency=False)
    rep = h.apply(nbcompress.PruneConfig(learned=True, finetune=loader, learn_epochs=2,
                                         kl_weight=5.0), progress=False)
    assert rep.after.sparsity > 0.05
    assert set(h.current.state_dict()) == set(bert.state_dict())
    h.undo()
    assert state_equal(h.current, bert)


@pytest.fixture(scope="module")
def digits():
    from nbcompress.data import digits_loaders

    return digits_loaders()


@pytest.mark.parametrize("line, message", [
    ("net --learned", r"^--learned only applies with --finetune: give --finetune too"),
    ("net --learned --finetune train --structured", r"^give --structured or --learned, not both$|"
                                                    r"^give --learned or --structured, not both$"),
    ("net --learned --finetune train --steps 2", r"^--learned learns the sparsity in one training "
                                                 r"run: leave out --steps"),
    ("net --learn-epochs 3", r"^--learn-epochs only applies with --learned"),
    ("net --learned --finetune train --kl-weight 0", r"^--kl-weight must be"),
    ("net --learned --finetune train --importance l2", r"not both$"),
])
def test_learned_bad_input(shell, line, message):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    snap = {k: v.clone() for k, v in net.state_dict().items()}
    shell.user_ns.update(net=net, train=DataLoader(
        list(zip(torch.randn(16, 8), torch.randint(0, 4, (16,)))), batch_size=8))
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic("prune", line)
    assert shell.user_ns["net"] is net
    assert all(torch.equal(net.state_dict()[k], v) for k, v in snap.items())


def test_learned_on_two_processes_brings_the_rates_back(digits):
    """The noise parameters train in the workers and come back with the model (rank 0's), so the
    kernel drops the weights the workers learned to be noise; the per-epoch table stays with
    rank 0 (on_epoch_end runs there) and the report has none."""
    tr, _ = digits
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    nbcompress.train.fit(net, tr, epochs=2, progress=False, seed=0)
    h = nbcompress.History(net, example_input=torch.zeros(1, 1, 8, 8), measure_latency=False)
    rep = h.apply(nbcompress.PruneConfig(learned=True, finetune=tr, learn_epochs=2, epochs=1,
                                         kl_weight=20.0, processes=2), progress=False)
    # had the rates stayed in the workers, the kernel's log sigma^2 would still be -10: log alpha
    # near -4 everywhere, and not one weight dropped
    assert rep.after.sparsity > 0.05
    assert set(h.current.state_dict()) == set(net.state_dict())
    assert "learning" not in rep.result.tables
    assert any("trained on 2 processes" in n for n in rep.notes)
