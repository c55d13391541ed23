"""Training on several processes: the one training loop (:func:`nbcompress.train.fit`) run by N
forked workers, data parallel, handed back to the kernel as if it had run there.

What runs where:

- **Launch.** ``launcher="none"`` forks the workers with ``torch.multiprocessing.start_processes``;
  ``launcher="accelerate"`` with Hugging Face Accelerate's ``notebook_launcher`` (torchelastic's
  agent under it). Both fork, so the model, the loaders and the technique's loss function reach
  the workers as they are in the kernel (nothing is pickled). The workers join one process group:
  gloo on the CPU (one thread each), NCCL with one process per GPU.
- **Gradients.** Where the loss is the model's own forward (fine-tuning, QAT) the model is
  wrapped in PyTorch's ``DistributedDataParallel``. A technique's own loss function (distillation
  with adapters outside the student, early exits' heads) may call submodules or train parameters
  the model does not hold, which DDP's reducer never sees; there the gradients of exactly the
  parameters the optimizer steps are averaged with one ``all_reduce`` of a flat bucket per step,
  what DDP's reducer does without its overlap.
- **Data.** Each worker reads its own shard of the user's dataset through a
  ``DistributedSampler`` (shuffled when the loader shuffles, reshuffled every epoch), with the
  user's batch size *per process*: a step sees ``processes x batch_size`` samples.
- **Result.** Rank 0 writes the trained tensors (every parameter and buffer of the model, the
  optimized parameters, and what the caller asks to ``carry``) to a private folder; the kernel
  copies them into its own tensors only after every worker finished. A worker's exception, or a
  Ctrl-C in the kernel, stops all workers (no process is left behind) and the kernel's tensors
  are untouched.

:func:`scope` is how a step asks for it without the technique knowing: ``compress`` opens the
scope with the step's ``processes`` / ``launcher`` and every ``fit`` inside picks it up.
"""
from __future__ import annotations

import contextlib
import contextvars
import gc
import math
import os
import pickle
import shutil
import signal
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler,
                              SequentialSampler)
from torch.utils.data.distributed import DistributedSampler

from .errors import BadInput

__all__ = ["LAUNCHERS", "scope", "current", "check_request", "shard_loader", "launch",
           "Request", "describe_run"]

LAUNCHERS = ("none", "accelerate")


@dataclass
class Request:
    """What a step asked for: ``processes`` workers started by ``launcher``; ``runs`` collects
    one line per training run that used them (the step's notes say how it ran)."""
    processes: int = 1
    launcher: str = "none"
    runs: list = field(default_factory=list)


_SCOPE: contextvars.ContextVar[Request | None] = contextvars.ContextVar("nbcompress_processes",
                                                                         default=None)


@contextlib.contextmanager
def scope(processes: int = 1, launcher: str = "none"):
    """Every :func:`nbcompress.train.fit` inside trains on ``processes`` workers (unless it is
    told otherwise); yields the :class:`Request`, whose ``runs`` say what ran."""
    req = Request(int(processes), launcher)
    token = _SCOPE.set(req)
    try:
        yield req
    finally:
        _SCOPE.reset(token)


def current() -> Request | None:
    return _SCOPE.get()


