"""Batches as every technique reads them: moving to a device, splitting (x, y), the model's
class scores, one forward in eval mode, peeking a loader without changing its order, checking a
loader runs through a model, and finding the classifier (the layers producing the output)."""
from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .core import BadInput, FieldError, model_device

# ------------------------------------------------------------------------------------ batches

def to_device(obj: Any, device: str | torch.device) -> Any:
    """Move a tensor, or tuples / lists / dicts of them (nested), to ``device``.

    Copies from pinned memory to CUDA are non-blocking. Anything that is not a tensor or a
    container of them is returned unchanged."""
    device = torch.device(device)
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        non_blocking = device.type == "cuda" and obj.device.type == "cpu" and obj.is_pinned()
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):           # dict, a ModelOutput, transformers' BatchEncoding
        moved = {k: to_device(v, device) for k, v in obj.items()}
        if type(obj) is dict:
            return moved
        try:
            return type(obj)(moved)
        except TypeError:       # e.g. defaultdict: a plain dict of the same items
            return moved
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):          # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# where a dict batch keeps its targets (Hugging Face collators use "labels")
LABEL_KEYS = ("labels", "label")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets or None)`` of one batch: ``(x, y)``, ``[x, y]``, ``(x,)``, a bare
    tensor ``x`` (unlabelled transfer data), or a dict / ``BatchEncoding`` (what Hugging Face
    datasets and collators yield): its ``labels`` (or ``label``) are the targets, the other
    entries the inputs, passed to the model as keyword arguments (:func:`forward_batch`).
    Extra items after ``y`` are ignored."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        x = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        if not x:
            raise BadInput(f"a dict batch needs model inputs besides its labels; the loader "
                           f"yielded the keys {sorted(batch)}")
        return x, (batch[key] if key is not None else None)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise BadInput("the loader yielded an empty batch")
        if len(batch) == 1:
            return batch[0], None
        return batch[0], batch[1]
    raise BadInput(f"a batch must be a tensor x, a tuple/list (x, y) or a dict of model inputs "
                   f"(with 'labels'); the loader yielded a {type(batch).__name__}")


def head(x: Any, n: int) -> Any:
    """The first ``n`` examples of a batch of inputs: a tensor's first rows, and so for each
    tensor of a dict / tuple / list of inputs; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x[:n] if x.dim() > 0 and x.shape[0] > n else x
    if isinstance(x, Mapping):
        items = {k: head(v, n) for k, v in x.items()}
        try:
            return items if type(x) is dict else type(x)(items)
        except TypeError:
            return items
    if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
        return type(x)(head(v, n) for v in x)
    return x


def batch_size(x: Any) -> int | None:
    """How many examples a batch of inputs holds: a tensor's first dim (1 for a 0-d tensor),
    else that of the first tensor of a dict / tuple / list; None when it holds no tensor."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    items = list(x.values()) if isinstance(x, Mapping) else \
        list(x) if isinstance(x, (tuple, list)) else []
    return next((n for n in map(batch_size, items) if n is not None), None)


def example_of(batch: Any) -> Any:
    """A batch-of-1 example input from a loader's batch (a copy), or None when its inputs are
    not tensors."""
    x, _ = split_batch(batch)
    one = head(x, 1)
    if isinstance(one, torch.Tensor):
        return one.clone()
    if isinstance(one, Mapping) and all(isinstance(v, torch.Tensor) for v in one.values()):
        return {k: v.clone() for k, v in one.items()}
    return None


def logits_of(out: Any) -> torch.Tensor:
    """The class scores of a model's output: the tensor itself, the first item of a tuple/list,
    or a dict's 'logits'."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    raise BadInput(f"the model's output is a {type(out).__name__}, not a tensor of class scores")



def _check_loader(loader: Any, what: str = "loader") -> None:
    if not isinstance(loader, DataLoader):
        raise BadInput(f"{what} must be a torch.utils.data.DataLoader, got {type(loader).__name__}")


def _loader_len(loader: DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:       # an IterableDataset without __len__
        return None


def forward_batch(model: nn.Module, x: Any) -> Any:
    """Run ``model`` on the inputs of a batch or an example input, the one way every part of
    nbcompress does: a dict is keyword arguments, a tuple/list positional arguments, anything
    else the single argument."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)




