"""One measurement for every before and after: size, FLOPs, latency, accuracy.

Honest numbers: ``dense_bytes`` is what the tensors occupy now (a masked-but-dense tensor is not
smaller), ``packed_bytes`` is the length of what :func:`nbcompress.save` writes, ``flops`` come
from ``torch.utils.flop_counter`` on a real forward pass of the example input, and
``sparse_flops`` is the same count with each layer's share scaled by its weight density (labelled
as such: dense hardware does not skip zeros). A model whose work depends on its input (early exits)
reports the FLOPs it actually spent on the evaluator's data through ``nbc_flops`` (see
:func:`dynamic_flops`). Accuracy comes only from the user's evaluator.
"""
from __future__ import annotations

import inspect
import numbers
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .batches import example_of
from .core import BadInput, EvaluatorError, ExampleInputError, model_device
from .fingerprint import MEMO
from .counting import (_stored_tensors, _units, count_flops, count_params, dense_bytes,
                       dynamic_flops, module_counts, packed_bytes, weight_density)
from .latency import LATENCY_MODES, check_latency_mode, latency_model, measure_latency

# measuring's one front door: the counting and timing pieces are importable from here too
__all__ = ["Metrics", "measure", "run_evaluator", "check_evaluator", "example_from", "is_loader",
           "parse_input_shape", "evaluator_label", "ACCURACY_KEYS", "PERPLEXITY_KEYS", "count_params", "count_flops",
           "dense_bytes", "packed_bytes", "dynamic_flops", "module_counts", "weight_density",
           "LATENCY_MODES", "check_latency_mode", "latency_model", "measure_latency"]


@dataclass(repr=False)
class Metrics:
    params: int
    nonzero_params: int
    dense_bytes: int
    packed_bytes: int
    flops: int | None = None            # per forward pass of the example input
    sparse_flops: int | None = None     # the same, zero weights skipped (not a dense-hardware speed)
    latency_ms: float | None = None     # median of timed forwards after warm-up, on `device`
    accuracy: float | None = None       # from the evaluator only (a language model: per token)
    dense_bytes_by_dtype: dict = field(default_factory=dict)
    eval_extra: dict = field(default_factory=dict)   # the rest of an evaluator's dict
    layers: list = field(default_factory=list)       # per-layer: name, type, params, nonzero, sparsity, flops, dtype
    device: str = "cpu"
    batch_size: int | None = None       # of the example input used for FLOPs and latency
    latency_mode: str = "eager"         # how the timed model ran (see LATENCY_MODES); a mode that
    #                                     could not be used reads "eager (deployed: <why>)"
    perplexity: float | None = None     # a language model's, from the evaluator (lower is better)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def __repr__(self) -> str:
        """A few lines with the numbers that matter (``dataclasses.asdict`` has them all; the
        per-layer rows are in ``.layers``)."""
        from .report.format import (format_accuracy, format_bytes, format_count, format_flops,
                                    format_ms, format_number)

        head = f"Metrics on {self.device}" + (f", batch {self.batch_size}" if self.batch_size else "")
        lines = [head + ":",
                 f"  params    {format_count(self.params)} ({format_count(self.nonzero_params)} "
                 f"nonzero: {100 * self.sparsity:.2f}% sparse)"]
        by = ", ".join(f"{k} {format_bytes(v)}" for k, v in
                       sorted(self.dense_bytes_by_dtype.items(), key=lambda kv: -kv[1]))
        lines.append(f"  dense     {format_bytes(self.dense_bytes)} in memory"
                     + (f" ({by})" if len(self.dense_bytes_by_dtype) > 1 else ""))
        lines.append(f"  packed    {format_bytes(self.packed_bytes)} (what nbcompress.save writes)"
                     if self.packed_bytes else "  packed    not measured")
        if self.flops is None:
            lines.append("  FLOPs     not counted (no example input)")
        else:
            lines.append(f"  FLOPs     {format_flops(self.flops)} a forward; "
                         f"{format_flops(self.sparse_flops)} sparse (zero weights skipped)")
        if self.latency_ms is None:
            lines.append("  latency   not measured")
        else:
            lines.append(f"  latency   {format_ms(self.latency_ms)} a forward (median, "
                         f"{self.latency_mode})")
        if self.perplexity is not None:
            lines.append(f"  perplexity {format_number(self.perplexity)}")
        if self.accuracy is None and self.perplexity is None:
            lines.append("  accuracy  not measured (no evaluator)")
        elif self.accuracy is not None:
            lines.append(f"  accuracy  {format_accuracy(self.accuracy)}"
                         + (" (next token)" if self.perplexity is not None else ""))
        if self.eval_extra:
            items = [f"{k} {format_number(v)}" for k, v in self.eval_extra.items()]
            more = len(items) - 4
            lines.append("  eval      " + ", ".join(items[:4])
                         + (f", ... {more} more (see .eval_extra)" if more > 0 else ""))
        n = len(self.layers)
        if n:
            lines.append(f"  layers    {n} with weights (see .layers)")
        return "\n".join(lines)

    def as_row(self) -> dict:
        d = asdict(self)
        for k in ("layers", "eval_extra", "dense_bytes_by_dtype"):
            d.pop(k)
        d.update({f"eval_{k}": v for k, v in self.eval_extra.items()})
        return d


