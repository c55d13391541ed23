"""Latency modes: eager (default), channels_last, deployed (traced + optimize_for_inference).

No speed claims here (benchmarks time things): these check which mode was used, that a model that
cannot be deployed faithfully falls back to eager and says why, that the caller's model is never
changed, and the magic / History plumbing with its bad input."""
from __future__ import annotations


import pytest
import torch
from IPython.core.error import UsageError
from torch import nn

import nbcompress
from nbcompress import BadInput, History, measure
from nbcompress.data import lenet_300_100, reference_cnn
from nbcompress.metrics import LATENCY_MODES, latency_model
from conftest import same_as_snapshot, snapshot


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m = reference_cnn(width=8, seed=0).eval()
    with torch.no_grad():      # BatchNorm statistics that are not the identity
        for bn in (m.bn1, m.down_bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m


def test_modes_used_and_the_model_is_not_changed(cnn):
    x = torch.randn(4, 1, 28, 28)
    snap = snapshot(cnn)
    ref = cnn(x)
    used = {}
    for mode in LATENCY_MODES:
        m = measure(cnn, x, latency_mode=mode)
        used[mode] = m.latency_mode
        assert m.latency_ms is not None and m.latency_ms > 0
        assert m.flops == measure(cnn, x, latency=False).flops     # FLOPs do not depend on it
    assert used == {"eager": "eager", "channels_last": "channels_last", "deployed": "deployed",
                    "onnxruntime": "onnxruntime"}
    assert same_as_snapshot(cnn, snap)
    assert all(p.is_contiguous() for p in cnn.parameters())         # still NCHW
    assert isinstance(cnn.bn1, nn.BatchNorm2d)
    assert torch.equal(cnn(x), ref)


def test_deployed_runs_the_same_function(cnn):
    x = torch.randn(3, 1, 28, 28)
    timed, tx, mode = latency_model(cnn, x, "deployed")
    assert mode == "deployed" and isinstance(timed, torch.jit.ScriptModule)
    with torch.no_grad():
        assert torch.allclose(timed(tx), cnn(x), rtol=1e-3, atol=1e-4)
    timed, tx, mode = latency_model(cnn, x, "channels_last")
    assert tx.is_contiguous(memory_format=torch.channels_last)
    assert timed.conv1.weight.is_contiguous(memory_format=torch.channels_last)


class Branchy(nn.Module):
    """Data-dependent control flow: a trace would bake in one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_control_flow_and_untraceable_models_fall_back_to_eager(trained_lenet, mnist):
    m = measure(Branchy(), torch.randn(2, 8), latency_mode="deployed")
    assert m.latency_mode == "eager (deployed: data-dependent control flow)"
    assert m.latency_ms is not None
    ee = nbcompress.early_exit(trained_lenet, mnist[0], exits="relu1", epochs=1, progress=False)
    m = measure(ee, torch.randn(8, 1, 28, 28), latency_mode="deployed")
    assert m.latency_mode.startswith("eager (deployed:")


def test_bad_mode_is_bad_input(cnn):
    with pytest.raises(BadInput, match="--latency must be one of eager, channels_last, deployed"):
        measure(cnn, torch.randn(1, 1, 28, 28), latency_mode="fast")
    with pytest.raises(BadInput, match="--latency must be one of"):
        History(cnn, latency_mode="compiled")


def test_history_remeasures_when_the_mode_changes(mnist):
    model = lenet_300_100(seed=0)
    h = History(model, evaluator=mnist[1])
    m0 = h.metrics_of(h.current_version)
    assert m0.latency_mode == "eager"
    h.configure(latency_mode="eager")
    assert h.current_version.metrics is m0                 # same mode: kept
    h.configure(latency_mode="deployed")
    m1 = h.metrics_of(h.current_version)
    assert m1 is not m0 and m1.latency_mode == "deployed"
    assert m1.accuracy == m0.accuracy and m1.packed_bytes == m0.packed_bytes


def test_magic_latency_option_shows_in_the_dashboard(shell, mnist):
    # (not a local named `model`: run_line_magic looks names up in the caller's locals first)
    net = reference_cnn(width=8, seed=0).eval()
    shell.user_ns.update(model=net, test_loader=mnist[1])
    snap = snapshot(net)
    with pytest.raises(UsageError, match="--latency must be one of"):
        shell.run_line_magic("nbcompress", "model --latency turbo")
    assert shell.user_ns["model"] is net and same_as_snapshot(net, snap)
    report = shell.run_line_magic("nbcompress", "model --latency deployed --input-shape 16,1,28,28")
    assert report.after.latency_mode == "deployed" and report.after.batch_size == 16
    step = shell.run_line_magic("lowrank", "model --conv separable --layers layer")
    assert step.before.latency_mode == step.after.latency_mode == "deployed"
    html = step.metrics_html()
    assert "batch 16, deployed" in html
    assert "deployed" not in repr(step)          # the text form stays free of timing details
    shell.run_line_magic("undo", "model")
    assert shell.user_ns["model"] is not net and same_as_snapshot(shell.user_ns["model"], snap)


def test_latency_of_different_modes_is_not_compared(mnist, trained_lenet):
    """Deployed before, eager after (the early-exit model cannot be traced): the dashboard must
    not call that a slow-down or a speed-up of the step."""
    from nbcompress.report.tables import metrics_table

    h = History(trained_lenet, evaluator=mnist[1], latency_mode="deployed")
    report = h.apply(nbcompress.EarlyExitConfig(data=mnist[0], exits=("relu1",), epochs=1),
                     progress=False)
    assert report.before.latency_mode == "deployed"
    assert report.after.latency_mode.startswith("eager (deployed:")
    table = metrics_table(report.before, report.after)
    assert table.loc["latency ms", "ratio"] == "not comparable (deployed vs eager)"
    assert metrics_table(report.before, report.before).loc["latency ms", "ratio"] == "same"
