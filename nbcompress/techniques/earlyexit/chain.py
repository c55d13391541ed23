"""The model as a chain of blocks: what early exits need (exits go between blocks).

What structure is needed: the network must be a chain of blocks. That is an ``nn.Sequential``, or
any module whose ``forward`` runs its direct sub-modules once each, in the order they were
registered, each taking the previous one's output (``LeNet-300-100``, ``LeNet-5`` and
``SmallResNet`` in :mod:`nbcompress.data` are such chains). An exit named inside a block
(``features.3``) opens that block up, which again must be such a chain. Whether a model is a chain
is checked on a real batch: running the blocks one after another must reproduce the model's
output; a forward that adds a skip connection, calls functions such as ``F.relu`` between
blocks, or reuses a module is refused with a message naming the module. A few parameter-free
functions are allowed between blocks, found by comparing each block's real input with what the
block before gave: a flatten (``torch.flatten(x, 1)`` before the classifier, as in torchvision's
ResNet, VGG, EfficientNet), ``F.relu`` and pooling (DenseNet), ``x.mean([2, 3])`` (ShuffleNetV2,
MNASNet), ``x.mean(1)`` over tokens (MLP-Mixer); each becomes a parameter-free block. A
``ModuleList`` the forward loops over stands for its members; a sub-module an evaluation forward
does not run (an auxiliary classifier of training) is left out. Vision transformers are adapted by
:mod:`.tokens`. So a residual network gets exits between its stages (after ``layer1``,
``layer2``, ...), its residual blocks staying whole inside them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ...errors import BadInput
from .model import EarlyExitModel
from .tokens import adapt

__all__ = ["list_blocks", "ChannelsFirst"]


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
    return [(f"{name}.{n}" if name else n, c) for n, c in _kids(m)]


def _kids(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """Direct sub-modules, an ``nn.ModuleList`` standing for its members (``blocks.0``,
    ``blocks.1``, ...: a forward that loops over it runs them in order)."""
    out = []
    for n, c in m.named_children():
        if isinstance(c, nn.ModuleList):
            out += [(f"{n}.{k}", cc) for k, cc in c.named_children()]
        else:
            out.append((n, c))
    return out


def _close(a: Any, b: Any) -> bool:
    """Same shape and values up to float noise (a different kernel for the same op, TF32); a
    missing activation or reshape differs by far more."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
        a, b = a.float(), b.float()
        scale = float(b.abs().max()) if b.numel() else 0.0
        return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, scale)))
    return False


def list_blocks(model: nn.Module, example_input: torch.Tensor, expand: Sequence[str] = (),
                left_out: list | None = None) -> list[tuple[str, nn.Module]]:
    """The model as a chain of ``(name, block)``: its direct sub-modules, with the blocks named in
    ``expand`` (and any block on the way to them) opened up into theirs.

    Checked on ``example_input``: every opened module must run its sub-modules once each in order
    (their chain reproduces its output); :class:`BadInput` names the one that does not. A
    sub-module an evaluation forward does not run (GoogLeNet's auxiliary classifiers, which run
    only in training) is not a block; its name goes to ``left_out``.
    """
    if isinstance(model, EarlyExitModel):
        raise BadInput("the model already has early exits")
    adapted = adapt(model)
    if adapted is not None:           # a vision transformer: embedding, blocks, head
        _check_adapted(model, adapted, example_input)
        return adapted
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
    glue = _check_chains(model, opened, example_input)
    for where, label, mod in glue:          # parameter-free functions of the forward, as blocks
        if where.startswith("drop "):      # not run in evaluation: not a block of the chain
            chain = [(n, b) for n, b in chain if n != label]
            if left_out is not None:
                left_out.append(label)
            continue
        if where.startswith("after "):     # after everything an opened module holds
            owner = where[len("after "):]
            pos = max((i for i, (n, _) in enumerate(chain)
                       if not owner or n == owner or n.startswith(owner + ".")), default=-1) + 1
        else:
            pos = next(i for i, (n, _) in enumerate(chain)
                       if n == where or n.startswith(where + "."))     # where itself opened
        chain.insert(pos, (label, mod))
    return chain


