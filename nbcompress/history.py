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
tensor, never duplicated on the accelerator) and are spilled to a temp dir, oldest first, once they
exceed ``host_budget_bytes``; undo/redo read them back bit-identical. A version costs one host (or
disk) copy of its tensors; the live model is the user's. Spill files are our own, written and read
in this process (torch.save of the whole module), never files a user hands us.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from .core import (BadInput, CompressionResult, EvaluatorError, ExampleInputError, StepConfig,
                   StepContext, _to_device, compress, model_device, no_longer_runs,
                   resolve_device)
from .fingerprint import MEMO, _model_bytes, _same_state, host_copy, state_fingerprint
from .latency import check_latency_mode
from .options import magic_spelling
from .metrics import Metrics, check_evaluator, example_from, measure

DEFAULT_HOST_BUDGET = 8 << 30


def default_host_budget() -> int:
    """``NBCOMPRESS_HOST_BUDGET`` (bytes) as set now (a notebook may set it after importing us),
    else 8 GiB."""
    try:
        return int(os.environ.get("NBCOMPRESS_HOST_BUDGET", DEFAULT_HOST_BUDGET))
    except ValueError:
        raise BadInput(f"NBCOMPRESS_HOST_BUDGET must be a number of bytes, got "
                       f"{os.environ['NBCOMPRESS_HOST_BUDGET']!r}") from None

@dataclass
class Version:
    record: nn.Module | None        # the history's own copy, on the host (None while on disk)
    metrics: Metrics | None
    technique: str = "baseline"
    args: str = ""
    config: StepConfig | None = None
    result: CompressionResult | None = None
    created: float = field(default_factory=time.time)
    seconds: float = 0.0
    home_device: str = "cpu"        # where the live model is handed out
    where: str = "host"             # "host" | "disk"
    spill_path: str | None = None
    magic: str | None = None        # the magic line that made it, when made by a magic
    nbytes: int = 0                 # bytes of the record's tensors
    overhead: float = 0.0           # seconds the step spent besides the technique (measuring,
    #                                 recording, fingerprinting): its bookkeeping

    def __post_init__(self):
        if self.record is not None and not self.nbytes:
            self.nbytes = _model_bytes(self.record)


# how each remembered setting is named to the user, and how to change it
_SETTING_FLAGS = {"evaluator": ("--eval", "OBJ"), "example_input": ("--input-shape", "SHAPE"),
                  "latency_mode": ("--latency", "MODE"), "device": ("--device", "DEVICE")}