@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` inside, its train/eval mode as it was after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for one-line user errors."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text.strip() else type(e).__name__


def peek_batch(loader: DataLoader, what: str = "the loader") -> Any:
    """The loader's first batch, leaving its shuffling state as it was (the sampler's generator
    and the global RNG are restored), so a peek does not change the data order of training.

    ``what`` (here and in :func:`check_loader_runs`) names the loader in the message: a field
    placeholder such as ``"{finetune}"`` reads ``finetune`` from Python and ``--finetune`` from
    the magic (the error is a :class:`~nbcompress.errors.FieldError`)."""
    gens = []
    for obj in (loader, loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    states = [g.get_state() for g in gens]
    try:
        with torch.random.fork_rng(devices=[]):
            it = iter(loader)
            try:
                return next(it)
            except StopIteration:
                raise FieldError(f"{what} yielded no batches") from None
            finally:
                del it
    finally:
        for g, st in zip(gens, states):
            g.set_state(st)


def check_loader_runs(model: nn.Module, loader: Any, flag: str, device: Any = None, *,
                      labels: bool = True) -> None:
    """One batch of ``loader`` must run through ``model`` (eval mode, no grad; the loader's
    shuffling order and the global RNG are left as they were) and, with ``labels``, its integer
    labels must be classes of the model's output: a loader of the wrong data is one clear line
    before any work, not a traceback from deep inside training or calibration. Not a DataLoader:
    nothing to check here (each option's own validation says what it needs)."""
    if not isinstance(loader, DataLoader):
        return
    x, y = split_batch(peek_batch(loader, flag))
    try:
        with torch.no_grad(), eval_mode(model):
            out = forward_batch(model, to_device(x, device if device is not None
                                                 else model_device(model)))
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to run is a one-line user error here
        raise run_error(model, x, e, flag) from None
    if not labels or not isinstance(y, torch.Tensor) or y.numel() == 0:
        return
    try:
        scores = logits_of(out)
    except BadInput:        # an output we cannot read as class scores: nothing to check
        return
    from .tokens import check_targets, is_token_task

    check_targets(scores, x, to_device(y, scores.device), f"the labels of {flag}")
    if scores.dim() < 2 or y.is_floating_point() or is_token_task(scores, x, y):
        return
    classes = scores.shape[1]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        bad = hi if hi >= classes else lo
        raise FieldError(f"{flag} has label {bad}, but the model scores {classes} classes "
                       f"(labels 0..{classes - 1}); is it the data this model takes?")


def _inputs_text(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"inputs of shape {tuple(x.shape)}"
    if isinstance(x, Mapping):
        return f"a dict of {sorted(x)}"
    return f"a {type(x).__name__}"


def _forward_mismatch(model: nn.Module, x: Any, e: BaseException) -> str | None:
    """Why the inputs cannot be the model's forward arguments, read from its signature (and, for
    a bare tensor, the error naming another of its inputs), or None."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    ps = sig.parameters.values()
    named = [p.name for p in ps if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p.name for p in ps if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    any_kw = any(p.kind == p.VAR_KEYWORD for p in ps)
    shown = ", ".join(named[:4]) + (", ..." if len(named) > 4 else "")
    if isinstance(x, Mapping):
        missing = [n for n in required if n not in x]
        if missing:
            return (f"the model's forward needs {', '.join(missing)}, which the loader's dicts "
                    f"do not hold")
        unknown = [k for k in x if k not in sig.parameters]
        if unknown and (not any_kw or len(unknown) == len(x)):
            return (f"the model's forward takes {shown}, not {', '.join(map(str, unknown))}: "
                    f"name the dict's keys as its arguments")
        return None
    takes_one = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                 or p.kind == p.VAR_POSITIONAL]
    first = takes_one[0].name if takes_one else None
    others = [n for n in required if n != first]
    text = str(e)
    if not takes_one or others or any(n != first and re.search(rf"\b{re.escape(n)}\b", text)
                                      for n in named):
        return (f"the model's forward takes keyword inputs ({shown}): give dict batches such "
                f"as {{'{named[0] if named else 'input_ids'}': ...}}")
    return None


def run_error(model: nn.Module, x: Any, e: BaseException, what: str) -> BadInput:
    """The one-line error for a model that failed to run on a batch of ``what`` (a field
    template makes it a :class:`FieldError`): what the batch held, why its signature does not
    fit when that can be read, else the exception's first line."""
    hint = _forward_mismatch(model, x, e)
    text = (f"the model cannot run on a batch of {what} ({_inputs_text(x)}): "
            + (f"{hint} ({first_line(e)})" if hint else
               f"{first_line(e)}; is it the data this model takes?"))
    return FieldError(text) if "{" in what else BadInput(text)


def output_layers(model: nn.Module, layers: list[tuple[str, nn.Module]],
                  example: Any = None) -> set[str]:
    """Names (from ``layers``, ``(name, module)`` pairs) of the layers whose output is the model's
    output: the classifier.

    The one rule prune and lowrank use to find the classifier: run ``example`` (eval mode, no
    gradients) and take the layers whose output tensor the model returns (alone, in a tuple or
    list, or as a value of a dict / ``ModelOutput``); when there is no example, it does not run,
    or no layer's output is returned as it is, the last of ``layers``. The outputs are held until
    the end of the forward, so a freed tensor's ``id`` reused by the result cannot be mistaken
    for it."""
    if not layers:
        return set()
    if example is not None:
        seen: dict[int, tuple[str, torch.Tensor]] = {}
        handles = []
        for name, m in layers:
            def hook(mod, inp, out, _n=name):
                if isinstance(out, torch.Tensor):
                    seen.setdefault(id(out), (_n, out))       # holding ``out`` keeps its id unique
            handles.append(m.register_forward_hook(hook))
        try:
            with torch.no_grad(), eval_mode(model):
                y = forward_batch(model, example)
        except Exception:  # noqa: BLE001 - the example does not run: fall back to the order
            y = None
        finally:
            for h in handles:
                h.remove()
        ys = [y] if isinstance(y, torch.Tensor) else list(y) if isinstance(y, (tuple, list)) \
            else list(y.values()) if isinstance(y, dict) else []
        found = {seen[id(t)][0] for t in ys
                 if isinstance(t, torch.Tensor) and id(t) in seen and seen[id(t)][1] is t}
        seen.clear()
        if found:
            return found
    return {layers[-1][0]}
