"""Per-name history of model versions: immutable records, apply-as-transaction, undo, redo,
memory budget.

A :class:`History` holds a list of :class:`Version` (the history's own copy of the model, its
metrics, technique, args, config, result, time) and a position. The history never hands out its
records: the model the name is bound to (``History.current``, "the live model") is a separate
object. So a user who trains the live model in place, or edits ``model.fc.weight.data``, changes
their model and not the record: the next call that looks at the history (``apply``, ``undo``,
``redo``, ``table``, ``sync``; every magic) first sees the change (:func:`state_fingerprint`) and
records the edited model as a new version, "edited outside nbcompress", measured like any other.
Undo then goes back to exactly what the step produced, and redo to the user's edit; every undo and
redo hands out a fresh, bit-identical copy of the record.

Transactions: ``apply`` runs a technique on a private copy (see :func:`nbcompress.core.compress`),
measures the result, and only then appends it. Settings (evaluator, example input, device, latency
mode), versions and metrics changed inside ``with history.transaction():`` are restored when the
block fails (an exception or Ctrl-C): the magics wrap configure + step in one, so a failing command
leaves neither a version nor its settings behind.

Memory: records live in host memory (a model on an accelerator is copied to the host tensor by
tensor, never duplicated on the accelerator) and are spilled to a temp dir past
``host_budget_bytes`` (:mod:`nbcompress.records`); undo/redo read them back bit-identical.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch
from torch import nn

from .core import (BadInput, EvaluatorError, ExampleInputError, StepConfig, StepContext,
                   compress, model_device, no_longer_runs, resolve_device)
from .fingerprint import MEMO, _same_state, host_copy, state_fingerprint
from .latency import check_latency_mode
from .options import magic_spelling
from .metrics import Metrics, check_evaluator, example_from, measure
from .records import (DEFAULT_HOST_BUDGET, Records, Version, _LazyInit, _release_freed_memory,
                      default_host_budget)

# (host_copy, the budget and Version are reached through this module too)
__all__ = ["History", "Version", "DEFAULT_HOST_BUDGET", "default_host_budget", "host_copy",
           "state_fingerprint"]

# how each remembered setting is named to the user, and how to change it
_SETTING_FLAGS = {"evaluator": ("--eval", "OBJ"), "example_input": ("--input-shape", "SHAPE"),
                  "latency_mode": ("--latency", "MODE"), "device": ("--device", "DEVICE")}


class History(Records):
    """The versions of one model. Usable from Python without IPython::

        h = History(model, evaluator=test_loader)
        report = h.apply(PruneConfig(amount=0.5))
        h.current            # the pruned model (yours to use; the history keeps its own copy)
        h.undo()             # a fresh copy of the original, bit-identical
    """

    def __init__(self, model: nn.Module, *, name: str = "model", evaluator: Any = None,
                 example_input: Any = None, device: str | None = None,
                 host_budget_bytes: int | None = None,
                 measure_latency: bool = True, remember_init: bool = True,
                 latency_mode: str = "eager"):
        if not isinstance(model, nn.Module):
            raise BadInput(f"{name} is a {type(model).__name__}, not a torch.nn.Module")
        check_evaluator(evaluator)
        self.name = name
        self.evaluator = evaluator
        self.example_input = example_input
        self.device = device
        self.host_budget_bytes = (default_host_budget() if host_budget_bytes is None
                                  else host_budget_bytes)
        self.measure_latency = measure_latency
        self.latency_mode = check_latency_mode(latency_mode)
        self._sources: dict[str, str] = {}      # setting -> how it was given ("--eval test_loader")
        self._given_now: set[str] = set()       # settings given inside the open transaction
        self._depth = 0                          # open transactions (only the outermost restores)
        self._pending_forget: list[Version] = []
        self._spill_dir: str | None = None
        self.versions: list[Version] = []
        self.versions.append(self._new_version(model, metrics=None,
                                               home_device=str(model_device(model))))
        self.pos = 0
        self.live = model
        self._live_fp = state_fingerprint(model)
        self._init: dict | None = None   # initial weights given or recorded later
        self._init_v0 = remember_init     # ... or version 0's record (no copy of its own)

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def transaction(self):
        """Everything this history holds (settings, versions, metrics, live model) as it was
        before the block, if the block raises (Ctrl-C included). Nested blocks join the outer one."""
        self._depth += 1
        saved = None
        if self._depth == 1:
            self._given_now = set()
            saved = (self.evaluator, self.example_input, self.device, self.latency_mode,
                     dict(self._sources), list(self.versions), [v.metrics for v in self.versions],
                     self.pos, self.live, self._live_fp, (self._init, self._init_v0))
        try:
            # one command's looks at the same tensors (fingerprints before and after, measuring)
            # sum each once: between them only techniques run, on their own copies
            with MEMO.trusting():
                yield self
        except BaseException:
            if saved is not None:
                made = [v for v in self.versions if all(v is not s for s in saved[5])]
                (self.evaluator, self.example_input, self.device, self.latency_mode,
                 self._sources, self.versions, metrics, self.pos, self.live, self._live_fp,
                 (self._init, self._init_v0)) = saved
                for v, m in zip(self.versions, metrics):
                    v.metrics = m
                for v in made:
                    self._forget(v)
                self._pending_forget = []
            raise
        else:
            if saved is not None:
                for v in self._pending_forget:
                    self._forget(v)
                self._pending_forget = []
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._given_now = set()

    # ------------------------------------------------------------------ configuration
    def configure(self, *, evaluator: Any = None, example_input: Any = None,
                  device: str | None = None, latency_mode: str | None = None,
                  sources: dict | None = None) -> None:
        """Change the settings used by every later step and measurement. ``sources`` says how each
        was given (``{"example_input": "--input-shape 1,1,28,28"}``), for error messages."""
        sources = sources or {}
        if evaluator is not None and evaluator is not self.evaluator:
            check_evaluator(evaluator)
            self.evaluator = evaluator
            self._note_source("evaluator", sources, f"evaluator={_label(evaluator)}")
            for v in self.versions:   # accuracy now means something else: re-measure lazily
                v.metrics = None
        if example_input is not None and example_input is not self.example_input:
            self.example_input = example_input
            shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else "?"
            self._note_source("example_input", sources, f"example_input of shape {shape}")
            for v in self.versions:
                v.metrics = None
        if latency_mode is not None and latency_mode != self.latency_mode:
            self.latency_mode = check_latency_mode(latency_mode)
            self._note_source("latency_mode", sources, f"latency_mode={latency_mode!r}")
            for v in self.versions:   # latency means something else: re-measure lazily
                v.metrics = None
        if device is not None:
            resolve_device(device)
            self.device = device
            self._note_source("device", sources, f"device={device!r}")

    def _note_source(self, key: str, sources: dict, default: str) -> None:
        self._sources[key] = sources.get(key, default)
        self._given_now.add(key)

    def remember_init(self, model: nn.Module | None = None) -> None:
        """Record the model's current weights as its 'initial' weights (lottery-ticket rewind).
        The live model at its first version, unchanged, is version 0's record: nothing is copied."""
        if model is None or model is self.live:
            self.sync()
            if self.pos == 0:
                self._init, self._init_v0 = None, True
                return
        model = model if model is not None else self.current
        self.init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                           if isinstance(v, torch.Tensor)}

    @property
    def init_state(self) -> dict | None:
        """The initial weights (name -> tensor, on the host) lottery tickets rewind to; read-only."""
        if self._init is not None or not self._init_v0:
            return self._init
        record = self._record(self.versions[0])
        cached = getattr(self, "_init_view", None)
        if cached is None or cached[0] is not record:     # views of the record, made once
            cached = self._init_view = (record, {k: v for k, v in record.state_dict().items()
                                                 if isinstance(v, torch.Tensor)})
        return cached[1]

    @init_state.setter
    def init_state(self, state: dict | None) -> None:
        self._init, self._init_v0 = state, False

    def _example(self):
        if self.example_input is not None:
            return self.example_input
        return example_from(self.evaluator)

    def _measure(self, model: nn.Module) -> Metrics:
        """``measure`` with this history's settings; an error caused by a setting remembered from
        an earlier command says which setting and how to change it."""
        try:
            return measure(model, example_input=self._example(), evaluator=self.evaluator,
                           latency=self.measure_latency, latency_mode=self.latency_mode)
        except ExampleInputError as e:
            raise self._blame(e, "example_input" if self.example_input is not None
                              else "evaluator") from None
        except EvaluatorError as e:
            raise self._blame(e, "evaluator") from None

    def _blame(self, error: BadInput, key: str) -> BadInput:
        source = self._sources.get(key)
        if source is None or key in self._given_now:
            return error
        flag, meta = _SETTING_FLAGS[key]
        how = (f"%nbcompress {self.name} {flag} {meta}" if source.startswith("--")
               else f"History.configure({key}=...)")
        return type(error)(f"{error} [this comes from {source}, remembered for {self.name} from "
                           f"an earlier command; change it with {how}]")

    # ------------------------------------------------------------------ access
    @property
    def current(self) -> nn.Module:
        """The live model: what the name is bound to."""
        return self.live

    def version_model(self, k: int) -> nn.Module:
        """A fresh copy of version ``k``'s model (0 = as registered), on the device it was used on,
        read back from disk if the memory budget spilled it. Yours to change."""
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(self.versions):
            raise BadInput(f"no version {k!r}: this history has versions 0..{len(self.versions) - 1}")
        return self._handout(self.versions[k])

    @property
    def current_version(self) -> Version:
        return self.versions[self.pos]

    def __len__(self) -> int:
        return len(self.versions)

    def live_unchanged(self) -> bool:
        """Whether the live model still holds exactly the current version's tensors."""
        return state_fingerprint(self.live) == self._live_fp

    def sync(self) -> bool:
        """Record edits the user made to the live model (training it in place, changing weights)
        as a new version, "edited outside nbcompress"; True when there was one. A changed
        fingerprint is confirmed against the record first (an in-place op that wrote the same
        values, like ``w.mul_(1)``, is no edit)."""
        fp = state_fingerprint(self.live)
        if fp == self._live_fp:
            return False
        if _same_state(self.live, self._record(self.current_version)):
            self._live_fp = fp
            self.enforce_budget()          # (a record read back from disk to compare)
            return False
        self._push(self._new_version(self.live, metrics=None, technique="edited",
                                     args="outside nbcompress (weights changed in place)",
                                     home_device=str(model_device(self.live)),
                                     reuse=self.current_version), self.live)
        return True

    def observe(self, model: nn.Module) -> None:
        """The name is bound to ``model``. If that is not the live model (the user assigned a new
        model to the name), record it as a new version; if it is but its weights changed, record
        the edit (:meth:`sync`). Either way undo can still go back."""
        if model is self.live:
            self.sync()
            return
        if not isinstance(model, nn.Module):
            raise BadInput(f"{self.name} is a {type(model).__name__}, not a torch.nn.Module")
        self._push(self._new_version(model, metrics=None, technique="assigned",
                                     args="(rebound outside nbcompress)",
                                     home_device=str(model_device(model))), model)

    def metrics_of(self, version: Version) -> Metrics:
        """The version's metrics, measured now if never measured (or its settings changed). The
        current version is measured on the live model when that is unchanged, any other on a copy
        of its record (an evaluator never touches a record)."""
        if version.metrics is None:
            if version is self.current_version and self.live_unchanged():
                version.metrics = self._measure(self.live)
            else:
                version.metrics = self._measure(self._handout(version))
        return version.metrics

    # ------------------------------------------------------------------ steps
    def apply(self, config: StepConfig, *, progress: bool | None = None, magic: str | None = None,
              device: str | None = None):
        """Run ``config`` on the current model as a transaction; returns a StepReport."""
        from .report import StepReport

        start = time.perf_counter()
        with self.transaction():
            self.sync()
            model = self.live
            self._room_for_step(model)
            before = self.metrics_of(self.current_version)
            if progress is not None:
                config.progress = progress
            dev = resolve_device(device or config.device or self.device)
            ctx = StepContext(device=dev, origin_device=model_device(model),
                              evaluator=self.evaluator, example_input=self._example(),
                              progress=config.progress, init_state=self._step_init(),
                              history=self,
                              spell=magic_spelling(type(config)) if magic else None,
                              verify_runs=False)     # measuring the result runs it (below)
            t0 = time.perf_counter()
            result = compress(model, config, ctx=ctx)
            seconds = time.perf_counter() - t0
            # (the technique's temporaries, freed, are where measuring and recording go next:
            # nothing is handed back to the system before the step ends)
            if not result.changes_model:
                return StepReport(name=self.name, kind="step", technique=config.technique,
                                  args=config.describe(), before=before, after=before,
                                  result=result, version=self.pos, n_versions=len(self.versions),
                                  history=None)
            new = result.model
            try:
                after = self._measure(new)
            except ExampleInputError as e:
                if before.flops is None:      # the original did not run on it either
                    raise
                raise no_longer_runs(config.technique, str(e).split(": ", 1)[-1]) from None
            beside = {label: self._measure(m) for label, m in result.compare.items()}
            result.compare = {}   # do not keep other models alive in the history
            made = self._new_version(new, metrics=after, technique=config.technique,
                                     args=config.describe(), config=config, result=result,
                                     seconds=seconds, home_device=str(model_device(new)),
                                     magic=magic, reuse=self.current_version)
            self._push(made, new)
            result.model = None     # the live model is self.live; the record is kept
            # freed memory beyond the next step's work copy goes back to the system
            _release_freed_memory(keep=2 * made.nbytes)
            table = self.table(sync=False)       # nothing can have changed since the push
            made.overhead = time.perf_counter() - start - seconds
            return StepReport(name=self.name, kind="step", technique=config.technique,
                              args=config.describe(), before=before, after=after, result=result,
                              version=self.pos, n_versions=len(self.versions),
                              history=table, extra_models=beside)

    def _step_init(self):
        """The initial weights as a step sees them: version 0's record is read back from disk only
        if the step looks at them (:class:`_LazyInit`)."""
        if self._init is None and self._init_v0 and self.versions[0].where == "disk":
            return _LazyInit(self)
        return self.init_state

    def _push(self, version: Version, live: nn.Module) -> None:
        dropped = self.versions[self.pos + 1:]
        del self.versions[self.pos + 1:]
        if self._depth:
            self._pending_forget.extend(dropped)   # forgotten when the transaction commits
        else:
            for v in dropped:
                self._forget(v)
        self.versions.append(version)
        self.pos = len(self.versions) - 1
        self.live = live
        self._live_fp = state_fingerprint(live)
        self.enforce_budget()

    def measure_report(self):
        from .report import StepReport

        with self.transaction():
            self.sync()
            m = self.metrics_of(self.current_version)
            v = self.current_version
            return StepReport(name=self.name, kind="measure", technique=v.technique, args=v.args,
                              before=None, after=m, result=v.result, version=self.pos,
                              n_versions=len(self.versions), history=self.table())

    # ------------------------------------------------------------------ undo / redo
    def undo(self, n: int = 1):
        return self._move(-n, "undo")

    def redo(self, n: int = 1):
        return self._move(n, "redo")

    def _move(self, delta: int, kind: str):
        from .report import StepReport

        if not isinstance(delta, int) or delta == 0:
            raise BadInput(f"{kind} needs a positive number of steps")
        with self.transaction():
            self.sync()        # an edit to the live model becomes a version before we move
            target = self.pos + delta
            if delta < 0 and self.pos == 0:
                raise BadInput(f"nothing to undo for {self.name}: it is at its first version")
            if delta > 0 and self.pos == len(self.versions) - 1:
                raise BadInput(f"nothing to redo for {self.name}: it is at its newest version")
            if target < 0 or target >= len(self.versions):
                avail = self.pos if delta < 0 else len(self.versions) - 1 - self.pos
                raise BadInput(f"cannot {kind} {abs(delta)} steps for {self.name}: only {avail} "
                               f"available")
            before = self.metrics_of(self.current_version)
            arrived = self.versions[target]
            live = self._handout(arrived)
            self.pos = target
            self.live = live
            self._live_fp = state_fingerprint(live)
            after = self.metrics_of(arrived)
            self.enforce_budget()
            return StepReport(name=self.name, kind=kind, technique=kind,
                              args=f"to version {self.pos} ({arrived.technique})", before=before,
                              after=after, result=arrived.result, version=self.pos,
                              n_versions=len(self.versions), history=self.table())

    # ------------------------------------------------------------------ table
    def table(self, *, sync: bool = True) -> pd.DataFrame:
        """Row 0 the baseline, then one row a version: technique, args, sizes, FLOPs, latency,
        accuracy, and deltas against the baseline. Unmeasured versions show None (measuring every
        version would load spilled ones; the current and baseline are always measured).
        ``sync=False``: the caller has just recorded the live model (no edit to look for)."""
        if sync:
            self.sync()
        if self.versions[0].where != "disk":
            self.metrics_of(self.versions[0])
        self.metrics_of(self.current_version)
        rows = []
        base = self.versions[0].metrics
        for i, v in enumerate(self.versions):
            m = v.metrics
            row = {"version": i, "technique": v.technique, "args": v.args}
            if m is not None:
                row.update({k: getattr(m, k) for k in
                            ("params", "nonzero_params", "dense_bytes", "packed_bytes", "flops",
                             "sparse_flops", "latency_ms", "accuracy", "perplexity")})
            if v.exports:                 # the latest %export of this version
                row.update(v.exports[-1])
            row["current"] = i == self.pos
            rows.append(row)
        df = pd.DataFrame(rows)
        for k in ("params", "nonzero_params", "dense_bytes", "packed_bytes", "flops",
                  "sparse_flops", "latency_ms", "accuracy", "perplexity"):
            if k not in df:
                df[k] = None
        if base is not None:
            df["size_ratio"] = [base.packed_bytes / p if p else None for p in df["packed_bytes"]]
            df["accuracy_delta"] = [(a - base.accuracy) if (a is not None and base.accuracy is not None
                                                            and a == a) else None
                                    for a in df["accuracy"]]
        cols = ["version", "technique", "args", "params", "nonzero_params", "dense_bytes",
                "packed_bytes", "flops", "sparse_flops", "latency_ms", "accuracy", "perplexity",
                "size_ratio", "accuracy_delta", "exported", "runtime_ms", "agreement", "current"]
        return df[[c for c in cols if c in df and (c != "perplexity" or df[c].notna().any())]]




def _label(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__
