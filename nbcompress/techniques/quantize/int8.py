"""int8 with real kernels (``torch.ao``, CPU): dynamic (int8 weights, activations quantized per
batch on the fly, for Linear / LSTM / GRU) and static (int8 weights and activations, ranges
calibrated on data, for Conv1d/2d/3d and Linear; BatchNorm after a conv folded into it and a ReLU
after it fused into the kernel)."""
from __future__ import annotations

import torch
from torch import nn

from ...core import CompressionResult, FieldError, check_still_runs
from ...layers import layer_bar
from .common import CONV_LAYERS, mark, replace, row, select
from .lowbit import uniform_quantize
from .qmodules import quiet
from .qmodules_int8 import STATIC_CONV, DynamicInt8GRU, DynamicInt8Linear, DynamicInt8LSTM, \
    StaticInt8Linear

__all__ = ["int8_kernel_backend", "engine", "int8_weight", "dynamic", "static"]


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


def engine() -> str:
    return torch.backends.quantized.engine



def int8_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The torch.ao qint8 weight: symmetric codes in [-127, 127], scales on the fp16 grid (2
    bytes each in the file)."""
    codes, scale, _ = uniform_quantize(w, 8, per_channel=per_channel, symmetric=True, search=False)
    if per_channel:
        return torch._make_per_channel_quantized_tensor(
            codes, scale.double(), torch.zeros(scale.numel(), dtype=torch.long), 0)
    return torch._make_per_tensor_quantized_tensor(codes, float(scale[0]), 0)


def dynamic(cfg, model, targets, notes) -> CompressionResult:
    """Dynamic int8: each selected Linear / LSTM / GRU becomes its int8-kernel layer."""
    model = model.cpu()        # int8 kernels are CPU kernels (the model lives on the CPU)
    float_convs = _float_convs_note(cfg, model, targets)
    layers = []
    weights = sum(p.numel() for _, m in targets for p in m.parameters())
    with quiet(), layer_bar(len(targets), "quantize (int8 dynamic)", cfg.progress, weights) as bar:
        for i, (name, mod) in enumerate(targets):
            targets[i] = None         # the float layer is freed once replaced
            bar.update()
            if isinstance(mod, nn.Linear):
                w = mod.weight.detach().float().cpu()
                qw = int8_weight(w, cfg.per_channel)
                new = DynamicInt8Linear.from_linear(mod, qw)
                wq = qw                 # (the error is taken a block of rows at a time)
            else:
                if getattr(mod, "proj_size", 0):
                    notes.append(f"{name}: LSTM with proj_size has no int8 kernel; left fp32")
                    continue
                cls = DynamicInt8LSTM if isinstance(mod, nn.LSTM) else DynamicInt8GRU
                new = cls.from_float(mod, lambda t: int8_weight(t, cfg.per_channel))
                gates = new._gates()
                w = torch.cat([getattr(mod, k).detach().float().cpu().flatten()
                               for k, _, _ in gates])
                wq = torch.cat([q.dequantize().flatten() for _, q, _ in gates])
            mark(new, cfg)
            model = replace(model, name, new)
            layers.append(row(name, mod, new, 8, "int8 dynamic", w, wq, scratch=True))
            # the float layer and this layer's temporaries go now, not after the next layer's
            mod = new = w = wq = qw = gates = None
    extra = {"backend": int8_kernel_backend("cpu"), "engine": engine()}
    if float_convs:
        notes.append(float_convs[0])
        extra["float_convs"], extra["float_conv_share"] = float_convs[1], float_convs[2]
    notes.append("weights int8 ("
                 + ("per-channel" if cfg.per_channel else "per-tensor")
                 + " scales); each batch's activations are quantized on the fly")
    return CompressionResult(model, layers=layers, notes=notes, extra=extra)


def _float_convs_note(cfg, model, targets) -> tuple[str, int, float] | None:
    """Dynamic int8 has kernels for Linear/LSTM/GRU only: the (selected) convs stay in float.
    ``(note, how many, share of the model's parameters)``, or None when there is none."""
    convs = select(model, CONV_LAYERS, cfg.pattern())
    if not convs:
        return None
    n_conv = sum(p.numel() for _, m in convs for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    share = n_conv / total if total else 0.0
    rnns = any(isinstance(m, (nn.LSTM, nn.GRU)) for _, m in targets)
    how = ("{mode='static'} {calib=LOADER} {layers=REGEX} on the convs (static int8 has no "
           "LSTM/GRU kernel)" if rnns else "{mode='static'} {calib=LOADER}")
    k = len(convs)
    note = (f"{k} conv layer{'s' if k != 1 else ''} ({100 * share:.3g}% of the parameters) "
            f"{'stay' if k != 1 else 'stays'} float32: dynamic int8 has kernels for "
            f"Linear/LSTM/GRU only; for int8 convs use {how}")
    return note, k, share


def static(cfg, model, ctx, targets, notes) -> CompressionResult:
    """Static int8: activation ranges observed on ``cfg.calib`` batches, then each selected conv /
    Linear becomes its int8-kernel layer (BatchNorm folded, ReLU fused where they follow it)."""
    from ...batches import forward_batch, split_batch, to_device

    model = model.cpu().eval()      # int8 kernels are CPU kernels (the model lives there)
    cpu = torch.device("cpu")
    names = [n for n, _ in targets]
    targets.clear()                 # the modules are looked up by name (folding replaces some)
    fused = fold_and_find_relus(model, names, notes)
    modules = dict(model.named_modules())
    reduce_range = engine() in ("x86", "fbgemm")
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
            for i, batch in enumerate(cfg.calib):
                if i >= cfg.calib_batches:
                    break
                x, _ = split_batch(batch)
                x = to_device(x, cpu)
                first = x if first is None else first
                forward_batch(model, x)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise FieldError("{calib} yielded no batches")
    layers = []
    weights = sum(modules[n].weight.numel() for n in names)
    with quiet(), layer_bar(len(names), "quantize (int8 static)", cfg.progress, weights) as bar:
        for n in names:
            bar.update()
            mod = modules.pop(n)
            in_s, in_z = obs_in[n].calculate_qparams()
            out_s, out_z = obs_out[n].calculate_qparams()
            w = mod.weight.detach().float().cpu()
            qw = int8_weight(w, cfg.per_channel)
            bias = None if mod.bias is None else mod.bias.detach().float().cpu()
            attrs = {"input_scale": float(in_s), "input_zero_point": int(in_z),
                     "output_scale": float(out_s), "output_zero_point": int(out_z),
                     "fused_relu": bool(fused.get(n))}
            if isinstance(mod, nn.Linear):
                new = StaticInt8Linear.build(mod, qw, bias, attrs)
            else:
                new = STATIC_CONV[mod.weight.dim() - 2].build(mod, qw, bias, attrs)
            mark(new, cfg)
            model = replace(model, n, new)
            if fused.get(n):
                model = replace(model, fused[n], nn.Identity())
            kind = "int8 static" + (" +relu" if fused.get(n) else "")
            layers.append(row(n, mod, new, 8, kind, w, qw))
            mod = new = w = qw = bias = None
    with quiet():                       # the int8 model runs (else a one-line refusal; torch.ao's
        check_still_runs(model, None, first, cfg.technique)   # one-time warning spent, silenced)
    notes.append(f"activation ranges from {seen} calibration batches; int8 weights "
                 f"({'per-channel' if cfg.per_channel else 'per-tensor'}); each layer takes "
                 f"float input and returns float output")
    return CompressionResult(model, layers=layers, notes=notes,
                             extra={"backend": int8_kernel_backend("cpu"), "engine": engine(),
                                    "calibration_batches": seen})


def fold_and_find_relus(model: nn.Module, names: list[str], notes: list[str]) -> dict:
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
            replace(model, node.target, new_conv)
            replace(model, nxt.target, nn.Identity())
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

