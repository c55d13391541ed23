"""The records of a :class:`~nbcompress.history.History`: each version's own copy of the model, in
host memory or spilled to disk, within the host budget (``NBCOMPRESS_HOST_BUDGET``).

A version costs one host (or disk) copy of its tensors; the live model is the user's. Records go
to a temp dir, oldest first (the current one last), once they exceed ``host_budget_bytes``; a
record that does not fit even then is written straight to disk, never copied in host memory first.
Undo / redo read them back bit-identical. Spill files are our own, written and read in this
process (``torch.save`` of the whole module), never files a user hands us. A write that fails or
is interrupted (Ctrl-C) leaves no file and the version as it was.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
import torch
from torch import nn

from .core import BadInput, CompressionResult, StepConfig, _to_device
from .fingerprint import MEMO, _model_bytes, host_copy, rebuild_masked
from .metrics import Metrics

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
    exports: list = field(default_factory=list)   # %export of this version: ExportReport.as_row()
    # tensors the record holds as "its parent's with entries zeroed" (a pruned record): name ->
    # (empty placeholder in the record, the parent record's tensor, packed mask bits, op, shape)
    deltas: dict = field(default_factory=dict)
    delta_parent: "Version | None" = None   # the version whose record ``deltas`` read

    def __post_init__(self):
        if self.record is not None and not self.nbytes:
            self.nbytes = _model_bytes(self.record)


def _rebuilt(v: Version) -> dict:
    """``{id(placeholder): the tensor rebuilt}`` for a record's ``deltas`` (a deepcopy memo)."""
    out = {}
    for ph, r, bits, op, shape in v.deltas.values():
        t = rebuild_masked(r, bits, op, shape)
        out[id(ph)] = nn.Parameter(t, requires_grad=ph.requires_grad) \
            if isinstance(ph, nn.Parameter) else t
    return out


