"""The pruning step of the terminal demo (``python -m nbcompress demo``)."""
from __future__ import annotations

from .config import PruneConfig

__all__ = ["demo_config"]


def demo_config(train_loader, test_loader) -> tuple[str, PruneConfig]:
    """The step the terminal demo runs on the trained LeNet-300-100: 90% of the weights by global
    magnitude, one epoch of fine-tuning with the zeros kept."""
    return ("prune 90% of the weights (global magnitude) + 1 epoch fine-tune",
            PruneConfig(amount=0.9, finetune=train_loader, epochs=1, lr=5e-4))
