"""The terminal demo's early-exit step, and the early-exit benchmark's CNN."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import EarlyExitConfig

__all__ = ["demo_config", "sequential_cnn"]


def sequential_cnn(width: int = 16, num_classes: int = 10, in_channels: int = 1, *,
                   seed: int | None = None) -> nn.Sequential:
    """The early-exit benchmark CNN as an ``nn.Sequential`` (indices are its block names)::

        0 conv(w)  1 conv(w)  2 maxpool  3 conv(2w)  4 conv(2w)  5 maxpool
        6 conv(4w) 7 conv(4w) 8 global-avg-pool  9 flatten  10 linear

    each conv a ``Sequential(Conv2d 3x3, BatchNorm2d, ReLU)``; 28x28 input.
    """
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())

    w = int(width)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        return nn.Sequential(block(in_channels, w), block(w, w), nn.MaxPool2d(2),
                             block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
                             block(2 * w, 4 * w), block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4 * w, num_classes))


def demo_config(train_loader: DataLoader, test_loader: DataLoader) -> tuple[str, EarlyExitConfig]:
    """The terminal demo's step: one exit after LeNet-300-100's first hidden layer (fc1 + ReLU),
    a linear head distilled from the final output for 2 epochs."""
    return ("%earlyexit model --data train_loader --exits relu1 --threshold 0.9 --epochs 2",
            EarlyExitConfig(data=train_loader, exits=("relu1",), threshold=0.9, epochs=2))
