"""Issue 21, part 2: bits per layer under a byte budget (``%quantize --mode cluster|uniform
--budget-bytes B``), on the embedded digits: the file fits, the bits go where the loss needs
them, and a budget that cannot be met is refused with the model unchanged."""
from __future__ import annotations

import io

import pytest
import torch
from IPython.core.error import UsageError

import nbcompress

from conftest import state_equal


@pytest.fixture(scope="module")
def sparse_lenet(_trained_lenet):
    import copy

    m = copy.deepcopy(_trained_lenet[0])
    return nbcompress.prune(m, 0.95)


def test_budget_is_met_and_spent_where_the_loss_needs_it(shell, sparse_lenet, mnist):
    train, test = mnist
    shell.user_ns.update(net=sparse_lenet, train=train, test=test)
    shell.run_line_magic("nbcompress", "net --eval test")
    five = nbcompress.quantize(sparse_lenet, mode="cluster", bits=5, huffman=True)
    five_bytes = nbcompress.save(five, io.BytesIO())
    budget = int(0.9 * five_bytes)     # (at 95% sparsity most bytes are positions)
    rep = shell.run_line_magic("quantize", f"net --mode cluster --huffman --budget-bytes {budget} "
                                           f"--qat train --epochs 1 --no-progress")
    net = shell.user_ns["net"]
    written = nbcompress.save(net, io.BytesIO())
    assert written <= budget and rep.after.packed_bytes == written
    bits = rep.result.extra["bits_per_layer"]
    assert set(bits) == {"fc1", "fc2", "fc3"} and all(2 <= b <= 8 for b in bits.values())
    assert len(set(bits.values())) > 1                        # not one width for all
    for name, b in bits.items():                              # each layer has at most 2^b values
        w = getattr(net, name).weight.detach()
        assert torch.unique(w[w != 0]).numel() <= 2 ** b
        assert getattr(net, name).nbc_bits == b
    assert any(n.startswith("bits per layer for a") and "loss rise on 4 batch(es)" in n
               for n in rep.notes)
    assert any(f"within the {budget:,}-byte budget" in n for n in rep.notes)
    assert rep.after.accuracy > rep.before.accuracy - 0.02
    shell.run_line_magic("undo", "net")
    assert state_equal(shell.user_ns["net"], sparse_lenet)


def test_uniform_budget_without_data_uses_the_weight_error(sparse_lenet):
    h = nbcompress.History(sparse_lenet, example_input=torch.zeros(1, 1, 28, 28),
                           measure_latency=False)
    four = nbcompress.save(nbcompress.quantize(sparse_lenet, mode="uniform", bits=4),
                           io.BytesIO())
    rep = h.apply(nbcompress.QuantizeConfig(mode="uniform", budget_bytes=four), progress=False)
    assert rep.result.extra["file_bytes"] <= four
    assert any("relative weight error (no data" in n for n in rep.notes)


@pytest.mark.parametrize("line, message", [
    ("net --budget-bytes 4000", r"^--budget-bytes chooses bits per layer for --mode cluster or "
                                r"--mode uniform: give one of them$"),
    ("net --mode cluster --budget-bytes 100", r"^--budget-bytes 100 cannot be met: with 2 bits in "
                                              r"every layer the file would be about [\d,]+ bytes"),
    ("net --mode cluster --budget-bytes 0", r"^--budget-bytes must be"),
])
def test_budget_bad_input(shell, sparse_lenet, line, message):
    import copy

    net = copy.deepcopy(sparse_lenet)
    shell.user_ns.update(net=net)
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic("quantize", line)
    assert shell.user_ns["net"] is net and state_equal(net, sparse_lenet)