class History:
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
        return {k: v for k, v in self._record(self.versions[0]).state_dict().items()
                if isinstance(v, torch.Tensor)}

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
                                     home_device=str(model_device(self.live))), self.live)
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
            self._check_room(model)
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
                                     magic=magic)
            self._push(made, new)
            result.model = None     # the live model is self.live; the record is kept
            _release_freed_memory()
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

    # ------------------------------------------------------------------ memory budget
    def _host_total(self) -> int:
        return sum(v.nbytes for v in self.versions if v.where == "host" and v.record is not None)

    def _new_version(self, model: nn.Module, **fields) -> Version:
        """A version whose record is ``model``'s values now: a host copy when it fits in
        ``host_budget_bytes`` (older records are spilled first, oldest first, to make room), else
        written straight to the spill directory, so a model larger than the budget never has a
        second copy in host memory."""
        nbytes = _model_bytes(model)
        room = self.host_budget_bytes - self._host_total()
        if nbytes > room:
            for v in self._spill_order():
                if self._spill(v):
                    room += v.nbytes
                if nbytes <= room:
                    break
        if nbytes <= room:
            return Version(record=host_copy(model), nbytes=nbytes, **fields)
        v = Version(record=None, nbytes=nbytes, **fields)
        if self._write(v, model):
            return v
        v.record, v.where = host_copy(model), "host"    # cannot be written: kept in memory
        return v

    def _spill_order(self) -> list[Version]:
        """Records in host memory, the order they go to disk: oldest first, the current last."""
        in_host = [v for i, v in enumerate(self.versions) if v.where == "host" and i != self.pos
                   and v.record is not None]
        if self.versions and self.current_version.where == "host" and \
                self.current_version.record is not None:
            in_host.append(self.current_version)
        return in_host

    def _check_room(self, model: nn.Module) -> None:
        """Before a step: its result (at most about the size of ``model``) must fit in the host
        budget or on the spill disk; otherwise a clear error now, before any work."""
        need = _model_bytes(model)
        if need <= self.host_budget_bytes - self._host_total():
            return
        directory = self._spill_dir or tempfile.gettempdir()
        try:
            free_disk = shutil.disk_usage(directory).free
        except OSError:
            free_disk = 0
        if need + (1 << 26) <= free_disk:      # it, or the older records it displaces, on disk
            return
        from .report.format import format_bytes

        raise BadInput(f"no room to record the next version of {self.name}: it needs about "
                       f"{format_bytes(need)}, the history's host budget "
                       f"({format_bytes(self.host_budget_bytes)}; NBCOMPRESS_HOST_BUDGET or "
                       f"History(host_budget_bytes=...)) is full and {directory} has "
                       f"{format_bytes(free_disk)} free; free disk space (or set TMPDIR) or raise "
                       f"the budget. Nothing was changed")

    def enforce_budget(self) -> None:
        """Spill records to disk, oldest first (the current one last), while the records in host
        memory exceed ``host_budget_bytes``."""
        in_host = self._spill_order()
        total = sum(v.nbytes for v in in_host)
        for v in in_host:
            if total <= self.host_budget_bytes:
                break
            if self._spill(v):
                total -= v.nbytes

    def _spill(self, v: Version) -> bool:
        if v.where == "disk" or v.record is None:
            return False
        if not self._write(v, v.record):
            return False
        v.record = None
        return True

    def _write(self, v: Version, model: nn.Module) -> bool:
        """Write ``model`` as ``v``'s record on disk. A failure (an unpicklable model, a full
        disk) or Ctrl-C leaves no file and ``v`` as it was; Ctrl-C is then raised again."""
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="nbcompress-history-")
        path = os.path.join(self._spill_dir, f"v{id(v)}.pt")
        try:
            torch.save(model, path)
        except BaseException as e:  # noqa: BLE001 - an unwritable model simply stays in memory
            if os.path.exists(path):
                os.remove(path)
            if not isinstance(e, Exception):
                raise
            return False
        v.spill_path, v.where = path, "disk"
        return True

    def _record(self, v: Version) -> nn.Module:
        """The version's record, read back into host memory if it was spilled."""
        if v.where == "disk":
            # our own file from this process (see module docstring), hence weights_only=False
            v.record = torch.load(v.spill_path, weights_only=False, map_location="cpu")
            os.remove(v.spill_path)
            v.spill_path, v.where = None, "host"
        return v.record

    def _handout(self, v: Version) -> nn.Module:
        """A fresh copy of the version's record on its home device: what the name is bound to.
        A record on disk is read into a fresh model that is handed out as it is (the file stays
        the record: no second copy in host memory)."""
        if v.where == "disk":
            model = torch.load(v.spill_path, weights_only=False, map_location="cpu")
            if not v.home_device.startswith("cpu"):
                model = _to_device(model, v.home_device)
            return model
        memo: dict = {}
        model = copy.deepcopy(self._record(v), memo)
        MEMO.carry(memo)
        if not v.home_device.startswith("cpu"):
            model = _to_device(model, v.home_device)
        return model

    def _forget(self, v: Version) -> None:
        if v.spill_path and os.path.exists(v.spill_path):
            os.remove(v.spill_path)
        v.record, v.spill_path = None, None

    def close(self) -> None:
        if self._spill_dir:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    def __del__(self):  # pragma: no cover - best effort temp cleanup
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

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
                "size_ratio", "accuracy_delta", "current"]
        return df[[c for c in cols if c in df and (c != "perplexity" or df[c].notna().any())]]




def _release_freed_memory() -> None:
    """Give the memory a step freed (the technique's temporaries, the replaced live model) back to
    the system (glibc keeps freed blocks of up to 32 MB in the process otherwise), so the next step
    starts from what the history really holds. A no-op where there is no glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes
            import ctypes.util

            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class _LazyInit(Mapping):
    """``History.init_state`` read on first use (version 0's record, when on disk)."""

    def __init__(self, history: History):
        self._h, self._state = history, None

    def _get(self) -> dict:
        if self._state is None:
            self._state = self._h.init_state or {}
        return self._state

    def __getitem__(self, k):
        return self._get()[k]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _label(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__