# --------------------------------------------------------------------------------- evaluation

def is_loader(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.DataLoader)


# keys an evaluator's dict may give its accuracy under (Hugging Face's Trainer prefixes "eval_")
ACCURACY_KEYS = ("accuracy", "acc", "top1", "top1_accuracy", "eval_accuracy", "eval_acc")
# ... and a language model's perplexity (lower is better; Metrics.perplexity)
PERPLEXITY_KEYS = ("perplexity", "ppl", "eval_perplexity")


def evaluator_label(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


def check_evaluator(obj: Any, what: str = "--eval") -> None:
    """A DataLoader, or a callable that can be called as ``f(model)``; else :class:`BadInput`
    (:class:`EvaluatorError` for a callable with the wrong signature), before any call."""
    if obj is None or is_loader(obj):
        return
    if not callable(obj):
        raise BadInput(f"{what} must be a DataLoader or a callable f(model) -> float | dict, "
                       f"got {type(obj).__name__}")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):      # some builtins have none: checked when called
        return
    try:
        sig.bind(object())
    except TypeError:
        raise EvaluatorError(f"evaluator {evaluator_label(obj)}{sig} cannot be called as "
                             f"f(model): an evaluator takes the model as its only argument "
                             f"(wrap it: lambda m: {evaluator_label(obj)}(m, ...))") from None


def _number(v: Any) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool):
        return None
    return float(v) if isinstance(v, numbers.Real) else None


def _shown(value: Any) -> str:
    """What an evaluator returned, on one short line (a tensor by its shape, not its values)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        text = "{" + ", ".join(f"{k!r}: {_shown(v) if isinstance(v, torch.Tensor) else repr(v)}"
                               for k, v in value.items()) + "}"
    else:
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def run_evaluator(model: nn.Module, evaluator: Any, device=None) -> tuple[float | None, dict]:
    """(accuracy, other numbers). A DataLoader gives top-1 accuracy, or for a language model
    (``[batch, seq, vocab]`` scores) its next-token accuracy with ``"perplexity"`` among the other
    numbers; a callable returns a number (the accuracy) or a dict of numbers with the accuracy
    under one of :data:`ACCURACY_KEYS` and / or a perplexity under one of
    :data:`PERPLEXITY_KEYS` (given back as ``"perplexity"``).
    Anything else is an :class:`EvaluatorError` naming the evaluator and what it returned; an
    exception raised inside the user's evaluator propagates as it is (their code, their
    traceback)."""
    if evaluator is None:
        return None, {}
    check_evaluator(evaluator)
    if is_loader(evaluator):
        from .train import evaluation

        res = evaluation(model, evaluator, device=device, progress=False)
        if "perplexity" in res:
            return res["token_accuracy"], {"perplexity": res["perplexity"]}
        return res["accuracy"], {}
    out = evaluator(model)
    name = evaluator_label(evaluator)
    shown = _shown(out)
    if isinstance(out, dict):
        values, bad = {}, []
        for k, v in out.items():
            x = _number(v)
            if x is None:
                bad.append(k)
            else:
                values[str(k)] = x
        key = next((k for k in ACCURACY_KEYS if k in values), None)
        ppl = next((k for k in PERPLEXITY_KEYS if k in values), None)
        if bad or (key is None and ppl is None):
            why = (f"its value for {bad[0]!r} is not a number" if bad else
                   f"it has no accuracy key ({', '.join(ACCURACY_KEYS[:3])}, ...) nor "
                   f"'perplexity'")
            raise EvaluatorError(f"evaluator {name} returned {shown}: {why}; an evaluator returns "
                                 f"a number or a dict of numbers with an 'accuracy' (or "
                                 f"'perplexity') key")
        acc = values.pop(key) if key is not None else None
        if ppl is not None:
            values = {"perplexity": values.pop(ppl), **values}
        return acc, values
    acc = _number(out)
    if acc is None:
        raise EvaluatorError(f"evaluator {name} returned {shown} ({type(out).__name__}); an "
                             f"evaluator returns a number (the accuracy) or a dict of numbers with "
                             f"an 'accuracy' key")
    return acc, {}


def example_from(obj: Any) -> torch.Tensor | None:
    """A batch-of-1 example input from a DataLoader's first batch (or None)."""
    if is_loader(obj):
        batch = next(iter(obj), None)
        if batch is None:
            raise EvaluatorError("the evaluation loader yielded no batches: it is empty")
        return example_of(batch)
    return None


def parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        parts = re.split(r"[,x]", str(text).strip().strip("()[]"))
        shape = tuple(int(s) for s in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise BadInput(f"--input-shape must be positive integers separated by commas, like "
                       f"1,1,28,28; got {text!r}")
    return shape


# ------------------------------------------------------------------------------------ measure

def measure(model: nn.Module, example_input: Any = None, evaluator: Any = None, device=None, *,
            latency: bool = True, pack: bool = True, latency_mode: str = "eager") -> Metrics:
    """Measure ``model`` the one way every before and after is measured.

    ``example_input``: a tensor (FLOPs and latency are per forward of it; a batch of 1 gives
    per-sample numbers) or a shape tuple; when None and ``evaluator`` is a DataLoader, the first
    sample of its first batch. ``device``: where to run; default the model's own device (the model
    is moved there and back if different). ``latency_mode``: how the model is timed, one of
    :data:`LATENCY_MODES` (see :func:`latency_model`); the mode actually used is
    ``Metrics.latency_mode``.
    """
    if not isinstance(model, nn.Module):
        raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_evaluator(evaluator)
    check_latency_mode(latency_mode)
    origin = model_device(model)
    dev = torch.device(device) if device is not None else origin
    if isinstance(example_input, (tuple, list)) and all(isinstance(s, int) for s in example_input):
        example_input = torch.randn(*example_input)
    if example_input is None:
        example_input = example_from(evaluator)
    moved = dev != origin
    if moved:
        model.to(dev)
    # one measurement asks several questions of each tensor and changes none of them: each
    # tensor's values are checked once against the per-tensor results kept from earlier
    # measurements (MEMO), so only what changed since is computed again
    with MEMO.trusting():
        return _measure(model, example_input, evaluator, dev, origin, moved, latency, pack,
                        latency_mode)


def _measure(model, example_input, evaluator, dev, origin, moved, latency, pack,
             latency_mode) -> Metrics:
    try:
        params, nonzero = count_params(model)
        dbytes, per_dtype = dense_bytes(model)
        pbytes = packed_bytes(model) if pack else 0
        flops = sparse = lat = None
        used_mode = latency_mode
        per_leaf: dict[str, int] = {}
        flops_details: dict = {}
        batch = None
        x = None
        if example_input is not None:
            from .train import to_device

            x = to_device(example_input, dev)
            batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else None
            try:
                flops, sparse, per_leaf = count_flops(model, x)
            except Exception as e:  # noqa: BLE001 - an op the counter cannot trace: say so, keep going
                raise ExampleInputError(f"could not run the model on the example input "
                               f"(shape {tuple(x.shape) if isinstance(x, torch.Tensor) else '?'}): "
                               f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
            dynamic = dynamic_flops(model, x, evaluator)
            if dynamic is not None:
                dyn, flops_details = dynamic
                if flops:
                    sparse = int(round(sparse * dyn / flops))
                flops = dyn
            if latency:
                timed, tx, used_mode = latency_model(model, x, latency_mode)
                lat = measure_latency(timed, tx, device=dev)
                del timed
        acc, extra = run_evaluator(model, evaluator, device=dev)
        ppl = extra.pop("perplexity", None)
        extra = {**flops_details, **extra}
        layers = _layer_table(model, per_leaf)
    finally:
        if moved:
            model.to(origin)
    return Metrics(params=params, nonzero_params=nonzero, dense_bytes=dbytes, packed_bytes=pbytes,
                   flops=flops, sparse_flops=sparse, latency_ms=lat, accuracy=acc,
                   dense_bytes_by_dtype=per_dtype, eval_extra=extra, layers=layers,
                   device=str(dev), batch_size=batch, latency_mode=used_mode, perplexity=ppl)


def _layer_table(model: nn.Module, per_leaf: dict[str, int]) -> list[dict]:
    rows = []
    for name, m in _units(model):
        tensors = {} if hasattr(m, "nbc_count") else _stored_tensors(m)
        if hasattr(m, "nbc_count"):
            dtype = getattr(m, "nbc_dtype", "packed")
        elif tensors:
            w = tensors.get("weight", next(iter(tensors.values())))
            dtype = str(w.dtype).replace("torch.", "")
        else:
            continue
        p, z = module_counts(m)
        if p == 0:
            continue
        bits = getattr(m, "nbc_bits", None)
        rows.append({"layer": name or "(model)", "type": type(m).__name__, "params": p,
                     "nonzero": z, "sparsity": 1.0 - z / p if p else 0.0,
                     "flops": per_leaf.get(name), "dtype": dtype, "bits": bits})
    return rows
