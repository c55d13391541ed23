"""Early exits on a model that runs its own forward: a Hugging Face transformers model.

A transformers model is not a chain of blocks an ``nn.Sequential`` could run: its forward builds
the attention masks, rotary position embeddings and caches, runs an encoder before a decoder, and
returns a ``ModelOutput``; each architecture (and release) does it its own way. So its own forward
runs, and the exits hook its stack of layers (``bert.encoder.layer``, ``transformer.h``,
``model.layers``; for an encoder-decoder the decoder's, where the output comes from):

- a forward hook after an exit's layer gives the head that layer's hidden states ``(N, seq, C)``
  and the inputs' attention mask (a head pools the tokens the mask keeps, or scores every token);
- at inference (eval mode) the samples whose head is confident leave there: the hook hands the
  next layer the hidden states of the others only, and a pre-hook on each later layer takes the
  same rows of the batch-sized tensors the model passes it (attention masks, the encoder's states
  for cross-attention); when no sample is left the forward stops. After the last layer the rows
  go back in place, so what the model does after its layers (final norm, pooler, classifier, LM
  head) sees the batch it expects; the rows that left cost that part only;
- sequence outputs (a causal LM's or a decoder's ``(N, seq, vocab)`` token scores): a sample
  leaves when every one of its tokens is confident (:func:`.model.confidence`).

What comes back is the model's own output (its ``ModelOutput``) with ``logits`` the exits'.
Caches are off (``use_cache=False``) while exits run: a sample that leaves early has no keys and
values for its later layers. In training mode the model's own forward runs untouched.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ...counting import flop_mode
from ...errors import BadInput, FieldError
from .model import (DEFAULT_THRESHOLD, EarlyExitModel, call_batch, confidence,
                    first_confident)

__all__ = ["HookedExitModel", "find_stack", "chain_stack", "plan_hooked", "TokenPool",
           "TokenStates"]


class _Exited(Exception):
    """Every sample of the batch has left: the model's forward stops here."""


def find_stack(model: nn.Module) -> str | None:
    """The name of a transformers model's stack of layers (a ``ModuleList`` of two or more layers
    of one class, not inside another; a decoder's when there is one, else the longest), or None
    for a model from elsewhere."""
    if not type(model).__module__.startswith("transformers."):
        return None
    lists = [(n, m) for n, m in model.named_modules()
             if n and isinstance(m, nn.ModuleList) and len(m) >= 2
             and len({type(c) for c in m}) == 1]
    tops = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists)]
    if not tops:
        return None
    dec = [(n, m) for n, m in tops if "decoder" in n.split(".")]
    return max(dec or tops, key=lambda t: len(t[1]))[0]


def chain_stack(model: nn.Module, x: torch.Tensor) -> str | None:
    """For a model that is not a chain of its sub-modules (a class token, two heads averaged, a
    function between them): of its top-level ``nn.Sequential`` / ``ModuleList`` children with
    two or more members with weights, the one with the most parameters that its forward runs
    one after another, each member once, each on the one before's output (checked on ``x``):
    timm's ``stages`` / ``blocks`` (not a stem); None if none. HRNet's parallel branches are
    not such a stack."""
    cands = sorted(((n, c) for n, c in model.named_children()
                    if isinstance(c, (nn.Sequential, nn.ModuleList))
                    and sum(any(True for _ in b.parameters()) for b in c) >= 2),
                   key=lambda t: -sum(p.numel() for p in t[1].parameters()))
    was = model.training
    model.eval()
    try:
        for name, stack in cands:
            ins: dict[int, list] = {i: [] for i in range(len(stack))}
            outs: dict[int, list] = {i: [] for i in range(len(stack))}
            hooks = []
            for i, b in enumerate(stack):
                hooks.append(b.register_forward_pre_hook(
                    lambda m, a, i=i: ins[i].append(a[0] if a else None)))
                hooks.append(b.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o)))
            try:
                with torch.no_grad():
                    model(x)
            except Exception:  # noqa: BLE001 - the model fails on the example: no stack
                return None
            finally:
                for h in hooks:
                    h.remove()
            if all(len(ins[i]) == 1 and len(outs[i]) == 1 for i in ins) and all(
                    ins[i][0] is outs[i - 1][0] for i in range(1, len(stack))):
                return name
    finally:
        model.train(was)
    return None


