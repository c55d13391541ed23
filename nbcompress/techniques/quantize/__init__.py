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
automatic choice is bf16 (fp16 where bf16 is not supported), and asking for int8 is bad inp

Files: ``config.py`` (the options, their checks, the choice of mode), ``int8.py`` (dynamic and
static int8 with real kernels, BatchNorm folding, ReLU fusion), ``lowbit.py`` (uniform, k-means
cluster, binary codes and QAT), ``cast.py`` (fp16 / bf16), ``qmodules.py`` /
``qmodules_int8.py`` (the storable layer classes), ``flops.py`` (FLOPs of the int8 ops),
``verbs.py`` (:func:`quantize`), ``demo.py``.
"""
from __future__ import annotations

from ...core import register_technique
from .common import MODES
from .config import QuantizeConfig
from .demo import demo_config
from .int8 import int8_kernel_backend
from .lowbit import binarize, kmeans_cluster, uniform_quantize
from .verbs import quantize

__all__ = ["QuantizeConfig", "quantize", "uniform_quantize", "binarize", "kmeans_cluster",
           "int8_kernel_backend", "demo_config", "MODES"]

register_technique(QuantizeConfig, demo=demo_config, pipeline="model")