class Records:
    """The part of :class:`~nbcompress.history.History` that keeps its versions' records (see the
    module docstring). Expects ``versions``, ``pos``, ``name``, ``host_budget_bytes`` and
    ``_spill_dir`` on the instance."""

    def _host_total(self) -> int:
        return sum(v.nbytes for v in self.versions if v.where == "host" and v.record is not None)

    def _new_version(self, model: nn.Module, *, reuse: Version | None = None,
                     **fields) -> Version:
        """A version whose record is ``model``'s values now: a host copy when it fits in
        ``host_budget_bytes`` (older records are spilled first, oldest first, to make room), else
        written straight to the spill directory, so a model larger than the budget never has a
        second copy in host memory. ``reuse``: a version whose record (if in host memory) lends
        the new record the tensors ``model`` holds unchanged (see :func:`host_copy`); its bytes
        are still counted in both versions (the budget errs on the side of spilling early)."""
        nbytes = _model_bytes(model)
        if self._make_room(nbytes):
            lend = reuse.record if reuse is not None and reuse.where == "host" else None
            deltas: dict = {}
            record = host_copy(model, lend, deltas if lend is not None else None)
            # what the record holds: a rebuilt tensor costs its packed mask, not its values
            nbytes -= sum(ph.dtype.itemsize * math.prod(shape) - bits.nbytes
                          for ph, _, bits, _, shape in deltas.values())
            return Version(record=record, nbytes=nbytes, deltas=deltas,
                           delta_parent=reuse if deltas else None, **fields)
        v = Version(record=None, nbytes=nbytes, **fields)
        if self._write(v, model):
            return v
        v.record, v.where = host_copy(model), "host"    # cannot be written: kept in memory
        return v

    def _make_room(self, nbytes: int) -> bool:
        """Spill records (oldest first, the current last) until ``nbytes`` more fit in the host
        budget; whether they fit."""
        room = self.host_budget_bytes - self._host_total()
        if nbytes > room:
            for v in self._spill_order():
                if self._spill(v):
                    room += v.nbytes
                if nbytes <= room:
                    break
        return nbytes <= room

    def _spill_order(self) -> list[Version]:
        """Records in host memory, the order they go to disk: oldest first, the current last."""
        in_host = [v for i, v in enumerate(self.versions) if v.where == "host" and i != self.pos
                   and v.record is not None]
        if self.versions and self.current_version.where == "host" and \
                self.current_version.record is not None:
            in_host.append(self.current_version)
        return in_host

    def _room_for_step(self, model: nn.Module) -> None:
        """Before a step: its result (at most about the size of ``model``) must fit in the host
        budget or on the spill disk, otherwise a clear error now, before any work; the room is
        then made (older records spilled) before the technique runs, so a record that must go to
        disk goes now, not while the work copy exists too."""
        need = _model_bytes(model)
        if need > self.host_budget_bytes - self._host_total():
            self._check_disk(need)
        self._make_room(need)

    def _check_disk(self, need: int) -> None:
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
        # a record whose masks read this one's tensors goes to disk first: otherwise those
        # tensors would stay in memory, counted by no version, after this record leaves it
        for c in self.versions:
            if c.delta_parent is v and c.deltas:
                self._spill(c)
        if not self._write(v, self._record(v)):
            return False
        if getattr(self, "_init_view", (None,))[0] is v.record:
            self._init_view = None      # (views of it must not keep the spilled record in memory)
        v.record, v.deltas, v.delta_parent = None, {}, None
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
        """The version's record (read-only), read back into host memory if it was spilled; a
        record with tensors held as masks of its parent's (``deltas``) comes as a view whose
        other tensors are the record's own and those tensors rebuilt."""
        if v.where == "disk":
            # our own file from this process (see module docstring), hence weights_only=False
            v.record = torch.load(v.spill_path, weights_only=False, map_location="cpu")
            os.remove(v.spill_path)
            v.spill_path, v.where = None, "host"
        if not v.deltas:
            return v.record
        memo = {id(t): t for t in itertools.chain(v.record.parameters(), v.record.buffers())}
        memo.update(_rebuilt(v))
        return copy.deepcopy(v.record, memo)

    def _handout(self, v: Version) -> nn.Module:
        """A fresh copy of the version's record on its home device: what the name is bound to.
        A record on disk is read into a fresh model that is handed out as it is (the file stays
        the record: no second copy in host memory)."""
        if v.where == "disk":
            model = torch.load(v.spill_path, weights_only=False, map_location="cpu")
            if not v.home_device.startswith("cpu"):
                model = _to_device(model, v.home_device)
            return model
        memo: dict = _rebuilt(v)
        model = copy.deepcopy(self._record(v) if not v.deltas else v.record, memo)
        MEMO.carry(memo)
        if not v.home_device.startswith("cpu"):
            model = _to_device(model, v.home_device)
        return model

    def _forget(self, v: Version) -> None:
        if v.spill_path and os.path.exists(v.spill_path):
            os.remove(v.spill_path)
        v.record, v.spill_path, v.deltas, v.delta_parent = None, None, {}, None

    def close(self) -> None:
        if self._spill_dir:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    def __del__(self):  # pragma: no cover - best effort temp cleanup
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _release_freed_memory(keep: int = 0) -> None:
    """Give the memory a step freed (the technique's temporaries, the replaced live model) back to
    the system (glibc keeps freed blocks of up to 32 MB in the process otherwise), so the process
    holds about what the history really holds. A no-op where there is no glibc.

    ``keep``: bytes of freed memory worth keeping for the next step (its work copy of the model):
    memory handed back is faulted in again, page by page, when the next step copies the model (a
    fresh 100 MB costs ~4x a copy into memory the process already has), and memory kept is
    reused before any new page is taken, so keeping up to ``keep`` bytes free does not raise the
    peak. Nothing is handed back while the freed memory is within ``keep``."""
    global _TRIM, _FREE
    if _TRIM is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _TRIM = libc.malloc_trim
            _FREE = _free_bytes_reader(libc)
        except (OSError, AttributeError):
            _TRIM = False
    if not _TRIM:
        return
    if keep and _FREE is not None and _FREE() <= keep:
        return
    _TRIM(0)


def _free_bytes_reader(libc):
    """A function returning glibc's free bytes held in the heap (``mallinfo2().fordblks``), or
    None where ``mallinfo2`` is missing (glibc < 2.33)."""
    import ctypes

    class _Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                                                     "hblkhd", "usmblks", "fsmblks", "uordblks",
                                                     "fordblks", "keepcost")]
    try:
        fn = libc.mallinfo2
    except AttributeError:
        return None
    fn.restype = _Info
    return lambda: int(fn().fordblks)


_TRIM = None
_FREE = None


class _LazyInit(Mapping):
    """``History.init_state`` read on first use (version 0's record, when on disk)."""

    def __init__(self, history):
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
