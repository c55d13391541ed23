"""``QuantizeConfig``: the options of ``%quantize`` / :func:`quantize`, declared once, the checks
declarations cannot say, and the choice of mode that ``run`` dispatches on (the modes themselves
are in ``int8.py``, ``lowbit.py`` and ``cast.py``)."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...core import CompressionResult, FieldError, StepConfig, StepContext
from ...layers import subclass_notes
from ...errors import render
from ...options import option
from .cast import cast
from .int8 import dynamic, engine, int8_kernel_backend, static
from .lowbit import cluster, code_weights
from .mixed import choose_bits
from ...storage import save
from .common import (AUTO_LAYERS, CONV_LAYERS, DTYPES, DYNAMIC_LAYERS, MODES, STATIC_LAYERS,
                     WEIGHT_LAYERS, low_precision, names, prepare, select, types_found)

__all__ = ["QuantizeConfig"]


class _FlagOffError(FieldError):
    """A FieldError naming ``{symmetric=False}``: in Python ``symmetric=False``, on the magic line
    the flag that sets it (``--asymmetric``); ``options.magic_spelling`` spells a flag option
    given a value as ``--flag VALUE``."""

    def spelled(self, spell):
        return render(self.template.replace("{symmetric=False}", "{symmetric}"), spell)


_INT8_MM_NOTE = ("int8 on CUDA through torch._int_mm (cuBLAS's int8 GEMM): Linear layers with "
                 "int8 weights (one scale per output channel) and int8 activations (one scale "
                 "per row, computed on the fly); convs, LSTM/GRU and Linear layers whose sizes "
                 "are not multiples of 8 keep int8 weight codes, dequantized in the forward")


@dataclass
class QuantizeConfig(StepConfig):
    """Quantize a model and rebind the name to the result (``%undo`` goes back).

    ``%quantize model`` alone picks int8 with the fastest real kernel for the model's layers on
    its device and says which: dynamic int8 for Linear layers, static int8 with ``--calib``
    (convs too); a bf16 / fp16 model (an LLM) gets int8 weight-only (int8 codes per output
    channel, computed in its own dtype). ``--mode uniform/cluster/binary`` store fewer bits per weight (simulated in the
    forward pass, packed in ``nbcompress.save``). Returns the step's report; the storage byte
    split of clustered models is in ``report.result.tables``.
    """

    technique: ClassVar[str] = "quantize"
    trains_with: ClassVar[str | None] = "qat"
    summary: ClassVar[str] = ("int8 with real kernels, fp16/bf16, k-bit uniform codes, weight "
                              "clustering (+ Huffman), binary weights, quantization-aware training")
    examples: ClassVar[tuple] = (
        "%quantize model                                   # int8, real CPU kernels",
        "%quantize cnn --calib train_loader                # static int8 for a conv net",
        "%quantize model --bits 4 --per-channel            # 4-bit codes, stored packed",
        "%quantize model --mode cluster --bits 5 --huffman # Deep Compression weight sharing",
        "%quantize model --mode binary --qat train_loader --epochs 5",
        "%quantize model --dtype bf16",
    )

    bits: int | None = option(
        None, kind="int", range="[1, 8]", metavar="B",
        help="bits per weight, 1..8 (int8 modes: 8; uniform default 8, cluster 5, binary 1); "
             "--bits below 8 without --mode means uniform")
    mode: str | None = option(
        None, kind="choice", choices=MODES,
        help="dynamic: int8 weights, activations quantized on the fly (Linear, LSTM, GRU); "
             "static: int8 weights and activations calibrated with --calib (conv + Linear); "
             "uniform: B-bit codes, stored packed; cluster: k-means weight sharing (Deep "
             "Compression); binary: sign(w) * per-channel scale. Default: the fastest real int8 "
             "kernel for the model's layers")
    dtype: str | None = option(
        None, kind="choice", choices=tuple(DTYPES), metavar="fp16|bf16",
        conflicts=("mode", "bits", "per_channel", "huffman", "calib", "qat"),
        help="cast weights and activations to fp16 or bf16 instead")
    budget_bytes: int | None = option(
        None, kind="int", range="[1, inf)", metavar="B",
        help="cluster / uniform: choose the bits of each layer (up to --bits, default 8) so the "
             "saved file fits in B bytes, spending them where the loss on --qat data (or the "
             "weight error) rises most")
    per_channel: bool = option(
        False, kind="bool", optional=False,
        help="one scale per output channel (default: one per tensor)")
    symmetric: bool = option(
        True, kind="bool", flag="--asymmetric", flag_value=False, optional=False,
        help="uniform codes with a zero point (default: symmetric around 0)")
    huffman: bool = option(
        False, kind="bool", optional=False,
        help="Huffman-code the stored indices/codes (and sparse positions) of the quantized "
             "layers when that is smaller")
    calib: Any = option(
        None, kind="loader",
        help="DataLoader whose batches set the activation ranges for static int8")
    calib_batches: int = option(
        16, kind="int", range="[1, inf)", metavar="N", optional=False,
        help="how many --calib batches to use (default 16)")
    qat: Any = option(
        None, kind="loader",
        help="quantization-aware training on this DataLoader (uniform, cluster, binary)")
    epochs: int | None = option(
        None, kind="int", range="[1, inf)", metavar="E", requires="qat",
        help="QAT epochs (default 1)")
    lr: float | None = option(
        None, kind="float", range="(0, inf)", metavar="LR", requires="qat",
        help="QAT learning rate (Adam; default 1e-4, binary 1e-3)")
    layers: str | None = option(
        None, kind="regex", metavar="REGEX",
        help="only layers whose name matches this regular expression (re.search)")
    seed: int = option(0, kind="int", metavar="SEED", optional=False, help="seed for QAT")

    def __post_init__(self):
        # choices are matched without case (as on the magic line): one spelling from here on
        for f in ("mode", "dtype"):
            v = getattr(self, f)
            if isinstance(v, str):
                setattr(self, f, v.lower())

    # ------------------------------------------------------------------ checks
    def validate(self, model: nn.Module) -> None:
        """What the declarations cannot say: which options each mode takes, and that the model
        has layers to quantize (``layers`` selecting some of them)."""
        mode = self._mode_without_device()
        if mode in ("dynamic", "static") and self.bits not in (None, 8):
            raise FieldError(f"{{mode={mode!r}}} runs int8 kernels ({{bits=8}}); for {self.bits}"
                             f"-bit weights use {{mode='uniform'}} or {{mode='cluster'}}")
        if self.budget_bytes is not None and mode not in ("cluster", "uniform"):
            raise FieldError("{budget_bytes} chooses bits per layer for {mode='cluster'} or "
                             "{mode='uniform'}: give one of them")
        if mode == "binary" and self.bits not in (None, 1):
            raise FieldError(f"{{mode='binary'}} stores 1 bit per weight; got {{bits={self.bits}}}")
        if mode == "static" and self.calib is None:
            raise FieldError("{mode='static'} needs calibration data: add {calib=LOADER} (a few "
                             "batches of typical inputs set the activation ranges)")
        if self.calib is not None and mode not in (None, "static", "dtype"):
            raise FieldError(f"{{calib}} sets activation ranges for static int8; it does not "
                             f"apply to {{mode={mode!r}}}")
        if self.qat is not None and mode not in ("uniform", "cluster", "binary", "dtype"):
            raise FieldError("{qat} trains {mode='uniform'}, cluster or binary; int8 kernels "
                             "(dynamic/static) are converted without training (for int8 QAT use "
                             "{mode='uniform'} {bits=8} {qat=LOADER})")
        if not self.symmetric and mode != "uniform":
            raise _FlagOffError("{symmetric=False} applies to {mode='uniform'} (int8 kernels use "
                                "symmetric weights, binary and cluster have no zero point)")
        if self.per_channel and mode == "cluster":
            raise FieldError("{per_channel} does not apply to {mode='cluster'} (one codebook per "
                             "layer)")
        if mode == "dtype":
            if not any(p.is_floating_point() for p in model.parameters()):
                raise FieldError(f"{{dtype}}: the model has no floating-point weights to cast; it "
                                 f"has: {types_found(model)}")
            return
        kinds = self._layer_types(mode)
        found = select(model, kinds, None)
        low = low_precision(found, self.pattern())
        if low is not None and mode is None and self.calib is not None:
            raise FieldError(f"{{calib}} calibrates static int8, whose torch.ao kernels compute "
                             f"in float32, and the model's layers are {low}: leave out {{calib}} "
                             f"for int8 weight-only ({low} compute), or cast the model to "
                             f"float32 first (model.float())")
        if low is not None and mode in ("dynamic", "static"):
            raise FieldError(f"{{mode={mode!r}}} runs torch.ao's int8 kernels, which compute in "
                             f"float32, and the model's layers are {low}: leave out {{mode}} for "
                             f"int8 weight-only ({low} compute), or cast the model to float32 "
                             f"first (model.float())")
        if not found:
            raise FieldError(f"no quantizable layer for {self._what(mode)} ({names(kinds)}) in "
                             f"the model; it has: {types_found(model)}")
        pattern = self.pattern()
        if pattern is not None and not any(pattern.search(n) for n, _ in found):
            raise FieldError(f"{{layers}} {self.layers!r} matches none of the quantizable layers: "
                             f"{', '.join(n or '(model)' for n, _ in found[:12])}"
                             f"{' ...' if len(found) > 12 else ''}")

    def pattern(self):
        """``layers`` compiled (checked before: see ``options.check_fields``), or None."""
        return None if self.layers is None else re.compile(self.layers)

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
        return {None: "int8", "dtype": "a cast"}.get(mode, f"{{mode={mode!r}}}")

    def keeps_flops(self, model: nn.Module, ctx: StepContext) -> bool:
        """Dynamic int8 replaces each Linear by an int8 Linear of the same shape, whose FLOPs the
        counter counts the same (tested): the count of the model before holds."""
        try:
            return self._choose(model, ctx.device, ctx.origin_device)[0] == "dynamic"
        except FieldError:
            return False

    def shared_with_copy(self, model: nn.Module, ctx: StepContext) -> list[torch.Tensor]:
        """Dynamic int8 only reads each selected Linear's float weight (to make its int8 codes)
        and replaces the layer: the work copy holds the model's own weights, not copies made only
        to be dropped (they would raise the step's peak memory by the model's size). A weight
        tied to another layer's is copied as before (the layer may be left whole)."""
        try:
            mode, _ = self._choose(model, ctx.device, ctx.origin_device)
        except FieldError:
            return []
        if mode != "dynamic":
            return []
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        return [m.weight for _, m in select(model, (nn.Linear,), self.pattern())
                if isinstance(m, nn.Linear) and isinstance(m.weight, torch.Tensor)
                and uses.get(id(m.weight)) == 1]

    # ------------------------------------------------------------------ run
    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        from ...train import check_loader_runs

        check_loader_runs(model, self.calib, "{calib}", ctx.device, labels=False)  # inputs only
        check_loader_runs(model, self.qat, "{qat}", ctx.device)
        mode, notes = self._choose(model, ctx.device, ctx.origin_device)
        pattern = self.pattern()
        if mode.startswith("dtype"):
            return cast(self, model, ctx, notes, pattern, mode.partition(":")[2] or self.dtype)
        kinds = self._layer_types(None if mode in ("weight_only", "int8_mm") else mode)
        targets = prepare(model, select(model, kinds, pattern), notes)
        notes.extend(subclass_notes(model, kinds, pattern))
        if not targets:
            raise FieldError("no layer left to quantize: " + "; ".join(notes))
        if mode == "weight_only":
            return code_weights(self, model, ctx, targets, notes, "uniform", bits=8,
                                per_channel=True, search=False, kind="int8 weight-only")
        if mode == "int8_mm":
            return code_weights(self, model, ctx, targets, notes, "uniform", bits=8,
                                per_channel=True, search=False, kind="int8 (torch._int_mm)",
                                int8_matmul=True)
        if mode == "dynamic":
            return dynamic(self, model, targets, notes)
        if mode == "static":
            return static(self, model, ctx, targets, notes)
        if self.budget_bytes is None:
            if mode == "cluster":
                return cluster(self, model, ctx, targets, notes)
            return code_weights(self, model, ctx, targets, notes, mode)
        bits_of = choose_bits(self, model, ctx, targets, mode, notes)
        result = (cluster(self, model, ctx, targets, notes, bits_of=bits_of) if mode == "cluster"
                  else code_weights(self, model, ctx, targets, notes, mode, bits_of=bits_of))
        written = save(result.model, io.BytesIO(), huffman=self.huffman)
        notes.append(f"the file: {written:,} bytes, "
                     + (f"within the {self.budget_bytes:,}-byte budget" if written <=
                        self.budget_bytes else f"{written - self.budget_bytes:,} over the "
                        f"{self.budget_bytes:,}-byte budget (fine-tuning changed how well the "
                        f"codes compress): give a slightly smaller budget"))
        result.extra["budget_bytes"] = self.budget_bytes
        result.extra["file_bytes"] = written
        result.extra["bits_per_layer"] = bits_of
        return result

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
        if mode == "dynamic" and origin.type == "cuda":
            notes.append(_INT8_MM_NOTE)
            return "int8_mm", notes
        if mode in ("dynamic", "static"):
            if backend is None:
                raise FieldError(f"this PyTorch build has no int8 CPU kernels (quantized engines: "
                                 f"{torch.backends.quantized.supported_engines}); use "
                                 f"{{mode='uniform'}} or {{dtype='bf16'}}")
            if origin.type != "cpu":
                raise FieldError(f"int8 kernels (torch.ao) run on CPU only and the model lives on "
                                 f"{origin}: move it to the CPU first (model = model.cpu()), or "
                                 f"use {{dtype='bf16'}} (or fp16) or {{mode='uniform'}} there")
            if device.type != "cpu":
                notes.append(f"int8 kernels run on the CPU: quantized there, not on {device}")
            return mode, notes
        if mode is not None:
            return mode, notes
        # automatic: the fastest real kernel for these layers where the model lives
        if origin.type != "cpu" or backend is None:
            where = origin if origin.type != "cpu" else device
            if self.bits == 8 and where.type == "cuda":
                notes.append(_INT8_MM_NOTE)
                return "int8_mm", notes
            if self.bits == 8:
                notes.append(f"no int8 kernels on {where} (torch.ao's are CPU-only): 8-bit "
                             f"uniform codes instead, stored packed, dequantized in forward")
                return "uniform", notes
            dt = "bf16" if where.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
            int8 = ("--mode dynamic runs int8 GEMMs here (torch._int_mm)" if where.type == "cuda"
                    else "move the model to the CPU")
            notes.append(f"chose {dt}: torch.ao's int8 kernels are CPU-only and this model runs "
                         f"on {where}, where {dt} has native kernels (for int8: {int8})")
            return "dtype:" + dt, notes
        pattern = self.pattern()
        low = low_precision(select(model, AUTO_LAYERS, pattern), None)
        if low is not None and self.calib is None:
            notes.append(f"chose int8 weight-only: the model computes in {low} and torch.ao's "
                         f"int8 kernels in float32, so each weight is stored as int8 codes with "
                         f"one scale per output channel and dequantized to {low} in the forward "
                         f"(torchao's Int8WeightOnlyConfig scheme): half the bytes, {low} "
                         f"compute, no int8 kernel speed-up")
            return "weight_only", notes
        convs = select(model, CONV_LAYERS, pattern)
        linears = select(model, (nn.Linear,), pattern)
        rnns = select(model, (nn.LSTM, nn.GRU), pattern)
        if self.calib is not None and not rnns:
            notes.append(f"chose static int8 ({backend}, {engine()} engine): int8 weights "
                         f"and activations for {len(convs)} conv and {len(linears)} Linear "
                         f"layers, activation ranges from {{calib}}")
            return "static", notes
        if linears or rnns:
            notes.append(f"chose dynamic int8 ({backend}, {engine()} engine): int8 weights, "
                         f"activations quantized per batch, for {len(linears)} Linear"
                         + (f" and {len(rnns)} LSTM/GRU" if rnns else "") + " layers")
            return "dynamic", notes      # the convs left in float: said by int8.dynamic
        raise FieldError(f"the model's quantizable layers are convs ({len(convs)}), which need "
                         f"calibrated activation ranges for int8 kernels: add {{calib=LOADER}} "
                         f"(static int8), or use {{mode='uniform'}}")
