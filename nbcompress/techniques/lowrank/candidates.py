"""Which layers ``%lowrank`` factorises: every ``nn.Linear`` / ``nn.Conv2d`` (each module once,
with all its paths), less the convs with ``conv='none'``, those ``layers`` does not match, the
classifier unless ``layers`` selects it, and layers whose weight is shared with another module."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

from torch import nn

from ...batches import output_layers
from ...core import BadInput, FieldError
from ...layers import is_plain, param_owners, shared_with, subclass_notes

_FACTORABLE = (nn.Linear, nn.Conv2d)

Candidate = tuple[str, nn.Module, list[str]]       # (name, module, every path to it)


def candidates(model: nn.Module, layers: str | None, conv: str, example: Any = None
               ) -> tuple[list[Candidate], list[str]]:
    """(layers to consider as (name, module, all paths), notes on layers passed over).
    ``example``: an input the model runs on, to find the classifier (:func:`output_layers`)."""
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if is_plain(m, _FACTORABLE):         # subclasses computing the same; Conv1D a Linear
            paths.setdefault(id(m), []).append(name)
    found = [(ps[0], m, ps) for m in model.modules() if (ps := paths.get(id(m)))]
    every = [(n, m) for n, m, _ in found]
    if not found:
        kinds = Counter(type(m).__name__ for m in model.modules()
                        if m is not model and not any(True for _ in m.children()))
        what = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(kinds.items())) or \
            f"only the {type(model).__name__} itself, no sub-modules"
        raise BadInput(f"no nn.Linear or nn.Conv2d layer to factorise in this "
                       f"{type(model).__name__} (found: {what})")
    notes: list[str] = subclass_notes(model, _FACTORABLE, re.compile(layers) if layers else None)
    if conv == "none":
        convs = [n for n, m, _ in found if isinstance(m, nn.Conv2d)]
        found = [f for f in found if not isinstance(f[1], nn.Conv2d)]
        if not found:
            raise FieldError(f"{{conv='none'}} leaves nothing to factorise: the model's layers are "
                             f"all Conv2d ({', '.join(convs[:6])}{', ...' if len(convs) > 6 else ''})")
    if layers is not None:
        pat = re.compile(layers)            # a valid regular expression: a declared check
        names = [n for n, _, _ in found]
        found = [f for f in found if any(pat.search(p) for p in f[2])]
        if not found:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise FieldError(f"{{layers}} {layers!r} matches no Linear/Conv2d layer "
                             f"(the layers are: {shown})")
    else:
        found = _without_classifier(model, found, every, example, notes)
    # parameters shared with another module (weight tying) cannot be replaced in one place
    owners = param_owners(model)
    kept = []
    for name, m, ps in found:
        shared = shared_with(m, ps, owners)
        if shared:
            notes.append(f"kept {name}: its weight is shared with {shared[0]} (tied: "
                         f"factorising it would untie the two)")
            continue
        kept.append((name, m, ps))
    if not kept:
        raise BadInput("no layer left to factorise: " + "; ".join(notes))
    return kept, notes


def _without_classifier(model: nn.Module, found: list[Candidate], every, example,
                        notes: list[str]) -> list[Candidate]:
    """The layer(s) producing the model's output stay whole unless ``layers`` selects them: a low
    rank there cuts straight into the class scores for a small saving."""
    outs = output_layers(model, every, example)
    heads = [f for f in found if f[0] in outs]
    if not heads:
        return found
    found = [f for f in found if f[0] not in outs]
    names = ", ".join(n for n, _, _ in heads)
    many = len(heads) > 1
    if not found:
        raise FieldError(f"the only layer{'s' if many else ''} to factorise "
                         f"{'are the classifiers' if many else 'is the classifier'} "
                         f"{names} (producing the model's output), kept whole by "
                         f"default: give {{layers}} to factorise "
                         f"{'them' if many else 'it'} anyway ({{layers='.'}} selects every "
                         f"layer)")
    n_head = sum(own_params(m) for _, m, _ in heads)
    total = sum(p.numel() for p in model.parameters())
    share = f"{100 * n_head / total:.2g}%" if total else "?"
    notes.append(f"kept the classifier{'s' if many else ''} {names} whole "
                 f"({'they produce' if many else 'it produces'} the model's output; "
                 f"{n_head:,} parameters, {share} of the model): use {{layers}} to "
                 f"include {'them' if many else 'it'} ({{layers='.'}} selects every layer)")
    return found


def own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def replace(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (a dotted module path) in ``model``."""
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
