"""Quantization: fewer bits per weight (and, with int8 kernels, per activation).

One verb, :func:`quantize` (``%quantize``), five modes plus a cast:

* ``dynamic``: int8 weights, activations quantized per batch on the fly, real int8 CPU kernels
  (Linear, LSTM, GRU layers). The right choice for Linear/LSTM-heavy models; no data needed.
* ``static``: int8 weights *and* activations with ranges calibrated on ``calib`` batches, real int8
  CPU kernels for Conv1d/2d/3d and Linear; BatchNorm after a conv is folded into it and a ReLU
  after it fused into the kernel. The right choice for conv nets.
* ``uniform``: B-bit integer codes (1..8 bits), per-tensor or per-output-channel scales,
  symmetric or asymmetric, the scale chosen to minimise the weight's squared error. Simulated:
  codes are dequantized in every forward (no B-bit kernels), but *stored packed*:
  ``nbcompress.save`` writes B bits per weight.
* ``cluster``: weight sharing as in Deep Compression (Han et al., 2016): k-means with 2^B centroids
  per layer, linearly initialised between the smallest and largest weight, over the nonzero
  weights only (pruned zeros stay zero); each weight becomes its centroid. The file then holds a
  codebook and one index per weight (Huffman-coded with ``huffman=True``), and the positions of
  the nonzeros for a pruned layer.
* ``binary``: w = sign(w) * scale per output channel (scale = mean |w|, the L2-optimal one).
* ``dtype="fp16"|"bf16"``: cast the model (or the ``layers``) and wrap it so float32 inputs are
  cast on the way in and outputs back to float32 on the way out.

``qat=loader`` (uniform, cluster, binary) fine-tunes with the shared :func:`nbcompress.train.fit`
loop. Uniform and binary train a real-valued shadow copy of each weight through a
straight-through estimator (the forward sees the quantized weight, the gradient updates the
shadow); cluster training updates the shared centroids (each centroid's gradient is the sum over
its weights). The shadows exist only during training: the result stores codes and scales.

Without ``mode`` (``%quantize model``) the fastest real int8 kernel for the model's layers on its
device is chosen and the step says which: static int8 when calibration data is given, else
dynamic int8 for the Linear/LSTM/GRU layers. ``torch.ao`` int8 kernels are CPU-only: a model
that lives on the CPU is quantized there (whatever the work device); for a model on CUDA the
automatic choice is bf16 (fp16 where bf16 is not supported), and asking for int8 is bad input.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .core import BadInput, CompressionResult, StepConfig, StepContext, compress, register_technique
from .metrics import is_loader
from .qmodules import (STATIC_CONV, DynamicInt8GRU, DynamicInt8Linear, DynamicInt8LSTM,
                       QuantizedWeightLayer, ReducedPrecision, StaticInt8Linear, compact_float,
                       quiet, round_scale)

__all__ = ["QuantizeConfig", "quantize", "uniform_quantize", "binarize", "kmeans_cluster",
           "int8_kernel_backend", "demo_config", "MODES"]

MODES = ("dynamic", "static", "uniform", "cluster", "binary")
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU)
STATIC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
AUTO_LAYERS = STATIC_LAYERS + (nn.LSTM, nn.GRU)
_CONV_OP = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
_DEFAULT_BITS = {"uniform": 8, "cluster": 5, "binary": 1, "dynamic": 8, "static": 8}
_DEFAULT_LR = {"uniform": 1e-4, "cluster": 1e-4, "binary": 1e-3}


# ------------------------------------------------------------------------- int8 kernel choice

def int8_kernel_backend(device: torch.device | str = "cpu") -> str | None:
    """Which library provides the int8 kernels ``dynamic`` and ``static`` run on, or None when
    there is none for ``device``. The one place this choice is made.

    ``torch.ao.quantization`` is deprecated upstream in favour of torchao (``quantize_`` and the
    PT2E flow), which we would prefer as the maintained path. We measured both on this project's
    CPU (AMD EPYC, AVX-512 VNNI, x86 engine, one thread, batch 64, each candidate alternated with
    fp32, median; ``benchmarks/bench_quantize.py`` re-measures it), speed-up over fp32:

    ==========================  ===============  =================  =================  ========
    model                       torch.ao int8    torchao int8 dyn   torchao int8       torchao
                                (ours)           act. + weight      weight-only        PT2E
    ==========================  ===============  =================  =================  ========
    LeNet-300-100 (dynamic)     2.2x             0.46x (slower)     0.87x (slower)     -
    MLP 784-1024-4096-1024-10   6.2x             1.4x               0.82x (slower)     -
    SmallResNet (static)        2.9x             -                  -                  0.74x
    ==========================  ===============  =================  =================  ========

    torchao's eager int8 configs lose here (their CPU path is not a fused int8 GEMM), and PT2E
    without ``torch.compile`` runs reference quantize / fp32 op / dequantize graphs; with
    ``torch.compile`` it would need a compile per model, which a stored model cannot keep. So
    torch.ao it is, until it is removed (then: torchao ``quantize_`` + ``torch.compile``).
    torch.ao's quantized kernels are CPU-only: for other devices this returns None.
    """
    dev = torch.device(device)
    if dev.type != "cpu":
        return None
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "qnnpack", "onednn")):
        return None
    return "torch.ao"


def _engine() -> str:
    return torch.backends.quantized.engine


# ----------------------------------------------------------------------------- weight maths

_RATIOS = torch.linspace(1.0, 0.5, 16).tolist()


def uniform_quantize(w: torch.Tensor, bits: int, *, per_channel: bool = True,
                     symmetric: bool = True, search: bool = True):
    """B-bit codes of ``w``: ``(codes, scale, zero_point)`` with ``w ~ (codes - zero_point) *
    scale`` (``zero_point`` None when symmetric), scales per output channel (dim 0) or one.

    Symmetric: codes in [-(2^(B-1) - 1), 2^(B-1) - 1] (int8); 1 bit symmetric is the binary
    grid {-scale, +scale} (see :func:`binarize`). Asymmetric: codes in [0, 2^B - 1] (uint8), the
    range widened to hold 0 so that zero weights stay exactly zero. ``search``: the clipping range
    is shrunk from the full min/max (ratios 1.0 down to 0.5) to the one with the smallest squared
    error per channel: at 4 bits this is worth a lot of accuracy, at 8 bits little.
    """
    if symmetric and bits == 1:
        rows = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
        codes, scale = _binarize_rows(rows)
        return codes.reshape(w.shape), scale, None
    rows = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
    ratios = _RATIOS if search else [1.0]
    best_scale = best_zp = best_err = None
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = rows.abs().amax(1)
        for r in ratios:
            scale = round_scale(torch.where(amax > 0, amax * r / qmax, torch.ones_like(amax)))
            q = torch.clamp(torch.round(rows / scale[:, None]), -qmax, qmax)
            err = ((q * scale[:, None] - rows) ** 2).sum(1)
            if best_err is None:
                best_scale, best_err = scale, err
            else:
                better = err < best_err
                best_scale = torch.where(better, scale, best_scale)
                best_err = torch.where(better, err, best_err)
        codes = torch.clamp(torch.round(rows / best_scale[:, None]), -qmax, qmax).to(torch.int8)
    else:
        qmax = 2 ** bits - 1
        lo = rows.amin(1).clamp(max=0)
        hi = rows.amax(1).clamp(min=0)
        for r in ratios:
            span = (hi - lo) * r
            scale = round_scale(torch.where(span > 0, span / qmax, torch.ones_like(span)))
            zp = torch.clamp(torch.round(-lo * r / scale), 0, qmax)
            q = torch.clamp(torch.round(rows / scale[:, None]) + zp[:, None], 0, qmax)
            err = (((q - zp[:, None]) * scale[:, None] - rows) ** 2).sum(1)
            if best_err is None:
                best_scale, best_zp, best_err = scale, zp, err
            else:
                better = err < best_err
                best_scale = torch.where(better, scale, best_scale)
                best_zp = torch.where(better, zp, best_zp)
                best_err = torch.where(better, err, best_err)
        codes = torch.clamp(torch.round(rows / best_scale[:, None]) + best_zp[:, None], 0, qmax)
        codes = codes.to(torch.uint8)
        best_zp = best_zp.to(torch.uint8)
    return codes.reshape(w.shape), best_scale, best_zp


def binarize(w: torch.Tensor):
    """``(codes, scale)``: codes = sign(w) in {-1, +1} (0 counts as +1) as int8, scale = mean |w|
    per output channel (the scale that minimises ``||w - codes * scale||``)."""
    codes, scale = _binarize_rows(w.detach().float().reshape(w.shape[0], -1))
    return codes.reshape(w.shape), scale


def _binarize_rows(rows: torch.Tensor):
    codes = torch.where(rows >= 0, 1, -1).to(torch.int8)
    scale = rows.abs().mean(1)
    scale = round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)))
    return codes, scale


def _dequant(codes, scale, zp, per_channel: bool) -> torch.Tensor:
    shape = (-1,) + (1,) * (codes.dim() - 1) if per_channel else (1,) * codes.dim()
    c = codes.float()
    if zp is not None:
        c = c - zp.float().reshape(shape)
    return c * scale.float().reshape(shape)


def kmeans_cluster(w: torch.Tensor, bits: int, *, iters: int = 3000):
    """Deep Compression weight sharing for one tensor: ``(centroids, index)``.

    k-means (Lloyd) in one dimension over the *nonzero* entries of ``w`` with ``k = 2^bits``
    centroids, initialised linearly between their min and max (the paper's best initialisation:
    it keeps centroids for the rare large weights). ``index`` has ``w``'s shape: the centroid of
    each entry, or -1 for a zero entry (which stays zero). Fewer distinct nonzero values than k
    give one centroid per value. Runs to convergence (assignments unchanged) or ``iters``.

    In one dimension each cluster is a contiguous run of the sorted values, so an iteration is k
    binary searches and k differences of a prefix sum, not a pass over all weights.
    """
    flat = w.detach().reshape(-1).float()
    nz = flat != 0
    vals = flat[nz]
    index = torch.full(flat.shape, -1, dtype=torch.long, device=flat.device)
    if vals.numel() == 0:
        return vals.new_zeros(0), index.reshape(w.shape)
    k = 2 ** bits
    srt, _ = torch.sort(vals)
    uniq = torch.unique_consecutive(srt)
    if uniq.numel() <= k:
        centroids = uniq
        index[nz] = torch.searchsorted(uniq, vals)
        return centroids, index.reshape(w.shape)
    # the small per-iteration arrays (k entries) are cheaper in numpy than as torch ops
    s_np = srt.double().cpu().numpy()
    csum = np.concatenate([[0.0], np.cumsum(s_np)])
    cent = np.linspace(s_np[0], s_np[-1], k)
    bounds = None
    for _ in range(iters):
        mid = ((cent[1:] + cent[:-1]) / 2).astype(np.float32)
        # values <= mid[j] go to cluster j (the same tie rule as the final searchsorted below)
        inner = np.searchsorted(s_np, mid, side="right")
        new_bounds = np.concatenate([[0], inner, [s_np.size]])
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
        counts = np.diff(bounds)
        sums = csum[bounds[1:]] - csum[bounds[:-1]]
        cent = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), cent))
    centroids = torch.from_numpy(cent).float().to(srt.device)
    mid = (centroids[1:] + centroids[:-1]) / 2
    index[nz] = torch.searchsorted(mid, vals)
    return centroids, index.reshape(w.shape)


def _shared_weight(centroids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    table = torch.cat([centroids, centroids.new_zeros(1)])
    return table[torch.where(index >= 0, index, centroids.numel())]


# ------------------------------------------------------------------------ QAT parametrizations

class _FakeQuantize(nn.Module):
    """weight -> its quantized value in the forward pass, identity in the backward pass
    (straight-through estimator): ``w + (q(w) - w).detach()``. The parametrized module's
    ``original`` is the real-valued shadow the optimizer updates."""

    def __init__(self, quantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, w):
        return w + (self.quantizer(w) - w).detach()


class _SharedWeights(nn.Module):
    """weight -> centroids[index] (zeros stay zero): training updates the centroids, each by the
    sum of the gradients of the weights that share it (Deep Compression's fine-tuning)."""

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.register_buffer("index", index)

    def forward(self, w):
        return _shared_weight(self.centroids, self.index).to(w.dtype)


# ---------------------------------------------------------------------------------- config

@register_technique
@dataclass
class QuantizeConfig(StepConfig):
    """What ``%quantize`` does (see the module docstring for the modes).

    ``bits``: 1..8 (int8 modes: 8; uniform default 8, cluster 5, binary 1). ``mode``: one of
    :data:`MODES` or None (automatic int8). ``dtype``: "fp16" | "bf16" (a cast instead of a mode).
    ``per_channel``: one scale per output channel (default one per tensor; binary is always per
    channel). ``symmetric``: uniform codes around zero (False: asymmetric with a zero point).
    ``huffman``: let storage Huffman-code the layers' codes/indices and sparse positions (without
    it the quantized layers are stored with fixed-width codes). ``calib``: DataLoader for static
    int8 ranges (``calib_batches`` batches used). ``qat``: DataLoader to fine-tune on for
    ``epochs`` at ``lr``. ``layers``: regex; only modules whose name it matches (``re.search``).
    """

    technique: ClassVar[str] = "quantize"
    bits: int | None = None
    mode: str | None = None
    dtype: str | None = None
    per_channel: bool = False
    symmetric: bool = True
    huffman: bool = False
    calib: Any = None
    qat: Any = None
    epochs: int | None = None
    lr: float | None = None
    layers: str | None = None
    calib_batches: int = 16
    seed: int = 0

    # ------------------------------------------------------------------ checks
    def validate(self, model: nn.Module) -> None:
        for flag, v in (("--per-channel", self.per_channel), ("symmetric", self.symmetric),
                        ("--huffman", self.huffman)):
            if not isinstance(v, bool):
                raise BadInput(f"{flag} must be True or False; got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise BadInput(f"--seed must be an integer; got {self.seed!r}")
        if self.layers is not None and not isinstance(self.layers, str):
            raise BadInput(f"--layers must be a regular expression (a string); got "
                           f"{type(self.layers).__name__}")
        if self.mode is not None and (not isinstance(self.mode, str) or self.mode not in MODES):
            raise BadInput(f"--mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.dtype is not None:
            if not isinstance(self.dtype, str) or self.dtype.lower() not in DTYPES:
                raise BadInput(f"--dtype must be fp16 or bf16; got {self.dtype!r}")
            if self.mode is not None or self.bits is not None:
                raise BadInput("--dtype casts the weights to fp16/bf16; it does not combine with "
                               "--mode or --bits")
            for flag, on in (("--qat", self.qat is not None), ("--calib", self.calib is not None),
                             ("--huffman", self.huffman), ("--per-channel", self.per_channel)):
                if on:
                    raise BadInput(f"{flag} does not apply to a --dtype cast")
        if self.bits is not None:
            if isinstance(self.bits, bool) or not isinstance(self.bits, int) \
                    or not 1 <= self.bits <= 8:
                raise BadInput(f"--bits must be an integer from 1 to 8; got {self.bits!r}")
        mode = self._mode_without_device()
        if mode in ("dynamic", "static") and self.bits not in (None, 8):
            raise BadInput(f"--mode {mode} runs int8 kernels (--bits 8); for {self.bits}-bit "
                           f"weights use --mode uniform or --mode cluster")
        if mode == "binary" and self.bits not in (None, 1):
            raise BadInput(f"--mode binary stores 1 bit per weight; got --bits {self.bits}")
        if mode == "static" and self.calib is None:
            raise BadInput("--mode static needs calibration data: add --calib LOADER (a few "
                           "batches of typical inputs set the activation ranges)")
        if self.calib is not None:
            if not is_loader(self.calib):
                raise BadInput(f"--calib must be a DataLoader, got {type(self.calib).__name__}")
            if mode not in (None, "static", "auto"):
                raise BadInput(f"--calib sets activation ranges for static int8; it does not "
                               f"apply to --mode {mode}")
        if self.qat is not None:
            if not is_loader(self.qat):
                raise BadInput(f"--qat must be a DataLoader, got {type(self.qat).__name__}")
            if mode not in ("uniform", "cluster", "binary"):
                raise BadInput("--qat trains --mode uniform, cluster or binary; int8 kernels "
                               "(dynamic/static) are converted without training (for int8 QAT use "
                               "--mode uniform --bits 8 --qat LOADER)")
        if self.epochs is not None:
            if self.qat is None:
                raise BadInput("--epochs needs --qat LOADER (the data to train on)")
            if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
                raise BadInput(f"--epochs must be a positive integer; got {self.epochs!r}")
        if self.lr is not None:
            if self.qat is None:
                raise BadInput("--lr needs --qat LOADER")
            if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) \
                    or not math.isfinite(self.lr) or self.lr <= 0:
                raise BadInput(f"--lr must be a positive number; got {self.lr!r}")
        if not self.symmetric and mode not in ("uniform",):
            raise BadInput("--asymmetric applies to --mode uniform (int8 kernels use symmetric "
                           "weights, binary and cluster have no zero point)")
        if self.per_channel and mode == "cluster":
            raise BadInput("--per-channel does not apply to --mode cluster (one codebook per "
                           "layer)")
        if isinstance(self.calib_batches, bool) or not isinstance(self.calib_batches, int) \
                or self.calib_batches < 1:
            raise BadInput(f"--calib-batches must be a positive integer; got "
                           f"{self.calib_batches!r}")
        pattern = self._pattern()
        if mode == "dtype":
            if not any(p.is_floating_point() for p in model.parameters()):
                raise BadInput(f"--dtype: the model has no floating-point weights to cast; it "
                               f"has: {_types_found(model)}")
            return
        kinds = self._layer_types(mode)
        found = _select(model, kinds, None)
        if not found:
            raise BadInput(f"no quantizable layer for {self._what(mode)} "
                           f"({_names(kinds)}) in the model; it has: {_types_found(model)}")
        if pattern is not None and not any(pattern.search(n) for n, _ in found):
            raise BadInput(f"--layers {self.layers!r} matches none of the quantizable layers: "
                           f"{', '.join(n or '(model)' for n, _ in found[:12])}"
                           f"{' ...' if len(found) > 12 else ''}")

    def _pattern(self):
        if self.layers is None:
            return None
        try:
            return re.compile(self.layers)
        except re.error as e:
            raise BadInput(f"--layers is not a valid regular expression: {e}") from None

    def _mode_without_device(self) -> str | None:
        if self.dtype is not None:
            return "dtype"
        if self.mode is not None:
            return self.mode
        if self.bits is not None and self.bits < 8:
            return "uniform"
        if self.qat is not None:
            return "uniform"
        return None   # automatic int8, decided with the device in run()

    @staticmethod
    def _layer_types(mode: str | None) -> tuple:
        if mode == "dynamic":
            return DYNAMIC_LAYERS
        if mode is None:
            return AUTO_LAYERS
        if mode == "static":
            return STATIC_LAYERS
        return WEIGHT_LAYERS

    @staticmethod
    def _what(mode) -> str:
        return {None: "int8", "dtype": "a cast"}.get(mode, f"--mode {mode}")

    # ------------------------------------------------------------------ run
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        from .train import check_loader_runs

        check_loader_runs(model, self.calib, "--calib", ctx.device, labels=False)  # inputs only
        check_loader_runs(model, self.qat, "--qat", ctx.device)
        mode, notes = self._choose(model, ctx.device, ctx.origin_device)
        pattern = self._pattern()
        if mode.startswith("dtype"):
            return self._cast(model, ctx, notes, pattern, mode.partition(":")[2] or self.dtype)
        targets = _select(model, self._layer_types(mode), pattern)
        if mode == "dynamic":
            return self._dynamic(model, targets, notes)
        if mode == "static":
            return self._static(model, ctx, targets, notes)
        if mode == "cluster":
            return self._cluster(model, ctx, targets, notes)
        return self._codes(model, ctx, targets, notes, mode)

    def _choose(self, model: nn.Module, device: torch.device,
                origin: torch.device | None = None) -> tuple[str, list[str]]:
        """The mode to run (the automatic int8 choice included), and why. ``device``: the work
        device; ``origin``: where the model lives and the result goes back to. torch.ao's int8
        kernels run on the CPU only, so int8 needs a model that lives on the CPU (it is then
        quantized on the CPU whatever the work device)."""
        notes: list[str] = []
        mode = self._mode_without_device()
        origin = device if origin is None else origin
        backend = int8_kernel_backend("cpu")
        if mode in ("dynamic", "static"):
            if backend is None:
                raise BadInput(f"this PyTorch build has no int8 CPU kernels (quantized engines: "
                               f"{torch.backends.quantized.supported_engines}); use --mode "
                               f"uniform or --dtype bf16")
            if origin.type != "cpu":
                raise BadInput(f"int8 kernels (torch.ao) run on CPU only and the model lives on "
                               f"{origin}: move it to the CPU first (model = model.cpu()), or use "
                               f"--dtype bf16/fp16 or --mode uniform there")
            if device.type != "cpu":
                notes.append(f"int8 kernels run on the CPU: quantized there, not on {device}")
            return mode, notes
        if mode is not None:
            return mode, notes
        # automatic: the fastest real kernel for these layers where the model lives
        if origin.type != "cpu" or backend is None:
            where = origin if origin.type != "cpu" else device
            if self.bits == 8:
                notes.append(f"no int8 kernels on {where} (torch.ao's are CPU-only): 8-bit "
                             f"uniform codes instead, stored packed, dequantized in forward")
                return "uniform", notes
            dt = "bf16" if where.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
            notes.append(f"chose {dt}: torch.ao's int8 kernels are CPU-only and this model runs "
                         f"on {where}, where {dt} has native kernels (for int8, move the model "
                         f"to the CPU)")
            return "dtype:" + dt, notes
        pattern = self._pattern()
        convs = [n for n, m in _select(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d), pattern)]
        linears = [n for n, m in _select(model, (nn.Linear,), pattern)]
        rnns = [n for n, m in _select(model, (nn.LSTM, nn.GRU), pattern)]
        if self.calib is not None and not rnns:
            notes.append(f"chose static int8 ({backend}, {_engine()} engine): int8 weights and "
                         f"activations for {len(convs)} conv and {len(linears)} Linear layers, "
                         f"activation ranges from --calib")
            return "static", notes
        if linears or rnns:
            notes.append(f"chose dynamic int8 ({backend}, {_engine()} engine): int8 weights, "
                         f"activations quantized per batch, for {len(linears)} Linear"
                         + (f" and {len(rnns)} LSTM/GRU" if rnns else "") + " layers")
            return "dynamic", notes      # the convs left in float: said by _dynamic
        raise BadInput(f"the model's quantizable layers are convs ({len(convs)}), which need "
                       f"calibrated activation ranges for int8 kernels: add --calib LOADER "
                       f"(static int8), or use --mode uniform")

    # ------------------------------------------------------------------ int8 dynamic
    def _dynamic(self, model, targets, notes) -> CompressionResult:
        model = model.cpu()        # int8 kernels are CPU kernels (the model lives on the CPU)
        float_convs = self._float_convs_note(model, targets)
        layers = []
        with quiet():
            for name, mod in targets:
                if isinstance(mod, nn.Linear):
                    w = mod.weight.detach().float().cpu()
                    qw = _int8_weight(w, self.per_channel)
                    new = DynamicInt8Linear.from_linear(mod, qw)
                    wq = qw.dequantize()
                else:
                    if getattr(mod, "proj_size", 0):
                        notes.append(f"{name}: LSTM with proj_size has no int8 kernel; left fp32")
                        continue
                    cls = DynamicInt8LSTM if isinstance(mod, nn.LSTM) else DynamicInt8GRU
                    new = cls.from_float(mod, lambda t: _int8_weight(t, self.per_channel))
                    gates = new._gates()
                    w = torch.cat([getattr(mod, k).detach().float().cpu().flatten()
                                   for k, _, _ in gates])
                    wq = torch.cat([q.dequantize().flatten() for _, q, _ in gates])
                _mark(new, self)
                model = _replace(model, name, new)
                layers.append(_row(name, mod, new, 8, "int8 dynamic", w, wq))
        extra = {"backend": int8_kernel_backend("cpu"), "engine": _engine()}
        if float_convs:
            notes.append(float_convs[0])
            extra["float_convs"], extra["float_conv_share"] = float_convs[1], float_convs[2]
        notes.append("weights int8 ("
                     + ("per-channel" if self.per_channel else "per-tensor")
                     + " scales); each batch's activations are quantized on the fly")
        return CompressionResult(model, layers=layers, notes=notes, extra=extra)

    def _float_convs_note(self, model, targets) -> tuple[str, int, float] | None:
        """Dynamic int8 has kernels for Linear/LSTM/GRU only: the (selected) convs stay in float.
        ``(note, how many, share of the model's parameters)``, or None when there is none."""
        convs = _select(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d), self._pattern())
        if not convs:
            return None
        n_conv = sum(p.numel() for _, m in convs for p in m.parameters())
        total = sum(p.numel() for p in model.parameters())
        share = n_conv / total if total else 0.0
        rnns = any(isinstance(m, (nn.LSTM, nn.GRU)) for _, m in targets)
        how = ("--mode static --calib LOADER --layers REGEX on the convs (static int8 has no "
               "LSTM/GRU kernel)" if rnns else "--mode static --calib LOADER")
        k = len(convs)
        note = (f"{k} conv layer{'s' if k != 1 else ''} ({100 * share:.3g}% of the parameters) "
                f"{'stay' if k != 1 else 'stays'} float32: dynamic int8 has kernels for "
                f"Linear/LSTM/GRU only; for int8 convs use {how}")
        return note, k, share

    # ------------------------------------------------------------------ int8 static
    def _static(self, model, ctx, targets, notes) -> CompressionResult:
        from .train import split_batch, to_device

        model = model.cpu().eval()      # int8 kernels are CPU kernels (the model lives there)
        cpu = torch.device("cpu")
        names = [n for n, _ in targets]
        fused = _fold_and_find_relus(model, names, notes)
        modules = dict(model.named_modules())
        reduce_range = _engine() in ("x86", "fbgemm")
        with quiet():
            from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

            obs_in = {n: HistogramObserver(dtype=torch.quint8, reduce_range=reduce_range)
                      for n in names}
            obs_out = {n: MinMaxObserver(dtype=torch.quint8, reduce_range=reduce_range)
                       for n in names}
        handles = []
        for n in names:
            def hook(mod, args, out, _n=n):
                obs_in[_n](args[0].detach().float())
                y = out.detach().float()
                obs_out[_n](torch.relu(y) if fused.get(_n) else y)
            handles.append(modules[n].register_forward_hook(hook))
        seen = 0
        first = None
        try:
            with torch.no_grad(), quiet():
                for i, batch in enumerate(self.calib):
                    if i >= self.calib_batches:
                        break
                    x, _ = split_batch(batch)
                    x = to_device(x, cpu)
                    first = x if first is None else first
                    model(x)
                    seen += 1
        finally:
            for h in handles:
                h.remove()
        if seen == 0:
            raise BadInput("--calib yielded no batches")
        layers = []
        with quiet():
            for n in names:
                mod = modules[n]
                in_s, in_z = obs_in[n].calculate_qparams()
                out_s, out_z = obs_out[n].calculate_qparams()
                w = mod.weight.detach().float().cpu()
                qw = _int8_weight(w, self.per_channel)
                bias = None if mod.bias is None else mod.bias.detach().float().cpu()
                attrs = {"input_scale": float(in_s), "input_zero_point": int(in_z),
                         "output_scale": float(out_s), "output_zero_point": int(out_z),
                         "fused_relu": bool(fused.get(n))}
                if isinstance(mod, nn.Linear):
                    new = StaticInt8Linear.build(mod, qw, bias, attrs)
                else:
                    new = STATIC_CONV[mod.weight.dim() - 2].build(mod, qw, bias, attrs)
                _mark(new, self)
                model = _replace(model, n, new)
                if fused.get(n):
                    model = _replace(model, fused[n], nn.Identity())
                kind = "int8 static" + (" +relu" if fused.get(n) else "")
                layers.append(_row(n, mod, new, 8, kind, w, qw.dequantize()))
        with torch.no_grad(), quiet():      # the int8 model runs (and torch.ao's one-time
            model(first)                     # deprecation warning is spent here, silenced)
        notes.append(f"activation ranges from {seen} calibration batches; int8 weights "
                     f"({'per-channel' if self.per_channel else 'per-tensor'}); each layer takes "
                     f"float input and returns float output")
        return CompressionResult(model, layers=layers, notes=notes,
                                 extra={"backend": int8_kernel_backend("cpu"), "engine": _engine(),
                                        "calibration_batches": seen})

    # ------------------------------------------------------------------ uniform / binary
    def _codes(self, model, ctx, targets, notes, mode) -> CompressionResult:
        bits = 1 if mode == "binary" else (self.bits or _DEFAULT_BITS["uniform"])
        per_channel = True if mode == "binary" else self.per_channel
        symmetric = True if mode == "binary" else self.symmetric

        def quantizer(w):
            if mode == "binary":
                codes, scale = binarize(w)
                return _dequant(codes, scale, None, True).to(w.dtype)
            codes, scale, zp = uniform_quantize(w, bits, per_channel=per_channel,
                                                symmetric=symmetric)
            return _dequant(codes, scale, zp, per_channel).to(w.dtype)

        originals = {n: m.weight.detach().clone() for n, m in targets}
        extra: dict = {}
        if self.qat is not None:
            for _, m in targets:
                parametrize.register_parametrization(m, "weight", _FakeQuantize(quantizer))
            try:
                extra["qat"] = self._fit(model, ctx, mode)
            finally:
                for _, m in targets:
                    parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        layers = []
        for name, m in targets:
            w = m.weight.detach()
            if mode == "binary":
                codes, scale = binarize(w)
                zp = None
            else:
                codes, scale, zp = uniform_quantize(w, bits, per_channel=per_channel,
                                                    symmetric=symmetric)
            new = _weight_layer(m, codes, scale, zp, bits, per_channel, symmetric)
            _mark(new, self)
            model = _replace(model, name, new)
            layers.append(_row(name, m, new, bits, mode, originals[name].float(),
                               new.dequantized_weight(torch.float32)))
        if mode == "binary":
            notes.append("binary weights: sign(w) * per-output-channel scale (mean |w|), "
                         "stored as 1-bit codes")
        else:
            notes.append(f"{bits}-bit {'symmetric' if symmetric else 'asymmetric'} codes, "
                         f"{'per-channel' if per_channel else 'per-tensor'} scales, stored packed "
                         f"at {bits} bits")
        notes.append("simulated: codes are dequantized in each forward (no low-bit kernels), "
                     "so latency does not improve")
        return CompressionResult(model, layers=layers, notes=notes, extra=extra)

    # ------------------------------------------------------------------ cluster
    def _cluster(self, model, ctx, targets, notes) -> CompressionResult:
        bits = self.bits or _DEFAULT_BITS["cluster"]
        originals = {n: m.weight.detach().clone() for n, m in targets}
        shared = {}
        for name, m in targets:
            centroids, index = kmeans_cluster(m.weight, bits)
            shared[name] = (centroids, index)
        extra: dict = {}
        if self.qat is not None:
            params = {n: _SharedWeights(c, i) for n, (c, i) in shared.items()}
            for name, m in targets:
                parametrize.register_parametrization(m, "weight", params[name])
            try:
                extra["qat"] = self._fit(model, ctx, "cluster", exclude_shadows=True)
            finally:
                for _, m in targets:
                    parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
                    m.weight.requires_grad_(True)
            shared = {n: (p.centroids.detach(), p.index) for n, p in params.items()}
        layers = []
        for name, m in targets:
            centroids, index = shared[name]
            with torch.no_grad():
                m.weight.copy_(_shared_weight(centroids, index).to(m.weight.dtype))
            m.nbc_bits = int(bits)
            _mark(m, self)
            row = _row(name, m, m, bits, "cluster", originals[name].float(), m.weight.float())
            row["clusters"] = int(centroids.numel())
            layers.append(row)
        notes.append(f"k-means weight sharing: up to {2 ** bits} centroids per layer (linear "
                     f"init), nonzero weights only, zeros kept")
        notes.append("stored as a codebook + " + ("Huffman-coded" if self.huffman else
                                                  "fixed-width") + " indices")
        result = CompressionResult(model, layers=layers, notes=notes, extra=extra)
        table = storage_table(model, huffman=True)
        if table is not None:
            result.tables["storage"] = table
        return result

    # ------------------------------------------------------------------ fp16 / bf16
    def _cast(self, model, ctx, notes, pattern, name: str) -> CompressionResult:
        name = name.lower()
        dtype = DTYPES[name]
        dev = ctx.device
        label = "bf16" if dtype == torch.bfloat16 else "fp16"
        if dev.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise BadInput(f"bf16 is not supported on {dev} ({torch.cuda.get_device_name(dev)}); "
                           f"use --dtype fp16")
        if dev.type not in ("cpu", "cuda"):
            notes.append(f"{label} on {dev}: not checked for this device type")
        layers = []
        if pattern is None:
            before = [(n, m) for n, m in model.named_modules() if _float_params(m)]
            model = ReducedPrecision(model.to(dtype), dtype).train(model.training)
            for n, m in before:
                layers.append({"layer": n or "(model)", "type": type(m).__name__, "bits": 16,
                               "dtype": label})
        else:
            chosen = [(n, m) for n, m in model.named_modules()
                      if n and pattern.search(n) and _float_params(m)]
            top = []
            for n, m in chosen:
                if not any(n.startswith(t + ".") for t, _ in top):
                    top.append((n, m))
            if not top:
                raise BadInput(f"--layers {self.layers!r} matches no module with floating-point "
                               f"weights")
            for n, m in top:
                model = _replace(model, n, ReducedPrecision(m.to(dtype), dtype))
                layers.append({"layer": n, "type": type(m).__name__, "bits": 16, "dtype": label})
        _check_runs(model, ctx, label, dev)
        if dev.type == "cpu" and dtype == torch.float16:
            notes.append("fp16 on CPU: the size halves, but CPUs without native fp16 arithmetic "
                         "compute it through conversions, so it is usually slower than fp32 "
                         "(see the latency); bf16 is the CPU choice")
        notes.append(f"weights and activations in {label}; inputs are cast on the way in and "
                     f"outputs back to float32 on the way out")
        return CompressionResult(model, layers=layers, notes=notes)

    # ------------------------------------------------------------------ QAT
    def _fit(self, model, ctx, mode, exclude_shadows: bool = False) -> list[dict]:
        from .train import fit

        params = None
        if exclude_shadows:
            params = [p for n, p in model.named_parameters()
                      if not n.endswith("parametrizations.weight.original")]
            for n, p in model.named_parameters():
                if n.endswith("parametrizations.weight.original"):
                    p.requires_grad_(False)
        epochs = self.epochs or 1
        lr = self.lr or _DEFAULT_LR[mode]
        return fit(model, self.qat, epochs=epochs, lr=lr, params=params, device=ctx.device,
                   progress=ctx.progress, desc=f"QAT {mode}", seed=self.seed)