def check_request(processes: Any, launcher: Any, device: torch.device | None = None) -> None:
    """One line for a request that cannot run here, before any work."""
    from .options import is_int

    if not is_int(processes) or processes < 1:
        raise BadInput(f"processes must be a whole number >= 1, got {processes!r}")
    if launcher not in LAUNCHERS:
        raise BadInput(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if processes == 1 and launcher == "none":
        return
    if launcher == "accelerate":
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise BadInput("launcher='accelerate' needs Hugging Face Accelerate: pip install "
                           "accelerate (or use launcher='none', torch.multiprocessing)")
    if device is not None and device.type == "cuda":
        n = torch.cuda.device_count()
        if processes > n:
            raise BadInput(f"{processes} processes asked for, but this machine has {n} CUDA "
                           f"device{'s' if n != 1 else ''}: one process per GPU")
    elif device is not None and device.type != "cpu":
        raise BadInput(f"several processes run on the CPU or on CUDA GPUs, not on {device.type}")
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if processes > (cores or 1):
            raise BadInput(f"{processes} processes asked for, but this machine has {cores} CPU "
                           f"core{'s' if cores != 1 else ''} (each process trains on one)")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise BadInput("CUDA is already initialised in this kernel (a step, a measurement or "
                       "your code used the GPU), and workers forked from it cannot use CUDA: "
                       "drop processes to train on one GPU here, train on the CPU's cores with "
                       "device='cpu', or run the training from a script with `accelerate launch`")


def _batching(loader: DataLoader):
    """(sampler, batch size, drop_last) of ``loader``: its own, or those of a plain
    ``BatchSampler`` it was given (a loader built over another loader's batch sampler)."""
    if loader.batch_size is not None:
        return loader.sampler, loader.batch_size, loader.drop_last
    bs = loader.batch_sampler
    if type(bs) is BatchSampler:
        return bs.sampler, bs.batch_size, bs.drop_last
    return None, None, None


def shard_loader(loader: DataLoader, rank: int, world: int, seed: int = 0) -> DataLoader:
    """This worker's share of ``loader``: the same dataset, batch size, collate function and
    ``drop_last``, read through a ``DistributedSampler`` (shuffled when ``loader`` shuffles).
    A loader that cannot be split is refused in one line."""
    why = unshardable(loader)
    if why:
        raise BadInput(why)
    sampler, batch_size, drop_last = _batching(loader)
    shuffle = isinstance(sampler, RandomSampler)
    part = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                              seed=int(seed), drop_last=False)
    extra = {}
    if loader.num_workers > 0:      # the user's worker settings, as they gave them
        extra = dict(worker_init_fn=loader.worker_init_fn, prefetch_factor=loader.prefetch_factor,
                     persistent_workers=loader.persistent_workers, timeout=loader.timeout)
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=part,
                      collate_fn=loader.collate_fn, drop_last=drop_last,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, **extra)


def batch_size_of(loader: DataLoader) -> int | None:
    return _batching(loader)[1]


def unshardable(loader: DataLoader) -> str | None:
    """Why ``loader`` cannot be split between processes, or None."""
    if isinstance(loader.dataset, IterableDataset):
        return ("the training loader reads an IterableDataset, which cannot be split between "
                "processes by index (it has no fixed length and order): give a map-style Dataset "
                "(one with __len__ and __getitem__), or train on one process")
    sampler, batch_size, _ = _batching(loader)
    if batch_size is None:
        return (f"the training loader has its own batch_sampler "
                f"({type(loader.batch_sampler).__name__}), which cannot be split between "
                f"processes: give batch_size= (a DistributedSampler then shards the dataset), or "
                f"train on one process")
    if not isinstance(sampler, (RandomSampler, SequentialSampler)):
        return (f"the training loader draws samples with a {type(sampler).__name__}, "
                f"which cannot be split between processes (only shuffled or in-order loaders "
                f"are): train on one process")
    return None


def describe_run(processes: int, launcher: str, device: torch.device, batch_size: int | None,
                 ddp: bool) -> str:
    backend = "NCCL" if device.type == "cuda" else "gloo"
    how = "DistributedDataParallel" if ddp else "gradients averaged by all_reduce"
    by = "Accelerate's notebook_launcher" if launcher == "accelerate" else "torch.multiprocessing"
    per = (f"{batch_size} samples a batch in each, {batch_size * processes} a step in all"
           + (f" ({processes}x one process's: an epoch has 1/{processes} of the steps; raise "
              f"the learning rate or the epochs to match)" if processes > 1 else "")) \
        if batch_size else "the loader's batches split between them"
    where = "one per GPU" if device.type == "cuda" else "one thread each"
    return (f"trained on {processes} process{'es' if processes != 1 else ''} ({where}, {how} "
            f"over {backend}, started by {by}): {per}")


