"""Early exits: dynamic computation with small classifier heads inside a network.

A head (a small average-pool + linear classifier) is attached after some of the network's blocks.
At inference each sample leaves at the first exit whose top softmax probability reaches the
threshold; only the samples that stay go on through the rest of the network, so an easy input
costs a few layers and a hard one the whole network. The heads are trained on the network's own
final output (distillation) with the backbone frozen, or jointly with the backbone.

What structure is needed: the network must be a chain of blocks. That is an ``nn.Sequential``, or
any module whose ``forward`` runs its direct sub-modules once each, in the order they were
registered, each taking the previous one's output (``LeNet-300-100``, ``LeNet-5`` and
``SmallResNet`` in :mod:`nbcompress.data` are such chains). An exit named inside a block
(``features.3``) opens that block up, which again must be such a chain. Whether a model is a chain
is checked on a real batch: running the blocks one after another must reproduce the model's
output; a forward that adds a skip connection, calls functions such as ``F.relu`` or
``x.view`` between blocks, or reuses a module is refused with a message naming the module.

FLOPs are honest: an :class:`EarlyExitModel` tells :func:`nbcompress.measure` (through
``nbc_flops``) the FLOPs actually spent on the evaluation data, counted by
``torch.utils.flop_counter`` on the real batched early-exit run (heads and the work of samples
that go on included), averaged per sample and scaled to the example input's batch size, the same
basis as the dense count of the network before.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from ...core import BadInput, CompressionResult, StepConfig, StepContext, compress, register_technique

__all__ = ["EarlyExitConfig", "EarlyExitModel", "early_exit", "threshold_sweep",
           "list_blocks", "sequential_cnn", "demo_config", "DEFAULT_THRESHOLD", "SWEEP_THRESHOLDS"]

DEFAULT_THRESHOLD = 0.95
SWEEP_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
CACHE_BYTES = 1 << 30      # largest cache of pooled head inputs kept for frozen-backbone training
_CHECK_SAMPLES = 8          # samples of the first batch the chain check runs on


# ------------------------------------------------------------------------------------ the model

class EarlyExitModel(nn.Module):
    """A chain of blocks (``backbone``, an ``nn.Sequential``) with classifier ``heads`` after some
    of them.

    - ``exit_after[k]``: index in ``backbone`` of the block head ``k`` reads (the exit sits after
      it); ``exit_names[k]``: that block's name in the original model.
    - ``threshold``: a sample leaves at the first exit whose max softmax probability is
      ``>= threshold``; samples that leave are removed from the running batch.
    - ``exit_counts``: samples that left at each exit (the last entry: the final output), counted
      over every eval-mode forward since :meth:`reset_exit_counts`.

    In training mode the whole backbone runs and the final output is returned (for ordinary
    fine-tuning of the backbone); :meth:`forward_all` gives every exit's output.
    """

    def __init__(self, backbone: nn.Sequential | None = None, heads: nn.ModuleList | None = None,
                 exit_after: Sequence[int] = (), threshold: float = DEFAULT_THRESHOLD,
                 exit_names: Sequence[str] = (), block_names: Sequence[str] = (),
                 num_classes: int = 0):
        super().__init__()
        self.backbone = backbone if backbone is not None else nn.Sequential()
        self.heads = heads if heads is not None else nn.ModuleList()
        self.exit_after = tuple(int(i) for i in exit_after)
        self.threshold = float(threshold)
        self.exit_names = tuple(str(n) for n in exit_names)
        self.block_names = tuple(str(n) for n in block_names)
        self.num_classes = int(num_classes)
        self.exit_counts = (0,) * (len(self.exit_after) + 1)

    # ---------------------------------------------------------------------- structure
    @property
    def exit_labels(self) -> tuple[str, ...]:
        """``"after <name>"`` for each exit, then ``"final"``."""
        return tuple(f"after {n}" for n in self.exit_names) + ("final",)

    def segments(self) -> list[tuple[int, int]]:
        """``[start, stop)`` block ranges: one per exit, then the rest up to the final output."""
        bounds, start = [], 0
        for i in self.exit_after:
            bounds.append((start, i + 1))
            start = i + 1
        bounds.append((start, len(self.backbone)))
        return bounds

    def _run(self, blocks: list, h: Any, seg: tuple[int, int]) -> Any:
        for i in range(*seg):
            h = blocks[i](h)
        return h

    def reset_exit_counts(self) -> None:
        self.exit_counts = (0,) * (len(self.exit_after) + 1)

    def exit_shares(self) -> dict[str, float]:
        """Fraction of samples that left at each exit since the last reset (empty if none)."""
        n = sum(self.exit_counts)
        return {k: c / n for k, c in zip(self.exit_labels, self.exit_counts)} if n else {}

    # ---------------------------------------------------------------------- forward
    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's class scores for every sample, then the final output's."""
        blocks = list(self.backbone)
        outs, h = [], x
        for k, seg in enumerate(self.segments()):
            h = self._run(blocks, h, seg)
            outs.append(self.heads[k](h) if k < len(self.heads) else h)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self.backbone)
        segs = self.segments()
        if self.training or not len(self.heads) or not isinstance(x, torch.Tensor) or not len(x):
            return self._run(blocks, x, (0, len(blocks)))
        n = x.shape[0]
        counts = list(self.exit_counts)
        out = None
        idx = None          # positions (in the input batch) of the samples still running
        h = x
        for k, seg in enumerate(segs[:-1]):
            h = self._run(blocks, h, seg)
            logits = self.heads[k](h)
            if out is None:
                out = logits.new_empty((n,) + tuple(logits.shape[1:]))
            conf = torch.softmax(logits.float(), dim=1).amax(dim=1)
            done = conf >= self.threshold
            n_done = int(done.sum())
            if n_done:
                rows = done.nonzero().squeeze(1)
                out[rows if idx is None else idx[rows]] = logits[rows].to(out.dtype)
                counts[k] += n_done
            if n_done == len(done):
                self.exit_counts = tuple(counts)
                return out
            if n_done:
                stay = (~done).nonzero().squeeze(1)
                idx = stay if idx is None else idx[stay]
                h = h[stay]
        final = self._run(blocks, h, segs[-1])
        counts[-1] += final.shape[0]
        self.exit_counts = tuple(counts)
        if idx is None:
            return final
        out[idx] = final.to(out.dtype)
        return out

    # ---------------------------------------------------------------------- costs
    def path_flops(self, example_input: torch.Tensor) -> list[int]:
        """FLOPs (``torch.utils.flop_counter``) of one forward of ``example_input`` for a batch
        that leaves at exit ``k`` (heads before it included), and last for one that runs to the
        final output (every head on the way included)."""
        blocks = list(self.backbone)
        cum, out, h = 0, [], example_input
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                for k, seg in enumerate(self.segments()):
                    with FlopCounterMode(display=False) as c:
                        h = self._run(blocks, h, seg)
                        if k < len(self.heads):
                            self.heads[k](h)
                    cum += c.get_total_flops()
                    out.append(int(cum))
        finally:
            self.train(was)
        return out

    def nbc_flops(self, example_input: Any, evaluator: Any):
        """The metrics hook (see :func:`nbcompress.metrics.measure`): FLOPs actually spent on the
        evaluator's data by the batched early-exit forward, averaged per sample and scaled to the
        example input's batch size; details: the share of samples per exit. ``None`` when the
        evaluator is not a DataLoader (then the example input's own forward is counted)."""
        from ...train import split_batch, to_device

        if not isinstance(evaluator, DataLoader) or not isinstance(example_input, torch.Tensor):
            return None
        dev = next((t.device for t in self.parameters()), example_input.device)
        was, saved = self.training, self.exit_counts
        self.eval()
        self.reset_exit_counts()
        n = 0
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as c:
                for batch in evaluator:
                    x, _ = split_batch(batch)
                    x = to_device(x, dev)
                    self(x)
                    n += int(x.shape[0])
            counts = self.exit_counts
        finally:
            self.exit_counts = saved
            self.train(was)
        if not n:
            return None
        per_sample = c.get_total_flops() / n
        batch = int(example_input.shape[0]) if example_input.dim() else 1
        details = {f"share {k}": cnt / n for k, cnt in zip(self.exit_labels, counts)}
        return int(round(per_sample * batch)), details

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}, exits={list(self.exit_names)}"


