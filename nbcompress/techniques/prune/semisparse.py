"""2:4 weights that run faster: :class:`SemiSparseLinear`, an ``nn.Linear`` whose inference
forward on an NVIDIA GPU of compute capability 8.0 or newer goes through torch's semi-structured
sparse kernels (``torch.sparse.to_sparse_semi_structured``: CUTLASS or cuSPARSELt), and is a plain
``F.linear`` everywhere else (CPU, training, counting FLOPs).

The dense, masked weight stays the layer's parameter: the history, storage, fine-tuning and
export see an ``nn.Linear``. The compressed copy (about 9/16 of the dense bytes in fp16) is made
on the first inference forward on the GPU and kept per weight tensor and version in a weak cache,
so it follows in-place changes and goes when the weight goes. A weight the kernels refuse (its
shape, its dtype, the GPU) is remembered and runs dense; ``STATS`` counts both, so a check can
tell whether the sparse path really ran.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["SemiSparseLinear", "dense_only", "semi_structured_ready", "to_semi_sparse", "STATS"]

STATS = {"sparse": 0, "dense": 0}
_DENSE_ONLY = [0]          # > 0 inside dense_only()
_CACHE = WeakIdKeyDictionary()      # weight tensor -> (its version, the sparse copy or None)


def semi_structured_ready(device: torch.device | str) -> bool:
    """Whether ``device`` has the 2:4 sparse kernels (CUDA, compute capability 8.0+)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 0)


def _counting() -> bool:
    """Inside ``FlopCounterMode``: run dense, so FLOPs are counted as the dense op (the sparse
    kernels have no FLOP formula; the sparse-aware count is made separately)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    from torch.utils.flop_counter import FlopCounterMode

    return any(isinstance(m, FlopCounterMode) for m in _get_current_dispatch_mode_stack())


class dense_only(contextlib.ContextDecorator):
    """Run every :class:`SemiSparseLinear` dense inside (the reference a sparse kernel's output is
    compared with)."""

    def __enter__(self):
        _DENSE_ONLY[0] += 1
        return self

    def __exit__(self, *exc):
        _DENSE_ONLY[0] -= 1
        return False


def _sparse_weight(w: torch.Tensor):
    """The semi-structured copy of ``w`` (cached per version), or None where the kernels refuse
    it (remembered, so the refusal costs once)."""
    hit = _CACHE.get(w)
    if hit is not None and hit[0] == w._version:
        return hit[1]
    try:
        from torch.sparse import to_sparse_semi_structured

        sparse = to_sparse_semi_structured(w.detach())
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        sparse = None
    _CACHE[w] = (w._version, sparse)
    return sparse


class SemiSparseLinear(nn.Linear):
    """An ``nn.Linear`` pruned to 2:4 (see the module docstring). Made from a Linear in place by
    :func:`to_semi_sparse`; saved, loaded and copied like any Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.is_cuda and not (torch.is_grad_enabled() and w.requires_grad)
                and not _DENSE_ONLY[0] and semi_structured_ready(x.device) and x.dtype == w.dtype
                and not _counting()):
            sparse = _sparse_weight(w)
            if sparse is not None:
                try:
                    out = F.linear(x, sparse, self.bias)
                except (RuntimeError, NotImplementedError):
                    _CACHE[w] = (w._version, None)      # this input shape: dense from now on
                else:
                    STATS["sparse"] += 1
                    return out
        STATS["dense"] += 1
        return F.linear(x, w, self.bias)


def to_semi_sparse(module: nn.Module) -> bool:
    """Turn a plain ``nn.Linear`` into a :class:`SemiSparseLinear` in place (same object, same
    parameters and hooks); False for anything else (subclasses keep their own forward)."""
    if type(module) is nn.Linear:
        module.__class__ = SemiSparseLinear
        return True
    return type(module) is SemiSparseLinear