# ------------------------------------------------------------------------------------ launch

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Failure(Exception):
    pass


def _worker_main(rank: int, work: Callable, world: int, folder: str, device_type: str,
                 port: int, env: bool, kernel_pid: int) -> None:
    """What each forked worker runs: join the group, run ``work(rank, world)``, rank 0 saves the
    payload; an exception is written down for the kernel to raise.

    Accelerate runs a single process in the kernel itself (no fork): then an exception is raised
    as it is, and the kernel's signal handling is left alone."""
    import torch.distributed as dist

    inside = os.getpid() == kernel_pid
    if not inside:
        # Objects the kernel still held as garbage were copied by the fork; collecting them here
        # can run a destructor that waits for a thread only the kernel has (a leftover c10d
        # TCPStore joins its libuv daemon thread): the worker would hang in the middle of a
        # batch. The kernel collected before forking (launch); what remains is left alone.
        gc.freeze()
    if env and not inside:  # Accelerate / torchelastic set RANK, WORLD_SIZE, MASTER_ADDR/PORT
        rank = int(os.environ.get("RANK", rank))
    if inside:
        env = False
    else:   # the kernel stops its workers with SIGTERM (torchelastic's agent with SIGINT):
        # either ends a worker at once, whatever handler the kernel had (IPython's, torchelastic's)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threads = torch.get_num_threads()
    try:
        if device_type == "cpu":
            if not inside:      # one core each; one process in the kernel keeps the kernel's
                torch.set_num_threads(1)
            backend = "gloo"
        else:
            torch.cuda.set_device(rank)
            backend = "nccl"
        init = "env://" if env else f"tcp://127.0.0.1:{port}"
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
        try:
            payload = work(rank, world)
            if rank == 0:
                tmp = os.path.join(folder, "result.tmp")
                torch.save(payload, tmp)
                os.replace(tmp, os.path.join(folder, "result.pt"))
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - told to the kernel, which raises it
        if inside:
            raise
        # written whole, then renamed: a worker stopped while writing leaves no half a file
        tmp = os.path.join(folder, f"error-{rank}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"type": type(e).__name__, "bad_input": isinstance(e, BadInput),
                         "message": str(e), "traceback": traceback.format_exc()}, f)
        os.replace(tmp, os.path.join(folder, f"error-{rank}.pkl"))
        os._exit(1)     # no atexit / finalizers of the kernel's copied state
    finally:
        if inside:
            torch.set_num_threads(threads)