# ------------------------------------------------------------------------- listing the blocks

def _label(name: str, m: nn.Module) -> str:
    return f"{name or 'the model'} ({type(m).__name__})"


def _children(name: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
    kids = list(m.named_children())
    if not kids:
        raise BadInput(f"cannot list the blocks of {_label(name, m)}: it has no sub-modules")
    own = [n for n, _ in m.named_parameters(recurse=False)] + \
          [n for n, _ in m.named_buffers(recurse=False)]
    if own:
        raise BadInput(f"cannot list the blocks of {_label(name, m)}: it holds tensors of its own "
                       f"({own[0]}) outside its sub-modules")
    return [(f"{name}.{n}" if name else n, c) for n, c in kids]


def _close(a: Any, b: Any) -> bool:
    """Same shape and values up to float noise (a different kernel for the same op, TF32); a
    missing activation or reshape differs by far more."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
        a, b = a.float(), b.float()
        scale = float(b.abs().max()) if b.numel() else 0.0
        return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, scale)))
    return False


def list_blocks(model: nn.Module, example_input: torch.Tensor, expand: Sequence[str] = ()
                ) -> list[tuple[str, nn.Module]]:
    """The model as a chain of ``(name, block)``: its direct sub-modules, with the blocks named in
    ``expand`` (and any block on the way to them) opened up into theirs.

    Checked on ``example_input``: every opened module must run its sub-modules once each in order
    (their chain reproduces its output); :class:`BadInput` names the one that does not.
    """
    if isinstance(model, EarlyExitModel):
        raise BadInput("the model already has early exits")
    chain = _children("", model)
    opened: list[tuple[str, nn.Module]] = [("", model)]
    for target in expand:
        parts = target.split(".")
        for j in range(1, len(parts)):
            prefix = ".".join(parts[:j])
            pos = next((i for i, (n, _) in enumerate(chain) if n == prefix), None)
            if pos is None:
                continue
            mod = chain[pos][1]
            chain[pos:pos + 1] = _children(prefix, mod)
            opened.append((prefix, mod))
    _check_chains(model, opened, example_input)
    return chain


def _check_chains(model: nn.Module, opened: list[tuple[str, nn.Module]], x: torch.Tensor) -> None:
    """Each opened module, fed the input it got in a real forward, must give the same output as its
    sub-modules run one after another."""
    seen: dict[int, list] = {id(m): [] for _, m in opened}
    hooks = []

    def record(mod, args, kwargs, out):
        seen[id(mod)].append((args, kwargs, out))

    for _, m in opened:
        hooks.append(m.register_forward_hook(record, with_kwargs=True))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                model(x)
            except Exception as e:  # noqa: BLE001 - the user's model failed on its own data
                raise BadInput(f"the model failed on a batch of the data: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
            for h in hooks:
                h.remove()
            hooks = []
            for name, m in opened:
                calls = seen[id(m)]
                label = _label(name, m)
                if len(calls) != 1:
                    raise BadInput(f"cannot list the blocks of {label}: it runs "
                                   f"{len(calls)} times in one forward, not once")
                args, kwargs, out = calls[0]
                if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                    raise BadInput(f"cannot list the blocks of {label}: its input is not one "
                                   f"tensor")
                if not isinstance(out, torch.Tensor):
                    raise BadInput(f"cannot list the blocks of {label}: its output is a "
                                   f"{type(out).__name__}, not a tensor")
                h = args[0]
                try:
                    for _, c in m.named_children():
                        h = c(h)
                except Exception:  # noqa: BLE001 - the children do not chain
                    h = None
                if not _close(h, out):
                    names = ", ".join(n for n, _ in m.named_children())
                    raise BadInput(
                        f"cannot list the blocks of {label}: running its sub-modules "
                        f"({names}) one after another does not reproduce its output (its forward "
                        f"adds a skip connection, calls functions like F.relu or x.view between "
                        f"them, or reuses/skips one); early exits need an nn.Sequential or such a "
                        f"chain")
    finally:
        for h in hooks:
            h.remove()
        model.train(was)


def _has_weights(m: nn.Module) -> bool:
    """Whether a block computes with weights (a norm layer's scale and shift do not count):
    parameters, weight buffers a module declares (``_nbc_weight_buffers``, ``nbc_count``) or
    packed int8 kernels."""
    for sub in m.modules():
        if isinstance(sub, _NORMS):
            continue
        if any(True for _ in sub.parameters(recurse=False)) or hasattr(sub, "nbc_count") \
                or getattr(sub, "_nbc_weight_buffers", ()) or hasattr(sub, "_packed_params"):
            return True
    return False


def _every_positions(chain: list[tuple[str, nn.Module]], k: int) -> list[int]:
    """Exit after every k-th block with weights (norms do not count), moved past the parameter-
    free and normalisation blocks that follow it; never where only the last weighted block (the
    classifier) would follow."""
    weighted = [i for i, (_, m) in enumerate(chain) if _has_weights(m)]
    out = []
    for j in range(k - 1, len(weighted) - 2, k):
        pos = weighted[j]
        while pos + 1 < weighted[j + 1]:
            pos += 1
        out.append(pos)
    return out


# ----------------------------------------------------------------------------------- the heads

def make_head(feature: torch.Tensor, num_classes: int, pool: int) -> nn.Module:
    """Average-pool to at most ``pool`` positions per spatial dim, flatten, linear."""
    shape = tuple(feature.shape[1:])
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], num_classes))
    spatial = shape[1:]
    size = tuple(min(pool, s) for s in spatial)
    poolcls = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
    layer = poolcls[len(spatial)](size if len(size) > 1 else size[0])
    return nn.Sequential(layer, nn.Flatten(), nn.Linear(shape[0] * math.prod(size), num_classes))


def _head_text(head: nn.Module) -> str:
    first = head[0]
    if isinstance(first, nn.Linear):
        return "linear"
    size = first.output_size
    size = size if isinstance(size, tuple) else (size,)
    return f"avgpool {'x'.join(str(s) for s in size)} + linear"


# ------------------------------------------------------------------------------------ the step

def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_threshold(p: Any) -> float:
    if not _is_num(p) or not 0 < float(p) <= 1:
        raise BadInput(f"--threshold must be a probability in (0, 1], got {p!r}")
    return float(p)


def _exit_list(exits: Any) -> list[str]:
    if exits is None:
        return []
    if isinstance(exits, (str, int)):
        exits = [exits]
    out = []
    for e in exits:
        if isinstance(e, bool) or not isinstance(e, (str, int)):
            raise BadInput(f"--exits takes module names (or Sequential indices), got {e!r}")
        out += [s for s in str(e).replace(" ", ",").split(",") if s]
    return out


def _first_batch(loader: DataLoader, what: str = "--data") -> tuple[torch.Tensor, Any]:
    from ...train import split_batch

    try:
        batch = next(iter(loader))
    except StopIteration:
        raise BadInput(f"{what} yielded no batches") from None
    x, y = split_batch(batch)
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise BadInput(f"early exits need tensor inputs with a batch dim; {what} yields "
                       f"{type(x).__name__}")
    return x, y


@dataclass
class _Plan:
    blocks: list                  # (name, module)
    positions: list[int]          # index in blocks after which each exit sits (sorted)
    names: list[str]              # exit names, in chain order
    features: list[torch.Tensor]  # each exit's features on the example
    num_classes: int


@register_technique
@dataclass
class EarlyExitConfig(StepConfig):
    """Attach early-exit heads and train them (or, on an :class:`EarlyExitModel`, only change its
    threshold).

    - ``data``: DataLoader the heads are trained on (needed to attach exits).
    - ``exits``: module names (as ``model.named_modules()`` gives them; for an ``nn.Sequential``
      its indices, ``"2,5"``) an exit sits after; or ``every``: an exit after every k-th block
      with weights (default 1: after each, except where only the classifier would follow).
    - ``threshold``: exit when the max softmax probability is ``>=`` this (default 0.95).
    - ``epochs``, ``lr``: head training (default 5 epochs, Adam at 1e-2 with a cosine schedule:
      the heads are small); ``joint``: train the backbone too (default frozen; give a smaller
      ``lr`` then).
    - ``T``, ``alpha``: heads learn ``alpha * soft_target_loss(head, final, T) + (1 - alpha) *
      CE(head, labels)``; the default ``alpha=1`` distils from the final output only.
    - ``head_pool``: heads average-pool each spatial dim to at most this size (default 4).
    """

    technique: ClassVar[str] = "earlyexit"
    data: Any = None
    exits: Any = None
    every: int | None = None
    threshold: float | None = None
    epochs: int = 5
    lr: float = 1e-2
    joint: bool = False
    T: float = 4.0
    alpha: float = 1.0
    head_pool: int = 4
    seed: int = 0

    _ATTACH_ONLY = ("data", "exits", "every", "epochs", "lr", "joint", "T", "alpha", "head_pool",
                    "seed")

    # ------------------------------------------------------------------ checks
    def validate(self, model: nn.Module) -> None:
        if self.threshold is not None:
            check_threshold(self.threshold)
        if isinstance(model, EarlyExitModel):
            given = [f for f in self._ATTACH_ONLY
                     if getattr(self, f) != EarlyExitConfig.__dataclass_fields__[f].default]
            if given:
                raise BadInput(f"the model already has early exits ({', '.join(model.exit_names)})"
                               f": only --threshold can change now, not "
                               f"{', '.join('--' + g.replace('_', '-') for g in given)} "
                               f"(%undo to get the plain network back)")
            if self.threshold is None:
                raise BadInput("the model already has early exits: give --threshold P to change "
                               "its threshold")
            return
        self._check_options()
        self.plan(model)

    def _check_options(self) -> None:
        if self.data is None:
            raise BadInput("--data LOADER is needed to train the exit heads")
        if not isinstance(self.data, DataLoader):
            raise BadInput(f"--data must be a torch DataLoader, got {type(self.data).__name__}")
        if self.exits is not None and self.every is not None:
            raise BadInput("give either --exits or --every, not both")
        if self.every is not None and (not _is_int(self.every) or self.every < 1):
            raise BadInput(f"--every must be a positive int, got {self.every!r}")
        if not _is_int(self.epochs) or self.epochs < 1:
            raise BadInput(f"--epochs must be a positive int, got {self.epochs!r}")
        if not _is_num(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise BadInput(f"--lr must be a positive number, got {self.lr!r}")
        if not _is_num(self.T) or not math.isfinite(self.T) or self.T <= 0:
            raise BadInput(f"-T must be a positive number, got {self.T!r}")
        if not _is_num(self.alpha) or not 0 <= self.alpha <= 1:
            raise BadInput(f"--alpha must be in [0, 1], got {self.alpha!r}")
        if not _is_int(self.head_pool) or self.head_pool < 1:
            raise BadInput(f"--head-pool must be a positive int, got {self.head_pool!r}")
        if not _is_int(self.seed):
            raise BadInput(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.joint, bool):
            raise BadInput(f"joint must be True or False, got {self.joint!r}")

    def plan(self, model: nn.Module) -> _Plan:
        """Where the exits go (checked on a batch of ``data``); BadInput for anything wrong."""
        x, y = _first_batch(self.data)
        dev = next((t.device for t in list(model.parameters()) + list(model.buffers())),
                   torch.device("cpu"))
        x = x[:_CHECK_SAMPLES].to(dev)
        if self.alpha < 1 and y is None:
            raise BadInput("--alpha below 1 trains the heads on labels too, but --data yields no "
                           "labels (use --alpha 1: distil from the final output only)")
        modules = dict(model.named_modules())
        names = _exit_list(self.exits)
        if self.exits is not None and not names:
            raise BadInput("--exits names no module")
        for n in names:
            if n not in modules or n == "":
                top = ", ".join(k for k, _ in model.named_children())
                raise BadInput(f"--exits: {type(model).__name__} has no module named {n!r} "
                               f"(its blocks: {top})")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise BadInput(f"--exits names {dup!r} twice")
        blocks = list_blocks(model, x, expand=names)
        index = {n: i for i, (n, _) in enumerate(blocks)}
        if names:
            positions = sorted(index[n] for n in names)
        else:
            positions = _every_positions(blocks, self.every or 1)
            if not positions:
                nw = sum(_has_weights(m) for _, m in blocks)
                raise BadInput(f"--every {self.every or 1} puts no exit in "
                               f"{type(model).__name__}: it has {nw} blocks with weights at the "
                               f"top level; name the exits with --exits")
        last = len(blocks) - 1
        for p in positions:
            if p == last:
                raise BadInput(f"--exits: {blocks[p][0]} is the last block: its output is the "
                               f"network's own output, an exit there saves nothing")
        was = model.training
        model.eval()
        feats, h = [], x
        try:
            with torch.no_grad():
                for i, (_, m) in enumerate(blocks):
                    h = m(h)
                    if i in positions:
                        feats.append(h)
        finally:
            model.train(was)
        if not isinstance(h, torch.Tensor) or h.dim() != 2:
            raise BadInput(f"the model's output has shape "
                           f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}"
                           f": early exits need class scores of shape (N, classes)")
        for p, f in zip(positions, feats):
            if not (isinstance(f, torch.Tensor) and 2 <= f.dim() <= 5 and f.is_floating_point()):
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise BadInput(f"--exits: the output of {blocks[p][0]} ({shape}) is not a float "
                               f"feature tensor (N, C[, ...]) a head can read")
        return _Plan(blocks, positions, [blocks[p][0] for p in positions], feats, int(h.shape[1]))

    # ------------------------------------------------------------------ run
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        if isinstance(model, EarlyExitModel):
            return self._retune(model, ctx)
        plan = self.plan(model)
        if self.alpha < 1:                 # the heads train on the labels: they must be classes
            from ...train import check_loader_runs

            check_loader_runs(model, self.data, "--data", ctx.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            heads = nn.ModuleList(make_head(f, plan.num_classes, self.head_pool)
                                  for f in plan.features)
        backbone = nn.Sequential(*(m for _, m in plan.blocks))
        ee = EarlyExitModel(backbone, heads.to(ctx.device), plan.positions,
                            self.threshold if self.threshold is not None else DEFAULT_THRESHOLD,
                            plan.names, [n for n, _ in plan.blocks], plan.num_classes)
        ee.train(model.training)
        records = self._train(ee, ctx)
        ee.eval()
        notes = [f"exits after {', '.join(plan.names)} of {len(plan.blocks)} blocks; heads "
                 f"({_head_text(ee.heads[0])}) trained {self.epochs} epoch"
                 f"{'s' if self.epochs != 1 else ''} "
                 f"{'jointly with the backbone' if self.joint else 'with the backbone frozen'}, "
                 f"distilled from the final output (T={self.T:g}"
                 f"{f', alpha={self.alpha:g}' if self.alpha < 1 else ''})"]
        result = CompressionResult(ee, extra={"head_loss": [round(r["loss"], 4) for r in records]})
        self._describe(ee, ctx, result, notes)
        return result

    def _retune(self, ee: EarlyExitModel, ctx: StepContext) -> CompressionResult:
        old = ee.threshold
        ee.threshold = float(self.threshold)
        notes = [f"threshold {old:g} -> {ee.threshold:g} (weights unchanged)"]
        result = CompressionResult(ee)
        self._describe(ee, ctx, result, notes)
        return result

    def _train(self, ee: EarlyExitModel, ctx: StepContext) -> list[dict]:
        from ...distill import soft_target_loss
        from ...train import fit, split_batch

        alpha, T = float(self.alpha), float(self.T)

        def head_loss(outs, teacher, y):
            loss = 0.0
            for o in outs:
                if alpha > 0:
                    loss = loss + alpha * soft_target_loss(o, teacher, T)
                if alpha < 1:
                    loss = loss + (1 - alpha) * F.cross_entropy(o.float(), y)
            return loss

        if not self.joint:
            backbone = ee.backbone
            wanted = [(p, p.requires_grad) for p in backbone.parameters()]
            backbone.requires_grad_(False)
            try:
                cached = _cached_features(ee, self.data, ctx.device, ctx.progress)
                if cached is not None:
                    # the heads' parameter-free front (pooling) ran once; train only the rest
                    tails = nn.ModuleList(hd[_front_len(hd):] for hd in ee.heads)
                    E = len(tails)

                    def cached_loss(tails, batch):
                        y = batch[E + 1] if len(batch) > E + 1 else None
                        return head_loss([t(f) for t, f in zip(tails, batch[:E])], batch[E], y)

                    g = torch.Generator()
                    g.manual_seed(self.seed)
                    loader = DataLoader(cached, batch_size=self.data.batch_size or 64,
                                        shuffle=True, generator=g)
                    return fit(tails, loader, epochs=self.epochs, lr=self.lr,
                               loss_fn=cached_loss, device=ctx.device, progress=ctx.progress,
                               desc="exit heads", seed=self.seed, scheduler="cosine")
                positions = ee.exit_after

                def frozen_loss(heads, batch):
                    x, y = split_batch(batch)
                    backbone.eval()      # frozen: BatchNorm statistics stay as they are
                    with torch.no_grad():
                        feats, h = _exit_features(backbone, positions, x)
                    return head_loss([hd(f) for hd, f in zip(heads, feats)], h, y)

                return fit(ee.heads, self.data, epochs=self.epochs, lr=self.lr,
                           loss_fn=frozen_loss, device=ctx.device, progress=ctx.progress,
                           desc="exit heads", seed=self.seed, scheduler="cosine")
            finally:
                for p, r in wanted:
                    p.requires_grad_(r)
                backbone.eval()

        teacher = copy.deepcopy(ee.backbone).eval().requires_grad_(False)

        def joint_loss(model, batch):
            x, y = split_batch(batch)
            with torch.no_grad():
                t = teacher(x)
            outs = model.forward_all(x)
            final = outs[-1]
            own = F.cross_entropy(final.float(), y) if y is not None else \
                soft_target_loss(final, t, T)
            return own + head_loss(outs[:-1], t, y)

        return fit(ee, self.data, epochs=self.epochs, lr=self.lr, loss_fn=joint_loss,
                   device=ctx.device, progress=ctx.progress, desc="early exits (joint)",
                   seed=self.seed, scheduler="cosine")

    def _describe(self, ee: EarlyExitModel, ctx: StepContext, result: CompressionResult,
                  notes: list[str]) -> None:
        """Fill the per-exit table, the threshold sweep (table + plot) and the notes."""
        from ...metrics import is_loader

        if not is_loader(ctx.evaluator):
            result.notes += notes + ["no evaluation loader (--eval): no threshold sweep"]
            result.layers = _exit_rows(ee, None)
            return
        loader, where = ctx.evaluator, "eval data"
        sw = _Sweep(ee, loader, ctx.device)
        sweep = sw.table()
        cur = sweep[sweep["current"]].iloc[0]
        result.layers = _exit_rows(ee, sw, cur)
        shares = ", ".join(f"{100 * cur[f'share {k}']:.0f}% {k}" for k in ee.exit_labels)
        acc = "" if sw.y is None else \
            f"; accuracy {100 * cur['accuracy']:.2f}% (full network {100 * sw.alone[-1]:.2f}%)"
        notes.append(f"threshold {ee.threshold:g} on the {where}: {shares}; on average "
                     f"{cur['flops_fraction']:.0%} of the full network's FLOPs{acc}")
        result.notes += notes
        result.tables["threshold sweep"] = sweep
        from ...report.plots import sweep_plot_png

        result.figures["accuracy vs FLOPs"] = sweep_plot_png(
            sweep, full_accuracy=sw.alone[-1] if sw.y is not None else None,
            title=f"early exits: threshold sweep on the {where}")
        result.extra.update({"threshold": ee.threshold,
                             "avg_flops_per_sample": float(cur["avg_flops"]),
                             "flops_fraction": float(cur["flops_fraction"])})


def _exit_features(backbone: nn.Sequential, positions: Sequence[int], x: torch.Tensor):
    """(features at each exit, final output) of one backbone pass."""
    feats, h = [], x
    for i, m in enumerate(backbone):
        h = m(h)
        if i in positions:
            feats.append(h)
    return feats, h


def _front_len(head: nn.Sequential) -> int:
    """How many of a head's first layers hold no parameters (pooling, flatten)."""
    for i, m in enumerate(head):
        if any(True for _ in m.parameters()):
            return i
    return len(head)


def _cached_features(ee: EarlyExitModel, loader: DataLoader, device, progress: bool):
    """One pass of the frozen backbone over ``loader``: a TensorDataset (on the CPU) of each head's
    pooled input, the final output (the distillation target) and the labels if any; ``None`` when
    that would take more than ``CACHE_BYTES`` (then the backbone runs every epoch)."""
    from tqdm.auto import tqdm

    from ...train import split_batch, to_device

    fronts = [hd[:_front_len(hd)] for hd in ee.heads]
    cols: list[list[torch.Tensor]] = [[] for _ in range(len(fronts) + 2)]
    labelled = None
    try:
        n_batches = len(loader)
    except TypeError:
        return None
    ee.eval()
    with torch.no_grad(), tqdm(total=n_batches, desc="exit features", disable=not progress,
                               leave=False) as bar:
        for b, batch in enumerate(loader):
            x, y = split_batch(to_device(batch, device))
            feats, h = _exit_features(ee.backbone, ee.exit_after, x)
            row = [f(t).float().cpu() for f, t in zip(fronts, feats)] + [h.float().cpu()]
            if labelled is None:
                labelled = y is not None
                per_batch = sum(t.numel() * t.element_size() for t in row)
                if per_batch * n_batches > CACHE_BYTES:
                    return None
            if labelled != (y is not None):
                raise BadInput("--data yields labels in some batches and not in others")
            for c, t in zip(cols, row):
                c.append(t)
            if labelled:
                cols[-1].append(y.cpu())
            bar.update(1)
    if labelled is None:
        raise BadInput("--data yielded no batches")
    return TensorDataset(*(torch.cat(c) for c in (cols if labelled else cols[:-1])))


def _exit_rows(ee: EarlyExitModel, sw: "_Sweep | None", cur=None) -> list[dict]:
    rows = []
    for k, label in enumerate(ee.exit_labels):
        head = ee.heads[k] if k < len(ee.heads) else None
        row = {"layer": ee.exit_names[k] if head is not None else "(final)",
               "exit": str(k + 1) if head is not None else "final",
               "head": _head_text(head) if head is not None else "the network's own output",
               "params": sum(p.numel() for p in head.parameters()) if head is not None else 0}
        if sw is not None:
            row["path_flops"] = sw.cum[k]
            row["share"] = float(cur[f"share {label}"])
            if sw.y is not None:
                row["accuracy_alone"] = sw.alone[k]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- threshold sweep

class _Sweep:
    """Every exit's output for every sample of a loader (one pass), and the FLOPs of each path:
    what the early-exit forward decides at any threshold, without rerunning it."""

    def __init__(self, ee: EarlyExitModel, loader: DataLoader, device=None):
        from ...train import split_batch, to_device

        if device is None:
            device = next((t.device for t in ee.parameters()), torch.device("cpu"))
        self.ee = ee
        was = ee.training
        ee.eval()
        outs: list[list[torch.Tensor]] = []
        ys: list[torch.Tensor] = []
        first = None
        try:
            with torch.no_grad():
                for batch in loader:
                    x, y = split_batch(batch)
                    x = to_device(x, device)
                    if first is None:
                        first = x[:1]
                    outs.append([t.float().cpu() for t in ee.forward_all(x)])
                    if y is not None:
                        ys.append(y.cpu())
                if first is None:
                    raise BadInput("the loader yielded no batches")
                self.cum = ee.path_flops(first)
                with FlopCounterMode(display=False) as c:
                    ee.backbone(first)
                self.full_flops = int(c.get_total_flops()) or 1
        finally:
            ee.train(was)
        logits = [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]
        y = torch.cat(ys) if len(ys) == len(outs) else None
        if y is not None and y.dim() == 2:
            y = y.argmax(dim=1)
        self.y = y
        self.n = logits[0].shape[0]
        self.preds = torch.stack([o.argmax(dim=1) for o in logits])                 # (E+1, N)
        self.conf = torch.stack([torch.softmax(o, dim=1).amax(dim=1) for o in logits[:-1]]) \
            if len(logits) > 1 else torch.zeros(0, self.n)                          # (E, N)
        self.alone = [float((p == y).float().mean()) if y is not None else float("nan")
                      for p in self.preds]

    def exits_at(self, threshold: float) -> torch.Tensor:
        """Index of the exit each sample takes (len(exits) = the final output)."""
        leave = torch.cat([self.conf >= threshold, torch.ones(1, self.n, dtype=torch.bool)])
        return leave.float().argmax(dim=0)

    def table(self, thresholds: Sequence[float] | None = None) -> pd.DataFrame:
        grid = sorted({float(t) for t in (thresholds or SWEEP_THRESHOLDS)} |
                      {float(self.ee.threshold)})
        for t in grid:
            check_threshold(t)
        cost = torch.tensor(self.cum, dtype=torch.float64)
        rows = []
        for t in grid:
            where = self.exits_at(t)
            pred = self.preds[where, torch.arange(self.n)]
            avg = float(cost[where].mean())
            row = {"threshold": t,
                   "accuracy": float((pred == self.y).float().mean()) if self.y is not None
                   else float("nan"),
                   "agreement": float((pred == self.preds[-1]).float().mean()),
                   "avg_flops": avg,
                   "flops_fraction": avg / self.full_flops}
            for k, label in enumerate(self.ee.exit_labels):
                row[f"share {label}"] = float((where == k).float().mean())
            row["current"] = t == float(self.ee.threshold)
            rows.append(row)
        return pd.DataFrame(rows)


def threshold_sweep(ee: EarlyExitModel, loader: DataLoader,
                    thresholds: Sequence[float] | None = None, *, device=None) -> pd.DataFrame:
    """Accuracy and average FLOPs per sample as the threshold sweeps, from one pass over
    ``loader`` that computes every exit's output for every sample.

    Columns: ``threshold``, ``accuracy`` (NaN without labels), ``agreement`` (with the full
    network's prediction), ``avg_flops`` (per sample, heads included), ``flops_fraction`` (of the
    backbone alone, i.e. the network without exits), ``share <exit>`` per exit and ``current``
    (the model's own threshold, always in the grid).
    """
    return _Sweep(ee, loader, device).table(thresholds)


# ---------------------------------------------------------------------------------- functions

def early_exit(model: nn.Module, loader: DataLoader | None = None, *, evaluator: Any = None,
               device: str | torch.device | None = None, progress: bool = False,
               **options) -> EarlyExitModel:
    """Attach early-exit heads to ``model`` (a copy; the caller's model is unchanged), train them
    on ``loader`` and return the :class:`EarlyExitModel`. On an :class:`EarlyExitModel`,
    ``early_exit(ee, threshold=P)`` returns a copy with only the threshold changed.

    ``options``: the fields of :class:`EarlyExitConfig` (``exits``, ``every``, ``threshold``,
    ``epochs``, ``lr``, ``joint``, ``T``, ``alpha``, ``head_pool``, ``seed``). ``evaluator``: a
    loader for the threshold sweep kept in the step's result (see :func:`compress`).
    """
    EarlyExitConfig.check_options(options, "early_exit", exclude={"data", "progress"})
    config = EarlyExitConfig(data=loader, progress=progress, **options)
    return compress(model, config, evaluator=evaluator, device=device).model


def sequential_cnn(width: int = 16, num_classes: int = 10, in_channels: int = 1, *,
                   seed: int | None = None) -> nn.Sequential:
    """The early-exit benchmark CNN as an ``nn.Sequential`` (indices are its block names)::

        0 conv(w)  1 conv(w)  2 maxpool  3 conv(2w)  4 conv(2w)  5 maxpool
        6 conv(4w) 7 conv(4w) 8 global-avg-pool  9 flatten  10 linear

    each conv a ``Sequential(Conv2d 3x3, BatchNorm2d, ReLU)``; 28x28 input.
    """
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())

    w = int(width)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        return nn.Sequential(block(in_channels, w), block(w, w), nn.MaxPool2d(2),
                             block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
                             block(2 * w, 4 * w), block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4 * w, num_classes))


def demo_config(train_loader: DataLoader, test_loader: DataLoader) -> tuple[str, EarlyExitConfig]:
    """The terminal demo's step: one exit after LeNet-300-100's first hidden layer (fc1 + ReLU),
    a linear head distilled from the final output for 2 epochs."""
    return ("%earlyexit model --data train_loader --exits relu1 --threshold 0.9 --epochs 2",
            EarlyExitConfig(data=train_loader, exits=("relu1",), threshold=0.9, epochs=2))
