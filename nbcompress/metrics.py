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

import copy
import inspect
import io
import numbers
import re
import statistics
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .core import BadInput, EvaluatorError, ExampleInputError, model_device
from .train import forward_batch as _forward


@dataclass(repr=False)
class Metrics:
    params: int
    nonzero_params: int
    dense_bytes: int
    packed_bytes: int
    flops: int | None = None            # per forward pass of the example input
    sparse_flops: int | None = None     # the same, zero weights skipped (not a dense-hardware speed)
    latency_ms: float | None = None     # median of timed forwards after warm-up, on `device`
    accuracy: float | None = None       # from the evaluator only
    dense_bytes_by_dtype: dict = field(default_factory=dict)
    eval_extra: dict = field(default_factory=dict)   # the rest of an evaluator's dict
    layers: list = field(default_factory=list)       # per-layer: name, type, params, nonzero, sparsity, flops, dtype
    device: str = "cpu"
    batch_size: int | None = None       # of the example input used for FLOPs and latency
    latency_mode: str = "eager"         # how the timed model ran (see LATENCY_MODES); a mode that
    #                                     could not be used reads "eager (deployed: <why>)"

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
        if self.accuracy is None:
            lines.append("  accuracy  not measured (no evaluator)")
        else:
            lines.append(f"  accuracy  {format_accuracy(self.accuracy)}")
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


# ----------------------------------------------------------------------------------- counting

def _weight_like(module: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors that are the module's learned content: its own parameters, plus buffers a module
    declares as weights (``_nbc_weight_buffers``, e.g. int codes of a quantized layer)."""
    out = {n: p for n, p in module.named_parameters(recurse=False)}
    for n in getattr(module, "_nbc_weight_buffers", ()):
        b = getattr(module, n, None)
        if isinstance(b, torch.Tensor):
            out[n] = b
    return out


def _is_torch_quantized(m: nn.Module) -> bool:
    """A ``torch.ao`` quantized module: its weights live in packed, backend-specific objects
    (not in ``parameters()``), read back through ``_weight_bias()`` / ``weight()``."""
    return any(c.__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
               for c in type(m).__mro__)


def _counts_itself(m: nn.Module) -> bool:
    """True for a module that stands for its whole subtree when counting: one with its own
    ``nbc_count`` or a ``torch.ao`` quantized module (whose children only hold packed params)."""
    return hasattr(m, "nbc_count") or _is_torch_quantized(m)


def _units(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(name, module)`` of every module once, in ``named_modules`` order, except the modules
    inside one that counts itself (:func:`_counts_itself`): those are its packed parameters."""
    inside = None
    for name, m in model.named_modules():
        if inside is not None and (inside == "" or name.startswith(inside + ".")):
            continue
        inside = None
        yield name, m
        if _counts_itself(m):
            inside = name


def _stored_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own learned tensors as it stores them: :func:`_weight_like`, plus, for a
    ``torch.ao`` quantized module, its packed weights (quantized tensors) and biases."""
    out = dict(_weight_like(module))
    if not _is_torch_quantized(module):
        return out
    got = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wb = getattr(module, "_weight_bias", None)
            if callable(wb):
                got = wb()
            elif callable(getattr(module, "weight", None)):
                got = (module.weight(), None)
        except Exception:  # noqa: BLE001 - a module we cannot read: counted as having none
            got = None
    if isinstance(got, tuple) and len(got) == 2:
        for n, t in zip(("weight", "bias"), got):
            if isinstance(t, torch.Tensor):
                out[n] = t
    elif isinstance(got, dict):           # dynamic LSTM / GRU: {"weight": {...}, "bias": {...}}
        for part in ("weight", "bias"):
            for n, t in (got.get(part) or {}).items():
                if isinstance(t, torch.Tensor):
                    out[n] = t
    return out


def _tensor_counts(t: torch.Tensor) -> tuple[int, int]:
    """(entries, nonzero entries). A quantized tensor's entry is zero when its integer code
    equals its zero point (per channel for per-channel schemes), i.e. it dequantizes to 0."""
    t = t.detach()
    if t.is_quantized:
        r = t.int_repr().to(torch.int32)
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                           torch.per_channel_affine_float_qparams):
            shape = [1] * r.dim()
            shape[t.q_per_channel_axis()] = -1
            zp = t.q_per_channel_zero_points().to(torch.int32).reshape(shape)
            if t.qscheme() == torch.per_channel_affine_float_qparams:   # zero points are floats
                return r.numel(), int(torch.count_nonzero(t.dequantize()).item())
        else:
            zp = int(t.q_zero_point())
        return r.numel(), int((r != zp).sum().item())
    return t.numel(), int(torch.count_nonzero(t).item())


def _is_bias(name: str) -> bool:
    return name == "bias" or name.startswith("bias_") or name.endswith(".bias")


def module_counts(module: nn.Module) -> tuple[int, int]:
    """(params, nonzero params) the module stores itself (not its children): its ``nbc_count()``
    when it has one, else :func:`_stored_tensors`."""
    if hasattr(module, "nbc_count"):
        p, z = module.nbc_count()
        return int(p), int(z)
    p = z = 0
    for t in _stored_tensors(module).values():
        a, b = _tensor_counts(t)
        p, z = p + a, z + b
    return p, z


def weight_density(module: nn.Module) -> float | None:
    """Fraction of the module's stored *weights* (biases left out) that are nonzero, read from
    what it stores: float weights, the int codes of a ``torch.ao`` quantized weight against its
    zero points, or, for a layer that only counts itself, ``nbc_count()`` less its biases.
    None when the module stores no weight."""
    tensors = _stored_tensors(module)
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and "weight" not in tensors:   # torch.nn.utils.prune: the
        tensors["weight"] = w                                     # masked weight, not weight_orig
    exact = {n: t for n, t in tensors.items() if not _is_bias(n)
             and (t.is_quantized or t.is_floating_point() or t.is_complex())}
    if "weight" in exact:
        exact = {"weight": exact["weight"]}
    elif any(n.startswith("weight") for n in exact):     # LSTM / GRU: weight_ih_l0, weight_hh_l0...
        exact = {n: t for n, t in exact.items() if n.startswith("weight")}
    if exact:
        p = z = 0
        for t in exact.values():
            a, b = _tensor_counts(t)
            p, z = p + a, z + b
        return z / p if p else None
    if hasattr(module, "nbc_count"):        # e.g. integer codes with zero points of its own
        p, z = module.nbc_count()
        for n, t in tensors.items():
            if _is_bias(n):
                a, b = _tensor_counts(t)
                if p - a > 0:
                    p, z = p - a, z - b
        return z / p if p else None
    return None


def count_params(model: nn.Module) -> tuple[int, int]:
    """(params, nonzero params). A module may override with ``nbc_count() -> (params, nonzero)``
    (used by layers whose weights live outside ``parameters()``, like packed int8 kernels);
    ``torch.ao`` quantized modules are counted from their packed weights (an int8 entry is zero
    when it equals its zero point). Biases count as parameters."""
    total = nz = 0
    for _, m in _units(model):
        p, z = module_counts(m)
        total += p
        nz += z
    return total, nz


def dense_bytes(model: nn.Module) -> tuple[int, dict]:
    """Bytes the model's tensors occupy in memory now, total and per dtype (state_dict tensors,
    each storage counted once)."""
    seen: set = set()
    per: dict[str, int] = {}
    for t in _state_tensors(model):
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.untyped_storage().nbytes() if t.numel() else 0
        name = str(t.dtype).replace("torch.", "")
        per[name] = per.get(name, 0) + nbytes
    return sum(per.values()), per


def _state_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    for v in model.state_dict(keep_vars=True).values():
        if isinstance(v, torch.Tensor):
            yield v.detach()
        elif isinstance(v, (tuple, list)):
            yield from (x.detach() for x in v if isinstance(x, torch.Tensor))


def packed_bytes(model: nn.Module) -> int:
    """The length of what ``nbcompress.save`` writes for this model."""
    from .storage import save

    buf = io.BytesIO()
    save(model, buf)
    return buf.tell()


def count_flops(model: nn.Module, example_input: Any) -> tuple[int, int, dict[str, int]]:
    """(flops, sparse_flops, per-leaf-module flops) of one forward of ``example_input``.

    FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``; the per-module split is read by
    snapshotting its running total around each leaf module's forward (a quantized layer, whose
    only children hold its packed weights, counts as a leaf). ``sparse_flops`` scales each leaf's
    count by the density of its stored weights (:func:`weight_density`): a pruned layer's zeros
    are skipped whether its weights are float or int8 codes.
    """
    per_leaf: dict[str, int] = {}
    counter = FlopCounterMode(display=False)
    handles = []
    starts: dict[str, list[int]] = {}
    units = [(n, m) for n, m in _units(model)
             if _counts_itself(m) or not any(True for _ in m.children())]

    for name, m in units:
        def pre(mod, args, _n=name):
            starts.setdefault(_n, []).append(counter.get_total_flops())

        def post(mod, args, out, _n=name):
            s = starts[_n].pop()
            per_leaf[_n] = per_leaf.get(_n, 0) + counter.get_total_flops() - s

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            _forward(model, example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = counter.get_total_flops()
    saved = 0.0
    modules = dict(units)
    for n, f in per_leaf.items():
        density = weight_density(modules[n])
        if density is not None:
            saved += f * (1.0 - density)
    return int(total), int(round(total - saved)), per_leaf


def dynamic_flops(model: nn.Module, example_input: Any, evaluator: Any) -> tuple[int, dict] | None:
    """For a model whose work depends on its input (early exits): its own count of the FLOPs a
    forward of ``example_input`` costs on average over the evaluator's data.

    Hook: the model may define ``nbc_flops(example_input, evaluator) -> (flops, details) | None``:
    ``flops`` for a batch the size of ``example_input`` (so it compares with the static count of
    any other model), averaged over the data it actually ran; ``details`` (numbers) are shown
    beside the evaluator's. ``None`` from the hook, or no hook: the static count stands.
    """
    hook = getattr(model, "nbc_flops", None)
    if not callable(hook):
        return None
    got = hook(example_input, evaluator)
    if got is None:
        return None
    flops, details = got
    return int(flops), dict(details or {})


LATENCY_MODES = ("eager", "channels_last", "deployed")


def check_latency_mode(mode: Any) -> str:
    if mode not in LATENCY_MODES:
        raise BadInput(f"--latency must be one of {', '.join(LATENCY_MODES)}; got {mode!r}")
    return mode


def latency_model(model: nn.Module, example_input: Any, mode: str = "eager"):
    """``(runnable, input, mode used)``: the model as it is timed in latency ``mode``.

    - ``eager``: the model itself, PyTorch's default (NCHW).
    - ``channels_last``: a copy with 4-D tensors in channels_last memory format, and the input too
      (what oneDNN's CPU convolution, pooling and BatchNorm kernels run fastest on).
    - ``deployed``: a copy traced and passed through ``torch.jit.optimize_for_inference``
      (frozen; BatchNorm folded into convs, conv + ReLU fused): how PyTorch deploys a model for
      inference. A model with data-dependent control flow (an early-exit model) cannot be traced
      faithfully; then, or when tracing fails or changes the outputs, it is timed eager and the
      mode used says why.

    The caller's model is never changed (the other modes work on a deep copy).
    """
    check_latency_mode(mode)
    if mode == "eager":
        return model, example_input, "eager"
    x = example_input
    if mode == "channels_last":
        try:
            m = copy.deepcopy(model).to(memory_format=torch.channels_last)
        except Exception as e:  # noqa: BLE001 - a module that cannot change its format
            return model, example_input, f"eager (channels_last: {_why(e)})"
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return m, x, "channels_last"
    try:
        m = copy.deepcopy(model).eval()
        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traced = torch.jit.trace(m, args, check_trace=False)
            if any(issubclass(w.category, torch.jit.TracerWarning) for w in caught):
                return model, example_input, "eager (deployed: data-dependent control flow)"
            deployed = torch.jit.optimize_for_inference(traced)
            ref, out = m(*args), deployed(*args)
        if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)
                and ref.shape == out.shape
                and torch.allclose(out.float(), ref.float(), rtol=1e-3,
                                   atol=1e-4 * max(1.0, float(ref.abs().max())))):
            return model, example_input, "eager (deployed: outputs changed)"
        return deployed, x, "deployed"
    except Exception as e:  # noqa: BLE001 - any model TorchScript cannot take: time it eager
        return model, example_input, (f"eager (deployed: TorchScript cannot trace or freeze it, "
                                      f"{type(e).__name__})")


def _why(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:80] if text else type(e).__name__


def measure_latency(model: nn.Module, example_input: Any, *, runs: int = 30, warmup: int = 5,
                    max_seconds: float = 2.0, device: torch.device | str | None = None) -> float:
    """Median milliseconds of a no-grad forward, after warm-up, on the model's device (or
    ``device``: a frozen TorchScript module has no parameters to tell it)."""
    dev = torch.device(device) if device is not None else model_device(model)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    scripted = isinstance(model, torch.jit.ScriptModule)     # frozen: no train/eval mode
    was_training = False if scripted else model.training
    if not scripted:
        model.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                _forward(model, example_input)
            sync()
            budget_end = time.perf_counter() + max_seconds
            for i in range(runs):
                t0 = time.perf_counter()
                _forward(model, example_input)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
                if i >= 9 and time.perf_counter() > budget_end:
                    break
    finally:
        if not scripted:
            model.train(was_training)
    return statistics.median(times)


# --------------------------------------------------------------------------------- evaluation

def is_loader(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.DataLoader)


# keys an evaluator's dict may give its accuracy under (Hugging Face's Trainer prefixes "eval_")
ACCURACY_KEYS = ("accuracy", "acc", "top1", "top1_accuracy", "eval_accuracy", "eval_acc")


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
    """(accuracy, other numbers). A DataLoader gives top-1 accuracy; a callable returns a number
    (the accuracy) or a dict of numbers with the accuracy under one of :data:`ACCURACY_KEYS`.
    Anything else is an :class:`EvaluatorError` naming the evaluator and what it returned; an
    exception raised inside the user's evaluator propagates as it is (their code, their
    traceback)."""
    if evaluator is None:
        return None, {}
    check_evaluator(evaluator)
    if is_loader(evaluator):
        from .train import evaluate

        return float(evaluate(model, evaluator, device=device, progress=False)), {}
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
        if bad or key is None:
            why = (f"its value for {bad[0]!r} is not a number" if bad else
                   f"it has no accuracy key ({', '.join(ACCURACY_KEYS[:3])}, ...)")
            raise EvaluatorError(f"evaluator {name} returned {shown}: {why}; an evaluator returns "
                                 f"a number or a dict of numbers with an 'accuracy' key")
        acc = values.pop(key)
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
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return x[:1].clone()
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
        extra = {**flops_details, **extra}
        layers = _layer_table(model, per_leaf)
    finally:
        if moved:
            model.to(origin)
    return Metrics(params=params, nonzero_params=nonzero, dense_bytes=dbytes, packed_bytes=pbytes,
                   flops=flops, sparse_flops=sparse, latency_ms=lat, accuracy=acc,
                   dense_bytes_by_dtype=per_dtype, eval_extra=extra, layers=layers,
                   device=str(dev), batch_size=batch, latency_mode=used_mode)


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