@contextlib.contextmanager
def _after(layers: nn.ModuleList, positions: Sequence[int], fn: Callable[[int, Any], None]):
    """Inside: ``fn(k, output)`` each time layer ``positions[k]`` has run."""
    hooks = [layers[p].register_forward_hook(lambda m, a, o, k=k: fn(k, o))
             for k, p in enumerate(positions)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@functools.lru_cache(maxsize=None)
def _takes_use_cache(cls: type) -> bool:
    return "use_cache" in inspect.signature(cls.forward).parameters


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _rows(v: Any, idx: torch.Tensor, n: int) -> Any:
    """``v`` with rows ``idx`` of each tensor in it of batch ``n`` (2+ dims, dim 0 is ``n``)."""
    if isinstance(v, torch.Tensor):
        return v[idx] if v.dim() >= 2 and v.shape[0] == n else v
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return tuple(_rows(t, idx, n) for t in v)
    if isinstance(v, list):
        return [_rows(t, idx, n) for t in v]
    if type(v) is dict:
        return {k: _rows(t, idx, n) for k, t in v.items()}
    return v


def _put(v: Any, idx: torch.Tensor, n: int, m: int) -> Any:
    """``v`` with each tensor of batch ``m`` in it put back at rows ``idx`` of a batch ``n``."""
    if isinstance(v, torch.Tensor):
        if v.dim() < 2 or v.shape[0] != m:
            return v
        full = v.new_zeros((n,) + tuple(v.shape[1:]))
        full[idx] = v
        return full
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return tuple(_put(t, idx, n, m) for t in v)
    if isinstance(v, list):
        return [_put(t, idx, n, m) for t in v]
    return v


class TokenPool(nn.Module):
    """A head's front for class scores: the mean of the hidden states over the tokens the
    attention mask keeps (all tokens without one)."""

    def forward(self, hm):
        h, mask = hm
        if mask is None or tuple(mask.shape) != tuple(h.shape[:2]):
            return h.mean(dim=1)
        w = mask.to(h.dtype).unsqueeze(-1)
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)


class TokenStates(nn.Module):
    """A head's front for token scores: the hidden states of every token."""

    def forward(self, hm):
        return hm[0]


def make_hooked_head(feature: torch.Tensor, out_dim: int, tokens: bool,
                     init: nn.Module | None = None) -> nn.Sequential:
    """LayerNorm + Linear after :class:`TokenPool` (class scores) or :class:`TokenStates` (token
    scores; the Linear starts as a copy of the model's output embedding ``init`` when it fits,
    as the model's own LM head reads the last layer)."""
    c = int(feature.shape[-1])
    lin = nn.Linear(c, out_dim)
    w = getattr(init, "weight", None)
    if tokens and isinstance(w, torch.Tensor) and tuple(w.shape) == (out_dim, c):
        with torch.no_grad():
            lin.weight.copy_(w.detach().float())
            b = getattr(init, "bias", None)
            lin.bias.copy_(b.detach().float() if isinstance(b, torch.Tensor) else
                           torch.zeros(out_dim))
    return nn.Sequential(TokenStates() if tokens else TokenPool(), nn.LayerNorm(c), lin)


