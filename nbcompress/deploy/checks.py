"""After writing: load the file in its runtime, compare its outputs with the model's (example
input, and ``check=loader`` data), list the kernels ONNX Runtime chose, and time both."""
from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

from ..batches import eval_mode, forward_batch, logits_of, split_batch, to_device
from ..core import BadInput, model_device
from .runtime import OnnxRunner, Pt2Runner, flat_inputs

__all__ = ["compare", "exported_runner", "time_alternated"]


def exported_runner(report, lowered: nn.Module, optimized_copy: bool = False):
    """A callable ``run(x) -> list of output tensors`` for the written file."""
    if report.format == "onnx":
        ort = OnnxRunner(report.path, optimized_copy=optimized_copy)

        def run(x):
            return ort.run_named(flat_inputs(lowered, x))
        return run, ort
    if report.format == "pt2":
        p = Pt2Runner(report.path)

        def run(x):
            with torch.no_grad():
                return _leaves(forward_batch(p.module_, x))
        return run, p
    state = torch.load(report.path, weights_only=True, map_location="cpu")
    _same_state(state, lowered)         # read back equal: running ``lowered`` runs the file

    def run(x):
        with torch.no_grad():
            return _leaves(forward_batch(lowered, x))
    return run, lowered


def _same_state(state: dict, lowered: nn.Module) -> None:
    mine = {k: v for k, v in lowered.state_dict().items() if isinstance(v, torch.Tensor)}
    if set(state) != set(mine) or any(not torch.equal(state[k], mine[k]) for k in mine):
        raise BadInput("the written state_dict does not read back equal to the model's tensors")