def _check_adapted(model: nn.Module, chain: list[tuple[str, nn.Module]], x: torch.Tensor) -> None:
    """The chain of :func:`~.tokens.adapt` run one after another reproduces the model."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
            h = x
            try:
                for _, b in chain:
                    h = b(h)
            except Exception:  # noqa: BLE001 - the parts do not chain
                h = None
    finally:
        model.train(was)
    if not _close(h, out):
        raise BadInput(f"cannot list the blocks of {_label('', model)}: its embedding, blocks "
                       f"and head run one after another do not reproduce its output; early "
                       f"exits need an nn.Sequential or such a chain")


class _MeanHW(nn.Module):
    """``x.mean([2, 3])`` (ShuffleNetV2, MNASNet) as a block."""

    def forward(self, x):
        return x.mean([2, 3])


class _MeanTokens(nn.Module):
    """``x.mean(1)`` over the tokens of a (N, tokens, C) sequence (MLP-Mixer's pooling)."""

    def forward(self, x):
        return x.mean(1)


class ChannelsFirst(nn.Module):
    """(N, ..., C) -> (N, C, ...): an exit head's first step on a channels-last feature (Swin's
    (N, H, W, C) maps, a token sequence (N, T, C)), so it pools over positions, not channels."""

    def forward(self, x):
        return x.movedim(-1, 1)


# functions a forward may call between its blocks (torchvision's classifiers do), tried in this
# order where the next block's real input is not the previous block's output; each becomes a
# parameter-free block of the chain
_GLUE = [
    ("flatten", lambda: nn.Flatten(1)),
    ("relu", lambda: nn.ReLU()),
    ("mean over H, W", lambda: _MeanHW()),
    ("relu, mean over H, W", lambda: nn.Sequential(nn.ReLU(), _MeanHW())),
    ("mean over tokens", lambda: _MeanTokens()),
]


def _find_glue(h: Any, want: Any) -> tuple[str, nn.Module] | None:
    if not isinstance(h, torch.Tensor):
        return None
    for what, make in _GLUE:
        g = make()
        try:
            if _close(g(h), want):
                return what, g
        except Exception:  # noqa: BLE001 - does not apply to this tensor
            continue
    return None


def _check_chains(model: nn.Module, opened: list[tuple[str, nn.Module]],
                  x: torch.Tensor) -> list[tuple[str, str, nn.Module]]:
    """Each opened module, fed the input it got in a real forward, must give the same output as its
    sub-modules run one after another. Between two of them (and after the last) a parameter-free
    function of the forward is allowed where it is one of ``_GLUE`` (a flatten before the
    classifier, torchvision's ResNet / VGG / EfficientNet; ``F.relu`` + pooling, DenseNet;
    ``x.mean([2, 3])``, ShuffleNetV2 / MNASNet): found by comparing each block's real input with
    what the block before it gave. Returns ``(where, label, block)`` for each such function,
    ``where`` the block it goes before or ``"after <opened module>"``."""
    glue: list[tuple[str, str, nn.Module]] = []
    watch = {id(m): m for _, m in opened}
    for _, m in opened:
        for _, c in _kids(m):
            watch[id(c)] = c
    seen: dict[int, list] = {i: [] for i in watch}
    hooks = []
    copy = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731

    def enter(mod, args, kwargs):       # copies: an in-place op later (ReLU(inplace=True))
        seen[id(mod)].append([tuple(copy(a) for a in args), kwargs, None])   # must not change them

    def leave(mod, args, kwargs, out):
        seen[id(mod)][-1][2] = copy(out)

    for m in watch.values():
        hooks.append(m.register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(m.register_forward_hook(leave, with_kwargs=True))
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
                found: list[tuple[str, str, nn.Module]] = []
                full = lambda cn: f"{name}.{cn}" if name else cn  # noqa: E731
                try:
                    for cn, c in _kids(m):
                        real = seen[id(c)]
                        if not real:        # not run when evaluating (an auxiliary classifier
                            found.append((f"drop {full(cn)}", full(cn), None))  # of training)
                            continue
                        if len(real) == 1 and len(real[0][0]) == 1 and not real[0][1] \
                                and not _same(h, real[0][0][0]):
                            g = _find_glue(h, real[0][0][0])
                            if g is not None:
                                found.append((full(cn), f"({g[0]} before {full(cn)})", g[1]))
                                h = g[1](h)
                        h = c(h)
                    if not _close(h, out):
                        g = _find_glue(h, out)
                        if g is not None:
                            found.append((f"after {name}", f"({g[0]} after {full(cn)})", g[1]))
                            h = g[1](h)
                except Exception:  # noqa: BLE001 - the children do not chain
                    h = None
                if not _close(h, out):
                    names = ", ".join(n for n, _ in _kids(m))
                    why = ("its forward adds a skip connection, calls functions between them, "
                           "or reuses one")
                    raise BadInput(
                        f"cannot list the blocks of {label}: running its sub-modules "
                        f"({names}) one after another does not reproduce its output ({why}); "
                        f"early exits need an nn.Sequential or such a chain")
                glue += found
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return glue


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                      and a.shape == b.shape and _close(a, b))