def _kill(procs) -> None:
    """Stop every worker now: SIGTERM, then SIGKILL for any still there after 3 s."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 3.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def launch(work: Callable[[int, int], Any], processes: int, launcher: str,
           device: torch.device) -> Any:
    """Run ``work(rank, world)`` on ``processes`` forked workers; return rank 0's result.

    A worker's :class:`BadInput` is raised here as one; any other worker exception as a
    ``RuntimeError`` carrying its message (the worker's traceback is its ``__cause__`` text).
    ``KeyboardInterrupt`` (Ctrl-C, the kernel's interrupt) stops every worker before it
    propagates."""
    import multiprocessing

    folder = tempfile.mkdtemp(prefix="nbcompress-ddp-")
    before = set(multiprocessing.active_children())

    def stop_workers():
        _kill([p for p in multiprocessing.active_children() if p not in before])

    gc.collect()        # garbage with native threads (a c10d store) dies here, not in a worker
    try:
        port = _free_port()
        try:
            if launcher == "accelerate":
                _launch_accelerate(work, processes, folder, device.type, port)
            else:
                _launch_torch(work, processes, folder, device.type, port)
        except BadInput:
            raise                   # (the finally stops the workers)
        except Exception as e:  # noqa: BLE001 - a worker failed: its own error file says why
            stop_workers()          # before reading the files: no worker writes any more
            _raise_worker_error(folder)
            raise RuntimeError(f"the training workers failed: {e}") from None
        _raise_worker_error(folder)
        path = os.path.join(folder, "result.pt")
        if not os.path.exists(path):
            raise RuntimeError("the training workers ended without a result")
        return torch.load(path, weights_only=False)
    finally:                        # also on KeyboardInterrupt: no worker outlives the call
        stop_workers()
        shutil.rmtree(folder, ignore_errors=True)


def _error_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.startswith("error-") and f.endswith(".pkl"))


def _raise_worker_error(folder: str) -> None:
    errors = _error_files(folder)
    if not errors:
        return
    infos = []
    for name in errors:
        with open(os.path.join(folder, name), "rb") as f:
            infos.append(pickle.load(f))
    # the first real error: a worker that only saw its peer vanish says less than the peer
    first = next((i for i in infos if i["bad_input"]), None) or infos[0]
    if first["bad_input"]:
        raise BadInput(first["message"])
    err = RuntimeError(f"a training worker failed: {first['type']}: {first['message']}")
    err.__cause__ = _Failure(first["traceback"])
    raise err


def _launch_torch(work, processes, folder, device_type, port) -> None:
    from torch.multiprocessing import start_processes

    ctx = start_processes(_worker_main, args=(work, processes, folder, device_type, port, False,
                                              os.getpid()),
                          nprocs=processes, join=False, start_method="fork")
    while not ctx.join(timeout=0.2):    # a worker exiting non-zero raises here (launch reads
        pass                            # its error file); Ctrl-C: launch stops them all


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                 if hasattr(signal, n))


def _launch_accelerate(work, processes, folder, device_type, port) -> None:
    import logging

    from accelerate import notebook_launcher

    # torchelastic logs each worker's start and failure at WARNING: the kernel's error says it
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # torchelastic's agent installs its own SIGINT / SIGTERM handlers in this process (raising
    # its SignalException) and leaves them: the kernel gets its own back after, and a Ctrl-C
    # during the run is a KeyboardInterrupt, as everywhere else
    handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            notebook_launcher(_worker_main, args=(0, work, processes, folder, device_type, port,
                                                  True, os.getpid()),        # ("Launching ...")
                              num_processes=processes, master_addr="127.0.0.1", use_port=str(port))
    except Exception as e:   # noqa: BLE001 - a worker's failure is launch's to read
        if getattr(e, "sigval", None) == signal.SIGINT:
            raise KeyboardInterrupt from None
        if isinstance(e, ValueError) and not _error_files(folder):
            # refused before any worker ran, e.g. an Accelerator already made in this kernel
            raise BadInput(f"Accelerate's notebook_launcher refused to start the workers: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        raise
    finally:
        quiet.setLevel(level)
        for sig, h in handlers.items():
            if h is not None:
                signal.signal(sig, h)


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Average ``.grad`` of ``params`` over the workers: one ``all_reduce`` of a flat bucket (a
    parameter with no gradient on some worker contributes zeros there)."""
    import torch.distributed as dist

    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        new = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
        if p.grad is None:
            p.grad = new
        else:
            p.grad.copy_(new)


def steps_hint(loader: DataLoader, world: int) -> int:
    """Steps per epoch of each worker's shard of ``loader``."""
    _, batch, drop_last = _batching(loader)
    per = math.ceil(len(loader.dataset) / world)
    return per // batch if drop_last else math.ceil(per / batch)


@contextlib.contextmanager
def progress_bar(steps: torch.Tensor, total: int | None, desc: str, show: bool):
    """The kernel's progress bar of a run on workers: a thread reads rank 0's step count from
    ``steps`` (shared memory) while the workers train; workers draw no bar of their own (a
    forked worker cannot send to the notebook's widgets)."""
    if not show:
        yield
        return
    import threading

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)
    stop = threading.Event()

    def follow():
        while not stop.wait(0.25):
            bar.n = int(steps[0])
            bar.refresh()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        bar.close()
