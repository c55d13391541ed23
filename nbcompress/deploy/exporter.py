"""``nbcompress.export``: write a model (any version of a history) to a deployment format, load
the file back in its runtime and say how it compares with the model.

Formats: ``onnx`` (``torch.onnx.export``'s dynamo exporter, run and timed in ONNX Runtime),
``pt2`` (``torch.export``; ExecuTorch and AOTInductor start from it) and ``state_dict`` (plain
tensors in a ``torch.save`` file that ``torch.load(weights_only=True)`` reads). Compressed layers
are first written in operators the format has (:mod:`.lowering`). The file appears at its path
only when it is complete: it is written in a temporary folder beside it and moved in place, so a
failed export leaves nothing there.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..batches import first_line, forward_batch
from ..core import BadInput
from ..errors import FieldError
from ..options import check_fields, option, unknown_option
from .checks import compare
from .lowering import lowered_copy
from .report import ExportReport

__all__ = ["export", "ExportConfig", "FORMATS"]

FORMATS = ("onnx", "pt2", "state_dict")
_SUFFIXES = {".onnx": "onnx", ".pt2": "pt2", ".pt": "state_dict", ".pth": "state_dict"}
MIN_OPSET, MAX_OPSET = 18, 23


@dataclass
class ExportConfig:
    """The options of :func:`export` and ``%export``, declared once."""

    magic_name: ClassVar[str] = "export"
    model_help: ClassVar[str] = ("the variable holding the model, or NAME@K for version K of its "
                                 "history (0 is the first)")
    path: str = option(None, kind="str", positional=True, metavar="PATH", required=True,
                       help="the file to write (its folder must exist); .onnx, .pt2 or .pt")
    format: str | None = option(
        None, kind="choice", choices=FORMATS,
        help="onnx (run in ONNX Runtime), pt2 (torch.export) or state_dict (plain tensors for "
             "torch.load(weights_only=True)); default: from the file's suffix, else onnx")
    opset: int | None = option(None, kind="int", range=f"[{MIN_OPSET}, {MAX_OPSET}]",
                               metavar="N", help="ONNX opset (default 18)")
    check: Any = option(None, kind="loader",
                        help="DataLoader: top-1 agreement of the exported file with the model, "
                             "and both accuracies, on its data")
    latency: bool = option(True, kind="bool", flag="--no-latency", flag_value=False,
                           optional=False,
                           help="skip timing the file in its runtime beside the model")

    def resolved_format(self) -> str:
        if self.format is not None:
            return self.format
        return _SUFFIXES.get(os.path.splitext(str(self.path))[1].lower(), "onnx")


def export(model: nn.Module, path: str | os.PathLike, format: str | None = None, *,
           example_input: Any = None, opset: int | None = None, check: Any = None,
           latency: bool = True, **options) -> ExportReport:
    """Write ``model`` to ``path`` as ``format`` (``onnx``, ``pt2`` or ``state_dict``; default
    from the suffix, else ``onnx``), load the file back in its runtime and compare it with the
    model on ``example_input`` (and, with ``check=loader``, top-1 agreement and accuracy on the
    loader's data). Returns an :class:`ExportReport`; the model is not changed.

    ``onnx`` and ``pt2`` need ``example_input`` (a tensor, a tuple of them, or a dict of keyword
    inputs): the graph is traced on it, with the batch dimension left free where the model
    allows. Bad input (unknown format, missing folder, a layer the exporter cannot express) is
    one :class:`BadInput` line and nothing is written."""
    msg = unknown_option(options, [], "export")
    if msg:
        raise BadInput(msg)
    cfg = ExportConfig(path=os.fspath(path) if isinstance(path, os.PathLike) else path,
                       format=format, opset=opset, check=check, latency=latency)
    check_fields(cfg)
    return run_export(model, cfg, example_input)


def run_export(model: nn.Module, cfg: ExportConfig, example_input: Any) -> ExportReport:
    """The work of :func:`export` (the magic calls it with its parsed config)."""
    if not isinstance(model, nn.Module):
        raise BadInput(f"export needs a torch.nn.Module, got {type(model).__name__}")
    fmt = cfg.resolved_format()
    path = os.path.abspath(os.path.expanduser(str(cfg.path)))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FieldError(f"{{path}}: the folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise FieldError(f"{{path}}: {path!r} is a folder; give a file name")
    if fmt != "onnx" and cfg.opset is not None:
        raise FieldError("{opset} only applies to {format='onnx'}")
    if fmt != "state_dict" and example_input is None:
        raise BadInput(f"exporting to {fmt} traces the model on an example input: give "
                       f"example_input= (or register the model with --eval LOADER / "
                       f"--input-shape)")
    t0 = time.perf_counter()
    lowered, notes = lowered_copy(model, fmt)
    if fmt == "pt2" and notes:
        notes["loading"] = ("the quantized operators are PyTorch's own: import "
                            "torch.ao.quantization.fx._decomposed before torch.export.load")
    example = None if example_input is None else _own_copy(example_input)
    if example is not None:
        _check_runs(lowered, example)
    tmp = tempfile.mkdtemp(prefix=".nbc-export-", dir=folder)
    try:
        staged = os.path.join(tmp, os.path.basename(path))
        dynamic = _write(lowered, staged, fmt, example, cfg.opset)
        files = sorted(os.listdir(tmp))
        report = ExportReport(path=staged, format=fmt, notes=notes, dynamic_batch=dynamic,
                              bytes=sum(os.path.getsize(os.path.join(tmp, f)) for f in files),
                              files=files, opset=(cfg.opset or MIN_OPSET) if fmt == "onnx"
                              else None, model_bytes=_dense_bytes(model))
        try:                # loaded and compared in its runtime before it is put in place
            compare(report, model, lowered, example, cfg)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - the runtime refuses the file: say why, in a line
            raise BadInput(f"{report.runtime} cannot run the exported file: {_reason(e, lowered)}"
                           + ("; export the fp32 or fp16 version instead"
                              if "bfloat16" in str(e) else "")) from None
        for f in files:                         # the .onnx and any external-data file beside it
            os.replace(os.path.join(tmp, f), os.path.join(folder, f))
        report.path = path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report


def onnx_session(model: nn.Module, example_input: Any):
    """The model exported to ONNX in a temporary folder and loaded in ONNX Runtime (CPU, one
    thread): an :class:`~.runtime.OnnxRunner`, called like the model (latency mode
    ``onnxruntime``). The file is removed once the session holds the graph."""
    from .runtime import OnnxRunner

    lowered, _ = lowered_copy(model, "onnx")
    example = _own_copy(example_input)
    tmp = tempfile.mkdtemp(prefix="nbc-ort-")
    try:
        path = os.path.join(tmp, "model.onnx")
        _write(lowered, path, "onnx", example, None)
        return OnnxRunner(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _own_copy(example: Any) -> Any:
    """The example on the CPU in tensors of its own (a slice of a loader's batch would otherwise
    take the whole batch's storage into a .pt2 file's sample inputs)."""
    if isinstance(example, torch.Tensor):
        return example.detach().to("cpu").clone()
    if isinstance(example, Mapping):
        return {k: _own_copy(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_own_copy(v) for v in example)
    return example


def _dense_bytes(model: nn.Module) -> int:
    from ..counting import dense_bytes

    try:
        return int(dense_bytes(model)[0])
    except Exception:  # noqa: BLE001 - only shown beside the file size
        return 0


def _check_runs(lowered: nn.Module, example: Any) -> None:
    try:
        with torch.no_grad():
            forward_batch(lowered, example)
    except Exception as e:  # noqa: BLE001 - the model's own error, in one line
        raise BadInput(f"the model does not run on the example input: {first_line(e)}") from None


# --------------------------------------------------------------------------- writing
def _write(lowered: nn.Module, path: str, fmt: str, example: Any, opset: int | None) -> bool:
    """Write the file; True when its batch dimension is free (any batch size runs)."""
    if fmt == "state_dict":
        state = {k: v.detach().clone() for k, v in lowered.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        torch.save(state, path)
        return True
    args, kwargs = _args(example)
    targs, tkwargs, batch = _tiled(args, kwargs)
    dyn = _dynamic_shapes(lowered, targs, tkwargs, batch)
    error = None
    if dyn is not None:               # first with the batch dimension free (traced at batch 2)
        try:
            if _traced(lowered, path, fmt, targs, tkwargs, dyn, opset):
                return True
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - then at the example's own shape
            error = e
    try:                              # the batch fixed to the example's (the model fixed it)
        _traced(lowered, path, fmt, args, kwargs, None, opset)
        return False
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - one line naming the cause
        error = e
    raise BadInput(f"cannot export to {fmt}: {_reason(error, lowered)}; "
                   f"format='state_dict' writes the tensors as they are") from None


def _traced(lowered, path, fmt, args, kwargs, shapes, opset) -> bool:
    """Trace and write; True when the written graph's batch dimension is free."""
    if fmt == "pt2":
        with _quiet():
            ep = torch.export.export(lowered, args, kwargs, dynamic_shapes=shapes, strict=False)
            torch.export.save(ep, path)
        return shapes is not None and _pt2_batch_is_free(ep)
    prog = _onnx(lowered, path, args, kwargs, shapes, opset)
    ep = getattr(prog, "exported_program", None)     # torch.export fixed it: the ONNX input's
    return (shapes is not None and _batch_is_free(path)  # dimension may still look free
            and (ep is None or _pt2_batch_is_free(ep)))


def _pt2_batch_is_free(ep) -> bool:
    users = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in users]
    firsts = [v.shape[0] for v in vals if isinstance(v, torch.Tensor) and v.dim()]
    if not firsts or not all(isinstance(d, torch.SymInt) for d in firsts):
        return False
    for d in firsts:              # a symbol the model's code pinned to one value (VR[2, 2])
        if not d.node.expr.free_symbols:            # a constant that only looks symbolic
            return False
        vr = ep.range_constraints.get(d.node.expr)
        if vr is not None and vr.lower == vr.upper:
            return False
    return True


def _onnx(lowered, path, args, kwargs, shapes, opset):
    from .ops import finish_onnx, onnx_translations

    with _quiet():
        prog = torch.onnx.export(lowered, args, kwargs=kwargs or None, dynamo=True,
                                 dynamic_shapes=shapes, opset_version=opset or MIN_OPSET,
                                 custom_translation_table=onnx_translations(), verbose=False,
                                 optimize=True)
        prog.save(path)
    finish_onnx(path)           # exact rewrites that keep int8 tensors int8 in ONNX Runtime
    return prog


def _batch_is_free(path: str) -> bool:
    import onnx

    g = onnx.load(path, load_external_data=False).graph
    firsts = [i.type.tensor_type.shape.dim[0] for i in g.input
              if i.type.tensor_type.shape.dim]
    return bool(firsts) and all(d.dim_param for d in firsts)


def _args(example: Any) -> tuple[tuple, dict]:
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def _tiled(args: tuple, kwargs: dict):
    """The example with a batch of 2 where it has 1 (torch.export fixes a dimension of size 1),
    and the batch size; (args, kwargs, None) when the tensors share no leading dimension."""
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.dim() == 0 for t in tensors):
        return args, kwargs, None
    batch = tensors[0].shape[0]
    if any(t.shape[0] != batch for t in tensors):
        return args, kwargs, None
    if batch != 1:
        return args, kwargs, batch

    def tile(v):
        return torch.cat([v, v]) if isinstance(v, torch.Tensor) else v
    return tuple(tile(a) for a in args), {k: tile(v) for k, v in kwargs.items()}, 2


def _dynamic_shapes(lowered, args, kwargs, batch):
    """``dynamic_shapes`` with the batch dimension free, keyed by ``forward``'s parameters (the
    form torch.export takes for any signature, ``*args`` / ``**kwargs`` included)."""
    if batch is None:
        return None
    auto = torch.export.Dim.AUTO

    def spec(v):
        return {0: auto} if isinstance(v, torch.Tensor) else None
    try:
        sig = inspect.signature(lowered.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(v) for v in value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        else:
            out[name] = spec(value)
    return out


def _reason(e: BaseException, lowered: nn.Module) -> str:
    """One line: the innermost message, with the module it names where there is one."""
    seen = e
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    text = first_line(seen)
    if "failed:" in text and "ONNXRuntimeError" in text:     # ORT: "... Load model from P failed:X"
        text = text.split("failed:", 1)[1].strip()
    for name, m in lowered.named_modules():
        if name and f"'{name}'" in str(e):
            return f"{text} (in {name}: {type(m).__name__})"
    if len(text) > 200 and ". " in text[:200]:      # torch's run-on hints: the first sentence
        text = text[:text.index(". ") + 1]
    return text[:300]


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines and warnings stay out of the notebook."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export",
                                               "onnxscript", "torch.fx.experimental")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