class HookedExitModel(EarlyExitModel):
    """Exits on a model whose own forward runs (see the module's docstring): ``backbone`` is the
    model, ``stack`` the name of its layers, ``exit_after`` indices into them. ``tokens``: the
    scores are per token; ``mask_key``: the input holding the stack's attention mask;
    ``output_class``: the model's ``ModelOutput`` class (what comes back when every sample left
    early)."""

    def __init__(self, backbone: nn.Module | None = None, heads: nn.ModuleList | None = None,
                 exit_after=(), threshold: float = DEFAULT_THRESHOLD, exit_names=(),
                 block_names=(), num_classes: int = 0, stack: str = "", tokens: bool = False,
                 mask_key: str = "", output_class: str = "", pairs: bool = True):
        super().__init__(backbone, heads, exit_after, threshold, exit_names, block_names,
                         num_classes)
        self.stack, self.tokens = str(stack), bool(tokens)
        self.mask_key, self.output_class = str(mask_key), str(output_class)
        self.pairs = bool(pairs)

    def _extra(self) -> dict:
        return dict(stack=self.stack, tokens=self.tokens, mask_key=self.mask_key,
                    output_class=self.output_class, pairs=self.pairs)

    def _head_input(self, h: torch.Tensor, mask: torch.Tensor | None) -> Any:
        """What a head reads: (hidden states, attention mask) for a transformers model's token
        heads (``pairs``), else the feature alone."""
        return (h, mask) if self.pairs else h

    def layers(self) -> nn.ModuleList:
        return self.backbone.get_submodule(self.stack)

    def _n_blocks(self) -> int:
        return len(self.layers())

    def token_mask(self, x: Any) -> torch.Tensor | None:
        m = x.get(self.mask_key) if isinstance(x, Mapping) and self.mask_key else None
        return m if isinstance(m, torch.Tensor) and m.dim() == 2 else None

    def _call(self, x: Any) -> Any:
        """The model's own forward on a batch's inputs, caches off."""
        kw = {"use_cache": False} if _takes_use_cache(type(self.backbone)) else {}
        if isinstance(x, Mapping):
            return self.backbone(**{**kw, **x})
        if isinstance(x, (tuple, list)):
            return self.backbone(*x, **kw)
        return self.backbone(x, **kw)

    def exit_features(self, x: Any) -> tuple[list[Any], torch.Tensor]:
        from ...batches import logits_of

        got: dict[int, torch.Tensor] = {}
        with _after(self.layers(), self.exit_after, lambda k, o: got.__setitem__(k, _hidden(o))):
            out = self._call(x)
        mask = self.token_mask(x)
        return [self._head_input(got[k], mask) for k in range(len(self.exit_after))], \
            logits_of(out)

    # ---------------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        x = call_batch(args, kwargs)
        if x is None or self.training or not len(self.heads):
            return self.backbone(*args, **kwargs)
        return self._exit_forward(x)

    def _exit_forward(self, x: Any) -> Any:
        from ...batches import logits_of

        layers = self.layers()
        mask = self.token_mask(x)
        st: dict[str, Any] = {"idx": None, "n": None, "out": None}
        counts = list(self.exit_counts)

        def pre(mod, args, kwargs):
            if st["idx"] is None:
                return None
            return _rows(args, st["idx"], st["n"]), _rows(kwargs, st["idx"], st["n"])

        def at_exit(k):
            def hook(mod, args, out):
                h = _hidden(out)
                n_now, idx = int(h.shape[0]), st["idx"]
                if st["n"] is None:
                    st["n"] = n_now
                m = mask if mask is None or idx is None else mask[idx.to(mask.device)]
                logits = self.heads[k](self._head_input(h, m))
                if st["out"] is None:
                    st["out"] = logits.new_empty((st["n"],) + tuple(logits.shape[1:]))
                done = confidence(logits, m) >= self.threshold
                rows = done.nonzero().squeeze(1)
                if len(rows):
                    st["out"][rows if idx is None else idx[rows]] = logits[rows]
                    counts[k] += len(rows)
                if len(rows) == n_now:
                    raise _Exited
                if not len(rows):
                    return None
                stay = (~done).nonzero().squeeze(1)
                st["idx"] = stay if idx is None else idx[stay]
                return _rows(out, stay, n_now)
            return hook

        def restore(mod, args, out):
            if st["idx"] is None:
                return None
            return _put(out, st["idx"], st["n"], len(st["idx"]))

        hooks = [layers[j].register_forward_pre_hook(pre, with_kwargs=True)
                 for j in range(self.exit_after[0] + 1, len(layers))]
        hooks += [layers[p].register_forward_hook(at_exit(k))
                  for k, p in enumerate(self.exit_after)]
        hooks.append(layers[len(layers) - 1].register_forward_hook(restore))
        try:
            out = self._call(x)
        except _Exited:
            self.exit_counts = tuple(counts)
            return self._output(st["out"])
        finally:
            for h in hooks:
                h.remove()
        final, idx = logits_of(out), st["idx"]
        counts[-1] += int(final.shape[0]) if idx is None else len(idx)
        self.exit_counts = tuple(counts)
        if idx is None:
            return out
        combined = st["out"]
        combined[idx] = final[idx].to(combined.dtype)
        if isinstance(out, torch.Tensor):
            return combined
        if isinstance(out, Mapping):
            out["logits"] = combined
            return out
        return (combined,) + tuple(out[1:])

    def _output(self, logits: torch.Tensor) -> Any:
        """The model's own output class holding ``logits`` (every sample left early)."""
        if self.output_class.startswith("transformers."):
            mod, _, name = self.output_class.rpartition(".")
            try:
                return getattr(importlib.import_module(mod), name)(logits=logits)
            except (ImportError, AttributeError, TypeError):
                pass
        return logits

    # ---------------------------------------------------------------------- costs
    def segment_flops(self, example_input: Any) -> tuple[list[int], list[int], int]:
        at: dict[int, int] = {}
        got: dict[int, torch.Tensor] = {}

        def seen(k, o):
            at[k], got[k] = c.get_total_flops(), _hidden(o)

        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                with flop_mode() as c, _after(self.layers(), self.exit_after, seen):
                    self._call(example_input)
                full = c.get_total_flops()
                mask, heads = self.token_mask(example_input), []
                for k, hd in enumerate(self.heads):
                    with flop_mode() as ch:
                        hd(self._head_input(got[k], mask))
                    heads.append(int(ch.get_total_flops()))
        finally:
            self.train(was)
        return [int(at[k]) for k in range(len(self.heads))], heads, int(full)


