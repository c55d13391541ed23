"""The Python verb: :func:`quantize` returns a quantized copy of a model."""
from __future__ import annotations

from torch import nn

from ...core import compress
from .config import QuantizeConfig

__all__ = ["quantize"]


def quantize(model: nn.Module, bits: int | None = None, **options) -> nn.Module:
    """Quantize a copy of ``model`` and return it (the argument is not changed).

    ``nbcompress.quantize(model)`` picks int8 with the fastest real kernel; options are the
    fields of :class:`QuantizeConfig` (``bits``, ``mode``, ``dtype``, ``per_channel``,
    ``symmetric``, ``huffman``, ``calib`` / ``qat`` DataLoaders, ``epochs``, ``lr``, ``layers``,
    ``device``, ...). ``example_input`` (a tensor) lets a ``dtype`` cast be checked on the device
    before returning.
    """
    example_input = options.pop("example_input", None)
    QuantizeConfig.check_options(options, "quantize")
    return compress(model, QuantizeConfig(bits=bits, **options), example_input=example_input).model