# ------------------------------------------------------------------------------- helpers

def _names(kinds: tuple) -> str:
    return ", ".join(k.__name__ for k in kinds)


def _types_found(model: nn.Module) -> str:
    seen: dict[str, None] = {}
    for m in model.modules():
        seen.setdefault(type(m).__name__, None)
    return ", ".join(seen) or "nothing"


def _select(model: nn.Module, kinds: tuple, pattern) -> list[tuple[str, nn.Module]]:
    """Modules of exactly these types (a subclass may compute something else with its weight,
    e.g. MultiheadAttention's out_proj), whose name ``pattern`` matches."""
    out = []
    for n, m in model.named_modules():
        if type(m) in kinds and (pattern is None or pattern.search(n)):
            out.append((n, m))
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model`` (returns ``new`` itself when ``name`` is the root),
    in the train/eval mode of the module it replaces."""
    old = model.get_submodule(name)
    new.train(old.training)
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def _mark(module: nn.Module, cfg: QuantizeConfig) -> None:
    """Tell storage whether this layer's tensors may be Huffman-coded (``--huffman``)."""
    module.nbc_huffman = bool(cfg.huffman)


def _int8_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The torch.ao qint8 weight: symmetric codes in [-127, 127], scales on the fp16 grid (2
    bytes each in the file)."""
    codes, scale, _ = uniform_quantize(w, 8, per_channel=per_channel, symmetric=True, search=False)
    if per_channel:
        return torch._make_per_channel_quantized_tensor(
            codes, scale.double(), torch.zeros(scale.numel(), dtype=torch.long), 0)
    return torch._make_per_tensor_quantized_tensor(codes, float(scale[0]), 0)


def _weight_layer(m: nn.Module, codes, scale, zp, bits, per_channel, symmetric):
    kw = dict(per_channel=per_channel, symmetric=symmetric, bias=m.bias is not None)
    if isinstance(m, nn.Linear):
        new = QuantizedWeightLayer("linear", tuple(m.weight.shape), bits, **kw)
    else:
        if m.padding_mode != "zeros":
            raise BadInput(f"{type(m).__name__} with padding_mode={m.padding_mode!r} is not "
                           f"supported by --mode uniform/binary (only zero padding)")
        new = QuantizedWeightLayer(_CONV_OP[type(m)], tuple(m.weight.shape), bits, stride=m.stride,
                                   padding=m.padding, dilation=m.dilation, groups=m.groups, **kw)
    dev = m.weight.device
    new.codes = codes.to(dev)
    new.scale = compact_float(scale).to(dev)     # fp16 when exact: 2 bytes a scale in the file
    if zp is not None:
        new.zero_point = zp.to(dev)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone())
    return new.to(dev)


def _row(name, old, new, bits, kind, w, wq) -> dict:
    w = w.detach().float().cpu()
    wq = wq.detach().float().cpu()
    denom = float(w.norm()) or 1.0
    return {"layer": name or "(model)", "type": f"{type(old).__name__}",
            "new type": type(new).__name__, "kind": kind, "bits": int(bits),
            "params": int(w.numel()), "weight_error": float((wq - w).norm()) / denom}


def _float_params(m: nn.Module) -> bool:
    return any(p.is_floating_point() for p in m.parameters(recurse=False)) or \
        any(b.is_floating_point() for b in m.buffers(recurse=False))


def _check_runs(model, ctx, label, dev) -> None:
    """A dtype the device cannot run is bad input: try one forward of the example input."""
    x = ctx.example_input
    if x is None:
        return
    from .train import to_device

    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(to_device(x, dev))
    except (RuntimeError, NotImplementedError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"{label} does not run on {dev} for this model: {msg}") from None
    finally:
        model.train(was_training)


def _fold_and_find_relus(model: nn.Module, names: list[str], notes: list[str]) -> dict:
    """Fold each BatchNorm that directly follows one of the conv ``names`` into it (the BN module
    becomes Identity), and find the ReLU *module* that then follows a target (used only there):
    returns ``{target: relu module name}`` for the ReLUs to fuse into the int8 kernel.

    The graph comes from ``torch.fx.symbolic_trace``; a model it cannot trace is quantized layer
    by layer without folding or fusing (said in the notes)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: no fusion, still correct
        notes.append(f"no BatchNorm folding / ReLU fusion (torch.fx could not trace the model: "
                     f"{type(e).__name__})")
        return {}
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    wanted = set(names)
    folded, fused = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in wanted or calls[node.target] != 1:
            continue
        mod = modules[node.target]
        cur = node
        nxt = _only_user(cur)
        bn_types = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
        if (nxt is not None and nxt.op == "call_module" and calls.get(nxt.target) == 1
                and not isinstance(mod, nn.Linear)
                and type(modules[nxt.target]) is bn_types.get(mod.weight.dim() - 2)
                and modules[nxt.target].track_running_stats):
            bn = modules[nxt.target]
            new_conv = torch.nn.utils.fusion.fuse_conv_bn_eval(mod.eval(), bn.eval())
            _replace(model, node.target, new_conv)
            _replace(model, nxt.target, nn.Identity())
            folded.append(nxt.target)
            cur = nxt
            nxt = _only_user(cur)
        if (nxt is not None and nxt.op == "call_module" and calls.get(nxt.target) == 1
                and type(modules[nxt.target]) is nn.ReLU):
            fused[node.target] = nxt.target
    if folded:
        notes.append(f"folded {len(folded)} BatchNorm layers into the convs before them")
    if fused:
        notes.append(f"fused {len(fused)} ReLUs into the int8 kernels")
    return fused


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def storage_table(model: nn.Module, huffman: bool = True):
    """Per-tensor byte split of what ``nbcompress.save`` writes (positions, indices, codebook,
    raw), as a DataFrame; None if storage cannot describe the model."""
    try:
        import pandas as pd

        from .storage import breakdown
    except ImportError:
        return None
    try:
        rows = breakdown(model, huffman=huffman)
    except BadInput:
        return None
    cols = ["name", "shape", "numel", "nnz", "encoding", "positions", "indices", "codebook",
            "raw", "bytes", "bits_per_element"]
    return pd.DataFrame([{k: r.get(k) for k in cols} for r in rows], columns=cols)


