"""The terminal demo's ``%lowrank`` step (``python -m nbcompress demo``)."""
from __future__ import annotations

from .config import LowRankConfig


def demo_config(train_loader, test_loader) -> tuple[str, LowRankConfig]:
    """The terminal demo's step: LeNet-300-100 to 3x fewer parameters by SVD, ranks allocated
    across layers by singular values, then one epoch of fine-tuning."""
    return ("%lowrank model --target-params 3x --finetune train_loader --epochs 1",
            LowRankConfig(target_params="3x", finetune=train_loader, epochs=1, lr=3e-4,
                          progress=False))