# ------------------------------------------------------------------------------------ the plan

def plan_hooked(model: nn.Module, stack: str, x: Any, names: list[str], every: int | None,
                open_all: bool, pairs: bool = True):
    """(Plan, the :class:`HookedExitModel` arguments it adds) for exits after the layers of
    ``stack``: a transformers model's (``pairs``: token heads), or a model's stack of blocks
    found by :func:`chain_stack`; ``x``: a few samples' inputs (checked on them)."""
    from ...batches import forward_batch, logits_of
    from .blocks import Plan

    layers = model.get_submodule(stack)
    L = len(layers)
    blocks = [(f"{stack}.{i}", layers[i]) for i in range(L)]
    index = {n: i for i, (n, _) in enumerate(blocks)}
    if names:
        pos = []
        for n in names:
            i = index.get(n, index.get(f"{stack}.{n}"))
            if i is None:
                raise FieldError(f"{{exits}}: exits on {type(model).__name__} go after its "
                                 f"layers {stack}.0 .. {stack}.{L - 1} (or their indices 0.."
                                 f"{L - 1}); {n!r} is not one of them")
            pos.append(i)
        if len(set(pos)) != len(pos):
            raise FieldError("{exits} names a layer twice")
        positions = sorted(pos)
        if positions[-1] == L - 1:
            raise FieldError(f"{{exits}}: {stack}.{L - 1} is the last layer: an exit there "
                             f"saves nothing")
    else:
        k = 1 if open_all else (every or max(1, round(L / 5)))
        positions = list(range(k - 1, L - 1, k))
        if not positions:
            raise FieldError(f"{{every={every}}} puts no exit among the {L} layers of {stack}")
    got: dict[int, torch.Tensor] = {}
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), _after(layers, positions,
                                     lambda k, o: got.__setitem__(k, _hidden(o))):
            out = forward_batch(model, x)
    finally:
        model.train(was)
    try:
        logits = logits_of(out)
    except BadInput as e:
        raise BadInput(f"early exits need class or token scores: {e}") from None
    feats = [got.get(k) for k in range(len(positions))]
    if not pairs:
        return _plan_stack(model, stack, blocks, positions, feats, logits, x)
    if any(not (isinstance(f, torch.Tensor) and f.dim() == 3 and f.is_floating_point())
           for f in feats):
        raise BadInput(f"the layers of {stack} do not give hidden states (N, seq, C): early "
                       f"exits cannot read them")
    tokens = logits.dim() == 3
    if tokens and logits.shape[1] != feats[0].shape[1]:
        raise BadInput(f"{type(model).__name__} scores {logits.shape[1]} positions but its "
                       f"layers {stack} hold {feats[0].shape[1]}: early exits need one score "
                       f"per position of the layers")
    if logits.dim() not in (2, 3):
        raise BadInput(f"the model's scores have shape {tuple(logits.shape)}: early exits need "
                       f"class scores (N, classes) or token scores (N, seq, vocab)")
    cls = type(out)
    extra = dict(stack=stack, tokens=tokens, pairs=True,
                 mask_key="decoder_attention_mask" if "decoder" in stack.split(".")
                 else "attention_mask",
                 output_class=f"{cls.__module__}.{cls.__qualname__}"
                 if cls.__module__.startswith("transformers.") else "")
    plan = Plan(blocks, positions, [blocks[p][0] for p in positions], feats,
                int(logits.shape[-1]), [False] * len(positions), [])
    return plan, extra


