"""A small student to distil into: :class:`MLPStudent`."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLPStudent", "mlp_student"]


class MLPStudent(nn.Module):
    """A small fully connected network: ``in_features -> hidden... -> num_classes``, ReLU between,
    optional dropout. Layers are ``fc1 .. fcK`` (the last one gives the class scores), so
    ``MLPStudent(784, (32, 16))`` is the 784-32-16-10 student (25,818 parameters, about 10x
    smaller than LeNet-300-100). Accepts ``(N, 1, 28, 28)`` or ``(N, 784)``."""

    def __init__(self, in_features: int = 784, hidden: tuple = (32, 16), num_classes: int = 10,
                 dropout: float = 0.0, *, seed: int | None = None):
        super().__init__()
        self.in_features = int(in_features)
        self.hidden = tuple(int(h) for h in hidden)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        sizes = (self.in_features,) + self.hidden + (self.num_classes,)
        self.n_layers = len(sizes) - 1
        with seeded(seed):
            for i in range(self.n_layers):
                setattr(self, f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.n_layers):
            x = F.relu(getattr(self, f"fc{i}")(x))
            if self.dropout:
                x = F.dropout(x, self.dropout, self.training)
        return getattr(self, f"fc{self.n_layers}")(x)


def mlp_student(hidden: tuple = (32, 16), in_features: int = 784, num_classes: int = 10,
                dropout: float = 0.0, seed: int | None = None) -> MLPStudent:
    """A fresh :class:`MLPStudent` (default 784-32-16-10)."""
    return MLPStudent(in_features, hidden, num_classes, dropout, seed=seed)


@contextlib.contextmanager
def seeded(seed):
    """torch's global RNG seeded with ``seed`` inside (``None``: left alone), restored after."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield
