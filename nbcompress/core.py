"""The shared shapes every technique speaks: a step config, the context a step runs in, its result,
and the errors a user sees.

A technique is a :class:`StepConfig` subclass (a small dataclass, as torchao's configs are) whose
``run(model, ctx)`` compresses ``model`` *in place* and returns a :class:`CompressionResult`.
``model`` is always a private deep copy already on ``ctx.device``: :func:`compress` makes the copy,
moves it, and moves the result back, so a technique never touches the caller's model and never
handles devices for the model itself (data batches are moved with ``nbcompress.train.to_device``).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .errors import (BadInput, EvaluatorError, ExampleInputError, FieldError, NBCompressError,
                     python_name, render)
from .fingerprint import MEMO
from .options import check_fields, is_given, is_int, option, options_of, unknown_option

__all__ = ["NBCompressError", "BadInput", "EvaluatorError", "ExampleInputError", "FieldError",
           "StepContext", "CompressionResult", "StepConfig", "compress", "resolve_device",
           "model_device", "check_seeds", "TECHNIQUES", "register_technique",
           "unregister_technique"]


@dataclass
class StepContext:
    """Where and how a step runs. Built by :func:`compress` / ``History.apply``."""

    device: torch.device
    origin_device: torch.device
    evaluator: Any = None          # DataLoader or callable f(model) -> float | dict, or None
    example_input: Any = None      # a tensor (batch of 1) for FLOPs / latency / tracing
    progress: bool = True
    init_state: dict | None = None  # initial weights recorded for the name (lottery tickets)
    history: Any = None            # the History the step is applied through, if any
    spell: Any = None              # how the result's notes name options: None = Python fields,
                                   # the magic layer passes its flag spelling
    verify_runs: bool = True       # compress runs the result once on example_input; False: the
                                   # caller's own first forward of it does (History's measure)

    def evaluate(self, model: nn.Module) -> float | None:
        """Top-1 accuracy (or the evaluator's 'accuracy') of ``model`` on this context's evaluator."""
        from .metrics import run_evaluator

        acc, _ = run_evaluator(model, self.evaluator, device=self.device)
        return acc


@dataclass
class CompressionResult:
    """What a step returns: the new model plus what the dashboard should show about it.

    ``layers``: one dict per layer the step touched (e.g. name, kind, rank, sparsity, bits,
    reconstruction error) shown as the step's detail table. ``notes``: short sentences for the user
    ("skipped fc3: factorising would not save parameters"). ``extra``: any further numbers (per-round
    accuracies, ticket vs random re-init, ...), kept in the history and shown as a small table.
    ``tables``: named pandas DataFrames (e.g. a sensitivity scan); ``figures``: named PNG bytes.
    """

    model: nn.Module
    layers: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    changes_model: bool = True     # False for analysis-only steps (e.g. --sensitivity)
    compare: dict = field(default_factory=dict)  # other models to measure and show beside, e.g. {"teacher": t}


@dataclass
class StepConfig:
    """Base for technique configs. A subclass sets ``technique``, declares its options with
    :func:`nbcompress.options.option` and implements ``run``; :func:`register_technique` then
    gives it a magic, a row in the README's table and a demo step (see docs/ARCHITECTURE.md).

    Class attributes a technique may set: ``magic`` (the magic's name, default ``technique``),
    ``model_help`` (help of the magic's NAME argument), ``summary`` (one line: what it does),
    ``examples`` (magic lines shown in ``%verb?``)."""

    technique: ClassVar[str] = "step"
    magic: ClassVar[str | None] = None
    model_help: ClassVar[str] = ("the variable holding the model (dotted names like model.encoder "
                                 "work); rebound to the result")
    summary: ClassVar[str] = ""
    examples: ClassVar[tuple] = ()
    # the option whose value makes the step train (e.g. "finetune"); None: it always trains.
    # --processes / --launcher only apply with it.
    trains_with: ClassVar[str | None] = None
    device: str | None = None
    progress: bool = True
    # every technique's training (nbcompress.train.fit) can run on several processes
    processes: int = option(
        1, kind="int", range="[1, inf)", metavar="N", kw_only=True, last=True,
        help="train on N processes (data parallel, PyTorch DDP; on the CPU one thread each, on "
             "CUDA one per GPU); each reads the loader's batch size, so a step sees N times as "
             "many samples")
    launcher: str = option(
        "none", kind="choice", choices=("none", "accelerate"), kw_only=True, last=True,
        help="what starts the --processes workers: none (torch.multiprocessing) or accelerate "
             "(Hugging Face Accelerate's notebook_launcher)")

    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:  # pragma: no cover
        raise NotImplementedError

    def shared_with_copy(self, model: nn.Module, ctx: StepContext) -> list[torch.Tensor]:
        """Tensors of ``model`` this step only reads (never changes in place) and replaces in its
        work copy: :func:`compress` lets the copy hold them instead of copies of them (a step that
        turns every Linear weight into int8 codes need not first copy every float weight). Any
        still in the result is copied then: the result never shares a tensor with ``model``.
        Default: none."""
        return []

    def keeps_flops(self, model: nn.Module, ctx: StepContext) -> bool:
        """Whether every layer of the result computes the FLOPs its layer in ``model`` did (a
        like-for-like replacement: a float Linear by an int8 one of the same shape): then the
        result's FLOPs are not counted again by a forward (:func:`~.counting.carry_flops`); its
        sparse FLOPs are still computed from its weights. Default: False."""
        return False

    def validate(self, model: nn.Module) -> None:
        """Checks beyond the declared ones, against the model, before any work; raise
        :class:`FieldError` (or :class:`BadInput` for messages that name no option)."""

    def check(self, model: nn.Module) -> None:
        """Every check before any work: the declared options (kinds, ranges, choices, requires,
        conflicts), then the technique's own :meth:`validate`."""
        if not isinstance(model, nn.Module):
            raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
        check_fields(self)
        if self.processes != 1 or self.launcher != "none":
            self._check_processes()
        self.validate(model)

    def _check_processes(self) -> None:
        """``processes`` / ``launcher`` given: the step must train (its ``trains_with`` option
        given), the request run here, the training loader split between processes."""
        from .distributed import check_request, unshardable

        trains = self.trains_with
        if trains is not None:
            f = next(f for f in dataclasses.fields(self) if f.name == trains)
            if not is_given(self, f):
                which = "{processes}" if self.processes != 1 else "{launcher}"
                raise FieldError(f"{which} only applies with {{{trains}}}: the processes train, "
                                 f"and this step does not")
        check_request(self.processes, self.launcher, resolve_device(self.device))
        loader = getattr(self, trains) if trains else None
        if self.processes > 1 and isinstance(loader, torch.utils.data.DataLoader):
            why = unshardable(loader)
            if why:
                raise FieldError(why.replace("the training loader", f"{{{trains}}}", 1))

    def before_magic(self, magics, name: str, local_ns, typed: dict) -> None:
        """Hook for checks that need the notebook (e.g. a model is not its own teacher), before
        any work. ``typed``: each option given on the line as the text typed (field -> str)."""

    @classmethod
    def magic_name(cls) -> str:
        return cls.magic or cls.technique

    @classmethod
    def options(cls):
        """The declared options: ``[(dataclass field, Opt), ...]``."""
        return options_of(cls)

    @classmethod
    def check_options(cls, options: dict, fn: str, exclude=()) -> None:
        """Keyword options of the Python verb ``fn`` that are not fields of this config (less
        ``exclude``, which the verb takes itself) are one line naming the closest field, not a
        TypeError."""
        names = sorted({f.name for f in dataclasses.fields(cls)} - set(exclude))
        msg = unknown_option(options, names, fn)
        if msg:
            raise BadInput(msg)

    def describe(self) -> str:
        """The arguments as a compact, deterministic string (history 'args' column)."""
        parts = []
        last = lambda f: "option" in f.metadata and f.metadata["option"].last  # noqa: E731
        for f in sorted(dataclasses.fields(self), key=last):
            if f.name in ("device", "progress"):
                continue
            v = getattr(self, f.name)
            if v == f.default or (f.default_factory is not dataclasses.MISSING and v == f.default_factory()):
                continue
            parts.append(f"{f.name}={_short(v)}")
        return " ".join(parts)


def _short(v: Any) -> str:
    if isinstance(v, nn.Module):
        return type(v).__name__
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (int, str, bool)) or v is None:
        return str(v)
    return type(v).__name__


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` means CUDA when available, else CPU. A CUDA request without CUDA is bad input."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInput(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def compress(model: nn.Module, config: StepConfig, *, ctx: StepContext | None = None,
             evaluator: Any = None, example_input: Any = None,
             device: str | torch.device | None = None) -> CompressionResult:
    """Run one technique on a private copy of ``model``; the caller's model is never changed.

    The copy is made and moved to the work device here, the result is moved back to the model's
    own device here: techniques only compress.
    """
    if not isinstance(model, nn.Module):
        raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_seeds(config)
    config.check(model)
    origin = model_device(model)
    if ctx is None:
        ctx = StepContext(device=resolve_device(device if device is not None else config.device),
                          origin_device=origin, evaluator=evaluator,
                          example_input=example_input, progress=config.progress)
    # tensors the step only reads are the model's own in the work copy (on the same device)
    shared = config.shared_with_copy(model, ctx) if ctx.device == origin else []
    memo: dict = {id(t): t for t in shared}
    work = copy.deepcopy(model, memo)
    MEMO.carry(memo)              # what was measured on the model holds for its copy
    del memo                      # it holds every copied tensor: a replaced layer's must go
    work = work.to(ctx.device)
    flops_key = None
    if ctx.example_input is not None and config.keeps_flops(model, ctx):
        from .counting import structure_key

        flops_key = structure_key(model, ctx.example_input)
    from .distributed import scope

    with scope(config.processes, config.launcher) as req:
        result = config.run(work, ctx)
    if req.runs:        # how the training ran: once per distinct way (lottery rounds: one line)
        for line in dict.fromkeys(req.runs):
            n = req.runs.count(line)
            result.notes.append(line + (f" ({n} training runs)" if n > 1 else ""))
    # notes may name options as field templates ("use {layers} to include it"): spelled for
    # the caller, like FieldError messages
    result.notes = [render(n, ctx.spell or python_name) if isinstance(n, str) else n
                    for n in result.notes]
    if not result.changes_model:
        result.model = model
    else:
        # a History measures (runs) the result itself, but not when its FLOPs are carried over
        if ctx.example_input is not None and (ctx.verify_runs or flops_key is not None):
            check_still_runs(result.model, model, ctx.example_input, config.technique)
        if shared:
            _unshare(result.model, shared)
        result.model = _to_device(result.model, origin)
        if flops_key is not None:
            from .counting import carry_flops

            carry_flops(flops_key, result.model, ctx.example_input)
    return result


def _unshare(model: nn.Module, shared: list) -> None:
    """Each of the ``shared`` tensors still held by ``model`` (as a parameter or buffer) becomes
    a copy of it (one copy per tensor: ties stay tied)."""
    ids = {id(t) for t in shared}
    copies: dict = {}
    for m in model.modules():
        for slots in (m._parameters, m._buffers):
            for k, t in slots.items():
                if t is None or id(t) not in ids:
                    continue
                if id(t) not in copies:
                    c = t.detach().clone()
                    copies[id(t)] = (nn.Parameter(c, requires_grad=t.requires_grad)
                                     if isinstance(t, nn.Parameter) else c)
                slots[k] = copies[id(t)]


def check_still_runs(new: nn.Module, original: nn.Module | None, example: Any,
                     technique: str) -> None:
    """The compressed model must run on the example input the original runs on: a model whose
    own code reads what a step replaced (``F.linear(x, self.fc.weight)`` after int8, a factorised
    layer's ``weight``) is refused in one line, never handed back broken. ``original`` None: it
    is known to run on ``example`` (a technique calling this mid-step)."""
    why = _run_error(new, example)
    if why is None or (original is not None and _run_error(original, example) is not None):
        return              # it runs; or the original fails too: not this step's doing
    raise no_longer_runs(technique, why)


def no_longer_runs(technique: str, why: str) -> FieldError:
    """The refusal of a step whose result does not run where the original ran."""
    return FieldError(f"{technique} would hand back a model that no longer runs on the example "
                     f"input ({why}); refused, the model is unchanged. The model's own code may "
                     f"read something the step replaced (e.g. a layer's .weight): leave that layer "
                     f"out with " + "{layers}")


def _run_error(model: nn.Module, example: Any) -> str | None:
    """``Type: message`` of what stops ``model`` (eval mode, no grad) running on ``example``,
    or None when it runs."""
    from .batches import eval_mode, first_line, forward_batch, to_device

    try:
        with torch.no_grad(), eval_mode(model):
            forward_batch(model, to_device(example, model_device(model)))
    except Exception as e:  # noqa: BLE001 - any failure to run is the answer
        return first_line(e)
    return None


def check_seeds(config: StepConfig) -> None:
    """Every integer ``seed`` field (of any technique) fits torch's 64-bit seeds (types are each
    config's own check); checked before any work, so no technique fails on it halfway."""
    for f in dataclasses.fields(config):
        if f.name != "seed" and not f.name.endswith("_seed"):
            continue
        v = getattr(config, f.name)
        if is_int(v) and not -2 ** 63 <= v < 2 ** 63:
            raise FieldError(f"{{{f.name}}} must fit in 64 bits (-2**63 to 2**63 - 1), got {v}")


def _to_device(model: nn.Module, device: torch.device) -> nn.Module:
    try:
        return model.to(device)
    except (RuntimeError, NotImplementedError):
        # e.g. int8 CPU kernels that have no CUDA form: keep it where it is, usable there.
        return model


# The registry: every technique's config class, by technique name. The magics, the demo's steps,
# the README's magic table and ``nbcompress.TECHNIQUES`` all come from it.
TECHNIQUES: dict[str, type[StepConfig]] = {}
DEMOS: dict[str, tuple] = {}      # technique -> (demo step function, pipeline name)


def register_technique(cls: type[StepConfig] | None = None, *, demo: Callable | None = None,
                       pipeline: str = "model"):
    """Register a technique's config class (as a decorator, or ``register_technique(Cls,
    demo=fn)``). ``demo(train_loader, test_loader) -> (label, config)`` is its step in the demo
    (``python -m nbcompress demo``), applied in registration order to the history named
    ``pipeline``. A shell that has loaded the extension gets the new magic at once."""
    def add(c: type[StepConfig]) -> type[StepConfig]:
        TECHNIQUES[c.technique] = c
        if demo is not None:
            DEMOS[c.technique] = (demo, pipeline)
        for hook in list(_ON_REGISTER):
            hook(c)
        return c

    return add if cls is None else add(cls)


def unregister_technique(technique: str) -> None:
    TECHNIQUES.pop(technique, None)
    DEMOS.pop(technique, None)


_ON_REGISTER: list[Callable] = []


ProgressFn = Callable[[str], None]
