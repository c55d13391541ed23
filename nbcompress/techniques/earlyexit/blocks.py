"""Where the exits go: the exit positions on the model's chain of blocks (found by
:mod:`.chain`), the heads, the plan."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...errors import BadInput, FieldError
from .chain import ChannelsFirst, list_blocks
from .hooked import TokenPool, TokenStates, chain_stack, find_stack, plan_hooked
from .tokens import adapt

__all__ = ["ChannelsFirst", "list_blocks", "make_head", "plan_exits"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_CHECK_SAMPLES = 8          # samples of the first batch the chain check runs on


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


def channels_last(feature: torch.Tensor, before: nn.Module, rest: Sequence[nn.Module]) -> bool:
    """Whether a feature of 3 or more dims is channels-last (N, ..., C): Swin's (N, H, W, C)
    maps, a transformer's (N, tokens, C). Read from the layers around it: the last layer of the
    block that made it (``before``) whose width is the feature's last dim and not its dim 1, or
    the reverse; where that says nothing, the first layer of the blocks after it (``rest``) that
    reads channels: a Linear or a plain LayerNorm over the last dim, not a conv or BatchNorm."""
    if feature.dim() < 3:
        return False
    first, last = feature.shape[1], feature.shape[-1]

    def width(m: nn.Module, out: bool) -> int | None:
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.out_channels if out else m.in_channels
        if isinstance(m, nn.Linear):
            return m.out_features if out else m.in_features
        if isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward \
                and len(m.normalized_shape) == 1:         # (LayerNorm2d permutes: not this)
            return m.normalized_shape[0]
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            return getattr(m, "num_features", None) or m.num_channels
        return None

    for m in reversed(list(before.modules())):
        n = width(m, out=True)
        if n is not None and (n == last) != (n == first):
            return n == last
    for block in rest:
        for m in block.modules():
            n = width(m, out=False)
            if n is None:
                continue
            if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
                              nn.GroupNorm)):
                return False
            return n == last
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

HEAD_KINDS = ("pool", "conv")


def make_head(feature: torch.Tensor, num_classes: int, pool: int, kind: str = "pool",
              channels_last: bool = False) -> nn.Module:
    """Average-pool to at most ``pool`` positions per spatial dim, flatten, linear; ``kind
    "conv"``: a 3x3 convolution (as many channels as the feature) + BatchNorm + ReLU first,
    so the head can still combine neighbouring positions before it pools (a feature map of an
    early layer is too raw for a linear read-out alone). A flat feature gets a linear head.
    ``channels_last``: the feature is (N, ..., C) (see :func:`channels_last`); the head moves
    the channels first."""
    if kind not in HEAD_KINDS:
        raise FieldError(f"{{head}} must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    if channels_last and feature.dim() >= 3:
        head = make_head(feature.movedim(-1, 1), num_classes, pool, kind)
        return nn.Sequential(ChannelsFirst(), *head)
    shape = tuple(feature.shape[1:])
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], num_classes))
    c, spatial = shape[0], shape[1:]
    size = tuple(min(pool, s) for s in spatial)
    nd = len(spatial)
    poolcls = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[nd]
    front: list[nn.Module] = []
    if kind == "conv":
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
        front = [conv(c, c, 3, padding=1, bias=False), bn(c), nn.ReLU(inplace=True)]
    layer = poolcls(size if len(size) > 1 else size[0])
    return nn.Sequential(*front, layer, nn.Flatten(), nn.Linear(c * math.prod(size),
                                                               num_classes))


def _head_text(head: nn.Module) -> str:
    parts = []
    for m in head:
        if isinstance(m, TokenPool):
            parts.append("mean over tokens")
        elif isinstance(m, TokenStates):
            parts.append("per token")
        elif isinstance(m, nn.LayerNorm):
            parts.append("LN")
        elif isinstance(m, nn.modules.conv._ConvNd):
            parts.append(f"conv {'x'.join(str(k) for k in m.kernel_size)}")
        elif isinstance(m, _NORMS):
            parts.append("BN")
        elif isinstance(m, nn.ReLU):
            parts.append("ReLU")
        elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            size = m.output_size
            size = size if isinstance(size, tuple) else (size,)
            parts.append(f"avgpool {'x'.join(str(s) for s in size)}")
        elif isinstance(m, nn.Linear):
            parts.append("linear")
    return " + ".join(parts)


# ------------------------------------------------------------------------------------ the plan

def exit_list(exits: Any) -> list[str]:
    """``exits`` as a list of module names: ``"2,5"``, ``"relu1"``, ``3``, ``["fc1", 2]``."""
    if exits is None:
        return []
    if isinstance(exits, (str, int)):
        exits = [exits]
    out = []
    for e in exits:
        if isinstance(e, bool) or not isinstance(e, (str, int)):
            raise FieldError(f"{{exits}} takes module names (or Sequential indices), got {e!r}")
        out += [s for s in str(e).replace(" ", ",").split(",") if s]
    return out


def first_batch(loader: DataLoader, field: str = "data", tensors: bool = True
                ) -> tuple[Any, Any]:
    """The first batch of ``loader`` (the option ``field``) as (inputs, labels or None);
    ``tensors``: the inputs must be one tensor with a batch dim (else a dict of keyword inputs
    is fine too)."""
    from ...train import split_batch

    try:
        batch = next(iter(loader))
    except StopIteration:
        raise FieldError(f"{{{field}}} yielded no batches") from None
    x, y = split_batch(batch)
    if tensors and (not isinstance(x, torch.Tensor) or x.dim() < 2):
        raise FieldError(f"early exits need tensor inputs with a batch dim; {{{field}}} yields "
                         f"{type(x).__name__}")
    return x, y


@dataclass
class Plan:
    blocks: list                  # (name, module)
    positions: list[int]          # index in blocks after which each exit sits (sorted)
    names: list[str]              # exit names, in chain order
    features: list[torch.Tensor]  # each exit's features on the example
    num_classes: int
    channels_last: list[bool] | None = None   # each exit's feature is (N, ..., C)
    left_out: list[str] | None = None         # sub-modules evaluation does not run (aux heads)
    hooked: dict | None = None                # HookedExitModel arguments (transformers models)


def _inside_sequentials(model: nn.Module) -> list[str]:
    """A sub-module of each nn.Sequential block with two or more blocks with weights inside
    (a VGG's ``features``, a ResNet stage; not a conv + norm + activation unit), reachable by
    opening the model and, in turn, those blocks (what :func:`list_blocks` takes to open
    them)."""
    out, todo = [], [("", model)]
    while todo:
        name, m = todo.pop(0)
        for cn, c in m.named_children():
            full = f"{name}.{cn}" if name else cn
            if isinstance(c, nn.Sequential) and sum(_has_weights(k) for k in c.children()) >= 2:
                out.append(f"{full}.{next(iter(c._modules))}")
                todo.append((full, c))
    return out


def _top_sequentials(model: nn.Module) -> list[str]:
    """What :func:`list_blocks` takes to open each top-level nn.Sequential with two or more
    blocks with weights (a MobileNet's or ConvNeXt's ``features``), the last one with weights
    (the classifier) excepted."""
    kids = [(cn, c) for cn, c in model.named_children() if _has_weights(c)]
    return [f"{cn}.{next(iter(c._modules))}" for cn, c in kids[:-1]        # not the classifier
            if isinstance(c, nn.Sequential) and sum(_has_weights(k) for k in c.children()) >= 2]


def plan_exits(model: nn.Module, data: DataLoader, exits: Any, every: int | None,
               alpha: float, open_all: bool = False) -> Plan:
    """Where the exits go (checked on a batch of ``data``); :class:`FieldError` /
    :class:`BadInput` for anything wrong. ``open_all`` (no ``exits``): the nn.Sequential blocks
    are opened first, so the candidates are after every block with weights inside them too
    (a VGG's convolutions, a ResNet's residual blocks)."""
    from ...batches import head, to_device

    stack = find_stack(model)
    x, y = first_batch(data, tensors=stack is None)
    dev = next((t.device for t in list(model.parameters()) + list(model.buffers())),
               torch.device("cpu"))
    x = to_device(head(x, _CHECK_SAMPLES), dev)
    if alpha < 1 and y is None:
        raise FieldError("{alpha} below 1 trains the heads on labels too, but {data} yields no "
                         "labels (use {alpha=1}: distil from the final output only)")
    modules = dict(model.named_modules())
    names = exit_list(exits)
    if exits is not None and not names:
        raise FieldError("{exits} names no module")
    if stack is not None:           # a transformers model: exits hook its own forward
        plan, extra = plan_hooked(model, stack, x, names, every, open_all)
        plan.hooked = extra
        return plan
    for n in names:
        if n not in modules or n == "":
            top = ", ".join(k for k, _ in model.named_children())
            raise FieldError(f"{{exits}}: {type(model).__name__} has no module named {n!r} "
                             f"(its blocks: {top})")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FieldError(f"{{exits}} names {dup!r} twice")
    left_out: list[str] = []
    try:
        blocks = list_blocks(model, x, expand=names or (_inside_sequentials(model) if open_all
                                                        else ()), left_out=left_out)
    except BadInput as e:
        # not a chain of its sub-modules: exits may still hook a stack of blocks it runs in turn
        stack = chain_stack(model, x) if str(e).startswith("cannot list the blocks") else None
        if stack is None:
            raise
        plan, extra = plan_hooked(model, stack, x, names, every, open_all, pairs=False)
        plan.hooked = extra
        return plan
    index = {n: i for i, (n, _) in enumerate(blocks)}
    adapted = adapt(model) is not None
    if names:
        outside = [n for n in names if n not in index]
        if outside:
            raise FieldError(f"{{exits}}: {outside[0]} is inside a block of "
                             f"{type(model).__name__}; exits go after its blocks: "
                             f"{', '.join(n for n, _ in blocks)}")
        positions = sorted(index[n] for n in names)
    else:
        nw = sum(_has_weights(m) for _, m in blocks)
        # a vision transformer's blocks: with no --every, about four exits spread over them
        positions = _every_positions(blocks, every or (max(1, round(nw / 5)) if adapted else 1))
        if adapted:                     # not after the embedding alone: no block has run yet
            positions = [p for p in positions if p > 0]
        stages = [] if open_all else _top_sequentials(model)
        if stages and (not positions or (every is None and len(positions) < 2)):
            # too few blocks at the top level (features + classifier; stem + blocks + head):
            # open its nn.Sequential stages; with no --every, every k-th block so that about
            # four exits are spread
            opened = list_blocks(model, x, expand=stages, left_out=left_out)
            nw = sum(_has_weights(m) for _, m in opened)
            more = _every_positions(opened, every or max(1, round(nw / 5)))
            if len(more) > len(positions):
                blocks, positions = opened, more
        if not positions:
            nw = sum(_has_weights(m) for _, m in blocks)
            raise FieldError(f"{{every={every or 1}}} puts no exit in {type(model).__name__}: it "
                             f"has {nw} blocks with weights at the top level; name the exits "
                             f"with {{exits}}")
    last = len(blocks) - 1
    for p in positions:
        if p == last:
            raise FieldError(f"{{exits}}: {blocks[p][0]} is the last block: its output is the "
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
            raise FieldError(f"{{exits}}: the output of {blocks[p][0]} ({shape}) is not a float "
                             f"feature tensor (N, C[, ...]) a head can read")
    layout = [channels_last(f, blocks[p][1], [m for _, m in blocks[p + 1:]])
              for p, f in zip(positions, feats)]
    return Plan(blocks, positions, [blocks[p][0] for p in positions], feats, int(h.shape[1]),
                layout, sorted(set(left_out)))
