"""The distillation step of the terminal demo (``python -m nbcompress demo``)."""
from __future__ import annotations

from torch.utils.data import DataLoader

from .config import DistillConfig

__all__ = ["demo_config"]


def demo_config(train_loader: DataLoader, test_loader: DataLoader):
    """The terminal demo's step: distil the model (whatever the earlier steps made of it) from its
    own first version, the trained uncompressed LeNet, for 2 epochs; pruned zeros stay zero.
    A fine-tune of a trained model, hence the small learning rate (Adam at 1e-3 first knocks a
    trained network about). It needs trainable float weights, so it belongs before any integer
    quantization step."""
    return ("distill from the uncompressed original (version 0), 2 epochs, T=4, alpha=0.9",
            DistillConfig(teacher_version=0, loader=train_loader, epochs=2, T=4.0, alpha=0.9,
                          lr=3e-4))