def _plan_stack(model, stack, blocks, positions, feats, logits, x):
    """The plan on a stack of blocks (not a transformers model): feature maps or tokens, class
    scores; checked that dropping the samples that leave from the later blocks gives each
    sample what the rule says (with untrained heads and a threshold that splits the batch)."""
    from .blocks import Plan, channels_last, make_head

    if logits.dim() != 2:
        raise BadInput(f"the model's output has shape {tuple(logits.shape)}: early exits need "
                       f"class scores of shape (N, classes)")
    for p, f in zip(positions, feats):
        if not (isinstance(f, torch.Tensor) and 2 <= f.dim() <= 5 and f.is_floating_point()):
            raise FieldError(f"{{exits}}: the output of {blocks[p][0]} is not a float feature "
                             f"tensor (N, C[, ...]) a head can read")
    layout = [channels_last(f, blocks[p][1], [m for _, m in blocks[p + 1:]])
              for p, f in zip(positions, feats)]
    plan = Plan(blocks, positions, [blocks[p][0] for p in positions], feats,
                int(logits.shape[1]), layout, [])
    extra = dict(stack=stack, tokens=False, mask_key="", output_class="", pairs=False)
    heads = nn.ModuleList(make_head(f, plan.num_classes, 4, "pool", last)
                          for f, last in zip(feats, layout)).to(logits.device, logits.dtype)
    ee = HookedExitModel(model, heads, positions, exit_names=plan.names, **extra).eval()
    with torch.no_grad():
        outs = ee.forward_all(x)
        ee.threshold = float(torch.cat([confidence(o) for o in outs[:-1]]).median())
        try:
            got = ee(x)
        except Exception as e:  # noqa: BLE001
            got = e
        want = first_confident(outs, ee.threshold)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or \
            not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
        raise BadInput(f"{type(model).__name__} is not a chain of blocks, and its {stack} "
                       f"cannot run on the samples that stay alone (its forward mixes the "
                       f"samples of a batch, or needs the whole batch after them)")
    return plan, extra