def _leaves(out: Any) -> list[torch.Tensor]:
    """The output's tensors in the exporters' order (pytree flattening; a mapping torch's pytree
    does not know, like an unregistered ``ModelOutput``, by its values)."""
    leaves = [t for t in _pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not leaves and isinstance(out, Mapping):
        leaves = [t for t in _pytree.tree_leaves(list(out.values())) if isinstance(t, torch.Tensor)]
    return leaves


def _model_out(model: nn.Module, x: Any) -> list[torch.Tensor]:
    with torch.no_grad(), eval_mode(model):
        out = forward_batch(model, to_device(x, model_device(model)))
    return [t.detach().cpu() for t in _leaves(out)], out


def _matching(outs: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    return next((o for o in outs if tuple(o.shape) == tuple(like.shape)), None)


def compare(report, model: nn.Module, lowered: nn.Module, example: Any, cfg) -> None:
    """Fill ``report``'s comparison, kernels and latency fields."""
    run, holder = exported_runner(report, lowered, optimized_copy=True)
    if isinstance(holder, OnnxRunner):
        report.kernels = holder.kernels()
    if example is not None:
        first = _leaves(example)
        report.latency_batch = int(first[0].shape[0]) if first and first[0].dim() else 1
        ref, raw = _model_out(model, example)
        got = [t.float() for t in run(example)]
        n = min(len(ref), len(got))
        report.outputs = n
        diffs = [float((g.reshape(r.shape) - r.float()).abs().max()) if g.numel() == r.numel()
                 else float("inf") for g, r in zip(got[:n], ref[:n]) if r.is_floating_point()]
        scale = max([float(r.float().abs().max()) for r in ref[:n] if r.is_floating_point()
                     and r.numel()] or [1.0])
        report.max_abs_diff = max(diffs) if diffs else 0.0
        report.rel_diff = report.max_abs_diff / max(scale, 1e-12)
        try:
            logits = logits_of(raw).detach().cpu()
        except BadInput:
            logits = None
        mine = _matching(got, logits) if logits is not None else None
        if mine is not None and logits.dim() >= 2:
            a, b = logits.argmax(-1), mine.argmax(-1)
            report.example_top1 = (int((a == b).sum()), int(a.numel()))
    if cfg.check is not None:
        report.check = _check_loader(run, model, cfg.check, report)
    if cfg.latency and example is not None and report.format != "state_dict":
        _latency(report, holder, model, lowered, example)


def _check_loader(run, model: nn.Module, loader, report) -> dict:
    agree = n = correct = model_correct = labelled = 0
    for batch in loader:
        x, y = split_batch(batch)
        _, raw = _model_out(model, x)
        ref = logits_of(raw).detach().cpu()
        outs = _in_chunks(run, x, report)
        mine = _matching(outs, ref)
        if mine is None:
            raise BadInput(f"the exported file's outputs {[tuple(o.shape) for o in outs]} have "
                           f"no tensor shaped like the model's scores {tuple(ref.shape)}")
        a, b = ref.argmax(-1), mine.argmax(-1)
        agree += int((a == b).sum())
        n += a.numel()
        if isinstance(y, torch.Tensor) and tuple(y.shape) == tuple(a.shape) and \
                not y.is_floating_point():
            y = y.cpu()
            keep = y != -100
            labelled += int(keep.sum())
            correct += int(((b == y) & keep).sum())
            model_correct += int(((a == y) & keep).sum())
    if not n:
        raise BadInput("the check loader yielded no batches")
    return {"label": getattr(loader, "_nbc_label", "the check data"), "agree": agree, "n": n,
            "agreement": agree / n,
            "accuracy": correct / labelled if labelled else None,
            "model_accuracy": model_correct / labelled if labelled else None}


def _in_chunks(run, x: Any, report) -> list[torch.Tensor]:
    """Run a batch; a file whose batch size is fixed gets it in slices of that size (the last
    one padded with repeats of its first row, the padding's outputs dropped)."""
    if report.dynamic_batch or report.latency_batch is None:
        return [t.float() for t in run(x)]
    b = report.latency_batch
    tensors = list(x.values()) if isinstance(x, Mapping) else \
        list(x) if isinstance(x, (tuple, list)) else [x]
    total = tensors[0].shape[0]
    if total == b:
        return [t.float() for t in run(x)]
    pieces: list[list[torch.Tensor]] = []
    for start in range(0, total, b):
        def cut(v, s=start):
            if not isinstance(v, torch.Tensor):
                return v
            part = v[s:s + b]
            if part.shape[0] < b:
                part = torch.cat([part, part[:1].expand(b - part.shape[0], *part.shape[1:])])
            return part
        xs = ({k: cut(v) for k, v in x.items()} if isinstance(x, Mapping) else
              type(x)(cut(v) for v in x) if isinstance(x, (tuple, list)) else cut(x))
        keep = min(b, total - start)
        pieces.append([t.float()[:keep] for t in run(xs)])
    return [torch.cat(parts) for parts in zip(*pieces)]


def time_alternated(fns: list, runs: int = 30, warmup: int = 3, budget: float = 3.0) -> list:
    """Median milliseconds of each zero-argument callable, run in turn (alternated), one
    thread, after warm-up; at least 5 rounds, at most ``runs`` or ``budget`` seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            for f in fns:
                f()
        times = [[] for _ in fns]
        end = time.perf_counter() + budget
        for i in range(runs):
            for k, f in enumerate(fns):
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
            if i >= 4 and time.perf_counter() > end:
                break
    finally:
        torch.set_num_threads(threads)
    return [statistics.median(t) for t in times]


def _latency(report, holder, model: nn.Module, lowered: nn.Module, example: Any) -> None:
    if isinstance(holder, OnnxRunner):
        feeds = holder.feeds(flat_inputs(lowered, example))

        def exported():
            holder.session.run(None, feeds)
    else:
        mod = holder.module_ if isinstance(holder, Pt2Runner) else holder

        def exported():
            with torch.no_grad():
                forward_batch(mod, example)
    fns = [exported]
    on_cpu = model_device(model).type == "cpu"
    if on_cpu:
        def eager():
            with torch.inference_mode():
                forward_batch(model, example)
        fns.append(eager)
    with eval_mode(model):
        times = time_alternated(fns)
    report.latency_ms = times[0]
    report.eager_latency_ms = times[1] if on_cpu else None
