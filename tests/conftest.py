"""Shared fixtures: a real IPython shell with the extension loaded, the embedded data, and a
LeNet-300-100 trained once per test session (a few seconds on CPU)."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ip():
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "nbcompress")
    yield shell


@pytest.fixture
def shell(ip, monkeypatch):
    """The session shell with a clean workspace and user namespace entries removed after."""
    monkeypatch.delenv("NBCOMPRESS_STRICT", raising=False)
    before = set(ip.user_ns)
    ws = getattr(ip, "_nbcompress_workspace", None)
    if ws is not None:
        ws.clear()
    yield ip
    for k in set(ip.user_ns) - before:
        ip.user_ns.pop(k, None)
    if getattr(ip, "_nbcompress_workspace", None) is not None:
        ip._nbcompress_workspace.clear()


@pytest.fixture(scope="session")
def mnist():
    from nbcompress.data import mnist_loaders

    return mnist_loaders()


@pytest.fixture(scope="session")
def _trained_lenet(mnist):
    from nbcompress.data import lenet_300_100, train_reference

    model = lenet_300_100(seed=0)
    init = copy.deepcopy(model.state_dict())
    train_reference(model, mnist[0], epochs=int(os.environ.get("NBC_TEST_EPOCHS", 8)), seed=0)
    return model, init


@pytest.fixture
def trained_lenet(_trained_lenet):
    """A fresh copy of the trained LeNet-300-100 (tests may change it freely)."""
    return copy.deepcopy(_trained_lenet[0])


@pytest.fixture
def lenet_init(_trained_lenet):
    return copy.deepcopy(_trained_lenet[1])


def digits_cnn(seed: int = 0) -> nn.Module:
    """A model as a user writes it (not one of ours): conv + BatchNorm, for 1x8x8 digits."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_as_snapshot(model, snap) -> bool:
    s = model.state_dict()
    return s.keys() == snap.keys() and all(torch.equal(s[k], snap[k]) for k in s)


class Unlabelled(torch.utils.data.Dataset):
    """Yields bare tensors: the loader's batches are tensors, not (x, y) tuples."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]
