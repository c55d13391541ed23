"""The Python verbs: :func:`prune` (a pruned copy) and :func:`sensitivity` (the scan's table)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ...core import BadInput, StepContext, compress, model_device, resolve_device
from .config import DEFAULT_AMOUNTS, PruneConfig

__all__ = ["prune", "sensitivity"]


def _context(model, config, *, evaluator=None, example_input=None, device=None, init_state=None,
             progress=None):
    if progress is not None:
        config.progress = bool(progress)
    return StepContext(device=resolve_device(device if device is not None else config.device),
                       origin_device=model_device(model), evaluator=evaluator,
                       example_input=example_input, progress=config.progress,
                       init_state=init_state)


def prune(model: nn.Module, amount: float | None = None, *, evaluator: Any = None,
          example_input: Any = None, device: str | None = None, init_state: dict | None = None,
          progress: bool = False, **options) -> nn.Module:
    """Return a pruned copy of ``model`` (the model itself is not changed).

    ``nbcompress.prune(model, 0.9)`` zeroes the 90% smallest weights (global magnitude);
    ``prune(model, 0.5, structured=True, finetune=train_loader, epochs=2)`` removes half the
    channels and fine-tunes. ``options`` are the fields of :class:`PruneConfig`; ``evaluator``
    (a DataLoader or callable) is needed by ``lottery``; ``init_state`` (a state dict of the
    initial weights) too.
    """
    if not isinstance(model, nn.Module):
        raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
    PruneConfig.check_options(options, "prune", exclude={"amount"})
    config = PruneConfig(amount=amount, **options)
    ctx = _context(model, config, evaluator=evaluator, example_input=example_input, device=device,
                   init_state=init_state, progress=progress)
    return compress(model, config, ctx=ctx).model


def sensitivity(model: nn.Module, evaluator: Any, *, amounts=DEFAULT_AMOUNTS,
                structured: bool = False, example_input: Any = None, device: str | None = None,
                progress: bool = False, **options):
    """Prune each layer alone at each of ``amounts``, evaluate; return the table (a DataFrame:
    layer, type, amount, accuracy, drop_points). The model is not changed. The figure is in
    ``table.attrs["figure"]`` (PNG bytes)."""
    PruneConfig.check_options(options, "sensitivity",
                              exclude={"sensitivity", "amounts", "structured"})
    try:
        amounts = tuple(amounts)
    except TypeError:
        raise BadInput(f"amounts must be a list of fractions between 0 and 1, got "
                       f"{amounts!r}") from None
    config = PruneConfig(sensitivity=True, structured=structured, amounts=amounts, **options)
    ctx = _context(model, config, evaluator=evaluator, example_input=example_input, device=device,
                   progress=progress)
    res = compress(model, config, ctx=ctx)
    df = res.tables["sensitivity"]
    df.attrs["figure"] = res.figures.get("sensitivity")
    df.attrs["baseline_accuracy"] = res.extra.get("baseline_accuracy")
    return df
