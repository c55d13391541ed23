"""Per-name history of model versions: apply-as-transaction, undo, redo, memory budget.

A :class:`History` holds a list of :class:`Version` (model, metrics, technique, args, config,
result, time) and a position. ``apply(config)`` runs a technique on a private copy (see
:func:`nbcompress.core.compress`), measures the result, and only then appends it: an exception or
Ctrl-C in the middle appends nothing, and the model the name was bound to is the same object with
the same weights. A step after an undo drops the redo branch.

Memory budget: versions other than the current one are moved to CPU once the accelerator-resident
ones exceed ``device_budget_bytes``, and spilled to a temp dir once CPU-resident ones exceed
``host_budget_bytes``; undo/redo bring a version back to the device it came from, bit-identical.
Spill files are our own, written and read in this process (torch.save of the whole module), never
files a user hands us.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from .core import BadInput, CompressionResult, StepConfig, StepContext, compress, model_device, resolve_device
from .metrics import Metrics, check_evaluator, check_latency_mode, example_from, measure

DEFAULT_DEVICE_BUDGET = int(os.environ.get("NBCOMPRESS_DEVICE_BUDGET", 2 << 30))
DEFAULT_HOST_BUDGET = int(os.environ.get("NBCOMPRESS_HOST_BUDGET", 8 << 30))


def state_fingerprint(model: nn.Module) -> tuple:
    """Cheap identity of the model's current weights: each tensor's storage and in-place version
    counter (bumped by every optimizer step or in-place edit)."""
    return tuple((k, id(v), v._version) for k, v in model.state_dict(keep_vars=True).items()
                 if isinstance(v, torch.Tensor))


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()
               if isinstance(t, torch.Tensor))


@dataclass
class Version:
    model: nn.Module | None
    metrics: Metrics | None
    technique: str = "baseline"
    args: str = ""
    config: StepConfig | None = None
    result: CompressionResult | None = None
    created: float = field(default_factory=time.time)
    seconds: float = 0.0
    home_device: str = "cpu"        # where the model lives when it is in use
    where: str = "live"             # "live" (on home device) | "cpu" | "disk"
    spill_path: str | None = None
    fingerprint: tuple | None = None
    magic: str | None = None        # the magic line that made it, when made by a magic

    def nbytes(self) -> int:
        return _model_bytes(self.model) if self.model is not None else 0


class History:
    """The versions of one model. Usable from Python without IPython::

        h = History(model, evaluator=test_loader)
        report = h.apply(PruneConfig(amount=0.5))
        h.current            # the pruned model
        h.undo()             # the original object again
    """

    def __init__(self, model: nn.Module, *, name: str = "model", evaluator: Any = None,
                 example_input: Any = None, device: str | None = None,
                 device_budget_bytes: int = DEFAULT_DEVICE_BUDGET,
                 host_budget_bytes: int = DEFAULT_HOST_BUDGET,
                 measure_latency: bool = True, remember_init: bool = True,
                 latency_mode: str = "eager"):
        if not isinstance(model, nn.Module):
            raise BadInput(f"{name} is a {type(model).__name__}, not a torch.nn.Module")
        check_evaluator(evaluator)
        self.name = name
        self.evaluator = evaluator
        self.example_input = example_input
        self.device = device
        self.device_budget_bytes = device_budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.measure_latency = measure_latency
        self.latency_mode = check_latency_mode(latency_mode)
        self.versions: list[Version] = [Version(model=model, metrics=None,
                                                home_device=str(model_device(model)))]
        self.pos = 0
        self.init_state: dict | None = None
        if remember_init:
            self.remember_init(model)
        self._spill_dir: str | None = None

    # ------------------------------------------------------------------ configuration
    def configure(self, *, evaluator: Any = None, example_input: Any = None,
                  device: str | None = None, latency_mode: str | None = None) -> None:
        if evaluator is not None and evaluator is not self.evaluator:
            check_evaluator(evaluator)
            self.evaluator = evaluator
            for v in self.versions:   # accuracy now means something else: re-measure lazily
                v.metrics = None
        if example_input is not None and example_input is not self.example_input:
            self.example_input = example_input
            for v in self.versions:
                v.metrics = None
        if latency_mode is not None and latency_mode != self.latency_mode:
            self.latency_mode = check_latency_mode(latency_mode)
            for v in self.versions:   # latency means something else: re-measure lazily
                v.metrics = None
        if device is not None:
            resolve_device(device)
            self.device = device

    def remember_init(self, model: nn.Module | None = None) -> None:
        """Record the model's current weights as its 'initial' weights (lottery-ticket rewind)."""
        model = model if model is not None else self.current
        self.init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                           if isinstance(v, torch.Tensor)}

    def _example(self):
        if self.example_input is not None:
            return self.example_input
        return example_from(self.evaluator)

    # ------------------------------------------------------------------ access
    @property
    def current(self) -> nn.Module:
        return self._materialize(self.versions[self.pos])

    def version_model(self, k: int) -> nn.Module:
        """The model of version ``k`` (0 = as registered), brought back from CPU or disk if the
        memory budget moved it there. The object the history keeps: copy it before changing it."""
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(self.versions):
            raise BadInput(f"no version {k!r}: this history has versions 0..{len(self.versions) - 1}")
        return self._materialize(self.versions[k])

    @property
    def current_version(self) -> Version:
        return self.versions[self.pos]

    def __len__(self) -> int:
        return len(self.versions)

    def observe(self, model: nn.Module) -> None:
        """The name is bound to ``model``. If that is not the current version (the user assigned a
        new model to the name), record it as a new version so undo can still go back."""
        if model is self.versions[self.pos].model:
            return
        if not isinstance(model, nn.Module):
            raise BadInput(f"{self.name} is a {type(model).__name__}, not a torch.nn.Module")
        self._push(Version(model=model, metrics=None, technique="assigned",
                           args="(rebound outside nbcompress)",
                           home_device=str(model_device(model))))

    def metrics_of(self, version: Version) -> Metrics:
        """The version's metrics, measured now if never measured or its weights changed since."""
        model = self._materialize(version)
        fp = state_fingerprint(model)
        if version.metrics is None or version.fingerprint != fp:
            version.metrics = measure(model, example_input=self._example(),
                                      evaluator=self.evaluator, latency=self.measure_latency,
                                 latency_mode=self.latency_mode)
            version.fingerprint = fp
        return version.metrics

    # ------------------------------------------------------------------ steps
    def apply(self, config: StepConfig, *, progress: bool | None = None, magic: str | None = None,
              device: str | None = None):
        """Run ``config`` on the current model as a transaction; returns a StepReport."""
        from .report import StepReport

        model = self.current
        before = self.metrics_of(self.current_version)
        if progress is not None:
            config.progress = progress
        dev = resolve_device(device or config.device or self.device)
        ctx = StepContext(device=dev, origin_device=model_device(model), evaluator=self.evaluator,
                          example_input=self._example(), progress=config.progress,
                          init_state=self.init_state, history=self)
        t0 = time.perf_counter()
        result = compress(model, config, ctx=ctx)
        seconds = time.perf_counter() - t0
        if not result.changes_model:
            return StepReport(name=self.name, kind="step", technique=config.technique,
                              args=config.describe(), before=before, after=before, result=result,
                              version=self.pos, n_versions=len(self.versions),
                              history=None)
        new = result.model
        after = measure(new, example_input=self._example(), evaluator=self.evaluator,
                        latency=self.measure_latency,
                                 latency_mode=self.latency_mode)
        self._push(Version(model=new, metrics=after, technique=config.technique,
                           args=config.describe(), config=config, result=result,
                           seconds=seconds, home_device=str(model_device(new)),
                           fingerprint=state_fingerprint(new), magic=magic))
        beside = {label: measure(m, example_input=self._example(), evaluator=self.evaluator,
                                 latency=self.measure_latency,
                                 latency_mode=self.latency_mode)
                  for label, m in result.compare.items()}
        result.compare = {}   # do not keep other models alive in the history
        return StepReport(name=self.name, kind="step", technique=config.technique,
                          args=config.describe(), before=before, after=after, result=result,
                          version=self.pos, n_versions=len(self.versions), history=self.table(),
                          extra_models=beside)

    def _push(self, version: Version) -> None:
        dropped = self.versions[self.pos + 1:]
        del self.versions[self.pos + 1:]
        for v in dropped:
            self._forget(v)
        self.versions.append(version)
        self.pos = len(self.versions) - 1
        self.enforce_budget()

    def measure_report(self):
        from .report import StepReport

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
        target = self.pos + delta
        if delta < 0 and self.pos == 0:
            raise BadInput(f"nothing to undo for {self.name}: it is at its first version")
        if delta > 0 and self.pos == len(self.versions) - 1:
            raise BadInput(f"nothing to redo for {self.name}: it is at its newest version")
        if target < 0 or target >= len(self.versions):
            avail = self.pos if delta < 0 else len(self.versions) - 1 - self.pos
            raise BadInput(f"cannot {kind} {abs(delta)} steps for {self.name}: only {avail} available")
        leaving = self.versions[self.pos]
        before = self.metrics_of(leaving)
        self.pos = target
        arrived = self.versions[self.pos]
        self._materialize(arrived)
        after = self.metrics_of(arrived)
        self.enforce_budget()
        return StepReport(name=self.name, kind=kind, technique=kind,
                          args=f"to version {self.pos} ({arrived.technique})", before=before,
                          after=after, result=arrived.result, version=self.pos,
                          n_versions=len(self.versions), history=self.table())

    # ------------------------------------------------------------------ memory budget
    def enforce_budget(self) -> None:
        """Move non-current versions off the accelerator, then to disk, oldest first."""
        others = [v for i, v in enumerate(self.versions) if i != self.pos and v.model is not None]
        on_dev = [v for v in others if v.where == "live" and not v.home_device.startswith("cpu")]
        total = sum(v.nbytes() for v in on_dev)
        for v in on_dev:
            if total <= self.device_budget_bytes:
                break
            total -= v.nbytes()
            v.model = v.model.to("cpu")
            v.where = "cpu"
        in_host = [v for v in others if v.where == "cpu" or
                   (v.where == "live" and v.home_device.startswith("cpu"))]
        total = sum(v.nbytes() for v in in_host)
        for v in in_host:
            if total <= self.host_budget_bytes:
                break
            nbytes = v.nbytes()
            if self._spill(v):
                total -= nbytes

    def _spill(self, v: Version) -> bool:
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="nbcompress-history-")
        path = os.path.join(self._spill_dir, f"v{id(v)}.pt")
        try:
            torch.save(v.model.to("cpu") if v.where == "live" else v.model, path)
        except Exception:  # noqa: BLE001 - an unpicklable model simply stays in memory
            return False
        v.spill_path, v.model, v.where = path, None, "disk"
        return True

    def _materialize(self, v: Version) -> nn.Module:
        if v.where == "disk":
            # our own file from this process (see module docstring), hence weights_only=False
            v.model = torch.load(v.spill_path, weights_only=False, map_location="cpu")
            os.remove(v.spill_path)
            v.spill_path, v.where = None, "cpu"
            if v.metrics is not None:
                v.fingerprint = state_fingerprint(v.model)
        if v.where == "cpu":
            v.model = v.model.to(v.home_device)
            v.where = "live"
            if v.metrics is not None:
                v.fingerprint = state_fingerprint(v.model)
        return v.model

    def _forget(self, v: Version) -> None:
        if v.spill_path and os.path.exists(v.spill_path):
            os.remove(v.spill_path)
        v.model = None

    def close(self) -> None:
        if self._spill_dir:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    def __del__(self):  # pragma: no cover - best effort temp cleanup
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ table
    def table(self) -> pd.DataFrame:
        """Row 0 the baseline, then one row a version: technique, args, sizes, FLOPs, latency,
        accuracy, and deltas against the baseline. Unmeasured versions show None (measuring every
        version would load spilled ones; the current and baseline are always measured)."""
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
                             "sparse_flops", "latency_ms", "accuracy")})
            row["current"] = i == self.pos
            rows.append(row)
        df = pd.DataFrame(rows)
        for k in ("params", "nonzero_params", "dense_bytes", "packed_bytes", "flops",
                  "sparse_flops", "latency_ms", "accuracy"):
            if k not in df:
                df[k] = None
        if base is not None:
            df["size_ratio"] = [base.packed_bytes / p if p else None for p in df["packed_bytes"]]
            df["accuracy_delta"] = [(a - base.accuracy) if (a is not None and base.accuracy is not None
                                                            and a == a) else None
                                    for a in df["accuracy"]]
        cols = ["version", "technique", "args", "params", "nonzero_params", "dense_bytes",
                "packed_bytes", "flops", "sparse_flops", "latency_ms", "accuracy", "size_ratio",
                "accuracy_delta", "current"]
        return df[[c for c in cols if c in df]]


class Workspace:
    """Histories by variable name (what the magics keep per IPython shell)."""

    def __init__(self):
        self.histories: dict[str, History] = {}

    def get(self, name: str) -> History | None:
        return self.histories.get(name)

    def ensure(self, name: str, model: nn.Module, **settings) -> History:
        h = self.histories.get(name)
        if h is None:
            h = History(model, name=name, **settings)
            self.histories[name] = h
        else:
            h.observe(model)
        return h

    def clear(self) -> None:
        for h in self.histories.values():
            h.close()
        self.histories.clear()