# ---------------------------------------------------------------------------------- API

_OPTION_NAMES = ("bits", "mode", "dtype", "per_channel", "symmetric", "huffman", "calib", "qat",
                 "epochs", "lr", "layers", "calib_batches", "seed", "device", "progress")


def quantize(model: nn.Module, bits: int | None = None, **options) -> nn.Module:
    """Quantize a copy of ``model`` and return it (the argument is not changed).

    ``nbcompress.quantize(model)`` picks int8 with the fastest real kernel; options as in
    :class:`QuantizeConfig`: ``bits``, ``mode`` ("dynamic" | "static" | "uniform" | "cluster" |
    "binary"), ``dtype`` ("fp16" | "bf16"), ``per_channel``, ``symmetric``, ``huffman``,
    ``calib`` / ``qat`` (DataLoaders), ``epochs``, ``lr``, ``layers`` (regex), ``device``.
    ``example_input`` (a tensor) lets a ``dtype`` cast be checked on the device before returning.
    """
    example_input = options.pop("example_input", None)
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise BadInput(f"unknown quantize option {unknown[0]!r}; options: "
                       f"{', '.join(_OPTION_NAMES)}")
    return compress(model, QuantizeConfig(bits=bits, **options), example_input=example_input).model


def demo_config(train_loader, test_loader) -> tuple[str, QuantizeConfig]:
    """The terminal demo's step: int8 dynamic quantization with real CPU kernels (under a second
    on LeNet-300-100; about 4x smaller and faster at batch 64)."""
    return "quantize: int8 dynamic (real int8 CPU kernels)", QuantizeConfig(mode="dynamic",
                                                                          device="cpu")
