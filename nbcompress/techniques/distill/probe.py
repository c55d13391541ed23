"""Running models on a batch of the transfer data, without side effects: eval mode with every
submodule's own flag given back, forward hooks that record layer outputs and are always removed,
the loader's first batch without touching its shuffling order."""
from __future__ import annotations

import contextlib
import difflib
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...batches import forward_batch, head, logits_of, to_device
from ...batches import peek_batch as peek
from ...core import BadInput, FieldError, model_device

__all__ = ["eval_mode", "capture", "probe", "peek_batch", "check_layer", "head", "shape_text"]


def shape_text(t: torch.Tensor) -> str:
    return "(N, " + ", ".join(str(s) for s in t.shape[1:]) + ")"



def first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def peek_batch(loader: DataLoader, what: str = "the transfer data ({loader})") -> Any:
    """The loader's first batch, its shuffling order left alone (:func:`nbcompress.batches.peek_batch`);
    ``what`` names fields as a :class:`FieldError` template."""
    return peek(loader, what)


def check_layer(name: str, modules: dict, who: str) -> None:
    if name in modules and name != "":
        return
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = (f"did you mean {', '.join(close)}?" if close else
            f"its layers: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}")
    raise FieldError(f"{{features}}: the {who} has no layer named {name!r}; {hint}")


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Eval mode for the duration, then every submodule's own train/eval flag restored."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


@contextlib.contextmanager
def capture(modules: dict, names: list[str]):
    """Record the output of the named submodules on each forward: ``store[name]``."""
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(mod, inp, out):
            t = first_tensor(out)
            if t is None:
                raise FieldError(f"{{features}}: layer {name!r} returned a {type(out).__name__}, "
                                 f"not a tensor")
            store[name] = t
        return fn

    try:
        for n in dict.fromkeys(names):
            handles.append(modules[n].register_forward_hook(hook(n)))
        yield store
    finally:
        for h in handles:
            h.remove()


def probe(model: nn.Module, x: Any, layer_names: list[str], who: str):
    """Run ``model`` once on ``x`` (on the model's device, eval mode, no grad): (scores, [features])."""
    dev = model_device(model)
    mods = dict(model.named_modules())
    try:
        with eval_mode(model), torch.no_grad(), capture(mods, layer_names) as store:
            xin = to_device(x, dev)
            out = logits_of(model(**xin) if isinstance(xin, dict) else model(xin))
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to run is a one-line user error here
        msg = str(e).splitlines()[0] if str(e) else ""
        raise FieldError(f"the {who} could not run on a batch of {{loader}}: "
                         f"{type(e).__name__}: {msg}") from None
    return out, [store[n] for n in layer_names]


def teacher_signal(teachers: list[nn.Module], x: Any, T: float, dim: int = 1) -> torch.Tensor:
    """One teacher: its logits. Several: the mean of their ``softmax(logits / T)`` over ``dim``
    (the class dim; a language model's vocabulary is its last)."""
    import torch.nn.functional as F

    with torch.no_grad():
        outs = [logits_of(forward_batch(t, x)).float() for t in teachers]
        if len(outs) == 1:
            return outs[0]
        return torch.stack([F.softmax(o / T, dim=dim) for o in outs]).mean(0)
